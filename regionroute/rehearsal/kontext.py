"""Stand-in for ``black-forest-labs/FLUX.1-Kontext-dev``: the repository's layout and config keys, small sizes.

Used by :func:`regionroute.rehearsal.standins.write_standins`. The real classes from the real configs
(:data:`regionroute.check.configs.FLUX_KONTEXT_DEV`) with only sizes changed, in bf16: ``transformer/`` and
``text_encoder_2/`` sharded with an index, CLIP's real BPE vocabulary (open_clip ships it), a SentencePiece
T5 tokenizer (``spiece.model`` + ``tokenizer.json``, 100 sentinels), ``scheduler/``, ``model_index.json`` and
the card's licence metadata. Latent channels (16), the VAE's 8x and the 2x2 packing stay: 1024 px is 4096 tokens.
"""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path
from typing import Any

import torch

from regionroute.check.configs import FLUX_KONTEXT_DEV
from regionroute.model_card import BASE_LICENSES

__all__ = ["KONTEXT_REPO", "SMALL", "write_kontext"]

KONTEXT_REPO = "black-forest-labs/FLUX.1-Kontext-dev"
#: The only keys that differ from the real configs: sizes.
SMALL: dict[str, dict[str, Any]] = {
    "transformer": {"num_layers": 1, "num_single_layers": 1, "attention_head_dim": 16, "num_attention_heads": 2,
                    "joint_attention_dim": 32, "pooled_projection_dim": 32, "axes_dims_rope": [4, 6, 6]},
    "text_encoder": {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
                     "projection_dim": 32},
    "text_encoder_2": {"d_ff": 64, "d_kv": 8, "d_model": 32, "num_heads": 4, "num_layers": 2,
                       "num_decoder_layers": 2},
    "vae": {"block_out_channels": [8, 16, 16, 16], "layers_per_block": 1, "norm_num_groups": 8},
}  # fmt: skip
#: ``scheduler/scheduler_config.json`` of the repository.
SCHEDULER = {"base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
             "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True}  # fmt: skip
_SHARD = "64KB"  # small enough that the stand-ins' transformer and T5 come in several shards


def _clip_tokenizer(out: Path) -> list[str]:
    """CLIP's BPE vocabulary as ``vocab.json`` + ``merges.txt`` (the one open_clip ships: the real one)."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    with gzip.open(default_bpe()) as fh:
        merges = fh.read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    chars = list(bytes_to_unicode().values())
    vocab = [*chars, *(c + "</w>" for c in chars), *("".join(m.split()) for m in merges)]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    out.mkdir(parents=True)
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
               "unk_token": "<|endoftext|>"}  # fmt: skip
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    config = {**special, "add_prefix_space": False, "clean_up_tokenization_spaces": True, "do_lower_case": True,
              "errors": "replace", "model_max_length": 77, "tokenizer_class": "CLIPTokenizer"}  # fmt: skip
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return vocab


def _t5_corpus(vocab: list[str]) -> list[str]:
    """The pipeline's instructions and captions, and CLIP's whole-word vocabulary as English text."""
    from regionroute.config import KNOWN_STYLES
    from regionroute.rehearsal.coco import CAPTION_WORDS
    from regionroute.tiny.text import COCO_CATEGORY_NAMES

    words = [w for group in CAPTION_WORDS.values() for w in group]
    lines = [f"make the image into {s} style" for s in KNOWN_STYLES]
    for i, name in enumerate(COCO_CATEGORY_NAMES):
        lines += [f"make the {name} into {s} style" for s in KNOWN_STYLES]
        lines.append(f"A {words[i % len(words)]} {name} near the {words[(7 * i) % len(words)]}.")
    english = [t[:-4] for t in vocab if t.endswith("</w>") and t[:-4].isalpha() and len(t) > 6]
    return lines + [" ".join(english[i : i + 12]) for i in range(0, len(english), 12)]


def _t5_tokenizer(out: Path, corpus: list[str]) -> int:
    """A SentencePiece unigram model trained on the pipeline's instructions; returns the tokenizer's length."""
    import sentencepiece as spm
    from transformers import T5Tokenizer

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=buf, model_type="unigram", vocab_size=2000,
        hard_vocab_limit=False, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, minloglevel=2,
    )  # fmt: skip
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    tok = T5Tokenizer(vocab=[(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())])
    out.mkdir(parents=True)
    (out / "spiece.model").write_bytes(buf.getvalue())
    tok.backend_tokenizer.save(str(out / "tokenizer.json"))
    sentinels = [f"<extra_id_{i}>" for i in range(100)]
    special = {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>", "additional_special_tokens": sentinels}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    config = {**special, "clean_up_tokenization_spaces": True, "extra_ids": 100, "legacy": True,
              "model_max_length": 512, "sp_model_kwargs": {}, "tokenizer_class": "T5Tokenizer"}  # fmt: skip
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return len(tok)


def _transformers_config(cfg: dict[str, Any], model: Any) -> dict[str, Any]:
    """A transformers ``config.json`` as the repository has it: the real keys, the class, bf16."""
    import transformers

    extra = {"architectures": [type(model).__name__], "model_type": model.config.model_type}
    return {**cfg, **extra, "torch_dtype": "bfloat16", "transformers_version": transformers.__version__}


def write_kontext(out: Path, seed: int = 0) -> Path:
    """Write the stand-in repository's files into ``out`` (a fresh directory); returns ``out``."""
    import diffusers
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    cfg = {name: {**FLUX_KONTEXT_DEV[name], **SMALL[name]} for name in SMALL}
    n_tokens = _t5_tokenizer(out / "tokenizer_2", _t5_corpus(_clip_tokenizer(out / "tokenizer")))
    cfg["text_encoder_2"]["vocab_size"] = -(-n_tokens // 128) * 128  # padded as T5's 32100 -> 32128
    torch.manual_seed(seed)
    FluxTransformer2DModel.from_config(cfg["transformer"]).to(torch.bfloat16).save_pretrained(
        out / "transformer", max_shard_size=_SHARD
    )
    AutoencoderKL.from_config(cfg["vae"]).to(torch.bfloat16).save_pretrained(out / "vae")
    for name, config_cls, model_cls, shard in (
        ("text_encoder", CLIPTextConfig, CLIPTextModel, "10GB"),
        ("text_encoder_2", T5Config, T5EncoderModel, _SHARD),
    ):
        model = model_cls(config_cls(**cfg[name])).to(torch.bfloat16)
        model.save_pretrained(out / name, max_shard_size=shard)
        (out / name / "config.json").write_text(json.dumps(_transformers_config(cfg[name], model), indent=2))
    FlowMatchEulerDiscreteScheduler(**SCHEDULER).save_pretrained(out / "scheduler")
    index = {
        "_class_name": "FluxKontextPipeline", "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None], "image_encoder": [None, None],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"], "text_encoder_2": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "FluxTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
    }  # fmt: skip
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    licence = {**BASE_LICENSES[KONTEXT_REPO], "license_link": "LICENSE.md"}  # relative, as in the repository's card
    front = "".join(f"{k}: {v}\n" for k, v in licence.items())
    (out / "README.md").write_text(f"---\n{front}---\n\nStand-in (random weights, small sizes) for a rehearsal.\n")
    return out
