"""Stages ``stylize`` (tiny Kontext, resumable) and ``composite`` (seamless clone edge cases)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from regionroute.composite import composite_pair
from regionroute.config import CompositeConfig
from regionroute.files import read_image, read_jsonl, read_mask
from stages import composite, sample, stylize
from tests.conftest import TINY_DATA, killed_after_the_first_item, run_stage, sample_argv

SMALL = {"splits": {"train": {"coco": "train", "num": 3}, "eval": {"coco": "val", "num": 2}}}


@pytest.fixture
def samples(params_file, tmp_path, capsys) -> tuple[Path, Path]:
    params = params_file(data={**SMALL, "styles": ["pixel-art", "line-art"]}, stylize={"steps": 2, "batch_size": 2})
    for split, coco in (("train", "train"), ("eval", "val")):
        code, err = run_stage(
            sample.main, sample_argv(params, TINY_DATA, tmp_path / "samples" / split, split, coco), capsys
        )
        assert code == 0, err
    return params, tmp_path / "samples"


def _stylize(params: Path, samples: Path, out: Path, style: str, capsys) -> tuple[int, str]:
    argv = ["--params", str(params), "--style", style, "--samples", str(samples), "--out", str(out)]
    return run_stage(stylize.main, argv, capsys)


def test_stylize_writes_one_image_per_sample_and_resumes(samples, tmp_path, capsys):
    params, sdir = samples
    out = tmp_path / "stylized" / "pixel-art"
    code, err = _stylize(params, sdir, out, "pixel-art", capsys)
    assert code == 0, err
    for split, n in (("train", 3), ("eval", 2)):
        rows = read_jsonl(out / split / "manifest.jsonl")
        assert len(rows) == n
        for r in rows:
            assert read_image(out / split / r["stylized"]).shape == (128, 128, 3)
    # interrupted run: one image and the manifests missing -> only its batch (ids 0-1 of 3, batch 2) is regenerated
    images = sorted((out / "train" / "images").iterdir())
    victim, kept = images[0], images[2]
    before = kept.stat().st_mtime_ns
    reference = victim.read_bytes()
    victim.unlink()
    (out / "train" / "manifest.jsonl").unlink()
    code, err = _stylize(params, sdir, out, "pixel-art", capsys)
    assert code == 0, err
    assert kept.stat().st_mtime_ns == before and victim.read_bytes() == reference
    assert len(read_jsonl(out / "train" / "manifest.jsonl")) == 3


def test_a_run_killed_mid_batch_resumes_to_the_bytes_of_an_uninterrupted_run(samples, tmp_path, capsys, monkeypatch):
    params, sdir = samples
    assert _stylize(params, sdir, tmp_path / "straight", "pixel-art", capsys)[0] == 0
    with killed_after_the_first_item(monkeypatch):
        _stylize(params, sdir, tmp_path / "killed", "pixel-art", capsys)
    assert len(list((tmp_path / "killed").rglob("images/*.png"))) == 1  # killed inside the first batch of 2
    assert _stylize(params, sdir, tmp_path / "killed", "pixel-art", capsys)[0] == 0
    straight = sorted((tmp_path / "straight").rglob("images/*.png"))
    assert len(straight) == 5
    for path in straight:
        resumed = tmp_path / "killed" / path.relative_to(tmp_path / "straight")
        assert resumed.read_bytes() == path.read_bytes(), path.name


def test_stylize_fingerprint_change_restarts(samples, tmp_path, capsys, params_file):
    params, sdir = samples
    out = tmp_path / "st"
    assert _stylize(params, sdir, out, "pixel-art", capsys)[0] == 0
    img = sorted((out / "train" / "images").iterdir())[0]
    a = read_image(img)
    other = params_file(data={**SMALL, "styles": ["pixel-art", "line-art"]}, stylize={"steps": 2, "seed": 7})
    assert _stylize(other, sdir, out, "pixel-art", capsys)[0] == 0
    assert not np.array_equal(a, read_image(img))


def test_stylize_recomputes_exactly_the_batches_whose_input_pixels_changed(samples, tmp_path, capsys):
    from regionroute.files import write_image

    params, sdir = samples
    out = tmp_path / "st"
    assert _stylize(params, sdir, out, "pixel-art", capsys)[0] == 0
    images = sorted((out / "train" / "images").iterdir())
    stamps = {p.name: p.stat().st_mtime_ns for p in images}
    rows = sorted(read_jsonl(sdir / "train" / "manifest.jsonl"), key=lambda r: r["id"])
    changed = sdir / "train" / rows[0]["image"]  # same path and manifest, new pixels
    write_image(changed, 255 - read_image(changed))
    code, err = _stylize(params, sdir, out, "pixel-art", capsys)
    assert code == 0, err
    batch = {r["id"] for r in rows[:2]}  # the changed image's batch (batch_size 2, ids in order)
    for p in images:
        assert (p.stat().st_mtime_ns != stamps[p.name]) == (p.stem in batch), p.name
    # the kept images are what a from-scratch run gives
    fresh = tmp_path / "fresh"
    assert _stylize(params, sdir, fresh, "pixel-art", capsys)[0] == 0
    for p in images:
        assert p.read_bytes() == (fresh / "train" / "images" / p.name).read_bytes(), p.name


def test_stylize_unknown_style_is_one_line(samples, tmp_path, capsys):
    params, sdir = samples
    code, err = _stylize(params, sdir, tmp_path / "x", "watercolour", capsys)
    assert code == 2 and err.strip() == "error: --style: unknown style 'watercolour' (data.styles: pixel-art, line-art)"
    assert not (tmp_path / "x").exists()


def test_composite_stage_writes_records(samples, tmp_path, capsys):
    params, sdir = samples
    for style in ("pixel-art", "line-art"):
        assert _stylize(params, sdir, tmp_path / "stylized" / style, style, capsys)[0] == 0
    out = tmp_path / "pgt"
    argv = [
        "--params",
        str(params),
        "--samples",
        str(sdir),
        "--stylized",
        str(tmp_path / "stylized"),
        "--out",
        str(out),
    ]
    code, err = run_stage(composite.main, argv, capsys)
    assert code == 0, err
    rows = read_jsonl(out / "train" / "manifest.jsonl")
    assert len(rows) == 3 * 2 and len(read_jsonl(out / "eval" / "manifest.jsonl")) == 2 * 2
    for r in rows:
        assert r["instruction"] == f"make the {r['object']} into {r['style']} style"
        original, mask = read_image(out / "train" / r["original"]), read_mask(out / "train" / r["mask"])
        pgt = read_image(out / "train" / r["pseudo_gt"])
        np.testing.assert_array_equal(pgt[~mask], original[~mask])  # background untouched
        assert r["composite_method"] in {"seamless", "alpha_fallback"}
    # missing stylized input: clear error naming the file, no output
    (tmp_path / "stylized" / "line-art" / "eval" / "manifest.jsonl").unlink()
    code, err = run_stage(composite.main, [*argv[:-1], str(tmp_path / "pgt2")], capsys)
    assert code == 2 and "line-art/eval/manifest.jsonl: file not found" in err
    assert not (tmp_path / "pgt2").exists()


def _pair(mask_box: tuple[int, int, int, int] | None, size: int = 64):
    rng = np.random.default_rng(0)
    original = np.full((size, size, 3), 120, np.uint8)
    stylized = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
    mask = np.zeros((size, size), bool)
    if mask_box:
        y0, y1, x0, x1 = mask_box
        mask[y0:y1, x0:x1] = True
    return original, stylized, mask


@pytest.mark.parametrize("box", [(20, 40, 20, 44), (0, 30, 0, 20), (40, 64, 50, 64), (0, 64, 0, 64)])
def test_seamless_clone_handles_interior_and_border_masks(box):
    original, stylized, mask = _pair(box)
    out, method = composite_pair(original, stylized, mask, CompositeConfig(method="seamless"))
    assert method == "seamless" and out.shape == original.shape
    np.testing.assert_array_equal(out[~mask], original[~mask])
    assert np.abs(out[mask].astype(int) - original[mask]).mean() > 5  # the stylized content arrived


def test_empty_mask_and_alpha_and_fallback(monkeypatch):
    original, stylized, mask = _pair(None)
    out, method = composite_pair(original, stylized, mask, CompositeConfig())
    assert method == "empty"
    np.testing.assert_array_equal(out, original)
    original, stylized, mask = _pair((10, 30, 10, 30))
    out, method = composite_pair(original, stylized, mask, CompositeConfig(method="alpha", feather=0.0))
    assert method == "alpha"
    np.testing.assert_array_equal(out[mask], stylized[mask])
    np.testing.assert_array_equal(out[~mask], original[~mask])

    def broken(*args, **kwargs):
        raise cv2.error("simulated failure")

    monkeypatch.setattr(cv2, "seamlessClone", broken)
    out, method = composite_pair(original, stylized, mask, CompositeConfig(method="seamless"))
    assert method == "alpha_fallback"
