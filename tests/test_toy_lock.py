"""The committed toy world is up to date: ``toy/dvc.lock`` matches the code, params and outputs in git.

A stale toy stage would be rebuilt by any ``dvc repro`` or ``dvc exp run`` of the main pipeline
(the VLM judge alone takes about 25 minutes on 2 cores); this fails first, naming the stages.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def stale_toy_stages(root: Path) -> dict:
    """``dvc status toy/dvc.yaml`` of the repository at ``root``: stage name -> what changed ({} when none)."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        status = repo.status(targets=[str(root / "toy" / "dvc.yaml")])
    return {key.rsplit(":", 1)[-1]: value for key, value in status.items()}  # keys: <path of dvc.yaml>:<stage>


def test_the_committed_toy_world_matches_its_lock() -> None:
    stale = stale_toy_stages(ROOT)
    assert not stale, f"toy/dvc.lock is stale, rebuild with `dvc repro toy/dvc.yaml` and commit: {stale}"


def test_a_changed_toy_dependency_is_reported(tmp_path: Path) -> None:
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    with (clone / "regionroute" / "toy" / "vlm.py").open("a") as fh:
        fh.write("# a change\n")
    stale = stale_toy_stages(clone)
    assert set(stale) == {"vlm", "vlm_accuracy"}, stale  # the stages that import regionroute/toy/vlm.py
