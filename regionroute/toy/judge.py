"""The toy judge: a tiny open_clip CLIP trained on styled regions, so that RSM-text means something.

The toy pipeline's ``judge`` stage; the main pipeline's ``score`` stage loads the result
with ``score.clip: toy`` through the same code as any open_clip model
(:func:`regionroute.models.clip.load_clip`, ``local-dir:`` layout: ``open_clip_config.json``
+ ``open_clip_model.safetensors``).

Training data, made on the fly from procedural scenes (:mod:`regionroute.toy.scenes`): one
instance per scene, cropped exactly as the score stage crops a region
(:func:`regionroute.metrics.region.region_crop`, mask bounding box, outside pixels = the
CLIP mean colour, squared), under one of five classes:

* a style (``"an image in {style} style"``, the score stage's template): the object
  styled by the style filter, either the whole image or only the object composited onto
  the original (both leave a styled region);
* plain (``"an image in plain style"``): the object as drawn, or recoloured.

The loss is CLIP's image-to-text InfoNCE against the five class prompts (every class text
is a negative for the others). Images go through the preprocessing open_clip builds from
the saved config, so training and scoring see identical inputs (tested). Held-out
accuracy (argmax over the five prompts on scenes from another seed stream) is reported
per class.
"""

from __future__ import annotations

import json
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from regionroute.config import Section

__all__ = ["JudgeConfig", "judge_config", "make_crops", "train_judge"]

WEIGHTS_NAME = "open_clip_model.safetensors"


@dataclass(frozen=True)
class JudgeConfig(Section):
    """``toy/params.yaml: judge:``."""

    _section: typing.ClassVar[str] = "judge"
    size: int = 64  # scene side
    image_size: int = 32  # CLIP input side
    width: int = 96
    layers: int = 4
    text_width: int = 32
    embed_dim: int = 64
    steps: int = 600
    batch_size: int = 128
    learning_rate: float = 1e-3
    template: str = "an image in {style} style"  # = score.template
    plain: str = "plain"  # the unstyled class's word in the template
    eval_per_class: int = 200
    seed: int = 0

    def _validate(self) -> None:
        self._at_least(1, "steps", "batch_size", "eval_per_class", "layers")
        if "{style}" not in self.template:
            self._fail("template", f"must contain '{{style}}', got {self.template!r}")
        if self.image_size % 4:
            self._fail("image_size", f"must be a multiple of 4 (patch size), got {self.image_size}")


def judge_config(cfg: JudgeConfig) -> dict[str, Any]:
    """open_clip ``model_cfg`` of the judge (the schema of open_clip's model_configs/*.json)."""
    vision = {"image_size": cfg.image_size, "layers": cfg.layers, "width": cfg.width, "patch_size": 4, "head_width": 32}
    text = {"context_length": 16, "vocab_size": 49408, "width": cfg.text_width, "heads": 2, "layers": 2}
    return {"embed_dim": cfg.embed_dim, "vision_cfg": vision, "text_cfg": text}


def _preprocess_cfg() -> dict[str, Any]:
    import open_clip

    return {"mean": list(open_clip.OPENAI_DATASET_MEAN), "std": list(open_clip.OPENAI_DATASET_STD),
            "interpolation": "bicubic", "resize_mode": "shortest"}  # fmt: skip


def make_crops(rng: np.random.Generator, n: int, size: int, classes: int) -> tuple[list[np.ndarray], np.ndarray]:
    """``n`` region crops (uint8, square) and their class (0..3 a style of STYLES, 4 plain)."""
    from regionroute.metrics.region import region_crop
    from regionroute.toy.filters import STYLES, apply_style, recolour
    from regionroute.toy.scenes import COLOURS, render_batch

    scenes = render_batch(rng, n, size)
    x = torch.from_numpy(np.stack([s.image for s in scenes])).permute(0, 3, 1, 2).float() / 255
    picks = [int(rng.integers(len(s.masks))) for s in scenes]
    masks = torch.from_numpy(np.stack([s.masks[k] for s, k in zip(scenes, picks, strict=True)]))
    labels = rng.integers(classes, size=n)
    out = x.clone()
    for c, style in enumerate(STYLES):
        idx = np.flatnonzero(labels == c)
        if idx.size:
            styled = apply_style(x[idx], style)
            whole = torch.from_numpy(rng.random(idx.size) < 0.5).view(-1, 1, 1, 1)
            out[idx] = torch.where(whole | masks[idx, None], styled, x[idx])  # whole image, or the object only
    plain = np.flatnonzero((labels == len(STYLES)) & (rng.random(n) < 0.5))
    if plain.size:
        rgb = torch.tensor([list(COLOURS.values())[int(rng.integers(len(COLOURS)))] for _ in plain]) / 255
        out[plain] = recolour(x[plain], masks[plain], rgb.float())
    images = (out.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    crops = [region_crop(im, m.numpy(), square=True)[0] for im, m in zip(images, masks, strict=True)]
    return crops, labels


def _evaluate(model: Any, preprocess: Any, texts: torch.Tensor, cfg: JudgeConfig, classes: int) -> dict[str, float]:
    from regionroute.toy.filters import STYLES

    rng = np.random.default_rng([cfg.seed, 2**31])  # a stream training never draws
    crops, labels = make_crops(rng, cfg.eval_per_class * classes, cfg.size, classes)
    with torch.no_grad():
        t = model.encode_text(texts, normalize=True)
        preds = []
        for i in range(0, len(crops), 256):
            pix = torch.stack([preprocess(Image.fromarray(c)) for c in crops[i : i + 256]])
            preds.append((model.encode_image(pix, normalize=True) @ t.T).argmax(1))
    pred = torch.cat(preds).numpy()
    names = [*STYLES, "plain"]
    acc = {names[c]: float((pred[labels == c] == c).mean()) for c in range(classes)}
    acc["overall"] = float((pred == labels).mean())
    return acc


def train_judge(cfg: JudgeConfig, out_dir: Path) -> dict[str, Any]:
    """Train and save the judge (open_clip local-dir layout); returns held-out accuracy per class."""
    import open_clip
    from safetensors.torch import save_file

    from regionroute.files import atomic_dir
    from regionroute.toy.filters import STYLES

    torch.manual_seed(cfg.seed)
    model_cfg = judge_config(cfg)
    model = open_clip.model.CLIP(**model_cfg)
    pp = _preprocess_cfg()
    preprocess = open_clip.image_transform(
        cfg.image_size, is_train=False, mean=tuple(pp["mean"]), std=tuple(pp["std"]),
        resize_mode=pp["resize_mode"], interpolation=pp["interpolation"],
    )  # fmt: skip
    tokenizer = open_clip.tokenize
    names = [*STYLES, cfg.plain]
    texts = tokenizer([cfg.template.format(style=s) for s in names], context_length=16)  # (5, 16)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.learning_rate, total_steps=cfg.steps, pct_start=0.1)
    model.train()
    for step in tqdm(range(cfg.steps), desc="toy judge", unit="step"):
        rng = np.random.default_rng([cfg.seed, step])
        crops, labels = make_crops(rng, cfg.batch_size, cfg.size, len(names))
        pix = torch.stack([preprocess(Image.fromarray(c)) for c in crops])
        img = model.encode_image(pix, normalize=True)
        txt = model.encode_text(texts, normalize=True)
        logits = model.logit_scale.exp() * img @ txt.T  # (B, 5): image-to-text InfoNCE over the class prompts
        loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(labels))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    acc = _evaluate(model, preprocess, texts, cfg, len(names))
    with atomic_dir(out_dir) as tmp:
        state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_NAME))
        (tmp / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": pp}, indent=2))
    return {"accuracy": acc, "final_loss": float(loss.detach()), "classes": names}
