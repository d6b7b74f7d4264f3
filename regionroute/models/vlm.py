"""Loading the Qwen2.5-VL judge (docs/method.md section 7, VLM) and its processor.

Used by the ``score`` stage through :class:`regionroute.metrics.vlm.VLMJudge`. A reference is
``"tiny"`` (:mod:`regionroute.tiny.qwen`, built once into the cache), ``"toy"`` (``toy/models/vlm``,
:mod:`regionroute.toy.vlm`), a local directory, or a hub id such as ``Qwen/Qwen2.5-VL-7B-Instruct``
(the paper's; it must be in the local Hugging Face cache when offline). ``trust_remote_code`` is
never used: Qwen2.5-VL is a built-in transformers architecture.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from regionroute.errors import UserError
from regionroute.models import resolve_device, resolve_dtype, resolve_reference

if TYPE_CHECKING:
    from transformers import ProcessorMixin, Qwen2_5_VLForConditionalGeneration

__all__ = ["load_vlm"]


def load_vlm(
    ref: str,
    device: str | torch.device = "auto",
    dtype: str = "bfloat16",
    *,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
) -> tuple[Qwen2_5_VLForConditionalGeneration, ProcessorMixin]:
    """Load ``(model, processor)``; the model is in eval mode on ``device``.

    ``min_pixels`` / ``max_pixels`` bound the area images are resized to before patching
    (Qwen's knob for the number of visual tokens); ``None`` keeps the processor's own.
    """
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    from regionroute.tiny.qwen import TINY_QWEN_VERSION, save_tiny_qwen

    source = resolve_reference(ref, "vlm", save_tiny_qwen, TINY_QWEN_VERSION)
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    try:
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(source, dtype=resolve_dtype(dtype))
        processor = AutoProcessor.from_pretrained(source)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"models.vlm: cannot load {ref!r} ({first})") from None
    size = dict(processor.image_processor.size)
    if min_pixels is not None:
        size["shortest_edge"] = min_pixels
    if max_pixels is not None:
        size["longest_edge"] = max_pixels
    if size["shortest_edge"] > size["longest_edge"]:
        raise UserError(f"models.vlm: min_pixels {size['shortest_edge']} > max_pixels {size['longest_edge']}")
    processor.image_processor.size = size
    return model.eval().requires_grad_(False).to(dev), processor
