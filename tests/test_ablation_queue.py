"""Ablations in parallel: queued DVC experiments, 2 queue workers, collected by ``regionroute ablations``.

The recipe of docs/scaling.md on the tiny configuration in a temporary git clone of HEAD:
``dvc repro infer@base infer@oracle`` (data and baselines, committed), two paper
ablation rows queued with ``dvc exp run --queue -S ...``, run by two workers (``dvc queue
start -j 2``, polled until both ended, then ``dvc queue stop``), then ``regionroute
ablations``. The workers get
``REGIONROUTE_ACCELERATE_CONFIG`` (a 1-process config over a pool of two GPU ids), so every
heavy stage inside a queue worker starts through the launcher and leases one id from the
pool (on this CPU machine the ids select nothing; on a GPU node they are the GPUs).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    ("data", "styles"): ["pixel-art", "line-art"],
    ("data", "splits"): {"train": {"coco": "train", "num": 2}, "eval": {"coco": "val", "num": 1}},
    ("stylize", "steps"): 1,
    ("train", "steps"): 2,
    ("train", "checkpoint_every"): 2,
    ("infer", "steps"): 2,
    ("infer", "attention_steps"): [1, 2],
    ("infer", "figures"): False,
}
#: one process per stage, any GPU of a pool of two (the queue recipe's config, with a 2-GPU pool)
ONE_GPU_EACH = """\
compute_environment: LOCAL_MACHINE
distributed_type: 'NO'
num_processes: 1
num_machines: 1
gpu_ids: '0,1'
mixed_precision: 'no'
"""
ABLATIONS = ("loss.cover_weight=0", "lora.single_stream=false")


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> str:
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def _start_workers(repo: Path, env: dict[str, str], log: Path) -> str:
    """``dvc queue start -j 2`` with its output in ``log``, not in pipes.

    The daemon processes it starts (each the parent of one worker) inherit its stdout and
    stderr: through pipes, reading them to the end waits for every worker to exit, and a worker
    that idles (see ``_wait_for_tasks``) never does (a CI run hung here for the whole 900 s timeout).
    """
    with log.open("w") as out:
        proc = subprocess.run(
            ["dvc", "queue", "start", "-j", "2"], cwd=repo, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=120
        )
    text = log.read_text()
    assert proc.returncode == 0, f"dvc queue start -j 2 failed:\n{text[-3000:]}"
    return text


def _wait_for_tasks(repo: Path, env: dict[str, str], n: int, timeout: float = 900) -> str:
    """Poll ``dvc queue status`` until ``n`` tasks ended (or ``timeout``); returns the last status.

    Not ``dvc exp run --run-all``, which waits for the workers to exit: with two workers a
    celery worker can miss the shutdown broadcast ("monitor: shutting down due to empty
    queue" while its task still runs) and then idles forever, seen once in CI.
    """
    deadline = time.monotonic() + timeout
    while True:
        status = _run(["dvc", "queue", "status"], repo, env)
        if status.count("Success") + status.count("Failed") >= n or time.monotonic() > deadline:
            break
        time.sleep(5)
    return status


def _stop_workers(repo: Path, env: dict[str, str], grace: float = 30) -> None:
    """``dvc queue stop --kill``; a worker still alive ``grace`` s later is killed with its process group.

    No worker left is fine: stop only ends any that still idle. The pidfiles are dvc-task's
    (``.dvc/tmp/exps/celery/dvc-exp-worker-N.pid``); each worker runs in its own process group,
    with the daemon process that holds ``dvc queue start``'s output.
    """
    subprocess.run(["dvc", "queue", "stop", "--kill"], cwd=repo, env=env, capture_output=True, timeout=120)
    deadline = time.monotonic() + grace
    for pidfile in sorted((repo / ".dvc" / "tmp" / "exps" / "celery").glob("dvc-exp-worker-*.pid")):
        pid = int(pidfile.read_text())
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(1)
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):  # it ended meanwhile
                os.killpg(os.getpgid(pid), signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.distributed
def test_queued_ablations_run_on_two_workers_and_are_collected(tmp_path):
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    repo = tmp_path / "repo"
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    env["REGIONROUTE_ACCELERATE_CONFIG"] = "none"  # the baseline: plain processes
    for var in ("LOCAL_RANK", "WORLD_SIZE", "RANK", "REGIONROUTE_LAUNCHED"):
        env.pop(var, None)
    _run(["git", "clone", "-q", str(ROOT), str(repo)], tmp_path, env)
    _run(["git", "config", "user.email", "test@example.com"], repo, env)
    _run(["git", "config", "user.name", "test"], repo, env)
    params = yaml.safe_load((repo / "configs" / "tiny.yaml").read_text())  # tiny models, whatever the default
    for (section, key), value in TINY.items():
        params[section][key] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (repo / "accelerate_queue.yaml").write_text(ONE_GPU_EACH)  # committed: a relative path works in the
    _run(["git", "add", "-A"], repo, env)  # workers' temporary workspaces
    _run(["git", "commit", "-qm", "tiny + queue accelerate config"], repo, env)
    _run(["dvc", "repro", "infer@base", "infer@oracle"], repo, env)  # data + baselines, as the recipe
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-qm", "pseudo-GT and baselines"], repo, env)

    for ablation in ABLATIONS:
        _run(["dvc", "exp", "run", "--queue", "-S", ablation], repo, env)
    workers = dict(env, REGIONROUTE_ACCELERATE_CONFIG="accelerate_queue.yaml")
    try:
        log = _start_workers(repo, workers, tmp_path / "queue-start.log")
        status = _wait_for_tasks(repo, env, len(ABLATIONS))
    finally:
        _stop_workers(repo, env)
    assert status.count("Success") == 2 and "Failed" not in status, status + log

    names = [line.split()[1] for line in status.splitlines() if line.rstrip().endswith("Success")]
    assert len(names) == 2, status
    for name in names:
        exp_log = _run(["dvc", "queue", "logs", name], repo, env)
        ran = set(re.findall(r"Running stage '([^']+)'", exp_log))
        assert ran == {"train", "infer@regionroute", "score", "report"}, exp_log[-3000:]  # never the baselines
        leased = re.findall(r"stages\.(\w+): GPU\(s\) ([01]) leased", exp_log)
        assert {stage for stage, _ in leased} == {"train", "infer", "score"}, exp_log[-3000:]

    _run(["regionroute", "ablations", "--out", "reports/ablations.md"], repo, env)
    table = (repo / "reports" / "ablations.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| experiment")]
    assert all(any(row.startswith(f"| {name} ") for row in rows) for name in names), table
    assert "loss.cover_weight" in table and "lora.single_stream" in table and "rsm_text (x base)" in table
