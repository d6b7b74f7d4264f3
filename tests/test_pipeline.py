"""End to end: ``dvc repro`` of the whole tiny pipeline in a temporary git clone of this repo (marker ``slow``).

The committed HEAD, switched to configs/tiny.yaml as the README documents and made smaller:
one cold ``dvc repro``, one that does nothing, one ``dvc exp run -S`` ablation (which must not
re-run the baselines), ``dvc metrics diff`` and the ablation table. What each params change
re-runs is checked statically in tests/test_dvc_graph.py.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from regionroute.files import read_json, read_jsonl

ROOT = Path(__file__).resolve().parents[1]
SMALL = {
    ("data", "styles"): ["pixel-art", "line-art"],
    ("data", "splits"): {"train": {"coco": "train", "num": 6}, "eval": {"coco": "val", "num": 3}},
    ("train", "steps"): 6,
    ("train", "checkpoint_every"): 3,
    ("infer", "steps"): 5,
    ("infer", "attention_steps"): [1, 2, 3, 4, 5],
}


def _run(args: list[str], cwd: Path) -> str:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def _ran(log: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", log))


def _edit_params(repo: Path, changes: dict[tuple[str, str], object]) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for (section, key), value in changes.items():
        params[section][key] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _tiny_clone(tmp_path: Path) -> Path:
    """A fresh clone of the committed HEAD, switched to configs/tiny.yaml (tiny models) as the README documents."""
    repo = tmp_path / "repo"
    _run(["git", "clone", "-q", str(ROOT), str(repo)], tmp_path)
    (repo / "params.yaml").write_text((repo / "configs" / "tiny.yaml").read_text())
    return repo


@pytest.mark.slow
def test_dvc_pipeline_on_the_tiny_config_in_a_fresh_clone(tmp_path):
    repo = _tiny_clone(tmp_path)
    _run(["git", "config", "user.email", "test@example.com"], repo)  # dvc exp run commits
    _run(["git", "config", "user.name", "test"], repo)
    _edit_params(repo, SMALL)
    _run(["git", "commit", "-qam", "smaller tiny run"], repo)

    log = _run(["dvc", "repro"], repo)
    stages = {"sample@train", "sample@eval", "stylize@pixel-art", "stylize@line-art", "composite", "train",
              "infer@base", "infer@regionroute", "infer@oracle", "score", "report"}  # fmt: skip
    assert _ran(log) == stages
    assert len(read_jsonl(repo / "data" / "pseudo_gt" / "train" / "manifest.jsonl")) == 6 * 2
    metrics = read_json(repo / "metrics" / "score.json")
    assert set(metrics) == {"base", "regionroute", "oracle"} and metrics["oracle"]["mse_bg"] == 0
    assert "Tiny models" in (repo / "reports" / "results" / "results.md").read_text()
    assert (repo / "dvclive" / "train" / "metrics.json").is_file()

    assert _ran(_run(["dvc", "repro"], repo)) == set()  # cached: nothing re-runs
    _run(["git", "add", "-A"], repo)
    _run(["git", "commit", "-qm", "tiny run"], repo)  # dvc.lock + metrics, as a user would

    # an ablation: only the trained model and what depends on it re-run, never the baselines
    log = _run(["dvc", "exp", "run", "-S", "loss.cover_weight=0"], repo)
    assert _ran(log) == {"train", "infer@regionroute", "score", "report"}
    diff = _run(["dvc", "metrics", "diff", "HEAD"], repo)
    assert "regionroute" in diff
    _run(["regionroute", "ablations", "--out", "reports/ablations.md"], repo)
    table = (repo / "reports" / "ablations.md").read_text()
    assert "loss.cover_weight" in table and "rsm_text (x base)" in table


@pytest.mark.slow
def test_forced_training_twice_leaves_dvc_status_clean(tmp_path):
    """`dvc repro -f -s train` twice: the same model bytes, so the stage that reads them is not changed."""
    repo = _tiny_clone(tmp_path)
    _edit_params(repo, {**SMALL, ("data", "splits"): {"train": {"coco": "train", "num": 2}, "eval": {"coco": "val",
                 "num": 1}}, ("stylize", "steps"): 2, ("train", "steps"): 2, ("infer", "steps"): 2,
                 ("infer", "attention_steps"): [1, 2]})  # fmt: skip
    # stage by stage (-s): a target's upstream reaches toy/dvc.yaml (the toy base's hour of pretraining)
    for stage in ("sample@train", "sample@eval", "stylize@pixel-art", "stylize@line-art", "composite", "train",
                  "infer@regionroute"):  # fmt: skip
        _run(["dvc", "repro", "-s", stage], repo)
    for _ in range(2):
        assert _ran(_run(["dvc", "repro", "-f", "-s", "train"], repo)) == {"train"}
        status = _run(["dvc", "status", "train", "infer@regionroute"], repo)
        assert "up to date" in status and "changed" not in status, status
