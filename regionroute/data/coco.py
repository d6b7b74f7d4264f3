"""Stage ``sample``: COCO image-caption pairs with one target object mask each (docs/method.md §1.1-1.2).

:func:`sample_split` visits the images with a usable instance in a seeded order, draws the target
per image from ``(seed, image_id)``, resizes and square-crops around the mask, and writes
``manifest.jsonl`` (:class:`SampleRecord`), ``stats.json`` (every image or annotation passed over, by
reason), ``images/`` and ``masks/`` atomically. Real COCO 2017 and the synthetic sets alike.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from regionroute.config import SampleConfig
from regionroute.errors import ConfigError, DataError
from regionroute.files import atomic_dir, read_image, read_json, write_image, write_json, write_jsonl, write_mask

__all__ = ["SampleRecord", "annotation_mask", "crop_square", "load_coco", "sample_split", "skip_summary"]


@dataclass(frozen=True)
class SampleRecord:
    """One line of ``manifest.jsonl`` (paths relative to the manifest's directory)."""

    id: str  # zero-padded image id, the sample's key in every later stage
    image_id: int
    split: str  # COCO split name, e.g. "train2017"
    file_name: str  # source image file in the COCO split directory
    ann_id: int
    category_id: int
    object: str  # COCO category name, e.g. "dog", "dining table"
    caption: str
    area: float  # COCO annotation area in original-image pixels (size buckets use it)
    area_frac: float  # mask area / crop area after cropping
    mask_loss: float  # fraction of the resized mask cut away by the crop
    crop: tuple[int, int, float]  # (x0, y0, scale) applied to the original image
    image: str  # "images/<id>.png"
    mask: str  # "masks/<id>.png"
    width: int
    height: int


def load_coco(instances: Path, captions: Path | None = None) -> tuple[Any, dict[int, list[str]]]:
    """Load a COCO instances file (and optional captions) with clear errors for bad files."""
    from pycocotools.coco import COCO

    data = read_json(instances)
    if not isinstance(data, dict):
        raise DataError(f"{instances}: expected a COCO object with 'images', 'annotations', 'categories'")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DataError(f"{instances}: missing or invalid '{key}' list (not a COCO instances file?)")
    for i, img in enumerate(data["images"]):
        missing = {"id", "file_name", "width", "height"} - set(img) if isinstance(img, dict) else {"everything"}
        if missing:
            raise DataError(f"{instances}: images[{i}] lacks {', '.join(sorted(missing))}")
        if not all(type(img[k]) is int and img[k] > 0 for k in ("width", "height")):
            raise DataError(f"{instances}: images[{i}]: width and height must be positive integers")
        name = img["file_name"]  # relative to the images folder, and staying in it
        if not isinstance(name, str) or not name or os.path.isabs(name) or os.path.normpath(name).startswith(".."):
            raise DataError(f"{instances}: images[{i}]: file_name {name!r} is not a path inside the images folder")
    for i, ann in enumerate(data["annotations"]):
        missing = {"id", "image_id", "category_id", "segmentation"} - set(ann) if isinstance(ann, dict) else {"all"}
        if missing:
            raise DataError(f"{instances}: annotations[{i}] lacks {', '.join(sorted(missing))}")
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco.createIndex()
    caps: dict[int, list[str]] = {}
    if captions is not None:
        cdata = read_json(captions)
        if not isinstance(cdata, dict) or not isinstance(cdata.get("annotations"), list):
            raise DataError(f"{captions}: missing or invalid 'annotations' list (not a COCO captions file?)")
        for ann in sorted(cdata["annotations"], key=lambda a: a.get("id", 0)):
            if "image_id" not in ann or not isinstance(ann.get("caption"), str):
                raise DataError(f"{captions}: caption annotation {ann.get('id', '?')} lacks image_id or caption")
            caps.setdefault(int(ann["image_id"]), []).append(ann["caption"].strip())
    return coco, caps


def _check_segmentation(ann: dict[str, Any], img: dict[str, Any], instances: Path) -> None:
    """Polygons inside the image, or an RLE of the image's size: anything else is one DataError."""
    seg, h, w = ann["segmentation"], img["height"], img["width"]
    where = f"{instances}: annotation {ann['id']} (image {img['file_name']})"
    if isinstance(seg, dict):  # RLE: rasterised at the image size
        counts = seg.get("counts")
        counts_ok = isinstance(counts, str) or (
            isinstance(counts, list) and all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts)
        )
        if seg.get("size") != [h, w] or not counts_ok:
            raise DataError(f"{where}: malformed RLE (size must be [{h}, {w}], counts a string or counts >= 0)")
        return
    if not isinstance(seg, list) or not seg:
        raise DataError(f"{where}: segmentation must be a list of polygons or an RLE")
    for poly in seg:
        try:
            xs, ys = np.asarray(poly[0::2], dtype=float), np.asarray(poly[1::2], dtype=float)
        except (TypeError, ValueError, KeyError):
            raise DataError(f"{where}: a polygon must be a list of numbers x0, y0, x1, y1, ...") from None
        if len(xs) < 3 or xs.min() < -1 or ys.min() < -1 or xs.max() > w + 1 or ys.max() > h + 1:
            raise DataError(f"{where}: polygon lies outside the {w}x{h} image or has fewer than 3 points")


def annotation_mask(coco: Any, ann: dict[str, Any], img: dict[str, Any], instances: Path) -> np.ndarray:
    """The annotation's mask ``bool (H, W)``; counts pycocotools refuses (not summing to H x W) are a DataError."""
    _check_segmentation(ann, img, instances)
    try:
        return coco.annToMask(ann).astype(bool)
    except ValueError as exc:
        raise DataError(
            f"{instances}: annotation {ann['id']} (image {img['file_name']}): malformed RLE ({exc})"
        ) from None


def crop_square(image: np.ndarray, mask: np.ndarray, resolution: int) -> tuple[np.ndarray, np.ndarray, tuple, float]:
    """Resize the short side to ``resolution`` and crop a square keeping the mask centroid inside.

    Returns ``(image (R,R,3) uint8, mask (R,R) bool, (x0, y0, scale), mask_loss)`` where
    ``mask_loss`` is the fraction of the resized mask's area that the crop cuts away.
    """
    h, w = mask.shape
    scale = resolution / min(h, w)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
    img_r = cv2.resize(image, (nw, nh), interpolation=interp)
    mask_r = cv2.resize(
        mask.astype(np.float32), (nw, nh), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    )
    mask_r = mask_r >= 0.5
    total = int(mask_r.sum())
    if total == 0:
        return img_r[:resolution, :resolution], mask_r[:resolution, :resolution], (0, 0, scale), 1.0
    ys, xs = np.nonzero(mask_r)
    cx, cy = xs.mean(), ys.mean()
    x0 = int(np.clip(round(cx - resolution / 2), 0, nw - resolution))
    y0 = int(np.clip(round(cy - resolution / 2), 0, nh - resolution))
    img_c = img_r[y0 : y0 + resolution, x0 : x0 + resolution]
    mask_c = mask_r[y0 : y0 + resolution, x0 : x0 + resolution]
    return np.ascontiguousarray(img_c), mask_c, (x0, y0, round(scale, 6)), 1.0 - float(mask_c.sum()) / total


def _annotation_skip(ann: dict[str, Any], cfg: SampleConfig, known: set[int], allowed: set[int], img: dict) -> str:
    """Why an annotation cannot be a target ("" when it can): the reasons counted in stats.json."""
    if ann.get("iscrowd", 0):
        return "crowd"
    if ann["category_id"] not in known:
        return "unknown_category"
    if ann["category_id"] not in allowed:
        return "excluded_category"
    if ann.get("area", 0) < cfg.min_area_frac * img["width"] * img["height"]:
        return "too_small"
    return ""


def _usable(coco: Any, img_id: int, cfg: SampleConfig, allowed: set[int]) -> list[dict[str, Any]]:
    img = coco.imgs[img_id]
    known = set(coco.cats)
    anns = coco.imgToAnns.get(img_id, [])
    return [a for a in sorted(anns, key=lambda a: a["id"]) if not _annotation_skip(a, cfg, known, allowed, img)]


def _skipped_annotations(coco: Any, cfg: SampleConfig, allowed: set[int]) -> Counter[str]:
    """Every annotation of the split that can never be a target, counted by reason."""
    known = set(coco.cats)
    reasons = (
        _annotation_skip(a, cfg, known, allowed, coco.imgs[a["image_id"]]) if a["image_id"] in coco.imgs
        else "unknown_image"
        for a in coco.dataset["annotations"]
    )  # fmt: skip
    return Counter(r for r in reasons if r)


def _allowed_categories(coco: Any, cfg: SampleConfig) -> set[int]:
    by_name = {c["name"]: c["id"] for c in coco.dataset["categories"]}
    for key, names in (("categories", cfg.categories), ("exclude_categories", cfg.exclude_categories)):
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise ConfigError(f"sample.{key}: unknown category {unknown[0]!r} (not in the annotation file)")
    allowed = {by_name[n] for n in cfg.categories} if cfg.categories else set(by_name.values())
    return allowed - {by_name[n] for n in cfg.exclude_categories}


def skip_summary(annotations: dict[str, int], images: dict[str, int]) -> str:
    """One line: ``annotations crowd 3, too_small 2; images crop_mask_loss 1`` (or ``none``)."""
    parts = []
    for what, counts in (("annotations", annotations), ("images", images)):
        if any(counts.values()):
            parts.append(what + " " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()) if v))
    return "; ".join(parts) or "none"


def sample_split(
    instances: Path,
    captions: Path,
    images_dir: Path,
    out_dir: Path,
    cfg: SampleConfig,
    num: int,
    split: str,
    num_key: str = "num",
) -> dict[str, Any]:
    """Sample ``num`` pairs from one COCO split into ``out_dir``; returns the stats written."""
    instances, captions, images_dir, out_dir = map(Path, (instances, captions, images_dir, out_dir))
    coco, caps = load_coco(instances, captions)
    allowed = _allowed_categories(coco, cfg)
    names = {c["id"]: c["name"] for c in coco.dataset["categories"]}
    eligible = [i for i in sorted(coco.imgs) if _usable(coco, i, cfg, allowed)]
    skipped_anns = _skipped_annotations(coco, cfg, allowed)
    if not eligible:
        raise DataError(
            f"{instances}: no image has a usable instance (non-crowd, allowed category, "
            f"area >= sample.min_area_frac of the image)"
        )
    order = np.random.default_rng(cfg.seed).permutation(len(eligible))
    records: list[SampleRecord] = []
    dropped: Counter[str] = Counter({"no_usable_instance": len(coco.imgs) - len(eligible)})
    with atomic_dir(out_dir) as tmp, tqdm(total=num, desc=f"sample {split}", unit="img") as bar:
        for idx in order:
            if len(records) == num:
                break
            img_id = eligible[idx]
            img = coco.imgs[img_id]
            image_caps = caps.get(img_id, [])
            if not image_caps:  # the paper samples image-caption pairs
                dropped["missing_caption"] += 1
                continue
            usable = _usable(coco, img_id, cfg, allowed)
            rng = np.random.default_rng([cfg.seed, img_id])
            ann = usable[int(rng.integers(len(usable)))]
            # as stored, never EXIF-rotated: COCO's annotations refer to the stored pixels
            pixels = read_image(images_dir / img["file_name"])
            if pixels.shape[:2] != (img["height"], img["width"]):
                raise DataError(
                    f"{images_dir / img['file_name']}: size {pixels.shape[1]}x{pixels.shape[0]} "
                    f"differs from {img['width']}x{img['height']} in {instances}"
                )
            mask = annotation_mask(coco, ann, img, instances)
            if not mask.any():
                dropped["empty_mask"] += 1
                continue
            crop_img, crop_mask, crop, loss = crop_square(pixels, mask, cfg.resolution)
            if loss > cfg.max_mask_loss:
                dropped["crop_mask_loss"] += 1
                continue
            sid = f"{img_id:012d}"
            write_image(tmp / "images" / f"{sid}.png", crop_img)
            write_mask(tmp / "masks" / f"{sid}.png", crop_mask)
            records.append(
                SampleRecord(
                    id=sid,
                    image_id=img_id,
                    split=split,
                    file_name=img["file_name"],
                    ann_id=int(ann["id"]),
                    category_id=int(ann["category_id"]),
                    object=names[ann["category_id"]],
                    caption=image_caps[int(rng.integers(len(image_caps)))],
                    area=float(ann.get("area", mask.sum())),
                    area_frac=round(float(crop_mask.mean()), 6),
                    mask_loss=round(loss, 6),
                    crop=crop,
                    image=f"images/{sid}.png",
                    mask=f"masks/{sid}.png",
                    width=cfg.resolution,
                    height=cfg.resolution,
                )
            )
            bar.update(1)
        dropped = +dropped  # keep positive counts only
        if len(records) < num:
            raise ConfigError(
                f"{num_key}: asked for {num} pairs but {instances} yields only {len(records)} "
                f"({len(eligible)} eligible images, {sum(dropped.values()) - dropped['no_usable_instance']} "
                f"dropped; skipped: {skip_summary(dict(skipped_anns), dict(dropped))})"
            )
        stats = {
            "split": split,
            "eligible_images": len(eligible),
            "written": len(records),
            "dropped": dict(sorted(dropped.items())),  # images passed over, by reason
            "skipped_annotations": dict(sorted(skipped_anns.items())),  # annotations that can never be targets
            "per_category": dict(sorted(Counter(r.object for r in records).items())),
        }
        write_jsonl(tmp / "manifest.jsonl", (asdict(r) for r in records))
        write_json(tmp / "stats.json", stats)
    return stats
