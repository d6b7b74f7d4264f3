"""``regionroute edit``: apply a trained RegionRoute model to a user's own image.

The base pipeline is the reference in the model directory's ``regionroute.json``, named with a
note when it is the toy world; the experts come from its ``moe/``. The edit runs at a working
resolution (aspect kept, sides multiples of 16, at most ``max_area`` pixels, by default the training
area; never upscaled: a side under 16 pixels is refused) and the output is resized back to the
input's size. The EXIF orientation is applied.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

from regionroute.config import InferConfig, ModelsConfig
from regionroute.errors import UserError
from regionroute.files import check_writable, image_format, read_image, write_image
from regionroute.models import TOY, resolve_device

__all__ = ["SIDE", "TOY_NOTE", "Edited", "edit_image", "fit_to_area", "model_lines"]

#: Sides are multiples of this (a multiple of every token size here); the smallest side edited.
SIDE = 16
TOY_NOTE = (
    "note: 'toy' is the toy world's 64 px miniature, trained on procedural scenes: its results on photographs "
    "are not meaningful; for real images use a model trained with the paper configuration (configs/paper.yaml)"
)


@dataclasses.dataclass(frozen=True)
class Edited:
    """What :func:`edit_image` wrote: the output (the input's size) and the size the model edited at."""

    path: Path
    size: tuple[int, int]  # (W, H), the input's
    working_size: tuple[int, int]  # (W, H)


def model_lines(model_dir: Path, base_model: str) -> list[str]:
    """The lines naming the model an edit uses; with :data:`TOY_NOTE` when its base is the toy world."""
    lines = [f"model: {model_dir} (experts on the base model {base_model!r}, from its regionroute.json)"]
    return [*lines, TOY_NOTE] if base_model == TOY else lines


def fit_to_area(image: np.ndarray, max_area: int) -> np.ndarray:
    """Resize so that ``H * W <= max_area`` with both sides multiples of 16 (never upscaled).

    A ``max_area`` that would leave a side under 16 pixels is a :class:`UserError`.
    """
    h, w = image.shape[:2]
    scale = min(1.0, (max_area / (h * w)) ** 0.5)
    nh, nw = int(h * scale) // SIDE * SIDE, int(w * scale) // SIDE * SIDE
    if min(nh, nw) < SIDE:
        raise UserError(f"--max-area: {max_area} pixels leave a {w}x{h} image under {SIDE} pixels on a side")
    return _resize(image, nh, nw)


def _resize(image: np.ndarray, h: int, w: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (h, w, 3), Lanczos; the same array when the size is already (h, w)."""
    if image.shape[:2] == (h, w):
        return image
    return np.asarray(Image.fromarray(image).resize((w, h), Image.Resampling.LANCZOS))


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
    log: Callable[[str], None] | None = None,
) -> Edited:
    """Edit one image; writes ``out_path`` at the input's size (and the attention figure, at the working size,
    if asked). ``log`` receives :func:`model_lines` before the model loads.

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
    for flag, path in (("--out", out_path), ("--attention-png", attention_png)):
        try:  # before any inference: a bad output name or folder fails now
            if path is not None:
                image_format(path)
                check_writable(path)
        except UserError as exc:
            raise UserError(f"{flag}: {exc}") from None
    image = read_image(image_path, exif_orientation=True)  # a photo as viewers show it
    h, w = image.shape[:2]
    if min(h, w) < SIDE:  # upscaling would invent the pixels being edited
        raise UserError(f"{image_path}: {w}x{h} pixels, smaller than the {SIDE}x{SIDE} the model edits")
    for line in model_lines(model_dir, config["base_model"]) if log is not None else []:
        log(line)
    dtype = dtype or config.get("dtype", "float32")  # the precision the experts were trained against
    with _as_flags(model_dir):
        resolve_device(device)
        pipe = load_kontext(ModelsConfig(kontext=config["base_model"], dtype=dtype, device=device))
    if max_area is None:  # the training images' area: latent size x the VAE's factor
        lh, lw = config.get("latent_hw", [64, 64])
        max_area = lh * lw * pipe.vae_scale_factor**2
    working = fit_to_area(image, max_area)
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
    outs, maps = editor.edit([working], [obj], style, [seed], steps=cfg.steps)
    wh, ww = working.shape[:2]
    write_image(out_path, _resize(outs[0], h, w))
    if attention_png is not None and maps is not None:
        save_attention_figure(Path(attention_png), outs[0], maps[0], cfg.attention_steps, title=instruction)
    return Edited(Path(out_path), (w, h), (ww, wh))


@contextmanager
def _as_flags(model_dir: Path) -> Iterator[None]:
    """Errors about the loaded model's settings, named by the CLI flag that set them."""
    flags = {"models.device: ": "--device: ", "models.dtype: ": "--dtype: ",
             "models.kontext: ": f"--model: {model_dir / 'regionroute.json'}: base_model: "}  # fmt: skip
    try:
        yield
    except UserError as exc:
        msg = str(exc)
        flag = next((k for k in flags if msg.startswith(k)), None)
        if flag is None:
            raise
        raise UserError(flags[flag] + msg[len(flag) :]) from None
