"""VLM judge: P(yes) from Qwen2.5-VL's next-token logits (docs/method.md section 7, VLM).

Used by the ``score`` stage. Per edited image, with a negative style drawn (seeded by
the sample id) from the *other* styles, four questions, each followed by
:data:`ANSWER_SUFFIX`:

* Q1 "Is the {object} in {style} style?"       (want high)
* Q2 "Is the background in {style} style?"     (want low)
* Q3 = Q1 with the negative style              (want low)
* Q4 = Q2 with the negative style              (want low)

Score = P(yes) = softmax over the (yes, no) next-token logits after the assistant
prompt: no sampling, no ``generate``, no text parsing. The yes/no token ids are looked
up in the tokenizer at run time as the first token of each spelling in
:data:`YES_WORDS` / :data:`NO_WORDS`; the spellings of one answer are pooled with
logsumexp, i.e. P(yes) = P(any yes) / (P(any yes) + P(any no)).

Efficiency: each image goes through the vision tower once; its features are reused by
its four prompts (``mm_encoder_outputs``), and all prompts of a chunk of images run as
one left-padded batch (attention mask + 3D M-RoPE positions computed from it), reading
logits only at the last position. Left padding keeps that position the next-token one,
so a prompt scores the same alone or in a batch.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from PIL import Image

from regionroute.errors import DataError, UserError

if TYPE_CHECKING:
    from transformers import Qwen2_5_VLForConditionalGeneration

__all__ = [
    "ANSWER_SUFFIX",
    "NO_WORDS",
    "QUESTION_COLUMNS",
    "YES_WORDS",
    "JudgeResult",
    "VLMJudge",
    "answer_token_ids",
    "chat_prompt",
    "judge_questions",
    "negative_style",
    "next_token_logits",
]

OBJECT_QUESTION = "Is the {object} in {style} style?"
BACKGROUND_QUESTION = "Is the background in {style} style?"
ANSWER_SUFFIX = " Answer only yes or no."
YES_WORDS: tuple[str, ...] = ("yes", "Yes")
NO_WORDS: tuple[str, ...] = ("no", "No")
QUESTION_COLUMNS: tuple[str, ...] = ("q1", "q2", "q3", "q4")


def negative_style(sample_id: str, style: str, styles: Sequence[str], seed: int = 0) -> str:
    """A style other than ``style`` from ``styles``, drawn deterministically from ``(seed, sample_id)``."""
    others = sorted(set(styles) - {style})
    if not others:
        raise UserError(f"VLM judge: no negative style for {style!r}: the style list {list(styles)} has no other")
    digest = hashlib.sha256(f"{seed}:{sample_id}".encode()).digest()  # stable across processes
    return random.Random(int.from_bytes(digest[:8], "big")).choice(others)


def judge_questions(object_name: str, style: str, negative: str) -> list[str]:
    """The four questions (Q1..Q4) for one image, answer suffix included."""
    return [
        OBJECT_QUESTION.format(object=object_name, style=style) + ANSWER_SUFFIX,
        BACKGROUND_QUESTION.format(style=style) + ANSWER_SUFFIX,
        OBJECT_QUESTION.format(object=object_name, style=negative) + ANSWER_SUFFIX,
        BACKGROUND_QUESTION.format(style=negative) + ANSWER_SUFFIX,
    ]


def answer_token_ids(tokenizer, words: Sequence[str]) -> list[int]:
    """Unique ids of the first token of each spelling in ``words`` (looked up, never hardcoded)."""
    ids: list[int] = []
    for word in words:
        encoded = tokenizer.encode(word, add_special_tokens=False)
        if not encoded:
            raise UserError(f"VLM judge: the tokenizer encodes {word!r} to nothing")
        if encoded[0] not in ids:
            ids.append(int(encoded[0]))
    return ids


@dataclass(frozen=True)
class JudgeResult:
    """``probs``: (B, 4) P(yes) for Q1..Q4; ``negatives``: the negative style of each image."""

    probs: np.ndarray
    negatives: list[str]

    def to_frame(self, ids: Sequence[str] | None = None) -> pd.DataFrame:
        """Columns ``id`` (when given), ``q1``..``q4``, ``negative_style``."""
        frame = pd.DataFrame(self.probs, columns=list(QUESTION_COLUMNS))
        frame["negative_style"] = self.negatives
        if ids is not None:
            frame.insert(0, "id", list(ids))
        return frame


class VLMJudge:
    """Qwen2.5-VL yes/no judge; the model is loaded once, at construction.

    ``ref``: for :func:`regionroute.models.vlm.load_vlm` (``Qwen/Qwen2.5-VL-7B-Instruct``
    in the paper). ``batch_size`` counts images per forward pass (each brings its
    questions). ``seed`` drives the negative-style draw.
    """

    def __init__(
        self,
        ref: str = "tiny",
        *,
        device: str | torch.device = "auto",
        dtype: str = "bfloat16",
        batch_size: int = 4,
        seed: int = 0,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
    ) -> None:
        from regionroute.models.vlm import load_vlm

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model, self.processor = load_vlm(ref, device, dtype, min_pixels=min_pixels, max_pixels=max_pixels)
        self.device = self.model.device
        self.batch_size, self.seed = batch_size, seed
        tok = self.processor.tokenizer
        self.yes_ids, self.no_ids = answer_token_ids(tok, YES_WORDS), answer_token_ids(tok, NO_WORDS)
        if set(self.yes_ids) & set(self.no_ids):
            raise UserError(f"VLM judge: yes and no share a first token ({self.yes_ids} vs {self.no_ids})")

    def prompt(self, question: str) -> str:
        """Chat-formatted text for one image + ``question``, ending with the assistant turn."""
        return chat_prompt(self.processor, question)

    def score(
        self,
        images: Sequence[np.ndarray],
        objects: Sequence[str],
        styles: Sequence[str],
        ids: Sequence[str],
        style_pool: Sequence[str],
    ) -> JudgeResult:
        """Q1..Q4 P(yes) for each (H, W, 3) uint8 image; negatives drawn from ``style_pool``."""
        if not (len(images) == len(objects) == len(styles) == len(ids)):
            raise DataError("VLMJudge.score: images, objects, styles and ids differ in length")
        negatives = [negative_style(i, s, style_pool, self.seed) for i, s in zip(ids, styles, strict=True)]
        questions = [judge_questions(o, s, neg) for o, s, neg in zip(objects, styles, negatives, strict=True)]  # B x 4
        return JudgeResult(self.yes_probabilities(images, questions), negatives)

    def yes_probabilities(self, images: Sequence[np.ndarray], questions: Sequence[Sequence[str]]) -> np.ndarray:
        """P(yes) for every (image, question) pair: (B, Q); each image has the same number Q of questions."""
        if len(images) != len(questions):
            raise DataError("VLMJudge: one list of questions per image is needed")
        if not images:
            return np.zeros((0, 0))
        n_q = len(questions[0])
        if n_q == 0 or any(len(q) != n_q for q in questions):
            raise DataError("VLMJudge: every image needs the same (non-zero) number of questions")
        out = np.empty((len(images), n_q))
        for start in range(0, len(images), self.batch_size):
            stop = start + self.batch_size
            out[start:stop] = self._score_chunk(images[start:stop], questions[start:stop]).reshape(-1, n_q)
        return out

    @torch.no_grad()
    def _score_chunk(self, images: Sequence[np.ndarray], questions: Sequence[Sequence[str]]) -> np.ndarray:
        logits = next_token_logits(self.model, self.processor, images, questions).float()  # (b*Q, V)
        yes = torch.logsumexp(logits[:, self.yes_ids], dim=-1)  # (b*Q,)
        no = torch.logsumexp(logits[:, self.no_ids], dim=-1)
        return torch.softmax(torch.stack([yes, no], dim=-1), dim=-1)[:, 0].cpu().numpy()


def chat_prompt(processor, question: str) -> str:
    """Chat-formatted text for one image + ``question``, ending with the assistant turn."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def next_token_logits(
    model: Qwen2_5_VLForConditionalGeneration,
    processor,
    images: Sequence[np.ndarray],
    questions: Sequence[Sequence[str]],
) -> torch.Tensor:
    """Next-token logits (R, V) after the assistant prompt of every (image, question) row, in order.

    Each image passes the vision tower once; its questions reuse its features. Gradients
    flow when called outside ``no_grad`` (the toy judge trains through this function).
    """
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    device, image_token = model.device, processor.image_token
    pil = [Image.fromarray(_check_image(im)) for im in images]
    vision = processor.image_processor(images=pil, return_tensors="pt")
    grid = vision["image_grid_thw"].to(device)  # (b, 3): t, h, w patches per image
    pixels = vision["pixel_values"].to(device, model.dtype)  # (sum t*h*w, C*T*P*P)
    feats = model.get_image_features(pixels, grid, return_dict=True).pooler_output  # b x (n_i, D)
    merge = processor.image_processor.merge_size**2
    texts, prompt_feats, prompt_grid = [], [], []
    for i, qs in enumerate(questions):
        n_tokens = int(grid[i].prod()) // merge  # visual tokens of image i (== feats[i].shape[0])
        for q in qs:
            texts.append(chat_prompt(processor, q).replace(image_token, image_token * n_tokens, 1))
            prompt_feats.append(feats[i])
            prompt_grid.append(grid[i])
    tok = processor.tokenizer
    side, tok.padding_side = tok.padding_side, "left"  # last column = next-token position for every row
    try:
        enc = tok(texts, padding=True, return_tensors="pt").to(device)  # (R, L)
    finally:
        tok.padding_side = side
    return model(
        input_ids=enc["input_ids"],
        attention_mask=enc["attention_mask"],
        mm_token_type_ids=(enc["input_ids"] == model.config.image_token_id).long(),  # 1 = image token
        image_grid_thw=torch.stack(prompt_grid),  # one image per prompt row, for M-RoPE
        mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=tuple(prompt_feats))},
        logits_to_keep=1,
        use_cache=False,
    ).logits[:, -1]  # (R, V)


def _check_image(image: np.ndarray) -> np.ndarray:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise DataError(f"VLM judge: expected an (H, W, 3) uint8 image, got {image.shape} {image.dtype}")
    return image
