"""Stage ``report``: markdown tables and figures in ``reports/`` from the metrics files only.

No number is typed by hand: every table cell comes from the ``score`` stage's per-method
metrics JSON and size-stratified CSV. Output is deterministic (same inputs, same bytes).

* ``results.md``: Table 1 (RSES components), Table 2 (VLM judge), the PIE-Bench-style
  columns, attention localization, the size-stratified table, and the figures;
* ``figures/grid.png``: input | pseudo-GT | one column per method, for a few pairs;
* ``figures/attention.png``: the style-token attention over time of some of those pairs,
  per model method, with the object's mask outlined (paper Fig. 6);
* in the toy world, the table of its targets (RegionRoute against the toy base).

The ablation table across experiments is written by ``regionroute ablations`` (it needs
``dvc exp show``, i.e. experiments outside this stage's run).
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from regionroute.files import atomic_path, read_image, read_json, read_jsonl

__all__ = ["TINY_NOTE", "TOY_NOTE", "markdown_table", "toy_claims", "world_of", "write_report"]

TOY_NOTE = (
    "> **Toy world.** These numbers come from the toy world: a miniature FLUX.1-Kontext (the real diffusers "
    "classes, 7 M parameters, 64 px, 8 x 8 tokens) pretrained on CPU by this project (`toy/dvc.yaml`) so that "
    "the paper's premise holds: it restyles the whole image even when an object is named, and its style-token "
    "attention is diffuse. RegionRoute is then trained and evaluated by the same stages as the paper "
    "configuration, with a toy CLIP judge trained on styled regions (`score.clip: toy`) and the official "
    "LPIPS AlexNet weights. Its loss is the paper's except where `params.yaml` says otherwise: the toy "
    "default weights the object's pixels in the flow loss (`loss.object_weight`; with the paper's unweighted "
    "loss the experts cancel the style on the object too, see docs/toy.md). What this shows: whether the "
    "method localizes a style in a model whose premise matches the paper's, and every ablation's effect, "
    "measured. What it cannot show: image quality on real photos, behaviour at 1024 px with a 12 B model, or "
    "CLIP/VLM scores with real weights (the VLM judge here is the tiny random Qwen2.5-VL: Table 2 is not "
    "meaningful). Paper configuration: `cp configs/paper.yaml params.yaml && dvc repro`."
)
TINY_NOTE = (
    "> **Tiny models.** These results were produced by tiny models with random weights, built in code "
    "(`tiny` in `params.yaml`), on the tiny synthetic dataset. They exercise the pipeline's mechanics and "
    "say nothing about image quality or about the method. The default `params.yaml` (the toy world) shows "
    "the method working; the paper configuration is `cp configs/paper.yaml params.yaml && dvc repro`."
)
#: (metric, relation, factor, what): the toy world's targets, RegionRoute against the base model.
TOY_TARGETS = (
    ("mse_bg", "<=", 0.5, "background MSE at most half the base's"),
    ("lpips_bg", "<=", 0.5, "background LPIPS at most half the base's"),
    ("mse_fg", "<=", 1.5, "inside the object, match to the pseudo-GT within 1.5x the base's"),
    ("rsm_text", "within", 0.1, "toy-CLIP RSM-text within 10% of the base's"),
    ("attn_mass_in", ">=", 3.0, "style-token attention mass inside the mask at least 3x the base's"),
)


def world_of(kontext: str, clip: str, lpips: str, vlm: str) -> str:
    """``tiny`` (any tiny model), ``toy`` (the toy base) or ``real``."""
    if "tiny" in (kontext, clip, lpips):
        return "tiny"
    return "toy" if kontext == "toy" else "real"


def toy_claims(metrics: dict[str, dict[str, float]], method: str = "regionroute", base: str = "base") -> str:
    """The toy world's targets as a table: both values, their ratio, and whether the target holds."""
    rows = []
    for col, rel, factor, what in TOY_TARGETS:
        a, b = metrics.get(method, {}).get(col), metrics.get(base, {}).get(col)
        if a is None or b is None or not b:
            rows.append([what, "-", "-", "-", "not measured"])
            continue
        ratio = a / b
        holds = abs(ratio - 1) <= factor if rel == "within" else (ratio <= factor if rel == "<=" else ratio >= factor)
        target = f"{1 - factor:.2f}-{1 + factor:.2f}" if rel == "within" else f"{rel} {factor:g}"
        verdict = "holds" if holds else "**does not hold**"
        rows.append([what, f"{a:.5f}", f"{b:.5f}", f"{ratio:.3f} ({target})", verdict])
    return markdown_table(rows, [f"target ({method} vs {base})", method, base, "ratio", "verdict"])


METHOD_ORDER = ("base", "regionroute", "oracle")
# (column, header, format); arrows say which direction is better
TABLE1 = (("rsm_text", "RSM text ↑", "{:.4f}"), ("rsm_image", "RSM image ↑", "{:.4f}"),
          ("mse_fg", "MSE_fg to pseudo-GT ↓", "{:.5f}"),
          ("lpips_bg", "LPIPS_bg ↓", "{:.4f}"), ("mse_bg", "MSE_bg ↓", "{:.5f}"), ("psnr_bg", "PSNR_bg ↑", "{:.2f}"),
          ("ssim_bg", "SSIM_bg ↑", "{:.4f}"), ("lpips_bg_spatial", "LPIPS_bg spatial map ↓", "{:.4f}"))  # fmt: skip
TABLE2 = (("q1", "Q1 object in style ↑", "{:.3f}"), ("q2", "Q2 background in style ↓", "{:.3f}"),
          ("q3", "Q3 object in other style ↓", "{:.3f}"),
          ("q4", "Q4 background in other style ↓", "{:.3f}"))  # fmt: skip
PIEBENCH = (("mse_bg_piebench", "MSE (PIE-Bench masking) ↓", "{:.5f}"),
            ("lpips_bg_piebench", "LPIPS (PIE-Bench masking) ↓", "{:.4f}"))  # fmt: skip
ATTENTION = (("attn_mass_in", "attention mass in mask ↑", "{:.4f}"), ("attn_iou", "attention IoU ↑", "{:.4f}"))


def _ordered(methods: list[str]) -> list[str]:
    return [m for m in METHOD_ORDER if m in methods] + sorted(m for m in methods if m not in METHOD_ORDER)


def _cell(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "-"
    return fmt.format(value)


def markdown_table(rows: list[list[str]], header: list[str]) -> str:
    """A GitHub markdown table (first column left-aligned, the rest right-aligned)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _method_table(metrics: dict[str, dict[str, float]], columns: tuple, with_n: bool = False) -> str:
    header = ["method", *(h for _, h, _ in columns)] + (["n"] if with_n else [])
    rows = []
    for m in _ordered(list(metrics)):
        label = f"{m} (uses the GT mask: upper bound)" if m == "oracle" else m
        row = [label, *(_cell(metrics[m].get(c), f) for c, _, f in columns)]
        rows.append(row + ([str(int(metrics[m]["n"]))] if with_n else []))
    return markdown_table(rows, header)


def _size_table(by_size: pd.DataFrame) -> str:
    cols = (("rsm_text", "RSM text", "{:.4f}"), ("lpips_bg", "LPIPS_bg", "{:.4f}"), ("mse_bg", "MSE_bg", "{:.5f}"),
            ("q1", "Q1", "{:.3f}"), ("attn_mass_in", "attn mass in", "{:.4f}"))  # fmt: skip
    rows = []
    for m in _ordered(sorted(by_size["method"].unique())):
        for _, r in by_size[by_size["method"] == m].iterrows():
            rows.append([m, str(r["size"]), str(int(r["n"])), *(_cell(float(r[c]), f) for c, _, f in cols)])
    return markdown_table(rows, ["method", "object size", "n", *(h for _, h, _ in cols)])


def _grid(path: Path, pairs: list[dict[str, Any]], root: Path, methods: dict[str, Path]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = _ordered(list(methods))
    label = {"base": "base (Kontext)", "regionroute": "RegionRoute", "oracle": "oracle (GT mask)"}
    cols = ["input", "pseudo-GT", *(label.get(m, m) for m in names)]
    fig, axes = plt.subplots(len(pairs), len(cols), figsize=(1.9 * len(cols), 2.0 * len(pairs)), squeeze=False)
    for i, rec in enumerate(pairs):
        images = [read_image(root / rec["original"]), read_image(root / rec["pseudo_gt"])]
        images += [read_image(methods[m] / "images" / f"{rec['id']}.png") for m in names]
        for j, (ax, img) in enumerate(zip(axes[i], images, strict=True)):
            ax.imshow(img, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(cols[j], fontsize=8)
        axes[i][0].set_ylabel(f"{rec['object']} -> {rec['style']}", fontsize=7)
    _save(fig, path)


def _save(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, metadata={"Software": None})
    plt.close(fig)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.getvalue())


def _attention_grid(path: Path, pairs: list[dict[str, Any]], root: Path, methods: dict[str, Path]) -> bool:
    """Paper Fig. 6 at a glance: per pair, per model method, output | mean map | each step, mask outlined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from regionroute.files import read_mask

    rows = []
    for rec in pairs:
        for m in _ordered(list(methods)):
            npz = methods[m] / "attention" / f"{rec['id']}.npz"
            if npz.is_file():
                with np.load(npz) as z:
                    rows.append((rec, m, z["maps"], z["mean"], z["steps"]))
    if not rows:
        return False
    n_steps = len(rows[0][4])
    fig, axes = plt.subplots(len(rows), 2 + n_steps, figsize=(1.5 * (2 + n_steps), 1.6 * len(rows)), squeeze=False)
    for i, (rec, m, maps, mean, steps) in enumerate(rows):
        mask = read_mask(root / rec["mask"]).astype(float)
        out = read_image(methods[m] / "images" / f"{rec['id']}.png")
        h, w = mean.shape
        panels = [("output", out, None), ("mean", mean, "magma")]
        panels += [(f"step {s}", a, "magma") for s, a in zip(steps, maps, strict=True)]
        for j, (title, img, cmap) in enumerate(panels):
            ax = axes[i][j]
            ax.imshow(img, cmap=cmap, interpolation="nearest")
            ext = (-0.5, w - 0.5, h - 0.5, -0.5) if cmap else (-0.5, out.shape[1] - 0.5, out.shape[0] - 0.5, -0.5)
            ax.contour(mask, levels=[0.5], colors="cyan", linewidths=0.6, extent=ext, origin="upper")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(title, fontsize=7)
        axes[i][0].set_ylabel(f"{m}\n{rec['object']} -> {rec['style']}", fontsize=6)
    _save(fig, path)
    return True


def _pick_pairs(records: list[dict[str, Any]], k: int) -> list[dict[str, Any]]:
    """The ``k`` pairs with the largest objects, one per sample, styles cycling (deterministic)."""
    by_sample: dict[str, dict[str, Any]] = {}
    for r in sorted(records, key=lambda r: (-float(r["area"]), r["id"])):
        by_sample.setdefault(r["sample_id"], r)
    chosen = list(by_sample.values())[:k]
    styles = sorted({r["style"] for r in records})
    out = []
    for i, r in enumerate(chosen):
        wanted = styles[i % len(styles)]
        out.append(next((x for x in records if x["sample_id"] == r["sample_id"] and x["style"] == wanted), r))
    return out


def write_report(
    out_dir: Path,
    metrics_path: Path,
    by_size_path: Path,
    records_path: Path,
    methods: dict[str, Path],
    world: str,
    n_examples: int = 8,
) -> Path:
    """Write ``results.md`` and its figures into ``out_dir``; returns the markdown path.

    ``world``: ``tiny`` (tiny random models), ``toy`` (the toy world: adds the table of its
    targets) or ``real`` (:func:`world_of`).
    """
    metrics = read_json(metrics_path)
    by_size = pd.read_csv(by_size_path)
    records = read_jsonl(records_path)
    fig_dir = out_dir / "figures"
    if fig_dir.exists():
        shutil.rmtree(fig_dir)
    pairs = _pick_pairs(records, n_examples)
    _grid(fig_dir / "grid.png", pairs, records_path.parent, methods)
    has_attention = _attention_grid(fig_dir / "attention.png", pairs[:4], records_path.parent, methods)
    parts = ["# RegionRoute results", ""]
    if world == "tiny":
        parts += [TINY_NOTE, ""]
    elif world == "toy":
        parts += [TOY_NOTE, ""]
    n_pairs = max(int(v["n"]) for v in metrics.values()) if metrics else 0
    parts += [
        f"Held-out pairs x styles per method: {n_pairs}. Generated by `dvc repro` (stage `report`) from "
        "`metrics/score.json` and `data/scores/`; do not edit by hand.",
        "",
    ]
    if world == "toy":
        parts += [
            "## The toy world's targets",
            "",
            "RegionRoute against the toy base it was trained on (`kontext`), on the held-out pairs; ratios from "
            "the metrics below, verdicts computed, not typed.",
            "",
            toy_claims(metrics),
            "",
        ]
    parts += [
        "## Table 1: Regional Style Editing Score (RSES components)",
        "",
        "RSM: CLIP cosine similarity of the target region (mask bounding box, outside-mask pixels set to the "
        "CLIP mean colour) with `an image in {style} style` (text) or with the pseudo-GT region (image). "
        "MSE_fg: pixels against the pseudo-GT inside the mask (model-free). `_bg` columns: over background "
        "pixels only (1 - mask, dilated); images in [0, 1]. LPIPS_bg: the edit with everything but the "
        "background restored from the source (an exact background scores 0); the plain spatial-map variant "
        "also charges the background for the edited object its coarse layers see.",
        "",
        _method_table(metrics, TABLE1, with_n=True),
        "",
        "## Table 2: VLM judge (mean P(yes), Qwen2.5-VL)",
        "",
        "Q1 `Is the {object} in {style} style?`, Q2 `Is the background in {style} style?`, Q3/Q4 the same with "
        "a negative style drawn (seeded) from the other styles. P(yes) from the next-token logits over the "
        "yes/no tokens. Ideal: high Q1, low Q2-Q4.",
        "",
    ]
    if world != "real":
        parts += ["> Not meaningful here: the judge is the tiny Qwen2.5-VL with random weights.", ""]
    parts += [
        _method_table(metrics, TABLE2),
        "",
        "## PIE-Bench-style background columns",
        "",
        "Images multiplied by the background mask and averaged over ALL pixels (PIE-Bench's convention), "
        "for comparison with papers that use it.",
        "",
        _method_table(metrics, PIEBENCH),
        "",
        "## Attention localization",
        "",
        "Mean style-token attention map over the saved denoising steps: share of its mass inside the "
        "(area-averaged) mask, and fuzzy IoU of the map thresholded at its mean.",
        "",
        _method_table({m: v for m, v in metrics.items() if "attn_mass_in" in v}, ATTENTION),
        "",
        "## By object size (COCO buckets: small < 32², medium < 96², large)",
        "",
        _size_table(by_size),
        "",
        "## Examples",
        "",
        "![input, pseudo-GT and each method](figures/grid.png)",
        "",
    ]
    if has_attention:
        parts += [
            "Style-token attention (paper Fig. 6): per pair and model, the output, the mean map, and the map at "
            "each saved denoising step; the object's mask outlined in cyan.",
            "",
            "![style-token attention over the denoising steps](figures/attention.png)",
            "",
        ]
    parts += [
        "## Ablations",
        "",
        "Run the ablations as experiments, then `regionroute ablations` writes "
        "`reports/ablations.md` from `dvc exp show` (see the README).",
        "",
    ]
    md = out_dir / "results.md"
    with atomic_path(md) as tmp:
        tmp.write_text("\n".join(parts))
    return md
