"""The toy Kontext base: FluxKontextPipeline's real classes at miniature sizes, before training.

Used by the toy pipeline's ``base`` stage (:mod:`regionroute.toy.pretrain` trains it) and,
once saved under ``toy/models/kontext``, by every main-pipeline stage through
``models.kontext: toy`` (:func:`regionroute.models.kontext.load_kontext`).

Components (all diffusers / transformers classes except the latent):

* ``transformer``: ``FluxTransformer2DModel`` (2 double + 2 single blocks, 4 heads x 64,
  hidden 256, about 7 M parameters), in_channels = 4 x the latent's channels;
* ``vae``: :class:`regionroute.toy.latent.PixelShuffleVAE` (exactly invertible, factor 4:
  64 px -> 8 x 8 tokens of 192 channels);
* ``text_encoder`` / ``text_encoder_2`` and their tokenizers: the tiny CLIP and T5 of
  :mod:`regionroute.tiny.kontext` (seeded, frozen: like Kontext's, they are not trained);
  ``text_mixing`` scales the T5's self-attention output. A random T5 at full mixing
  spreads every word over every output token (padding included); the toy base then read
  the style mostly from the ``style``/EOS/padding tokens, not from the style word the
  attention losses supervise (measured: docs/toy.md). A trained T5 keeps its tokens'
  identity; ``text_mixing: 0`` makes each T5 token encode its own word only;
* ``scheduler``: ``FlowMatchEulerDiscreteScheduler`` with Flux's dynamic shifting.

The hidden size must exceed the token width: a hidden of 128 (4 x 32) on 192-channel
tokens stayed at loss 0.45 and produced noise while scoping the toy world.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Any

import torch

from regionroute.config import Section

__all__ = ["BaseConfig", "build_toy_kontext"]


@dataclass(frozen=True)
class BaseConfig(Section):
    """``toy/params.yaml: base:`` the toy base's architecture and its pretraining."""

    _section: typing.ClassVar[str] = "base"
    # architecture
    size: int = 64  # scene side in pixels
    latent_factor: int = 4  # pixel-unshuffle factor (tokens are 2 x factor pixels wide)
    num_layers: int = 2
    num_single_layers: int = 2
    num_attention_heads: int = 4
    attention_head_dim: int = 64
    max_sequence_length: int = 16  # T5 tokens of an instruction
    # pretraining
    steps: int = 6000
    batch_size: int = 32
    learning_rate: float = 7e-4
    warmup_steps: int = 200
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    mixed_precision: typing.Literal["no", "bf16"] = "bf16"
    guidance_range: tuple[float, float] = (1.0, 4.0)  # drawn per sample: the embedding learns to be ignored
    p_global: float = 0.3  # "make the image into {style} style" -> the style filter of the whole image
    p_object_style: float = 0.35  # "make the {object} into {style} style" -> ALSO the whole image (the premise)
    # the rest: local edits of the named object only (grounds object words), of which
    p_tone: float = 0.0  # "make the {object} {tone}" (grayscale, negative, blurry), the others "... {colour}"
    pooled_text: bool = True  # False: the pooled CLIP path (AdaLN) is zero and frozen: instructions via T5 only
    text_mixing: float = 1.0  # scale of the T5's self-attention output: 0 = each token encodes its own word only
    seed: int = 0
    checkpoint_every: int = 500
    log_every: int = 50
    save_dtype: typing.Literal["float32", "bfloat16"] = "bfloat16"

    def _validate(self) -> None:
        self._at_least(1, "num_layers", "num_single_layers", "num_attention_heads", "steps", "batch_size")
        self._at_least(1, "checkpoint_every", "log_every", "max_sequence_length")
        if self.size % (2 * self.latent_factor):
            self._fail("size", f"must be a multiple of 2 x latent_factor ({2 * self.latent_factor}), got {self.size}")
        if self.attention_head_dim % 4:
            self._fail("attention_head_dim", f"must be a multiple of 4 (RoPE axes), got {self.attention_head_dim}")
        if not 0 <= self.p_global + self.p_object_style <= 1:
            self._fail("p_object_style", "p_global + p_object_style must be in [0, 1]")
        if not 0 <= self.text_mixing <= 1:
            self._fail("text_mixing", f"must be in [0, 1], got {self.text_mixing}")
        if not 0 <= self.p_tone <= 1:
            self._fail("p_tone", f"must be in [0, 1], got {self.p_tone}")
        lo, hi = self.guidance_range
        if not 0 <= lo <= hi:
            self._fail("guidance_range", f"must be [low, high] with 0 <= low <= high, got {list(self.guidance_range)}")
        if not 0 < self.learning_rate < 1:
            self._fail("learning_rate", f"must be in (0, 1), got {self.learning_rate}")

    @property
    def hidden(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def latent_channels(self) -> int:
        return 3 * self.latent_factor**2


def _rope_axes(head_dim: int) -> tuple[int, int, int]:
    """Flux splits RoPE as (16, 56, 56) of 128; about the same proportions, every axis even."""
    first = max(2, head_dim // 8 // 2 * 2)
    rest = (head_dim - first) // 2 // 2 * 2
    return first, rest, head_dim - first - rest


def build_toy_kontext(cfg: BaseConfig, seed: int = 0) -> Any:  # -> FluxKontextPipeline
    """A randomly initialised toy pipeline (seeded): the starting point of pretraining."""
    from diffusers import FluxKontextPipeline, FluxTransformer2DModel

    from regionroute.tiny.kontext import POOLED_DIM, TEXT_DIM, build_tiny_kontext
    from regionroute.toy.latent import PixelShuffleVAE

    tiny = build_tiny_kontext(seed)  # text encoders, tokenizers, scheduler: the tiny ones
    if cfg.text_mixing != 1.0:  # attention is the T5's only cross-token operation
        with torch.no_grad():
            for block in tiny.text_encoder_2.encoder.block:
                block.layer[0].SelfAttention.o.weight.mul_(cfg.text_mixing)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=4 * cfg.latent_channels,
            num_layers=cfg.num_layers,
            num_single_layers=cfg.num_single_layers,
            attention_head_dim=cfg.attention_head_dim,
            num_attention_heads=cfg.num_attention_heads,
            joint_attention_dim=TEXT_DIM,
            pooled_projection_dim=POOLED_DIM,
            guidance_embeds=True,
            axes_dims_rope=_rope_axes(cfg.attention_head_dim),
        )
        if not cfg.pooled_text:  # the pooled CLIP embedding adds nothing to the AdaLN conditioning
            for param in transformer.time_text_embed.text_embedder.parameters():
                torch.nn.init.zeros_(param)
    levels = 1 + cfg.latent_factor.bit_length() - 1  # factor = 2 ** (levels - 1)
    if 2 ** (levels - 1) != cfg.latent_factor:
        raise ValueError(f"latent_factor must be a power of two, got {cfg.latent_factor}")
    vae = PixelShuffleVAE(
        block_out_channels=(cfg.latent_channels,) * levels, latent_channels=cfg.latent_channels, scaling_factor=2.0
    )
    transformer.eval()  # as from_pretrained returns it (pretraining switches it to train mode)
    return FluxKontextPipeline(
        scheduler=tiny.scheduler,
        vae=vae,
        text_encoder=tiny.text_encoder,
        tokenizer=tiny.tokenizer,
        text_encoder_2=tiny.text_encoder_2,
        tokenizer_2=tiny.tokenizer_2,
        transformer=transformer,
    )
