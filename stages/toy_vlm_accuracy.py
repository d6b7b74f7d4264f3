"""Toy DVC stage ``vlm_accuracy``: the toy VLM judge's accuracy per question (regionroute.toy.vlm_eval)."""

from __future__ import annotations

import argparse
from pathlib import Path

from regionroute.config import load_section
from regionroute.errors import exit_on_user_error
from regionroute.toy.vlm import VLMConfig


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--params", type=Path, default=Path("toy/params.yaml"))
    p.add_argument("--model", type=Path, required=True, help="the vlm stage's model directory")
    p.add_argument("--data", type=Path, required=True, help="COCO-format dataset root")
    p.add_argument("--split", required=True, help="the dataset split whose ground truth is scored")
    p.add_argument("--metrics", type=Path, required=True, help="accuracy per question and kind (JSON)")
    p.add_argument("--report", type=Path, required=True, help="the same as a markdown table")
    return p


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    cfg = load_section(args.params, "vlm", VLMConfig)
    from regionroute.files import atomic_path, write_json
    from regionroute.toy.vlm_eval import split_examples, vlm_accuracy, vlm_report

    result = vlm_accuracy(args.model, cfg, split_examples(args.data, args.split), args.split)
    write_json(args.metrics, result)
    with atomic_path(args.report) as tmp:
        tmp.write_text(vlm_report(result))
    for name, acc in result["accuracy"].items():
        print(f"toy vlm: {name}: " + ", ".join(f"{k} {acc[k]:.3f}" for k in ("q1", "q2", "q3", "q4", "overall")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
