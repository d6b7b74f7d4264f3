"""Diagnostics of a trained toy run: expert fit, routing, the judges' view, erosion, where the style is read.

Run after ``dvc repro`` on the toy default (it reads ``models/regionroute``,
``data/pseudo_gt/{train,eval}`` and ``data/infer/*``):

* ``fit``: the trained experts on training pairs vs held-out pairs, MSE to the pseudo-GT
  inside and outside the mask, and the toy judge's RSM-text of the object region for
  RegionRoute and for the base on the same pairs and noise. Equal errors (and ratios): the
  experts do not fit their own training pairs any better (a fitting limit, not overfitting).
* ``swap``: each requested style edited through each expert (merged by name, as ``infer``
  does). Tells a routing bug (another expert matching the request's pseudo-GT better on
  BOTH sides of the mask) from experts that learned to suppress their style (a foreign
  expert matches better inside the object only because it leaves the style everywhere).
* ``judge``: the toy CLIP judge's top class (the four styles or ``plain``) for each
  method's object region in ``data/infer``, per requested style.
* ``erosion``: each method's RSM-text in ``data/infer`` with the object's mask eroded by
  0-3 px: where in the object the style is missing (its 8 px border tokens or throughout).
* ``t5_tokens``: which T5 tokens carry the style: the base edits with the features of one
  style's instruction except at the style word (taken from another style's), and the
  reverse. A random T5 at full mixing spreads the word over every token (padding
  included); with ``text_mixing: 0`` only the style word's own tokens carry it.
* ``pathway``: where the base reads the style from. FLUX feeds the prompt twice: T5
  tokens through attention, and CLIP's pooled embedding through the timestep embedding
  into every block's AdaLN modulation (the same shift/scale for every token: global by
  construction). The base edits with the T5 tokens of one style and the pooled embedding
  of another (or of a style-free prompt); MSE to each style's stylization (``stylize``
  stage) says which one it followed.

    python benchmarks/toy_experts.py --pairs 16 > benchmarks/toy_experts.jsonl   # one JSON line per measurement
    python benchmarks/toy_experts.py --only fit --pairs 32                        # one diagnostic
    python benchmarks/toy_experts.py --only erosion
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from regionroute.config import InferConfig, ModelsConfig, TrainConfig, load_section
from regionroute.files import read_image, read_jsonl, read_mask
from regionroute.infer import resolve_text_length
from regionroute.seeds import item_seed

STYLES = ("pixel-art", "cyberpunk", "expressionism", "line-art")
DIAGNOSTICS = ("pathway", "t5_tokens", "fit", "swap", "judge", "erosion")


def _errors(outs: list[np.ndarray], rows: list[dict[str, Any]], root: Path) -> dict[str, float]:
    """Mean MSE to the pseudo-GT inside and outside the mask, images in [0, 1]."""
    fg, bg = [], []
    for r, out in zip(rows, outs, strict=True):
        gt = read_image(root / r["pseudo_gt"]).astype(np.float32) / 255
        m = read_mask(root / r["mask"])
        d = ((out.astype(np.float32) / 255 - gt) ** 2).mean(-1)
        fg.append(float(d[m].mean()))
        bg.append(float(d[~m].mean()))
    return {"mse_fg": round(float(np.mean(fg)), 5), "mse_bg": round(float(np.mean(bg)), 5)}


def _mean_mse(outs: list[np.ndarray], ref: list[np.ndarray]) -> float:
    """Mean over images of the whole-image MSE, images in [0, 1]."""
    return round(float(np.mean([((o / 255.0 - g / 255.0) ** 2).mean() for o, g in zip(outs, ref, strict=True)])), 5)


def _rsm_text(
    scorer: Any, outs: list[np.ndarray], rows: list[dict[str, Any]], root: Path, masks: list | None = None
) -> float:
    """Mean RSM-text of ``outs`` over the object regions (``masks``, default the rows' own), scored by the
    score stage's own ``RSESScorer.score``."""
    masks = [read_mask(root / r["mask"]) for r in rows] if masks is None else masks
    sources = [read_image(root / r["original"]) for r in rows]
    frame = scorer.score(outs, sources, masks, [r["style"] for r in rows])
    return round(float(frame["rsm_text"].mean()), 4)


def _edit(pipe: Any, moe: Any, expert: str | None, rows: list[dict[str, Any]], root: Path, cfg: InferConfig) -> list:
    """``infer``'s edit of ``rows`` (its prompts and per-pair noise) through ``expert`` merged; None: the base."""
    from regionroute.flux.pipeline import kontext_edit

    images = [read_image(root / r["original"]) for r in rows]
    prompts = [cfg.instruction.format(object=r["object"], style=r["style"]) for r in rows]
    seeds = [item_seed("infer", cfg.seed, r["image_id"]) for r in rows]
    if expert is not None:
        moe.merge(expert)
    try:
        return kontext_edit(pipe, images, prompts, seeds, cfg.steps, cfg.guidance, cfg.max_sequence_length)
    finally:
        if expert is not None:
            moe.unmerge()


def _scorer(params: Path) -> Any:
    """The score stage's scorer with its toy CLIP judge (LPIPS is the tiny random one: only RSM-text is read)."""
    from regionroute.config import ScoreConfig
    from regionroute.metrics.rses import RSESScorer

    score = load_section(params, "score", ScoreConfig)
    return RSESScorer(score.clip, "tiny", device="cpu", dilate=score.dilate, template=score.template)


def _judge(scorer: Any, data: Path, styles: tuple[str, ...]) -> None:
    classes = [*styles, "plain"]
    texts = [scorer.text_embedding(s) for s in styles]
    plain = scorer.clip.encode_text(scorer.tokenizer(["plain"]), normalize=True)[0].float()
    table = torch.stack([*texts, plain])  # (5, D)
    root = data / "pseudo_gt" / "eval"
    rows = read_jsonl(root / "manifest.jsonl")
    for method in ("base", "regionroute", "oracle"):
        for style in styles:
            mine = [r for r in rows if r["style"] == style]
            images = [read_image(data / "infer" / method / "images" / f"{r['id']}.png") for r in mine]
            with torch.no_grad():
                emb = scorer.region_embeddings(images, [read_mask(root / r["mask"]) for r in mine])
            top = Counter(classes[int(i)] for i in (emb @ table.T).argmax(1))
            print(json.dumps({"diagnostic": "judge", "method": method, "request": style, "n": len(mine),
                              "top_class": dict(top.most_common())}), flush=True)  # fmt: skip


def _erosion(scorer: Any, data: Path, steps: tuple[int, ...] = (0, 1, 2, 3)) -> None:
    """RSM-text of each method's edits in ``data/infer`` with the masks eroded by ``steps`` pixels
    (Euclidean, as the score stage dilates; objects that erosion empties are left out: ``n`` counts the rest)."""
    from scipy.ndimage import distance_transform_edt

    root = data / "pseudo_gt" / "eval"
    rows = read_jsonl(root / "manifest.jsonl")
    masks = [read_mask(root / r["mask"]) for r in rows]
    for px in steps:
        eroded = [distance_transform_edt(m) > px for m in masks]  # farther than px from the background
        kept = [i for i, m in enumerate(eroded) if m.any()]
        rsm = {}
        for method in ("base", "regionroute", "oracle"):
            images = [read_image(data / "infer" / method / "images" / f"{rows[i]['id']}.png") for i in kept]
            rsm[method] = _rsm_text(scorer, images, [rows[i] for i in kept], root, [eroded[i] for i in kept])
        ratio = round(rsm["regionroute"] / rsm["base"], 3)
        print(json.dumps({"diagnostic": "erosion", "pixels": px, "n": len(kept), "rsm_text": rsm,
                          "regionroute_over_base": ratio}), flush=True)  # fmt: skip


def _stylize_setup(data: Path, params: Path, style: str, pairs: int, ref_styles: tuple[str, ...]) -> tuple:
    """The ``stylize`` stage's settings, the first ``pairs`` held-out rows of ``style``, their
    source images and stylize seeds, and each of ``ref_styles``' stylization of those images."""
    from regionroute.config import StylizeConfig

    st = load_section(params, "stylize", StylizeConfig)  # the stylize stage's own settings and seeds
    root = data / "pseudo_gt" / "eval"
    rows = [r for r in read_jsonl(root / "manifest.jsonl") if r["style"] == style][:pairs]
    images = [read_image(root / r["original"]) for r in rows]
    seeds = [st.seed + int(r["image_id"]) for r in rows]
    refs = {s: [read_image(data / "stylized" / s / "eval" / "images" / f"{r['sample_id']}.png") for r in rows]
            for s in ref_styles}  # fmt: skip
    return st, rows, images, seeds, refs


def _pathway(pipe: Any, data: Path, params: Path, pairs: int, styles: tuple[str, ...]) -> None:
    from regionroute.flux.pipeline import kontext_edit

    st, rows, images, seeds, refs = _stylize_setup(data, params, styles[0], pairs, styles)

    def encode(prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        embeds, pooled, _ = pipe.encode_prompt(
            prompt=[prompt] * len(rows), prompt_2=None, max_sequence_length=st.max_sequence_length
        )
        return embeds, pooled

    a, b = styles[1], styles[-1]
    for t5, pooled in ((a, a), (a, b), (b, a), (a, None)):
        embeds = encode(st.instruction.format(style=t5))[0]
        pooled_embeds = encode(st.instruction.format(style=pooled) if pooled else "make the image")[1]
        outs = kontext_edit(pipe, images, [""] * len(rows), seeds, st.steps, st.guidance, st.max_sequence_length,
                            embeds=(embeds, pooled_embeds))  # fmt: skip
        mse = {s: _mean_mse(outs, refs[s]) for s in styles}
        print(json.dumps({"diagnostic": "pathway", "t5_style": t5, "pooled_style": pooled, "n": len(rows),
                          "mse_to_stylization": mse}), flush=True)  # fmt: skip


def _tokens(pipe: Any, data: Path, params: Path, pairs: int) -> None:
    """Which T5 tokens carry the style: the style word's or the rest (padding included)."""
    from regionroute.flux.pipeline import kontext_edit

    a, b = "cyberpunk", "expressionism"  # one T5 token each, at the same position
    st, rows, images, seeds, refs = _stylize_setup(data, params, a, pairs, (a, b))
    with torch.no_grad():
        ea, pooled, _ = pipe.encode_prompt(prompt=[st.instruction.format(style=a)] * len(rows), prompt_2=None,
                                           max_sequence_length=st.max_sequence_length)  # fmt: skip
        eb = pipe.encode_prompt(prompt=[st.instruction.format(style=b)] * len(rows), prompt_2=None,
                                max_sequence_length=st.max_sequence_length)[0]  # fmt: skip
    ids = pipe.tokenizer_2(st.instruction.format(style=a)).input_ids
    word = ids.index(pipe.tokenizer_2(a, add_special_tokens=False).input_ids[0])
    differ = (ea[0] - eb[0]).norm(dim=-1) / ea[0].norm(dim=-1)
    print(json.dumps({"diagnostic": "t5_tokens", "styles": [a, b], "style_position": word,
                      "relative_difference": [round(float(v), 3) for v in differ]}), flush=True)  # fmt: skip
    swapped = ea.clone()
    swapped[:, word] = eb[:, word]
    rest = eb.clone()
    rest[:, word] = ea[:, word]
    for name, embeds in (("all_tokens", ea), ("style_word_only", swapped), ("all_but_style_word", rest)):
        outs = kontext_edit(pipe, images, [""] * len(rows), seeds, st.steps, st.guidance, st.max_sequence_length,
                            embeds=(embeds, pooled))  # fmt: skip
        mse = {s: _mean_mse(outs, refs[s]) for s in (a, b)}
        print(json.dumps({"diagnostic": "t5_tokens", "from_" + b: name, "n": len(rows), "mse_to_stylization": mse}),
              flush=True)  # fmt: skip


def _fit_rows(data: Path, styles: tuple[str, ...], pairs: int) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """The first ``pairs`` rows of each style in each split: (split, style) -> rows."""
    out = {}
    for split in ("train", "eval"):
        rows = read_jsonl(data / "pseudo_gt" / split / "manifest.jsonl")
        out.update({(split, s): [r for r in rows if r["style"] == s][:pairs] for s in styles})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--params", type=Path, default=Path("params.yaml"))
    p.add_argument("--model", type=Path, default=Path("models/regionroute"))
    p.add_argument("--data", type=Path, default=Path("data"))
    p.add_argument("--pairs", type=int, default=16, help="pairs per style and split")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--only", choices=DIAGNOSTICS, nargs="+", default=list(DIAGNOSTICS), help="diagnostics to run")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from regionroute.lora_moe import load_moe
    from regionroute.models.kontext import load_kontext

    models = load_section(args.params, "models", ModelsConfig)
    length = load_section(args.params, "train", TrainConfig).max_sequence_length
    cfg = resolve_text_length(load_section(args.params, "infer", InferConfig), length)
    scorer = _scorer(args.params) if {"fit", "judge", "erosion"} & set(args.only) else None
    if "erosion" in args.only:  # data/infer only: no model
        _erosion(scorer, args.data)
    if not {"pathway", "t5_tokens", "fit", "swap", "judge"} & set(args.only):
        return
    pipe = load_kontext(models)
    if "pathway" in args.only:
        _pathway(pipe, args.data, args.params, args.pairs, STYLES)  # the base alone, before the experts go in
    if "t5_tokens" in args.only:
        _tokens(pipe, args.data, args.params, args.pairs)
    fit = _fit_rows(args.data, STYLES, args.pairs) if "fit" in args.only else {}
    base = {key: _edit(pipe, None, None, rows, args.data / "pseudo_gt" / key[0], cfg) for key, rows in fit.items()}
    moe = load_moe(pipe.transformer, args.model / "moe")
    styles = tuple(s for s in STYLES if s in moe.experts)
    for (split, style), mine in fit.items():
        if style not in styles:
            continue
        root = args.data / "pseudo_gt" / split
        outs = _edit(pipe, moe, style, mine, root, cfg)
        rsm = {
            "rsm_text": _rsm_text(scorer, outs, mine, root),
            "rsm_text_base": _rsm_text(scorer, base[split, style], mine, root),
        }
        errs = _errors(outs, mine, root)
        print(
            json.dumps({"diagnostic": "fit", "split": split, "style": style, "n": len(mine), **errs, **rsm}), flush=True
        )
    if "swap" in args.only:
        root = args.data / "pseudo_gt" / "eval"
        rows = read_jsonl(root / "manifest.jsonl")
        for style in styles:
            mine = [r for r in rows if r["style"] == style][: args.pairs]
            for expert in styles:
                errs = _errors(_edit(pipe, moe, expert, mine, root, cfg), mine, root)
                print(json.dumps({"diagnostic": "swap", "request": style, "expert": expert, "n": len(mine), **errs}),
                      flush=True)  # fmt: skip
    if "judge" in args.only:
        _judge(scorer, args.data, styles)


if __name__ == "__main__":
    main()
