"""Where a model's files are, found without downloading anything (``regionroute check``).

:class:`FileSource`: a local directory, or a hub repository looked up in the local Hugging Face
cache (``huggingface_hub.try_to_load_from_cache``: files on disk only, never the network).
Used by :mod:`regionroute.check.models` (which files are missing, and :func:`fetch_command`, the
command that fetches them) and :mod:`regionroute.check.configs` (the configs of the configured models).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from regionroute.models import Reference

__all__ = [
    "GATED",
    "OPEN_CLIP_WEIGHTS",
    "FileSource",
    "fetch_command",
    "hf_cli",
    "login_command",
    "missing_pipeline_files",
    "missing_weights",
    "open_clip_weights",
]

#: Hub repositories whose licence must be accepted on their page before a download works.
GATED: frozenset[str] = frozenset({"black-forest-labs/FLUX.1-Kontext-dev"})

#: Weight files a loader accepts, most preferred first: (single file, sharded index).
_WEIGHTS: dict[str, tuple[tuple[str, str], ...]] = {
    "diffusers": (
        ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json"),
        ("diffusion_pytorch_model.bin", "diffusion_pytorch_model.bin.index.json"),
    ),
    "transformers": (
        ("model.safetensors", "model.safetensors.index.json"),
        ("pytorch_model.bin", "pytorch_model.bin.index.json"),
    ),
}
#: Files open_clip's ``local-dir:`` / ``hf-hub:`` loaders look for (open_clip.factory).
OPEN_CLIP_WEIGHTS: tuple[str, ...] = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
    "open_clip_pytorch_model.pth",
)


@dataclass(frozen=True)
class FileSource:
    """A directory of model files: a local directory, or one hub repository in the local HF cache."""

    root: Path | None = None  # local directory
    repo: str | None = None  # hub repository id
    cache_dir: Path | None = None  # HF hub cache (None: huggingface_hub's default)

    @classmethod
    def of(cls, ref: Reference, cache_dir: Path | None = None) -> FileSource:
        """The files of a parsed ``toy``, directory or hub reference (:func:`regionroute.models.parse_reference`)."""
        return cls(repo=ref.repo, cache_dir=cache_dir) if ref.kind == "hub" else cls(root=ref.path)

    @property
    def cache_root(self) -> str:
        """The Hugging Face hub cache this source looks in."""
        from huggingface_hub import constants

        return str(self.cache_dir or constants.HF_HUB_CACHE)

    @property
    def where(self) -> str:
        """How to name this source in a message."""
        return str(self.root) if self.root is not None else f"{self.repo} in the Hugging Face cache ({self.cache_root})"

    def path(self, rel: str) -> Path | None:
        """The file on disk, or None when absent (nothing is downloaded)."""
        if self.root is not None:
            p = self.root / rel
            return p if p.is_file() else None
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(self.repo, rel, cache_dir=self.cache_dir)
        return Path(found) if isinstance(found, str) else None

    def read_json(self, rel: str) -> Any:
        """Parsed JSON file, or None when absent or unreadable."""
        p = self.path(rel)
        if p is None:
            return None
        try:
            return json.loads(p.read_text())
        except (OSError, ValueError):
            return None


def missing_weights(src: FileSource, folder: str, library: str) -> list[str]:
    """Missing weight files of one model folder ("" = the root): the first layout found decides."""
    prefix = f"{folder}/" if folder else ""
    for single, index in _WEIGHTS[library]:
        if src.path(prefix + single) is not None:
            return []
        meta = src.read_json(prefix + index)
        if isinstance(meta, dict) and isinstance(meta.get("weight_map"), dict):
            shards = sorted(set(meta["weight_map"].values()))
            return [prefix + s for s in shards if src.path(prefix + s) is None]
    return [prefix + _WEIGHTS[library][0][0]]


def missing_pipeline_files(src: FileSource) -> list[str]:
    """Files a diffusers pipeline directory lacks for ``from_pretrained`` (``model_index.json`` first)."""
    index = src.read_json("model_index.json")
    if not isinstance(index, dict):
        return ["model_index.json"]
    missing: list[str] = []
    for name, spec in sorted(index.items()):
        if name.startswith("_") or not isinstance(spec, list) or len(spec) != 2 or spec[0] is None:
            continue
        library, cls = spec
        if "Scheduler" in str(cls):
            needed = [f"{name}/scheduler_config.json"]
        elif "Tokenizer" in str(cls):
            needed = [f"{name}/tokenizer_config.json"]
        else:
            needed = [f"{name}/config.json"]
            if src.path(needed[0]) is not None:
                # transformers models save model.safetensors; diffusers models, and the ModelMixin
                # classes of other modules (the toy VAE, regionroute.toy.latent), diffusion_pytorch_model
                missing += missing_weights(src, name, "transformers" if library == "transformers" else "diffusers")
        missing += [f for f in needed if src.path(f) is None]
    return missing


def open_clip_weights(name: str, pretrained: str) -> tuple[str, tuple[str, ...]] | Path | None:
    """Where open_clip fetches ``<name>/<pretrained>`` from: ``(hub repo, candidate files)``, or its URL cache file.

    Reads open_clip's pretrained registry only (as ``open_clip.pretrained.download_pretrained``
    does with a hub available: the hub entry wins over the URL). None for an unknown tag.
    """
    import os

    import open_clip

    cfg = open_clip.get_pretrained_cfg(name, pretrained)
    if not cfg:
        return None
    if cfg.get("file"):
        return Path(cfg["file"])
    if cfg.get("hf_hub"):
        repo, filename = os.path.split(cfg["hf_hub"])  # "org/model/" (trailing slash): the default file
        filename = filename or "open_clip_pytorch_model.bin"
        files = [filename]
        if filename == "open_clip_pytorch_model.bin":  # open_clip tries the safetensors twin first
            files.insert(0, "open_clip_model.safetensors")
        elif filename.endswith((".bin", ".pth")):
            files.insert(0, filename[:-4] + ".safetensors")
        return repo, tuple(files)
    url = cfg.get("url", "")
    return Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(url) if url else None


def hf_cli() -> str:
    """The download CLI the installed huggingface_hub provides: ``hf`` (>= 0.34) or ``huggingface-cli``."""
    import huggingface_hub

    major, minor = (int(p) for p in huggingface_hub.__version__.split(".")[:2])
    return "hf" if (major, minor) >= (0, 34) else "huggingface-cli"


def login_command() -> str:
    return "hf auth login" if hf_cli() == "hf" else "huggingface-cli login"


def fetch_command(repo: str, files: tuple[str, ...] = (), include: tuple[str, ...] = ()) -> str:
    """The command that puts ``repo`` (or some of its files) into the local Hugging Face cache."""
    parts = [hf_cli(), "download", repo, *files]
    if include:
        parts += ["--include", *(f'"{p}"' for p in include)]
    cmd = " ".join(parts)
    if repo in GATED:
        cmd = f"accept the licence on https://huggingface.co/{repo} (gated), `{login_command()}`, then `{cmd}`"
    else:
        cmd = f"`{cmd}`"
    return cmd
