"""Targets: paired bootstrap intervals over images and the three verdicts, on hand-made tables."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from regionroute.targets import TARGETS, Target, bootstrap_means, bootstrap_ratio, judge, judge_targets


def _table(base: np.ndarray, method: np.ndarray, styles: int = 2) -> pd.DataFrame:
    rows = []
    for i, (b, m) in enumerate(zip(base, method, strict=True)):
        for s in range(styles):
            rows += [{"method": "base", "sample_id": f"{i:03d}", "style": s, "mse_bg": b},
                     {"method": "regionroute", "sample_id": f"{i:03d}", "style": s, "mse_bg": m}]  # fmt: skip
    return pd.DataFrame(rows)


def test_a_constant_ratio_has_a_zero_width_interval():
    base = np.linspace(1.0, 2.0, 40)
    ratio, lo, hi = bootstrap_ratio(_table(base, 0.25 * base), "mse_bg", "regionroute", "base")
    assert ratio == pytest.approx(0.25) and lo == pytest.approx(0.25) and hi == pytest.approx(0.25)


def test_the_interval_is_paired_and_covers_the_noise():
    rng = np.random.default_rng(0)
    base = rng.uniform(1, 3, 64)
    noisy = 0.4 * base * rng.uniform(0.5, 1.5, 64)
    ratio, lo, hi = bootstrap_ratio(_table(base, noisy), "mse_bg", "regionroute", "base")
    assert lo < ratio < hi and lo > 0.3 and hi < 0.5
    # pairing: the same images are drawn for both methods, so a shared per-image factor cancels exactly
    shared = rng.uniform(0.1, 10, 64)
    r2 = bootstrap_ratio(_table(base * shared, 0.4 * base * shared), "mse_bg", "regionroute", "base")
    assert r2[1] == pytest.approx(0.4) and r2[2] == pytest.approx(0.4)
    mean, mlo, mhi = bootstrap_means(_table(base, noisy), "base", "mse_bg")
    assert mlo < mean < mhi and mean == pytest.approx(base.mean())


def test_verdicts():
    below = Target("mse_bg", "<=", 0.5, "")
    assert judge(below, 0.3, 0.25, 0.45) == "holds"
    assert judge(below, 0.45, 0.35, 0.55) == "holds (point estimate only)"
    assert judge(below, 0.6, 0.45, 0.7) == "fails"
    within = Target("rsm_text", "within", 0.1, "")
    assert judge(within, 0.95, 0.91, 0.99) == "holds"
    assert judge(within, 0.93, 0.88, 0.97) == "holds (point estimate only)"
    assert judge(within, 0.85, 0.8, 0.9) == "fails"
    above = Target("attn_mass_in", ">=", 3.0, "")
    assert judge(above, 5.0, 4.0, 6.0) == "holds" and judge(above, 3.2, 2.9, 3.5).startswith("holds (point")
    assert judge(above, float("nan"), float("nan"), float("nan")) == "not measured"


def test_judge_targets_reads_the_per_sample_table():
    df = _table(np.linspace(1, 2, 30), 0.2 * np.linspace(1, 2, 30))
    out = judge_targets(df)
    assert set(out) == {"mse_bg"} and out["mse_bg"]["verdict"] == "holds" and out["mse_bg"]["ratio"] == 0.2
    assert {t.metric for t in TARGETS} >= {"mse_bg", "lpips_bg", "mse_fg", "rsm_text", "attn_mass_in", "q1", "q2"}
