"""Object-size buckets with COCO's area thresholds, in original-image pixels (docs/method.md §7).

``small`` < 32^2 <= ``medium`` < 96^2 <= ``large`` (each object in exactly one bucket);
:func:`stratify` gives every metric per method and bucket. Used by ``score`` and ``report``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

__all__ = [
    "MEDIUM_MAX_AREA",
    "SIZE_BUCKETS",
    "SMALL_MAX_AREA",
    "add_size_bucket",
    "original_area",
    "size_bucket",
    "stratify",
]

SMALL_MAX_AREA = 32**2  # exclusive upper bound of "small"
MEDIUM_MAX_AREA = 96**2  # exclusive upper bound of "medium"
SIZE_BUCKETS: tuple[str, ...] = ("small", "medium", "large")


def size_bucket(area: float) -> str:
    """COCO bucket of an object ``area`` in original-image pixels."""
    if not math.isfinite(area) or area < 0:
        raise ValueError(f"object area must be a finite number >= 0, got {area}")
    if area < SMALL_MAX_AREA:
        return "small"
    if area < MEDIUM_MAX_AREA:
        return "medium"
    return "large"


def original_area(mask: np.ndarray, original_size: tuple[int, int]) -> float:
    """Area of a resized (H, W) bool ``mask`` expressed in pixels of the original (H0, W0) image."""
    h, w = mask.shape
    h0, w0 = original_size
    return float(np.count_nonzero(mask)) * (h0 * w0) / (h * w)


def add_size_bucket(df: pd.DataFrame, area_col: str = "area", col: str = "size") -> pd.DataFrame:
    """A copy of ``df`` with an ordered categorical ``col`` (small < medium < large) from ``area_col``."""
    if area_col not in df.columns:
        raise KeyError(f"add_size_bucket: no column {area_col!r} (columns: {list(df.columns)})")
    out = df.copy()
    buckets = [size_bucket(float(a)) for a in out[area_col]]
    out[col] = pd.Categorical(buckets, categories=list(SIZE_BUCKETS), ordered=True)
    return out


def stratify(
    df: pd.DataFrame, metrics: Sequence[str], by: Sequence[str] = ("method",), bucket_col: str = "size"
) -> pd.DataFrame:
    """Mean of ``metrics`` per ``by`` group and size bucket, plus the sample count ``n``.

    Every bucket appears for every group (``n = 0`` and NaN means when empty), so
    tables keep the same shape whatever the data.
    """
    missing = [c for c in (*by, bucket_col, *metrics) if c not in df.columns]
    if missing:
        raise KeyError(f"stratify: missing columns {missing}")
    keys = [*by, bucket_col]
    data = df.copy()
    data[bucket_col] = pd.Categorical(data[bucket_col], categories=list(SIZE_BUCKETS), ordered=True)
    grouped = data.groupby(keys, observed=False, sort=True)
    table = grouped[list(metrics)].mean()
    table.insert(0, "n", grouped.size())
    return table.reset_index()
