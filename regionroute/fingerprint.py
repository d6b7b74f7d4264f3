"""Content keys for everything resumable: bytes, tensors, params, model files and code, never paths or counts.

Used by ``stylize``, ``train``, ``infer`` and the toy base through :class:`ItemStore` (one key per
output item) and :func:`regionroute.files.prepare_resumable_dir` (one key per directory). A
stage's code key covers exactly the code its ``dvc.yaml`` entry depends on
(:func:`stage_code_digest`). docs/method.md §2, "Reproducible and resumable".
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch

from regionroute import REPO_ROOT
from regionroute.files import read_json, write_json

__all__ = [
    "ItemStore",
    "code_digest",
    "file_digest",
    "json_digest",
    "library_versions",
    "model_digest",
    "pending_batches",
    "stage_code_digest",
    "stage_code_files",
    "tensor_digest",
    "tree_digest",
]

T = TypeVar("T")
_CHUNK = 1 << 20
# (path, size, mtime_ns, inode) -> sha256: a file is read once per process however often it is keyed.
_FILE_MEMO: dict[tuple[str, int, int, int], str] = {}


def json_digest(obj: Any) -> str:
    """sha256 of the canonical JSON of ``obj`` (sorted keys; tuples as lists)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def file_digest(path: str | os.PathLike[str]) -> str:
    """sha256 of a file's bytes."""
    path = Path(path)
    st = path.stat()
    memo_key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
    if memo_key not in _FILE_MEMO:
        h = hashlib.sha256()
        with path.open("rb") as fh:
            while block := fh.read(_CHUNK):
                h.update(block)
        _FILE_MEMO[memo_key] = h.hexdigest()
    return _FILE_MEMO[memo_key]


def tree_digest(root: str | os.PathLike[str], exclude: Iterable[str] = (".complete",)) -> str:
    """sha256 over the relative paths and bytes of every file below ``root`` (hidden files skipped)."""
    root = Path(root)
    skip = set(exclude)
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel in skip or any(part.startswith(".") for part in Path(rel).parts):
            continue
        h.update(rel.encode() + b"\0" + file_digest(path).encode() + b"\n")
    return h.hexdigest()


def model_digest(source: str) -> str:
    """Content key of a resolved model reference (a directory, or a hub id)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return "dir:" + tree_digest(path)
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(source, "model_index.json")
    except Exception:  # an unusual id or cache layout: fall back to the id (still no path or count)
        cached = None
    if isinstance(cached, str):
        return f"hub:{source}@{Path(cached).parent.name}"  # .../snapshots/<commit>/model_index.json
    return f"hub:{source}@unresolved"


def library_versions() -> dict[str, str]:
    """Versions of the libraries whose numerics a result depends on."""
    import diffusers
    import peft
    import transformers

    return {
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }


def stage_code_files(stage: str, pipeline: str = "dvc.yaml") -> list[Path]:
    """The code a DVC stage depends on: its ``deps`` under ``regionroute/`` and ``stages/`` (folders expanded).

    ``pipeline`` is relative to the repository root; ``foreach`` stages share one deps list.
    """
    import yaml

    spec = yaml.safe_load((REPO_ROOT / pipeline).read_text())["stages"][stage]
    deps = (spec.get("do") or spec)["deps"]
    files: set[Path] = set()
    for dep in deps:
        if not isinstance(dep, str) or not dep.startswith(("regionroute/", "stages/")):
            continue
        path = REPO_ROOT / dep
        files.update(path.rglob("*.py") if path.is_dir() else [path])
    return sorted(files)


def code_digest(files: Iterable[Path]) -> str:
    """sha256 of source files (path below the repository root + bytes) and of the library versions."""
    h = hashlib.sha256()
    for f in sorted(files):
        h.update(f"{Path(f).resolve().relative_to(REPO_ROOT).as_posix()}\0".encode() + file_digest(f).encode() + b"\n")
    h.update(json_digest(library_versions()).encode())
    return h.hexdigest()


def stage_code_digest(stage: str, pipeline: str = "dvc.yaml") -> str:
    """:func:`code_digest` of a stage's code deps: what the stage scripts key their resumable outputs on."""
    return code_digest(stage_code_files(stage, pipeline))


def tensor_digest(tensors: dict[str, torch.Tensor | tuple | list]) -> str:
    """sha256 of named tensors' dtypes, shapes and bytes (other values by their JSON)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        value = tensors[name]
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous()
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)}\0".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        else:
            h.update(f"{name}:{json_digest(value)}\0".encode())
    return h.hexdigest()


class ItemStore:
    """Per-item content keys of a resumable output directory.

    ``done(id, key)`` is true when the item's marker holds ``key`` (and its files were
    therefore completely written for exactly these inputs); ``mark(id, key)`` is called
    after the item's files; ``prune(ids, subdirs)`` deletes the files and markers of
    items that are no longer asked for.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.markers = self.root / "items"

    def done(self, item_id: str, key: str, files: Iterable[str] = ()) -> bool:
        """The item was completed for ``key`` and its ``files`` (relative to the root) all exist."""
        marker = self.markers / f"{item_id}.json"
        if not marker.is_file() or read_json(marker).get("key") != key:
            return False
        return all((self.root / f).is_file() for f in files)

    def mark(self, item_id: str, key: str) -> None:
        write_json(self.markers / f"{item_id}.json", {"key": key})

    def prune(self, keep: Iterable[str], subdirs: Iterable[str]) -> int:
        """Remove outputs (``<subdir>/<id>.*``) and markers of ids not in ``keep``; returns how many."""
        keep = set(keep)
        removed = 0
        for sub in [*subdirs, "items"]:
            folder = self.root / sub
            if not folder.is_dir():
                continue
            for f in folder.iterdir():
                if f.is_file() and f.name.split(".", 1)[0] not in keep:
                    f.unlink()
                    removed += sub == "items"
        return removed


def pending_batches(items: Sequence[T], batch_size: int, done: Callable[[T], bool]) -> list[list[T]]:
    """The batches of ``items`` (consecutive, ``batch_size`` each) that hold an item not ``done``.

    Which batch an item belongs to is a function of the whole ordered item list and the batch
    size alone, never of what is already done: an item's output is NOT independent of its
    batch mates (batched kernels round differently for another batch size; the tiny Kontext
    gives pixels off by 1), so a resumed run regenerates every unfinished batch whole, with the
    mates the uninterrupted run gave it, and writes the same bytes. Ranks take whole batches.
    """
    batches = [list(items[i : i + batch_size]) for i in range(0, len(items), batch_size)]
    return [batch for batch in batches if not all(done(item) for item in batch)]
