"""Every model reference of ``configs/paper.yaml`` as a stand-in in a Hugging Face hub cache.

Used by :func:`regionroute.rehearsal.run.rehearse`: :func:`write_standins` builds each repository's
files (:mod:`.kontext`, :mod:`.judges`) in a scratch directory and moves them into ``cache`` in the
hub's layout (:mod:`.hub`), then reads the cache back with ``huggingface_hub.scan_cache_dir``.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

__all__ = ["write_standins"]


def write_standins(cache: Path, seed: int = 0) -> dict[str, str]:
    """Write the stand-ins into ``cache`` (``HF_HUB_CACHE``); returns repository -> snapshot commit."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    from regionroute.rehearsal.hub import verify_cache, write_snapshot
    from regionroute.rehearsal.judges import QWEN_REPO, clip_repo, write_clip, write_qwen
    from regionroute.rehearsal.kontext import KONTEXT_REPO, write_kontext

    for log in (dlog, tlog):  # the stand-ins' loading bars and "cast with to()" notes
        log.disable_progress_bar()
        log.set_verbosity_error()
    builders = {KONTEXT_REPO: write_kontext, clip_repo()[0]: write_clip, QWEN_REPO: write_qwen}
    commits = {}
    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".build-") as scratch, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for repo, build in builders.items():
            files = build(Path(scratch) / repo.replace("/", "--"), seed=seed)
            commits[repo] = write_snapshot(cache, repo, files).name
    found = verify_cache(cache)
    if found != sorted(builders):
        raise RuntimeError(f"{cache}: scan_cache_dir finds {found}, expected {sorted(builders)}")
    return commits
