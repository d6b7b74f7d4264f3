"""The launcher (regionroute.launch): which accelerate config, GPU leases; helpers for the 2-process tests.

The other ``test_distributed_*`` modules start 2 CPU processes (gloo) with
:func:`run_launched`, through the same ``accelerate launch`` path a GPU node uses.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from regionroute import launch

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[1]

#: An accelerate config for 2 local processes. ``MULTI_GPU`` is accelerate's torchrun launcher;
#: on a machine without GPUs our process group falls back to gloo (regionroute.distributed.state).
TWO_PROCESSES = """\
compute_environment: LOCAL_MACHINE
distributed_type: MULTI_GPU
num_processes: 2
num_machines: 1
machine_rank: 0
gpu_ids: all
mixed_precision: 'no'
main_process_port: 0
"""


def child_env(config: Path | None = None) -> dict[str, str]:
    """Environment of a launched test run: CPU only, 1 thread per process, this checkout first on the path."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    for var in ("LOCAL_RANK", "WORLD_SIZE", "RANK", launch._LAUNCHED_ENV):
        env.pop(var, None)
    env[launch.CONFIG_ENV] = str(config) if config else "none"
    return env


def two_process_config(directory: Path) -> Path:
    path = directory / "accelerate_2cpu.yaml"
    path.write_text(TWO_PROCESSES)
    return path


def run_launched(module: str, argv: list[str], directory: Path, check: bool = True) -> subprocess.CompletedProcess:
    """``python -m module argv`` as 2 processes: the stage's own launcher with a 2-process accelerate config."""
    proc = subprocess.run(
        [sys.executable, "-m", module, *argv],
        cwd=ROOT,
        env=child_env(two_process_config(directory)),
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check:
        assert proc.returncode == 0, f"{module} under 2 processes failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def test_no_config_runs_in_this_process(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # no accelerate default config there
    monkeypatch.delenv(launch.CONFIG_ENV, raising=False)
    for var in ("LOCAL_RANK", "WORLD_SIZE", launch._LAUNCHED_ENV):
        monkeypatch.delenv(var, raising=False)
    assert launch.accelerate_config() is None
    seen = []
    assert launch.launch("stages.x", lambda argv: seen.append(argv) or 0, ["--a", "1"]) == 0
    assert seen == [["--a", "1"]]


def test_config_is_the_env_file_else_accelerates_default(monkeypatch, tmp_path):
    from accelerate.commands.config import config_args

    default = tmp_path / "accelerate" / "default_config.yaml"
    default.parent.mkdir()
    default.write_text(TWO_PROCESSES)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv(launch.CONFIG_ENV, raising=False)
    assert launch.accelerate_config() == default
    # the same file accelerate itself reads (its module computed the path at import, from the real HF_HOME)
    assert Path(config_args.default_config_file).name == default.name
    assert Path(config_args.cache_dir).name == default.parent.name
    other = two_process_config(tmp_path)
    monkeypatch.setenv(launch.CONFIG_ENV, str(other))
    assert launch.accelerate_config() == other
    monkeypatch.setenv(launch.CONFIG_ENV, "none")
    assert launch.accelerate_config() is None


def test_a_launched_rank_never_launches_again(monkeypatch, tmp_path):
    monkeypatch.setenv(launch.CONFIG_ENV, str(two_process_config(tmp_path)))
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert launch.launch("stages.x", lambda argv: 7, []) == 7


def test_launch_command_passes_the_stage_and_its_arguments_unchanged(tmp_path):
    cmd = launch.launch_command("stages.infer", ["--method", "base"], tmp_path / "c.yaml", ["3"])
    assert cmd[1:] == ["-m", "accelerate.commands.launch", "--config_file", str(tmp_path / "c.yaml"),
                       "--gpu_ids", "3", "-m", "stages.infer", "--method", "base"]  # fmt: skip


def test_gpu_leases_are_exclusive_and_released(tmp_path):
    first = launch.GpuLease(["0", "1", "2"], 2, lock_dir=tmp_path)
    second = launch.GpuLease(["0", "1", "2"], 1, lock_dir=tmp_path)
    third = launch.GpuLease(["0", "1", "2"], 1, lock_dir=tmp_path)
    assert first.try_acquire() and list(first.held) == ["0", "1"]
    assert second.try_acquire() and list(second.held) == ["2"]
    assert not third.try_acquire() and third.held == {}  # all taken: nothing half-held
    first.release()
    assert third.try_acquire() and list(third.held) == ["0"]
    for lease in (second, third):
        lease.release()


def test_gpu_leases_hold_across_processes(tmp_path):
    """A lease held by another process (a parallel DVC queue worker) is respected; its death frees it."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from regionroute.launch import GpuLease; "
         f"lease = GpuLease(['0', '1'], 1, lock_dir=__import__('pathlib').Path({str(tmp_path)!r})); "
         "assert lease.try_acquire(); print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, env=child_env(),
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        mine = launch.GpuLease(["0", "1"], 1, lock_dir=tmp_path)
        assert mine.try_acquire() and list(mine.held) == ["1"]
        mine.release()
        assert not launch.GpuLease(["0"], 1, lock_dir=tmp_path).try_acquire()
    finally:
        holder.kill()
        holder.wait()
    freed = launch.GpuLease(["0"], 1, lock_dir=tmp_path)
    assert freed.try_acquire()
    freed.release()


def test_more_gpus_than_usable_is_a_one_line_error(tmp_path):
    from regionroute.errors import UserError

    with pytest.raises(UserError, match="wants 4 GPUs per machine; 2 usable"):
        launch.GpuLease(["0", "1"], 4, lock_dir=tmp_path).acquire()


def test_visible_gpus_follow_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    assert launch.visible_gpus() == ["4", "5"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert launch.visible_gpus() == []
