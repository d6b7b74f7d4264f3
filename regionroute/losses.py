"""Attention supervision: Focus (KL) and Cover (BCE) on style-token maps, named terms (docs/method.md §4).

:func:`attention_losses` pairs each sample's maps ``(B, *E, P)`` with its own soft mask on the token
grid (:func:`downsample_mask`, area averaging), skips empty masks (``n_empty``) and takes its options
from :class:`regionroute.config.LossConfig` (the public code's forms are named options).
:func:`element_coverage` gives each latent value's mask coverage for ``loss.object_weight``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from regionroute.config import LossConfig
from regionroute.errors import ConfigError

__all__ = [
    "attention_losses",
    "cover_bce",
    "downsample_mask",
    "element_coverage",
    "focus_kl",
    "pair_maps_masks",
]

_TINY = 1e-12  # floor for sums and log arguments
_BCE_EPS = 1e-6  # keeps min-max maps inside (0, 1) so BCE and its gradient stay finite


def downsample_mask(mask: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Soft coverage of each token cell: area average of a (B, H, W) bool/float mask -> (B, h, w) float32.

    Area averaging keeps a small object's partial coverage instead of erasing it (nearest).
    """
    if mask.dim() != 3:
        raise ValueError(f"mask must be (B, H, W), got {tuple(mask.shape)}")
    return F.adaptive_avg_pool2d(mask.float()[:, None], (h, w))[:, 0].clamp(0.0, 1.0)  # (B, h, w)


def element_coverage(vae: Any, masks: torch.Tensor, latent_shape: tuple[int, ...]) -> torch.Tensor:
    """(B, H, W) masks -> (B, C, h, w): how much of each latent value the mask covers.

    The toy world's pixel-shuffle latent holds one pixel per value: the mask, rearranged as
    its ``encode`` rearranges the image, answers exactly. For a VAE it is the area average
    over the latent pixel's footprint, the same for all its channels.
    """
    from regionroute.toy.latent import PixelShuffleVAE

    if isinstance(vae, PixelShuffleVAE):
        per_channel = masks.float()[:, None].expand(-1, vae.config.in_channels, -1, -1)
        return vae.encode(per_channel).latent_dist.mode()

    _, c, h, w = latent_shape
    return downsample_mask(masks, h, w)[:, None].expand(-1, c, -1, -1)


def pair_maps_masks(maps: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flatten ``maps`` to (B, *E, P) float32 and broadcast ``masks`` to the same shape (shared by the metrics)."""
    h, w = masks.shape[-2:]
    p = h * w
    a = maps.float()
    if a.shape[-1] != p:
        if tuple(a.shape[-2:]) != (h, w):
            raise ValueError(f"maps {tuple(maps.shape)} do not match the mask grid {h}x{w}")
        a = a.flatten(-2)  # (B, *E, P)
    m = masks.float().flatten(-2)  # (B, [*E,] P)
    if m.dim() == 2:
        m = m.reshape(m.shape[0], *([1] * (a.dim() - 2)), p)
    if m.shape[0] != a.shape[0] or m.dim() != a.dim():
        raise ValueError(f"masks {tuple(masks.shape)} do not pair with maps {tuple(maps.shape)}")
    return a, m.expand_as(a)


def _focus(a: torch.Tensor, m: torch.Tensor, distribution: str, tau: float) -> torch.Tensor:
    m_hat = m / m.sum(-1, keepdim=True).clamp_min(_TINY)
    if distribution == "normalize":
        a = a.clamp_min(_TINY)
        log_p = a.log() - a.sum(-1, keepdim=True).log()
    elif distribution == "softmax":
        log_p = torch.log_softmax(a / tau, dim=-1)
    else:
        raise ConfigError(f"focus_distribution must be 'normalize' or 'softmax', got {distribution!r}")
    return (torch.xlogy(m_hat, m_hat) - m_hat * log_p).sum(-1)


def _cover(a: torch.Tensor, m: torch.Tensor, cover_map: str, alpha: float) -> torch.Tensor:
    if cover_map == "official_logits":
        return F.binary_cross_entropy_with_logits(alpha * a, m, reduction="none").mean(-1)
    if cover_map != "minmax":
        raise ConfigError(f"cover_map must be 'minmax' or 'official_logits', got {cover_map!r}")
    lo, hi = a.amin(-1, keepdim=True), a.amax(-1, keepdim=True)
    x = ((a - lo) / (hi - lo).clamp_min(_TINY)).clamp(_BCE_EPS, 1.0 - _BCE_EPS)
    return -(m * x.log() + (1.0 - m) * (1.0 - x).log()).mean(-1)


def focus_kl(
    maps: torch.Tensor, masks: torch.Tensor, distribution: str = "normalize", tau: float = 0.1
) -> torch.Tensor:
    """``KL(m_hat || p)`` per entry, (B, *E); 0 log 0 = 0. Empty masks give 0 (filter them with the mask sum)."""
    return _focus(*pair_maps_masks(maps, masks), distribution, tau)


def cover_bce(maps: torch.Tensor, masks: torch.Tensor, cover_map: str = "minmax", alpha: float = 2.0) -> torch.Tensor:
    """BCE between a map in [0, 1] and the soft mask, mean over positions, per entry (B, *E)."""
    return _cover(*pair_maps_masks(maps, masks), cover_map, alpha)


def attention_losses(
    maps: torch.Tensor, masks: torch.Tensor, config: LossConfig | None = None
) -> dict[str, torch.Tensor | int]:
    """Focus and Cover, averaged over the entries whose mask is not empty.

    Args:
        maps: style-token maps, ``(B, *E, P)`` or ``(B, *E, h, w)``; non-negative.
        masks: soft masks on the token grid (:func:`downsample_mask`), ``(B, h, w)`` or ``(B, *E, h, w)``.
        config: loss options (defaults: docs/method.md section 4).

    Returns:
        ``{"focus": scalar, "cover": scalar, "n_used": int, "n_empty": int}``. With ``(B, h, w)``
        masks the counts are samples; with per-entry masks they are (sample, *E) entries. When no
        mask is usable both losses are a differentiable 0.
    """
    cfg = config or LossConfig()
    a, m = pair_maps_masks(maps, masks)  # (B, *E, P)
    per_sample = masks.dim() == 3
    valid = m.sum(-1) > 0  # (B, *E)
    focus = _focus(a, m, cfg.focus_distribution, cfg.tau)  # (B, *E)
    cover = _cover(a, m, cfg.cover_map, cfg.alpha)  # (B, *E)
    n_valid = int(valid.sum())
    denom = max(n_valid, 1)
    focus = torch.where(valid, focus, torch.zeros_like(focus)).sum() / denom
    cover = torch.where(valid, cover, torch.zeros_like(cover)).sum() / denom
    if per_sample:
        used = int(valid.reshape(valid.shape[0], -1)[:, 0].sum())
        return {"focus": focus, "cover": cover, "n_used": used, "n_empty": valid.shape[0] - used}
    return {"focus": focus, "cover": cover, "n_used": n_valid, "n_empty": valid.numel() - n_valid}
