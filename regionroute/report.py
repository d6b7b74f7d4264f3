"""Stage ``report``: ``results.md``, its figures, ``methods.csv`` and ``metrics/targets.json`` from the score tables.

Every cell is computed from ``data/scores/per_sample.csv`` (means with paired bootstrap
intervals over images, :mod:`regionroute.targets`) and ``by_size.csv``; figures come from
:mod:`regionroute.figures`; ``methods.csv`` (each target's metric per method) feeds the bar
charts of ``dvc plots show`` (dvc.yaml ``plots:``). Same inputs, same bytes. docs/method.md §7.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from regionroute.figures import LABELS, ordered
from regionroute.files import atomic_path, read_jsonl, write_json

__all__ = [
    "METHODS_CSV",
    "README_BEGIN",
    "README_END",
    "TINY_NOTE",
    "TOY_NOTE",
    "markdown_table",
    "method_means",
    "update_readme",
    "world_of",
    "write_report",
]

TOY_NOTE = (
    "> **Toy world.** A miniature FLUX.1-Kontext (the real diffusers classes, 7 M parameters, 64 px, 8 x 8 tokens) "
    "pretrained on CPU by this project (`toy/dvc.yaml`) so that the paper's premise holds: it restyles the whole "
    "image even when an object is named, and its style-token attention is diffuse. RegionRoute is trained and "
    "scored by the same stages as the paper configuration on the split `data.splits.eval` names (`test` by "
    "default, never used to choose a setting; settings are chosen on `val`: docs/toy.md), judged by a toy CLIP "
    "(RSM) and a toy Qwen2.5-VL (Table 2, `score.vlm: toy`; its accuracy in reports/toy/vlm.md), each trained "
    "on scenes of its own. It cannot show image quality on photos, behaviour at 1024 px with the 12 B model, or "
    "scores of the real judges."
)
TINY_NOTE = (
    "> **Tiny models.** Produced by tiny models with random weights built in code (`configs/tiny.yaml`) on the "
    "tiny synthetic dataset: they exercise the pipeline's mechanics and say nothing about the method."
)
README_BEGIN, README_END = "<!-- results:begin (written by the report stage) -->", "<!-- results:end -->"
METHODS_CSV = "methods.csv"  # in the report directory; dvc.yaml's bar charts read it

# column -> (header, format); arrows say which direction is better
COLUMNS: dict[str, tuple[str, str]] = {
    "rsm_text": ("RSM text ↑", "{:.4f}"), "rsm_image": ("RSM image ↑", "{:.4f}"),
    "mse_fg": ("MSE_fg to pseudo-GT ↓", "{:.5f}"), "lpips_bg": ("LPIPS_bg ↓", "{:.4f}"),
    "mse_bg": ("MSE_bg ↓", "{:.5f}"), "psnr_bg": ("PSNR_bg ↑", "{:.2f}"), "ssim_bg": ("SSIM_bg ↑", "{:.4f}"),
    "lpips_bg_spatial": ("LPIPS_bg spatial map ↓", "{:.4f}"),
    "q1": ("Q1 object in style ↑", "{:.3f}"), "q2": ("Q2 background in style ↓", "{:.3f}"),
    "q3": ("Q3 object in other style ↓", "{:.3f}"), "q4": ("Q4 background in other style ↓", "{:.3f}"),
    "mse_bg_piebench": ("MSE (PIE-Bench masking) ↓", "{:.5f}"),
    "lpips_bg_piebench": ("LPIPS (PIE-Bench masking) ↓", "{:.4f}"),
    "attn_mass_in": ("attention mass in mask ↑", "{:.4f}"), "attn_iou": ("attention IoU ↑", "{:.4f}"),
}  # fmt: skip
TABLE1 = ("rsm_text", "rsm_image", "mse_fg", "lpips_bg", "mse_bg", "psnr_bg", "ssim_bg", "lpips_bg_spatial")
TABLE2 = ("q1", "q2", "q3", "q4")
PIEBENCH = ("mse_bg_piebench", "lpips_bg_piebench")
ATTENTION = ("attn_mass_in", "attn_iou")


def world_of(kontext: str, clip: str, lpips: str, vlm: str) -> str:
    """``tiny`` (any tiny model), ``toy`` (the toy base) or ``real``."""
    if "tiny" in (kontext, clip, lpips):
        return "tiny"
    return "toy" if kontext == "toy" else "real"


def _cell(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "-"
    return fmt.format(value)


def markdown_table(rows: list[list[str]], header: list[str]) -> str:
    """A GitHub markdown table (first column left-aligned, the rest right-aligned)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def method_means(per_sample: pd.DataFrame) -> pd.DataFrame:
    """One row per method (the figures' order): the mean of each target's metric over its rows, NaN-skipping."""
    from regionroute.targets import TARGETS

    metrics = [m for m in dict.fromkeys(t.metric for t in TARGETS) if m in per_sample.columns]
    means = per_sample.groupby("method")[metrics].mean()
    return means.loc[ordered(list(means.index))]


def targets_table(targets: dict[str, dict], per_sample: pd.DataFrame) -> str:
    """Target | RegionRoute | reference | ratio [95% CI] | bound | verdict (computed in :mod:`regionroute.targets`)."""
    from regionroute.targets import TARGETS

    means = method_means(per_sample)
    rows = []
    for t in TARGETS:
        got = targets.get(t.metric)
        if got is None or got["ratio"] is None:
            rows.append([t.what, "-", "-", "-", t.bound, "not measured"])
            continue
        a, b = means.loc[t.method, t.metric], means.loc[t.reference, t.metric]
        ratio = f"{got['ratio']:.3f} [{got['lo']:.3f}, {got['hi']:.3f}]"
        verdict = got["verdict"] if got["verdict"] == "holds" else f"**{got['verdict']}**"
        rows.append([t.what, f"{a:.4f}", f"{b:.4f} ({t.reference})", ratio, t.bound, verdict])
    return markdown_table(rows, ["target", "RegionRoute", "reference", "ratio [95% CI]", "target", "verdict"])


def _method_table(per_sample: pd.DataFrame, columns: tuple[str, ...], seed: int) -> str:
    """Per method: the mean of each column with its 95% bootstrap interval over images, and n."""
    from regionroute.targets import bootstrap_means

    header = ["method", *(COLUMNS[c][0] for c in columns), "n"]
    rows = []
    for m in ordered(sorted(per_sample["method"].unique())):
        group = per_sample[per_sample["method"] == m]
        if not any(group[c].notna().any() for c in columns):
            continue
        cells = []
        for c in columns:
            mean, lo, hi = bootstrap_means(per_sample, m, c, seed)
            fmt = COLUMNS[c][1]
            cells.append("-" if not np.isfinite(mean) else f"{fmt.format(mean)} [{fmt.format(lo)}, {fmt.format(hi)}]")
        label = f"{LABELS.get(m, m)} (uses the GT mask: upper bound)" if m == "oracle" else LABELS.get(m, m)
        rows.append([label, *cells, str(len(group))])
    return markdown_table(rows, header)


def _size_table(by_size: pd.DataFrame) -> str:
    cols = ("rsm_text", "lpips_bg", "mse_bg", "q1", "attn_mass_in")
    rows = []
    for m in ordered(sorted(by_size["method"].unique())):
        for _, r in by_size[by_size["method"] == m].iterrows():
            rows.append([m, str(r["size"]), str(int(r["n"])), *(_cell(float(r[c]), COLUMNS[c][1]) for c in cols)])
    return markdown_table(rows, ["method", "object size", "n", *(COLUMNS[c][0] for c in cols)])


def update_readme(readme: Path, block: str, begin: str = README_BEGIN, end: str = README_END) -> None:
    """Replace the text between the README's markers ``begin`` and ``end`` (the results') with ``block``."""
    text = readme.read_text()
    if begin not in text or end not in text:
        from regionroute.errors import UserError

        raise UserError(f"{readme}: no '{begin}' ... '{end}' markers to write between")
    head, rest = text.split(begin, 1)
    tail = rest.split(end, 1)[1]
    with atomic_path(readme) as tmp:
        tmp.write_text(f"{head}{begin}\n{block}\n{end}{tail}")


def write_report(
    out_dir: Path,
    per_sample_path: Path,
    by_size_path: Path,
    records_path: Path,
    methods: dict[str, Path],
    targets_path: Path,
    world: str,
    seed: int = 0,
    readme: Path | None = None,
    random_vlm: bool = False,
) -> Path:
    """Write ``results.md`` and its figures into ``out_dir`` and the judged targets to ``targets_path``.

    ``world``: ``tiny``, ``toy`` (adds the table of its targets) or ``real`` (:func:`world_of`);
    ``seed`` draws the bootstrap resamples and the figures' rows; ``readme``: a README whose
    result markers receive the targets table.
    ``random_vlm`` (``score.vlm: tiny``): Table 2 is marked not meaningful and Q1/Q2 are not judged.
    """
    from regionroute.figures import attention_grid, draw_rows, example_grid
    from regionroute.targets import TARGETS, judge_targets

    per_sample = pd.read_csv(per_sample_path, dtype={"sample_id": str, "id": str})
    by_size = pd.read_csv(by_size_path)
    records = read_jsonl(records_path)
    vlm_targets = ("q1", "q2")
    judged = tuple(t for t in TARGETS if not (random_vlm and t.metric in vlm_targets))
    targets = judge_targets(per_sample, seed, judged)
    write_json(targets_path, targets)
    with atomic_path(out_dir / METHODS_CSV) as tmp:
        method_means(per_sample).to_csv(tmp, float_format="%.6g")
    fig_dir = out_dir / "figures"
    if fig_dir.exists():
        shutil.rmtree(fig_dir)
    rows = draw_rows(records, per_sample, per_tercile=2, seed=seed)
    example_grid(fig_dir / "grid.png", rows, records_path.parent, methods)
    firsts = [r for i, r in enumerate(rows) if all(q["why"] != r["why"] for q in rows[:i])]  # one per tercile, worst
    has_attention = attention_grid(fig_dir / "attention.png", firsts, records_path.parent, methods)
    n_images = per_sample["sample_id"].nunique()
    n_pairs = int(per_sample.groupby("method").size().max())
    parts = ["# RegionRoute results", "", {"tiny": TINY_NOTE, "toy": TOY_NOTE}.get(world, ""), ""]
    parts += [
        f"Evaluation: {n_images} images x {n_pairs // max(n_images, 1)} styles = {n_pairs} pairs per method. "
        "Written by `dvc repro` (stage `report`) from `data/scores/`; intervals are 95% paired bootstrap "
        "intervals over images (an image's styles resampled together); do not edit by hand.",
        "",
    ]
    if world == "toy":
        summary = _targets_section(targets, per_sample, n_images)
        if random_vlm:
            summary += (
                "\n\nQ1 and Q2 are not judged: the VLM judge is the tiny Qwen2.5-VL with random weights "
                "(`score.vlm: tiny`; the toy world's trained judge is `score.vlm: toy`)."
            )
        parts += ["## The toy world's targets", "", summary, ""]
        if readme is not None:
            update_readme(readme, summary)
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
        _method_table(per_sample, TABLE1, seed),
        "",
        "## Table 2: VLM judge (mean P(yes), Qwen2.5-VL)",
        "",
        "Q1 `Is the {object} in {style} style?`, Q2 `Is the background in {style} style?`, Q3/Q4 the same with "
        "a negative style drawn (seeded) from the other styles. P(yes) from the next-token logits over the "
        "yes/no tokens. Ideal: high Q1, low Q2-Q4.",
        "",
    ]
    if world == "tiny" or random_vlm:
        parts += ["> Not meaningful here: the judge is the tiny Qwen2.5-VL with random weights.", ""]
    parts += [
        _method_table(per_sample, TABLE2, seed), "",
        "## PIE-Bench-style background columns", "",
        "Images multiplied by the background mask and averaged over ALL pixels (PIE-Bench's convention).", "",
        _method_table(per_sample, PIEBENCH, seed), "",
        "## Attention localization", "",
        "Mean style-token attention map over the saved denoising steps: share of its mass inside the "
        "(area-averaged) mask, and fuzzy IoU of the map thresholded at its mean.", "",
        _method_table(per_sample, ATTENTION, seed), "",
        "## By object size (COCO buckets: small < 32², medium < 96², large)", "",
        _size_table(by_size), "",
        "## Examples", "",
        "Rows drawn at random (seeded): two images from each third of the object sizes, each with a random "
        "style, and the pair where RegionRoute's RSM-text is lowest.", "",
        "![input, pseudo-GT and each method](figures/grid.png)", "",
    ]  # fmt: skip
    if has_attention:
        parts += [
            "Style-token attention (paper Fig. 6) for one image per size third and the worst pair: per model, "
            "the output, the mean map and the map at each saved denoising step; the object's mask in cyan.",
            "",
            "![style-token attention over the denoising steps](figures/attention.png)",
            "",
        ]
    md = out_dir / "results.md"
    with atomic_path(md) as tmp:
        tmp.write_text("\n".join(parts))
    return md


def _targets_section(targets: dict[str, dict], per_sample: pd.DataFrame, n_images: int) -> str:
    verdicts = [v["verdict"] for v in targets.values()]
    held = sum(v == "holds" for v in verdicts)
    return "\n".join([
        f"RegionRoute against the base it was trained on (Q1: against the oracle), on {n_images} evaluation images; "
        f"{held} of {len(verdicts)} targets hold over their whole 95% interval. Computed by the `report` stage "
        "(`metrics/targets.json`), not typed.",
        "",
        targets_table(targets, per_sample),
    ])  # fmt: skip
