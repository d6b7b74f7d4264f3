"""A small dataset in COCO 2017's layout with real COCO's quirks, for ``regionroute rehearse``.

:func:`write_coco` writes ``{train2017,val2017}/<id:012d>.jpg`` (COCO's sizes, one grayscale) and their
annotation files (:func:`regionroute.data.synthetic.write_coco_annotations`): polygon lists (an occluded
object is several polygons), ``area`` from the rasterized mask, crowds as uncompressed RLE, a zero-area
polygon, the 80 categories with COCO's gapped ids (1..90), five captions per image.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from regionroute.data.synthetic import write_coco_annotations
from regionroute.tiny.text import COCO_CATEGORY_NAMES

__all__ = ["CAPTION_WORDS", "COCO_CATEGORIES", "EDIT_IMAGE", "caption", "write_coco"]

#: COCO 2017's category ids: 1..90 without these ten.
_MISSING_IDS = frozenset({12, 26, 29, 30, 45, 66, 68, 69, 71, 83})
_SUPER = (("person", 1), ("vehicle", 8), ("outdoor", 5), ("animal", 10), ("accessory", 5), ("sports", 10),
          ("kitchen", 7), ("food", 10), ("furniture", 6), ("electronic", 6), ("appliance", 5),
          ("indoor", 7))  # fmt: skip
_IDS = [i for i in range(1, 91) if i not in _MISSING_IDS]
COCO_CATEGORIES: list[dict[str, Any]] = [
    {"supercategory": sup, "id": cid, "name": name}
    for sup, cid, name in zip([s for s, n in _SUPER for _ in range(n)], _IDS, COCO_CATEGORY_NAMES, strict=True)
]
#: Words of the captions (and of the stand-in T5 tokenizer's training text).
CAPTION_WORDS: dict[str, tuple[str, ...]] = {
    "adjective": ("small", "large", "old", "bright", "wooden", "white", "dark", "busy", "quiet", "red"),
    "verb": ("sitting", "standing", "lying", "parked", "resting", "waiting", "placed", "shown"),
    "place": ("street", "kitchen", "field", "table", "beach", "room", "park", "window", "road", "counter"),
}

#: (split, image id, width, height, grayscale, [(category name, crowd, parts), ...]); ``parts``: the
#: number of polygons of the instance (an object cut in two by an occluder is annotated as two); 0: a
#: degenerate zero-area polygon, as instances_train2017.json has (annotation 918 of image 200365).
_DOG = [("dog", False, 1), ("person", True, 1), ("bench", False, 2), ("bowl", False, 0)]
_IMAGES: tuple[tuple[str, int, int, int, bool, list[tuple[str, bool, int]]], ...] = (
    ("train2017", 9, 640, 480, False, _DOG),
    ("train2017", 25, 480, 640, False, [("giraffe", False, 2), ("bird", False, 1)]),
    ("train2017", 30, 427, 640, True, [("vase", False, 1)]),
    ("train2017", 34, 640, 427, False, [("person", True, 1)]),  # crowd only: no usable instance
    ("train2017", 36, 500, 375, False, [("umbrella", False, 1), ("person", False, 2)]),
    ("val2017", 139, 640, 426, False, [("tv", False, 1), ("potted plant", False, 2), ("person", True, 1)]),
    ("val2017", 285, 586, 640, False, [("bear", False, 1)]),
    ("val2017", 632, 640, 483, False, [("bed", False, 2), ("book", False, 1)]),
    ("val2017", 724, 375, 500, True, [("stop sign", False, 1)]),
)
#: The val2017 image ``regionroute edit`` is tried on (640x480, as the rehearsal asks).
EDIT_IMAGE = ("val2017", 776, 640, 480, False, [("teddy bear", False, 1), ("teddy bear", False, 2)])


def caption(rng: np.random.Generator, name: str) -> str:
    """One caption in COCO's style: ``A small dog sitting on a street.``"""
    w = {k: v[int(rng.integers(len(v)))] for k, v in CAPTION_WORDS.items()}
    return f"A {w['adjective']} {name} {w['verb']} near the {w['place']}."


def _polygon(rng: np.random.Generator, cx: float, cy: float, r: float, w: int, h: int) -> list[float]:
    """A star-shaped polygon around (cx, cy), clipped to the image, as COCO's flat ``[x1, y1, x2, y2, ...]``."""
    n = int(rng.integers(8, 16))
    angles = np.sort(rng.uniform(0, 2 * np.pi, n))
    radii = r * rng.uniform(0.6, 1.0, n)
    xs = np.clip(cx + radii * np.cos(angles), 0, w)
    ys = np.clip(cy + radii * np.sin(angles), 0, h)
    return [round(float(v), 2) for xy in zip(xs, ys, strict=True) for v in xy]


def _instance(rng: np.random.Generator, w: int, h: int, parts: int) -> list[list[float]]:
    cx, cy = rng.uniform(0.25, 0.75) * w, rng.uniform(0.25, 0.75) * h
    r = rng.uniform(0.1, 0.25) * min(w, h)
    if parts == 1:
        return [_polygon(rng, cx, cy, r, w, h)]
    offsets = np.linspace(-1.2, 1.2, parts) * r  # the parts side by side, as an occluded object
    return [_polygon(rng, cx + dx, cy, r * 0.6, w, h) for dx in offsets]


def _image(rng: np.random.Generator, spec: tuple, first_ann: int) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Pixels (H, W, 3) uint8 and the instance annotations of one image spec."""
    import cv2
    from pycocotools import mask as mask_utils

    _, image_id, w, h, _, objects = spec
    ramp = np.linspace(40, 200, w, dtype=np.float32)[None, :, None]  # a background gradient + noise
    pixels = np.clip(ramp + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
    by_name = {c["name"]: c["id"] for c in COCO_CATEGORIES}
    anns = []
    for k, (name, crowd, parts) in enumerate(objects):
        if parts == 0:  # four collinear points: COCO's {"area": 0.0, "bbox": [x, y, 1.03, 0.0]}
            x, y = round(float(rng.uniform(0.3, 0.6) * w), 2), round(float(rng.uniform(0.3, 0.6) * h), 2)
            poly = [x, y, x, y, round(x + 1.03, 2), y, round(x + 1.03, 2), y]
            anns.append({"segmentation": [poly], "area": 0.0, "iscrowd": 0, "image_id": image_id,
                         "bbox": [x, y, 1.03, 0.0], "category_id": by_name[name], "id": first_ann + k})  # fmt: skip
            continue
        polys = _instance(rng, w, h, parts)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        for poly in polys:
            cv2.fillPoly(pixels, [np.round(np.asarray(poly).reshape(-1, 2)).astype(np.int32)], colour)
        rle = mask_utils.merge(mask_utils.frPyObjects(polys, h, w))
        x, y, bw, bh = (round(float(v), 2) for v in mask_utils.toBbox(rle))
        segmentation: Any = polys
        if crowd:  # COCO stores crowds as uncompressed RLE: column-major run lengths
            flat = mask_utils.decode(rle).flatten(order="F")
            change = np.flatnonzero(np.diff(flat)) + 1
            runs = np.diff(np.concatenate([[0], change, [flat.size]]))
            counts = ([0] if flat[0] else []) + runs.tolist()
            segmentation = {"counts": counts, "size": [h, w]}
        anns.append({
            "segmentation": segmentation, "area": float(mask_utils.area(rle)), "iscrowd": int(crowd),
            "image_id": image_id, "bbox": [x, y, bw, bh], "category_id": by_name[name], "id": first_ann + k,
        })  # fmt: skip
    return pixels, anns


def write_coco(root: Path, seed: int = 0) -> dict[str, int]:
    """Write the dataset under ``root``; returns the number of images per split."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    root = Path(root)
    info = {"description": "RegionRoute rehearsal data in COCO 2017's layout", "version": "1.0", "year": 2017}
    licenses = [{"url": "http://creativecommons.org/licenses/by/2.0/", "id": 4, "name": "Attribution License"}]
    counts = {}
    for split in ("train2017", "val2017"):
        specs = [s for s in (*_IMAGES, EDIT_IMAGE) if s[0] == split]
        images, anns, caps = [], [], []
        for spec in specs:
            _, image_id, w, h, gray, objects = spec
            pixels, image_anns = _image(rng, spec, first_ann=len(anns) + 1 + 1000 * image_id)
            name = f"{image_id:012d}.jpg"
            (root / split).mkdir(parents=True, exist_ok=True)
            im = Image.fromarray(pixels)
            (im.convert("L") if gray else im).save(root / split / name, quality=90)
            images.append({
                "license": 4, "file_name": name, "coco_url": f"http://images.cocodataset.org/{split}/{name}",
                "height": h, "width": w, "date_captured": "2013-11-14 16:28:13", "id": image_id,
            })  # fmt: skip
            anns += image_anns
            for k in range(5):
                caps.append({"image_id": image_id, "id": 10 * image_id + k, "caption": caption(rng, objects[0][0])})
        common = {"info": info, "licenses": licenses, "images": images}
        write_coco_annotations(root, split, common, anns, caps, COCO_CATEGORIES)
        counts[split] = len(images)
    return counts
