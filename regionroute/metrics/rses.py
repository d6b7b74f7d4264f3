"""RSES components: regional style match (RSM) and background identity, per sample (docs/method.md §7).

:class:`RSESScorer` (used by ``score``) computes :data:`RSES_COLUMNS`: ``rsm_text``/``rsm_image``
(CLIP on the mask's region), ``mse_fg`` (against the pseudo-GT inside the mask), and over the
dilated background ``mse_bg``, ``psnr_bg``, ``ssim_bg``, ``lpips_bg`` (the edit with everything but
the background restored from the source) and its plain spatial-map and PIE-Bench variants.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image

from regionroute.errors import DataError
from regionroute.metrics.region import CLIP_MEAN_RGB, region_crop

__all__ = [
    "CLIP_MEAN_RGB",
    "PSNR_MAX",
    "RSES_COLUMNS",
    "RSESScorer",
    "background_mask",
    "pixel_metrics",
    "region_crop",
]

#: PSNR reported for a background with MSE 0.
PSNR_MAX = 100.0
RSES_COLUMNS: tuple[str, ...] = (
    "rsm_text",
    "rsm_image",
    "mse_fg",
    "lpips_bg",
    "lpips_bg_spatial",
    "mse_bg",
    "psnr_bg",
    "ssim_bg",
    "mse_bg_piebench",
    "lpips_bg_piebench",
)


def background_mask(mask: np.ndarray, dilate: int = 5) -> np.ndarray:
    """``1 - mask`` after dilating the mask by ``dilate`` px (Euclidean distance): (H, W) bool."""
    from scipy.ndimage import distance_transform_edt

    if dilate < 0:
        raise ValueError(f"dilate must be >= 0, got {dilate}")
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return np.ones_like(mask)
    return distance_transform_edt(~mask) > dilate  # distance to the nearest mask pixel


def pixel_metrics(edited: np.ndarray, source: np.ndarray, background: np.ndarray) -> dict[str, float]:
    """MSE / PSNR / SSIM on the background, plus PIE-Bench's masked-image MSE.

    ``edited``, ``source``: (H, W, 3) uint8; ``background``: (H, W) bool.
    """
    from skimage.metrics import structural_similarity

    _check_pair(edited, background)
    _check_pair(source, background)
    a = edited.astype(np.float64) / 255.0  # (H, W, 3) in [0, 1]
    b = source.astype(np.float64) / 255.0
    sq = ((a - b) ** 2).mean(axis=2)  # (H, W), mean over channels
    n_bg = int(background.sum())
    out = {"bg_fraction": n_bg / background.size, "mse_bg_piebench": float((sq * background).mean())}
    if n_bg == 0:
        return {**out, "mse_bg": math.nan, "psnr_bg": math.nan, "ssim_bg": math.nan}
    mse = float(sq[background].mean())
    psnr = PSNR_MAX if mse == 0 else min(PSNR_MAX, 10.0 * math.log10(1.0 / mse))
    _, ssim_map = structural_similarity(a, b, channel_axis=2, data_range=1.0, full=True)  # (H, W, 3)
    ssim = float(ssim_map.mean(axis=2)[background].mean())
    return {**out, "mse_bg": mse, "psnr_bg": psnr, "ssim_bg": ssim}


class RSESScorer:
    """Scores batches of edits; CLIP and LPIPS are loaded once, at construction.

    ``clip``: reference for :func:`regionroute.models.clip.load_clip` (``"ViT-L-14/openai"``
    in the paper); ``lpips``: for :func:`regionroute.models.lpips.load_lpips` (``"alex"``).
    """

    def __init__(
        self,
        clip: str = "tiny",
        lpips: str = "tiny",
        *,
        device: str | torch.device = "auto",
        dilate: int = 5,
        template: str = "an image in {style} style",
        batch_size: int = 16,
    ) -> None:
        from regionroute.models import resolve_device
        from regionroute.models.clip import load_clip
        from regionroute.models.lpips import load_lpips

        if "{style}" not in template:
            raise ValueError(f"template must contain '{{style}}', got {template!r}")
        if batch_size < 1 or dilate < 0:
            raise ValueError(f"need batch_size >= 1 and dilate >= 0, got {batch_size}, {dilate}")
        self.device = device if isinstance(device, torch.device) else resolve_device(device)
        self.clip, self.preprocess, self.tokenizer = load_clip(clip, self.device)
        self.lpips = load_lpips(lpips, self.device)
        self.dilate, self.template, self.batch_size = dilate, template, batch_size
        self._text_cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def text_embedding(self, style: str) -> torch.Tensor:
        """Unit-norm CLIP embedding of the template filled with ``style``: (D,)."""
        if style not in self._text_cache:
            tokens = self.tokenizer([self.template.format(style=style)]).to(self.device)  # (1, L)
            self._text_cache[style] = self.clip.encode_text(tokens, normalize=True)[0].float()
        return self._text_cache[style]

    @torch.no_grad()
    def region_embeddings(self, images: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> torch.Tensor:
        """Unit-norm CLIP embeddings of the masked regions: (N, D); NaN rows for empty masks."""
        crops = [region_crop(im, m, square=True)[0] if m.any() else None for im, m in zip(images, masks, strict=True)]
        valid = [i for i, c in enumerate(crops) if c is not None]
        chunks = []
        for start in range(0, len(valid), self.batch_size):
            batch = [self.preprocess(Image.fromarray(crops[i])) for i in valid[start : start + self.batch_size]]
            pixels = torch.stack(batch).to(self.device)  # (b, 3, S, S)
            chunks.append(self.clip.encode_image(pixels, normalize=True).float())  # (b, D)
        dim = chunks[0].shape[-1] if chunks else self.text_embedding("").shape[-1]
        out = torch.full((len(crops), dim), math.nan, device=self.device)  # (N, D)
        if valid:
            out[valid] = torch.cat(chunks)
        return out

    @torch.no_grad()
    def lpips_maps(self, pairs: Sequence[tuple[np.ndarray, np.ndarray]]) -> list[np.ndarray]:
        """Spatial LPIPS maps (H, W) for uint8 image pairs; batched per image size."""
        by_size: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for i, (a, b) in enumerate(pairs):
            if a.shape != b.shape:
                raise DataError(f"LPIPS pair {i}: shapes differ, {a.shape} vs {b.shape}")
            by_size[a.shape].append(i)
        out: list[np.ndarray | None] = [None] * len(pairs)
        for idx in by_size.values():
            for start in range(0, len(idx), self.batch_size):
                chunk = idx[start : start + self.batch_size]
                a = _to_tensor([pairs[i][0] for i in chunk], self.device)  # (b, 3, H, W) in [0, 1]
                b = _to_tensor([pairs[i][1] for i in chunk], self.device)
                maps = self.lpips(a, b, normalize=True)[:, 0].float().cpu().numpy()  # (b, H, W)
                for j, i in enumerate(chunk):
                    out[i] = maps[j]
        return out  # type: ignore[return-value]

    def score(
        self,
        edited: Sequence[np.ndarray],
        sources: Sequence[np.ndarray],
        masks: Sequence[np.ndarray],
        styles: Sequence[str],
        pseudo_gt: Sequence[np.ndarray | None] | None = None,
        ids: Sequence[str] | None = None,
    ) -> pd.DataFrame:
        """One row per sample: ``id``, ``style``, :data:`RSES_COLUMNS` and ``bg_fraction``.

        ``edited`` / ``sources`` / ``pseudo_gt``: (H, W, 3) uint8, same size per sample
        (sizes may differ between samples); ``masks``: (H, W) bool target regions.
        ``pseudo_gt`` (or any of its items) may be ``None``: ``rsm_image`` is then NaN.
        """
        n = len(edited)
        pseudo = list(pseudo_gt) if pseudo_gt is not None else [None] * n
        ids = list(ids) if ids is not None else [str(i) for i in range(n)]
        if not (len(sources) == len(masks) == len(styles) == len(pseudo) == len(ids) == n):
            raise DataError("RSESScorer.score: edited, sources, masks, styles, pseudo_gt and ids differ in length")
        masks = [np.asarray(m, dtype=bool) for m in masks]
        for i in range(n):
            _check_pair(edited[i], masks[i], f"sample {ids[i]}: edited")
            _check_pair(sources[i], masks[i], f"sample {ids[i]}: source")
            if pseudo[i] is not None:
                _check_pair(pseudo[i], masks[i], f"sample {ids[i]}: pseudo_gt")
        if n == 0:
            return pd.DataFrame(columns=["id", "style", *RSES_COLUMNS, "bg_fraction"])

        region = self.region_embeddings(edited, masks)  # (N, D)
        texts = torch.stack([self.text_embedding(s) for s in styles])  # (N, D)
        rsm_text = (region * texts).sum(-1).cpu().numpy()  # (N,)
        with_gt = [i for i in range(n) if pseudo[i] is not None]
        rsm_image = np.full(n, math.nan)
        if with_gt:
            gt = self.region_embeddings([pseudo[i] for i in with_gt], [masks[i] for i in with_gt])  # (G, D)
            rsm_image[with_gt] = (region[with_gt] * gt).sum(-1).cpu().numpy()

        backgrounds = [background_mask(m, self.dilate) for m in masks]
        plain = self.lpips_maps(list(zip(edited, sources, strict=True)))
        # the edit with everything but the background restored: only background changes remain
        restored = self.lpips_maps(
            [(np.where(bg[..., None], e, s), s) for e, s, bg in zip(edited, sources, backgrounds, strict=True)]
        )
        # PIE-Bench: images multiplied by the background mask (background kept, rest black).
        masked = self.lpips_maps(
            [(_apply(e, bg), _apply(s, bg)) for e, s, bg in zip(edited, sources, backgrounds, strict=True)]
        )

        rows = []
        for i in range(n):
            bg = backgrounds[i]
            row = {"id": ids[i], "style": styles[i], "rsm_text": float(rsm_text[i]), "rsm_image": float(rsm_image[i])}
            row["lpips_bg"] = float(restored[i][bg].mean()) if bg.any() else math.nan
            row["lpips_bg_spatial"] = float(plain[i][bg].mean()) if bg.any() else math.nan
            row["mse_fg"] = _mse_inside(edited[i], pseudo[i], masks[i])
            row["lpips_bg_piebench"] = float(masked[i].mean())
            row.update(pixel_metrics(edited[i], sources[i], bg))
            rows.append(row)
        return pd.DataFrame(rows, columns=["id", "style", *RSES_COLUMNS, "bg_fraction"])


def _mse_inside(a: np.ndarray, b: np.ndarray | None, mask: np.ndarray) -> float:
    """MSE of two uint8 images over the mask's pixels, in [0, 1] units (NaN without b or pixels)."""
    if b is None or not mask.any():
        return math.nan
    d = (a.astype(np.float64) - b.astype(np.float64)) / 255.0
    return float((d**2).mean(axis=2)[mask].mean())


def _check_pair(image: np.ndarray, mask: np.ndarray, what: str = "image") -> None:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise DataError(f"{what}: expected an (H, W, 3) uint8 image, got {image.shape} {image.dtype}")
    if mask.shape != image.shape[:2]:
        raise DataError(f"{what}: image is {image.shape[:2]} but the mask is {mask.shape}")


def _apply(image: np.ndarray, keep: np.ndarray) -> np.ndarray:
    return image * keep[..., None].astype(np.uint8)  # (H, W, 3) uint8, zeros outside ``keep``


def _to_tensor(images: Sequence[np.ndarray], device: torch.device) -> torch.Tensor:
    arr = np.stack(images).astype(np.float32) / 255.0  # (b, H, W, 3)
    return torch.from_numpy(arr).permute(0, 3, 1, 2).to(device)  # (b, 3, H, W)
