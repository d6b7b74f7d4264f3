"""The seed scheme: no purpose renders a scene of the evaluated splits (data/toy val and test)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from regionroute.seeds import PURPOSES, item_seed, purpose_id, stream
from regionroute.toy.scenes import render_batch

ROOT = Path(__file__).resolve().parents[1]


def _hash(image: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()


@pytest.fixture(scope="module")
def evaluated() -> set[str]:
    """Hashes of every image of the committed data/toy's val and test splits."""
    files = [*(ROOT / "data" / "toy" / "val").glob("*.png"), *(ROOT / "data" / "toy" / "test").glob("*.png")]
    assert len(files) >= 128 + 64
    return {_hash(np.asarray(Image.open(f).convert("RGB"))) for f in files}


def test_purposes_have_distinct_ids_and_streams():
    assert len({purpose_id(p) for p in PURPOSES}) == len(PURPOSES)
    firsts = {p: stream(p, 0).integers(2**62) for p in PURPOSES}
    assert len(set(firsts.values())) == len(PURPOSES)
    with pytest.raises(ValueError, match="unknown random purpose"):
        stream("judge", 0)
    assert item_seed("stylize", 0, 5) != item_seed("infer", 0, 5) != item_seed("infer", 1, 4)


def test_no_training_purpose_renders_an_evaluated_scene(evaluated):
    """The base, the judges and the base's report draw their scenes from their own streams (first steps checked)."""
    from regionroute.toy import judge, pretrain
    from regionroute.toy.base import BaseConfig
    from regionroute.toy.judge import JudgeConfig

    base, clip = BaseConfig(), JudgeConfig()
    drawn = []
    for step in range(3):
        drawn += render_batch(pretrain.step_rng(base, step), 32)
        drawn += render_batch(judge.step_rng(clip, step), 32)
    drawn += render_batch(stream("judge/eval", clip.seed), 64) + render_batch(stream("evaluate", 0), 64)
    drawn += render_batch(stream("scenes/train", 0), 150)  # the training split is disjoint from val and test too
    assert len(drawn) == 470
    assert not {_hash(s.image) for s in drawn} & evaluated
    # the check can fail: the test split's own stream renders exactly its images
    assert {_hash(s.image) for s in render_batch(stream("scenes/test", 0), 8)} <= evaluated


def test_the_vlm_judge_renders_no_evaluated_scene(evaluated, monkeypatch):
    """The toy VLM judge's training steps and held-out examples draw scenes of their own streams."""
    from regionroute.toy import vlm

    drawn = []

    def recorded(rng, size):
        drawn.append(render(rng, size))
        return drawn[-1]

    render = vlm.render_scene
    monkeypatch.setattr(vlm, "render_scene", recorded)
    cfg = vlm.VLMConfig()
    for step in range(3):
        vlm._Steps(cfg)[step]
    vlm.make_examples(stream("vlm/eval", cfg.seed), 64, cfg.size)
    assert len(drawn) == 3 * cfg.batch_size + 64
    assert not {_hash(s.image) for s in drawn} & evaluated
