"""The toy world's targets, judged with paired bootstrap intervals over the test images (docs/toy.md, "Targets").

Used by the ``report`` stage (``metrics/targets.json`` and the results table), ``regionroute
ablations`` and ``regionroute replicates``. A ratio is RegionRoute's mean over a reference
method's (the base, or the oracle for Q1) on the same rows; its 95% interval comes from
resampling *images* with replacement (an image's styles stay together), seeded by the seed
scheme's ``bootstrap`` stream. A target ``holds`` when the whole interval clears its threshold,
``holds (point estimate only)`` when only the ratio does, and ``fails`` otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd

__all__ = ["TARGETS", "Target", "bootstrap_means", "bootstrap_ratio", "judge", "judge_targets"]

RESAMPLES = 2000


@dataclass(frozen=True)
class Target:
    """``metric`` of ``method`` against ``reference``: ``ratio <= t``, ``>= t`` or within ``1 +- t``."""

    metric: str
    relation: Literal["<=", ">=", "within"]
    threshold: float
    what: str
    reference: str = "base"
    method: str = "regionroute"

    @property
    def bound(self) -> str:
        if self.relation == "within":
            return f"{1 - self.threshold:.2f}-{1 + self.threshold:.2f}"
        return f"{self.relation} {self.threshold:g}"


#: The toy world's targets (RegionRoute against the base it was trained on; Q1 against the oracle).
TARGETS: tuple[Target, ...] = (
    Target("mse_bg", "<=", 0.5, "background MSE at most half the base's"),
    Target("lpips_bg", "<=", 0.5, "background LPIPS at most half the base's"),
    Target("mse_fg", "<=", 1.5, "inside the object, match to the pseudo-GT within 1.5x the base's"),
    Target("rsm_text", "within", 0.1, "toy-CLIP RSM-text within 10% of the base's"),
    Target("attn_mass_in", ">=", 3.0, "style-token attention mass inside the mask at least 3x the base's"),
    Target("q1", "within", 0.1, "VLM Q1 (object in the style) within 10% of the oracle's", reference="oracle"),
    Target("q2", "<=", 0.5, "VLM Q2 (background in the style) at most half the base's"),
)


def _per_image(df: pd.DataFrame, method: str, metric: str, images: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(sum, count) of ``metric`` over each image's rows (its styles) for ``method``; NaNs left out."""
    rows = df[df["method"] == method]
    grouped = rows.groupby("sample_id")[metric]
    sums = grouped.sum(min_count=1).reindex(images).fillna(0.0).to_numpy(float)
    counts = grouped.count().reindex(images).fillna(0).to_numpy(float)
    return sums, counts


def _draws(n: int, seed: int) -> np.ndarray:
    """(RESAMPLES, n) counts: how often each image is drawn in each resample."""
    from regionroute.seeds import stream

    idx = stream("bootstrap", seed).integers(n, size=(RESAMPLES, n))
    return np.stack([np.bincount(row, minlength=n) for row in idx]).astype(float)


def bootstrap_means(df: pd.DataFrame, method: str, metric: str, seed: int = 0) -> tuple[float, float, float]:
    """(mean, 2.5%, 97.5%) of ``metric`` for ``method``, resampling images."""
    images = sorted(df["sample_id"].unique())
    s, c = _per_image(df, method, metric, images)
    if c.sum() == 0:
        return (np.nan, np.nan, np.nan)
    w = _draws(len(images), seed)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = (w @ s) / (w @ c)
    lo, hi = np.nanpercentile(means, [2.5, 97.5])
    return float(s.sum() / c.sum()), float(lo), float(hi)


def bootstrap_ratio(
    df: pd.DataFrame, metric: str, method: str, reference: str, seed: int = 0
) -> tuple[float, float, float]:
    """(ratio, 2.5%, 97.5%) of ``method``'s mean over ``reference``'s, resampling the same images for both."""
    images = sorted(df["sample_id"].unique())
    a, ca = _per_image(df, method, metric, images)
    b, cb = _per_image(df, reference, metric, images)
    if ca.sum() == 0 or cb.sum() == 0 or b.sum() == 0:
        return (np.nan, np.nan, np.nan)
    w = _draws(len(images), seed)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratios = ((w @ a) / (w @ ca)) / ((w @ b) / (w @ cb))
    lo, hi = np.nanpercentile(ratios, [2.5, 97.5])
    return float((a.sum() / ca.sum()) / (b.sum() / cb.sum())), float(lo), float(hi)


def judge(target: Target, ratio: float, lo: float, hi: float) -> str:
    """``holds`` (the whole interval clears), ``holds (point estimate only)``, ``fails`` or ``not measured``."""
    if not np.isfinite(ratio):
        return "not measured"
    t = target.threshold

    def clears(x: float) -> bool:
        if target.relation == "<=":
            return x <= t
        if target.relation == ">=":
            return x >= t
        return abs(x - 1) <= t

    if clears(lo) and clears(hi):  # the whole interval (for 'within': both ends inside the band)
        return "holds"
    return "holds (point estimate only)" if clears(ratio) else "fails"


def judge_targets(df: pd.DataFrame, seed: int = 0, targets: tuple[Target, ...] = TARGETS) -> dict[str, dict]:
    """Every target's ratio, interval and verdict (JSON-able), from the score stage's per-sample table; its bound and
    reference are :data:`TARGETS`' (results.md prints them)."""
    out = {}
    for target in targets:
        if target.metric not in df.columns:
            continue
        ratio, lo, hi = bootstrap_ratio(df, target.metric, target.method, target.reference, seed)
        out[target.metric] = {
            "ratio": round(ratio, 4) if np.isfinite(ratio) else None,
            "lo": round(lo, 4) if np.isfinite(lo) else None,
            "hi": round(hi, 4) if np.isfinite(hi) else None,
            "verdict": judge(target, ratio, lo, hi),
        }
    return out
