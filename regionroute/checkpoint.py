"""Training checkpoints: written atomically, resumed exactly (stage ``train``, docs/method.md §2).

``<ckpt>/step-<n>/`` holds the LoRA-MoE (safetensors), the optimizer state (``weights_only``) and
``state.json`` (the step and the logging window's running sums, so a resumed run logs what the
uninterrupted one logs); the directory is keyed on content (:func:`regionroute.files.prepare_resumable_dir`).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from regionroute.files import atomic_dir, read_json, write_json

__all__ = ["checkpoints", "load_state", "save_checkpoint"]


def checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (``state.json`` is written last)."""
    return sorted(p for p in Path(ckpt_dir).glob("step-*") if (p / "state.json").is_file())


def save_checkpoint(
    ckpt_dir: Path, step: int, moe: Any, optimizer: torch.optim.Optimizer, state: dict[str, Any], keep: int
) -> Path:
    """Write ``step-<step>`` atomically and keep the newest ``keep`` checkpoints."""
    from regionroute.lora_moe import save_moe

    path = Path(ckpt_dir) / f"step-{step:07d}"
    with atomic_dir(path) as tmp:
        save_moe(moe, tmp / "moe")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        write_json(tmp / "state.json", {**state, "step": step})
    for old in checkpoints(ckpt_dir)[:-keep]:
        shutil.rmtree(old)
    return path


def load_state(path: Path) -> dict[str, Any]:
    """The ``state.json`` of a checkpoint."""
    return read_json(Path(path) / "state.json")
