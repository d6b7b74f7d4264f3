"""Stage ``composite``: paste the stylized object back onto the original: the pseudo-GT (docs/method.md §1.4-1.5).

:func:`composite_pair` uses ``cv2.seamlessClone`` on reflect-padded images (masks at the border
work), restores every pixel outside the mask exactly, and falls back to a feathered alpha
composite when OpenCV fails; the method used is recorded per sample. :func:`composite_splits`
writes ``<out>/<split>/images/`` and ``manifest.jsonl`` (:class:`TrainingRecord`).
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
from tqdm import tqdm

from regionroute.config import CompositeConfig
from regionroute.errors import DataError
from regionroute.files import atomic_dir, read_image, read_jsonl, read_mask, write_image, write_jsonl

__all__ = ["TrainingRecord", "alpha_composite", "composite_pair", "composite_splits", "seamless_composite"]

Method = Literal["seamless", "alpha", "alpha_fallback", "empty"]


@dataclass(frozen=True)
class TrainingRecord:
    """One line of ``manifest.jsonl``: one image x style. Paths are relative to the file's directory."""

    id: str  # "<sample id>_<style>"
    sample_id: str
    image_id: int
    style: str
    object: str
    instruction: str  # e.g. "make the dog into pixel-art style"
    caption: str
    original: str  # cropped original (sample stage)
    mask: str  # binary target mask (sample stage)
    stylized: str  # globally stylized image (stylize stage)
    pseudo_gt: str  # composite (this stage)
    composite_method: str
    area: float  # COCO annotation area, original pixels
    area_frac: float


def alpha_composite(original: np.ndarray, stylized: np.ndarray, mask: np.ndarray, feather: float) -> np.ndarray:
    """``mask * stylized + (1 - mask) * original`` with the mask blurred by ``feather`` (sigma, px)."""
    alpha = mask.astype(np.float32)
    if feather > 0:
        alpha = cv2.GaussianBlur(alpha, (0, 0), sigmaX=feather)
    alpha = alpha[..., None]
    out = alpha * stylized.astype(np.float32) + (1 - alpha) * original.astype(np.float32)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def seamless_composite(original: np.ndarray, stylized: np.ndarray, mask: np.ndarray, pad: int) -> np.ndarray:
    """Poisson-blend ``stylized`` into ``original`` inside ``mask`` (raises ``cv2.error`` on failure).

    Pixels outside ``mask`` are exactly the original's.

    All three images are reflect-padded by ``pad`` so a mask touching the border keeps a
    ring of known pixels; ``center`` is chosen so OpenCV's ROI (the mask's bounding box
    placed around ``center`` with integer halves) lands exactly where the mask is.
    """
    src = cv2.copyMakeBorder(stylized, pad, pad, pad, pad, cv2.BORDER_REFLECT_101)
    dst = cv2.copyMakeBorder(original, pad, pad, pad, pad, cv2.BORDER_REFLECT_101)
    m = cv2.copyMakeBorder(mask.astype(np.uint8) * 255, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=0)
    x, y, w, h = cv2.boundingRect(m)
    out = cv2.seamlessClone(src, dst, m, (x + w // 2, y + h // 2), cv2.NORMAL_CLONE)[pad:-pad, pad:-pad]
    # OpenCV also alters pixels of the ROI outside the mask (measured: up to ~15 px away on
    # the tiny dataset); the pseudo-GT must leave the background untouched, so restore it.
    return np.where(mask[..., None], out, original)


def composite_pair(
    original: np.ndarray, stylized: np.ndarray, mask: np.ndarray, cfg: CompositeConfig
) -> tuple[np.ndarray, Method]:
    """Composite one pair with the configured method; returns the image and the method used."""
    if original.shape != stylized.shape or original.shape[:2] != mask.shape:
        raise ValueError(f"shape mismatch: original {original.shape}, stylized {stylized.shape}, mask {mask.shape}")
    if not mask.any():
        return original.copy(), "empty"
    if cfg.method == "alpha":
        return alpha_composite(original, stylized, mask, cfg.feather), "alpha"
    try:
        return seamless_composite(original, stylized, mask, cfg.pad), "seamless"
    except cv2.error:
        return alpha_composite(original, stylized, mask, cfg.feather), "alpha_fallback"


def composite_splits(
    samples: Path, stylized: Path, out_dir: Path, styles: tuple[str, ...], splits: list[str], cfg: CompositeConfig
) -> dict[str, Counter[str]]:
    """Write pseudo-GT images and training records for every split x sample x style."""
    used: dict[str, Counter[str]] = {}
    with atomic_dir(out_dir) as tmp:
        for split in splits:
            sample_rows = read_jsonl(samples / split / "manifest.jsonl")
            records: list[TrainingRecord] = []
            used[split] = Counter()
            stylized_rows = {}
            for style in styles:
                manifest = stylized / style / split / "manifest.jsonl"
                stylized_rows[style] = {r["id"]: r for r in read_jsonl(manifest)}
            for row in tqdm(sample_rows, desc=f"composite {split}", unit="img"):
                original = read_image(samples / split / row["image"])
                mask = read_mask(samples / split / row["mask"])
                for style in styles:
                    srow = stylized_rows[style].get(row["id"])
                    if srow is None:
                        raise DataError(
                            f"{stylized / style / split / 'manifest.jsonl'}: no entry for sample "
                            f"{row['id']} (re-run the stylize stage)"
                        )
                    styl_path = stylized / style / split / srow["stylized"]
                    image, method = composite_pair(original, read_image(styl_path), mask, cfg)
                    used[split][method] += 1
                    rid = f"{row['id']}_{style}"
                    write_image(tmp / split / "images" / f"{rid}.png", image)
                    records.append(
                        TrainingRecord(
                            id=rid,
                            sample_id=row["id"],
                            image_id=int(row["image_id"]),
                            style=style,
                            object=row["object"],
                            instruction=cfg.instruction.format(object=row["object"], style=style),
                            caption=row.get("caption", ""),
                            original=_rel(samples / split / row["image"], out_dir / split),
                            mask=_rel(samples / split / row["mask"], out_dir / split),
                            stylized=_rel(styl_path, out_dir / split),
                            pseudo_gt=f"images/{rid}.png",
                            composite_method=method,
                            area=float(row["area"]),
                            area_frac=float(row["area_frac"]),
                        )
                    )
            write_jsonl(tmp / split / "manifest.jsonl", (asdict(r) for r in records))
    return used


def _rel(path: Path, start: Path) -> str:
    """``path`` relative to ``start`` (both relative to the same working directory)."""
    return os.path.relpath(path, start)
