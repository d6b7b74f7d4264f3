"""Procedural scenes of the toy world: a textured background, 1-3 objects of six COCO categories, exact masks.

Rendered on the fly by the toy base's and judges' training (:mod:`regionroute.toy.pretrain`,
:mod:`regionroute.toy.judge`), and written as the COCO-format dataset ``data/toy`` by the toy
pipeline's ``scenes`` stage (:func:`regionroute.data.synthetic.write_coco_split`). Each object
carries its category's silhouette and surface pattern; its mask is exactly the pixels drawn.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["CATEGORIES", "COLOURS", "SCALES", "Scene", "caption", "render_batch", "render_scene"]

#: (COCO id, name, supercategory): real COCO 2017 ids, so names and ids match COCO.
CATEGORIES: tuple[tuple[int, str, str], ...] = (
    (3, "car", "vehicle"),
    (17, "cat", "animal"),
    (18, "dog", "animal"),
    (37, "sports ball", "sports"),
    (38, "kite", "sports"),
    (44, "bottle", "kitchen"),
)
#: Object colours (names used in "make the {object} {colour}").
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (210, 40, 40),
    "blue": (40, 80, 215),
    "yellow": (230, 205, 40),
    "green": (40, 170, 70),
    "white": (235, 235, 235),
    "black": (35, 35, 35),
    "brown": (130, 85, 45),
}
_SKIES = ((120, 170, 230), (200, 210, 230), (250, 190, 140), (90, 110, 160))
_GROUNDS = ((80, 150, 70), (170, 150, 110), (110, 110, 115), (150, 120, 90))
#: Object half-sizes over the image's short side: areas ~2-20% of the image.
SCALES: tuple[float, ...] = (0.14, 0.18, 0.23, 0.29, 0.36)


@dataclass(frozen=True)
class Scene:
    """One procedural image with its objects."""

    image: np.ndarray  # (H, W, 3) uint8
    masks: np.ndarray  # (K, H, W) bool, one per instance, non-overlapping, K in 1..3
    objects: tuple[str, ...]  # category name per instance
    colours: tuple[str, ...]  # colour name per instance
    polygons: tuple[list[list[float]], ...]  # COCO polygons per instance


def _ellipse(cx: float, cy: float, rx: float, ry: float, n: int = 16) -> list[float]:
    return [
        v for k in range(n) for v in (cx + rx * math.cos(2 * math.pi * k / n), cy + ry * math.sin(2 * math.pi * k / n))
    ]


def _shape(name: str, cx: float, cy: float, s: float) -> list[list[float]]:
    """COCO polygons of a category's silhouette at centre (cx, cy), half-size s."""
    if name == "car":
        body = [cx - s, cy, cx + s, cy, cx + s, cy + 0.45 * s, cx - s, cy + 0.45 * s]
        cabin = [cx - 0.55 * s, cy, cx - 0.3 * s, cy - 0.45 * s, cx + 0.35 * s, cy - 0.45 * s, cx + 0.6 * s, cy]
        return [body, cabin]
    if name == "cat":
        ears = [cx - 0.6 * s, cy - 0.2 * s, cx - 0.45 * s, cy - s, cx - 0.1 * s, cy - 0.35 * s,
                cx + 0.1 * s, cy - 0.35 * s, cx + 0.45 * s, cy - s, cx + 0.6 * s, cy - 0.2 * s]  # fmt: skip
        return [_ellipse(cx, cy + 0.15 * s, 0.75 * s, 0.65 * s), ears]
    if name == "dog":
        return [
            _ellipse(cx - 0.15 * s, cy + 0.1 * s, 0.85 * s, 0.5 * s),
            _ellipse(cx + 0.7 * s, cy - 0.45 * s, 0.38 * s, 0.32 * s),
        ]
    if name == "sports ball":
        return [_ellipse(cx, cy, 0.6 * s, 0.6 * s)]
    if name == "kite":
        return [[cx, cy - s, cx + 0.65 * s, cy, cx, cy + s, cx - 0.65 * s, cy]]
    if name == "bottle":
        half = (0.3, 0.3, 0.12, 0.12)  # half-widths at the base, the shoulder, the neck, the top
        heights = (1.0, -0.25, -0.5, -1.0)
        right = [v for w, h in zip(half, heights, strict=True) for v in (cx + w * s, cy + h * s)]
        left = [v for w, h in zip(reversed(half), reversed(heights), strict=True) for v in (cx - w * s, cy + h * s)]
        return [right + left]
    raise ValueError(f"unknown category {name!r}")


def _pattern(name: str, hw: tuple[int, int], rng: np.random.Generator, cx: float) -> np.ndarray:
    """The category's surface pattern as a brightness factor (H, W) around 1."""
    yy, xx = np.mgrid[0 : hw[0], 0 : hw[1]].astype(np.float32)
    phase = float(rng.uniform(0, 2 * math.pi))
    if name == "car":  # horizontal bands
        return 1.0 + 0.28 * np.sign(np.sin(yy * 1.3 + phase))
    if name == "cat":  # vertical stripes
        return 1.0 + 0.3 * np.sign(np.sin(xx * 1.4 + phase))
    if name == "dog":  # spots
        return 1.0 - 0.35 * ((np.sin(xx * 0.9 + phase) * np.sin(yy * 0.9 + phase)) > 0.55)
    if name == "sports ball":  # a checker of patches
        return 1.0 + 0.3 * np.sign(np.sin(xx * 0.8 + phase) * np.sin(yy * 0.8))
    if name == "kite":  # diagonal stripes
        return 1.0 + 0.3 * np.sign(np.sin((xx + yy) * 0.9 + phase))
    return 1.0 + 0.35 * (np.abs(xx - cx + 1.5) < 1.2)  # bottle: a vertical highlight


def _background(rng: np.random.Generator, hw: tuple[int, int]) -> np.ndarray:
    size, width = hw
    horizon = int(size * rng.uniform(0.3, 0.65))
    sky = np.array(_SKIES[int(rng.integers(len(_SKIES)))], dtype=np.float32)
    ground = np.array(_GROUNDS[int(rng.integers(len(_GROUNDS)))], dtype=np.float32)
    y = np.arange(size, dtype=np.float32)[:, None, None]
    img = np.where(y < horizon, sky * (0.75 + 0.25 * y / max(horizon, 1)), ground * (1 - 0.35 * (y - horizon) / size))
    img = np.broadcast_to(img, (size, width, 3)).copy()
    yy, xx = np.mgrid[0:size, 0:width].astype(np.float32)
    kind = int(rng.integers(4))
    if kind == 0:
        tex = rng.normal(0, 12, (size, width, 1))
    elif kind == 1:
        tex = 14 * np.sin(yy * rng.uniform(0.5, 1.2) + xx * rng.uniform(-0.3, 0.3))[..., None]
    elif kind == 2:
        period = int(rng.integers(4, 9))
        tex = 12 * (((yy // period) + (xx // period)) % 2 * 2 - 1)[..., None]
    else:
        tex = 18 * np.sin(xx * rng.uniform(0.15, 0.35)) * np.sin(yy * rng.uniform(0.15, 0.35))
        tex = tex[..., None]
    return np.clip(img + tex, 0, 255)


def render_scene(
    rng: np.random.Generator, size: int | tuple[int, int] = 64, scales: tuple[float, ...] = SCALES, margin: float = 0.12
) -> Scene:
    """One scene of ``size`` (S, or (W, H)); deterministic for a given ``rng`` state.

    Object centres lie at least ``margin`` of the image from its border; half-sizes are
    ``scales`` times the short side.
    """
    w, h = (size, size) if isinstance(size, int) else size
    img = _background(rng, (h, w))
    taken = np.zeros((h, w), dtype=bool)
    masks, objects, colours, polys = [], [], [], []
    n_obj = int(rng.integers(1, 4))
    for _ in range(30):  # rejection sampling of non-overlapping placements
        if len(masks) == n_obj:
            break
        name = CATEGORIES[int(rng.integers(len(CATEGORIES)))][1]
        s = min(w, h) * float(rng.choice(scales))
        cx, cy = rng.uniform(margin, 1 - margin, 2) * (w, h)
        poly = [[round(float(np.clip(v, 0, (w if i % 2 == 0 else h) - 1)), 2) for i, v in enumerate(p)]
                for p in _shape(name, cx, cy, s)]  # fmt: skip
        sil = Image.new("L", (w, h), 0)
        draw = ImageDraw.Draw(sil)
        for p in poly:
            draw.polygon(list(zip(p[0::2], p[1::2], strict=True)), fill=255)
        mask = np.asarray(sil) > 0
        grown = mask | np.roll(mask, 1, 0) | np.roll(mask, -1, 0) | np.roll(mask, 1, 1) | np.roll(mask, -1, 1)
        if mask.sum() < 12 or (grown & taken).any():
            continue
        colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
        shade = 0.8 + 0.35 * (np.arange(h, dtype=np.float32)[:, None] - cy + s) / (2 * s)  # light from above
        fill = np.array(COLOURS[colour], dtype=np.float32) * np.clip(shade, 0.6, 1.2)[..., None]
        fill = fill * _pattern(name, (h, w), rng, float(cx))[..., None]
        img[mask] = np.clip(fill[mask] + (30 if colour == "black" else 0), 0, 255)
        taken |= mask
        masks.append(mask)
        objects.append(name)
        colours.append(colour)
        polys.append(poly)
    if not masks:  # extremely unlikely; draw again from the same stream
        return render_scene(rng, size, scales, margin)
    return Scene(np.asarray(img, dtype=np.uint8), np.stack(masks), tuple(objects), tuple(colours), tuple(polys))


def render_batch(rng: np.random.Generator, n: int, size: int = 64) -> list[Scene]:
    """``n`` square scenes from one generator."""
    return [render_scene(rng, size) for _ in range(n)]


def caption(scene: Scene) -> str:
    """A COCO-style caption naming the scene's objects and colours."""
    things = [f"a {c} {o}" for o, c in zip(scene.objects, scene.colours, strict=True)]
    return " and ".join(things) + " in a field."
