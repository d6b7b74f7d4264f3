"""Configs of the configured models, read without weights (docs/method.md §2, "Memory").

Used by :mod:`regionroute.check.accounting`. A model's own ``config.json`` files are read when
they are on disk (:class:`~regionroute.check.sources.FileSource`); a hub model that is not
downloaded yet falls back to the real configs written below, copied from its repository
(FLUX.1-Kontext-dev's components, Qwen2.5-VL-7B-Instruct). ``tiny`` models are built on ``meta``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from regionroute.check.sources import FileSource
from regionroute.errors import UserError
from regionroute.models import TINY, TOY, Reference, parse_reference

__all__ = [
    "FLUX_KONTEXT_DEV",
    "QWEN25_VL_7B",
    "KontextConfigs",
    "clip_model_cfg",
    "kontext_configs",
    "vae_class",
    "vae_scale_factor",
    "vlm_config",
]

#: black-forest-labs/FLUX.1-Kontext-dev, the ``config.json`` of each diffusers component.
FLUX_KONTEXT_DEV: dict[str, dict[str, Any]] = {
    "transformer": {
        "_class_name": "FluxTransformer2DModel", "patch_size": 1, "in_channels": 64, "out_channels": None,
        "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128, "num_attention_heads": 24,
        "joint_attention_dim": 4096, "pooled_projection_dim": 768, "guidance_embeds": True,
        "axes_dims_rope": [16, 56, 56],
    },
    "text_encoder": {  # CLIP ViT-L/14 text tower (CLIPTextModel)
        "hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12,
        "max_position_embeddings": 77, "vocab_size": 49408, "projection_dim": 768, "hidden_act": "quick_gelu",
        "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1, "layer_norm_eps": 1e-05,
    },
    "text_encoder_2": {  # T5 v1.1 XXL encoder (T5EncoderModel)
        "d_ff": 10240, "d_kv": 64, "d_model": 4096, "dense_act_fn": "gelu_new", "feed_forward_proj": "gated-gelu",
        "is_gated_act": True, "layer_norm_epsilon": 1e-06, "num_heads": 64, "num_layers": 24,
        "relative_attention_max_distance": 128, "relative_attention_num_buckets": 32,
        "tie_word_embeddings": False, "vocab_size": 32128,
    },
    "vae": {
        "_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
        "in_channels": 3, "out_channels": 3, "latent_channels": 16, "layers_per_block": 2,
        "mid_block_add_attention": True, "norm_num_groups": 32, "sample_size": 1024, "scaling_factor": 0.3611,
        "shift_factor": 0.1159, "use_post_quant_conv": False, "use_quant_conv": False, "force_upcast": True,
    },
}  # fmt: skip
#: Qwen/Qwen2.5-VL-7B-Instruct ``config.json`` (the VLM judge).
QWEN25_VL_7B: dict[str, Any] = {
    "model_type": "qwen2_5_vl", "hidden_size": 3584, "intermediate_size": 18944, "num_attention_heads": 28,
    "num_hidden_layers": 28, "num_key_value_heads": 4, "max_position_embeddings": 128000, "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0, "vocab_size": 152064, "tie_word_embeddings": False, "hidden_act": "silu",
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "image_token_id": 151655,
    "video_token_id": 151656, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
    "vision_config": {
        "depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
        "in_chans": 3, "out_hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14,
        "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2,
        "temporal_patch_size": 2,
    },
}  # fmt: skip


@dataclass(frozen=True)
class KontextConfigs:
    """The ``config.json`` of each Kontext component, and where they were read."""

    transformer: dict[str, Any]
    text_encoder: dict[str, Any]
    text_encoder_2: dict[str, Any]
    vae: dict[str, Any]
    source: str


def vae_scale_factor(cfg: dict[str, Any]) -> int:
    """Pixels per latent cell of a ``vae/config.json``, as ``FluxKontextPipeline`` computes it:
    ``2 ** (len(block_out_channels) - 1)`` (8 for FLUX's AutoencoderKL, 4 for the toy latent)."""
    return 2 ** (len(cfg["block_out_channels"]) - 1)


def vae_class(cfg: dict[str, Any]) -> type:
    """The VAE class a Kontext ``vae/config.json`` names: ``AutoencoderKL`` or the toy world's latent."""
    if cfg.get("_class_name") == "PixelShuffleVAE":
        from regionroute.toy.latent import PixelShuffleVAE

        return PixelShuffleVAE
    from diffusers import AutoencoderKL

    return AutoencoderKL


def _parsed(ref: str, toy_name: str, open_clip: bool = False) -> Reference | None:
    """The parsed reference (:mod:`regionroute.models`); None when it names no model (the check reports why)."""
    try:
        return parse_reference(ref, toy_name, open_clip=open_clip)
    except UserError:
        return None


def kontext_configs(ref: str, cache_dir: Path | None = None) -> KontextConfigs | None:
    """Configs for ``models.kontext``; None when the reference names no model or a directory without them."""
    names = ("transformer", "text_encoder", "text_encoder_2", "vae")
    parsed = _parsed(ref, "kontext")
    if parsed is None:
        return None
    if parsed.kind == TINY:
        from regionroute.tiny.kontext import build_tiny_kontext

        with torch.device("meta"):
            pipe = build_tiny_kontext()
        cfgs = [dict(pipe.transformer.config), pipe.text_encoder.config.to_dict(), pipe.text_encoder_2.config.to_dict()]
        return KontextConfigs(*cfgs, dict(pipe.vae.config), source="tiny (built in code)")
    src = FileSource.of(parsed, cache_dir)
    source = {TOY: f"toy ({parsed.path})", "dir": str(parsed.path), "hub": f"{ref} (Hugging Face cache)"}[parsed.kind]
    found = [src.read_json(f"{name}/config.json") for name in names]
    if all(isinstance(c, dict) for c in found):
        return KontextConfigs(*found, source=source)
    if src.repo is not None:  # not downloaded yet: the real model's configs, written in this module
        return KontextConfigs(*(FLUX_KONTEXT_DEV[n] for n in names), source="FLUX.1-Kontext-dev configs (built in)")
    return None


def clip_model_cfg(ref: str, cache_dir: Path | None) -> tuple[dict[str, Any], bool] | None:
    """open_clip ``model_cfg`` of ``score.clip`` and whether it uses QuickGELU."""
    import open_clip

    from regionroute.tiny.clip import TINY_CLIP_CONFIG

    parsed = _parsed(ref, "clip", open_clip=True)
    if parsed is None:
        return None
    if parsed.kind == TINY:
        return dict(TINY_CLIP_CONFIG), False
    if parsed.kind != "open_clip":
        cfg = FileSource.of(parsed, cache_dir).read_json("open_clip_config.json")
        return (cfg["model_cfg"], bool(cfg["model_cfg"].get("quick_gelu"))) if isinstance(cfg, dict) else None
    name, _, pretrained = ref.partition("/")
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        return None
    return cfg, bool(open_clip.get_pretrained_cfg(name, pretrained).get("quick_gelu", False))


def vlm_config(ref: str, cache_dir: Path | None) -> Any:
    """A transformers ``Qwen2_5_VLConfig`` for ``score.vlm`` (None when the reference names no model)."""
    from transformers import Qwen2_5_VLConfig

    parsed = _parsed(ref, "vlm")
    if parsed is None:
        return None
    if parsed.kind == TINY:
        from regionroute.tiny.qwen import build_tiny_qwen

        with torch.device("meta"):
            return build_tiny_qwen()[0].config
    raw = FileSource.of(parsed, cache_dir).read_json("config.json")
    if parsed.kind == "hub":  # not downloaded yet: the real model's config, written in this module
        raw = raw or QWEN25_VL_7B
    return Qwen2_5_VLConfig(**raw) if isinstance(raw, dict) else None
