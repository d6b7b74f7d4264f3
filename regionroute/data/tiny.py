"""The tiny test dataset ``data/tiny``: toy scenes in COCO's usual form, for ``configs/tiny.yaml`` and the tests.

Rectangular JPEGs of four sizes, objects from 0.5% to 25% of the image and near the border,
polygon segmentations, a crowd annotation on every sixth image, two captions per image; written
by :func:`regionroute.data.synthetic.write_coco_split` (``regionroute make-tiny-data data/tiny``).
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["build_tiny_dataset"]

_SIZES = ((192, 144), (160, 160), (144, 192), (176, 132))  # (W, H)
_SCALES = (0.05, 0.08, 0.15, 0.25, 0.35)  # half-sizes over the short side: areas ~0.5-25%


def build_tiny_dataset(root: str | Path, seed: int = 0, n_train: int = 24, n_val: int = 8) -> None:
    """Write the tiny dataset to ``root`` (deterministic for a given ``seed``)."""
    from regionroute.data.synthetic import CocoStyle, write_coco_split
    from regionroute.seeds import stream
    from regionroute.toy.scenes import render_scene

    rng = stream("tiny/data", seed)
    style = CocoStyle(segmentation="polygon", image_format="jpg", crowd_every=6, captions=2)
    first = 1
    for split, n in (("train", n_train), ("val", n_val)):
        sizes = [_SIZES[(first + i) % len(_SIZES)] for i in range(n)]
        scenes = [render_scene(rng, size, scales=_SCALES, margin=0.05) for size in sizes]
        write_coco_split(Path(root), split, scenes, first, style, info="RegionRoute tiny test dataset (COCO format)")
        first += n
