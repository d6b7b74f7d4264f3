"""The region a style is judged on: the mask's bounding box, outside pixels set to CLIP's mean colour.

Used by the ``score`` stage (RSM, :mod:`regionroute.metrics.rses`) and by the toy judge's
training (:mod:`regionroute.toy.judge`), which must see regions cropped exactly as they
are scored. Kept apart from the scorer so that editing a metric does not change (and
retrain, in ``toy/dvc.yaml``) the judge.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from regionroute.errors import DataError

__all__ = ["CLIP_MEAN_RGB", "region_crop"]

#: OpenAI CLIP's normalization mean, as a uint8 RGB colour.
CLIP_MEAN_RGB: tuple[int, int, int] = (123, 117, 104)  # round(OPENAI_DATASET_MEAN * 255)


def region_crop(
    image: np.ndarray, mask: np.ndarray, fill: Sequence[int] = CLIP_MEAN_RGB, square: bool = False
) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Crop ``image`` (H, W, 3) uint8 to the bounding box of ``mask`` (H, W) bool.

    Pixels of the box outside the mask become ``fill``; with ``square`` the crop is
    centred on a square canvas of ``fill``. Returns the crop and the box
    ``(top, left, bottom, right)`` (exclusive ends). An empty mask is an error.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise DataError(f"image: expected an (H, W, 3) uint8 image, got {image.shape} {image.dtype}")
    if mask.shape != image.shape[:2]:
        raise DataError(f"image: image is {image.shape[:2]} but the mask is {mask.shape}")
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        raise DataError("region_crop: the mask is empty")
    box = (int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1)
    top, left, bottom, right = box
    colour = np.asarray(fill, dtype=np.uint8)
    crop = np.where(mask[top:bottom, left:right, None], image[top:bottom, left:right], colour)  # (h, w, 3)
    if square:
        h, w = crop.shape[:2]
        side = max(h, w)
        canvas = np.empty((side, side, 3), dtype=np.uint8)
        canvas[:] = colour
        y, x = (side - h) // 2, (side - w) // 2
        canvas[y : y + h, x : x + w] = crop
        crop = canvas
    return crop.astype(np.uint8), box
