"""Toy DVC stage ``scenes``: the toy world's dataset, train / val / test (regionroute.toy.dataset)."""

from __future__ import annotations

import argparse
from pathlib import Path

from regionroute.config import load_section
from regionroute.errors import exit_on_user_error


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--params", type=Path, default=Path("toy/params.yaml"))
    p.add_argument("--out", type=Path, required=True, help="dataset root (COCO layout)")
    return p


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from regionroute.files import atomic_dir
    from regionroute.toy.dataset import ScenesConfig, write_toy_dataset

    cfg = load_section(args.params, "scenes", ScenesConfig)
    with atomic_dir(args.out) as tmp:
        stats = write_toy_dataset(tmp, cfg)
    print(f"toy scenes: wrote {args.out} ({stats})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
