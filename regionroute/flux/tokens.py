"""Positions of the style word's T5 tokens in each instruction: the set ``S`` (docs/method.md §3).

:func:`style_token_mask` tokenizes as diffusers' Flux pipelines do for T5, matches the word's
own ids (or, glued to punctuation, the tokens overlapping its characters) and takes the last
occurrence; a word not found or truncated away is a one-line error. Used by ``train``,
``infer`` and ``edit``.
"""

from __future__ import annotations

from typing import Literal

import torch

from regionroute.errors import UserError

__all__ = ["Occurrence", "find_style_span", "spans_to_mask", "style_token_mask", "style_token_spans"]

Occurrence = Literal["first", "last"] | int


def _id_matches(ids: list[int], word_ids: list[int]) -> list[list[int]]:
    """All start..end runs of ``word_ids`` inside ``ids`` (token positions)."""
    n = len(word_ids)
    if n == 0:
        return []
    return [list(range(i, i + n)) for i in range(len(ids) - n + 1) if ids[i : i + n] == word_ids]


def _offset_matches(text: str, word: str, offsets: list[tuple[int, int]]) -> list[list[int]]:
    """Token runs overlapping each exact character occurrence of ``word`` in ``text``."""
    spans: list[list[int]] = []
    start = text.find(word)
    while start >= 0:
        end = start + len(word)
        # Special tokens (EOS, padding) have empty (0, 0) offsets and never overlap.
        span = [t for t, (a, b) in enumerate(offsets) if b > a and a < end and b > start]
        # The tokens must cover the whole word: a word cut by truncation is no match.
        if span and offsets[span[0]][0] <= start and offsets[span[-1]][1] >= end:
            spans.append(span)
        start = text.find(word, start + 1)
    return spans


def _pick(spans: list[list[int]], occurrence: Occurrence, instruction: str, word: str) -> list[int]:
    if occurrence == "last":
        return spans[-1]
    if occurrence == "first":
        return spans[0]
    if isinstance(occurrence, int) and not isinstance(occurrence, bool):
        if 0 <= occurrence < len(spans):
            return spans[occurrence]
        raise UserError(
            f"style word {word!r} occurs {len(spans)} time(s) in instruction {instruction!r}; "
            f"occurrence {occurrence} does not exist"
        )
    raise UserError(f"occurrence must be 'first', 'last' or an int, got {occurrence!r}")


def _tokenize(tokenizer, text: str, max_length: int | None) -> tuple[list[int], list[tuple[int, int]] | None]:
    kwargs: dict = {"add_special_tokens": True}
    if max_length is not None:
        kwargs.update(max_length=max_length, truncation=True)
    fast = bool(getattr(tokenizer, "is_fast", False))
    enc = tokenizer(text, return_offsets_mapping=fast, **kwargs)
    offsets = [tuple(o) for o in enc["offset_mapping"]] if fast else None
    return list(enc["input_ids"]), offsets


def find_style_span(
    tokenizer, instruction: str, word: str, max_length: int, occurrence: Occurrence = "last"
) -> list[int]:
    """Token positions (ascending, contiguous) of ``word`` in the tokenized ``instruction``.

    Args:
        tokenizer: a T5(-like) Hugging Face tokenizer (fast tokenizers enable the offset fallback).
        instruction: the full instruction, e.g. ``"make the dog into pixel-art style"``.
        word: the style word, e.g. ``"pixel-art"``.
        max_length: the T5 ``max_sequence_length`` the text encoder is run with.
        occurrence: ``"last"`` (default), ``"first"`` or a 0-based occurrence index.
    """
    if not word or not word.strip():
        raise UserError(f"empty style word for instruction {instruction!r}")
    word_ids = list(tokenizer(word, add_special_tokens=False)["input_ids"])
    ids, offsets = _tokenize(tokenizer, instruction, max_length)
    spans = _id_matches(ids, word_ids)
    if not spans and offsets is not None:
        spans = _offset_matches(instruction, word, offsets)
    if spans:
        return _pick(spans, occurrence, instruction, word)
    full_ids, full_offsets = _tokenize(tokenizer, instruction, None)
    if _id_matches(full_ids, word_ids) or (full_offsets and _offset_matches(instruction, word, full_offsets)):
        raise UserError(
            f"style word {word!r} in instruction {instruction!r} lies beyond max_length={max_length} T5 tokens"
        )
    raise UserError(f"style word {word!r} not found in the T5 tokens of instruction {instruction!r}")


def style_token_spans(
    tokenizer, instructions: list[str], words: list[str], max_length: int, occurrence: Occurrence = "last"
) -> list[list[int]]:
    """One :func:`find_style_span` per (instruction, word) pair; spans differ per sample."""
    if len(instructions) != len(words):
        raise UserError(f"{len(instructions)} instructions but {len(words)} style words")
    return [find_style_span(tokenizer, t, w, max_length, occurrence) for t, w in zip(instructions, words, strict=True)]


def spans_to_mask(spans: list[list[int]], max_length: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Boolean mask ``(B, L)`` with ``True`` at each sample's span positions."""
    mask = torch.zeros(len(spans), max_length, dtype=torch.bool, device=device)  # (B, L)
    for b, span in enumerate(spans):
        if any(p < 0 or p >= max_length for p in span):
            raise UserError(f"span {span} of sample {b} lies outside the {max_length} text positions")
        mask[b, span] = True
    return mask


def style_token_mask(
    tokenizer,
    instructions: list[str],
    words: list[str],
    max_length: int,
    occurrence: Occurrence = "last",
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Per-sample style-token mask ``(B, L)`` over the T5 text positions (``L = max_length``).

    This is the ``style_mask`` that :meth:`regionroute.flux.attention.StyleAttentionRecorder.capture` takes.
    """
    return spans_to_mask(style_token_spans(tokenizer, instructions, words, max_length, occurrence), max_length, device)
