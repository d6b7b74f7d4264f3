"""End to end: ``dvc repro`` of the demo pipeline in a temporary git clone of this repo.

Tests the committed HEAD (what CI and a newcomer get). Slow (a few minutes on 2 cores)
but part of the default run.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from regionroute.io import read_jsonl

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], cwd: Path) -> str:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def _ran(log: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", log))


@pytest.mark.slow
def test_dvc_repro_on_the_demo_in_a_fresh_clone(tmp_path):
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    repo = tmp_path / "repo"
    _run(["git", "clone", "-q", str(ROOT), str(repo)], tmp_path)
    _run(["git", "config", "user.email", "test@example.com"], repo)  # dvc exp run commits
    _run(["git", "config", "user.name", "test"], repo)
    styles = yaml.safe_load((repo / "params.yaml").read_text())["data"]["styles"]

    log = _run(["dvc", "repro"], repo)
    assert {"sample@train", "sample@eval", "composite"} | {f"stylize@{s}" for s in styles} <= _ran(log)
    records = read_jsonl(repo / "data" / "pseudo_gt" / "train" / "records.jsonl")
    num = yaml.safe_load((repo / "params.yaml").read_text())["data"]["splits"]["train"]["num"]
    assert len(records) == num * len(styles)

    assert _ran(_run(["dvc", "repro"], repo)) == set()  # cached: nothing re-runs

    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["composite"]["method"] = "alpha"
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert _ran(_run(["dvc", "repro"], repo)) == {"composite"}  # a composite-only param
    methods = {r["composite_method"] for r in read_jsonl(repo / "data" / "pseudo_gt" / "train" / "records.jsonl")}
    assert methods <= {"alpha", "empty"}
    _run(["git", "checkout", "--", "params.yaml"], repo)

    log = _run(["dvc", "exp", "run", "-S", "data.splits.eval.num=4"], repo)
    assert "sample@eval" in _ran(log) and "sample@train" not in _ran(log)
    shown = _run(["dvc", "exp", "show", "--no-pager", "--csv"], repo)
    assert "data.splits.eval.num" in shown
