"""Toy DVC stage ``base``: pretrain the toy Kontext base on procedural scenes (regionroute.toy.pretrain)."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from regionroute.config import load_section
from regionroute.errors import exit_on_user_error
from regionroute.toy.base import BaseConfig


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--params", type=Path, default=Path("toy/params.yaml"))
    p.add_argument("--out", type=Path, required=True, help="pipeline directory (save_pretrained layout)")
    p.add_argument("--checkpoints", type=Path, required=True, help="checkpoints, kept only until the export")
    p.add_argument("--live", type=Path, default=None, help="dvclive directory (loss curves)")
    return p


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    cfg = load_section(args.params, "base", BaseConfig)
    from regionroute.toy.base import build_toy_kontext
    from regionroute.toy.pretrain import pretrain

    pipe = build_toy_kontext(cfg, seed=cfg.seed)
    from regionroute.fingerprint import stage_code_digest

    last = pretrain(pipe, cfg, args.out, args.checkpoints, args.live, stage_code_digest("base", "toy/dvc.yaml"))
    shutil.rmtree(args.checkpoints, ignore_errors=True)  # only an interrupted run resumes: --force starts afresh
    print(f"toy base: wrote {args.out} (final loss {last.get('loss', float('nan')):.4f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
