"""Toy DVC stage ``vlm``: a small Qwen2.5-VL trained to answer the VLM judge's Q1-Q4 (regionroute.toy.vlm)."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from regionroute.config import load_section
from regionroute.errors import exit_on_user_error
from regionroute.toy.vlm import VLMConfig


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--params", type=Path, default=Path("toy/params.yaml"))
    p.add_argument("--out", type=Path, required=True, help="model directory (save_pretrained: model + processor)")
    p.add_argument("--checkpoints", type=Path, required=True, help="checkpoints, kept only until the export")
    return p


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    cfg = load_section(args.params, "vlm", VLMConfig)
    from regionroute.fingerprint import stage_code_digest
    from regionroute.toy.vlm import train_vlm

    result = train_vlm(cfg, args.out, args.checkpoints, stage_code_digest("vlm", "toy/dvc.yaml"))
    shutil.rmtree(args.checkpoints, ignore_errors=True)  # only an interrupted run resumes: --force starts afresh
    print(f"toy vlm: wrote {args.out} after {result['steps']} steps (final loss {result['final_loss']:.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
