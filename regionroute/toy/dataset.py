"""The toy world's dataset ``data/toy``: three disjoint splits of procedural scenes (toy stage ``scenes``).

``train`` (RegionRoute's experts), ``val`` (choosing the toy default's settings) and ``test``
(the report's targets, never used to choose anything), each drawn from its own stream of the
seed scheme (:mod:`regionroute.seeds`), written in COCO's layout by
:func:`regionroute.data.synthetic.write_coco_split`.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from pathlib import Path

from regionroute.config import Section

__all__ = ["SPLITS", "ScenesConfig", "split_scenes", "write_toy_dataset"]

SPLITS: tuple[str, ...] = ("train", "val", "test")


@dataclass(frozen=True)
class ScenesConfig(Section):
    """``toy/params.yaml: scenes:`` images per split, their size, the seed of the scene streams."""

    _section: typing.ClassVar[str] = "scenes"
    train: int = 150
    val: int = 64
    test: int = 128
    size: int = 64
    seed: int = 0

    def _validate(self) -> None:
        self._at_least(1, *SPLITS)
        self._at_least(16, "size")


def split_scenes(cfg: ScenesConfig, split: str) -> list:
    """The scenes of one split, from the stream ``scenes/<split>``."""
    from regionroute.seeds import stream
    from regionroute.toy.scenes import render_batch

    return render_batch(stream(f"scenes/{split}", cfg.seed), getattr(cfg, split), cfg.size)


def write_toy_dataset(root: Path, cfg: ScenesConfig) -> dict[str, dict[str, int]]:
    """Write every split under ``root``; image ids are consecutive over the splits."""
    from regionroute.data.synthetic import write_coco_split

    stats, first = {}, 1
    for split in SPLITS:
        scenes = split_scenes(cfg, split)
        stats[split] = write_coco_split(root, split, scenes, first, info="RegionRoute toy world scenes (COCO format)")
        first += len(scenes)
    return stats
