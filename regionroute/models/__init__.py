"""Model loading, in one place: every model reference is parsed here (:func:`parse_reference`).

A reference is ``"tiny"`` (a random model built in code, tests only), ``"toy"`` (the toy world's
trained miniature, ``toy/models/<name>``), a local directory, or a hub id ``org/name`` (weights in
the local Hugging Face cache, or network access); ``score.clip`` also takes open_clip's forms
(``parse_reference(..., open_clip=True)``). The loaders (:mod:`.kontext`, :mod:`.clip`, :mod:`.vlm`) and
``regionroute check`` read references only through it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from regionroute import REPO_ROOT
from regionroute.errors import UserError

__all__ = [
    "DTYPES",
    "REPO_ROOT",
    "TINY",
    "TOY",
    "Reference",
    "cache_dir",
    "parse_reference",
    "quiet_loading",
    "resolve_device",
    "resolve_dtype",
    "resolve_reference",
    "toy_dir",
]

TINY = "tiny"
TOY = "toy"


def toy_dir(name: str) -> Path:
    """``toy/models/<name>`` of the repository, existing or not."""
    return REPO_ROOT / "toy" / "models" / name


@dataclass(frozen=True)
class Reference:
    """A parsed model reference: its kind and where its files are."""

    kind: Literal["tiny", "toy", "dir", "hub", "open_clip"]
    text: str  # as written
    path: Path | None = None  # toy, dir: an existing directory
    repo: str | None = None  # hub: the repository id


def _is_path(ref: str) -> bool:
    """Written as a path: starts with ``.``, ``/`` or ``~``, exists, or starts with an existing directory."""
    path = Path(ref).expanduser()
    return ref.startswith((".", "/", "~")) or path.exists() or (len(path.parts) > 1 and Path(path.parts[0]).is_dir())


def parse_reference(ref: str, toy_name: str, *, open_clip: bool = False) -> Reference:
    """Parse a model reference; a reference that names no model is a one-line :class:`UserError`.

    Rules, in order:

    * ``"tiny"``: built in code, no files;
    * ``"toy"``: ``toy/models/<toy_name>`` (:func:`toy_dir`), which must exist;
    * ``open_clip`` only (``score.clip``): ``"hf-hub:org/repo"`` is a hub repository in open_clip's
      layout; a ``"<model>/<pretrained>"`` that is not a path is ``kind="open_clip"``, an architecture
      and a pretrained tag or checkpoint file (``ViT-L-14/openai``) for the caller to look up in open_clip;
    * a path -- a reference that starts with ``.``, ``/`` or ``~``, that exists, or whose first
      component is an existing directory (``models/flux`` where ``models/`` is here) -- must be an
      existing directory: ``./x`` or ``models/none`` is a missing directory, not a hub id;
    * any other ``org/name`` (one ``/``, both parts non-empty) is a hub id (``kind="hub"``); whether it
      is downloaded is for the caller (the loaders let ``from_pretrained`` look, the check looks in the cache).
    """
    if ref == TINY:
        return Reference("tiny", ref)
    if ref == TOY:
        path = toy_dir(toy_name)
        if not path.is_dir():
            raise UserError(
                f"model reference 'toy': {path} does not exist (the toy models are committed in the repository; "
                "rebuild them with `dvc repro --force toy/dvc.yaml`)"
            )
        return Reference("toy", ref, path=path)
    if open_clip and ref.startswith("hf-hub:"):
        return Reference("hub", ref, repo=ref.removeprefix("hf-hub:"))
    first, sep, rest = ref.partition("/")
    if open_clip and first and rest and not _is_path(ref):
        return Reference("open_clip", ref)
    if _is_path(ref):
        path = Path(ref).expanduser()
        if not path.exists():
            raise UserError(f"model reference {ref!r}: no such directory")
        if not path.is_dir():
            raise UserError(f"model reference {ref!r}: is a file, expected a model directory")
        return Reference("dir", ref, path=path)
    if open_clip:
        raise UserError(
            f"model reference {ref!r}: not 'tiny', 'toy', a directory, 'hf-hub:org/repo' or '<model>/<pretrained>'"
        )
    if not (first and sep and rest) or "/" in rest:
        raise UserError(f"model reference {ref!r}: no such directory, and not a hub id of the form 'org/name'")
    return Reference("hub", ref, repo=ref)


def cache_dir() -> Path:
    """Where tiny models are built: ``$XDG_CACHE_HOME/regionroute`` or ``~/.cache/regionroute``."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "regionroute"


def resolve_reference(ref: str, name: str, build: Callable[[Path], object], version: str) -> str:
    """Turn a model reference (:func:`parse_reference`) into something ``from_pretrained`` accepts.

    ``"tiny"`` builds the tiny model into the cache once (under a file lock, atomically: built in a
    temporary directory, then renamed) and returns that directory; ``"toy"`` is ``toy/models/<name>``;
    a directory is returned as is, a hub id too.
    """
    parsed = parse_reference(ref, name)
    if parsed.kind != TINY:
        return str(parsed.path) if parsed.repo is None else parsed.repo
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
