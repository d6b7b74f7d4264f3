"""``params.yaml: lora:`` -- the dual-stream LoRA-MoE configuration (docs/method.md §5).

Used by the ``train`` stage (inject experts, then train them jointly) and by ``infer``
(rebuild the MoE from a saved run). Defaults are the paper's: rank 4, alpha 4, a
gaussian-initialized A and a zero B per expert, experts on the attention projections
of both the double-stream and the single-stream blocks, hard routing by style.

Target names are relative to one block (``transformer_blocks.<i>`` or
``single_transformer_blocks.<i>``) and follow peft's suffix-matching convention; a
name that is a container (``ff``, ``ff_context``) selects every ``nn.Linear`` below it.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, Literal

from regionroute.config import _build, _Section

__all__ = [
    "DOUBLE_STREAM_TARGETS",
    "LORA_DTYPES",
    "SINGLE_STREAM_TARGETS",
    "LoraConfig",
]

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
class LoraConfig(_Section):
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
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            self._fail("rank", f"must be an integer >= 1, got {self.rank!r}")
        if not self.alpha > 0:
            self._fail("alpha", f"must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            self._fail("dropout", f"must be in [0, 1), got {self.dropout}")
        if self.init not in ("gaussian", "kaiming"):
            self._fail("init", f"must be one of gaussian, kaiming, got {self.init!r}")
        if self.routing not in ("style", "learned"):
            self._fail("routing", f"must be one of style, learned, got {self.routing!r}")
        if self.dtype not in LORA_DTYPES:
            self._fail("dtype", f"must be one of {', '.join(LORA_DTYPES)}, got {self.dtype!r}")
        if not self.router_temperature > 0:
            self._fail("router_temperature", f"must be > 0, got {self.router_temperature}")
        if not self.balance_weight >= 0:
            self._fail("balance_weight", f"must be >= 0, got {self.balance_weight}")
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
