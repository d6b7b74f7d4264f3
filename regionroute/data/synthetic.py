"""The one writer of synthetic datasets in COCO 2017's layout (docs/toy.md, "Scenes").

:func:`write_coco_split` writes ``annotations/{instances,captions}_<split>.json`` and
``<split>/<image id>.<png|jpg>`` for a list of :class:`~regionroute.toy.scenes.Scene`; the toy
world (``data/toy``, exact RLE masks, PNG) and the tiny test set (``data/tiny``, polygons,
JPEG, crowd annotations) both go through it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from regionroute.files import atomic_path, write_json
from regionroute.toy.scenes import CATEGORIES, Scene, caption

__all__ = ["CocoStyle", "write_coco_annotations", "write_coco_split"]


@dataclass(frozen=True)
class CocoStyle:
    """How a split is written: segmentation format, image format, extras."""

    segmentation: Literal["rle", "polygon"] = "rle"  # rle: the exact drawn masks; polygon: COCO's usual form
    image_format: Literal["png", "jpg"] = "png"
    crowd_every: int = 0  # every k-th image gets a crowd copy of its first instance (0: none)
    captions: int = 1  # captions per image


def _segmentation(scene: Scene, k: int, style: CocoStyle) -> tuple[Any, float]:
    """(segmentation, area) of instance ``k``."""
    from pycocotools import mask as mask_utils

    mask = scene.masks[k]
    if style.segmentation == "polygon":
        h, w = mask.shape
        rles = mask_utils.frPyObjects(scene.polygons[k], h, w)
        return scene.polygons[k], float(mask_utils.area(mask_utils.merge(rles)))
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle, float(mask.sum())


def _crowd(scene: Scene, k: int) -> dict[str, Any]:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(scene.masks[k].astype(np.uint8)))
    return {"segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")}, "iscrowd": 1}


def write_coco_split(
    root: Path, split: str, scenes: Sequence[Scene], first_id: int, style: CocoStyle = CocoStyle(), info: str = ""
) -> dict[str, int]:
    """Write one split; image ids (and annotation ids) start at ``first_id``. Returns counts."""
    root = Path(root)
    ids = {name: cid for cid, name, _ in CATEGORIES}
    categories = [{"id": i, "name": n, "supercategory": s} for i, n, s in CATEGORIES]
    images, anns, caps = [], [], []
    ann_id = first_id * 10
    for i, scene in enumerate(scenes):
        image_id = first_id + i
        h, w = scene.image.shape[:2]
        file_name = f"{image_id:012d}.{style.image_format}"
        with atomic_path(root / split / file_name) as tmp:
            kwargs = {"format": "JPEG", "quality": 90} if style.image_format == "jpg" else {"format": "PNG"}
            Image.fromarray(scene.image).save(tmp, **kwargs)
        images.append({"id": image_id, "file_name": file_name, "width": w, "height": h})
        for k, obj in enumerate(scene.objects):
            ys, xs = np.nonzero(scene.masks[k])
            bbox = [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]
            segmentation, area = _segmentation(scene, k, style)
            ann = {"id": ann_id, "image_id": image_id, "category_id": ids[obj], "segmentation": segmentation,
                   "area": area, "bbox": bbox, "iscrowd": 0}  # fmt: skip
            anns.append(ann)
            ann_id += 1
            if k == 0 and style.crowd_every and image_id % style.crowd_every == 0:
                anns.append({**ann, "id": ann_id, **_crowd(scene, k)})  # never a valid target
                ann_id += 1
        text = caption(scene)
        for c in range(style.captions):
            caps.append(
                {"id": image_id * 10 + c, "image_id": image_id, "caption": text if c == 0 else f"a picture: {text}"}
            )
    meta = {"description": info or "RegionRoute synthetic scenes (COCO format)", "version": "1.0"}
    write_coco_annotations(root, split, {"info": meta, "images": images}, anns, caps, categories)
    return {"images": len(images), "instances": len(anns)}


def write_coco_annotations(
    root: Path, split: str, common: dict[str, Any], instances: list[dict], captions: list[dict], categories: list[dict]
) -> None:
    """``annotations/instances_<split>.json`` and ``captions_<split>.json``; ``common`` holds ``images``, ``info``..."""
    folder = Path(root) / "annotations"
    write_json(folder / f"instances_{split}.json", {**common, "annotations": instances, "categories": categories})
    write_json(folder / f"captions_{split}.json", {**common, "annotations": captions})
