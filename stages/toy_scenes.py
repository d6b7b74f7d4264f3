"""Toy DVC stage ``scenes``: the toy world's COCO-format dataset (regionroute.toy.scenes)."""

from __future__ import annotations

import argparse
import typing
from dataclasses import dataclass
from pathlib import Path

from regionroute.config import Section, load_section
from regionroute.errors import exit_on_user_error


@dataclass(frozen=True)
class ScenesConfig(Section):
    """``toy/params.yaml: scenes:``."""

    _section: typing.ClassVar[str] = "scenes"
    train: int = 150
    val: int = 48
    size: int = 64
    seed: int = 0

    def _validate(self) -> None:
        self._at_least(1, "train", "val")
        self._at_least(16, "size")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--params", type=Path, default=Path("toy/params.yaml"))
    p.add_argument("--out", type=Path, required=True, help="dataset root (COCO layout)")
    return p


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    cfg = load_section(args.params, "scenes", ScenesConfig)
    from regionroute.files import atomic_dir
    from regionroute.toy.scenes import write_coco_dataset

    with atomic_dir(args.out) as tmp:
        stats = write_coco_dataset(tmp, cfg.train, cfg.val, cfg.size, cfg.seed)
    print(f"toy scenes: wrote {args.out} ({stats})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
