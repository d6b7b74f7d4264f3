"""Training checkpoints: written atomically, resumed exactly (``train`` and the toy trainers, docs/method.md §2).

``<ckpt>/step-<n>/`` holds each part of the run: a module's weights as ``<name>.safetensors``,
the state of anything else with a ``state_dict`` (optimizer, LR schedule) as ``<name>.pt``
(loaded ``weights_only``), then ``state.json`` (the step and the loop's own state, e.g. the logging
sums), written last. The directory is keyed on content (:func:`regionroute.files.prepare_resumable_dir`).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from regionroute.files import atomic_dir, read_json, write_json

__all__ = ["checkpoints", "load_checkpoint", "save_checkpoint"]


def checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (``state.json`` is written last)."""
    return sorted(p for p in Path(ckpt_dir).glob("step-*") if (p / "state.json").is_file())


def save_checkpoint(
    ckpt_dir: Path,
    step: int,
    parts: dict[str, Any],
    state: dict[str, Any],
    keep: int = 1,
    write: Callable[[Path], None] | None = None,
) -> Path:
    """Write ``step-<step>`` atomically and keep the newest ``keep`` checkpoints.

    ``parts``: name -> module (safetensors) or optimizer / LR schedule (``torch.save`` of its
    state dict); ``write(dir)`` saves anything else (the LoRA-MoE's own format); ``state`` is
    stored as JSON with the step.
    """
    from safetensors.torch import save_file

    path = Path(ckpt_dir) / f"step-{step:07d}"
    with atomic_dir(path) as tmp:
        for name, part in parts.items():
            if isinstance(part, torch.nn.Module):
                save_file({k: v.contiguous() for k, v in part.state_dict().items()}, str(tmp / f"{name}.safetensors"))
            else:
                torch.save(part.state_dict(), tmp / f"{name}.pt")
        if write is not None:
            write(tmp)
        write_json(tmp / "state.json", {**state, "step": step})
    for old in checkpoints(ckpt_dir)[:-keep]:
        shutil.rmtree(old)
    return path


def load_checkpoint(path: Path, parts: dict[str, Any]) -> dict[str, Any]:
    """Load each of ``parts`` (as :func:`save_checkpoint` wrote them) from ``path``; return its ``state.json``."""
    from safetensors.torch import load_file

    for name, part in parts.items():
        if isinstance(part, torch.nn.Module):
            part.load_state_dict(load_file(str(Path(path) / f"{name}.safetensors")))
        else:
            part.load_state_dict(torch.load(Path(path) / f"{name}.pt", weights_only=True))
    return read_json(Path(path) / "state.json")
