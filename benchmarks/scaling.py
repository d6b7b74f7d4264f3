"""Data-parallel scaling of the ``infer`` stage: items per second with 1 and N processes, side by side.

Runs the real stage (``python -m stages.infer``) on a synthetic eval set, in three modes:

* ``python``: plain ``python``, one process (no accelerate config: the default ``dvc repro``);
* ``accelerate-1``: the same under ``accelerate launch`` with a 1-process config (the
  launcher's start-up cost alone);
* ``accelerate-N``: ``accelerate launch`` with N processes (``--processes``): on CPU N
  gloo processes (threads per process = cores / N, so the total equals the cores), on a
  GPU node N GPUs.

Each run is timed twice on the same output directory: the first run edits every pair
(``total_s``), the second finds every pair done (content keys) and only starts, loads the
model, plans and writes the manifest (``startup_s``). ``items_per_s`` = pairs /
(total - startup) is the throughput of the work itself; ``items_per_s_end_to_end`` =
pairs / total what a stage run gives. The modes are interleaved over ``--repeats`` rounds;
medians. Prints one JSON line per mode and a summary line with the ratios.

    python benchmarks/scaling.py                                  # CPU, tiny model, 1 vs 2 processes
    python benchmarks/scaling.py --processes 8 --model black-forest-labs/FLUX.1-Kontext-dev \\
        --dtype bfloat16 --size 1024 --steps 28 --pairs 64 --device cuda   # a GPU node: 1 vs 8 GPUs
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STYLES = ["pixel-art", "line-art"]


def _config(path: Path, processes: int) -> Path:
    kind = "MULTI_GPU" if processes > 1 else "NO"  # MULTI_GPU = torchrun; without GPUs our group uses gloo
    path.write_text(
        "compute_environment: LOCAL_MACHINE\n"
        f"distributed_type: {kind}\nnum_processes: {processes}\nnum_machines: 1\nmachine_rank: 0\n"
        "gpu_ids: all\nmixed_precision: 'no'\nmain_process_port: 0\n"
    )
    return path


def _eval_set(root: Path, pairs: int, size: int) -> Path:
    import numpy as np

    from regionroute.files import write_image, write_jsonl, write_mask

    rng = np.random.default_rng(0)
    rows = []
    for i in range((pairs + len(STYLES) - 1) // len(STYLES)):
        original = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
        mask = np.zeros((size, size), bool)
        mask[size // 4 : size // 2, size // 4 : 3 * size // 4] = True
        write_image(root / f"o{i}.png", original)
        write_mask(root / f"m{i}.png", mask)
        for style in STYLES:
            if len(rows) < pairs:
                rows.append({"id": f"{i:04d}_{style}", "sample_id": f"{i:04d}", "image_id": i, "style": style,
                             "object": "dog", "original": f"o{i}.png", "mask": f"m{i}.png",
                             "pseudo_gt": f"o{i}.png", "area": 1000.0, "area_frac": 0.125})  # fmt: skip
    write_jsonl(root / "manifest.jsonl", rows)
    return root / "manifest.jsonl"


def _params(path: Path, args: argparse.Namespace) -> Path:
    import yaml

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["models"].update(kontext=args.model, dtype=args.dtype, device=args.device)
    raw["data"]["styles"] = STYLES
    raw["infer"].update(steps=args.steps, attention_steps=[args.steps], batch_size=args.batch_size, figures=False)
    path.write_text(yaml.safe_dump(raw))
    return path


def _stage(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Wall seconds and CPU seconds (user + sys of the stage and its workers) of one stage run."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "stages.infer", *argv], cwd=ROOT, env=env, capture_output=True,
                          text=True, check=False)  # fmt: skip
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"infer failed ({' '.join(argv)}):\n{proc.stderr[-3000:]}")
    return elapsed, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--processes", type=int, default=2, help="N of the accelerate-N mode")
    p.add_argument("--pairs", type=int, default=48)
    p.add_argument("--size", type=int, default=256, help="image side in pixels (multiple of 16)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--model", default="tiny")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="CPU threads to share (CPU runs)")
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="rr-scaling-"))
    try:
        records = _eval_set(work / "eval", args.pairs, args.size)
        params = _params(work / "params.yaml", args)
        argv = ["--params", str(params), "--method", "base", "--records", str(records)]
        modes = {
            "python": (1, None),
            "accelerate-1": (1, _config(work / "acc1.yaml", 1)),
            f"accelerate-{args.processes}": (args.processes, _config(work / "accN.yaml", args.processes)),
        }
        base = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
        for var in ("LOCAL_RANK", "WORLD_SIZE", "RANK", "REGIONROUTE_LAUNCHED"):
            base.pop(var, None)
        if args.device == "cpu":
            base["CUDA_VISIBLE_DEVICES"] = ""
        _stage([*argv, "--out", str(work / "warmup")], dict(base, REGIONROUTE_ACCELERATE_CONFIG="none"))  # builds
        times: dict[str, dict[str, list[float]]] = {m: {"total": [], "startup": [], "cpu": []} for m in modes}
        for r in range(args.repeats):
            for mode, (n, config) in modes.items():
                env = dict(base, REGIONROUTE_ACCELERATE_CONFIG=str(config) if config else "none")
                env["OMP_NUM_THREADS"] = str(max(1, args.cores // n))
                out = work / f"out-{mode}-{r}"
                total, cpu = _stage([*argv, "--out", str(out)], env)
                startup, _ = _stage([*argv, "--out", str(out)], env)  # every pair kept: start-up, load, plan
                times[mode]["total"].append(total)
                times[mode]["cpu"].append(cpu)
                times[mode]["startup"].append(startup)
                shutil.rmtree(out)
        rows = {}
        for mode, (n, _) in modes.items():
            total, startup = statistics.median(times[mode]["total"]), statistics.median(times[mode]["startup"])
            rows[mode] = {
                "benchmark": "scaling", "stage": "infer", "mode": mode, "processes": n,
                "threads_per_process": max(1, args.cores // n) if args.device == "cpu" else None,
                "device": args.device, "model": args.model, "pairs": args.pairs, "size": args.size,
                "steps": args.steps, "batch_size": args.batch_size, "repeats": args.repeats,
                "total_s": round(total, 2), "startup_s": round(startup, 2), "work_s": round(total - startup, 2),
                "items_per_s": round(args.pairs / max(total - startup, 1e-9), 3),
                "items_per_s_end_to_end": round(args.pairs / total, 3),
                "total_s_all": [round(t, 2) for t in times[mode]["total"]],
                "startup_s_all": [round(t, 2) for t in times[mode]["startup"]],
                # CPU seconds / (wall x cores) of the edit run: how much of the machine the run got
                "cpu_share_all": [round(c / (t * args.cores), 2) for c, t in zip(times[mode]["cpu"],
                                                                                  times[mode]["total"], strict=True)],
            }  # fmt: skip
            print(json.dumps(rows[mode]), flush=True)
        one, many = rows["python"], rows[f"accelerate-{args.processes}"]
        rounds = [  # items/s ratio within each round (runs minutes apart see the same machine load)
            (t1 - s1) / max(tn - sn, 1e-9)
            for t1, s1, tn, sn in zip(times["python"]["total"], times["python"]["startup"],
                                      many["total_s_all"], many["startup_s_all"], strict=True)
        ]  # fmt: skip
        print(json.dumps({
            "benchmark": "scaling", "summary": True, "processes": args.processes,
            "speedup": round(many["items_per_s"] / one["items_per_s"], 3),
            "speedup_per_round": [round(x, 3) for x in rounds],
            "speedup_end_to_end": round(many["items_per_s_end_to_end"] / one["items_per_s_end_to_end"], 3),
            "launcher_overhead_s": round(rows["accelerate-1"]["startup_s"] - one["startup_s"], 2),
            f"startup_overhead_{args.processes}_processes_s": round(many["startup_s"] - one["startup_s"], 2),
            "loadavg": [round(x, 2) for x in os.getloadavg()],
        }))  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
