"""Tests of the VLM judge (docs/method.md section 7) on the tiny, in-code Qwen2.5-VL.

The tiny judge's answers are noise (random weights, scaled so P(yes) spreads over
[0, 1]); the tests check the prompts, the seeded negative style, the yes/no token
lookup, and that batching (left padding, shared vision features) changes no score:
tolerance 1e-5 in probability, float32 on CPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from regionroute.errors import UserError
from regionroute.metrics.vlm import (
    ANSWER_SUFFIX,
    QUESTION_COLUMNS,
    VLMJudge,
    answer_token_ids,
    judge_questions,
    negative_style,
)

STYLES = ["pixel-art", "cyberpunk", "expressionism", "line-art"]
TOL = 1e-5


@pytest.fixture(scope="module")
def judge() -> VLMJudge:
    return VLMJudge("tiny", device="cpu", dtype="float32", batch_size=2)


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, size=shape, dtype=np.uint8) for shape in [(64, 64, 3), (40, 96, 3), (100, 70, 3)]]


def test_tiny_processor_has_what_the_judge_needs(judge: VLMJudge) -> None:
    tok = judge.processor.tokenizer
    for word in ("yes", "no", "Yes", "No"):
        assert len(tok.encode(word, add_special_tokens=False)) == 1
    for special in ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"):
        assert len(tok.encode(special, add_special_tokens=False)) == 1
    text = judge.prompt("Is it?")
    assert "<|vision_start|><|image_pad|><|vision_end|>Is it?<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")
    assert judge.yes_ids == answer_token_ids(tok, ["yes", "Yes"]) == tok.convert_tokens_to_ids(["yes", "Yes"])
    assert not set(judge.yes_ids) & set(judge.no_ids)


def test_questions_differ_only_in_the_style_word() -> None:
    q1, q2, q3, q4 = judge_questions("teddy bear", "pixel-art", "line-art")
    assert q1 == "Is the teddy bear in pixel-art style?" + ANSWER_SUFFIX
    assert q2 == "Is the background in pixel-art style?" + ANSWER_SUFFIX
    assert ANSWER_SUFFIX == " Answer only yes or no."
    for pos, neg in ((q1, q3), (q2, q4)):
        diff = [(a, b) for a, b in zip(pos.split(), neg.split(), strict=True) if a != b]
        assert diff == [("pixel-art", "line-art")]


def test_negative_style_is_seeded_per_sample() -> None:
    draws = [negative_style(f"img{i}", "pixel-art", STYLES) for i in range(40)]
    assert "pixel-art" not in draws and set(draws) <= set(STYLES)
    assert len(set(draws)) == 3  # all other styles get drawn
    assert draws == [negative_style(f"img{i}", "pixel-art", STYLES) for i in range(40)]  # deterministic
    assert draws != [negative_style(f"img{i}", "pixel-art", STYLES, seed=1) for i in range(40)]
    assert negative_style("x", "pixel-art", STYLES) == negative_style("x", "pixel-art", list(reversed(STYLES)))
    with pytest.raises(UserError, match="no negative style"):
        negative_style("x", "pixel-art", ["pixel-art"])


def test_scores_are_probabilities(judge: VLMJudge, images: list[np.ndarray]) -> None:
    result = judge.score(images, ["cat", "tennis racket", "tv"], STYLES[:3], ["a", "b", "c"], STYLES)
    assert result.probs.shape == (3, 4)
    assert np.isfinite(result.probs).all() and (result.probs >= 0).all() and (result.probs <= 1).all()
    assert result.probs.std() > 1e-3  # not a constant: the tiny model does answer differently
    assert result.negatives == [negative_style(i, s, STYLES) for i, s in zip("abc", STYLES[:3], strict=True)]
    frame = result.to_frame(["a", "b", "c"])
    assert list(frame.columns) == ["id", *QUESTION_COLUMNS, "negative_style"]


def test_same_score_alone_or_in_a_batch(judge: VLMJudge, images: list[np.ndarray]) -> None:
    # Different image sizes and object names: the prompts differ in length, so padding happens.
    questions = [judge_questions(o, "cyberpunk", "line-art") for o in ("cat", "tennis racket", "hair drier")]
    batched = judge.yes_probabilities(images, questions)  # chunks of 2 + 1 images
    alone = np.stack([judge.yes_probabilities([im], [qs])[0] for im, qs in zip(images, questions, strict=True)])
    single = [judge.yes_probabilities([images[1]], [[q]])[0, 0] for q in questions[1]]  # one prompt per call
    np.testing.assert_allclose(batched, alone, atol=TOL)
    np.testing.assert_allclose(batched[1], single, atol=TOL)
    judge.batch_size = 3
    try:
        np.testing.assert_allclose(judge.yes_probabilities(images, questions), batched, atol=TOL)
    finally:
        judge.batch_size = 2


def test_matches_the_plain_processor_path(judge: VLMJudge, images: list[np.ndarray]) -> None:
    """Shared vision features + our image-token expansion == processor(text, images) + forward."""
    question = judge_questions("cat", "pixel-art", "line-art")[0]
    inputs = judge.processor(text=[judge.prompt(question)], images=[Image.fromarray(images[1])], return_tensors="pt")
    with torch.no_grad():
        logits = judge.model(**inputs).logits[0, -1].float()
    yes, no = torch.logsumexp(logits[judge.yes_ids], 0), torch.logsumexp(logits[judge.no_ids], 0)
    reference = torch.softmax(torch.stack([yes, no]), 0)[0].item()
    assert judge.yes_probabilities([images[1]], [[question]])[0, 0] == pytest.approx(reference, abs=TOL)
