"""Training checkpoints and their dvclive logs: written atomically, resumed exactly.

Used by the ``train`` stage (:mod:`regionroute.train`). A checkpoint directory
``<ckpt>/step-<n>/`` holds the LoRA-MoE (``moe/``, safetensors), the optimizer state
(``optimizer.pt``, loaded with ``weights_only``) and ``state.json``: the step and the
loop's running state that the logs depend on (the partial sums of the current logging
window, the run's counters), so that a resumed run logs exactly what the uninterrupted
run logs. The whole ``<ckpt>`` directory is keyed on content
(:func:`regionroute.files.prepare_resumable_dir`): a checkpoint is only resumed by a run of
the same data, model, code and params.

The dvclive logs live beside the checkpoints (``<ckpt>/dvclive``); on resume, rows
logged after the resumed step (by the interrupted run, past its last checkpoint) are
dropped before dvclive appends, so no step appears twice.
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
