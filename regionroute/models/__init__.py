"""Model loading, in one place: every model reference is resolved here.

A reference is one of:

* ``"tiny"``: a random model built in code, saved once to the cache and loaded back
  through ``from_pretrained`` (unit tests only: its outputs are noise);
* ``"toy"``: the toy world's trained miniature, committed in the repository under
  ``toy/models/<name>`` (built by ``toy/dvc.yaml``), loaded as a local directory;
* a local directory;
* a hub id (which needs the weights in the local Hugging Face cache, or network access).

Kontext, CLIP, LPIPS and the VLM judge follow the same rules.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch

from regionroute.errors import UserError

__all__ = [
    "DTYPES",
    "REPO_ROOT",
    "TINY",
    "TOY",
    "cache_dir",
    "quiet_loading",
    "resolve_device",
    "resolve_dtype",
    "resolve_reference",
    "toy_dir",
]

TINY = "tiny"
TOY = "toy"
#: The repository checkout this package lives in (the toy models and params.yaml are there).
REPO_ROOT = Path(__file__).resolve().parents[2]


def toy_dir(name: str) -> Path:
    """``toy/models/<name>`` of the repository; a missing one is a one-line :class:`UserError`."""
    path = REPO_ROOT / "toy" / "models" / name
    if not path.is_dir():
        raise UserError(
            f"model reference 'toy': {path} does not exist (the toy models are committed in the repository; "
            "rebuild them with `dvc repro --force toy/dvc.yaml`)"
        )
    return path


def cache_dir() -> Path:
    """Where tiny models are built: ``$XDG_CACHE_HOME/regionroute`` or ``~/.cache/regionroute``."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "regionroute"


def resolve_reference(ref: str, name: str, build: Callable[[Path], object], version: str) -> str:
    """Turn a model reference into something ``from_pretrained`` accepts.

    ``"tiny"`` builds the tiny model into the cache once (under a file lock, atomically:
    built in a temporary directory, then renamed) and returns that directory; ``"toy"`` is the
    repository's ``toy/models/<name>``; a local directory is returned as is; anything
    else is taken as a hub id.
    """
    if ref == TOY:
        return str(toy_dir(name))
    if ref == TINY:
        target = cache_dir() / f"tiny-{name}-v{version}"
        if not (target / ".complete").is_file():
            from filelock import FileLock

            from regionroute.files import atomic_dir

            target.parent.mkdir(parents=True, exist_ok=True)
            # concurrent first uses (queued workers on a fresh machine): one process builds, the others
            # wait and find it complete; nobody replaces a directory another process is reading
            with FileLock(target.with_name(target.name + ".lock")):
                if not (target / ".complete").is_file():
                    with atomic_dir(target) as tmp:
                        build(tmp)
                        (tmp / ".complete").write_text("ok\n")
        return str(target)
    path = Path(ref).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"model reference {ref!r}: is a file, expected a model directory")
        return str(path)
    if ref.startswith((".", "/", "~")) or ref.count("/") != 1:
        raise UserError(f"model reference {ref!r}: no such directory, and not a hub id of the form 'org/name'")
    return ref


def quiet_loading() -> None:
    """Turn off diffusers'/transformers' per-component loading bars (stage logs keep our own bars)."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.disable_progress_bar()
    tlog.disable_progress_bar()


def resolve_device(device: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; asking for CUDA without one is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("models.device: 'cuda' requested but no CUDA device is available")
    return torch.device(device)


DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str) -> torch.dtype:
    """Map a params dtype string to a torch dtype (half precision on CPU is allowed but slow)."""
    return DTYPES[dtype]
