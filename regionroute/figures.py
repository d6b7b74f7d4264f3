"""The report's figures: example grid and style-token attention, rows drawn at random (stage ``report``).

Rows are drawn with the seed scheme's ``figures`` stream: images split into terciles of object
size, an equal number drawn from each with a random style, plus the single worst pair by
RegionRoute's RSM-text, labelled as such. Nothing is picked by hand.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from regionroute.files import atomic_path, read_image, read_mask

__all__ = ["attention_grid", "draw_rows", "example_grid"]

TERCILES = ("small third", "middle third", "large third")
METHOD_ORDER = ("base", "regionroute", "oracle")
LABELS = {"base": "base (Kontext)", "regionroute": "RegionRoute", "oracle": "oracle (GT mask)"}


def ordered(methods: list[str]) -> list[str]:
    return [m for m in METHOD_ORDER if m in methods] + sorted(m for m in methods if m not in METHOD_ORDER)


def draw_rows(records: list[dict[str, Any]], per_sample: pd.DataFrame, per_tercile: int, seed: int) -> list[dict]:
    """Records to show: ``per_tercile`` random images per object-size tercile (random style), then the worst pair.

    Each returned record carries ``why``: its tercile, or ``worst RSM-text``.
    """
    from regionroute.seeds import stream

    rng = stream("figures", seed)
    by_id = {r["id"]: r for r in records}
    images = sorted({r["sample_id"]: float(r["area_frac"]) for r in records}.items(), key=lambda kv: (kv[1], kv[0]))
    thirds = np.array_split(np.array([sid for sid, _ in images], dtype=object), 3)
    styles = sorted({r["style"] for r in records})
    rows = []
    for name, third in zip(TERCILES, thirds, strict=True):
        for sid in rng.choice(third, size=min(per_tercile, len(third)), replace=False):
            style = styles[int(rng.integers(len(styles)))]
            rows.append({**by_id[f"{sid}_{style}"], "why": name})
    ours = per_sample[(per_sample["method"] == "regionroute") & per_sample["rsm_text"].notna()]
    if len(ours):
        worst = ours.sort_values(["rsm_text", "id"]).iloc[0]["id"]
        rows.append({**by_id[worst], "why": "worst RSM-text"})
    return rows


def _save(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, metadata={"Software": None})
    plt.close(fig)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.getvalue())


def _label(rec: dict[str, Any]) -> str:
    return f"{rec['object']} -> {rec['style']}\n({rec['why']})"


def example_grid(path: Path, rows: list[dict[str, Any]], root: Path, methods: dict[str, Path]) -> None:
    """input | pseudo-GT | one column per method, one row per drawn pair."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ordered(list(methods))
    cols = ["input", "pseudo-GT", *(LABELS.get(m, m) for m in names)]
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(1.9 * len(cols), 2.0 * len(rows)), squeeze=False)
    for i, rec in enumerate(rows):
        images = [read_image(root / rec["original"]), read_image(root / rec["pseudo_gt"])]
        images += [read_image(methods[m] / "images" / f"{rec['id']}.png") for m in names]
        for j, (ax, img) in enumerate(zip(axes[i], images, strict=True)):
            ax.imshow(img, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(cols[j], fontsize=8)
        axes[i][0].set_ylabel(_label(rec), fontsize=6)
    _save(fig, path)


def attention_grid(path: Path, rows: list[dict[str, Any]], root: Path, methods: dict[str, Path]) -> bool:
    """Paper Fig. 6: per pair and model method, output | mean map | each saved step; the mask outlined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels_rows = []
    for rec in rows:
        for m in ordered(list(methods)):
            npz = methods[m] / "attention" / f"{rec['id']}.npz"
            if npz.is_file():
                with np.load(npz) as z:
                    panels_rows.append((rec, m, z["maps"], z["mean"], z["steps"]))
    if not panels_rows:
        return False
    n = 2 + max(len(p[4]) for p in panels_rows)  # rows may have saved different steps
    fig, axes = plt.subplots(len(panels_rows), n, figsize=(1.5 * n, 1.6 * len(panels_rows)), squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for i, (rec, m, maps, mean, steps) in enumerate(panels_rows):
        mask = read_mask(root / rec["mask"]).astype(float)
        out = read_image(methods[m] / "images" / f"{rec['id']}.png")
        h, w = mean.shape
        panels = [("output", out, None), ("mean", mean, "magma")]
        panels += [(f"step {s}", a, "magma") for s, a in zip(steps, maps, strict=True)]
        for j, (title, img, cmap) in enumerate(panels):
            ax = axes[i][j]
            ax.set_axis_on()
            ax.imshow(img, cmap=cmap, interpolation="nearest")
            ext = (-0.5, w - 0.5, h - 0.5, -0.5) if cmap else (-0.5, out.shape[1] - 0.5, out.shape[0] - 0.5, -0.5)
            ax.contour(mask, levels=[0.5], colors="cyan", linewidths=0.6, extent=ext, origin="upper")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(title, fontsize=7)
        axes[i][0].set_ylabel(f"{LABELS.get(m, m)}\n{_label(rec)}", fontsize=5)
    _save(fig, path)
    return True
