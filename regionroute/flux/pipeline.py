"""One call of ``FluxKontextPipeline`` on same-sized images, at their own resolution.

Used by ``stylize`` (global stylization) and ``infer`` / ``regionroute edit`` (regional
edits). The pipeline rescales every request to ``max_area`` (default 1024^2) and, with
``_auto_resize``, snaps the input to Kontext's preferred resolutions; both are disabled
here so a 128 px tiny image stays 128 px and a 1024 px paper image stays 1024 px. Each
image gets its own generator seeded by its own seed, so results do not depend on how
images are batched (up to float reduction order).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

__all__ = ["kontext_edit"]


def kontext_edit(
    pipe: Any,
    images: list[np.ndarray],
    prompts: list[str],
    seeds: list[int],
    steps: int,
    guidance: float,
    max_sequence_length: int,
    embeds: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> list[np.ndarray]:
    """Edit ``images`` (uint8 (H, W, 3), one size) with ``prompts``; returns uint8 arrays of that size.

    ``embeds``: the prompts' ``(prompt_embeds, pooled_prompt_embeds)`` when the caller
    already encoded them (``pipe.encode_prompt``), e.g. to route a learned gate on them.
    """
    h, w = images[0].shape[:2]
    if any(im.shape[:2] != (h, w) for im in images):
        raise ValueError("kontext_edit needs images of one size")
    device = pipe._execution_device
    gen_device = "cpu" if device.type == "cpu" else device
    text = {"prompt": prompts} if embeds is None else {"prompt_embeds": embeds[0], "pooled_prompt_embeds": embeds[1]}
    out = pipe(
        image=[Image.fromarray(im) for im in images],
        **text,
        height=h,
        width=w,
        max_area=h * w,
        _auto_resize=False,
        num_inference_steps=steps,
        guidance_scale=guidance,
        max_sequence_length=max_sequence_length,
        generator=[torch.Generator(gen_device).manual_seed(s) for s in seeds],
    ).images
    return [np.asarray(o.convert("RGB").resize((w, h)), dtype=np.uint8) for o in out]
