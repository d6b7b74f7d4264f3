"""GPU smoke test: a few training steps and one edit with the configured model, memory next to the computed need.

For the first GPU run of the paper configuration, before ``dvc repro``: loads ``models.kontext`` as the stages
do, encodes the training records (``data/pseudo_gt/train/manifest.jsonl``: the composite stage's output),
trains ``--steps`` steps with the paper's loop (LoRA-MoE, attention losses, the configured precision and
gradient checkpointing; ``regionroute.train.train``), then edits one training image with the trained
experts. Prints one JSON line per phase: its time, ``torch.cuda.max_memory_allocated()`` in that phase
next to ``regionroute check``'s computed figure for it (``computed_bytes``: tensors at the phase's peak,
without the runtime reserve), and the edit's images/s.

    python benchmarks/gpu_smoke.py                           # params.yaml, on its device (the GPU)
    python benchmarks/gpu_smoke.py --rehearsal /tmp/reh      # on CPU, the stand-ins of `regionroute rehearse --keep`

On CPU the figures are CPU figures (peak RSS of the process, which includes the libraries; stand-in models
after ``--rehearsal``): every line says so.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--params", type=Path, default=Path("params.yaml"))
    p.add_argument("--records", type=Path, default=Path("data/pseudo_gt/train/manifest.jsonl"))
    p.add_argument("--steps", type=int, default=3, help="training steps (default 3; the first includes set-up)")
    p.add_argument(
        "--rehearsal",
        type=Path,
        default=None,
        help="a `regionroute rehearse --keep` directory: its params, records and stand-in models",
    )
    return p


def _computed(params: Path) -> dict:
    """``regionroute check --json``'s accounting of ``params`` (computed, no GPU needed)."""
    out = subprocess.run(
        [sys.executable, "-m", "regionroute.cli", "check", "--json", "--params", str(params)],
        capture_output=True, text=True, check=False,
    ).stdout  # fmt: skip
    stages = (json.loads(out[out.index("{") :]).get("accounting") or {}).get("stages", {})
    train, infer = stages.get("train", {}), stages.get("infer", {})
    training = sum(train.get(k) or 0 for k in ("weights", "trainable", "activations"))
    detail = train.get("detail") or {}
    return {"load": detail.get("encode_weights"), "encode": detail.get("encode_phase"),
            "train_step": training or None, "edit": infer.get("tensors")}  # fmt: skip


class Meter:
    """Peak memory of the current phase: CUDA's allocator peak, or (CPU) the process's peak RSS."""

    def __init__(self, device: str) -> None:
        self.cuda = device == "cuda"

    def reset(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def peak(self) -> int:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        with open("/proc/self/status") as fh:  # VmHWM: the process's peak since start (CPU: not per phase)
            return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM:"))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.rehearsal is not None:  # before huggingface_hub is imported: it reads the cache location once
        root = args.rehearsal.resolve()
        os.environ.update(HF_HUB_CACHE=str(root / "hf" / "hub"), HF_HUB_OFFLINE="1")
        args.params, args.records = root / "repo" / "params.yaml", root / "repo" / args.records
    import torch

    from regionroute.config import load_params
    from regionroute.files import read_image, read_jsonl
    from regionroute.infer import Editor, resolve_text_length
    from regionroute.lora_moe import load_moe
    from regionroute.models import resolve_device
    from regionroute.models.kontext import load_kontext
    from regionroute.objective import encode_dataset
    from regionroute.train import train

    params = load_params(args.params)
    device = resolve_device(params.models.device).type
    note = {"device": device, "gpu": torch.cuda.get_device_name() if device == "cuda" else None}
    if device != "cuda":
        note["note"] = "CPU figures: peak RSS of the whole process (libraries included), not CUDA memory"
    computed = _computed(args.params)
    meter = Meter(device)

    def emit(phase: str, seconds: float, **extra: object) -> None:
        key = "max_memory_allocated" if meter.cuda else "peak_rss"
        line = {"phase": phase, "seconds": round(seconds, 3), key: meter.peak()}
        line["computed_bytes"] = computed.get(phase)
        print(json.dumps({**line, **extra, **note}), flush=True)

    cfg = dataclasses.replace(params.train, steps=args.steps, checkpoint_every=args.steps, log_every=1)
    meter.reset()
    start = time.perf_counter()
    pipe = load_kontext(params.models)
    emit("load", time.perf_counter() - start, model=params.models.kontext, dtype=params.models.dtype)
    meter.reset()
    start = time.perf_counter()
    cache = encode_dataset(pipe, args.records, params.data.styles, cfg,
                           object_elements=params.loss.object_weight != 1.0)  # fmt: skip
    emit("encode", time.perf_counter() - start, records=cache.n_records, latent_hw=list(cache.latent_hw))
    pipe.vae = pipe.text_encoder = pipe.text_encoder_2 = None  # as the train stage does
    if meter.cuda:
        torch.cuda.empty_cache()
    meter.reset()
    times = [time.perf_counter()]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        train(pipe, cache, params.data.styles, params.lora, params.loss, cfg, out / "model", out / "ckpt",
              base_model=params.models.kontext, on_step=lambda step: times.append(time.perf_counter()),
              instruction=params.composite.instruction)  # fmt: skip
        steps = [b - a for a, b in itertools.pairwise(times)]
        emit("train_step", statistics.median(steps[1:] or steps), step_seconds=[round(s, 3) for s in steps],
             batch=cfg.batch_size, gradient_accumulation=cfg.gradient_accumulation,
             mixed_precision=cfg.mixed_precision, gradient_checkpointing=cfg.gradient_checkpointing)  # fmt: skip
        del pipe, cache
        if meter.cuda:
            torch.cuda.empty_cache()
        pipe = load_kontext(params.models)  # a fresh base, as the infer stage loads it
        infer_cfg = resolve_text_length(params.infer, params.train.max_sequence_length)
        editor = Editor(pipe, infer_cfg, moe=load_moe(pipe.transformer, out / "model" / "moe"))
        record = read_jsonl(args.records)[0]
        image = read_image(args.records.parent / record["original"])
        meter.reset()
        start = time.perf_counter()
        editor.edit([image], [record["object"]], record["style"], [0])
        seconds = time.perf_counter() - start
        emit("edit", seconds, images_per_s=round(1 / seconds, 4), steps=infer_cfg.steps, size=list(image.shape[:2]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
