"""Stage ``report``: markdown tables and figures in ``reports/`` from the metrics files only.

No number is typed by hand: every table cell comes from the ``score`` stage's per-method
metrics JSON and size-stratified CSV. Output is deterministic (same inputs, same bytes).

* ``results.md``: Table 1 (RSES components), Table 2 (VLM judge), the PIE-Bench-style
  columns, attention localization, the size-stratified table, and the figures;
* ``figures/grid.png``: input | pseudo-GT | one column per method, for a few pairs;
* ``figures/attention_<method>_<id>.png``: the attention-over-time figures of those pairs.

The ablation table across experiments is written by ``regionroute ablations`` (it needs
``dvc exp show``, i.e. experiments outside this stage's run).
"""

from __future__ import annotations

import io as _io
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from regionroute.io import atomic_path, read_image, read_json, read_jsonl

__all__ = ["TINY_NOTE", "markdown_table", "write_report"]

TINY_NOTE = (
    "> **Demo numbers.** These results were produced by tiny models with random weights, built in code "
    "(`tiny` in `params.yaml`), on the synthetic demo dataset. They exercise the pipeline's mechanics and "
    "say nothing about image quality or about the method. Run the paper configuration "
    "(`cp configs/paper.yaml params.yaml && dvc repro`) for meaningful numbers."
)
METHOD_ORDER = ("kontext", "regionroute", "oracle")
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
    cols = ["input", "pseudo-GT", *names]
    fig, axes = plt.subplots(len(pairs), len(cols), figsize=(1.9 * len(cols), 2.0 * len(pairs)), squeeze=False)
    for i, rec in enumerate(pairs):
        images = [read_image(root / rec["original"]), read_image(root / rec["pseudo_gt"])]
        images += [read_image(methods[m] / "images" / f"{rec['id']}.png") for m in names]
        for j, (ax, img) in enumerate(zip(axes[i], images, strict=True)):
            ax.imshow(img)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(cols[j], fontsize=8)
        axes[i][0].set_ylabel(f"{rec['object']} -> {rec['style']}", fontsize=7)
    fig.tight_layout()
    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, metadata={"Software": None})
    plt.close(fig)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.getvalue())


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
    tiny: bool,
    n_examples: int = 4,
) -> Path:
    """Write ``results.md`` and its figures into ``out_dir``; returns the markdown path."""
    metrics = read_json(metrics_path)
    by_size = pd.read_csv(by_size_path)
    records = read_jsonl(records_path)
    fig_dir = out_dir / "figures"
    if fig_dir.exists():
        shutil.rmtree(fig_dir)
    pairs = _pick_pairs(records, n_examples)
    _grid(fig_dir / "grid.png", pairs, records_path.parent, methods)
    att_figs = []
    for m in _ordered(list(methods)):
        for rec in pairs[:2]:
            src = methods[m] / "figures" / f"{rec['id']}.png"
            if src.is_file():
                dst = fig_dir / f"attention_{m}_{rec['id']}.png"
                with atomic_path(dst) as tmp:
                    tmp.write_bytes(src.read_bytes())
                att_figs.append((m, rec, dst.name))
    parts = ["# RegionRoute results", ""]
    if tiny:
        parts += [TINY_NOTE, ""]
    n_pairs = max(int(v["n"]) for v in metrics.values()) if metrics else 0
    parts += [
        f"Held-out pairs x styles per method: {n_pairs}. Generated by `dvc repro` (stage `report`) from "
        "`metrics/score.json` and `data/scores/`; do not edit by hand.",
        "",
        "## Table 1: Regional Style Editing Score (RSES components)",
        "",
        "RSM: CLIP cosine similarity of the target region (mask bounding box, outside-mask pixels set to the "
        "CLIP mean colour) with `an image in {style} style` (text) or with the pseudo-GT region (image). "
        "`_bg` columns: over background pixels only (1 - mask, dilated); images in [0, 1].",
        "",
        _method_table(metrics, TABLE1, with_n=True),
        "",
        "## Table 2: VLM judge (mean P(yes), Qwen2.5-VL)",
        "",
        "Q1 `Is the {object} in {style} style?`, Q2 `Is the background in {style} style?`, Q3/Q4 the same with "
        "a negative style drawn (seeded) from the other styles. P(yes) from the next-token logits over the "
        "yes/no tokens. Ideal: high Q1, low Q2-Q4.",
        "",
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
    for m, rec, name in att_figs:
        parts += [f"Attention over time, {m}: {rec['object']} -> {rec['style']}", "", f"![{m}](figures/{name})", ""]
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
