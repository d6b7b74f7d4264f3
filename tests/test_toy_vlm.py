"""The toy VLM judge: its examples' answers, loading through the score stage's path, deterministic training."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from regionroute.errors import DataError
from regionroute.metrics.vlm import ANSWER_SUFFIX, VLMJudge
from regionroute.models.vlm import load_vlm
from regionroute.seeds import stream
from regionroute.toy.filters import STYLES, apply_style
from regionroute.toy.vlm import KINDS, VLMConfig, example, make_examples, train_vlm, zoom_in
from regionroute.toy.vlm_eval import split_examples, vlm_report

TINY = VLMConfig(vision_depth=1, vision_width=32, text_width=32, text_layers=1, heads=2, steps=2, batch_size=3,
                 eval_images=4, warmup_steps=1)  # fmt: skip


@pytest.fixture(scope="module")
def scene() -> tuple[np.ndarray, np.ndarray, list[str]]:
    """A hand-made 64 px scene: a textured background, a cat (rows 10-29) and a dog (rows 40-55)."""
    yy, xx = np.mgrid[0:64, 0:64]
    image = np.stack([(xx * 4) % 256, (yy * 4) % 256, ((xx + yy) * 2) % 256], -1).astype(np.uint8)
    masks = np.zeros((2, 64, 64), dtype=bool)
    masks[0, 10:30, 8:30] = True
    masks[1, 40:56, 36:60] = True
    image[masks[0]] = (200, 40, 40)
    image[masks[1]] = (40, 80, 215)
    return image, masks, ["cat", "dog"]


@pytest.mark.parametrize(
    ("kind", "q1", "q2", "dog"),
    [("object", True, False, False), ("background", False, True, True), ("whole", True, True, True),
     ("unstyled", False, False, False)],
)  # fmt: skip
def test_answers_follow_the_styled_region(scene, kind: str, q1: bool, q2: bool, dog: bool) -> None:
    image, masks, names = scene
    ex = example(image, masks, names, 0, kind, "pixel-art", "line-art", others=True, absent=["kite"])
    assert ex.questions == (
        "Is the cat in pixel-art style?" + ANSWER_SUFFIX,
        "Is the background in pixel-art style?" + ANSWER_SUFFIX,
        "Is the cat in line-art style?" + ANSWER_SUFFIX,
        "Is the background in line-art style?" + ANSWER_SUFFIX,
        "Is the dog in pixel-art style?" + ANSWER_SUFFIX,
        "Is the kite in pixel-art style?" + ANSWER_SUFFIX,
    )
    assert ex.answers == (q1, q2, False, False, dog, False)
    filtered = apply_style(torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255, "pixel-art")
    filtered = (filtered[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    for part, styled in ((masks[0], q1), (~masks[0] & ~masks[1], q2)):
        expected = filtered if styled else image
        assert np.array_equal(ex.image[part], expected[part])  # the pixels the answers speak of


def test_negative_style_is_never_the_applied_one(scene) -> None:
    image, masks, names = scene
    with pytest.raises(ValueError, match="negative"):
        example(image, masks, names, 0, "object", "cyberpunk", "cyberpunk")
    with pytest.raises(ValueError, match="absent"):
        example(image, masks, names, 0, "object", "cyberpunk", "line-art", absent=["dog"])
    examples = make_examples(stream("vlm/eval", 0), 40, 64, others=True)
    assert {e.kind for e in examples} == set(KINDS)
    for e in examples:
        style, negative = (q.split(" in ")[-1].split(" style?")[0] for q in (e.questions[0], e.questions[2]))
        assert style in STYLES and negative in STYLES and style != negative
        assert e.questions[1] == e.questions[0].replace(e.questions[0].split(" in ")[0], "Is the background")
        assert not e.answers[2] and not e.answers[3]


def test_split_examples_read_the_coco_ground_truth(tmp_path: Path) -> None:
    from regionroute.toy.dataset import ScenesConfig, write_toy_dataset

    write_toy_dataset(tmp_path, ScenesConfig(train=1, val=3, test=1))
    examples = split_examples(tmp_path, "val")
    by_kind = {k: [e for e in examples if e.kind == k] for k in KINDS}
    assert len(by_kind["object"]) == len(by_kind["whole"]) == len(STYLES) * len(by_kind["unstyled"]) > 0
    assert all(e.answers == (True, False, False, False) for e in by_kind["object"])
    assert all(e.answers == (False, False, False, False) for e in by_kind["unstyled"])
    with pytest.raises(DataError, match=r"instances_holdout\.json: no such file"):
        split_examples(tmp_path, "holdout")


def test_training_is_deterministic_and_loads_as_the_score_stage_loads(tmp_path: Path, scene) -> None:
    train_vlm(replace(TINY, workers=0), tmp_path / "a")  # batches made in this process
    train_vlm(replace(TINY, workers=1), tmp_path / "b")  # ... and in a worker process
    weights = sorted(p.name for p in (tmp_path / "a").glob("*.safetensors"))
    assert weights and all((tmp_path / "a" / w).read_bytes() == (tmp_path / "b" / w).read_bytes() for w in weights)
    model, processor = load_vlm(str(tmp_path / "a"), "cpu", "float32")
    assert model.config.vision_config.patch_size == processor.image_processor.patch_size == TINY.patch_size
    judge = VLMJudge(str(tmp_path / "a"), device="cpu", dtype="float32")
    image = scene[0]
    result = judge.score([image, image[:, ::-1].copy()], ["cat", "dog"], ["pixel-art"] * 2, ["0", "1"], STYLES)
    assert result.probs.shape == (2, 4) and np.isfinite(result.probs).all()
    assert ((result.probs >= 0) & (result.probs <= 1)).all()


def _counting_forward(monkeypatch, fail_at: int = 0) -> list[int]:
    """Count the training forward passes (``next_token_logits``); raise in call ``fail_at`` (1-based)."""
    import regionroute.metrics.vlm as judge_module

    forward, calls = judge_module.next_token_logits, []

    def counted(*args, **kwargs):
        calls.append(1)
        if len(calls) == fail_at:
            raise RuntimeError("killed")
        return forward(*args, **kwargs)

    monkeypatch.setattr(judge_module, "next_token_logits", counted)
    return calls


@pytest.mark.parametrize("workers", [0, 1])
def test_an_interrupted_training_resumes_to_the_bytes_of_an_uninterrupted_one(
    tmp_path: Path, monkeypatch, workers: int
) -> None:
    cfg = replace(TINY, steps=5, checkpoint_every=2, workers=workers, save_dtype="float32")
    whole = train_vlm(cfg, tmp_path / "whole")
    ckpt = tmp_path / "ckpt"
    with monkeypatch.context() as m:
        _counting_forward(m, fail_at=4)
        with pytest.raises(RuntimeError, match="killed"):
            train_vlm(cfg, tmp_path / "resumed", ckpt, code="c1")
    assert [p.name for p in ckpt.glob("step-*")] == ["step-0000002"] and not (tmp_path / "resumed").exists()
    calls = _counting_forward(monkeypatch)
    resumed = train_vlm(cfg, tmp_path / "resumed", ckpt, code="c1")
    assert len(calls) == 3  # steps 3-5 only
    weights = (tmp_path / "whole" / "model.safetensors").read_bytes()  # float32: every bit of every weight
    assert (tmp_path / "resumed" / "model.safetensors").read_bytes() == weights
    assert resumed["final_loss"] == whole["final_loss"]  # the losses of steps 1-2 came from the checkpoint
    assert [p.name for p in ckpt.glob("step-*")] == ["step-0000004"]  # the last one before the end


def test_checkpoints_of_other_code_or_params_are_not_resumed(tmp_path: Path, monkeypatch, capsys) -> None:
    cfg, ckpt = replace(TINY, steps=2, checkpoint_every=1, workers=0), tmp_path / "ckpt"
    train_vlm(cfg, tmp_path / "a", ckpt, code="c1")
    assert (ckpt / "step-0000001").is_dir()  # a run of the same code and params would do 1 step
    calls = _counting_forward(monkeypatch)
    train_vlm(cfg, tmp_path / "b", ckpt, code="c2")
    assert len(calls) == 2 and "(changed: code); starting from scratch" in capsys.readouterr().err
    calls.clear()
    train_vlm(replace(cfg, learning_rate=cfg.learning_rate / 2), tmp_path / "c", ckpt, code="c2")
    assert len(calls) == 2 and "(changed: vlm); starting from scratch" in capsys.readouterr().err
    calls.clear()
    with pytest.raises(ValueError, match="code key"):
        train_vlm(cfg, tmp_path / "d", ckpt)


def test_toy_reference_resolves_to_the_committed_directory(monkeypatch, tmp_path: Path) -> None:
    from regionroute import models
    from regionroute.errors import UserError

    monkeypatch.setattr(models, "REPO_ROOT", tmp_path)
    with pytest.raises(UserError, match="toy/models/vlm does not exist"):
        load_vlm("toy", "cpu", "float32")


def test_zoom_in_magnifies_around_the_target(scene) -> None:
    image, masks, _ = scene
    for seed in range(5):
        out, zoomed, kept = zoom_in(np.random.default_rng(seed), image, masks, 1, 3.0)
        assert out.shape == image.shape and out.dtype == np.uint8 and zoomed.shape[1:] == masks.shape[1:]
        assert 1 in kept and zoomed[kept.index(1)].sum() >= masks[1].sum()  # the dog, now larger
    out, zoomed, kept = zoom_in(np.random.default_rng(0), image, masks, 0, 1.0)  # no magnification: the image
    assert np.array_equal(out, image) and np.array_equal(zoomed, masks) and kept == [0, 1]


def test_the_toy_report_tables_the_accuracy_per_question_and_kind() -> None:
    def table(q1: float) -> dict:
        acc = {"q1": q1, "q2": 1.0, "q3": 0.98, "q4": 1.0, "overall": 0.9, "n": 40}
        return {**acc, "by_kind": {k: {**acc, "n": 10} for k in KINDS}}

    result = {"split": "test", "accuracy": {"generated": table(0.95), "test": table(0.95)}, "parameters": 1.2e6}
    result["steps"] = 10
    text = vlm_report(result)
    assert "| **test split** | **0.950** | **1.000** | **0.980** | **1.000** | 40 |" in text
    assert all(f"| test split: {k} |" in text for k in KINDS) and "every question meets it" in text
    result["accuracy"]["test"] = table(0.85)
    assert "The aim is 0.9 for every question on the test split; below it: Q1." in vlm_report(result)


def test_training_asks_every_judge_question_and_balances_the_object_rows() -> None:
    from regionroute.toy.vlm import _balanced

    examples = make_examples(stream("vlm/eval", 1), 48, 64, others=True, weights=(0.3, 0.4, 0.15, 0.15))
    chosen = _balanced(np.random.default_rng(0), examples)
    negatives = []
    for e, rows in zip(examples, chosen, strict=True):
        assert rows[:2] == [(e.questions[0], e.answers[0]), (e.questions[1], e.answers[1])]
        assert rows[2] in ((e.questions[2], False), (e.questions[3], False))
        negatives.append(rows[2][0] == e.questions[2])
        assert set(rows) <= set(zip(e.questions, e.answers, strict=True))
    assert 0 < sum(negatives) < len(examples)  # Q3 and Q4 both asked
    extra = [a for rows in chosen for _, a in rows[3:]]
    assert extra and sum(extra) == len(extra) - sum(extra)  # as many yes as no rows about other objects


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [("kind_weights", (0.5, 0.5), "must be 4 probabilities"), ("kind_weights", (0.5, 0.5, 0.5, -0.5), "probabilities"),
     ("patch_size", 0, ">= 1"), ("size", 60, "multiple of patch_size x merge_size"), ("zoom", 0.5, ">= 1"),
     ("warmup_steps", -1, ">= 0"), ("text_width", 90, "multiple of 4 x heads")],
)  # fmt: skip
def test_bad_settings_are_one_clear_error(key: str, value, message: str) -> None:
    from regionroute.errors import UserError

    with pytest.raises(UserError, match=rf"vlm\.{key}: .*{message}"):
        VLMConfig(**{key: value})


def test_a_bad_split_is_one_data_error(tmp_path: Path) -> None:
    from regionroute.files import read_json, write_json
    from regionroute.toy.dataset import ScenesConfig, write_toy_dataset

    write_toy_dataset(tmp_path, ScenesConfig(train=1, val=1, test=1))
    path = tmp_path / "annotations" / "instances_val.json"
    data = read_json(path)
    write_json(path, {**data, "images": [{**data["images"][0], "width": 32}]})  # the PNG is 64 px wide
    with pytest.raises(DataError, match=r"val/.*\.png: 64x64 px, annotated 32x64"):
        split_examples(tmp_path, "val")
    path.write_text("{")
    with pytest.raises(DataError, match=r"instances_val\.json"):
        split_examples(tmp_path, "val")
