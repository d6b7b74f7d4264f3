"""LPIPS_bg of an edit whose background is exact (the oracle), against the background dilation.

Why ``lpips_bg`` restores the non-background from the source before LPIPS (docs/method.md
§7): the plain spatial LPIPS map of (edit, source) averaged over the background charges an
exact background for the edited object next to it, because AlexNet's coarse layers see it
through their receptive fields. This measures that leak for toy scenes (64 px) and tiny
images (128 px, and upsampled to 512 px), with the official alex weights, per dilation;
``lpips_bg`` (restored) is 0 at every dilation by construction.

    python benchmarks/lpips_bg_dilation.py            # JSON lines: size, dilate, both columns, background kept
"""

from __future__ import annotations

import json

import numpy as np
import torch
from PIL import Image

from regionroute.metrics.rses import RSESScorer
from regionroute.toy.filters import apply_style
from regionroute.toy.scenes import render_batch


def _pairs(size: int, n: int) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """Sources, oracle edits (a style inside the mask, the background exact) and masks."""
    scenes = render_batch(np.random.default_rng(7), n, 64)
    src, edit, masks = [], [], []
    for s in scenes:
        x = torch.from_numpy(s.image).permute(2, 0, 1)[None].float() / 255
        styled = (apply_style(x, "line-art")[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        img, m, st = s.image, s.masks[0], styled
        if size != 64:
            img = np.asarray(Image.fromarray(img).resize((size, size), Image.Resampling.BICUBIC))
            st = np.asarray(Image.fromarray(st).resize((size, size), Image.Resampling.BICUBIC))
            m = np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize((size, size), Image.Resampling.NEAREST)) > 0
        src.append(img)
        edit.append(np.where(m[..., None], st, img))
        masks.append(m)
    return src, edit, masks


def main() -> None:
    torch.set_num_threads(2)
    for size, n in ((64, 48), (128, 32), (512, 8)):
        src, edit, masks = _pairs(size, n)
        for dilate in (0, 2, 5, 10, 16, 24):
            scorer = RSESScorer("tiny", "alex", device="cpu", dilate=dilate * size // 64 if size > 64 else dilate)
            df = scorer.score(edit, src, masks, ["line-art"] * n)
            print(json.dumps({
                "size": size, "dilate_px": scorer.dilate, "n": n,
                "lpips_bg_spatial": round(float(df["lpips_bg_spatial"].mean()), 6),
                "lpips_bg": round(float(df["lpips_bg"].mean()), 6),
                "background_kept": round(float(df["bg_fraction"].mean()), 4),
            }), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
