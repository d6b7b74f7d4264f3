"""The device part of ``regionroute check``: memory and device-bound settings (docs/method.md §2, "Memory").

:func:`check_memory`: each GPU stage's need (:mod:`regionroute.check.accounting`) against the free
memory of its device (``torch.cuda.mem_get_info``, or the host's available RAM).
:func:`check_settings`: ``train.optimizer: adamw8bit`` (bitsandbytes and CUDA), fp16/bf16 precision.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch

from regionroute.check.report import Finding, gib
from regionroute.config import Params

if TYPE_CHECKING:
    from regionroute.check.accounting import Accounting

__all__ = ["GPU_STAGES", "check_memory", "check_settings", "free_bytes", "stage_device"]

#: The stages that run models on ``models.device`` / ``score.device``.
GPU_STAGES: tuple[str, ...] = ("stylize", "train", "infer", "score")

_SHRINK = {
    "stylize": "lower stylize.batch_size",
    "train": "lower train.batch_size",
    "infer": "lower infer.batch_size",
    "score": "lower score.vlm_batch_size / score.batch_size",
}


def stage_device(params: Params, stage: str) -> tuple[str, str]:
    """(params key, resolved device type) of a stage; 'missing' when CUDA is asked and absent."""
    key = "score.device" if stage == "score" else "models.device"
    asked = params.score.device if stage == "score" else params.models.device
    if asked == "auto":
        return key, "cuda" if torch.cuda.is_available() else "cpu"
    return key, asked if asked == "cpu" or torch.cuda.is_available() else "missing"


def free_bytes(device: str) -> tuple[int, str]:
    """Free memory of a device type and how to name it."""
    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        return free, f"free on {torch.cuda.get_device_name()}"
    try:
        with open("/proc/meminfo") as fh:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in fh}
        return info["MemAvailable"], "available host RAM"
    except (OSError, KeyError, ValueError, IndexError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "available host RAM"


def check_memory(params: Params, accounting: Accounting, stages: tuple[str, ...] = GPU_STAGES) -> list[Finding]:
    """Each stage's computed need against its device's free memory (CUDA: with the runtime reserve)."""
    out = []
    for stage in stages:
        mem = accounting.stages.get(stage)
        key, device = stage_device(params, stage)
        if device == "missing":
            out.append(
                Finding("error", key, "'cuda' requested but no CUDA device is available", "use auto or cpu", (stage,))
            )
            continue
        if mem is None or mem.tensors is None:
            continue
        need = mem.total if device == "cuda" else mem.tensors
        free, what = free_bytes(device)
        if need <= free:
            out.append(Finding("ok", stage, f"needs {gib(need)} on {device}, {gib(free)} {what}", stages=(stage,)))
            continue
        fix = _SHRINK[stage]
        alt = mem.detail.get("transformer_checkpointing_on")
        reserve = mem.reserve if device == "cuda" else 0
        fixed = max(mem.weights + mem.trainable, mem.detail.get("encode_weights") or 0) + reserve
        encode = mem.detail.get("encode_phase") or 0
        if fixed > free:
            fix = f"the weights alone need {gib(fixed)}: a device with more memory"
            if device == "cpu" and key == "models.device":
                fix += " (models.device: auto found no CUDA device)"
        elif encode + reserve > free and encode > mem.weights + mem.trainable + mem.activations:
            fix = f"encoding the dataset needs {gib(encode + reserve)}: all weights + the VAE on 8 images at once"
        elif stage == "train" and not params.train.gradient_checkpointing and alt is not None:
            fix = f"set train.gradient_checkpointing: true (activations {gib(alt)}), or {fix}"
        out.append(Finding("error", stage, f"needs {gib(need)} on {device} ({key}), {gib(free)} {what}", fix, (stage,)))
    return out


def check_settings(params: Params, stages: tuple[str, ...] = GPU_STAGES) -> list[Finding]:
    """Settings that need an optional package or a capable device."""
    out = []
    if "train" not in stages:
        return out
    _, device = stage_device(params, "train")
    if params.train.optimizer == "adamw8bit":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            out.append(
                Finding(
                    "error",
                    "train.optimizer",
                    "adamw8bit needs bitsandbytes, which is not installed",
                    "pip install bitsandbytes, or use adamw",
                    ("train",),
                )
            )
        if device != "cuda":
            out.append(
                Finding(
                    "error",
                    "train.optimizer",
                    f"adamw8bit needs a CUDA GPU, train runs on {device}",
                    "use adamw",
                    ("train",),
                )
            )
    if params.train.mixed_precision == "fp16" and device != "cuda":
        out.append(
            Finding(
                "error",
                "train.mixed_precision",
                f"fp16 mixed precision needs a CUDA GPU (train runs on {device})",
                "use bf16 or no",
                ("train",),
            )
        )
    wants_bf16 = params.train.mixed_precision == "bf16" or params.models.dtype == "bfloat16"
    if wants_bf16 and device == "cuda" and not torch.cuda.is_bf16_supported():
        out.append(
            Finding(
                "error",
                "train.mixed_precision",
                f"bfloat16 is not supported by {torch.cuda.get_device_name()}",
                "use fp16 / float16",
                ("train",),
            )
        )
    return out
