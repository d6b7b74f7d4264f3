"""Stage ``stylize``: global stylization of each sampled image with FLUX.1-Kontext.

METHOD.md §1.3. Each cropped original is edited with the instruction
``stylize.instruction`` (paper: ``"make the image into {style} style"``), one style per
call, in batches, with a generator seeded per image (``seed + image_id``) so results do
not depend on batch composition. Output per split::

    <out>/<split>/images/<id>.png   the stylized image, same size as the input crop
    <out>/<split>/manifest.jsonl     {"id", "style", "stylized", "seed"} per image (written last)
    <out>/<split>/fingerprint.json   what produced the images (params, model, input manifest)

Resumable: images are written atomically one by one; a re-run with the same
fingerprint skips those already present (the DVC output is ``persist: true``); a
different fingerprint (params, model or inputs changed) starts from scratch.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

from regionroute.config import ModelsConfig, StylizeConfig
from regionroute.errors import DataError
from regionroute.io import prepare_resumable_dir, read_image, read_jsonl, write_image, write_jsonl

if TYPE_CHECKING:
    from diffusers import FluxKontextPipeline

__all__ = ["fingerprint", "stylize_batch", "stylize_splits"]


def fingerprint(cfg: StylizeConfig, models: ModelsConfig, style: str, manifest: Path) -> dict[str, Any]:
    """Everything that determines one split's stylized pixels (decides whether to resume)."""
    return {
        "style": style,
        "stylize": {k: getattr(cfg, k) for k in ("instruction", "steps", "guidance", "max_sequence_length", "seed")},
        "models": {"kontext": models.kontext, "dtype": models.dtype},
        "inputs_sha256": hashlib.sha256(manifest.read_bytes()).hexdigest(),
    }


def stylize_batch(
    pipe: FluxKontextPipeline, images: list[np.ndarray], prompts: list[str], seeds: list[int], cfg: StylizeConfig
) -> list[np.ndarray]:
    """Edit a batch of same-sized images at their own size (see :func:`regionroute.flux.pipeline.kontext_edit`)."""
    from regionroute.flux.pipeline import kontext_edit

    return kontext_edit(pipe, images, prompts, seeds, cfg.steps, cfg.guidance, cfg.max_sequence_length)


def stylize_splits(
    pipe: FluxKontextPipeline,
    samples: dict[str, Path],
    out_dir: Path,
    style: str,
    cfg: StylizeConfig,
    models: ModelsConfig,
) -> dict[str, int]:
    """Stylize every sample of every split in ``samples`` (name -> sample dir) into ``out_dir``."""
    for split in sorted(samples):
        if not (samples[split] / "manifest.jsonl").is_file():
            raise DataError(f"{samples[split] / 'manifest.jsonl'}: file not found (run the sample stage first)")
    prompt = cfg.instruction.format(style=style)
    counts = {}
    for split in sorted(samples):
        split_dir = prepare_resumable_dir(
            out_dir / split, fingerprint(cfg, models, style, samples[split] / "manifest.jsonl")
        )
        records = read_jsonl(samples[split] / "manifest.jsonl")
        (split_dir / "manifest.jsonl").unlink(missing_ok=True)
        todo = [r for r in records if not (split_dir / "images" / f"{r['id']}.png").is_file()]
        with tqdm(
            total=len(records), initial=len(records) - len(todo), desc=f"stylize {style} {split}", unit="img"
        ) as bar:
            for start in range(0, len(todo), cfg.batch_size):
                batch = todo[start : start + cfg.batch_size]
                images = [read_image(samples[split] / r["image"]) for r in batch]
                seeds = [cfg.seed + int(r["image_id"]) for r in batch]
                for r, out in zip(batch, stylize_batch(pipe, images, [prompt] * len(batch), seeds, cfg), strict=True):
                    write_image(split_dir / "images" / f"{r['id']}.png", out)
                bar.update(len(batch))
        write_jsonl(
            split_dir / "manifest.jsonl",
            (
                {
                    "id": r["id"],
                    "style": style,
                    "stylized": f"images/{r['id']}.png",
                    "seed": cfg.seed + int(r["image_id"]),
                    "instruction": prompt,
                }
                for r in records
            ),
        )
        counts[split] = len(todo)
    return counts
