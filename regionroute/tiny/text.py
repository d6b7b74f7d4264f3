"""Tokenizers built in code with ``tokenizers`` (nothing downloaded), for the tiny models.

One small BPE vocabulary trained deterministically on the project's instruction words, shared by
a T5-like tokenizer (``Metaspace``, ``pixel-art`` -> ``▁pixel``, ``-``, ``art``, EOS, no BOS) and a
CLIP-like one (``<|startoftext|> ... <|endoftext|>``).
"""

from __future__ import annotations

from functools import cache

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

__all__ = ["COCO_CATEGORY_NAMES", "clip_tokenizer", "t5_tokenizer"]

SPECIALS = ["<pad>", "</s>", "<unk>", "<|startoftext|>", "<|endoftext|>"]

COCO_CATEGORY_NAMES: tuple[str, ...] = (
    "person",
    "bicycle",
    "car",
    "motorcycle",
    "airplane",
    "bus",
    "train",
    "truck",
    "boat",
    "traffic light",
    "fire hydrant",
    "stop sign",
    "parking meter",
    "bench",
    "bird",
    "cat",
    "dog",
    "horse",
    "sheep",
    "cow",
    "elephant",
    "bear",
    "zebra",
    "giraffe",
    "backpack",
    "umbrella",
    "handbag",
    "tie",
    "suitcase",
    "frisbee",
    "skis",
    "snowboard",
    "sports ball",
    "kite",
    "baseball bat",
    "baseball glove",
    "skateboard",
    "surfboard",
    "tennis racket",
    "bottle",
    "wine glass",
    "cup",
    "fork",
    "knife",
    "spoon",
    "bowl",
    "banana",
    "apple",
    "sandwich",
    "orange",
    "broccoli",
    "carrot",
    "hot dog",
    "pizza",
    "donut",
    "cake",
    "chair",
    "couch",
    "potted plant",
    "bed",
    "dining table",
    "toilet",
    "tv",
    "laptop",
    "mouse",
    "remote",
    "keyboard",
    "cell phone",
    "microwave",
    "oven",
    "toaster",
    "sink",
    "refrigerator",
    "book",
    "clock",
    "vase",
    "scissors",
    "teddy bear",
    "hair drier",
    "toothbrush",
)
_STYLE_WORDS = (
    "pixel-art cyberpunk expressionism line-art watercolor oil-painting ukiyo-e anime "
    "pencil-sketch mosaic pop-art impressionism style styles"
)
_CORPUS_WORDS = (
    "make the image into a an in of and on with is are yes no answer only background "
    "object photo picture showing outside red blue yellow brown white black green "
    "? . , : ! is the background in style answer only yes or no"
)


def _corpus() -> list[str]:
    lines = [_STYLE_WORDS, _CORPUS_WORDS]
    for name in COCO_CATEGORY_NAMES:
        for style in _STYLE_WORDS.split():
            lines.append(f"make the {name} into {style} style")
        lines.append(f"a picture showing a {name} outside.")
    return lines


@cache
def _base_tokenizer(vocab_size: int = 600) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always"), pre_tokenizers.Punctuation()]
    )
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False)
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return tok


def t5_tokenizer(model_max_length: int = 512) -> PreTrainedTokenizerFast:
    """A T5-like fast tokenizer: appends ``</s>``, no BOS, pads with ``<pad>`` (id 0)."""
    tok = Tokenizer.from_str(_base_tokenizer().to_str())
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=model_max_length,
    )


def clip_tokenizer(model_max_length: int = 77) -> PreTrainedTokenizerFast:
    """A CLIP-like fast tokenizer: ``<|startoftext|> ... <|endoftext|>``, padded with EOS."""
    tok = Tokenizer.from_str(_base_tokenizer().to_str())
    bos, eos = "<|startoftext|>", "<|endoftext|>"
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}",
        pair=f"{bos} $A {eos} $B {eos}",
        special_tokens=[(bos, tok.token_to_id(bos)), (eos, tok.token_to_id(eos))],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        pad_token=eos,
        unk_token="<unk>",
        model_max_length=model_max_length,
    )
