"""Stage ``score``: RSES components, the VLM judge and attention localization for every method (docs/method.md §7).

:func:`score_methods` scores each method's ``infer`` output pair by pair (models built once, batches
of images; data-parallel over contiguous row slices, :mod:`regionroute.distributed`);
:func:`write_scores` writes the per-sample CSV (every column), the size-stratified CSV and the
per-method means of :data:`SUMMARY_COLUMNS` (``metrics/score.json``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from regionroute.config import ScoreConfig
from regionroute.errors import DataError
from regionroute.files import atomic_path, read_image, read_jsonl, read_mask, write_json
from regionroute.metrics.attention import ATTENTION_COLUMNS
from regionroute.metrics.rses import RSES_COLUMNS
from regionroute.metrics.vlm import QUESTION_COLUMNS

__all__ = ["METRIC_COLUMNS", "SUMMARY_COLUMNS", "score_methods", "summarize", "write_scores"]

#: Every per-method metric: RSES components, the VLM judge's four questions, attention localization.
METRIC_COLUMNS: tuple[str, ...] = (*RSES_COLUMNS, *QUESTION_COLUMNS, *ATTENTION_COLUMNS)
#: The metrics file's per-method means: the figures a user compares (every target's metric among them). PSNR/SSIM,
#: the spatial-map and PIE-Bench variants and the attention IoU stay in the per-sample table and results.md.
SUMMARY_COLUMNS: tuple[str, ...] = ("rsm_text", "rsm_image", "mse_fg", "lpips_bg", "mse_bg", *QUESTION_COLUMNS,
                                    "attn_mass_in")  # fmt: skip


def _attention(manifest_dir: Path, rows: list[dict[str, Any]], masks: list[np.ndarray]) -> pd.DataFrame:
    from regionroute.losses import downsample_mask
    from regionroute.metrics.attention import attention_localization

    out = {c: [np.nan] * len(rows) for c in ATTENTION_COLUMNS}
    have = [i for i, r in enumerate(rows) if r.get("attention")]
    if have:
        maps = []
        for i in have:
            with np.load(manifest_dir / rows[i]["attention"]) as z:
                maps.append(torch.from_numpy(z["mean"]))
        maps_t = torch.stack(maps)  # (B, h, w)
        grid = downsample_mask(torch.from_numpy(np.stack([masks[i] for i in have])).float(), *maps_t.shape[1:])
        loc = attention_localization(maps_t, grid)
        for j, i in enumerate(have):
            out["attn_mass_in"][i] = float(loc["mass_in"][j])
            out["attn_iou"][i] = float(loc["iou"][j])
    return pd.DataFrame(out)


def score_methods(
    methods: dict[str, Path], records_path: Path, cfg: ScoreConfig, styles: tuple[str, ...], chunk: int = 64
) -> pd.DataFrame:
    """Per-sample scores of every method (``name -> infer output dir``), one row per method x pair x style.

    Under several processes each scores its slice of the rows; every rank returns the whole table.
    """
    from regionroute import distributed as dist
    from regionroute.metrics.rses import RSESScorer
    from regionroute.metrics.size import add_size_bucket
    from regionroute.metrics.vlm import VLMJudge

    records = {r["id"]: r for r in read_jsonl(records_path)}
    root = records_path.parent
    jobs: list[tuple[str, Path, dict[str, Any]]] = []  # (method, infer dir, manifest row), in output order
    for method, out_dir in methods.items():
        rows = read_jsonl(out_dir / "manifest.jsonl")
        missing = [r["id"] for r in rows if r["id"] not in records]
        if missing:
            raise DataError(f"{out_dir / 'manifest.jsonl'}: pair {missing[0]} is not in {records_path}")
        jobs += [(method, out_dir, r) for r in rows]
    mine = dist.shard(jobs)
    with dist.main_first():  # every rank loads the models (a rank with no rows too: the block has barriers)
        rses = RSESScorer(
            cfg.clip, cfg.lpips, device=cfg.device, dilate=cfg.dilate, template=cfg.template, batch_size=cfg.batch_size
        )
        judge = VLMJudge(
            cfg.vlm,
            device=cfg.device,
            dtype=cfg.vlm_dtype,
            batch_size=cfg.vlm_batch_size,
            seed=cfg.seed,
            max_pixels=cfg.vlm_max_pixels,
        )
    frames = []
    for method, out_dir in methods.items():
        rows = [r for m, _, r in mine if m == method]
        starts = range(0, len(rows), chunk)
        for start in tqdm(starts, desc=f"score {method}", unit="chunk", disable=not dist.is_main() or not rows):
            part = rows[start : start + chunk]
            recs = [records[r["id"]] for r in part]
            edited = [read_image(out_dir / r["image"]) for r in part]
            sources = [read_image(root / r["original"]) for r in recs]
            masks = [read_mask(root / r["mask"]) for r in recs]
            pgt = [read_image(root / r["pseudo_gt"]) for r in recs]
            ids = [r["id"] for r in part]
            frame = rses.score(edited, sources, masks, [r["style"] for r in part], pseudo_gt=pgt, ids=ids)
            vlm = judge.score(
                edited, [r["object"] for r in part], [r["style"] for r in part], [r["sample_id"] for r in part], styles
            ).to_frame(ids)
            frame = frame.merge(vlm, on="id")
            frame = pd.concat([frame.reset_index(drop=True), _attention(out_dir, part, masks)], axis=1)
            frame.insert(0, "method", method)
            frame.insert(2, "sample_id", [r["sample_id"] for r in recs])  # the bootstrap's unit: an image
            frame["object"] = [r["object"] for r in recs]
            frame["area"] = [float(r["area"]) for r in recs]
            frames.append(frame)
    frames = [f for part in dist.gather(frames) for f in part]  # rank order = row order (contiguous slices)
    return add_size_bucket(pd.concat(frames, ignore_index=True))


def summarize(df: pd.DataFrame) -> dict[str, dict[str, float]]:
    """Per-method means of :data:`SUMMARY_COLUMNS` (NaN-skipping; a metric with no value for a method is left out)
    and counts."""
    out: dict[str, dict[str, float]] = {}
    for method, group in df.groupby("method", sort=True):
        means = {c: round(float(group[c].mean()), 6) for c in SUMMARY_COLUMNS if group[c].notna().any()}
        out[str(method)] = {"n": len(group), **means}
    return out


def write_scores(df: pd.DataFrame, per_sample: Path, by_size: Path, metrics: Path) -> None:
    """Write the per-sample CSV, the size-stratified CSV and the per-method JSON metrics, atomically."""
    from regionroute.metrics.size import stratify

    for path, frame in ((per_sample, df), (by_size, stratify(df, METRIC_COLUMNS))):
        with atomic_path(path) as tmp:
            frame.to_csv(tmp, index=False, float_format="%.6g")
    write_json(metrics, summarize(df))
