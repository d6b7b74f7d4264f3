"""Attention localization: how much of the style word's attention falls on the object (docs/method.md §7).

:func:`attention_localization` returns, per entry of ``maps`` ``(B, *E, P)`` against soft masks on
the token grid, ``mass_in`` (share of the mass inside the mask) and ``iou`` (fuzzy IoU of the
thresholded map with the mask); NaN where the mask is empty. Used by the training logs, ``score``
and the toy base's evaluation.
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
