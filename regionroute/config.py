"""Typed configuration: one frozen dataclass per ``params.yaml`` section.

Stages load only the sections they use (``load_section``); ``load_params`` loads and
validates every section (used by tests to prove ``configs/paper.yaml`` is valid).
Unknown or missing keys, wrong types, out-of-range values and empty sections raise a
:class:`~regionroute.errors.ConfigError` whose one-line message names the file and key
(the style of peft's ``__post_init__`` validation). No env vars, no Hydra.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

from ruamel.yaml import YAML, YAMLError

from regionroute.errors import ConfigError
from regionroute.files import MAX_IMAGE_PIXELS

__all__ = [
    "DOUBLE_STREAM_TARGETS",
    "KNOWN_STYLES",
    "LORA_DTYPES",
    "PAPER_STYLES",
    "SINGLE_STREAM_TARGETS",
    "CompositeConfig",
    "DataConfig",
    "InferConfig",
    "LoraConfig",
    "LossConfig",
    "ModelsConfig",
    "Params",
    "SampleConfig",
    "ScoreConfig",
    "Section",
    "SplitConfig",
    "StylizeConfig",
    "TrainConfig",
    "load_params",
    "load_section",
    "read_params_file",
    "section_class",
]

#: The paper's four styles, spelled as the public code spells them.
PAPER_STYLES: tuple[str, ...] = ("pixel-art", "cyberpunk", "expressionism", "line-art")
#: Styles accepted without declaring them in ``data.extra_styles`` (catches typos).
KNOWN_STYLES: tuple[str, ...] = (
    *PAPER_STYLES,
    "watercolor",
    "oil-painting",
    "ukiyo-e",
    "anime",
    "pencil-sketch",
    "mosaic",
    "pop-art",
    "impressionism",
)


class Section:
    """Base of every params section: ``Literal`` fields are checked, range checks live in ``_validate``."""

    _section: typing.ClassVar[str] = ""

    def _fail(self, key: str, msg: str) -> typing.NoReturn:
        raise ConfigError(f"{self._section}.{key}: {msg}")

    def _validate(self) -> None:  # pragma: no cover - overridden
        pass

    def _at_least(self, minimum: float, *keys: str) -> None:
        for key in keys:
            if getattr(self, key) < minimum:
                self._fail(key, f"must be >= {minimum}, got {getattr(self, key)}")

    def _positive(self, *keys: str) -> None:
        for key in keys:
            if not getattr(self, key) > 0:
                self._fail(key, f"must be > 0, got {getattr(self, key)}")

    def _in_range(self, key: str, low: float, high: float, closed: bool = True) -> None:
        """``low <= value <= high`` (``closed``) or ``low <= value < high``."""
        value = getattr(self, key)
        if not (low <= value <= high if closed else low <= value < high):
            self._fail(key, f"must be in [{low}, {high}{']' if closed else ')'}, got {value}")

    def _literals(self) -> None:
        for name, tp in get_type_hints(type(self)).items():
            if get_origin(tp) is Literal and getattr(self, name) not in get_args(tp):
                self._fail(name, f"must be one of {', '.join(map(str, get_args(tp)))}, got {getattr(self, name)!r}")

    def __post_init__(self) -> None:
        self._literals()
        self._validate()


@dataclass(frozen=True)
class ModelsConfig(Section):
    """Model references: ``"tiny"`` (built in code), a hub id, or a local directory."""

    _section: typing.ClassVar[str] = "models"
    kontext: str = "black-forest-labs/FLUX.1-Kontext-dev"
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    device: Literal["auto", "cpu", "cuda"] = "auto"

    def _validate(self) -> None:
        if not self.kontext.strip():
            self._fail("kontext", "must be 'tiny', a hub id or a local directory, got ''")


@dataclass(frozen=True)
class SplitConfig(Section):
    """One split of the COCO-format dataset under ``data.root``."""

    _section: typing.ClassVar[str] = "data.splits.<split>"
    coco: str = "train2017"
    num: int = 150

    def _validate(self) -> None:
        self._at_least(1, "num")


@dataclass(frozen=True)
class DataConfig(Section):
    """Dataset root (COCO layout), styles, and the train / eval splits."""

    _section: typing.ClassVar[str] = "data"
    root: str = "data/coco"
    styles: tuple[str, ...] = PAPER_STYLES
    extra_styles: tuple[str, ...] = ()
    splits: dict[str, SplitConfig] = field(default_factory=dict)

    def _validate(self) -> None:
        if not self.styles:
            self._fail("styles", "needs at least one style")
        known = set(KNOWN_STYLES) | set(self.extra_styles)
        for s in self.styles:
            if s not in known:
                self._fail(
                    "styles",
                    f"unknown style {s!r} (known: {', '.join(KNOWN_STYLES)}; declare new ones in data.extra_styles)",
                )
        if len(set(self.styles)) != len(self.styles):
            self._fail("styles", f"duplicate style in {list(self.styles)}")
        if set(self.splits) != {"train", "eval"}:
            self._fail("splits", f"must define exactly 'train' and 'eval', got {sorted(self.splits)}")
        if self.splits["train"].coco == self.splits["eval"].coco:
            self._fail("splits", "train and eval must be disjoint COCO splits")


@dataclass(frozen=True)
class SampleConfig(Section):
    """Stage ``sample`` (docs/method.md §1.1-1.2)."""

    _section: typing.ClassVar[str] = "sample"
    seed: int = 0
    resolution: int = 1024
    min_area_frac: float = 0.0
    categories: tuple[str, ...] = ()
    exclude_categories: tuple[str, ...] = ()
    max_mask_loss: float = 0.5

    def _validate(self) -> None:
        if self.resolution < 16 or self.resolution % 16:
            self._fail("resolution", f"must be a positive multiple of 16, got {self.resolution}")
        if self.resolution**2 > MAX_IMAGE_PIXELS:
            self._fail(
                "resolution", f"{self.resolution}^2 pixels is more than the {MAX_IMAGE_PIXELS} an image may have"
            )
        self._in_range("min_area_frac", 0, 1, closed=False)
        self._in_range("max_mask_loss", 0, 1, closed=False)
        if set(self.categories) & set(self.exclude_categories):
            self._fail("exclude_categories", "overlaps sample.categories")


@dataclass(frozen=True)
class StylizeConfig(Section):
    """Stage ``stylize`` (docs/method.md §1.3): global stylization with FLUX.1-Kontext."""

    _section: typing.ClassVar[str] = "stylize"
    instruction: str = "make the image into {style} style"
    steps: int = 28
    guidance: float = 2.5
    max_sequence_length: int = 512
    batch_size: int = 1
    seed: int = 0

    def _validate(self) -> None:
        if "{style}" not in self.instruction:
            self._fail("instruction", f"must contain '{{style}}', got {self.instruction!r}")
        self._at_least(1, "steps", "batch_size")
        self._at_least(0, "guidance")
        self._in_range("max_sequence_length", 1, 512)


@dataclass(frozen=True)
class CompositeConfig(Section):
    """Stage ``composite`` (docs/method.md §1.4-1.5): pseudo-GT by seamless clone or alpha."""

    _section: typing.ClassVar[str] = "composite"
    method: Literal["seamless", "alpha"] = "seamless"
    pad: int = 16
    feather: float = 2.0
    instruction: str = "make the {object} into {style} style"

    def _validate(self) -> None:
        if self.pad < 1:
            self._fail("pad", f"must be >= 1 (seamlessClone needs room at the border), got {self.pad}")
        self._at_least(0, "feather")
        for key in ("{object}", "{style}"):
            if key not in self.instruction:
                self._fail("instruction", f"must contain '{key}', got {self.instruction!r}")


#: Targets a double-stream block (``FluxTransformerBlock``) offers. The first four are
#: the paper's; ``add_*``/``to_add_out`` are the text-stream projections, ``ff`` and
#: ``ff_context`` the image- and text-stream MLPs (both of their Linears).
DOUBLE_STREAM_TARGETS: tuple[str, ...] = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "ff",
    "ff_context",
)
#: Targets a single-stream block (``FluxSingleTransformerBlock``) offers; the first
#: three are the paper's. ``proj_out`` is shared by attention output and MLP.
SINGLE_STREAM_TARGETS: tuple[str, ...] = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out")
LORA_DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class LoraConfig(Section):
    """Experts (rank, alpha, init), where they go (streams, targets) and how they are routed.

    ``routing: style`` is a hard one-hot choice by the sample's style (the public code's
    ``set_adapters([style])``); ``learned`` is MoLE's softmax gate over the pooled text
    embedding, with ``balance_weight`` weighting its load-balancing loss in training.
    ``dtype`` is the dtype of the expert weights (the frozen base may be bf16).
    """

    _section: typing.ClassVar[str] = "lora"
    rank: int = 4
    alpha: float = 4.0
    dropout: float = 0.0
    init: Literal["gaussian", "kaiming"] = "gaussian"
    double_stream: bool = True
    single_stream: bool = True
    double_targets: tuple[str, ...] = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0")
    single_targets: tuple[str, ...] = ("attn.to_q", "attn.to_k", "attn.to_v")
    routing: Literal["style", "learned"] = "style"
    router_temperature: float = 1.0
    balance_weight: float = 0.01
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"

    @property
    def scaling(self) -> float:
        """The LoRA output scale ``alpha / rank`` (peft's default, non-rsLoRA scaling)."""
        return self.alpha / self.rank

    def _validate(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int):
            self._fail("rank", f"must be an integer, got {self.rank!r}")
        self._at_least(1, "rank")
        self._positive("alpha", "router_temperature")
        self._in_range("dropout", 0, 1, closed=False)
        self._at_least(0, "balance_weight")
        if not (self.double_stream or self.single_stream):
            self._fail("double_stream", "double_stream and single_stream are both false: no expert would be trained")
        for key, enabled, targets, allowed in (
            ("double_targets", self.double_stream, self.double_targets, DOUBLE_STREAM_TARGETS),
            ("single_targets", self.single_stream, self.single_targets, SINGLE_STREAM_TARGETS),
        ):
            if enabled and not targets:
                self._fail(key, "is empty but its stream is enabled")
            for t in targets:
                if t not in allowed:
                    self._fail(key, f"unknown target {t!r} (expected some of: {', '.join(allowed)})")
            if len(set(targets)) != len(targets):
                self._fail(key, f"duplicate target in {list(targets)}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (tuples as lists) that :meth:`from_dict` reads back."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> LoraConfig:
        """Build from a mapping (``params.yaml`` section or saved JSON), with full validation."""
        return _build(cls._section, raw, cls)


@dataclass(frozen=True)
class LossConfig(Section):
    """``loss:`` attention supervision (docs/method.md §3-4); a weight of 0 disables a term (ablations)."""

    _section: typing.ClassVar[str] = "loss"
    focus_weight: float = 0.1
    cover_weight: float = 5e-5
    direction: Literal["text_to_image", "image_to_text"] = "text_to_image"
    normalize: Literal["all", "style_tokens"] = "all"
    layers: Literal["all", "double", "single"] = "all"
    focus_distribution: Literal["normalize", "softmax"] = "normalize"
    tau: float = 0.1
    cover_map: Literal["minmax", "official_logits"] = "minmax"
    alpha: float = 2.0
    # flow-loss weight of the latent values the object covers (losses.element_coverage); 1.0 = the paper's loss
    object_weight: float = 1.0

    def _validate(self) -> None:
        self._at_least(0, "focus_weight", "cover_weight", "object_weight")
        self._positive("tau", "alpha")
        if self.normalize == "style_tokens" and self.direction != "image_to_text":
            self._fail("normalize", "'style_tokens' exists only for direction image_to_text (the public code's)")


@dataclass(frozen=True)
class TrainConfig(Section):
    """``train:`` the training loop (docs/method.md §2; paper column = public code's settings)."""

    _section: typing.ClassVar[str] = "train"
    steps: int = 10000
    learning_rate: float = 1e-5
    lr_scheduler: Literal["constant", "constant_with_warmup", "cosine", "linear"] = "constant"
    lr_warmup_steps: int = 0
    batch_size: int = 2
    gradient_accumulation: int = 4
    mixed_precision: Literal["no", "bf16", "fp16"] = "bf16"
    gradient_checkpointing: bool = True
    optimizer: Literal["adamw", "adamw8bit"] = "adamw"
    weight_decay: float = 1e-4
    max_grad_norm: float = 1.0
    weighting_scheme: Literal["none", "logit_normal", "mode", "sigma_sqrt", "cosmap"] = "none"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    guidance: float = 1.0
    max_sequence_length: int = 77
    seed: int = 0
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10

    def _validate(self) -> None:
        self._at_least(
            1,
            "steps",
            "batch_size",
            "gradient_accumulation",
            "max_sequence_length",
            "checkpoint_every",
            "keep_checkpoints",
            "log_every",
        )
        self._positive("learning_rate", "max_grad_norm")
        self._in_range("learning_rate", 0, 1, closed=False)
        self._at_least(0, "lr_warmup_steps")
        self._in_range("max_sequence_length", 1, 512)


@dataclass(frozen=True)
class InferConfig(Section):
    """``infer:`` editing the held-out pairs (docs/method.md §6; defaults = public code)."""

    _section: typing.ClassVar[str] = "infer"
    instruction: str = "make the {object} into {style} style"
    steps: int = 28
    guidance: float = 3.5
    # None = the length the experts were trained with (train.max_sequence_length, stored in the
    # model's regionroute.json), for every method: the baseline reads the same text sequence.
    max_sequence_length: int | None = None
    batch_size: int = 1
    seed: int = 0
    attention_steps: tuple[int, ...] = (5, 10, 15, 20, 25)
    attention_direction: Literal["text_to_image", "image_to_text"] = "text_to_image"
    merge_expert: bool = True
    figures: bool = True

    def _validate(self) -> None:
        for key in ("{object}", "{style}"):
            if key not in self.instruction:
                self._fail("instruction", f"must contain '{key}', got {self.instruction!r}")
        self._at_least(1, "steps", "batch_size")
        if self.max_sequence_length is not None and not 1 <= self.max_sequence_length <= 512:
            self._fail("max_sequence_length", f"must be null or in [1, 512] (T5), got {self.max_sequence_length}")
        bad = [s for s in self.attention_steps if not 1 <= s <= self.steps]
        if bad:
            self._fail("attention_steps", f"step {bad[0]} is outside 1..infer.steps ({self.steps})")


@dataclass(frozen=True)
class ScoreConfig(Section):
    """``score:`` evaluation models and options (docs/method.md §7)."""

    _section: typing.ClassVar[str] = "score"
    clip: str = "ViT-L-14/openai"  # open_clip "arch/pretrained", a local checkpoint, or "tiny"
    lpips: str = "alex"  # alex | vgg | squeeze | tiny
    vlm: str = "Qwen/Qwen2.5-VL-7B-Instruct"  # hub id, local directory, or "tiny"
    vlm_dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    vlm_max_pixels: int = 1024 * 28 * 28
    device: Literal["auto", "cpu", "cuda"] = "auto"
    template: str = "an image in {style} style"
    dilate: int = 5
    batch_size: int = 16
    vlm_batch_size: int = 4
    seed: int = 0

    def _validate(self) -> None:
        if "{style}" not in self.template:
            self._fail("template", f"must contain '{{style}}', got {self.template!r}")
        self._at_least(1, "batch_size", "vlm_batch_size", "vlm_max_pixels")
        self._at_least(0, "dilate")


#: Section name -> its dataclass.
SECTIONS: dict[str, type[Section]] = {
    "models": ModelsConfig,
    "data": DataConfig,
    "sample": SampleConfig,
    "stylize": StylizeConfig,
    "composite": CompositeConfig,
    "lora": LoraConfig,
    "loss": LossConfig,
    "train": TrainConfig,
    "infer": InferConfig,
    "score": ScoreConfig,
}


def section_class(name: str) -> type[Section]:
    """The dataclass of a params section."""
    return SECTIONS[name]


@dataclass(frozen=True)
class Params:
    """Every section of a params file, validated."""

    models: ModelsConfig
    data: DataConfig
    sample: SampleConfig
    stylize: StylizeConfig
    composite: CompositeConfig
    lora: LoraConfig
    loss: LossConfig
    train: TrainConfig
    infer: InferConfig
    score: ScoreConfig


T = TypeVar("T")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; return it in canonical form."""
    origin, args = get_origin(tp), get_args(tp)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: must be one of {', '.join(map(str, args))}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            try:
                return _coerce(key, value, arg)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return tuple(_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {str(k): _coerce(f"{key}.{k}", v, args[1]) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return _build(key, value, tp)
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{key}: expected null, got {value!r}")
        return None
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config annotation {tp!r} for {key}")  # a bug, not user error


def _build(key: str, raw: Any, cls: type[T]) -> T:
    if raw is None or (isinstance(raw, dict) and not raw):
        raise ConfigError(f"{key}: section is empty")
    if not isinstance(raw, dict):
        raise ConfigError(f"{key}: expected a mapping, got {raw!r}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"{key}.{unknown[0]}: unknown key (expected one of: {', '.join(fields)})")
    missing = [name for name in fields if name not in raw]  # no silent defaults: the file holds every setting
    if missing:
        raise ConfigError(f"{key}.{missing[0]}: missing (every key of the section must be set)")
    kwargs = {name: _coerce(f"{key}.{name}", raw[name], hints[name]) for name in fields}
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        # Re-prefix nested sections (e.g. data.splits.<split>) with the real key.
        msg = str(exc)
        section = getattr(cls, "_section", "")
        if section and msg.startswith(section + ".") and section != key:
            msg = key + msg[len(section) :]
        raise ConfigError(msg) from None


def read_params_file(path: str | Path) -> dict[str, Any]:
    """Read a params YAML file; a missing or malformed file is a :class:`ConfigError`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found")
    try:
        # YAML 1.2, as DVC reads and writes params.yaml (``dvc exp run -S`` rewrites it with
        # ruamel): under PyYAML's YAML 1.1 an unquoted ``no`` would become False.
        raw = YAML(typ="safe", pure=True).load(path.read_text())
    except YAMLError as exc:
        raise ConfigError(f"{path}: malformed YAML ({str(exc).strip().splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at top level")
    return raw


def load_section(path: str | Path, name: str, cls: type[T] | None = None) -> T:
    """Load and validate one section of a params file into its dataclass."""
    cls = cls or section_class(name)  # type: ignore[assignment]
    raw = read_params_file(path)
    if name not in raw:
        raise ConfigError(f"{path}: section '{name}' is missing")
    try:
        return _build(name, raw[name], cls)  # type: ignore[arg-type]
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def load_params(path: str | Path) -> Params:
    """Load and validate every section; unknown top-level sections are errors."""
    raw = read_params_file(path)
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"{path}: {unknown[0]}: unknown section (expected: {', '.join(SECTIONS)})")
    return Params(**{name: load_section(path, name) for name in SECTIONS})  # type: ignore[arg-type]
