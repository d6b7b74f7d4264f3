"""The toy VLM judge: a small Qwen2.5-VL trained on toy scenes to answer Q1-Q4 (docs/toy.md, "The toy VLM judge").

Entry point :func:`train_vlm` (toy stage ``vlm``, resumable from its checkpoints); the score stage
loads the result (``score.vlm: toy``) through :class:`regionroute.metrics.vlm.VLMJudge`, whose prompt
and forward pass (:func:`~regionroute.metrics.vlm.next_token_logits`) training uses unchanged. Examples
(:func:`make_examples`) style the target object, the rest, the whole image or nothing through the
exact masks; the loss is cross-entropy on the answer token. Accuracy: :mod:`regionroute.toy.vlm_eval`.
"""

from __future__ import annotations

import typing
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from regionroute.config import Section
from regionroute.metrics.vlm import NO_WORDS, YES_WORDS, answer_token_ids, judge_questions
from regionroute.seeds import stream, torch_seed
from regionroute.toy.filters import STYLES, apply_style, recolour
from regionroute.toy.scenes import CATEGORIES, COLOURS, Scene, render_scene

__all__ = [
    "KINDS",
    "Example",
    "VLMConfig",
    "build_vlm",
    "example",
    "make_examples",
    "train_vlm",
]

#: Which region an example styles: the target object, everything else, the whole image, nothing.
KINDS: tuple[str, ...] = ("object", "background", "whole", "unstyled")
_INIT, _STEPS = 0, 1  # the two key roles in the "vlm/train" stream: weight init, each step's examples


@dataclass(frozen=True)
class VLMConfig(Section):
    """``toy/params.yaml: vlm:``."""

    _section: typing.ClassVar[str] = "vlm"
    size: int = 64  # scene side = the image processor's fixed input side
    patch_size: int = 4  # vision patches (a styled object's colours are told apart pixel by pixel)
    merge_size: int = 2  # merge_size x merge_size patches make one visual token of the language model
    vision_depth: int = 4
    vision_width: int = 96
    vision_window: int = 32  # pixels: the attention window of every vision block but the last
    text_width: int = 96
    text_layers: int = 4
    heads: int = 4
    steps: int = 2000
    batch_size: int = 32  # images per step (rows: :func:`_balanced`)
    kind_weights: tuple[float, float, float, float] = (0.3, 0.4, 0.15, 0.15)  # of KINDS, in training
    others: bool = True  # training also asks Q1 about the other objects and an absent category
    zoom: float = 3.0  # training scenes are close-ups around the target, up to this magnification
    learning_rate: float = 1e-3
    warmup_steps: int = 100  # linear warm-up, then cosine decay to 0
    weight_decay: float = 0.01
    checkpoint_every: int = 250  # steps between the resumable checkpoints (the newest one is kept)
    eval_images: int = 512  # generated held-out examples (stream vlm/eval) of stage vlm_accuracy
    threads: int = 2  # torch threads of the training step
    workers: int = 1  # processes making the batches meanwhile (0: in the training process)
    save_dtype: typing.Literal["float32", "bfloat16"] = "bfloat16"
    seed: int = 0

    def _validate(self) -> None:
        self._at_least(0, "workers", "warmup_steps")
        self._at_least(1, "threads", "steps", "batch_size", "eval_images", "vision_depth", "text_layers", "heads")
        self._at_least(1, "patch_size", "merge_size", "zoom", "checkpoint_every")
        weights = self.kind_weights
        if len(weights) != len(KINDS) or min(weights) < 0 or not np.isclose(sum(weights), 1.0):
            self._fail(
                "kind_weights", f"must be {len(KINDS)} probabilities (of {', '.join(KINDS)}), got {list(weights)}"
            )
        if self.size % (self.merge_size * self.patch_size):
            self._fail("size", f"must be a multiple of patch_size x merge_size, got {self.size}")
        for key in ("vision_width", "text_width"):
            if getattr(self, key) % (4 * self.heads):
                self._fail(key, f"must be a multiple of 4 x heads ({4 * self.heads}), got {getattr(self, key)}")


@dataclass(frozen=True)
class Example:
    """One styled image and its questions; the first four are Q1..Q4 of the judge."""

    image: np.ndarray  # (S, S, 3) uint8
    kind: str  # one of KINDS
    style: str  # the style applied (asked by Q1/Q2 even when ``kind`` is unstyled)
    questions: tuple[str, ...]
    answers: tuple[bool, ...]  # the true answer of each question


def build_vlm(cfg: VLMConfig, seed: int):  # -> (Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor)
    """The untrained judge (weights seeded by ``seed``) and its processor (images kept at ``size``)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from regionroute.tiny.qwen import qwen_config, qwen_processor, qwen_tokenizer

    tok = qwen_tokenizer()
    half = cfg.text_width // cfg.heads // 2  # rotary pairs per head, split over (t, h, w) as Qwen's 16/24/24
    sections = [half // 4, 3 * half // 8, half - half // 4 - 3 * half // 8]
    config = qwen_config(
        tok,
        text={
            "hidden_size": cfg.text_width,
            "intermediate_size": 3 * cfg.text_width,
            "num_hidden_layers": cfg.text_layers,
            "num_attention_heads": cfg.heads,
            "num_key_value_heads": cfg.heads,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": sections},
        },
        vision={
            "depth": cfg.vision_depth,
            "hidden_size": cfg.vision_width,
            "intermediate_size": 2 * cfg.vision_width,
            "num_heads": cfg.heads,
            "patch_size": cfg.patch_size,
            "spatial_merge_size": cfg.merge_size,
            "window_size": cfg.vision_window,  # windowed attention (local features) but in the last block
            "out_hidden_size": cfg.text_width,
            "fullatt_block_indexes": [cfg.vision_depth - 1],
        },
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config)
    return model, qwen_processor(tok, cfg.size * cfg.size, cfg.size * cfg.size, cfg.patch_size, cfg.merge_size)


def region(kind: str, target: np.ndarray) -> np.ndarray:
    """The (S, S) bool pixels an example of ``kind`` styles, given the target object's mask."""
    if kind not in KINDS:
        raise ValueError(f"unknown example kind {kind!r} (one of {', '.join(KINDS)})")
    return {"object": target, "background": ~target, "whole": np.ones_like(target), "unstyled": np.zeros_like(target)}[
        kind
    ]


def styled(image: np.ndarray, where: np.ndarray, style: str) -> np.ndarray:
    """``image`` (S, S, 3) uint8 with the ``where`` pixels replaced by the style filter's output."""
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255  # (1, 3, S, S)
    out = torch.where(torch.from_numpy(where), apply_style(x, style), x)
    return (out[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def example(image: np.ndarray, masks: np.ndarray, names: Sequence[str], target: int, kind: str, style: str,
            negative: str, others: bool = False, absent: Sequence[str] = ()) -> Example:  # fmt: skip
    """The example styling ``kind``'s region of ``image``; answers read off the styled region.

    ``masks`` (K, S, S): the instances, named ``names``. Q1/Q3 ask about instance ``target``,
    Q2/Q4 about everything else; Q3/Q4 name ``negative``, a style the image does not have.
    ``others``: also ask Q1 about each other instance whose category occurs once; ``absent``:
    and about these categories, which the image lacks (no).
    """
    if negative == style:
        raise ValueError(f"the negative style must differ from the applied one ({style!r})")
    where = region(kind, masks[target])
    obj, rest = bool(where[masks[target]].all()), bool(where[~masks[target]].all())
    questions, answers = list(judge_questions(names[target], style, negative)), [obj, rest, False, False]
    if others:
        for k, name in enumerate(names):
            if k != target and names.count(name) == 1:
                questions.append(judge_questions(name, style, negative)[0])
                answers.append(bool(where[masks[k]].all()))
    for name in absent:
        if name in names:
            raise ValueError(f"{name!r} is in the image: it is not absent")
        questions.append(judge_questions(name, style, negative)[0])
        answers.append(False)
    out = styled(image, where, style) if where.any() else image
    return Example(out, kind, style, tuple(questions), tuple(answers))


def _target(rng: np.random.Generator, scene: Scene) -> int:
    unique = [k for k, o in enumerate(scene.objects) if scene.objects.count(o) == 1]
    return int(rng.choice(unique or range(len(scene.objects))))  # a name that picks one instance when possible


def zoom_in(rng: np.random.Generator, image: np.ndarray, masks: np.ndarray, target: int, zoom: float):
    """A square crop around instance ``target``, ``1 / z`` of the side (z log-uniform in [1, zoom]), resized back.

    The crop keeps the whole object and a margin of background (so the object never fills it).

    Returns ``(image, masks, kept)``: the (S, S, 3) uint8 close-up, the masks of the instances
    still in it, and their indices (``target`` is always kept).
    """
    size = image.shape[0]
    ys, xs = np.nonzero(masks[target])
    extent = max(ys.max() - ys.min(), xs.max() - xs.min()) + 5  # the whole object and some background stay
    side = min(size, max(extent, round(size / float(np.exp(rng.uniform(0, np.log(zoom)))))))
    y0, x0 = (int(np.clip(round((c.min() + c.max()) / 2 - side / 2), 0, size - side)) for c in (ys, xs))
    crop = torch.from_numpy(image[y0 : y0 + side, x0 : x0 + side]).permute(2, 0, 1)[None].float()  # (1, 3, s, s)
    big = torch.nn.functional.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False)
    m = torch.from_numpy(masks[:, y0 : y0 + side, x0 : x0 + side])[None].float()  # (1, K, s, s)
    m = torch.nn.functional.interpolate(m, size=(size, size), mode="nearest-exact")[0].bool().numpy()  # centres
    kept = [k for k in range(len(masks)) if m[k].any() or k == target]
    out = big[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()
    return out, m[kept], kept


def make_examples(rng: np.random.Generator, n: int, size: int, others: bool = False,
                  weights: Sequence[float] | None = None, zoom: float = 1.0) -> list[Example]:  # fmt: skip
    """``n`` fresh scenes, each with a random kind (of ``weights``, default uniform), target, style, negative.

    ``zoom`` > 1: each scene is first cropped around the target (:func:`zoom_in`), so that
    objects cover more of the image.
    """
    out = []
    for _ in range(n):
        scene = render_scene(rng, size)
        kind = KINDS[int(rng.choice(len(KINDS), p=weights) if weights else rng.integers(len(KINDS)))]
        target = _target(rng, scene)
        style = STYLES[int(rng.integers(len(STYLES)))]
        negative = str(rng.choice([s for s in STYLES if s != style]))
        image, masks, names = scene.image, scene.masks, list(scene.objects)
        if kind == "unstyled" and rng.random() < 0.5:  # a recoloured object is still unstyled
            x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
            rgb = torch.tensor(list(COLOURS.values())[int(rng.integers(len(COLOURS)))]).float()[None] / 255
            x = recolour(x, torch.from_numpy(masks[target])[None], rgb)
            image = (x[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        if zoom > 1:
            image, masks, kept = zoom_in(rng, image, masks, target, zoom)
            names, target = [names[k] for k in kept], kept.index(target)
        missing = [name for _, name, _ in CATEGORIES if name not in scene.objects]
        absent = [str(rng.choice(missing))] if others and missing else []
        out.append(example(image, masks, names, target, kind, style, negative, others, absent))
    return out


def _balanced(rng: np.random.Generator, examples: Sequence[Example]) -> list[list[tuple[str, bool]]]:
    """Per example its chosen (question, answer) rows: Q1, Q2 and Q3 or Q4, then balancing rows about objects.

    Every image is asked Q1 and Q2 (over the kinds their yes and no answers are equally
    frequent) and one of Q3/Q4 at random (a style it does not have: no), so that each judge
    question is learnt from every image. Then every yes row about another object (in the style
    when its region is) and as many no rows about the other or absent objects, drawn at random:
    the rows that need the named object found in the image.
    """
    chosen: list[list[tuple[str, bool]]] = []
    extra_yes, extra_no = [], []
    for i, e in enumerate(examples):
        negative = 2 + int(rng.integers(2))
        chosen.append([(e.questions[j], e.answers[j]) for j in (0, 1, negative)])
        for q, a in zip(e.questions[4:], e.answers[4:], strict=True):
            (extra_yes if a else extra_no).append((i, q, a))
    order = rng.permutation(len(extra_no))
    for i, q, a in extra_yes + [extra_no[k] for k in order[: len(extra_yes)]]:
        chosen[i].append((q, a))
    return chosen


class _Steps(torch.utils.data.Dataset):
    """Step ``k``'s training batch, from its own stream: any worker process makes the same one."""

    def __init__(self, cfg: VLMConfig) -> None:
        self.cfg = cfg

    def __len__(self) -> int:
        return self.cfg.steps

    def __getitem__(self, step: int) -> tuple[list[np.ndarray], list[list[str]], list[bool]]:
        rng = stream("vlm/train", self.cfg.seed, _STEPS, step)
        examples = make_examples(
            rng, self.cfg.batch_size, self.cfg.size, self.cfg.others, self.cfg.kind_weights, self.cfg.zoom
        )
        rows = _balanced(rng, examples)
        answers = [a for r in rows for _, a in r]
        return [e.image for e in examples], [[q for q, _ in r] for r in rows], answers


def _as_is(batch: Any) -> Any:
    return batch  # the DataLoader would turn the images into tensors


def train_vlm(cfg: VLMConfig, out_dir: Path, ckpt_dir: Path | None = None, code: str = "") -> dict[str, Any]:
    """Train and ``save_pretrained`` the judge (model + processor) to ``out_dir``; returns the final loss.

    Training runs on ``cfg.threads`` threads while ``cfg.workers`` processes make the batches.
    ``ckpt_dir``: every ``cfg.checkpoint_every`` steps the model, optimizer, LR schedule and losses
    are saved there, keyed on the params and ``code`` (the stage's code key, required with it); a
    rerun resumes from the newest one and ends with the bytes an uninterrupted run writes (every
    step's batch comes from its own stream).
    """
    from transformers import get_cosine_schedule_with_warmup

    from regionroute.checkpoint import checkpoints, load_checkpoint, save_checkpoint
    from regionroute.files import atomic_dir, prepare_resumable_dir
    from regionroute.metrics.vlm import next_token_logits

    if ckpt_dir is not None and not code:
        raise ValueError("train_vlm: checkpoints need the stage's code key (code=...), or they resume across code")
    model, processor = build_vlm(cfg, torch_seed("vlm/train", cfg.seed, _INIT))
    tok = processor.tokenizer
    target = {True: answer_token_ids(tok, YES_WORDS[:1])[0], False: answer_token_ids(tok, NO_WORDS[:1])[0]}
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    sched = get_cosine_schedule_with_warmup(opt, cfg.warmup_steps, cfg.steps)
    parts = {"model": model, "optimizer": opt, "scheduler": sched}
    start, losses = 0, []
    if ckpt_dir is not None:
        prepare_resumable_dir(ckpt_dir, {"vlm": asdict(cfg), "code": code})
        if saved := checkpoints(ckpt_dir):
            state = load_checkpoint(saved[-1], parts)
            start, losses = int(state["step"]), list(state["losses"])
    steps = torch.utils.data.Subset(_Steps(cfg), range(start, cfg.steps))
    batches = torch.utils.data.DataLoader(steps, batch_size=None, num_workers=cfg.workers, collate_fn=_as_is)
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    model.train()
    try:
        bar = tqdm(batches, desc="toy vlm", unit="step", initial=start, total=cfg.steps)
        for done, (images, questions, answers) in enumerate(bar, start + 1):
            logits = next_token_logits(model, processor, images, questions)  # (R, V) at the answer position
            loss = torch.nn.functional.cross_entropy(logits, torch.tensor([target[a] for a in answers]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}")
            if ckpt_dir is not None and done % cfg.checkpoint_every == 0 and done < cfg.steps:
                save_checkpoint(ckpt_dir, done, parts, {"losses": losses})
    finally:
        torch.set_num_threads(threads)
    model.eval()
    with atomic_dir(out_dir) as tmp:
        model.to(getattr(torch, cfg.save_dtype)).save_pretrained(tmp)
        processor.save_pretrained(tmp)
    return {"final_loss": float(np.mean(losses[-50:])), "steps": cfg.steps}
