"""DDP training under accelerate launch: 2 CPU processes (gloo) on the tiny model, learned routing.

Checked: after every optimizer step both ranks hold bit-identical parameters, the MoLE
gate included (it is all-reduced only because DDP wraps transformer AND gate); the
2-process run with batch 1 per rank matches a 1-process run with batch 2 (the global
batch is drawn once and sliced per rank); a run whose rank 0 dies after step 3 (last
checkpoint: step 2), resumed by a new 2-process launch, ends bit-identical to the
uninterrupted 2-process run, with the same logs.

This file is also the worker: ``python -m tests.test_distributed_train <spec.json>``
under ``accelerate launch`` runs the training jobs the spec lists.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from regionroute.config import LossConfig, ModelsConfig, TrainConfig
from regionroute.files import read_json, write_image, write_json, write_jsonl, write_mask
from regionroute.lora_moe import LoraConfig

pytestmark = pytest.mark.distributed

STYLES = ("pixel-art", "cyberpunk")
RANKS = 2
#: per process: batch 1, 2 micro-batches per step (accumulated without an all-reduce until the last);
#: a learning rate that changes every step, so that a resumed run must restore the schedule's state
CFG = TrainConfig(steps=4, learning_rate=1e-2, batch_size=1, gradient_accumulation=2, mixed_precision="no",
                  gradient_checkpointing=False, max_sequence_length=32, checkpoint_every=2, log_every=1,
                  lr_scheduler="cosine", lr_warmup_steps=1)  # fmt: skip
LOSS = LossConfig(focus_weight=1.0, cover_weight=0.1)
LORA = LoraConfig(routing="learned")  # the MoLE gate lives outside the transformer: it must be synchronised too
TINY = ModelsConfig(kontext="tiny", dtype="float32", device="cpu")
DIE_AT = 3


def _records(root: Path, n: int = 6, size: int = 64) -> Path:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        original = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
        mask = np.zeros((size, size), bool)
        y, x = rng.integers(0, size // 2, 2)
        mask[y : y + size // 3, x : x + size // 3] = True
        pgt = original.copy()
        pgt[mask] = (255, 0, 255) if i % 2 else (0, 255, 255)
        style = STYLES[i % 2]
        for name, img in (("o", original), ("p", pgt)):
            write_image(root / f"{name}{i}.png", img)
        write_mask(root / f"m{i}.png", mask)
        rows.append({"id": f"{i}_{style}", "style": style, "object": "dog", "original": f"o{i}.png",
                     "pseudo_gt": f"p{i}.png", "mask": f"m{i}.png",
                     "instruction": f"make the dog into {style} style"})  # fmt: skip
    write_jsonl(root / "manifest.jsonl", rows)
    return root / "manifest.jsonl"


def _worker(spec_path: str) -> int:
    """Under accelerate launch: run the spec's jobs; rank 0 writes each job's per-step record."""
    from regionroute import distributed as dist
    from regionroute import lora_moe
    from regionroute.fingerprint import tensor_digest
    from regionroute.models.kontext import load_kontext
    from regionroute.objective import encode_dataset
    from regionroute.train import train

    spec = json.loads(Path(spec_path).read_text())
    dist.state("cpu")
    with dist.main_first():
        encoder = load_kontext(TINY)
    cache = encode_dataset(encoder, Path(spec["records"]), STYLES, CFG)
    handles = []  # the LoraMoE of each run, caught where train() wraps it for DDP

    class Spy(lora_moe.RoutedTransformer):
        def __init__(self, moe):
            super().__init__(moe)
            handles.append(moe)

    lora_moe.RoutedTransformer = Spy
    for job in spec["jobs"]:
        record = {"steps": [], "identical": [], "gate_in_state": None}

        def on_step(step: int, job=job, record=record) -> None:
            if step == job.get("die_at") and dist.is_main():
                os._exit(17)  # rank 0 dies; the launcher then stops rank 1 (blocked in the next collective)
            state = handles[-1].state_dict()
            record["gate_in_state"] = any(k.startswith("router.") for k in state)
            digests = dist.gather(tensor_digest(state))
            record["steps"].append(step)
            record["identical"].append(len(set(digests)) == 1)

        pipe = load_kontext(TINY)
        pipe.vae = pipe.text_encoder = pipe.text_encoder_2 = None
        train(pipe, cache, STYLES, LORA, LOSS, CFG, Path(job["out"]), Path(job["ckpt"]), Path(job["live"]),
              on_step=on_step)  # fmt: skip
        if dist.is_main():
            write_json(Path(job["record"]), record)
    return 0


def _launch(spec: dict, tmp: Path, name: str, check: bool = True) -> int:
    from regionroute.launch import launch_command
    from tests.test_distributed_launch import child_env, two_process_config

    path = tmp / f"{name}.json"
    path.write_text(json.dumps(spec))
    cmd = launch_command("tests.test_distributed_train", [str(path)], two_process_config(tmp))
    proc = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], env=child_env(), capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    if check:
        assert proc.returncode == 0, f"2-process training failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc.returncode


def _job(tmp: Path, name: str, **extra) -> dict:
    return {"out": str(tmp / name / "model"), "ckpt": str(tmp / name / "ckpt"), "live": str(tmp / name / "live"),
            "record": str(tmp / name / "record.json"), **extra}  # fmt: skip


def _state(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "moe" / "moe.safetensors"))


def _tsv(live: Path, name: str) -> list[tuple[int, float]]:
    rows = (live / "plots" / "metrics" / "train" / f"{name}.tsv").read_text().splitlines()[1:]
    return [(int(step), float(value)) for step, value in (r.split("\t") for r in rows)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Killed run (rank 0 dies after step 3) in one launch; its resumption + an uninterrupted run in another."""
    tmp = tmp_path_factory.mktemp("ddp")
    records = _records(tmp / "records")
    killed = _launch({"records": str(records), "jobs": [_job(tmp, "killed", die_at=DIE_AT)]}, tmp, "a", check=False)
    assert killed != 0 and not (tmp / "killed" / "model").exists()
    _launch({"records": str(records), "jobs": [_job(tmp, "killed"), _job(tmp, "straight")]}, tmp, "b")
    return tmp


def test_ranks_hold_identical_parameters_after_every_step(runs):
    for name, steps in (("straight", [1, 2, 3, 4]), ("killed", [DIE_AT, 4])):
        record = read_json(runs / name / "record.json")
        assert record["gate_in_state"], "the learned gate should be part of the compared state"
        assert record["steps"] == steps, record  # the killed run resumed from its step-2 checkpoint
        assert all(record["identical"]), f"{name}: ranks diverged at steps {record}"


def test_killed_and_resumed_two_process_run_ends_where_the_uninterrupted_one_ends(runs):
    resumed, straight = _state(runs / "killed" / "model"), _state(runs / "straight" / "model")
    assert resumed.keys() == straight.keys()
    for k in straight:
        torch.testing.assert_close(resumed[k], straight[k], rtol=0, atol=0)
    for name in ("total", "flow", "focus", "cover", "balance", "lr"):
        assert _tsv(runs / "killed" / "live", name) == _tsv(runs / "straight" / "live", name)
    assert read_json(runs / "straight" / "model" / "regionroute.json")["processes"] == RANKS


def test_two_processes_match_one_process_with_the_global_batch(runs, tmp_path):
    from regionroute.models.kontext import load_kontext
    from regionroute.objective import encode_dataset
    from regionroute.train import train

    one = dataclasses.replace(CFG, batch_size=CFG.batch_size * RANKS)
    pipe = load_kontext(TINY)
    cache = encode_dataset(pipe, runs / "records" / "manifest.jsonl", STYLES, one)
    pipe = load_kontext(TINY)
    train(pipe, cache, STYLES, LORA, LOSS, one, tmp_path / "model", tmp_path / "ckpt", tmp_path / "live")
    single, ddp = _state(tmp_path / "model"), _state(runs / "straight" / "model")
    # not a trivial match: the experts and the gate moved away from their zero init
    assert float(ddp["router.gate.weight"].abs().max()) > 0
    assert max(float(v.abs().max()) for k, v in ddp.items() if k.endswith("lora_B")) > 0
    # float noise only (batch 2 vs 2 x batch 1); Adam's normalisation lets a few near-zero gradients
    # amplify it (measured: 2 of 7234 entries above 1e-5, max 4.4e-5), hence a max and a mean bound
    for k in single:
        torch.testing.assert_close(ddp[k], single[k], rtol=1e-3, atol=1e-4, msg=lambda m, k=k: f"{k}: {m}")
    diffs = torch.cat([(ddp[k] - single[k]).abs().flatten() for k in single])
    assert float(diffs.mean()) < 2e-6, float(diffs.mean())
    # the gate's balance loss is taken on the global batch's mean gate, the attention losses on the
    # global batch's usable masks: the logged terms (means over ranks) are the 1-process ones
    for name in ("flow", "balance", "focus", "cover", "total", "n_empty"):
        ddp_log, one_log = _tsv(runs / "straight" / "live", name), _tsv(tmp_path / "live", name)
        assert [s for s, _ in ddp_log] == [s for s, _ in one_log]
        np.testing.assert_allclose([v for _, v in ddp_log], [v for _, v in one_log], rtol=1e-4, err_msg=name)


if __name__ == "__main__":
    raise SystemExit(_worker(sys.argv[1]))
