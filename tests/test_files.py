"""regionroute.files: images read correctly or refused (issue 25, item 5)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from regionroute.edit import fit_to_area
from regionroute.errors import DataError, UserError
from regionroute.files import BACKGROUND, read_image


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
