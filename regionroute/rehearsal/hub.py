"""A Hugging Face hub cache written by hand, in the layout ``huggingface_hub`` itself writes.

Used by the rehearsal (:mod:`regionroute.rehearsal.standins`) to put stand-in models where the
paper run's loaders look (``HF_HUB_CACHE``): ``models--<org>--<name>/refs/main`` holds the commit,
``snapshots/<commit>/<path>`` are relative symlinks to ``blobs/<etag>``, the etag being the
sha256 of a Git LFS file (weights, tokenizer models) or the git blob sha1 of a small text file, as
on the hub. :func:`verify_cache` reads the cache back with ``huggingface_hub.scan_cache_dir``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

__all__ = ["LFS_SUFFIXES", "repo_folder", "verify_cache", "write_snapshot"]

#: Files the hub stores through Git LFS (their etag is the content's sha256).
LFS_SUFFIXES: tuple[str, ...] = (".safetensors", ".bin", ".pt", ".pth", ".model", ".msgpack")
_LFS_MIN_BYTES = 10 * 2**20  # and any file this large


def repo_folder(cache: Path, repo_id: str) -> Path:
    """``<cache>/models--<org>--<name>`` (huggingface_hub's naming)."""
    return Path(cache) / ("models--" + repo_id.replace("/", "--"))


def _etag(path: Path) -> str:
    size = path.stat().st_size
    lfs = path.suffix in LFS_SUFFIXES or size >= _LFS_MIN_BYTES
    h = hashlib.sha256() if lfs else hashlib.sha1(f"blob {size}\0".encode())
    with path.open("rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def write_snapshot(cache: Path, repo_id: str, files: Path) -> Path:
    """Move every file below ``files`` into ``cache`` as one snapshot of ``repo_id``; returns the snapshot dir.

    The commit id is a digest of the paths and etags, so the same files give the same commit.
    """
    entries = sorted((p.relative_to(files).as_posix(), p) for p in Path(files).rglob("*") if p.is_file())
    etags = {rel: _etag(p) for rel, p in entries}
    commit = hashlib.sha1("".join(f"{rel}\0{etags[rel]}\n" for rel, _ in entries).encode()).hexdigest()
    root = repo_folder(cache, repo_id)
    snapshot = root / "snapshots" / commit
    for rel, path in entries:
        blob = root / "blobs" / etags[rel]
        blob.parent.mkdir(parents=True, exist_ok=True)
        if blob.exists():
            path.unlink()
        else:
            shutil.move(path, blob)
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(commit)  # no newline, as huggingface_hub writes it
    return snapshot


def verify_cache(cache: Path) -> list[str]:
    """Repositories ``huggingface_hub.scan_cache_dir`` finds in ``cache``; raises if it reports a broken entry."""
    from huggingface_hub import scan_cache_dir

    info = scan_cache_dir(cache)
    if info.warnings:
        raise RuntimeError(f"{cache}: not a valid Hugging Face cache ({info.warnings[0]})")
    return sorted(r.repo_id for r in info.repos)
