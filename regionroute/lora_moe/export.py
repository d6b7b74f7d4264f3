"""Save, load and export the LoRA-MoE; the trained model's ``regionroute.json`` (docs/method.md §5, "Export").

:func:`export_experts` writes each expert as a standard diffusers LoRA (``<style>.safetensors`` by
``FluxKontextPipeline.save_lora_weights``, ``alpha / r`` folded into B so every loader reads the same
scale), loadable with ``pipe.load_lora_weights(dir, weight_name="pixel-art.safetensors")``;
:func:`save_moe` / :func:`load_moe` keep the whole MoE for resuming and ``infer`` (safetensors only).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from regionroute.config import LoraConfig
from regionroute.errors import DataError, UserError
from regionroute.files import atomic_path, read_json, write_json
from regionroute.lora_moe.inject import LoraMoE, inject_lora_moe

__all__ = [
    "MODEL_CONFIG_NAME",
    "MOE_CONFIG_NAME",
    "MOE_WEIGHTS_NAME",
    "expert_adapter_metadata",
    "expert_lora_state_dict",
    "export_experts",
    "load_moe",
    "read_model_config",
    "save_moe",
    "write_model_config",
]

MOE_CONFIG_NAME = "moe.json"
MOE_WEIGHTS_NAME = "moe.safetensors"
_FORMAT = "regionroute.lora_moe"
_VERSION = 1


def expert_lora_state_dict(
    moe: LoraMoE, expert: str | int, *, fold_scale: bool = True, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """One expert as a peft LoRA state dict: ``<module>.lora_A.weight`` (r, in), ``.lora_B.weight`` (out, r).

    Module names are relative to the transformer (``transformer_blocks.0.attn.to_q``);
    ``save_lora_weights`` adds the ``transformer.`` prefix.
    """
    idx = moe.expert_index(expert)
    sd: dict[str, torch.Tensor] = {}
    for name, layer in moe.layers.items():
        a = layer.lora_A[idx].detach()  # (r, in)
        b = layer.lora_B[idx].detach()  # (out, r)
        if fold_scale:
            b = b * layer.scaling
        # clone: safetensors refuses tensors that share storage (slices of the stacked experts)
        sd[f"{name}.lora_A.weight"] = a.to(dtype or a.dtype).contiguous().clone().cpu()
        sd[f"{name}.lora_B.weight"] = b.to(dtype or b.dtype).contiguous().clone().cpu()
    return sd


def expert_adapter_metadata(moe: LoraMoE, *, fold_scale: bool = True) -> dict[str, Any]:
    """peft ``LoraConfig`` kwargs stored with each exported file (diffusers reads them on load)."""
    rank = moe.config.rank
    return {
        "r": rank,
        "lora_alpha": rank if fold_scale else moe.config.alpha,
        "target_modules": list(moe.layers),
    }


def export_experts(
    moe: LoraMoE,
    directory: str | os.PathLike[str],
    *,
    fold_scale: bool = True,
    dtype: torch.dtype | None = None,
) -> dict[str, Path]:
    """Write ``<directory>/<expert>.safetensors`` per expert (atomically); returns expert -> path."""
    from diffusers import FluxKontextPipeline

    if moe.merged is not None:
        raise UserError(f"expert {moe.merged!r} is merged into the base weights; unmerge() before exporting")
    directory = Path(directory)
    save = _one_key_saver(expert_adapter_metadata(moe, fold_scale=fold_scale))
    paths = {}
    for expert in moe.experts:
        path = directory / f"{expert}.safetensors"
        with atomic_path(path) as tmp:
            FluxKontextPipeline.save_lora_weights(
                save_directory=tmp.parent,
                transformer_lora_layers=expert_lora_state_dict(moe, expert, fold_scale=fold_scale, dtype=dtype),
                weight_name=tmp.name,
                save_function=save,
            )
        paths[expert] = path
    return paths


def _one_key_saver(metadata: dict[str, Any]) -> Callable[[dict[str, torch.Tensor], str], None]:
    """``save_lora_weights``' writer with the adapter metadata as the header's only ``__metadata__`` key.

    safetensors writes ``__metadata__`` from a Rust ``HashMap``: two keys (diffusers' own writer
    adds ``"format": "pt"``) come out in a per-process random order and identical experts in
    different bytes. diffusers' loader reads ``lora_adapter_metadata`` alone, packed as its
    writer packs it (``transformer.<key>``, sorted JSON).
    """
    from diffusers import FluxKontextPipeline
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY, _pack_dict_with_prefix
    from safetensors.torch import save_file

    packed = _pack_dict_with_prefix(metadata, FluxKontextPipeline.transformer_name)
    header = {LORA_ADAPTER_METADATA_KEY: json.dumps(packed, indent=2, sort_keys=True)}
    return lambda weights, filename: save_file(weights, filename, metadata=header)


def save_moe(moe: LoraMoE, directory: str | os.PathLike[str]) -> Path:
    """Save experts + router (``moe.safetensors``) and config (``moe.json``, written last)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    tensors = {k: v.contiguous().cpu() for k, v in moe.state_dict().items()}
    with atomic_path(directory / MOE_WEIGHTS_NAME) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    write_json(
        directory / MOE_CONFIG_NAME,
        {
            "format": _FORMAT,
            "version": _VERSION,
            "config": moe.config.to_dict(),
            "experts": list(moe.experts),
            "layers": list(moe.layers),
        },
    )
    return directory


def load_moe(transformer: torch.nn.Module, directory: str | os.PathLike[str]) -> LoraMoE:
    """Inject the MoE saved by :func:`save_moe` into ``transformer`` and load its weights."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    meta = read_json(directory / MOE_CONFIG_NAME)
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
        raise DataError(f"{directory / MOE_CONFIG_NAME}: not a saved LoRA-MoE (format {_FORMAT!r})")
    if meta.get("version") != _VERSION:
        raise DataError(f"{directory / MOE_CONFIG_NAME}: version {meta.get('version')!r}, expected {_VERSION}")
    try:
        config = LoraConfig.from_dict(meta["config"])
        experts = list(meta["experts"])
        layers = list(meta["layers"])
    except (KeyError, TypeError, UserError) as exc:
        raise DataError(f"{directory / MOE_CONFIG_NAME}: bad MoE description ({exc})") from None
    weights = directory / MOE_WEIGHTS_NAME
    if not weights.is_file():
        raise DataError(f"{weights}: file not found")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise DataError(f"{weights}: unreadable safetensors ({exc})") from None

    moe = inject_lora_moe(transformer, config, experts)
    if list(moe.layers) != layers:
        moe.remove()
        raise DataError(f"{directory}: the saved experts target other modules than this transformer offers")
    try:
        moe.load_state_dict({k: v.to(moe.device) for k, v in state.items()})
    except UserError as exc:
        moe.remove()
        raise DataError(f"{weights}: {exc}") from None
    return moe


MODEL_CONFIG_NAME = "regionroute.json"


def write_model_config(model_dir: Path, config: dict[str, Any]) -> None:
    """Write the trained model's ``regionroute.json`` (base model, styles, configs)."""
    write_json(Path(model_dir) / MODEL_CONFIG_NAME, config)


def read_model_config(model_dir: Path) -> dict[str, Any]:
    """The ``regionroute.json`` a training run wrote (base model, styles, configs)."""
    path = Path(model_dir) / MODEL_CONFIG_NAME
    if not path.is_file():
        raise UserError(f"{model_dir}: not a trained RegionRoute model (no {MODEL_CONFIG_NAME})")
    return read_json(path)
