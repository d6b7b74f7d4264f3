"""regionroute.files: images read correctly or refused (issue 25, item 5); outputs follow the umask
and a killed writer's temporaries are removed by the next run (item 8)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from regionroute.edit import fit_to_area
from regionroute.errors import DataError, UserError
from regionroute.files import BACKGROUND, atomic_dir, read_image, write_image, write_json, write_jsonl, write_mask
from stages import sample
from tests.conftest import ROOT, TINY_DATA, run_stage, sample_argv


def test_16_bit_images_are_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "gray16.png")  # mode I;16
    assert Image.open(tmp_path / "gray16.png").mode == "I;16"
    rgb = read_image(tmp_path / "gray16.png")
    assert rgb.dtype == np.uint8 and rgb.shape == (1, 4, 3)
    np.testing.assert_array_equal(rgb[0, :, 0], [0, 1, 128, 255])  # round(v / 257)
    np.testing.assert_array_equal(rgb[..., 0], rgb[..., 2])
    Image.fromarray(np.array([[70000, 5]], dtype=np.int32)).save(tmp_path / "wide.tif")  # 32-bit integers
    with pytest.raises(DataError, match=r"wide\.tif: I values outside 0\.\.65535"):
        read_image(tmp_path / "wide.tif")


def test_transparent_pixels_are_composited_on_the_stated_background(tmp_path):
    rgba = np.array([[[255, 0, 0, 0], [255, 0, 0, 255], [0, 0, 0, 128]]], dtype=np.uint8)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    rgb = read_image(tmp_path / "rgba.png").astype(int)
    assert tuple(rgb[0, 0]) == BACKGROUND == (255, 255, 255)  # fully transparent: the background
    assert tuple(rgb[0, 1]) == (255, 0, 0)  # opaque: itself
    assert np.all(np.abs(rgb[0, 2] - 127) <= 1)  # half black over white
    palette = Image.fromarray(np.array([[0, 1]], dtype=np.uint8), mode="P")
    palette.putpalette([0, 255, 0, 0, 0, 255] + [0] * 762)
    palette.save(tmp_path / "p.png", transparency=0)  # palette entry 0 (green) is transparent
    np.testing.assert_array_equal(read_image(tmp_path / "p.png")[0], [BACKGROUND, (0, 0, 255)])


def _rotated_photo(path: Path) -> np.ndarray:
    """A 128 x 64 (W x H) JPEG tagged 'rotate 90 degrees clockwise to display' (EXIF orientation 6)."""
    pixels = np.zeros((64, 128, 3), np.uint8)
    pixels[:, :64] = 255  # left half white as stored
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(path, exif=exif, quality=95)
    return pixels


def test_exif_orientation_is_applied_for_photos_only(tmp_path):
    _rotated_photo(tmp_path / "photo.jpg")
    stored = read_image(tmp_path / "photo.jpg")  # dataset images: the pixels the annotations refer to
    shown = read_image(tmp_path / "photo.jpg", exif_orientation=True)  # a user's photo, as viewers show it
    assert stored.shape == (64, 128, 3) and shown.shape == (128, 64, 3)
    assert shown[:64].mean() > 200 and shown[64:].mean() < 50  # the stored left half is now on top


def test_edit_sizes_are_never_upscaled():
    assert fit_to_area(np.zeros((40, 40, 3), np.uint8), 10**6).shape == (32, 32, 3)  # down to multiples of 16
    with pytest.raises(UserError, match=r"--max-area: 256 pixels leave a 1024x64 image under 16 pixels"):
        fit_to_area(np.zeros((64, 1024, 3), np.uint8), 256)


@pytest.mark.parametrize(("umask", "file_mode", "dir_mode"), [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_outputs_get_the_mode_the_umask_gives(tmp_path, umask, file_mode, dir_mode):
    old = os.umask(umask)
    try:
        write_json(tmp_path / "a.json", {})
        with atomic_dir(tmp_path / "d") as tmp:
            (tmp / "f").write_text("x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == file_mode
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == dir_mode


_KILLED_WRITER = """
import os, sys
from pathlib import Path
from regionroute.files import atomic_dir, atomic_path
kind, path = sys.argv[1], Path(sys.argv[2])
with (atomic_dir if kind == "dir" else atomic_path)(path) as tmp:
    (tmp / "x" if kind == "dir" else tmp).write_text("half written")
    os._exit(9)  # killed: no cleanup runs
"""


def _killed_while_writing(kind: str, path: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", _KILLED_WRITER, kind, str(path)], cwd=ROOT)
    assert proc.returncode == 9 and _hidden(path.parent)  # the kill left its temporary behind


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_the_next_run_of_a_killed_stage_removes_its_temporaries(params_file, tmp_path, capsys):
    from regionroute.infer import run_method

    # a whole-directory output (atomic_dir): the sample stage
    splits = {"train": {"coco": "train", "num": 2}, "eval": {"coco": "val", "num": 1}}
    out = tmp_path / "data" / "samples"
    _killed_while_writing("dir", out)
    code, err = run_stage(sample.main, sample_argv(params_file(data={"splits": splits}), TINY_DATA, out), capsys)
    assert code == 0, err
    assert _hidden(out.parent) == []
    # one file of a resumable output (atomic_path): the oracle's image of a pair killed while being written
    rng = np.random.default_rng(0)
    for name in ("o.png", "p.png"):
        write_image(tmp_path / "eval" / name, rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    write_mask(tmp_path / "eval" / "m.png", np.ones((32, 32), bool))
    write_jsonl(tmp_path / "eval" / "manifest.jsonl", [{"id": "0_pixel-art", "sample_id": "0", "image_id": 0,
                "style": "pixel-art", "object": "dog", "original": "o.png", "mask": "m.png", "pseudo_gt": "p.png",
                "area": 1.0, "area_frac": 1.0}])  # fmt: skip
    from regionroute.config import InferConfig

    oracle = tmp_path / "oracle"
    assert run_method("oracle", tmp_path / "eval" / "manifest.jsonl", oracle, InferConfig()) == 1
    (oracle / "images" / "0_pixel-art.png").unlink()
    (oracle / "items" / "0_pixel-art.json").unlink()
    _killed_while_writing("file", oracle / "images" / "0_pixel-art.png")
    assert run_method("oracle", tmp_path / "eval" / "manifest.jsonl", oracle, InferConfig()) == 1
    assert [p.name for p in oracle.rglob(".*")] == []
