"""How a data-parallel stage starts: in this process, or again under ``accelerate launch`` (docs/scaling.md §1).

Called by the ``__main__`` block of ``stages/{stylize,train,infer,score}.py``: with no accelerate
config (or ``REGIONROUTE_ACCELERATE_CONFIG=none``) the stage runs here; with one, it re-runs itself
under ``accelerate launch`` on GPUs leased by ``flock`` (so queued stages get disjoint GPUs).
Nothing here imports torch.
"""

from __future__ import annotations

import fcntl
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["CONFIG_ENV", "GpuLease", "accelerate_config", "launch", "launch_command", "visible_gpus"]

#: Environment variable naming the accelerate config file (or ``none``) for the stages.
CONFIG_ENV = "REGIONROUTE_ACCELERATE_CONFIG"
#: Set in the environment of the processes this module launched.
_LAUNCHED_ENV = "REGIONROUTE_LAUNCHED"


def accelerate_config() -> Path | None:
    """The accelerate config the stages launch with, or None (run in this process)."""
    chosen = os.environ.get(CONFIG_ENV, "").strip()
    if chosen.lower() == "none":
        return None
    if chosen:
        path = Path(chosen).expanduser()
        if not path.is_file():
            from regionroute.errors import UserError

            raise UserError(f"{CONFIG_ENV}={chosen}: no such accelerate config file")
        return path
    hf_home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    default = Path(hf_home).expanduser() / "accelerate" / "default_config.yaml"  # where `accelerate config` writes
    return default if default.is_file() else None


def _already_launched() -> bool:
    return os.environ.get(_LAUNCHED_ENV) == "1" or "LOCAL_RANK" in os.environ or "WORLD_SIZE" in os.environ


def visible_gpus() -> list[str]:
    """The CUDA devices this process may use, as ids for ``CUDA_VISIBLE_DEVICES`` (no torch import)."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip() and g.strip() != "-1"]
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(ln for ln in out.splitlines() if ln.startswith("GPU "))]


class GpuLease:
    """Exclusive use of ``count`` GPUs among ``candidates``: one ``flock`` per GPU, held until :meth:`release`."""

    def __init__(self, candidates: Sequence[str], count: int, lock_dir: Path | None = None) -> None:
        self.candidates, self.count = list(candidates), count
        self.lock_dir = lock_dir or Path(tempfile.gettempdir()) / f"regionroute-gpu-leases-{os.getuid()}"
        self.held: dict[str, int] = {}  # gpu id -> open, locked file descriptor

    def try_acquire(self) -> bool:
        """Take ``count`` free GPUs now (lowest ids first), or none."""
        self.lock_dir.mkdir(parents=True, exist_ok=True)
        for gpu in self.candidates:
            if len(self.held) == self.count:
                break
            fd = os.open(self.lock_dir / f"gpu-{re.sub(r'[^A-Za-z0-9_.-]', '_', gpu)}.lock", os.O_RDWR | os.O_CREAT)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                continue
            self.held[gpu] = fd
        if len(self.held) < self.count:
            self.release()
            return False
        return True

    def acquire(self, poll_s: float = 10.0, log: Callable[[str], None] | None = None) -> list[str]:
        """Block until ``count`` GPUs are free; returns their ids."""
        if self.count > len(self.candidates):
            from regionroute.errors import UserError

            raise UserError(f"the accelerate config wants {self.count} GPUs per machine; {len(self.candidates)} usable")
        waiting = False
        while not self.try_acquire():
            if not waiting and log is not None:
                log(f"waiting for {self.count} free GPU(s) among {','.join(self.candidates)} (others are leased)")
            waiting = True
            time.sleep(poll_s)
        return list(self.held)

    def release(self) -> None:
        for fd in self.held.values():
            os.close(fd)  # closing the descriptor drops its flock
        self.held = {}


def _read_config(path: Path) -> dict[str, Any]:
    import yaml

    raw = yaml.safe_load(path.read_text()) if path.suffix in (".yaml", ".yml") else None
    if raw is None and path.suffix == ".json":
        import json

        raw = json.loads(path.read_text())
    return raw if isinstance(raw, dict) else {}


def launch_command(module: str, argv: Sequence[str], config: Path, gpu_ids: Sequence[str] = ()) -> list[str]:
    """The ``accelerate launch`` command line running ``python -m module argv`` with ``config``."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    if gpu_ids:
        cmd += ["--gpu_ids", ",".join(gpu_ids)]
    return [*cmd, "-m", module, *argv]


def launch(module: str, main: Callable[[list[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Run a stage's ``main`` here, or under ``accelerate launch`` when the machine has a config (see above)."""
    from regionroute.errors import UserError

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        config = None if _already_launched() else accelerate_config()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if config is None:
        return main(argv)
    settings = _read_config(config)
    lease = None
    if not settings.get("use_cpu", False):
        gpus = visible_gpus()
        wanted = str(settings.get("gpu_ids") or "all")
        if wanted != "all":
            gpus = [g.strip() for g in wanted.split(",") if g.strip()]
        if gpus:
            machines = max(1, int(settings.get("num_machines") or 1))
            lease = GpuLease(gpus, max(1, int(settings.get("num_processes") or 1) // machines))
            try:
                gpus = lease.acquire(log=lambda msg: print(f"{module}: {msg}", file=sys.stderr, flush=True))
            except UserError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 2
            print(f"{module}: GPU(s) {','.join(gpus)} leased", file=sys.stderr, flush=True)
    cmd = launch_command(module, argv, config, gpus if lease else ())
    try:
        return subprocess.run(cmd, env=dict(os.environ, **{_LAUNCHED_ENV: "1"}), check=False).returncode
    finally:
        if lease is not None:
            lease.release()
