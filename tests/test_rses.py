"""Known-answer tests of the RSES components and COCO size buckets (docs/method.md section 7).

Tiny offline models: the tiny open_clip CLIP and LPIPS with a random AlexNet trunk
(calibrated linear layers from the lpips package). Values are meaningless as quality
scores; the tests check the geometry (crop, background, averaging) and the orderings
that hold for any LPIPS-like distance.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from regionroute.errors import DataError, UserError
from regionroute.metrics.rses import (
    CLIP_MEAN_RGB,
    PSNR_MAX,
    RSES_COLUMNS,
    RSESScorer,
    background_mask,
    pixel_metrics,
    region_crop,
)
from regionroute.metrics.size import add_size_bucket, original_area, size_bucket, stratify


@pytest.fixture(scope="module")
def scorer() -> RSESScorer:
    return RSESScorer("tiny", "tiny", device="cpu", dilate=5, batch_size=2)


def _image(h: int, w: int, seed: int) -> np.ndarray:
    """A smooth-ish random RGB image (blocky noise upsampled), values in [30, 220]."""
    rng = np.random.default_rng(seed)
    small = rng.integers(30, 221, size=(h // 8 + 1, w // 8 + 1, 3))
    return np.kron(small, np.ones((8, 8, 1)))[:h, :w].astype(np.uint8)


def _rect(h: int, w: int, top: int, left: int, bottom: int, right: int) -> np.ndarray:
    mask = np.zeros((h, w), dtype=bool)
    mask[top:bottom, left:right] = True
    return mask


def test_clip_mean_colour_is_openai_mean() -> None:
    from open_clip import OPENAI_DATASET_MEAN

    assert tuple(round(m * 255) for m in OPENAI_DATASET_MEAN) == CLIP_MEAN_RGB


def test_region_crop_box_and_fill() -> None:
    image = np.random.default_rng(0).integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
    mask = _rect(20, 30, 4, 10, 10, 14) | _rect(20, 30, 8, 14, 10, 18)  # an L shape
    mask[6, 12] = False  # a hole
    crop, box = region_crop(image, mask)
    assert box == (4, 10, 10, 18)
    assert crop.shape == (6, 8, 3) and crop.dtype == np.uint8
    sub = mask[4:10, 10:18]
    np.testing.assert_array_equal(crop[sub], image[4:10, 10:18][sub])
    assert (crop[~sub] == np.array(CLIP_MEAN_RGB, dtype=np.uint8)).all()
    assert (~sub).sum() > 10  # the fill really was exercised

    square, _ = region_crop(image, mask, square=True)
    assert square.shape == (8, 8, 3)
    np.testing.assert_array_equal(square[1:7], crop)  # centred: one fill row above and below
    assert (square[[0, 7]] == np.array(CLIP_MEAN_RGB, dtype=np.uint8)).all()

    with pytest.raises(DataError, match="empty"):
        region_crop(image, np.zeros((20, 30), dtype=bool))


def test_background_mask_dilation_is_euclidean() -> None:
    mask = np.zeros((21, 21), dtype=bool)
    mask[10, 10] = True
    bg = background_mask(mask, dilate=3)
    assert (~bg).sum() == 29  # lattice points within distance 3 of the centre
    assert not bg[10, 13] and bg[10, 14]
    assert not bg[12, 12] and bg[13, 12]  # sqrt(8) <= 3 < sqrt(13)
    np.testing.assert_array_equal(background_mask(mask, dilate=0), ~mask)
    assert background_mask(np.zeros((5, 5), dtype=bool)).all()


def test_pixel_metrics_known_values() -> None:
    source = _image(40, 48, seed=1)
    mask = _rect(40, 48, 10, 10, 25, 30)
    bg = background_mask(mask, dilate=2)
    shifted = source + np.uint8(10)  # every pixel +10/255, no clipping (values <= 220)
    m = pixel_metrics(shifted, source, bg)
    mse = (10 / 255) ** 2
    assert m["mse_bg"] == pytest.approx(mse, rel=1e-9)
    assert m["psnr_bg"] == pytest.approx(10 * math.log10(1 / mse), rel=1e-9)
    assert m["bg_fraction"] == pytest.approx(bg.mean())
    assert m["mse_bg_piebench"] == pytest.approx(mse * bg.mean(), rel=1e-9)  # masked, averaged over all pixels

    same = pixel_metrics(source, source, bg)
    assert same["mse_bg"] == 0 and same["psnr_bg"] == PSNR_MAX and same["ssim_bg"] == pytest.approx(1.0)
    assert math.isnan(pixel_metrics(source, source, np.zeros_like(bg))["mse_bg"])


def test_oracle_background_scores_zero_and_global_edit_scores_worse(scorer: RSESScorer) -> None:
    h, w = 128, 128
    source = _image(h, w, seed=2)
    mask = _rect(h, w, 56, 56, 72, 72)
    oracle = source.copy()
    oracle[mask] = 255 - oracle[mask]  # only the object changes
    shifted = np.clip(source.astype(int) + 40, 0, 255).astype(np.uint8)  # colour shift everywhere
    noise = np.random.default_rng(3).integers(-40, 41, size=source.shape)
    noised = np.clip(source.astype(int) + noise, 0, 255).astype(np.uint8)  # noise everywhere
    df = scorer.score([source, oracle, shifted, noised], [source] * 4, [mask] * 4, ["pixel-art"] * 4)
    same, orc, *global_edits = (df.iloc[i] for i in range(4))

    assert same.mse_bg == 0 and same.lpips_bg < 1e-6 and same.lpips_bg_piebench < 1e-6
    assert orc.mse_bg == 0 and orc.mse_bg_piebench == 0 and orc.lpips_bg_piebench < 1e-6
    assert orc.psnr_bg == PSNR_MAX
    # an exact background scores exactly 0 on lpips_bg; the plain spatial map does not (its coarse
    # layers see the edited object past the 5 px dilation): the reason lpips_bg restores the rest
    assert orc.lpips_bg == 0 and 0 < orc.lpips_bg_spatial < 0.01
    for glob in global_edits:
        assert glob.mse_bg > 1e-3 and glob.psnr_bg < 40
        assert glob.lpips_bg > 1e-3 and glob.lpips_bg_spatial > 3 * orc.lpips_bg_spatial
        assert glob.lpips_bg_piebench > 3 * orc.lpips_bg_piebench
        assert glob.ssim_bg < orc.ssim_bg <= 1.0 + 1e-9


def test_rsm_reads_only_the_region(scorer: RSESScorer) -> None:
    h, w = 48, 64
    edited = _image(h, w, seed=4)
    mask = _rect(h, w, 8, 12, 30, 40)
    outside = edited.copy()
    outside[~mask] = 255 - outside[~mask]  # change every pixel outside the mask
    inside = edited.copy()
    inside[mask] = 255 - inside[mask]
    df = scorer.score(
        [edited, outside, inside, edited],
        [edited] * 4,
        [mask] * 4,
        ["pixel-art", "pixel-art", "pixel-art", "line-art"],
        pseudo_gt=[edited, edited, None, inside],
        ids=["a", "b", "c", "d"],
    )
    assert list(df.columns) == ["id", "style", *RSES_COLUMNS, "bg_fraction"]
    assert df.rsm_text.between(-1, 1).all()
    assert df.rsm_text[0] == pytest.approx(df.rsm_text[1], abs=1e-6)  # outside pixels are ignored
    assert abs(df.rsm_text[0] - df.rsm_text[2]) > 1e-4  # inside pixels are not
    assert abs(df.rsm_text[0] - df.rsm_text[3]) > 1e-4  # the style text matters
    assert df.rsm_image[0] == pytest.approx(1.0, abs=1e-5)
    assert df.rsm_image[1] == pytest.approx(1.0, abs=1e-5)
    assert math.isnan(df.rsm_image[2])
    assert df.rsm_image[3] < 1 - 1e-4


def test_mixed_sizes_in_one_call_match_single_calls(scorer: RSESScorer) -> None:
    shapes = [(64, 64), (48, 80), (64, 64)]
    sources = [_image(h, w, seed=10 + i) for i, (h, w) in enumerate(shapes)]
    edited = [np.clip(s.astype(int) + 15 * (i + 1), 0, 255).astype(np.uint8) for i, s in enumerate(sources)]
    masks = [_rect(h, w, 10, 10, 30, 30 + i) for i, (h, w) in enumerate(shapes)]
    styles = ["cyberpunk", "line-art", "pixel-art"]
    together = scorer.score(edited, sources, masks, styles)
    alone = pd.concat(
        [scorer.score([e], [s], [m], [st]) for e, s, m, st in zip(edited, sources, masks, styles, strict=True)]
    )
    cols = [c for c in RSES_COLUMNS if c != "rsm_image"]
    np.testing.assert_allclose(together[cols].to_numpy(), alone[cols].to_numpy(), rtol=1e-5, atol=1e-6)


def test_bad_inputs_raise(scorer: RSESScorer) -> None:
    img = _image(32, 32, seed=0)
    with pytest.raises(DataError, match="mask"):
        scorer.score([img], [img], [np.ones((16, 16), dtype=bool)], ["pixel-art"])
    with pytest.raises(DataError, match="length"):
        scorer.score([img, img], [img], [np.ones((32, 32), dtype=bool)], ["pixel-art"])
    assert scorer.score([], [], [], []).empty


def test_model_references_fail_clearly_offline() -> None:
    from regionroute.models.clip import load_clip
    from regionroute.models.lpips import load_lpips

    with pytest.raises(UserError, match=r"models\.clip"):
        load_clip("not-a-model-spec", "cpu")
    with pytest.raises(UserError, match="unknown open_clip model"):
        load_clip("NoSuchNet/openai", "cpu")
    with pytest.raises(UserError, match=r"models\.lpips"):
        load_lpips("resnet", "cpu")


# --- size buckets (COCO area thresholds, original-image pixels) ---------------------------


@pytest.mark.parametrize(
    ("area", "bucket"),
    [(0, "small"), (1023, "small"), (1023.99, "small"), (1024, "medium"), (9215.5, "medium"), (9216, "large")],
)
def test_size_bucket_boundaries(area: float, bucket: str) -> None:
    assert size_bucket(area) == bucket


def test_size_helpers() -> None:
    with pytest.raises(ValueError):
        size_bucket(-1)
    mask = np.zeros((100, 100), dtype=bool)
    mask[:10, :10] = True
    assert original_area(mask, (200, 300)) == pytest.approx(100 * 6)  # each pixel covers 2x3 originals
    df = pd.DataFrame(
        {"method": ["a", "a", "b", "b"], "area": [10, 5000, 20000, 20000], "lpips_bg": [0.1, 0.2, 0.3, 0.5]}
    )
    table = stratify(add_size_bucket(df), ["lpips_bg"], by=["method"])
    assert len(table) == 6  # every (method, bucket), even empty ones
    large_b = table[(table.method == "b") & (table["size"] == "large")].iloc[0]
    assert large_b.n == 2 and large_b.lpips_bg == pytest.approx(0.4)
    assert table[(table.method == "b") & (table["size"] == "small")].iloc[0].n == 0


def test_a_background_change_of_known_size_is_measured_and_mse_fg_matches_the_pseudo_gt(scorer: RSESScorer) -> None:
    h, w = 128, 128
    source = _image(h, w, seed=4)
    mask = _rect(h, w, 40, 40, 80, 80)
    pseudo = source.copy()
    pseudo[mask] = 255 - pseudo[mask]
    small, large = pseudo.copy(), pseudo.copy()
    small[5:15, 5:15] = 0  # a 10 x 10 background change far from the object
    large[5:45, 5:125] = 0  # a much larger one
    edits = [pseudo, small, large, source]
    df = scorer.score(edits, [source] * 4, [mask] * 4, ["line-art"] * 4, pseudo_gt=[pseudo] * 4)
    exact, s, big, untouched = (df.iloc[i] for i in range(4))
    assert exact.lpips_bg == 0 < s.lpips_bg < big.lpips_bg
    assert exact.mse_fg == 0 and s.mse_fg == 0  # the object matches its pseudo-GT
    d = (255 - 2 * source[mask].astype(float)) / 255  # unedited object vs its pseudo-GT
    assert untouched.mse_fg == pytest.approx(float((d**2).mean()), rel=1e-9)
