"""Focus/Cover losses (regionroute.losses) and attention localization (regionroute.metrics.attention)."""

from __future__ import annotations

import math

import pytest
import torch

from regionroute.config import LossConfig
from regionroute.errors import ConfigError
from regionroute.losses import attention_losses, cover_bce, downsample_mask, focus_kl
from regionroute.metrics.attention import attention_iou, attention_localization, attention_mass_inside


def masks_2x(h: int = 4, w: int = 4) -> torch.Tensor:
    m = torch.zeros(2, h, w)
    m[0, :2, :2] = 1.0
    m[1, 1:3, 1:4] = 1.0
    return m


def test_downsample_mask_is_area_coverage():
    full = torch.zeros(1, 8, 8, dtype=torch.bool)
    full[0, 0, 0] = True  # one pixel of a 4x4 cell: nearest would keep 0 or 1, area keeps 1/16
    full[0, 4:, 4:] = True
    out = downsample_mask(full, 2, 2)
    assert out.shape == (1, 2, 2) and out.dtype == torch.float32
    torch.testing.assert_close(out[0], torch.tensor([[1 / 16, 0.0], [0.0, 1.0]]))
    with pytest.raises(ValueError):
        downsample_mask(full[0], 2, 2)


def test_focus_is_zero_at_the_normalized_mask_and_positive_elsewhere():
    m = masks_2x()
    a = 3e-4 * m.flatten(1)  # any positive multiple of the mask: p = a / sum a = m_hat
    torch.testing.assert_close(focus_kl(a, m), torch.zeros(2), atol=1e-6, rtol=0)
    uniform = torch.full((2, 16), 1 / 16)
    expected = torch.log(16 / m.flatten(1).sum(1))  # KL(m_hat || uniform) = log(P / |m|)
    torch.testing.assert_close(focus_kl(uniform, m), expected)
    # Softmax with tau = 0.1 on ~1/N maps is almost uniform: far weaker signal than "normalize".
    soft = focus_kl(a, m, distribution="softmax", tau=0.1)
    assert (soft - expected).abs().max() < 0.01


def test_cover_prefers_the_mask_over_its_complement():
    m = masks_2x()
    for cfg in (LossConfig(), LossConfig(cover_map="official_logits")):
        good = cover_bce(m * 2e-4 + 1e-5, m, cfg.cover_map, cfg.alpha)
        bad = cover_bce((1 - m) * 2e-4 + 1e-5, m, cfg.cover_map, cfg.alpha)
        assert (good < bad).all(), cfg
    # Official logits on a >= 0: even a perfect map keeps the background at sigmoid(0) = 0.5.
    off = cover_bce(torch.zeros(2, 16), torch.zeros(2, 4, 4), "official_logits")
    torch.testing.assert_close(off, torch.full((2,), math.log(2.0)))


def test_empty_mask_contributes_nothing_and_no_nan():
    m = masks_2x()
    m[1] = 0.0
    a = torch.rand(2, 16, requires_grad=True)
    terms = attention_losses(a, m)
    assert terms["n_used"] == 1 and terms["n_empty"] == 1
    only = attention_losses(a[:1], m[:1])
    torch.testing.assert_close(terms["focus"], only["focus"])
    torch.testing.assert_close(terms["cover"], only["cover"])
    (terms["focus"] + terms["cover"]).backward()
    assert torch.isfinite(a.grad).all() and (a.grad[1] == 0).all()
    empty = attention_losses(a, torch.zeros(2, 4, 4))
    assert empty["n_used"] == 0 and empty["n_empty"] == 2
    assert empty["focus"].item() == 0.0 and empty["cover"].item() == 0.0
    (empty["focus"] + empty["cover"]).backward()  # still differentiable


def test_per_sample_pairing_and_extra_dims():
    m = masks_2x()
    a = torch.rand(2, 3, 4, 4)  # (B, W, h, w): e.g. 3 words or layers per sample
    batched = attention_losses(a, m)
    loop = [attention_losses(a[b, e][None], m[b][None]) for b in range(2) for e in range(3)]
    torch.testing.assert_close(batched["focus"], torch.stack([t["focus"] for t in loop]).mean())
    torch.testing.assert_close(batched["cover"], torch.stack([t["cover"] for t in loop]).mean())
    assert batched["n_used"] == 2
    swapped = attention_losses(a, m.flip(0))
    assert not torch.allclose(swapped["focus"], batched["focus"])
    per_entry = attention_losses(a, m[:, None].expand(2, 3, 4, 4))  # masks with the extra dim
    torch.testing.assert_close(per_entry["focus"], batched["focus"])
    assert per_entry["n_used"] == 6
    with pytest.raises(ValueError):
        attention_losses(torch.rand(2, 15), m)


def test_config_validation():
    with pytest.raises(ConfigError, match="focus_distribution"):
        LossConfig(focus_distribution="kl")
    with pytest.raises(ConfigError, match="cover_map"):
        LossConfig(cover_map="bce")
    with pytest.raises(ConfigError, match="tau"):
        LossConfig(tau=0.0)
    with pytest.raises(AttributeError):
        LossConfig().tau = 1.0  # frozen


def test_localization_metrics():
    m = masks_2x()
    on_mask = m.flatten(1) * 5.0
    torch.testing.assert_close(attention_mass_inside(on_mask, m), torch.ones(2))
    uniform = torch.ones(2, 16)
    torch.testing.assert_close(attention_mass_inside(uniform, m), m.flatten(1).mean(1))
    for rule in ("mean", "area"):
        torch.testing.assert_close(attention_iou(on_mask + 0.1, m, threshold=rule), torch.ones(2))
        assert (attention_iou(1 - m, m, threshold=rule) == 0).all()
    # Soft mask (small object): fuzzy IoU of the single top token with a 0.25-coverage cell.
    small = torch.zeros(1, 4, 4)
    small[0, 0, 0] = 0.25
    peak = torch.zeros(1, 16)
    peak[0, 0] = 1.0
    torch.testing.assert_close(attention_iou(peak, small, "area"), torch.tensor([0.25]))
    empty = attention_localization(uniform, torch.zeros(2, 4, 4))
    assert torch.isnan(empty["mass_in"]).all() and torch.isnan(empty["iou"]).all()
    with pytest.raises(ConfigError):
        attention_iou(uniform, m, threshold="otsu")
