"""The toy VLM judge's accuracy per question and kind of example (docs/toy.md, "The toy VLM judge").

The toy pipeline's ``vlm_accuracy`` stage: :func:`vlm_accuracy` scores the saved judge on
generated scenes (stream ``vlm/eval``) and on a dataset split's ground truth
(:func:`split_examples`, styles applied through the annotations' exact masks);
:func:`vlm_report` writes the table.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from regionroute.data.coco import annotation_mask, load_coco
from regionroute.errors import DataError
from regionroute.files import read_image
from regionroute.metrics.vlm import ANSWER_SUFFIX, QUESTION_COLUMNS, VLMJudge, judge_questions, negative_style
from regionroute.seeds import stream
from regionroute.toy.filters import STYLES
from regionroute.toy.vlm import KINDS, Example, VLMConfig, example, make_examples

__all__ = ["accuracy", "split_examples", "vlm_accuracy", "vlm_report"]


def split_examples(root: Path, split: str, seed: int = 0) -> list[Example]:
    """Ground-truth examples of a COCO split: every instance whose category is unique in its image, x kind x style.

    Regions come from the annotation's exact mask; negatives are drawn as the score stage
    draws them (:func:`~regionroute.metrics.vlm.negative_style`). Unstyled: once per instance.
    A bad annotation file or an image of another size than annotated is one :class:`DataError`.
    """
    instances = Path(root) / "annotations" / f"instances_{split}.json"
    if not instances.is_file():
        raise DataError(f"{instances}: no such file (the split {split!r} of {root})")
    coco, _ = load_coco(instances)
    out = []
    for img_id in sorted(coco.getImgIds()):
        img = coco.loadImgs(img_id)[0]
        anns = coco.loadAnns(coco.getAnnIds(imgIds=img_id, iscrowd=False))
        if not anns:
            continue
        path = Path(root) / split / img["file_name"]
        image = read_image(path)
        if image.shape[:2] != (img["height"], img["width"]):
            raise DataError(f"{path}: {image.shape[1]}x{image.shape[0]} px, annotated {img['width']}x{img['height']}")
        masks = np.stack([annotation_mask(coco, a, img, instances) for a in anns])
        names = [coco.loadCats(a["category_id"])[0]["name"] for a in anns]
        for k, ann in enumerate(anns):
            if names.count(names[k]) > 1:
                continue
            for kind in KINDS:
                for style in STYLES[:1] if kind == "unstyled" else STYLES:
                    neg = negative_style(f"{split}:{ann['id']}:{kind}", style, STYLES, seed)
                    out.append(example(image, masks, names, k, kind, style, neg))
    return out


def accuracy(judge: Any, examples: Sequence[Example]) -> dict[str, Any]:
    """Accuracy of ``judge`` (a :class:`~regionroute.metrics.vlm.VLMJudge`) per question, overall and per kind.

    A question counts as answered yes when P(yes) > 0.5.
    """
    probs = judge.yes_probabilities([e.image for e in examples], [e.questions[:4] for e in examples])  # (N, 4)
    truth = np.array([e.answers[:4] for e in examples])  # (N, 4)
    right = (probs > 0.5) == truth
    kinds, styles = np.array([e.kind for e in examples]), np.array([e.style for e in examples])

    def table(rows: np.ndarray) -> dict[str, float]:
        acc = {q: float(right[rows, j].mean()) for j, q in enumerate(QUESTION_COLUMNS)}
        return {**acc, "overall": float(right[rows].mean()), "n": int(rows.sum())}

    return {
        **table(np.ones(len(examples), dtype=bool)),
        "by_kind": {k: table(kinds == k) for k in KINDS if (kinds == k).any()},
        "by_style": {s: table(m) for s in STYLES if (m := (styles == s) & (kinds != "unstyled")).any()},
    }


def vlm_accuracy(model_dir: Path, cfg: VLMConfig, split: Sequence[Example], split_name: str) -> dict[str, Any]:
    """Accuracy of the saved judge, loaded as the score stage loads it (float32, CPU).

    On ``cfg.eval_images`` generated examples (the ``vlm/eval`` stream, which training never
    draws) and on ``split``, the ground-truth examples of the dataset split ``split_name``.
    """
    judge = VLMJudge(str(model_dir), device="cpu", dtype="float32", batch_size=32)
    generated = make_examples(stream("vlm/eval", cfg.seed), cfg.eval_images, cfg.size)
    return {
        "split": split_name,
        "accuracy": {"generated": accuracy(judge, generated), split_name: accuracy(judge, split)},
        "parameters": sum(p.numel() for p in judge.model.parameters()),
        "steps": cfg.steps,
    }


def vlm_report(result: dict[str, Any], aim: float = 0.9) -> str:
    """``reports/toy/vlm.md``: the accuracy per question, overall and per kind of example."""
    from regionroute.report import markdown_table

    texts = [q.removesuffix(ANSWER_SUFFIX) for q in judge_questions("{object}", "{style}", "{negative style}")]
    split = result["split"]
    rows = []
    for name, title in (("generated", "generated scenes"), (split, f"{split} split")):
        table = result["accuracy"][name]
        rows.append([f"**{title}**", *(f"**{table[q]:.3f}**" for q in QUESTION_COLUMNS), str(table["n"])])
        rows += [
            [f"{title}: {kind}", *(f"{t[q]:.3f}" for q in QUESTION_COLUMNS), str(t["n"])]
            for kind, t in table["by_kind"].items()
        ]
    missed = [q.upper() for q in QUESTION_COLUMNS if result["accuracy"][split][q] < aim]
    verdict = f"below it: {', '.join(missed)}" if missed else "every question meets it"
    questions = "; ".join(f"{q.upper()} `{t}`" for q, t in zip(QUESTION_COLUMNS, texts, strict=True))
    return "\n".join(
        [
            "# The toy VLM judge",
            "",
            "Generated by `dvc repro toy/dvc.yaml` (stage `vlm_accuracy`, `toy/metrics/vlm.json`); "
            "do not edit by hand.",
            "",
            f"A Qwen2.5-VL of {result['parameters'] / 1e6:.2f} M parameters trained for {result['steps']} steps on "
            "scenes of its own seed stream (stage `vlm`) to answer yes or no (P(yes) > 0.5 counts as yes): "
            f"{questions}. "
            "An example styles the target object, the rest of the image, the whole image or nothing (its kind) "
            f"through the exact masks. Held out: generated scenes (stream `vlm/eval`) and the {split} split's ground "
            "truth (each instance whose category is unique in its image, x kind x style; unstyled once). "
            f"The aim is {aim} for every question on the {split} split; {verdict}.",
            "",
            markdown_table(rows, ["examples", *(q.upper() for q in QUESTION_COLUMNS), "n"]),
            "",
        ]
    )
