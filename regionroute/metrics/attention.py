"""Attention localization: how much of the style token's attention falls on the target object (docs/method.md §7).

Beyond the paper. Used by the training logs (on the maps the losses see), by inference
(maps saved per denoising step) and by the ``score`` stage, per method and object size.

Inputs follow :mod:`regionroute.losses`: ``maps`` ``(B, *E, P)`` or ``(B, *E, h, w)``,
non-negative (e.g. :meth:`regionroute.flux.attention.StyleAttentionRecorder.maps`);
``masks`` soft on the token grid (:func:`regionroute.losses.downsample_mask`), ``(B, h, w)``
or ``(B, *E, h, w)``. Outputs are per entry ``(B, *E)``, detached float32; an entry whose
mask is empty (or whose map sums to 0) is ``NaN`` so that ``nanmean`` skips it.

* ``mass_in`` = ``sum_i a_i m_i / sum_i a_i``: the share of attention mass inside the soft mask
  (uniform attention scores the mask's area fraction).
* ``iou``: the map is thresholded into a binary prediction ``b``, then compared with the soft
  mask by the fuzzy IoU ``sum min(b, m) / sum max(b, m)`` (the ordinary IoU when ``m`` is
  binary; a small object covering no token fully still counts). Threshold rules:
  ``"mean"`` (default): ``b_i = a_i >= mean(a)``, parameter-free and scale-invariant;
  ``"area"``: the top-``k`` tokens with ``k = round(sum m)`` (at least 1), the mask's area in
  tokens, so ``iou`` measures placement independent of spread.
"""

from __future__ import annotations

from typing import Literal

import torch

from regionroute.errors import ConfigError
from regionroute.losses import pair_maps_masks

__all__ = ["ATTENTION_COLUMNS", "attention_iou", "attention_localization", "attention_mass_inside"]

#: The localization columns of the ``score`` stage, per sample.
ATTENTION_COLUMNS: tuple[str, ...] = ("attn_mass_in", "attn_iou")

Threshold = Literal["mean", "area"]


@torch.no_grad()
def attention_mass_inside(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Share of attention mass inside the soft mask, per entry (B, *E); NaN for empty masks or maps."""
    a, m = pair_maps_masks(maps.detach(), masks.detach())  # (B, *E, P)
    total = a.sum(-1)
    share = (a * m).sum(-1) / total.clamp_min(1e-30)
    return torch.where((m.sum(-1) > 0) & (total > 0), share, torch.full_like(share, float("nan")))


@torch.no_grad()
def attention_iou(maps: torch.Tensor, masks: torch.Tensor, threshold: Threshold = "mean") -> torch.Tensor:
    """Fuzzy IoU of the thresholded map with the soft mask, per entry (B, *E); NaN for empty masks."""
    a, m = pair_maps_masks(maps.detach(), masks.detach())  # (B, *E, P)
    if threshold == "mean":
        pred = (a >= a.mean(-1, keepdim=True)).float()
    elif threshold == "area":
        k = m.sum(-1).round().clamp(1, a.shape[-1]).long()  # (B, *E)
        rank = a.argsort(-1, descending=True).argsort(-1)  # position of each token in the ranking
        pred = (rank < k[..., None]).float()
    else:
        raise ConfigError(f"attention IoU threshold must be 'mean' or 'area', got {threshold!r}")
    iou = torch.minimum(pred, m).sum(-1) / torch.maximum(pred, m).sum(-1).clamp_min(1e-30)
    return torch.where(m.sum(-1) > 0, iou, torch.full_like(iou, float("nan")))


def attention_localization(
    maps: torch.Tensor, masks: torch.Tensor, threshold: Threshold = "mean"
) -> dict[str, torch.Tensor]:
    """``{"mass_in": (B, *E), "iou": (B, *E)}``; average with ``torch.nanmean`` for logs and tables."""
    return {"mass_in": attention_mass_inside(maps, masks), "iou": attention_iou(maps, masks, threshold)}
