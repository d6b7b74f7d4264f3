"""``regionroute rehearse``: ``configs/paper.yaml`` end to end on CPU, at 1024 px, through the hub cache layout.

:func:`rehearse` copies the repository, writes stand-ins of the paper's models into a Hugging Face cache
and a COCO-2017-layout dataset, sets ``params.yaml`` to the paper config changed only by :data:`CHANGES`,
then runs ``regionroute check``, ``dvc repro`` (``train`` killed after its first checkpoint and resumed),
``regionroute edit`` and :mod:`.verify`: one PASS/FAIL line per check, each process's peak RSS
(docs/pipeline.md, "Dress rehearsal").
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from regionroute.errors import UserError

__all__ = ["CHANGES", "Check", "rehearse", "write_params"]

#: What the rehearsal changes in configs/paper.yaml: counts and device, nothing else (1024 px, bf16,
#: gradient checkpointing, the T5 lengths and vlm_max_pixels stay the paper's).
CHANGES: dict[str, Any] = {
    "models": {"device": "cpu"},
    "data": {"splits": {"train": {"num": 2}, "eval": {"num": 1}}},
    "stylize": {"steps": 2},
    "train": {"steps": 2, "gradient_accumulation": 2, "checkpoint_every": 1, "log_every": 1},
    "infer": {"steps": 2, "attention_steps": [1, 2]},
    "score": {"device": "cpu"},
}
#: ``dvc repro`` of dvc.yaml's stages alone: the toy world's pipeline (toy/dvc.yaml) is upstream of the GPU
#: stages through their deps on toy/models/*, though the paper configuration loads no toy model.
REPRO = ("dvc", "repro", "--single-item", "dvc.yaml")


@dataclass(frozen=True)
class Check:
    """One pass/fail line of the rehearsal."""

    name: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"{'PASS' if self.ok else 'FAIL'} {self.name}: {self.detail}"


def _merge(base: Any, changes: dict[str, Any]) -> None:
    for key, value in changes.items():
        if isinstance(value, dict):
            _merge(base[key], value)
        else:
            base[key] = value


def write_params(paper: Path, out: Path) -> None:
    """``out`` = ``paper`` with :data:`CHANGES` applied (comments kept)."""
    from ruamel.yaml import YAML

    yaml = YAML()
    params = yaml.load(paper.read_text())
    _merge(params, CHANGES)
    with out.open("w") as fh:
        yaml.dump(params, fh)


def _copy_repo(src: Path, dst: Path) -> None:
    """The repository's files (tracked and untracked-not-ignored) into ``dst``, committed as in a clone."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=src, check=True, capture_output=True,
    ).stdout.decode().split("\0")  # fmt: skip
    for rel in filter(None, listed):
        if (src / rel).is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / rel, dst / rel, follow_symlinks=False)
    git = {"GIT_AUTHOR_NAME": "rehearsal", "GIT_AUTHOR_EMAIL": "rehearsal@regionroute.local"}
    env = {**os.environ, **git, "GIT_COMMITTER_NAME": "rehearsal", "GIT_COMMITTER_EMAIL": git["GIT_AUTHOR_EMAIL"]}
    for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "the repository, as cloned"]):
        subprocess.run(["git", *cmd], cwd=dst, env=env, check=True)


def _env(work: Path) -> dict[str, str]:
    """The environment of every command: the stand-ins' cache, offline, one process, the RSS hook."""
    hook = Path(__file__).with_name("rss_hook")
    return {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(hook),
        "REGIONROUTE_RSS_LOG": str(work / "rss.jsonl"),
        "HF_HOME": str(work / "hf"),
        "HF_HUB_CACHE": str(work / "hf" / "hub"),
        "HF_HUB_OFFLINE": "1",
        "REGIONROUTE_ACCELERATE_CONFIG": "none",
        "DVC_NO_ANALYTICS": "1",
        "TQDM_MININTERVAL": "30",
    }


def _run(cmd: list[str], cwd: Path, env: dict[str, str], log: Path) -> tuple[int, str]:
    """Run ``cmd``; its output goes to ``log``; returns (exit code, output)."""
    with log.open("w") as fh:
        code = subprocess.run(cmd, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT).returncode
    return code, log.read_text()


def _tail(text: str, n: int = 3) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines()[-n:])


def _check_findings(repo: Path, env: dict[str, str], logs: Path) -> Check:
    """``regionroute check`` on the rehearsal's params: nothing wrong but, at most, device and memory."""
    code, out = _run([sys.executable, "-m", "regionroute.cli", "check", "--json"], repo, env, logs / "check.log")
    try:
        findings = json.loads(out[out.index("{") :])["findings"]
    except (ValueError, KeyError):
        return Check("regionroute check", False, f"exit {code}, no JSON report: {_tail(out)}")
    device_keys = {"stylize", "train", "infer", "score", "models.device", "score.device"}
    bad = [f["line"] for f in findings if f["level"] == "error" and f["key"] not in device_keys]
    levels = Counter(f["level"] for f in findings)
    detail = ", ".join(f"{n} {level}" for level, n in sorted(levels.items()))
    detail += f"; {len(bad)} not device/memory: {bad[0]}" if bad else "; no model, data or setting error"
    return Check("regionroute check", not bad, detail)


def _interrupted_repro(repo: Path, env: dict[str, str], log: Path) -> tuple[int, dict[str, Any] | None]:
    """``dvc repro`` with the train stage killed (SIGKILL) once its first checkpoint is complete."""
    import psutil

    ckpt_dir = repo / "checkpoints" / "train"
    killed = None
    with log.open("w") as fh:
        proc = subprocess.Popen(list(REPRO), cwd=repo, env=env, stdout=fh, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            done = sorted(ckpt_dir.glob("step-*/state.json"))
            if killed is None and done:
                for child in psutil.Process(proc.pid).children(recursive=True):
                    try:
                        cmdline = " ".join(child.cmdline())
                    except psutil.Error:  # exited meanwhile
                        continue
                    if "stages.train" in cmdline:
                        st = done[0].stat()
                        child.kill()
                        killed = {"checkpoint": done[0].parent.name, "inode": st.st_ino, "mtime": st.st_mtime_ns}
            time.sleep(0.2)
    return proc.returncode, killed


def _pipeline(repo: Path, env: dict[str, str], logs: Path) -> list[Check]:
    """The two ``dvc repro`` runs (interrupted, resumed) and their checks."""
    code, killed = _interrupted_repro(repo, env, logs / "repro-1.log")
    out = (logs / "repro-1.log").read_text()
    checks = [Check("train killed after its first checkpoint", killed is not None and code != 0,
                    f"killed after {killed['checkpoint']}, dvc repro exit {code}" if killed
                    else f"no checkpoint seen before the end (exit {code}): {_tail(out)}")]  # fmt: skip
    code, out = _run(list(REPRO), repo, env, logs / "repro-2.log")
    checks.append(Check("dvc repro", code == 0, "exit 0" if code == 0 else f"exit {code}: {_tail(out, 6)}"))
    if killed is not None:
        state = repo / "checkpoints" / "train" / killed["checkpoint"] / "state.json"
        kept = state.is_file() and (state.stat().st_ino, state.stat().st_mtime_ns) == (killed["inode"], killed["mtime"])
        metrics = repo / "dvclive" / "train" / "metrics.json"
        step = json.loads(metrics.read_text()).get("step") if metrics.is_file() else None
        ok = kept and step == CHANGES["train"]["steps"] and "starting from scratch" not in out
        detail = f"resumed from {killed['checkpoint']} (kept as written before the kill), logged up to step {step}"
        checks.append(Check("train resumed", ok, detail if ok else f"not resumed: kept={kept}, step={step}"))
    code, out = _run(["dvc", "status", "--json", "dvc.yaml"], repo, env, logs / "status.log")
    stale = json.loads(out[out.index("{") :]) if "{" in out else None
    detail = "dvc status: dvc.yaml's stages up to date" if stale == {} else f"dvc status: {_tail(out)}"
    checks.append(Check("every stage finished", code == 0 and stale == {}, detail))
    return checks


def _edit(repo: Path, work: Path, env: dict[str, str], logs: Path) -> Check:
    """``regionroute edit`` of a 640x480 COCO JPEG with the trained model, as the README writes it (no --dtype)."""
    from PIL import Image

    from regionroute.rehearsal.coco import EDIT_IMAGE

    split, image_id, width, height, _, objects = EDIT_IMAGE
    image = repo / "data" / "coco" / split / f"{image_id:012d}.jpg"
    out = work / "edit.png"
    cmd = [sys.executable, "-m", "regionroute.cli", "edit", str(image), "--object", objects[0][0],
           "--style", "pixel-art", "--model", "models/regionroute", "--out", str(out), "--steps", "2",
           "--attention-png", str(work / "edit_attention.png")]  # fmt: skip
    code, text = _run(cmd, repo, env, logs / "edit.log")
    size = Image.open(out).size if code == 0 and out.is_file() else None
    ok = size == (width, height)
    return Check("regionroute edit", ok, f"{width}x{height} JPEG -> {out.name} {size}" if ok else _tail(text))


def _stage_name(argv: list[str]) -> str:
    """A process's name in the RSS table: the DVC stage (``infer@regionroute``) or the command."""
    script = Path(argv[0]).stem if argv else "?"
    for stage, flag in (("sample", "--split"), ("stylize", "--style"), ("infer", "--method")):
        if script == stage and flag in argv:
            return f"{stage}@{argv[argv.index(flag) + 1]}"
    if script == "cli" and len(argv) > 1:
        return f"regionroute {argv[1]}"
    return script


def rss_table(log: Path) -> list[str]:
    """One line per recorded process (DVC's own excluded): name, wall time, peak RSS."""
    rows = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
    lines = []
    for row in rows:
        name = _stage_name(row["argv"])
        if name != "dvc":
            lines.append(f"  {name:<24} {row['seconds']:>7.1f} s  peak RSS {row['peak_rss'] / 2**30:6.2f} GiB")
    return lines


def rehearse(keep: Path | None = None, src: Path | None = None, say: Any = print) -> bool:
    """Run the rehearsal in ``keep`` (kept) or a temporary directory; returns whether every check passed."""
    from regionroute.models import REPO_ROOT

    src = Path(src or REPO_ROOT)
    if keep is not None and keep.exists() and any(keep.iterdir()):
        raise UserError(f"--keep: {keep} is not empty")
    work = Path(keep or tempfile.mkdtemp(prefix="regionroute-rehearsal-")).resolve()
    start, load = time.time(), os.getloadavg()
    repo, logs = work / "repo", work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    _copy_repo(src, repo)
    from regionroute.rehearsal.coco import write_coco
    from regionroute.rehearsal.standins import write_standins

    commits = write_standins(work / "hf" / "hub")
    write_coco(repo / "data" / "coco")
    write_params(repo / "configs" / "paper.yaml", repo / "params.yaml")
    say(f"rehearsal in {work}: stand-ins {', '.join(commits)}; set up in {time.time() - start:.0f} s")
    env = _env(work)
    checks = [_check_findings(repo, env, logs)]
    checks += _pipeline(repo, env, logs)
    checks.append(_edit(repo, work, env, logs))
    code, out = _run([sys.executable, "-m", "regionroute.rehearsal.verify"], repo, env, logs / "verify.log")
    for line in out.splitlines():
        if line.startswith(("PASS ", "FAIL ")):
            name, _, detail = line[5:].partition(": ")
            checks.append(Check(name, line.startswith("PASS"), detail))
    if code and not any(not c.ok for c in checks):
        checks.append(Check("verify", False, f"exit {code}: {_tail(out)}"))
    for check in checks:
        say(check.line())
    say("peak RSS per process (VmHWM at exit):")
    for line in rss_table(work / "rss.jsonl"):
        say(line)
    passed = sum(c.ok for c in checks)
    end_load = os.getloadavg()
    say(f"rehearsal: {passed}/{len(checks)} checks passed in {time.time() - start:.0f} s "
        f"(load average {load[0]:.2f} at start, {end_load[0]:.2f} at end; logs in {logs})")  # fmt: skip
    if keep is None and passed == len(checks):
        shutil.rmtree(work, ignore_errors=True)
    return passed == len(checks)
