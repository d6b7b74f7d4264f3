"""A tiny Qwen2.5-VL built in code, for the offline VLM judge (tests, the tiny configuration, CI).

Same classes as the paper's judge (``Qwen2_5_VLForConditionalGeneration`` +
``Qwen2_5_VLProcessor``; docs/method.md section 7, VLM) with toy sizes: a 2-block vision
tower (14 px patches, 2x2 merge, windowed + full attention) feeding a 2-layer text
model with M-RoPE. The tokenizer is a byte-level BPE trained in code on the judge's
prompts, with the special tokens the processor and the chat template need
(``<|im_start|>``, ``<|im_end|>``, ``<|vision_start|>``, ``<|image_pad|>``, ...) and
``yes`` / ``no`` / ``Yes`` / ``No`` as single tokens, like the real vocabulary. The image
processor keeps images between 28x28 and 112x112 pixels (1 to 16 visual tokens).
Everything is saved with ``save_pretrained`` and loaded back with ``from_pretrained``
by ``regionroute.models.vlm.load_vlm("tiny")``. Its answers are noise: it tests
mechanics (prompting, batching, padding), not judgement.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from regionroute.config import KNOWN_STYLES
from regionroute.tiny.text import COCO_CATEGORY_NAMES

__all__ = [
    "CHAT_TEMPLATE",
    "SPECIAL_TOKENS",
    "TINY_QWEN_VERSION",
    "build_tiny_qwen",
    "qwen_config",
    "qwen_processor",
    "qwen_tokenizer",
    "save_tiny_qwen",
]

#: Bump when the spec changes, so cached builds are not reused.
TINY_QWEN_VERSION = "1"

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

#: Qwen2.5-VL-Instruct's chat template (system prompt added when absent).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

TEXT_HIDDEN = 64
HEAD_DIM = 16  # TEXT_HIDDEN / 4 heads; M-RoPE sections (t, h, w) sum to HEAD_DIM / 2
MIN_PIXELS = 28 * 28
MAX_PIXELS = 112 * 112


def _corpus() -> list[str]:
    lines = ["system\nYou are a helpful assistant.", "user\n", "assistant\n"]
    lines += ["yes", "no", "Yes", "No", "Yes.", "No."] * 40
    for name in COCO_CATEGORY_NAMES:
        for style in KNOWN_STYLES:
            lines.append(f"Is the {name} in {style} style? Answer only yes or no.")
    for style in KNOWN_STYLES:
        lines.append(f"Is the background in {style} style? Answer only yes or no.")
    return lines


def qwen_tokenizer(vocab_size: int = 1200):  # -> PreTrainedTokenizerFast
    """A Qwen2-like byte-level BPE tokenizer (pads with ``<|endoftext|>``, EOS ``<|im_end|>``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    for word in ("yes", "no", "Yes", "No"):
        if len(tok.encode(word).ids) != 1:  # the judge reads these as single next tokens
            raise RuntimeError(f"tiny Qwen tokenizer: {word!r} is not a single token")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", model_max_length=32768
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def qwen_config(tok, text: dict[str, Any], vision: dict[str, Any]):  # -> Qwen2_5_VLConfig
    """A Qwen2.5-VL config whose special-token ids are ``tok``'s; ``text`` / ``vision``: the sizes."""
    from transformers import Qwen2_5_VLConfig

    ids = tok.convert_tokens_to_ids
    text_config = {
        "vocab_size": len(tok),
        "max_position_embeddings": 4096,
        "bos_token_id": ids("<|endoftext|>"),
        "eos_token_id": ids("<|im_end|>"),
        "pad_token_id": tok.pad_token_id,
        **text,
    }
    return Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config={"spatial_merge_size": 2, "temporal_patch_size": 2, **vision},
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )


def qwen_processor(tok, min_pixels: int, max_pixels: int, patch_size: int = 14, merge_size: int = 2):
    """Qwen2.5-VL's processor around ``tok``: a Qwen2-VL image processor and the chat template.

    ``patch_size`` / ``merge_size`` must be the vision config's ``patch_size`` / ``spatial_merge_size``.
    """
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    return Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(
            min_pixels=min_pixels, max_pixels=max_pixels, patch_size=patch_size, merge_size=merge_size
        ),
        tokenizer=tok,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=CHAT_TEMPLATE,
    )


def build_tiny_qwen(seed: int = 0):  # -> (Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor)
    """Build the tiny model (seeded weights) and its processor."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    tok = qwen_tokenizer()
    config = qwen_config(
        tok,
        text={
            "hidden_size": TEXT_HIDDEN,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": TEXT_HIDDEN // HEAD_DIM,
            "num_key_value_heads": 2,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
            "initializer_range": 0.2,
        },
        vision={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "patch_size": 14,
            "window_size": 56,
            "out_hidden_size": TEXT_HIDDEN,
            "fullatt_block_indexes": [1],
            "initializer_range": 0.2,
        },
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config)
    return model, qwen_processor(tok, MIN_PIXELS, MAX_PIXELS)


def save_tiny_qwen(path: str | Path, seed: int = 0) -> Path:
    """Build the tiny judge and ``save_pretrained`` model + processor to ``path``."""
    path = Path(path)
    model, processor = build_tiny_qwen(seed)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
