"""Atomic writes and validated reads of images, masks and JSON/JSONL manifests.

Every stage writes through these helpers so that an interrupted or failed stage
never leaves a file that looks complete: data goes to a temporary file in the
same directory, then ``os.replace`` renames it into place.
"""

from __future__ import annotations

import errno
import glob
import json
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from regionroute.errors import DataError, UserError

__all__ = [
    "BACKGROUND",
    "MAX_IMAGE_PIXELS",
    "atomic_dir",
    "atomic_path",
    "check_writable",
    "image_format",
    "prepare_resumable_dir",
    "read_image",
    "read_json",
    "read_jsonl",
    "read_mask",
    "write_image",
    "write_json",
    "write_jsonl",
    "write_mask",
]


#: errno values of a write the user can fix (permissions, a full or read-only disk, a file where a folder goes)
_WRITE_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EFBIG,
                           errno.ENOTDIR, errno.EEXIST, errno.EISDIR})  # fmt: skip


@contextmanager
def _writing(path: Path) -> Iterator[None]:
    """An OSError the user can fix while writing ``path`` is one :class:`UserError` naming it."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in _WRITE_ERRNOS:
            raise
        raise UserError(f"{path}: cannot write ({exc.strerror})") from None


def _temp_prefix(path: Path) -> str:
    """Hidden, next to ``path``, naming the writing process: ``.<name>.partial-<pid>-``."""
    return f".{path.name}.partial-{os.getpid()}-"


def _remove_leftovers(path: Path) -> None:
    """Delete temporaries of ``path`` that a killed process left (its pid is gone); live writers' stay."""
    stem = f".{path.name}.partial-"
    for old in path.parent.glob(glob.escape(stem) + "*"):
        pid = old.name[len(stem) :].split("-", 1)[0]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _publish(tmp: Path, path: Path, mode: int) -> None:
    """Rename ``tmp`` onto ``path`` with ``mode`` less the umask (mkstemp / mkdtemp make 0600 / 0700)."""
    umask = os.umask(0o077)  # read it (os.getumask is Python 3.13+); briefly the stricter 077
    os.umask(umask)
    os.chmod(tmp, mode & ~umask)
    os.replace(tmp, path)


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` on success.

    Temporaries a killed writer of ``path`` left are removed first; the file gets the mode
    the umask gives new files; a permission or disk-full error is one line naming ``path``.
    """
    path = Path(path)
    with _writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_leftovers(path)
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp" + path.suffix, dir=path.parent)
        os.close(fd)
    tmp_path = Path(tmp)
    try:
        with _writing(path):
            yield tmp_path
            _publish(tmp_path, path, 0o666)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary directory; it replaces ``path`` (whole) on success.

    As :func:`atomic_path`: a killed writer's temporary directories are removed first, the
    directory gets the umask's mode, and failing to create it is one line naming ``path``.
    """
    path = Path(path)
    with _writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_leftovers(path)
        tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), dir=path.parent))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        with _writing(path):
            _publish(tmp, path, 0o777)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented, key-sorted JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_jsonl(path: str | os.PathLike[str], rows: Iterable[dict[str, Any]]) -> None:
    """Write one JSON object per line, atomically."""
    with atomic_path(path) as tmp, tmp.open("w") as fh:
        for row in rows:
            fh.write(json.dumps(row, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike[str]) -> Any:
    """Read a JSON file; a missing or malformed file is a :class:`DataError`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: malformed JSON ({exc})") from None


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read a JSONL manifest; reports the first bad line by number."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found (did the stage that writes it finish?)")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{n}: malformed JSON line ({exc})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


#: The most pixels an image may have; larger ones are refused before decoding (a decompression
#: bomb: a few KB of PNG that would fill the memory). 8192 x 8192, below Pillow's own guard.
MAX_IMAGE_PIXELS = 8192 * 8192
#: Transparent pixels are composited on this colour (the same rule for every image read here).
BACKGROUND = (255, 255, 255)
_HIGH_BIT_DEPTH = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _load(path: Path, what: str, exif_orientation: bool = False) -> Image.Image:
    """Decode ``path`` with Pillow: a missing, corrupt or over-large file is one :class:`DataError`."""
    if not path.is_file():
        raise DataError(f"{path}: {what} file not found")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if im.width * im.height > MAX_IMAGE_PIXELS:  # checked on the header, before decoding
                    raise Image.DecompressionBombError(f"{im.width}x{im.height}")
                im.load()
                return ImageOps.exif_transpose(im) if exif_orientation else im
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise DataError(
            f"{path}: more than {MAX_IMAGE_PIXELS} pixels (regionroute.files.MAX_IMAGE_PIXELS, the decompression-bomb "
            "limit); make it smaller"
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: cannot read {what} ({exc})") from None


def _rgb8(path: Path, im: Image.Image) -> np.ndarray:
    """``uint8 (H, W, 3)``: 16-bit values scaled (not clipped), transparency composited on BACKGROUND."""
    if im.mode in _HIGH_BIT_DEPTH:  # 16-bit grayscale (a 32-bit "I" image must hold 16-bit values)
        values = np.asarray(im, dtype=np.int64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise DataError(f"{path}: {im.mode} values outside 0..65535 (save it as an 8- or 16-bit image)")
        gray = ((values * 255 + 32767) // 65535).astype(np.uint8)  # round(v / 257): 65535 -> 255
        return np.repeat(gray[..., None], 3, axis=2)
    if im.mode == "F":
        raise DataError(f"{path}: floating-point pixels are not read (save it as an 8- or 16-bit image)")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        back = Image.new("RGBA", im.size, (*BACKGROUND, 255))
        return np.asarray(Image.alpha_composite(back, im.convert("RGBA")).convert("RGB"), dtype=np.uint8).copy()
    return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()


def read_image(path: str | os.PathLike[str], *, exif_orientation: bool = False) -> np.ndarray:
    """Read an image as ``uint8`` RGB ``(H, W, 3)``; missing, corrupt or too large files are a DataError.

    16-bit images are scaled to 8 bits; transparent pixels are composited on :data:`BACKGROUND`
    (white); more than :data:`MAX_IMAGE_PIXELS` pixels is refused. ``exif_orientation``: apply
    the EXIF orientation tag (a user's photo, as viewers show it); dataset images are read as
    stored, since their annotations refer to the stored pixels.
    """
    path = Path(path)
    return _rgb8(path, _load(path, "image", exif_orientation))


def read_mask(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a binary mask PNG as ``bool (H, W)`` (nonzero = inside)."""
    path = Path(path)
    return np.asarray(_load(path, "mask").convert("L")) > 127


def image_format(path: str | os.PathLike[str]) -> str:
    """The Pillow format that ``path``'s suffix names (``.png`` -> ``PNG``); another suffix is a UserError."""
    fmt = Image.registered_extensions().get(Path(path).suffix.lower())
    if fmt is None or fmt not in Image.SAVE:
        raise UserError(f"{path}: not an image file name (give it a suffix such as .png or .jpg)")
    return fmt


def check_writable(path: str | os.PathLike[str]) -> None:
    """Fail now, in one line naming ``path``, when its folder (or the nearest existing one) cannot be written."""
    path = Path(path)
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    with _writing(path):
        if not folder.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        tempfile.TemporaryFile(dir=folder).close()


def write_image(path: str | os.PathLike[str], image: np.ndarray | Image.Image) -> None:
    """Write an RGB image atomically; the format follows the suffix (PNG recommended)."""
    fmt = image_format(path)
    pil = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))
    with atomic_path(path) as tmp:
        pil.save(tmp, format=fmt)


def write_mask(path: str | os.PathLike[str], mask: np.ndarray) -> None:
    """Write a boolean mask as an 8-bit PNG (0 / 255), atomically."""
    write_image(path, Image.fromarray(np.where(np.asarray(mask, dtype=bool), 255, 0).astype(np.uint8), mode="L"))


def prepare_resumable_dir(path: str | os.PathLike[str], fingerprint: dict[str, Any]) -> Path:
    """Create ``path`` for a resumable stage output keyed by ``fingerprint``.

    ``fingerprint`` holds content keys (see :mod:`regionroute.fingerprint`), never paths
    or counts. Content written under another fingerprint (other params, model, code or
    inputs), or with none, is deleted with one line saying which part changed: a resumed
    run never mixes results of two configurations.
    """
    path = Path(path)
    fp_path = path / "fingerprint.json"
    fingerprint = json.loads(json.dumps(fingerprint, sort_keys=True))  # tuples -> lists, as read back
    if path.exists():
        old = read_json(fp_path) if fp_path.is_file() else None
        if old != fingerprint:
            if old is None:
                why = "no fingerprint"
            else:
                keys = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
                why = "changed: " + ", ".join(keys)
            print(f"{path}: kept results do not match ({why}); starting from scratch", file=sys.stderr)
            shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    write_json(fp_path, fingerprint)
    return path
