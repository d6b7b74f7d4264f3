"""Stage ``infer``: edit the held-out pairs with each method, and record style-token attention.

docs/method.md §6. Methods (one code path; the ablations are the same stage under
``dvc exp run -S ...``):

* ``kontext``: the base FLUX.1-Kontext (the paper's baseline);
* ``regionroute``: the trained LoRA-MoE, routed as it was trained. ``routing: style``:
  the instruction's style picks the expert; pairs are processed grouped by style, so by
  default the style's expert is merged into the base weights once per group
  (``infer.merge_expert``): the denoising loop then costs exactly the base model's.
  ``routing: learned``: the trained MoLE gate weighs the experts from the instruction's
  pooled text embedding, per sample, exactly as in training (never merged);
* ``oracle``: global stylization + composite with the ground-truth mask (the eval split's
  pseudo-GT). It uses the mask, so it is a reference upper bound, not a rival.

Every pair x style gets the instruction ``infer.instruction`` and a generator seeded by
:func:`pair_seed` (``infer.seed``, image id): the same for every method (paired
comparisons) and drawn independently of the noise ``stylize`` used for the same image
(``stylize.seed + image_id``). With shared noise the base would re-draw its own
pseudo-GT sample inside the mask and its ``mse_fg`` would measure noise identity, not
style fidelity (toy world: 0.004 with the pseudo-GT's noise, 0.046 with independent noise). For the two model
methods the style-token attention maps (docs/method.md §3, ``infer.attention_direction``) at
the denoising steps ``infer.attention_steps`` (paper: 5, 10, 15, 20, 25; Fig. 6) and
their mean are saved per pair as ``attention/<id>.npz`` (``maps`` (S, h, w), ``mean``
(h, w), ``steps`` (S,)), plus a figure ``figures/<id>.png`` (output | mean | per step).

Output per method::

    <out>/images/<id>.png   <out>/attention/<id>.npz   <out>/figures/<id>.png
    <out>/manifest.jsonl    one line per pair x style (written last)

The T5 text length is the one the experts were trained with (``infer.max_sequence_length:
null`` = ``train.max_sequence_length``, stored in the model's ``regionroute.json``), for
every method, so the baseline and RegionRoute read the same text sequence.

Resumable, keyed on content (:mod:`regionroute.fingerprint`): the directory's fingerprint
holds the method, params, base model files, experts and code; each pair's marker holds
the digest of its input image bytes (the pseudo-GT's for ``oracle``), instruction and
seed. Batches are fixed per style by the sorted ids and ``infer.batch_size``
(:func:`~regionroute.fingerprint.pending_batches`: pixels depend on the batch mates): batches of
unchanged pairs are kept, the others regenerated whole, vanished pairs pruned, so a resumed run
writes the bytes an uninterrupted one writes.

Data-parallel (:mod:`regionroute.distributed`): under ``accelerate launch`` rank 0
prepares the directory and decides the batches (sorted by style, then id), each rank
edits its contiguous slice of whole batches (so a rank merges each of its styles once) and
writes its pairs and markers, and rank 0 writes the manifest after a barrier: the batches
do not depend on the number of processes (the pixels agree up to float noise).
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

__all__ = [
    "CODE_MODULES",
    "METHODS",
    "Editor",
    "pair_seed",
    "resolve_text_length",
    "run_method",
    "save_attention_figure",
]

Method = Literal["kontext", "regionroute", "oracle"]
METHODS: tuple[str, ...] = ("kontext", "regionroute", "oracle")


#: salt of the eval noise: never the stylize stage's ``seed + image_id`` stream
_EVAL_NOISE_SALT = 0x52524556  # "RREV"


def pair_seed(seed: int, image_id: int) -> int:
    """The noise seed of one eval image, from ``infer.seed`` and its image id.

    A 63-bit draw of numpy's ``SeedSequence`` over (salt, seed, image id): stable across
    runs and machines, the same for every method, and independent of the seeds
    ``stylize`` gives the pseudo-GT (``stylize.seed + image_id``, small integers).
    """
    state = np.random.SeedSequence([_EVAL_NOISE_SALT, int(seed), int(image_id)]).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) or 1


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


#: Modules that define the edited pixels and maps (the regionroute/ deps of ``infer`` in dvc.yaml).
CODE_MODULES: tuple[str, ...] = (
    "regionroute.infer",
    "regionroute.distributed",
    "regionroute.fingerprint",
    "regionroute.lora_moe.*",
    "regionroute.flux.*",
    "regionroute.models",
    "regionroute.models.kontext",
    "regionroute.tiny.kontext",
    "regionroute.tiny.text",
    "regionroute.toy.latent",
    "regionroute.files",
    "regionroute.config",
)


def resolve_text_length(cfg: InferConfig, trained_length: int) -> InferConfig:
    """``infer.max_sequence_length: null`` means the length the experts were trained with."""
    if cfg.max_sequence_length is not None:
        return cfg
    return dataclasses.replace(cfg, max_sequence_length=trained_length)


def _fingerprint(method: str, cfg: InferConfig, models: Any, model_dir: Path | None) -> dict[str, Any]:
    from regionroute.fingerprint import code_digest, tree_digest
    from regionroute.models.kontext import kontext_key

    fp: dict[str, Any] = {"method": method, "code": code_digest(CODE_MODULES)}
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
    return json_digest([file_digest(root / r["original"]), instruction, pair_seed(cfg.seed, r["image_id"])])


def run_method(
    method: str,
    records_path: Path,
    out_dir: Path,
    cfg: InferConfig,
    editor: Editor | None = None,
    models: Any = None,
    model_dir: Path | None = None,
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
        prepare_resumable_dir(out_dir, _fingerprint(method, cfg, models, model_dir))
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
    att_steps = tuple(cfg.attention_steps)
    with tqdm(total=sum(map(len, mine)), desc=f"infer {method}", unit="img", disable=not dist.is_main()) as bar:
        for batch in mine:
            style = batch[0][0]["style"]
            if method == "oracle":  # the pseudo-GT of the eval split is exactly global stylization + GT mask
                for r, key in batch:
                    write_image(out_dir / "images" / f"{r['id']}.png", read_image(root / r["pseudo_gt"]))
                    store.mark(r["id"], key)
                bar.update(len(batch))
                continue
            images = [read_image(root / r["original"]) for r, _ in batch]
            seeds = [pair_seed(cfg.seed, r["image_id"]) for r, _ in batch]
            outs, maps = editor.edit(images, [r["object"] for r, _ in batch], style, seeds)
            for i, (r, key) in enumerate(batch):
                if maps is not None:
                    _save_npz(out_dir / "attention" / f"{r['id']}.npz", maps[i], att_steps)
                    if cfg.figures:
                        save_attention_figure(
                            out_dir / "figures" / f"{r['id']}.png",
                            outs[i],
                            maps[i],
                            att_steps,
                            title=f"{method}: {cfg.instruction.format(object=r['object'], style=style)}",
                        )
                write_image(out_dir / "images" / f"{r['id']}.png", outs[i])
                store.mark(r["id"], key)  # last: the pair is done for exactly these inputs
            bar.update(len(batch))
    if editor is not None:
        editor.close()
    dist.barrier()  # every rank's pairs are written
    has_maps = method != "oracle" and bool(att_steps)
    if dist.is_main():
        write_jsonl(
            out_dir / "manifest.jsonl",
            (
                {
                    "id": r["id"],
                    "sample_id": r["sample_id"],
                    "image_id": r["image_id"],
                    "style": r["style"],
                    "object": r["object"],
                    "method": method,
                    "seed": pair_seed(cfg.seed, r["image_id"]),
                    "instruction": cfg.instruction.format(object=r["object"], style=r["style"]),
                    "image": f"images/{r['id']}.png",
                    "attention": f"attention/{r['id']}.npz" if has_maps else None,
                    "area": r["area"],
                    "area_frac": r["area_frac"],
                }
                for r in records
            ),
        )
    dist.barrier()  # the manifest is written when any rank returns
    return sum(map(len, todo))
