"""VLM judge throughput: our batched next-token scorer vs the naive generate-and-parse loop.

Both run on the same model and images, side by side in one process (docs/method.md section
7, VLM; :mod:`regionroute.metrics.vlm`):

* **ours**: :meth:`VLMJudge.score`: each image through the vision tower once, its four
  prompts in one left-padded batch with the other images of the chunk, one forward
  pass reading only the last position's logits -> P(yes).
* **naive**: one ``processor(text, images)`` + ``model.generate`` call per question
  (greedy, ``--max-new-tokens``), the answer text parsed for yes/no.

Prints one JSON line: timings are medians over ``--repeats`` rounds after a warm-up, the
two methods timed in turns (``speedup``: ratio of medians; ``speedup_best``: of minima).
The naive loop's default ``--max-new-tokens 2`` is its cheapest useful setting ("Yes" +
end of turn), so the comparison favours it::

    python benchmarks/vlm_throughput.py --ref tiny --images 8
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from regionroute.config import PAPER_STYLES
from regionroute.metrics.vlm import VLMJudge, judge_questions, negative_style

OBJECTS = ("cat", "dog", "teddy bear", "car", "tennis racket", "pizza", "bench", "clock")


def parse_answer(text: str) -> float:
    """1.0 / 0.0 when the answer starts with yes / no, NaN otherwise."""
    word = text.strip().lower().lstrip("\"'*").split(maxsplit=1)
    if word and word[0].startswith("yes"):
        return 1.0
    if word and word[0].startswith("no"):
        return 0.0
    return float("nan")


@torch.no_grad()
def naive_scores(judge: VLMJudge, images: list[np.ndarray], questions: list[list[str]], max_new_tokens: int):
    """One generate call per (image, question); returns (B, Q) parsed answers."""
    model, processor = judge.model, judge.processor
    out = np.empty((len(images), len(questions[0])))
    for i, (image, qs) in enumerate(zip(images, questions, strict=True)):
        pil = Image.fromarray(image)
        for j, q in enumerate(qs):
            inputs = processor(text=[judge.prompt(q)], images=[pil], return_tensors="pt").to(model.device)
            ids = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=processor.tokenizer.pad_token_id,
            )
            answer = processor.batch_decode(ids[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0]
            out[i, j] = parse_answer(answer)
    return out


def interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> tuple[dict[str, list[float]], dict]:
    """Warm each function up, then time them in turns (``repeats`` rounds) so load drifts hit all alike."""
    results = {name: fn() for name, fn in fns.items()}
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - start)
    return times, results


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ref", default="tiny", help="VLM reference: 'tiny', a directory or a hub id")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--size", type=int, default=112, help="square image side in pixels")
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward pass (ours)")
    parser.add_argument(
        "--max-new-tokens", type=int, default=2, help="generate length (naive); 2 = 'Yes' + end of turn"
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-pixels", type=int, default=None)
    args = parser.parse_args(argv)

    judge = VLMJudge(
        args.ref, device=args.device, dtype=args.dtype, batch_size=args.batch_size, max_pixels=args.max_pixels
    )
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, size=(args.size, args.size, 3), dtype=np.uint8) for _ in range(args.images)]
    ids = [f"img{i}" for i in range(args.images)]
    objects = [OBJECTS[i % len(OBJECTS)] for i in range(args.images)]
    styles = [PAPER_STYLES[i % len(PAPER_STYLES)] for i in range(args.images)]
    negatives = [negative_style(i, s, PAPER_STYLES) for i, s in zip(ids, styles, strict=True)]
    questions = [judge_questions(o, s, n) for o, s, n in zip(objects, styles, negatives, strict=True)]

    times, results = interleaved(
        {
            "ours": lambda: judge.score(images, objects, styles, ids, PAPER_STYLES),
            "naive": lambda: naive_scores(judge, images, questions, args.max_new_tokens),
        },
        args.repeats,
    )
    ours, naive = results["ours"], results["naive"]
    ours_s, naive_s = statistics.median(times["ours"]), statistics.median(times["naive"])
    n_q = len(images) * 4
    result = {
        "benchmark": "vlm_throughput",
        "ref": args.ref,
        "device": str(judge.device),
        "dtype": args.dtype,
        "torch_threads": torch.get_num_threads(),
        "images": len(images),
        "questions": n_q,
        "image_size": args.size,
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "ours_s": round(ours_s, 4),
        "naive_s": round(naive_s, 4),
        "ours_questions_per_s": round(n_q / ours_s, 2),
        "naive_questions_per_s": round(n_q / naive_s, 2),
        "speedup": round(naive_s / ours_s, 2),
        "speedup_best": round(min(times["naive"]) / min(times["ours"]), 2),
        "repeats": args.repeats,
        "naive_parsed_fraction": float(np.isfinite(naive).mean()),
        "ours_in_unit_interval": bool(((ours.probs >= 0) & (ours.probs <= 1)).all()),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
