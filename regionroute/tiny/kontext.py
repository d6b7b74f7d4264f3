"""A tiny FLUX.1-Kontext pipeline built in code: same classes, toy sizes.

Component sizes follow ARCHITECTURE.md's test recipe, with a 4-level VAE so the
latent grid keeps the real model's geometry (``vae_scale_factor = 8``, 2x2 packing:
one token per 16x16 pixels, as docs/method.md's ``h = H / 16``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from regionroute.tiny.text import clip_tokenizer, t5_tokenizer

__all__ = ["TINY_KONTEXT_VERSION", "build_tiny_kontext", "save_tiny_kontext"]

#: Bump when the spec changes, so cached builds are not reused.
TINY_KONTEXT_VERSION = "1"
TEXT_DIM = 32  # T5 d_model == transformer joint_attention_dim
POOLED_DIM = 32  # CLIP hidden size == transformer pooled_projection_dim
LATENT_CHANNELS = 4


def build_tiny_kontext(seed: int = 0):  # -> FluxKontextPipeline
    """Build the tiny pipeline with seeded random weights (deterministic on CPU)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxKontextPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    t5_tok, clip_tok = t5_tokenizer(), clip_tokenizer()
    vocab = len(t5_tok)
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=LATENT_CHANNELS * 4,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=TEXT_DIM,
        pooled_projection_dim=POOLED_DIM,
        guidance_embeds=True,
        axes_dims_rope=(4, 4, 8),
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=8,
        sample_size=128,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab,
            hidden_size=POOLED_DIM,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            projection_dim=POOLED_DIM,
            bos_token_id=clip_tok.bos_token_id,
            eos_token_id=clip_tok.eos_token_id,
            pad_token_id=clip_tok.pad_token_id,
        )
    )
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=vocab,
            d_model=TEXT_DIM,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=32,
            feed_forward_proj="gated-gelu",
            pad_token_id=t5_tok.pad_token_id,
            eos_token_id=t5_tok.eos_token_id,
            decoder_start_token_id=t5_tok.pad_token_id,
        )
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    for module in (transformer, vae, clip, t5):  # as from_pretrained returns them: T5 dropout off
        module.eval()
    return FluxKontextPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=clip,
        tokenizer=clip_tok,
        text_encoder_2=t5,
        tokenizer_2=t5_tok,
        transformer=transformer,
    )


def save_tiny_kontext(path: str | Path, seed: int = 0) -> Path:
    """Build the tiny pipeline and ``save_pretrained`` it to ``path``."""
    path = Path(path)
    build_tiny_kontext(seed).save_pretrained(path)
    return path
