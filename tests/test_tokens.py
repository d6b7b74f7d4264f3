"""Style-word token spans (regionroute.flux.tokens) on the in-code T5-like tokenizer."""

from __future__ import annotations

import pytest
import torch

from regionroute.errors import UserError
from regionroute.flux.tokens import find_style_span, spans_to_mask, style_token_mask, style_token_spans
from regionroute.tiny.text import t5_tokenizer


@pytest.fixture(scope="module")
def tok():
    return t5_tokenizer()


def _pieces(tok, text: str, span: list[int]) -> list[str]:
    ids = tok(text)["input_ids"]
    return tok.convert_ids_to_tokens([ids[p] for p in span])


def test_multi_token_word(tok):
    text = "make the dog into pixel-art style"
    span = find_style_span(tok, text, "pixel-art", max_length=32)
    assert span == [4, 5, 6]
    assert _pieces(tok, text, span) == ["▁pixel", "-", "art"]


def test_single_token_word(tok):
    span = find_style_span(tok, "make the cat into cyberpunk style", "cyberpunk", max_length=32)
    assert span == [4]


def test_word_appearing_twice_picks_last_by_default(tok):
    text = "make the pixel-art dog into pixel-art style"
    assert find_style_span(tok, text, "pixel-art", 32) == [7, 8, 9]
    assert find_style_span(tok, text, "pixel-art", 32, occurrence="first") == [2, 3, 4]
    assert find_style_span(tok, text, "pixel-art", 32, occurrence=1) == [7, 8, 9]
    with pytest.raises(UserError, match="occurrence 2"):
        find_style_span(tok, text, "pixel-art", 32, occurrence=2)


def test_per_sample_spans_and_mask(tok):
    texts = ["make the dog into pixel-art style", "make the dining table into cyberpunk style"]
    spans = style_token_spans(tok, texts, ["pixel-art", "cyberpunk"], max_length=16)
    assert spans == [[4, 5, 6], [5]]
    mask = style_token_mask(tok, texts, ["pixel-art", "cyberpunk"], max_length=16)
    assert mask.shape == (2, 16) and mask.dtype == torch.bool
    assert mask[0].nonzero().flatten().tolist() == [4, 5, 6]
    assert mask[1].nonzero().flatten().tolist() == [5]
    # The span indexes the padded sequence the text encoder sees (right padding, no BOS).
    padded = tok(texts[1], max_length=16, padding="max_length", truncation=True)["input_ids"]
    assert tok.convert_ids_to_tokens(padded[5]) == "▁cyberpunk"


def test_word_glued_to_punctuation_uses_offsets(tok):
    # The quote glues the word to the previous piece: no leading ▁, so the ids differ.
    text = 'a "cyberpunk" dog'
    span = find_style_span(tok, text, "cyberpunk", 32)
    assert "".join(_pieces(tok, text, span)).replace("▁", "") == "cyberpunk"


def test_missing_word_raises_one_line_user_error(tok):
    with pytest.raises(UserError) as err:
        find_style_span(tok, "make the dog into watercolor style", "cyberpunk", 32)
    msg = str(err.value)
    assert "cyberpunk" in msg and "make the dog into watercolor style" in msg and "\n" not in msg
    with pytest.raises(UserError, match="2 instructions but 1"):
        style_token_spans(tok, ["a", "b"], ["x"], 8)


def test_truncated_word_raises(tok):
    text = "make the dog into pixel-art style"
    assert find_style_span(tok, text, "pixel-art", 8) == [4, 5, 6]  # 7 tokens + EOS fit
    with pytest.raises(UserError, match="beyond max_length=6"):
        find_style_span(tok, text, "pixel-art", 6)  # "art" is cut off


def test_spans_to_mask_rejects_out_of_range():
    with pytest.raises(UserError):
        spans_to_mask([[3, 9]], max_length=8)
