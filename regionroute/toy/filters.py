"""Four procedural style filters named after the paper's styles, and the recolour edit (docs/toy.md).

:func:`apply_style` (``pixel-art``, ``cyberpunk``, ``expressionism``, ``line-art``) and :func:`recolour`
are deterministic, local (receptive field <= 5 px), batched on ``(B, 3, H, W)`` in [0, 1]. Used only
by the toy models' training and evaluation; the main pipeline's pseudo-GT comes from the base's own
global stylization, as the paper's comes from Kontext's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["STYLES", "apply_style", "recolour"]

STYLES: tuple[str, ...] = ("pixel-art", "cyberpunk", "expressionism", "line-art")

_PICO8 = torch.tensor(
    [(0, 0, 0), (29, 43, 83), (126, 37, 83), (0, 135, 81), (171, 82, 54), (95, 87, 79), (194, 195, 199),
     (255, 241, 232), (255, 0, 77), (255, 163, 0), (255, 236, 39), (0, 228, 54), (41, 173, 255), (131, 118, 156),
     (255, 119, 168), (255, 204, 170)], dtype=torch.float32,
) / 255  # fmt: skip
_NEON = torch.tensor([(0.04, 0.02, 0.14), (0.35, 0.05, 0.55), (0.95, 0.15, 0.6), (0.15, 0.95, 1.0)])
_LUMA = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)


def _luma(x: torch.Tensor) -> torch.Tensor:
    return (x * _LUMA.to(x)).sum(1, keepdim=True)  # (B, 1, H, W)


def _pixel_art(x: torch.Tensor) -> torch.Tensor:
    small = F.avg_pool2d(x, 4)  # (B, 3, H/4, W/4)
    b, _, h, w = small.shape
    flat = small.permute(0, 2, 3, 1).reshape(-1, 3)
    idx = torch.cdist(flat, _PICO8.to(x)).argmin(1)
    quant = _PICO8.to(x)[idx].view(b, h, w, 3).permute(0, 3, 1, 2)
    return F.interpolate(quant, scale_factor=4, mode="nearest")


def _cyberpunk(x: torch.Tensor) -> torch.Tensor:
    lum = ((_luma(x) - 0.5) * 1.4 + 0.5).clamp(0, 1) * (len(_NEON) - 1)  # (B, 1, H, W) in [0, 3]
    lo = lum.floor().clamp(max=len(_NEON) - 2)
    t = lum - lo
    stops = _NEON.to(x)
    a = stops[lo.long().squeeze(1)].permute(0, 3, 1, 2)  # (B, 3, H, W)
    b = stops[lo.long().squeeze(1) + 1].permute(0, 3, 1, 2)
    return a + (b - a) * t


def _expressionism(x: torch.Tensor) -> torch.Tensor:
    blur = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    lum = _luma(blur)
    vivid = (lum + 2.2 * (blur - lum)) * torch.tensor([1.15, 1.0, 0.75]).view(1, 3, 1, 1).to(x) + 0.05
    return (vivid.clamp(0, 1) * 2).round() / 2


def _line_art(x: torch.Tensor) -> torch.Tensor:
    lum = F.pad(_luma(x), (1, 1, 1, 1), mode="replicate")
    kx = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]]).view(1, 1, 3, 3).to(x) / 4
    gx, gy = F.conv2d(lum, kx), F.conv2d(lum, kx.transpose(2, 3))
    ink = ((gx**2 + gy**2).sqrt() - 0.06).mul(8).clamp(0, 1)  # (B, 1, H, W): 1 on contours
    paper = torch.tensor([0.97, 0.96, 0.92]).view(1, 3, 1, 1).to(x)
    return paper * (1 - ink) + 0.08 * ink


_FILTERS = {"pixel-art": _pixel_art, "cyberpunk": _cyberpunk, "expressionism": _expressionism, "line-art": _line_art}


def apply_style(images: torch.Tensor, style: str) -> torch.Tensor:
    """(B, 3, H, W) float in [0, 1] -> the same shape in the style, deterministic."""
    if style not in _FILTERS:
        raise ValueError(f"unknown toy style {style!r} (one of {', '.join(STYLES)})")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected (B, 3, H, W) images, got {tuple(images.shape)}")
    return _FILTERS[style](images.float()).clamp(0, 1)


def recolour(images: torch.Tensor, masks: torch.Tensor, rgb: torch.Tensor) -> torch.Tensor:
    """Paint the masked pixels ``rgb`` (B, 3) keeping their shading; pixels outside are bit-identical.

    The new colour is scaled by each pixel's luminance relative to the object's mean
    luminance, so the object's pattern and shading survive the edit.
    """
    m = masks.bool()[:, None]  # (B, 1, H, W)
    lum = _luma(images)
    mean = (lum * m).flatten(1).sum(1) / m.flatten(1).sum(1).clamp_min(1)  # (B,)
    shade = (lum / mean.clamp_min(1e-3).view(-1, 1, 1, 1)).clamp(0.4, 1.6)
    painted = (rgb.to(images).view(-1, 3, 1, 1) * shade).clamp(0, 1)
    return torch.where(m, painted, images)
