"""Toy DVC stage ``judge``: a tiny CLIP trained on styled regions, for RSM-text (regionroute.toy.judge)."""

from __future__ import annotations

import argparse
from pathlib import Path

from regionroute.config import load_section
from regionroute.errors import exit_on_user_error
from regionroute.toy.judge import JudgeConfig


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--params", type=Path, default=Path("toy/params.yaml"))
    p.add_argument("--out", type=Path, required=True, help="open_clip local-dir model directory")
    p.add_argument("--metrics", type=Path, required=True, help="held-out accuracy (JSON)")
    return p


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    cfg = load_section(args.params, "judge", JudgeConfig)
    from regionroute.files import write_json
    from regionroute.toy.judge import train_judge

    result = train_judge(cfg, args.out)
    write_json(args.metrics, result)
    acc = ", ".join(f"{k} {v:.3f}" for k, v in result["accuracy"].items())
    print(f"toy judge: wrote {args.out}; held-out accuracy {acc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
