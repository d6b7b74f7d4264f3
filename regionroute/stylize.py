"""Stage ``stylize``: global stylization of each sampled image with FLUX.1-Kontext (docs/method.md §1.3).

:func:`stylize_splits` edits every crop with ``stylize.instruction`` at its own size, in batches
fixed by the sorted ids and ``stylize.batch_size`` (a resumed run writes an uninterrupted run's
bytes), each image with the noise ``item_seed("stylize", stylize.seed, image_id)``; writes
``<out>/<split>/images/<id>.png`` and ``manifest.jsonl``. Resumable, keyed on content
(:mod:`regionroute.fingerprint`); data-parallel (:mod:`regionroute.distributed`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

from regionroute.config import ModelsConfig, StylizeConfig
from regionroute.errors import DataError
from regionroute.files import prepare_resumable_dir, read_image, read_jsonl, write_image, write_jsonl

if TYPE_CHECKING:
    from diffusers import FluxKontextPipeline

__all__ = ["fingerprint", "stylize_batch", "stylize_splits"]


def fingerprint(cfg: StylizeConfig, models: ModelsConfig, style: str, code: str) -> dict[str, Any]:
    """What determines every image of a split, by content: params, model files, code (the stage's code key)."""
    from regionroute.models.kontext import kontext_key

    return {
        "style": style,
        "stylize": dataclasses.asdict(cfg),  # every field; batch_size too: see pending_batches
        "models": kontext_key(models),
        "code": code,
    }


def _image(record: dict[str, Any]) -> str:
    return f"images/{record['id']}.png"


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
    code: str,
) -> dict[str, int]:
    """Stylize every sample of every split in ``samples`` (name -> sample dir) into ``out_dir``.

    ``code``: the stage's code key (:func:`regionroute.fingerprint.stage_code_digest`).
    Returns how many images were generated per split (by all processes together).
    """
    from regionroute import distributed as dist
    from regionroute.fingerprint import ItemStore, file_digest, json_digest, pending_batches
    from regionroute.seeds import item_seed

    for split in sorted(samples):
        if not (samples[split] / "manifest.jsonl").is_file():
            raise DataError(f"{samples[split] / 'manifest.jsonl'}: file not found (run the sample stage first)")
    prompt = cfg.instruction.format(style=style)
    fp = fingerprint(cfg, models, style, code)
    counts = {}
    for split in sorted(samples):
        split_dir = out_dir / split
        store = ItemStore(split_dir)
        records = read_jsonl(samples[split] / "manifest.jsonl")

        def prepare(records=records, split=split, split_dir=split_dir, store=store) -> list[list[tuple[dict, str]]]:
            """Rank 0: key the output dir, prune, and list the batches of (record, key) to make, by id."""
            prepare_resumable_dir(split_dir, fp)
            (split_dir / "manifest.jsonl").unlink(missing_ok=True)
            store.prune({r["id"] for r in records}, ["images"])
            keyed = [
                (
                    r,
                    json_digest(
                        [file_digest(samples[split] / r["image"]), item_seed("stylize", cfg.seed, r["image_id"])]
                    ),
                )
                for r in sorted(records, key=lambda r: r["id"])
            ]
            return pending_batches(keyed, cfg.batch_size, lambda x: store.done(x[0]["id"], x[1], [_image(x[0])]))

        todo = dist.plan(prepare)
        mine = dist.shard(todo)
        desc = f"stylize {style} {split}"
        with tqdm(total=sum(map(len, mine)), desc=desc, unit="img", disable=not dist.is_main()) as bar:
            for batch in mine:
                images = [read_image(samples[split] / r["image"]) for r, _ in batch]
                seeds = [item_seed("stylize", cfg.seed, r["image_id"]) for r, _ in batch]
                outs = stylize_batch(pipe, images, [prompt] * len(batch), seeds, cfg)
                for (r, key), out in zip(batch, outs, strict=True):
                    write_image(split_dir / _image(r), out)
                    store.mark(r["id"], key)  # last: the image is done for exactly these inputs
                bar.update(len(batch))
        dist.barrier()  # every rank's images are written
        if dist.is_main():
            write_jsonl(
                split_dir / "manifest.jsonl",
                (
                    {
                        "id": r["id"],
                        "style": style,
                        "stylized": _image(r),
                        "seed": item_seed("stylize", cfg.seed, r["image_id"]),
                        "instruction": prompt,
                    }
                    for r in records
                ),
            )
        counts[split] = sum(map(len, todo))
    dist.barrier()  # the manifests are written when any rank returns
    return counts
