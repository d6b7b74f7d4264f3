"""Stage ``infer``: edit the held-out pairs with one method and record the style word's attention (docs/method.md §6).

Methods: ``base`` (the base Kontext), ``regionroute`` (the experts routed as trained: merged per
style, or weighted by the learned gate) and ``oracle`` (the eval split's pseudo-GT: uses the mask,
an upper bound). :class:`Editor` edits, :func:`run_method` runs a method over the records in batches
fixed by the sorted ids and ``infer.batch_size`` (a resumed run writes an uninterrupted run's bytes);
the noise of an image is ``item_seed("infer", infer.seed, image_id)``, the same for every method.
Resumable, keyed on content (:mod:`regionroute.fingerprint`); data-parallel (:mod:`regionroute.distributed`).
"""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm import tqdm

from regionroute.config import InferConfig
from regionroute.errors import DataError, UserError
from regionroute.files import atomic_path, prepare_resumable_dir, read_image, read_jsonl, write_image, write_jsonl
from regionroute.seeds import item_seed

__all__ = [
    "METHODS",
    "Editor",
    "resolve_text_length",
    "run_method",
    "save_attention_figure",
]

Method = Literal["base", "regionroute", "oracle"]
METHODS: tuple[str, ...] = ("base", "regionroute", "oracle")


class Editor:
    """Edits images with a Kontext pipeline, optionally routed through a trained LoRA-MoE.

    Built once per stage (or per ``regionroute edit`` call); ``edit`` handles one style per
    call, merging that style's expert for the call when ``merge`` is set.
    """

    def __init__(self, pipe: Any, cfg: InferConfig, moe: Any = None, merge: bool = True) -> None:
        from regionroute.flux.attention import StyleAttentionRecorder

        if cfg.max_sequence_length is None:
            raise ValueError("Editor needs a resolved infer.max_sequence_length (see resolve_text_length)")
        self.pipe, self.cfg, self.moe = pipe, cfg, moe
        self.learned = moe is not None and moe.config.routing == "learned"
        self.merge = merge and not self.learned  # a learned gate differs per sample: never merged
        self._merged: str | None = None  # the expert currently folded into the weights
        self.recorder = StyleAttentionRecorder(direction=cfg.attention_direction, layers="all")
        self.recorder.install(pipe.transformer)

    def close(self) -> None:
        """Unmerge the merged expert, if any (the base weights are exact again)."""
        if self._merged is not None:
            self.moe.unmerge()
            self._merged = None

    def detach(self) -> None:
        """:meth:`close`, and give the transformer its original attention processors back."""
        self.close()
        self.recorder.remove(self.pipe.transformer)

    def _route(self, style: str, prompts: list[str], n: int, device: Any) -> tuple[Any, Any] | None:
        """Route the experts for one batch; returns the prompts' embeddings when they were computed here."""
        if self.moe is None:
            return None
        if self.learned:  # as in training: the gate reads the pooled text embedding of each instruction
            embeds, pooled, _ = self.pipe.encode_prompt(
                prompt=prompts, prompt_2=None, device=device, max_sequence_length=self.cfg.max_sequence_length
            )
            with torch.no_grad():
                self.moe.route(pooled=pooled)
            return embeds, pooled
        if self.merge and self._merged != style:  # sticky: merged once per run of same-style batches
            self.close()
            self.moe.merge(style)
            self._merged = style
        elif not self.merge:
            self.moe.route(style_ids=self.moe.style_ids([style] * n))
        return None

    def edit(
        self,
        images: list[np.ndarray],
        objects: list[str],
        style: str,
        seeds: list[int],
        steps: int | None = None,
        attention_steps: tuple[int, ...] | None = None,
    ) -> tuple[list[np.ndarray], np.ndarray | None]:
        """Edit same-sized images toward ``style``; returns outputs and maps (B, S, h, w) or None.

        ``steps`` overrides ``infer.steps`` (the CLI's ``--steps``); ``attention_steps``
        defaults to the configured ones that fit in ``steps``.
        """
        from regionroute.flux.pipeline import kontext_edit
        from regionroute.flux.tokens import style_token_mask

        steps = steps or self.cfg.steps
        att_steps = tuple(s for s in (attention_steps or self.cfg.attention_steps) if s <= steps)
        h, w = images[0].shape[:2]
        if any(im.shape[:2] != (h, w) for im in images):
            raise ValueError("Editor.edit needs images of one size")
        prompts = [self.cfg.instruction.format(object=o, style=style) for o in objects]
        L = self.cfg.max_sequence_length
        style_mask = style_token_mask(self.pipe.tokenizer_2, prompts, [style] * len(prompts), L)
        patch = 2 * self.pipe.vae_scale_factor  # pixels per token side: 16 for Kontext, 8 for the toy base
        grid = (h // patch, w // patch)
        device = self.pipe._execution_device
        embeds = self._route(style, prompts, len(images), device)
        with self.recorder.capture(style_mask=style_mask.to(device), n_text=L, n_target=grid[0] * grid[1]):
            outs = kontext_edit(self.pipe, images, prompts, seeds, steps, self.cfg.guidance, L, embeds=embeds)
            maps = None
            if att_steps:  # forward k-1 is denoising step k (no CFG: one forward per step)
                maps = torch.stack([self.recorder.maps(forward=s - 1) for s in att_steps], dim=1)
                maps = maps.view(len(images), len(att_steps), *grid).float().cpu().numpy()
        return outs, maps


def save_attention_figure(
    path: Path, edited: np.ndarray, maps: np.ndarray, steps: tuple[int, ...], title: str = ""
) -> None:
    """Paper Fig. 6 layout: edited output | mean map | one map per denoising step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = 2 + len(steps)
    fig, axes = plt.subplots(1, n, figsize=(1.8 * n, 2.1))
    panels = [("output", edited, None), ("mean", maps.mean(0), "magma")]
    panels += [(f"step {s}", m, "magma") for s, m in zip(steps, maps, strict=True)]
    for ax, (label, img, cmap) in zip(axes, panels, strict=True):
        ax.imshow(img, cmap=cmap, interpolation="nearest")
        ax.set_title(label, fontsize=8)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.getvalue())


def _save_npz(path: Path, maps: np.ndarray, steps: tuple[int, ...]) -> None:
    with atomic_path(path) as tmp, tmp.open("wb") as fh:
        np.savez_compressed(
            fh,
            maps=maps.astype(np.float32),
            mean=maps.mean(0).astype(np.float32),
            steps=np.asarray(steps, dtype=np.int64),
        )


def resolve_text_length(cfg: InferConfig, trained_length: int) -> InferConfig:
    """``infer.max_sequence_length: null`` means the length the experts were trained with."""
    if cfg.max_sequence_length is not None:
        return cfg
    return dataclasses.replace(cfg, max_sequence_length=trained_length)


def _fingerprint(method: str, cfg: InferConfig, models: Any, model_dir: Path | None, code: str) -> dict[str, Any]:
    from regionroute.fingerprint import tree_digest
    from regionroute.models.kontext import kontext_key

    fp: dict[str, Any] = {"method": method, "code": code}
    if method != "oracle":  # the oracle copies the pseudo-GT: no model, no params
        fp |= {"infer": dataclasses.asdict(cfg), "models": kontext_key(models)}
    if model_dir is not None:
        fp["experts"] = tree_digest(model_dir / "moe")
    return fp


def _item_key(method: str, root: Path, r: dict[str, Any], cfg: InferConfig) -> str:
    from regionroute.fingerprint import file_digest, json_digest

    if method == "oracle":
        return json_digest([file_digest(root / r["pseudo_gt"])])
    instruction = cfg.instruction.format(object=r["object"], style=r["style"])
    return json_digest([file_digest(root / r["original"]), instruction, item_seed("infer", cfg.seed, r["image_id"])])


def run_method(
    method: str,
    records_path: Path,
    out_dir: Path,
    cfg: InferConfig,
    editor: Editor | None = None,
    models: Any = None,
    model_dir: Path | None = None,
    code: str = "",
) -> int:
    """Run one method over every eval record (pair x style); returns how many were generated now.

    ``models``: the ``models`` params section (:class:`~regionroute.config.ModelsConfig`)
    the editor's pipeline was loaded from; part of the resume key. Under several
    processes the count is the total over all of them.
    """
    from regionroute import distributed as dist
    from regionroute.fingerprint import ItemStore, pending_batches

    if method not in METHODS:
        raise UserError(f"--method: unknown method {method!r} (one of {', '.join(METHODS)})")
    if method != "oracle" and editor is None:
        raise ValueError(f"method {method} needs an Editor")
    records = read_jsonl(records_path)
    if not records:
        raise DataError(f"{records_path}: no evaluation records")
    root = records_path.parent
    if method != "oracle" and (models is None or cfg.max_sequence_length is None):
        raise ValueError(f"method {method} needs the models section and a resolved text length")
    model_dir = model_dir if method == "regionroute" else None  # only regionroute depends on the experts
    store = ItemStore(out_dir)

    def prepare() -> list[list[tuple[dict[str, Any], str]]]:
        """Rank 0: key the output dir, prune, list the batches of (record, key) to edit, by style then id."""
        prepare_resumable_dir(out_dir, _fingerprint(method, cfg, models, model_dir, code))
        (out_dir / "manifest.jsonl").unlink(missing_ok=True)
        store.prune({r["id"] for r in records}, ["images", "attention", "figures"])
        keyed = [(r, _item_key(method, root, r, cfg)) for r in sorted(records, key=lambda r: (r["style"], r["id"]))]
        return [
            batch
            for style in sorted({r["style"] for r in records})
            for batch in pending_batches(
                [x for x in keyed if x[0]["style"] == style],
                cfg.batch_size,
                lambda x: store.done(x[0]["id"], x[1], [f"images/{x[0]['id']}.png"]),
            )
        ]  # one style per batch; a batch's mates change its pixels (infer.batch_size is in the fingerprint)

    todo = dist.plan(prepare)
    mine = dist.shard(todo)  # whole batches, sorted by style: a rank merges each of its styles once
    with tqdm(total=sum(map(len, mine)), desc=f"infer {method}", unit="img", disable=not dist.is_main()) as bar:
        if method == "oracle":
            _copy_pseudo_gt([pair for batch in mine for pair in batch], root, store, bar)
        else:
            _edit_batches(method, mine, root, cfg, editor, store, bar)
    dist.barrier()  # every rank's pairs are written
    if dist.is_main():
        _write_manifest(out_dir / "manifest.jsonl", method, records, cfg)
    dist.barrier()  # the manifest is written when any rank returns
    return sum(map(len, todo))


def _copy_pseudo_gt(todo: list[tuple[dict[str, Any], str]], root: Path, store: Any, bar: Any) -> None:
    """The oracle: the eval split's pseudo-GT is exactly global stylization + the GT mask's composite."""
    for r, key in todo:
        write_image(store.root / "images" / f"{r['id']}.png", read_image(root / r["pseudo_gt"]))
        store.mark(r["id"], key)
        bar.update(1)


def _edit_batches(
    method: str, batches: list[list[tuple[dict[str, Any], str]]], root: Path, cfg: InferConfig, editor: Editor,
    store: Any, bar: Any,
) -> None:  # fmt: skip
    """Edit batch by batch (sorted by style: an expert is merged once per style), saving images, maps, figures."""
    steps = tuple(cfg.attention_steps)
    for batch in batches:
        style = batch[0][0]["style"]
        images = [read_image(root / r["original"]) for r, _ in batch]
        seeds = [item_seed("infer", cfg.seed, r["image_id"]) for r, _ in batch]
        outs, maps = editor.edit(images, [r["object"] for r, _ in batch], style, seeds)
        for i, (r, key) in enumerate(batch):
            if maps is not None:
                _save_npz(store.root / "attention" / f"{r['id']}.npz", maps[i], steps)
                if cfg.figures:
                    title = f"{method}: {cfg.instruction.format(object=r['object'], style=style)}"
                    save_attention_figure(store.root / "figures" / f"{r['id']}.png", outs[i], maps[i], steps, title)
            write_image(store.root / "images" / f"{r['id']}.png", outs[i])
            store.mark(r["id"], key)  # last: the pair is done for exactly these inputs
        bar.update(len(batch))
    editor.close()


def _write_manifest(path: Path, method: str, records: list[dict[str, Any]], cfg: InferConfig) -> None:
    has_maps = method != "oracle" and bool(cfg.attention_steps)
    write_jsonl(
        path,
        (
            {
                "id": r["id"],
                "sample_id": r["sample_id"],
                "image_id": r["image_id"],
                "style": r["style"],
                "object": r["object"],
                "method": method,
                "seed": item_seed("infer", cfg.seed, r["image_id"]),
                "instruction": cfg.instruction.format(object=r["object"], style=r["style"]),
                "image": f"images/{r['id']}.png",
                "attention": f"attention/{r['id']}.npz" if has_maps else None,
                "area": r["area"],
                "area_frac": r["area_frac"],
            }
            for r in records
        ),
    )
