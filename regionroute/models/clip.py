"""Loading the CLIP of the RSM metric with open_clip (docs/method.md §7).

:func:`load_clip` takes what :func:`regionroute.models.parse_reference` parses (``open_clip=True``):
``tiny``, ``toy`` (``toy/models/clip``), an open_clip ``local-dir:`` directory, ``hf-hub:org/repo``
or ``<model>/<pretrained>`` (the paper's ``ViT-L-14/openai``, QuickGELU as trained); only
safetensors or ``weights_only`` checkpoints are read. Used by ``score``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from regionroute.errors import UserError
from regionroute.models import TINY, parse_reference, resolve_device, resolve_reference

__all__ = ["load_clip"]


def _split_spec(ref: str) -> tuple[str, dict[str, Any]]:
    """Turn a reference into ``(model_name, create_model kwargs)`` for open_clip."""
    import open_clip

    from regionroute.tiny.clip import TINY_CLIP_VERSION, save_tiny_clip

    try:
        parsed = parse_reference(ref, "clip", open_clip=True)
    except UserError as exc:
        raise UserError(f"models.clip: {exc}") from None
    if parsed.kind == TINY:
        return "local-dir:" + resolve_reference(ref, "clip", save_tiny_clip, TINY_CLIP_VERSION), {}
    if parsed.kind == "hub":
        return ref, {}
    if parsed.path is not None:
        if not (parsed.path / "open_clip_config.json").is_file():
            raise UserError(f"models.clip: {ref!r} has no open_clip_config.json")
        return f"local-dir:{parsed.path}", {}
    name, _, pretrained = ref.partition("/")
    if name not in open_clip.list_models():
        raise UserError(f"models.clip: unknown open_clip model {name!r} in {ref!r}")
    kwargs: dict[str, Any] = {"pretrained": pretrained}
    tag_cfg = open_clip.get_pretrained_cfg(name, pretrained)
    if tag_cfg.get("quick_gelu", False):
        # The OpenAI weights were trained with QuickGELU; open_clip only warns on a
        # mismatch, and ``ViT-L-14`` alone would silently use the wrong activation.
        kwargs["force_quick_gelu"] = True
    elif not tag_cfg and not Path(pretrained).expanduser().is_file():
        raise UserError(
            f"models.clip: {pretrained!r} is neither a pretrained tag of {name} "
            f"({', '.join(open_clip.list_pretrained_tags_by_model(name))}) nor a checkpoint file"
        )
    return name, kwargs


def load_clip(ref: str, device: str | torch.device = "auto") -> tuple[torch.nn.Module, Callable, Callable]:
    """Load ``(model, preprocess, tokenizer)`` in eval mode on ``device``.

    ``preprocess`` maps a PIL image to a normalized ``(3, S, S)`` tensor; ``tokenizer``
    maps a list of strings to ``(N, context_length)`` token ids. The model's
    ``encode_image`` / ``encode_text`` give the embeddings compared by RSM.
    """
    import open_clip

    dev = device if isinstance(device, torch.device) else resolve_device(device)
    name, kwargs = _split_spec(ref)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(name, device=dev, weights_only=True, **kwargs)
        tokenizer = open_clip.get_tokenizer(name)
    except (OSError, RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"models.clip: cannot load {ref!r} ({first})") from None
    model.eval().requires_grad_(False)
    return model, preprocess, tokenizer
