"""Stage ``train``: attention loss goes down, resume is exact, NaN stops cleanly, errors are one line."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from regionroute.config import LossConfig, ModelsConfig, TrainConfig
from regionroute.io import write_image, write_jsonl, write_mask
from regionroute.lora_moe import LoraConfig, load_moe
from regionroute.models.kontext import load_kontext
from regionroute.train import TrainingError, encode_dataset, read_model_config, train
from stages import train as train_stage
from tests.conftest import run_stage

STYLES = ("pixel-art", "cyberpunk")
CFG = TrainConfig(steps=6, learning_rate=1e-2, batch_size=2, gradient_accumulation=2, mixed_precision="no",
                  gradient_checkpointing=False, max_sequence_length=32, checkpoint_every=2, log_every=2)  # fmt: skip
LOSS = LossConfig(focus_weight=1.0, cover_weight=0.1)
LORA = LoraConfig()


def _records(root: Path, n: int = 6, size: int = 128) -> Path:
    """Hand-made records: a bright square object (mask) on noise; the pseudo-GT recolours it."""
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
    write_jsonl(root / "records.jsonl", rows)
    return root / "records.jsonl"


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    records = _records(tmp_path_factory.mktemp("records"))
    pipe = load_kontext(ModelsConfig(kontext="tiny", dtype="float32", device="cpu"))
    return records, encode_dataset(pipe, records, STYLES, CFG)


def _pipe():
    return load_kontext(ModelsConfig(kontext="tiny", dtype="float32", device="cpu"))


def test_training_lowers_attention_loss_and_trains_only_experts(encoded, tmp_path):
    _, cache = encoded
    pipe = _pipe()
    base = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    cfg = dataclasses.replace(CFG, steps=30, gradient_accumulation=1)
    summary = train(pipe, cache, STYLES, LORA, LOSS, cfg, tmp_path / "model", tmp_path / "ckpt", tmp_path / "live")
    before = summary["probe_before/focus"] + 0.1 * summary["probe_before/cover"]
    after = summary["probe_after/focus"] + 0.1 * summary["probe_after/cover"]
    assert after < before, summary
    assert all(np.isfinite(v) for v in summary.values())
    # the base weights did not move (only the experts train)
    for k, v in pipe.transformer.state_dict().items():
        if k in base:
            torch.testing.assert_close(v, base[k], rtol=0, atol=0)
    moe_state = load_moe(_pipe().transformer, tmp_path / "model" / "moe").state_dict()
    assert any(k.endswith("lora_B") and v.abs().sum() > 0 for k, v in moe_state.items())
    config = read_model_config(tmp_path / "model")
    assert config["styles"] == list(STYLES) and (tmp_path / "model" / "lora" / "pixel-art.safetensors").is_file()
    assert (tmp_path / "live" / "metrics.json").is_file()


class _Kill(Exception):
    pass


def test_killed_run_resumes_to_the_same_result(encoded, tmp_path):
    _, cache = encoded

    def kill_at_3(step: int) -> None:
        if step == 3:
            raise _Kill

    with pytest.raises(_Kill):
        train(_pipe(), cache, STYLES, LORA, LOSS, CFG, tmp_path / "m1", tmp_path / "c1", on_step=kill_at_3)
    assert not (tmp_path / "m1").exists()  # nothing that looks finished
    steps_done = []
    train(_pipe(), cache, STYLES, LORA, LOSS, CFG, tmp_path / "m1", tmp_path / "c1", on_step=steps_done.append)
    assert steps_done == [3, 4, 5, 6]  # resumed from the step-2 checkpoint, ends at train.steps
    train(_pipe(), cache, STYLES, LORA, LOSS, CFG, tmp_path / "m2", tmp_path / "c2")
    resumed = load_moe(_pipe().transformer, tmp_path / "m1" / "moe").state_dict()
    straight = load_moe(_pipe().transformer, tmp_path / "m2" / "moe").state_dict()
    for k in straight:
        torch.testing.assert_close(resumed[k], straight[k], rtol=1e-5, atol=1e-6)


def test_checkpoints_of_another_config_are_not_resumed(encoded, tmp_path):
    _, cache = encoded
    train(_pipe(), cache, STYLES, LORA, LOSS, dataclasses.replace(CFG, steps=2), tmp_path / "m", tmp_path / "c")
    steps_done = []
    other = dataclasses.replace(LOSS, focus_weight=0.0)
    train(_pipe(), cache, STYLES, LORA, other, CFG, tmp_path / "m", tmp_path / "c", on_step=steps_done.append)
    assert steps_done[0] == 1


def test_non_finite_loss_stops_and_keeps_last_checkpoint(encoded, tmp_path):
    _, cache = encoded
    poisoned = dataclasses.replace(cache, x0=cache.x0.clone())

    def poison(step: int) -> None:
        if step == 2:
            poisoned.x0[:] = float("nan")

    with pytest.raises(TrainingError, match=r"non-finite loss at step 3 .*last good checkpoint: .*step-0000002"):
        train(_pipe(), poisoned, STYLES, LORA, LOSS, CFG, tmp_path / "m", tmp_path / "c", on_step=poison)
    assert (tmp_path / "c" / "step-0000002" / "state.json").is_file() and not (tmp_path / "m").exists()


def test_stage_reports_missing_records_in_one_line(params_file, tmp_path, capsys):
    argv = ["--params", str(params_file()), "--records", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "m"),
            "--checkpoints", str(tmp_path / "c")]  # fmt: skip
    code, err = run_stage(train_stage.main, argv, capsys)
    assert code == 2 and "nope.jsonl: file not found" in err.strip().splitlines()[-1]
