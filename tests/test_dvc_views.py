"""What a user reads after `dvc repro`: `dvc metrics show` (the experiment's two files, short) and `dvc plots show`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from dvc.repo import Repo

from regionroute.report import METHODS_CSV, method_means
from regionroute.score import SUMMARY_COLUMNS, summarize
from regionroute.targets import TARGETS

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT_METRICS = {"metrics/score.json", "metrics/targets.json"}


def _dvc(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    return subprocess.run(["dvc", *args], cwd=cwd, env=env, capture_output=True, text=True)


def test_metrics_files_are_only_the_experiments_own():
    """dvclive's summary and the toy models' build figures are outputs, not metrics (nor is anything else)."""
    with Repo(str(ROOT)) as repo:
        declared = {o.def_path for s in repo.index.stages for o in s.outs if o.metric}
        outs = {o.def_path for s in repo.index.stages for o in s.outs}
    assert declared == EXPERIMENT_METRICS
    assert {"dvclive/train/metrics.json", "toy/metrics/judge.json", "toy/metrics/base.json"} <= outs
    proc = _dvc(["metrics", "show", "--json"], ROOT)  # the committed files, as a user's clone shows them
    assert proc.returncode == 0, proc.stderr
    shown = json.loads(proc.stdout)
    assert {path for rev in shown.values() for path in rev["data"]} == EXPERIMENT_METRICS


def _per_sample(methods: tuple[str, ...] = ("base", "regionroute", "oracle"), n: int = 4) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = [{"method": m, "sample_id": f"{i:03d}", "id": f"{i:03d}_pixel-art",
             **{c: float(rng.random()) for c in (*SUMMARY_COLUMNS, "psnr_bg", "attn_iou", "mse_bg_piebench")}}
            for m in methods for i in range(n)]  # fmt: skip
    df = pd.DataFrame(rows)
    df.loc[df["method"] == "oracle", ["attn_mass_in", "attn_iou"]] = np.nan  # no attention maps
    return df


def test_score_json_carries_per_method_only_the_figures_a_user_compares():
    assert {t.metric for t in TARGETS} <= set(SUMMARY_COLUMNS)
    summary = summarize(_per_sample())
    assert set(summary["regionroute"]) == {"n", *SUMMARY_COLUMNS}
    assert set(summary["oracle"]) == {"n", *SUMMARY_COLUMNS} - {"attn_mass_in"}


def test_plots_define_the_training_curves_and_a_bar_chart_per_target():
    with Repo(str(ROOT)) as repo:  # the toy models' build curves are outputs, not on the page
        assert {o.def_path for s in repo.index.stages for o in s.outs if o.plot} == {"dvclive/train/plots/metrics"}
    raw = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    assert raw["stages"]["train"]["plots"] == [{"dvclive/train/plots/metrics": {"x": "step", "cache": False}}]
    bars = {}
    for entry in raw["plots"]:
        if isinstance(entry, dict):
            ((name, spec),) = entry.items()
            bars[spec["x"]] = (name, spec)
    assert set(bars) == {t.metric for t in TARGETS}
    for metric, (_, spec) in bars.items():
        assert spec == {"template": "bar_horizontal", "x": metric, "y": {f"reports/results/{METHODS_CSV}": "method"}}
    assert "reports/results/figures" in raw["plots"]


def test_dvc_plots_show_renders_curves_and_target_bars(tmp_path):
    """`dvc plots show` in a scratch repository with this dvc.yaml, tiny curves and a methods.csv from the report."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(ROOT / name, repo / name)
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    assert _dvc(["init", "-q"], repo).returncode == 0
    curves = repo / "dvclive" / "train" / "plots" / "metrics" / "train"
    curves.mkdir(parents=True)
    for term in ("focus", "mass_inside"):
        (curves / f"{term}.tsv").write_text(f"step\t{term}\n1\t0.5\n2\t0.4\n3\t0.3\n")
    report = repo / "reports" / "results"
    (report / "figures").mkdir(parents=True)
    shutil.copy(ROOT / "reports" / "toy" / "base.png", report / "figures" / "grid.png")
    method_means(_per_sample()).to_csv(report / METHODS_CSV, float_format="%.6g")

    proc = _dvc(["plots", "show", "--json"], repo)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert not out.get("errors"), out["errors"]
    shown = out["data"]
    assert "dvclive/train/plots/metrics/train/mass_inside.tsv" in shown
    assert "reports/results/figures/grid.png" in shown
    for t in TARGETS:
        (plot,) = shown[f"{t.metric} per method"]
        spec = plot["content"]
        assert spec["mark"]["type"] == "bar" and spec["encoding"]["x"]["field"] == t.metric
        assert {row["method"] for row in spec["data"]["values"]} == {"base", "regionroute", "oracle"}
    assert _dvc(["plots", "show", "-o", "page"], repo).returncode == 0  # the page a user opens
    page = (repo / "page" / "index.html").read_text()
    assert "mass_inside" in page and "q2 per method" in page


@pytest.mark.parametrize("target", [t.metric for t in TARGETS])
def test_methods_csv_is_the_per_method_mean(target):
    df = _per_sample()
    means = method_means(df)
    assert list(means.index) == ["base", "regionroute", "oracle"]
    expected = df[df["method"] == "regionroute"][target].mean()
    assert means.loc["regionroute", target] == pytest.approx(expected)
