"""``regionroute edit``: apply a trained RegionRoute model to a user's own image.

The base pipeline is the model reference saved in the model directory's
``regionroute.json`` (hub id, local path or ``tiny``); the experts come from its ``moe/``.
Large inputs are resized (aspect kept, sides multiples of 16, a multiple of every token size
here) to at most ``max_area``
pixels, by default the training resolution's area.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from PIL import Image

from regionroute.config import InferConfig, ModelsConfig
from regionroute.errors import UserError
from regionroute.files import read_image, write_image

__all__ = ["edit_image", "fit_to_area"]


def fit_to_area(image: np.ndarray, max_area: int) -> np.ndarray:
    """Resize so that ``H * W <= max_area`` (never upscaled) with both sides multiples of 16."""
    h, w = image.shape[:2]
    scale = min(1.0, (max_area / (h * w)) ** 0.5)
    nh, nw = max(16, int(h * scale) // 16 * 16), max(16, int(w * scale) // 16 * 16)
    if (nh, nw) == (h, w):
        return image
    return np.asarray(Image.fromarray(image).resize((nw, nh), Image.Resampling.LANCZOS))


def edit_image(
    image_path: Path,
    obj: str,
    style: str,
    model_dir: Path,
    out_path: Path,
    steps: int | None = None,
    seed: int = 0,
    attention_png: Path | None = None,
    max_area: int | None = None,
    device: str = "auto",
    dtype: str | None = None,
    max_sequence_length: int | None = None,
) -> Path:
    """Edit one image; writes ``out_path`` (and the attention figure if asked). Returns ``out_path``.

    The T5 text length and the base model's dtype are the ones the experts were trained with
    (``regionroute.json``; models trained before the dtype was recorded: float32) unless
    ``max_sequence_length`` / ``dtype`` override them; the experts' routing is the trained one
    (style, or the learned gate).
    """
    from regionroute.flux.tokens import find_style_span
    from regionroute.infer import Editor, save_attention_figure
    from regionroute.lora_moe import load_moe
    from regionroute.lora_moe.export import read_model_config
    from regionroute.models.kontext import load_kontext

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise UserError(f"--model: {model_dir}: no such directory")
    config = read_model_config(model_dir)
    if style not in config["styles"]:
        raise UserError(
            f"--style: no trained expert for {style!r} in {model_dir} (available: {', '.join(config['styles'])})"
        )
    if not obj.strip():
        raise UserError("--object: must be a non-empty word, e.g. 'dog'")
    image = read_image(image_path)
    dtype = dtype or config.get("dtype", "float32")
    pipe = load_kontext(ModelsConfig(kontext=config["base_model"], dtype=dtype, device=device))
    if max_area is None:  # the training images' area: latent size x the VAE's factor
        lh, lw = config.get("latent_hw", [64, 64])
        max_area = lh * lw * pipe.vae_scale_factor**2
    image = fit_to_area(image, max_area)
    base = InferConfig()
    n_steps = steps or base.steps
    cfg = dataclasses.replace(
        base,
        steps=n_steps,
        max_sequence_length=max_sequence_length or int(config["train"]["max_sequence_length"]),
        attention_steps=tuple(s for s in base.attention_steps if s <= n_steps) or (n_steps,),
    )
    instruction = cfg.instruction.format(object=obj, style=style)
    try:
        find_style_span(pipe.tokenizer_2, instruction, obj, cfg.max_sequence_length)
    except UserError as exc:
        raise UserError(f"--object: cannot place {obj!r} in the instruction's T5 tokens ({exc})") from None
    editor = Editor(pipe, cfg, moe=load_moe(pipe.transformer, model_dir / "moe"), merge=True)
    outs, maps = editor.edit([image], [obj], style, [seed], steps=cfg.steps)
    write_image(out_path, outs[0])
    if attention_png is not None and maps is not None:
        save_attention_figure(Path(attention_png), outs[0], maps[0], cfg.attention_steps, title=instruction)
    return Path(out_path)
