"""Generator of the embedded demo dataset: a tiny synthetic set in COCO format.

The demo is what ``dvc repro`` runs on a fresh machine (no downloads). It mirrors the
COCO 2017 layout so the same ``sample`` code runs on both::

    <root>/annotations/instances_<split>.json   # categories, images, polygon/RLE instances
    <root>/annotations/captions_<split>.json    # 2 captions per image
    <root>/<split>/<image_id:012d>.jpg

Images are procedural scenes (sky/ground gradient, textured polygon objects of six
COCO categories, sizes from small (<1% of the image) to large, some near the border,
some crowd annotations). They look nothing like photos; they exist to exercise the
mechanics. Regenerate with ``regionroute make-demo data/demo``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from regionroute.files import atomic_path, write_json

__all__ = ["CATEGORIES", "build_demo"]

#: (COCO id, name, supercategory) -- the real COCO ids, so names/ids match COCO 2017.
CATEGORIES: tuple[tuple[int, str, str], ...] = (
    (3, "car", "vehicle"),
    (17, "cat", "animal"),
    (18, "dog", "animal"),
    (37, "sports ball", "sports"),
    (38, "kite", "sports"),
    (44, "bottle", "kitchen"),
)
_COLORS = {
    "red": (200, 40, 40),
    "blue": (40, 70, 200),
    "yellow": (220, 200, 40),
    "brown": (120, 80, 40),
    "white": (235, 235, 235),
    "black": (30, 30, 30),
    "green": (40, 160, 60),
}
_SIZES = ((192, 144), (160, 160), (144, 192), (176, 132))


def _ellipse(cx: float, cy: float, rx: float, ry: float, n: int = 20) -> list[float]:
    pts = []
    for k in range(n):
        t = 2 * math.pi * k / n
        pts += [cx + rx * math.cos(t), cy + ry * math.sin(t)]
    return pts


def _shape(name: str, cx: float, cy: float, s: float) -> list[list[float]]:
    """Polygons (COCO ``segmentation`` lists) of a category at centre ``(cx, cy)``, size ``s``."""
    if name == "car":
        return [
            [
                cx - s,
                cy - 0.3 * s,
                cx - 0.5 * s,
                cy - 0.7 * s,
                cx + 0.5 * s,
                cy - 0.7 * s,
                cx + s,
                cy - 0.3 * s,
                cx + s,
                cy + 0.4 * s,
                cx - s,
                cy + 0.4 * s,
            ]
        ]
    if name == "cat":
        body = _ellipse(cx, cy + 0.2 * s, 0.8 * s, 0.6 * s)
        ears = [
            cx - 0.6 * s,
            cy - 0.2 * s,
            cx - 0.4 * s,
            cy - 0.9 * s,
            cx - 0.1 * s,
            cy - 0.3 * s,
            cx + 0.1 * s,
            cy - 0.3 * s,
            cx + 0.4 * s,
            cy - 0.9 * s,
            cx + 0.6 * s,
            cy - 0.2 * s,
        ]
        return [body, ears]
    if name == "dog":
        return [_ellipse(cx, cy, s, 0.55 * s), _ellipse(cx + 0.9 * s, cy - 0.5 * s, 0.35 * s, 0.3 * s)]
    if name == "sports ball":
        return [_ellipse(cx, cy, 0.5 * s, 0.5 * s, n=16)]
    if name == "kite":
        return [[cx, cy - s, cx + 0.6 * s, cy, cx, cy + s, cx - 0.6 * s, cy]]
    if name == "bottle":
        return [
            [
                cx - 0.25 * s,
                cy - 0.2 * s,
                cx - 0.1 * s,
                cy - 0.4 * s,
                cx - 0.1 * s,
                cy - s,
                cx + 0.1 * s,
                cy - s,
                cx + 0.1 * s,
                cy - 0.4 * s,
                cx + 0.25 * s,
                cy - 0.2 * s,
                cx + 0.25 * s,
                cy + s,
                cx - 0.25 * s,
                cy + s,
            ]
        ]
    raise ValueError(name)


def _clip_polys(polys: list[list[float]], w: int, h: int) -> list[list[float]]:
    out = []
    for p in polys:
        xs = np.clip(np.asarray(p[0::2]), 0, w - 1)
        ys = np.clip(np.asarray(p[1::2]), 0, h - 1)
        out.append([round(float(v), 2) for xy in zip(xs, ys, strict=True) for v in xy])
    return out


def _background(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    horizon = int(h * rng.uniform(0.35, 0.6))
    sky = np.array(rng.choice([(120, 170, 230), (200, 210, 230), (250, 190, 140)]), dtype=float)
    ground = np.array(rng.choice([(80, 150, 70), (170, 150, 110), (110, 110, 115)]), dtype=float)
    img = np.zeros((h, w, 3), dtype=float)
    for y in range(h):
        base = sky * (0.7 + 0.3 * y / max(horizon, 1)) if y < horizon else ground * (1 - 0.3 * (y - horizon) / h)
        img[y] = base
    img += rng.normal(0, 8, size=img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def _polygon_area(poly: list[float]) -> float:
    x, y = np.asarray(poly[0::2]), np.asarray(poly[1::2])
    return float(0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


def _make_image(
    rng: np.random.Generator, image_id: int, ann_start: int, w: int, h: int
) -> tuple[Image.Image, list[dict[str, Any]], list[str]]:
    img = _background(rng, w, h)
    anns: list[dict[str, Any]] = []
    boxes: list[tuple[float, float, float, float]] = []
    names: list[str] = []
    n_obj = int(rng.integers(1, 4))
    for _ in range(40):  # rejection sampling of non-overlapping placements
        if len(anns) >= n_obj:
            break
        cat_id, name, _ = CATEGORIES[int(rng.integers(len(CATEGORIES)))]
        # sizes from small (~0.5% of the image) to large (~25%)
        s = float(min(w, h) * rng.choice([0.05, 0.08, 0.15, 0.25, 0.35]))
        cx, cy = float(rng.uniform(0.05 * w, 0.95 * w)), float(rng.uniform(0.1 * h, 0.95 * h))
        polys = _clip_polys(_shape(name, cx, cy, s), w, h)
        xs = np.concatenate([np.asarray(p[0::2]) for p in polys])
        ys = np.concatenate([np.asarray(p[1::2]) for p in polys])
        box = (float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max()))
        if box[2] - box[0] < 3 or box[3] - box[1] < 3:
            continue
        if any(not (box[2] < b[0] - 2 or b[2] < box[0] - 2 or box[3] < b[1] - 2 or b[3] < box[1] - 2) for b in boxes):
            continue
        color_name = str(rng.choice(list(_COLORS)))
        color = np.array(_COLORS[color_name])
        # the object: its colour with darker vertical stripes, both clipped to the silhouette
        sil = Image.new("L", (w, h), 0)
        sil_draw = ImageDraw.Draw(sil)
        for p in polys:
            sil_draw.polygon([(p[i], p[i + 1]) for i in range(0, len(p), 2)], fill=255)
        tex = Image.new("RGB", (w, h), tuple(int(c) for c in color))
        tex_draw = ImageDraw.Draw(tex)
        for k in range(int(box[0]), int(box[2]) + 1, 4):
            tex_draw.line([(k, 0), (k, h)], fill=tuple(int(c) for c in color * 0.7), width=1)
        img.paste(tex, (0, 0), sil)
        boxes.append(box)
        names.append(f"{color_name} {name}")
        anns.append(
            {
                "id": ann_start + len(anns),
                "image_id": image_id,
                "category_id": cat_id,
                "segmentation": polys,
                "area": round(sum(_polygon_area(p) for p in polys), 2),
                "bbox": [round(box[0], 2), round(box[1], 2), round(box[2] - box[0], 2), round(box[3] - box[1], 2)],
                "iscrowd": 0,
            }
        )
    # one image in six gets an extra crowd annotation (never a valid target)
    if image_id % 6 == 0 and anns:
        crowd = dict(anns[0], id=ann_start + len(anns), iscrowd=1)
        anns.append(crowd)
    return img, anns, names


def build_demo(root: str | Path, seed: int = 0, n_train: int = 24, n_val: int = 8) -> None:
    """Write the demo dataset to ``root`` (deterministic for a given ``seed``)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    categories = [{"id": i, "name": n, "supercategory": s} for i, n, s in CATEGORIES]
    image_id, ann_id, cap_id = 1, 1, 1
    for split, n in (("train", n_train), ("val", n_val)):
        images, anns, caps = [], [], []
        for _ in range(n):
            w, h = _SIZES[image_id % len(_SIZES)]
            img, img_anns, names = _make_image(rng, image_id, ann_id, w, h)
            file_name = f"{image_id:012d}.jpg"
            with atomic_path(root / split / file_name) as tmp:
                img.save(tmp, format="JPEG", quality=90)
            images.append({"id": image_id, "file_name": file_name, "width": w, "height": h})
            anns += img_anns
            ann_id += len(img_anns)
            scene = " and ".join(f"a {x}" for x in names)
            for text in (f"{scene} outside.", f"a picture showing {scene}."):
                caps.append({"id": cap_id, "image_id": image_id, "caption": text})
                cap_id += 1
            image_id += 1
        info = {"description": "RegionRoute synthetic demo (COCO format)", "version": "1.0"}
        write_json(
            root / "annotations" / f"instances_{split}.json",
            {"info": info, "images": images, "annotations": anns, "categories": categories},
        )
        write_json(
            root / "annotations" / f"captions_{split}.json", {"info": info, "images": images, "annotations": caps}
        )
