"""Stand-ins for the score stage's judges, in the files their loaders ask the Hugging Face cache for.

Used by :func:`regionroute.rehearsal.standins.write_standins`. ``ViT-L-14/openai``: the file open_clip's
pretrained registry names (:func:`regionroute.check.sources.open_clip_weights`) at ViT-L/14's real size, seeded random
bf16 weights. ``Qwen/Qwen2.5-VL-7B-Instruct``: the published flat ``config.json``
(:data:`regionroute.check.configs.QWEN25_VL_7B`, small sizes), generation, preprocessor (``min_pixels`` /
``max_pixels``), chat template and tokenizer files (the tiny judge's BPE), safetensors shards under the
published key names (``model.layers.*``, ``visual.*``) with their index.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from regionroute.check.configs import QWEN25_VL_7B

__all__ = ["CLIP_REF", "QWEN_REPO", "clip_repo", "write_clip", "write_qwen"]

CLIP_REF = "ViT-L-14/openai"
QWEN_REPO = "Qwen/Qwen2.5-VL-7B-Instruct"
#: The only keys of Qwen2.5-VL-7B-Instruct's config that differ here: sizes (M-RoPE sections sum to head_dim / 2).
QWEN_SMALL: dict[str, Any] = {
    "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_hidden_layers": 2,
    "num_key_value_heads": 2, "max_window_layers": 2, "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
}  # fmt: skip
QWEN_VISION_SMALL: dict[str, Any] = {"depth": 4, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
                                     "out_hidden_size": 64, "fullatt_block_indexes": [1, 3]}  # fmt: skip
#: ``preprocessor_config.json`` of the repository.
QWEN_PREPROCESSOR = {
    "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
}  # fmt: skip
_SHARD = "256KB"


def clip_repo() -> tuple[str, str]:
    """The (hub repository, file) open_clip asks the cache for first when resolving :data:`CLIP_REF`."""
    from regionroute.check.sources import open_clip_weights

    where = open_clip_weights(*CLIP_REF.split("/"))
    if not isinstance(where, tuple):
        raise RuntimeError(f"open_clip no longer resolves {CLIP_REF} through the hub: {where}")
    return where[0], where[1][0]


def _random_state(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """bf16 weights for a model built on the meta device: N(0, 0.02), norms 1, biases 0, CLIP's logit scale."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, meta in model.state_dict().items():
        if key == "logit_scale":
            value = torch.full(meta.shape, math.log(1 / 0.07))
        elif key.endswith("bias"):
            value = torch.zeros(meta.shape)
        elif meta.ndim == 1 and ".ln" in f".{key}":
            value = torch.ones(meta.shape)
        else:
            value = torch.randn(meta.shape, generator=gen) * 0.02
        state[key] = value.to(torch.bfloat16)
    return state


def write_clip(out: Path, seed: int = 0) -> Path:
    """ViT-L/14 (QuickGELU, as the OpenAI weights) with seeded random weights, as open_clip's cached file."""
    import open_clip
    from safetensors.torch import save_file

    name = CLIP_REF.split("/")[0]
    _, filename = clip_repo()
    model_cfg = {**open_clip.get_model_config(name), "quick_gelu": True}
    with torch.device("meta"):  # the architecture only: the weights are drawn below, without open_clip's init
        model = open_clip.model.CLIP(**model_cfg)
    out.mkdir(parents=True)
    save_file(_random_state(model, seed), str(out / filename), metadata={"format": "pt"})
    preprocess = {"mean": list(open_clip.OPENAI_DATASET_MEAN), "std": list(open_clip.OPENAI_DATASET_STD)}
    config = {"model_cfg": model_cfg, "preprocess_cfg": preprocess}
    (out / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    return out


def _qwen_config(tok: Any) -> dict[str, Any]:
    import transformers

    ids = tok.convert_tokens_to_ids
    return {
        **QWEN25_VL_7B, **QWEN_SMALL,
        "vision_config": {**QWEN25_VL_7B["vision_config"], **QWEN_VISION_SMALL},
        "architectures": ["Qwen2_5_VLForConditionalGeneration"], "attention_dropout": 0.0,
        "bos_token_id": ids("<|endoftext|>"), "eos_token_id": ids("<|im_end|>"), "vocab_size": len(tok),
        "image_token_id": ids("<|image_pad|>"), "video_token_id": ids("<|video_pad|>"),
        "vision_start_token_id": ids("<|vision_start|>"), "vision_end_token_id": ids("<|vision_end|>"),
        "vision_token_id": ids("<|vision_pad|>"), "initializer_range": 0.02, "sliding_window": 32768,
        "use_sliding_window": False, "use_cache": True, "torch_dtype": "bfloat16",
        "transformers_version": transformers.__version__,
    }  # fmt: skip


def _published_key(key: str) -> str:
    """transformers 5 module names -> the names Qwen2.5-VL's checkpoint was published with."""
    for new, old in (("model.language_model.", "model."), ("model.visual.", "visual.")):
        if key.startswith(new):
            return old + key[len(new) :]
    return key


def write_qwen(out: Path, seed: int = 0) -> Path:
    """Write the stand-in repository's files into ``out``; returns ``out``."""
    from huggingface_hub import save_torch_state_dict
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from regionroute.tiny.qwen import CHAT_TEMPLATE, SPECIAL_TOKENS, qwen_tokenizer

    tok = qwen_tokenizer()
    config = _qwen_config(tok)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**config))
    state = {_published_key(k): v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    out.mkdir(parents=True)
    save_torch_state_dict(state, out, max_shard_size=_SHARD)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    ids = tok.convert_tokens_to_ids
    generation = {"bos_token_id": ids("<|endoftext|>"), "pad_token_id": ids("<|endoftext|>"), "do_sample": True,
                  "eos_token_id": [ids("<|im_end|>"), ids("<|endoftext|>")], "repetition_penalty": 1.05,
                  "temperature": 0.1, "top_p": 0.001, "top_k": 1}  # fmt: skip
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))
    (out / "preprocessor_config.json").write_text(json.dumps(QWEN_PREPROCESSOR, indent=2))
    (out / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}, indent=2))
    tok.backend_tokenizer.save(str(out / "tokenizer.json"))
    tok.backend_tokenizer.model.save(str(out))  # vocab.json + merges.txt
    added = {str(ids(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                           "special": True} for t in SPECIAL_TOKENS}  # fmt: skip
    tok_config = {"add_prefix_space": False, "added_tokens_decoder": added,
                  "additional_special_tokens": SPECIAL_TOKENS[1:], "bos_token": None,
                  "chat_template": CHAT_TEMPLATE, "clean_up_tokenization_spaces": False,
                  "eos_token": "<|im_end|>", "errors": "replace", "model_max_length": 131072,
                  "pad_token": "<|endoftext|>", "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer",
                  "unk_token": None}  # fmt: skip
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
    return out
