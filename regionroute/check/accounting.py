"""Memory accounting of each GPU stage at the configured dimensions, without weights (docs/method.md §2, "Memory").

:func:`account` builds every model of the params from its config (:mod:`.configs`) on the
``meta`` device (exact parameter counts; the LoRA-MoE injected as ``train`` does) and traces
each stage's calls on fake tensors (:mod:`.traces`). A stage needs ``weights + trainable +
activations + reserve`` bytes: trainable = experts + grads + optimizer state (AdamW, or AdamW8bit's
uint8 states), reserve = :data:`RUNTIME_RESERVE` (assumed: CUDA context, workspaces, allocator).
"""

from __future__ import annotations

import inspect
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from regionroute.check.configs import (
    KontextConfigs,
    clip_model_cfg,
    kontext_configs,
    vae_class,
    vae_scale_factor,
    vlm_config,
)
from regionroute.check.memtrace import trace_forward
from regionroute.check.traces import (
    FluxCall,
    Peaks,
    TrainCall,
    clip_text_peak,
    lpips_builder,
    open_clip_builder,
    t5_peak,
    trace_flux,
    trace_train,
    vae_peak,
    vlm_language_peak,
)
from regionroute.config import Params
from regionroute.models import DTYPES

__all__ = [
    "RUNTIME_RESERVE",
    "Accounting",
    "StageMemory",
    "account",
    "lora_summary",
    "optimizer_state_bytes",
]

GIB = 2**30
#: Assumed, not computed: CUDA context + cuBLAS/cuDNN workspaces + allocator slack.
RUNTIME_RESERVE = GIB
#: T5 tokens of one style word in the worst case (``pixel-art`` -> ``▁pixel``, ``-``, ``art``).
STYLE_TOKENS = 3
#: Prompt tokens of one VLM question besides the image (chat template + question, measured ~40).
VLM_TEXT_TOKENS = 64


def _meta(build: Callable[[], nn.Module]) -> nn.Module:
    with torch.device("meta"):
        return build()


def _n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# -- counts ---------------------------------------------------------------------------------------
def lora_summary(transformer_cfg: dict[str, Any], lora: Any, experts: tuple[str, ...]) -> dict[str, Any]:
    """Inject the LoRA-MoE into the transformer built on ``meta``; counts per stream and per target."""
    from diffusers import FluxTransformer2DModel

    from regionroute.lora_moe import inject_lora_moe

    model = _meta(lambda: FluxTransformer2DModel.from_config(transformer_cfg))
    base = _n_params(model)
    moe = inject_lora_moe(model, lora, experts)
    per_stream: dict[str, int] = Counter()
    targets: dict[str, int] = Counter()
    for name, layer in moe.layers.items():
        stream = moe.streams[name]
        per_stream[stream] += layer.lora_A.numel() + layer.lora_B.numel()
        targets[f"{stream}:{name.split('.', 2)[2]}"] += 1
    router = _n_params(moe.router) if moe.router is not None else 0
    return {
        "base_params": base,
        "lora_params": {**dict(per_stream), "router": router, "total": sum(per_stream.values()) + router},
        "lora_modules": dict(sorted(targets.items())),
        "trainable_shapes": [tuple(p.shape) for p in moe.trainable_parameters()],
    }


def optimizer_state_bytes(shapes: list[tuple[int, ...]], param_bytes: int, optimizer: str) -> int:
    """Optimizer state of the given parameter tensors.

    AdamW: two moments in the parameter dtype; bitsandbytes AdamW8bit: two uint8 states plus a float32
    absmax per 2048 elements for tensors of >= 4096 elements, float32 states below, and two quantization maps.
    """
    numels = [math.prod(s) for s in shapes]
    if optimizer == "adamw":
        return 2 * sum(numels) * param_bytes
    total = 2 * 256 * 4  # the two shared quantization maps
    for n in numels:
        total += 2 * n * 4 if n < 4096 else 2 * n + 2 * math.ceil(n / 2048) * 4
    return total


# -- per stage --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StageMemory:
    """What one stage needs on its device, in bytes.

    ``weights``: parameters resident on the device, in their dtype; ``trainable`` (train): expert
    parameters + gradients + optimizer state; ``activations``: the traced peak of the stage's largest
    call; ``reserve``: :data:`RUNTIME_RESERVE`, for what is not a tensor.
    """

    stage: str
    weights: int
    trainable: int
    activations: int | None  # None: not traced (``activations=False``)
    reserve: int = RUNTIME_RESERVE
    detail: dict[str, int | None] = field(default_factory=dict)  # named parts (per model, per phase)
    note: str = ""

    @property
    def tensors(self) -> int | None:
        """Bytes of tensors at the stage's peak: its largest phase (train: encoding or training)."""
        if self.activations is None:
            return None
        return max(self.weights + self.trainable + self.activations, self.detail.get("encode_phase") or 0)

    @property
    def total(self) -> int | None:
        """What a CUDA device must offer: :attr:`tensors` + :attr:`reserve`."""
        return None if self.tensors is None else self.tensors + self.reserve


@dataclass(frozen=True)
class Accounting:
    """The whole accounting of one params file (``regionroute check --json``'s ``accounting``)."""

    sources: dict[str, str]  # model -> where its config was read
    params: dict[str, int]  # parameter counts per model
    lora: dict[str, Any]  # LoRA-MoE counts (per stream, per target module)
    trainable_bytes: dict[str, int]  # params, grads, optimizer, total
    tokens: dict[str, dict[str, int]]  # per stage: text, image (target), sequence
    stages: dict[str, StageMemory]
    method: str = (
        "parameters: models built from their configs on the meta device; activations: each stage's calls "
        "executed on fake tensors (regionroute.check.memtrace), bytes of live storages traced from allocation to "
        "release; CUDA autocast emulated; reserve assumed"
    )

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["lora"] = {k: v for k, v in self.lora.items() if k != "trainable_shapes"}
        for name, stage in self.stages.items():
            out["stages"][name] |= {"tensors": stage.tensors, "total": stage.total}
        return out


# -- the steps of the accounting --------------------------------------------------------------------
def _largest(parts: dict[str, int | None]) -> int | None:
    """The largest part; None when a part was not traced."""
    return None if any(v is None for v in parts.values()) else max(v for v in parts.values() if v is not None)


@dataclass(frozen=True)
class _Kontext:
    """The Kontext pipeline of the params, counted: what the stylize, train and infer accounting share."""

    configs: KontextConfigs
    dtype: str  # models.dtype
    grid: tuple[int, int]  # target-image token grid (h, w)
    counts: dict[str, int]  # parameters per component
    lora: dict[str, Any]  # lora_summary of the experts
    trainable: dict[str, int]  # bytes: params, grads, optimizer, total

    @property
    def weights(self) -> int:
        """Bytes of the four components in ``models.dtype``."""
        return DTYPES[self.dtype].itemsize * sum(self.counts.values())


def _token_grid(resolution: int, kc: KontextConfigs | None) -> tuple[int, int]:
    """One token per 2x2 latent patch: 16 px with FLUX's VAE (f = 8), 8 px with the toy latent (f = 4)."""
    patch = 2 * (vae_scale_factor(kc.vae) if kc is not None else 8)
    return resolution // patch, resolution // patch


def _tokens(params: Params, grid: tuple[int, int]) -> dict[str, dict[str, int]]:
    """Text, target and context tokens of each Kontext stage's transformer sequence."""
    n = grid[0] * grid[1]
    tr, inf = params.train, params.infer
    lengths = {
        "stylize": params.stylize.max_sequence_length,
        "train": tr.max_sequence_length,
        "infer": inf.max_sequence_length or tr.max_sequence_length,
    }
    return {s: {"text": L, "image": n, "context": n, "sequence": L + 2 * n} for s, L in lengths.items()}


def _kontext(params: Params, kc: KontextConfigs, grid: tuple[int, int]) -> _Kontext:
    """Parameter counts of the pipeline's components and the experts' trainable state."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    lora = lora_summary(kc.transformer, params.lora, params.data.styles)
    counts = {
        "transformer": lora["base_params"],
        "text_encoder": _n_params(_meta(lambda: CLIPTextModel(CLIPTextConfig(**kc.text_encoder)))),
        "text_encoder_2": _n_params(_meta(lambda: T5EncoderModel(T5Config(**kc.text_encoder_2)))),
        "vae": _n_params(_meta(lambda: vae_class(kc.vae).from_config(kc.vae))),
    }
    n_lora, lb = lora["lora_params"]["total"], DTYPES[params.lora.dtype].itemsize
    trainable = {"params": n_lora * lb, "grads": n_lora * lb}
    trainable["optimizer"] = optimizer_state_bytes(lora["trainable_shapes"], lb, params.train.optimizer)
    trainable["total"] = sum(trainable.values())
    return _Kontext(kc, params.models.dtype, grid, counts, lora, trainable)


def _encoder_peaks(k: _Kontext, peaks: Peaks, batch: int, length: int, res: int, decode: bool) -> dict[str, int | None]:
    """Peaks of T5 and CLIP on the prompts and of the VAE encoding (and ``decode``: decoding) the images."""
    kc, wdt = k.configs, DTYPES[k.dtype]
    key = {"cfg": asdict(kc), "dtype": k.dtype, "batch": batch, "length": length, "res": res}
    parts = {
        "t5": peaks("t5", key, lambda: t5_peak(kc.text_encoder_2, batch, length, wdt)),
        "clip_text": peaks("clip", key, lambda: clip_text_peak(kc.text_encoder, batch, wdt)),
        "vae_encode": peaks("vae_encode", key, lambda: vae_peak(kc.vae, batch, res, wdt, False)),
    }
    if decode:
        parts["vae_decode"] = peaks("vae_decode", key, lambda: vae_peak(kc.vae, batch, res, wdt, True))
    return parts


def _flux_peak(k: _Kontext, peaks: Peaks, call: FluxCall | TrainCall) -> int | None:
    """Peak of one transformer call: a denoising step (:class:`FluxCall`) or a training micro-batch."""
    cfg, wdt = k.configs.transformer, DTYPES[k.dtype]
    key = {"cfg": cfg, "dtype": k.dtype, "call": asdict(call)}
    if isinstance(call, TrainCall):
        return peaks("train", key, lambda: trace_train(cfg, wdt, call).peak)
    return peaks("flux", key, lambda: trace_flux(cfg, wdt, call).peak)


def _stylize(params: Params, k: _Kontext, peaks: Peaks) -> StageMemory:
    """Base Kontext's global edit: the encoders, one denoising step, the VAE decode."""
    sty = params.stylize
    parts = _encoder_peaks(k, peaks, sty.batch_size, sty.max_sequence_length, params.sample.resolution, True)
    call = FluxCall(sty.batch_size, sty.max_sequence_length, k.grid, guidance=sty.guidance)
    parts["transformer"] = _flux_peak(k, peaks, call)
    return StageMemory("stylize", k.weights, 0, _largest(parts), detail=parts)


def _train_call(params: Params, k: _Kontext, checkpointing: bool) -> TrainCall:
    """A training micro-batch of the params, with gradient checkpointing on or off."""
    train = replace(params.train, gradient_checkpointing=checkpointing)
    return TrainCall(train, params.lora, params.loss, params.data.styles, k.grid, STYLE_TOKENS)


def _train(params: Params, k: _Kontext, peaks: Peaks, alternatives: bool) -> StageMemory:
    """Two phases: encoding the dataset (all weights), then training (the transformer and the experts)."""
    from regionroute.objective import encode_dataset

    tr = params.train
    enc_batch = inspect.signature(encode_dataset).parameters["batch_size"].default
    enc = _encoder_peaks(k, peaks, enc_batch, tr.max_sequence_length, params.sample.resolution, False)
    parts: dict[str, int | None] = {f"encode_{name}": v for name, v in enc.items()}
    parts["encode_weights"] = k.weights
    parts["encode_phase"] = None if _largest(enc) is None else k.weights + _largest(enc)
    act = _flux_peak(k, peaks, _train_call(params, k, tr.gradient_checkpointing))
    parts["transformer"] = act
    parts[f"transformer_checkpointing_{'on' if tr.gradient_checkpointing else 'off'}"] = act
    if alternatives:
        other = _flux_peak(k, peaks, _train_call(params, k, not tr.gradient_checkpointing))
        parts[f"transformer_checkpointing_{'off' if tr.gradient_checkpointing else 'on'}"] = other
    weights = DTYPES[k.dtype].itemsize * k.counts["transformer"]
    note = f"encoders freed after caching latents/embeddings (batch {enc_batch}); the larger phase counts"
    return StageMemory("train", weights, k.trainable["total"], act, detail=parts, note=note)


def _infer(params: Params, k: _Kontext, peaks: Peaks) -> StageMemory:
    """One edit: the encoders, denoising steps with the experts and the recorder (its maps kept), the decode."""
    inf, lcfg = params.infer, params.lora
    length = inf.max_sequence_length or params.train.max_sequence_length
    merged = inf.merge_expert and lcfg.routing == "style"
    parts = _encoder_peaks(k, peaks, inf.batch_size, length, params.sample.resolution, True)
    call = FluxCall(
        inf.batch_size, length, k.grid, lora=None if merged else lcfg, experts=params.data.styles,
        attention=(inf.attention_direction, "all", "all"), guidance=inf.guidance, style_tokens=STYLE_TOKENS,
    )  # fmt: skip
    one = _flux_peak(k, peaks, call)
    n_layers = int(k.configs.transformer["num_layers"]) + int(k.configs.transformer["num_single_layers"])
    n = k.grid[0] * k.grid[1]
    records = (inf.steps - 1) * n_layers * inf.batch_size * n * 4  # float32 maps kept for every step
    parts["transformer"] = None if one is None else one + records
    lora_bytes = k.lora["lora_params"]["total"] * DTYPES[lcfg.dtype].itemsize
    return StageMemory("infer", k.weights + lora_bytes, 0, _largest(parts), detail=parts)


def account(
    params: Params,
    *,
    activations: bool = True,
    stages: tuple[str, ...] = ("stylize", "train", "infer", "score"),
    alternatives: bool = True,
    hf_cache: Path | None = None,
    use_cache: bool = True,
) -> Accounting:
    """Account every model and the ``stages`` of ``params`` (``activations=False``: counts only, fast).

    ``alternatives`` also traces training with the other ``train.gradient_checkpointing`` setting.
    """
    peaks = Peaks(activations, use_cache)
    kc = kontext_configs(params.models.kontext, hf_cache) if {"stylize", "train", "infer"} & set(stages) else None
    grid = _token_grid(params.sample.resolution, kc)
    sources: dict[str, str] = {}
    counts: dict[str, int] = {}
    lora: dict[str, Any] = {}
    trainable: dict[str, int] = {}
    out: dict[str, StageMemory] = {}
    if kc is not None:
        k = _kontext(params, kc, grid)
        sources["kontext"], counts, lora, trainable = kc.source, dict(k.counts), k.lora, k.trainable
        if "stylize" in stages:
            out["stylize"] = _stylize(params, k, peaks)
        if "train" in stages:
            out["train"] = _train(params, k, peaks, alternatives)
        if "infer" in stages:
            out["infer"] = _infer(params, k, peaks)
    if "score" in stages:
        score, score_sources, score_counts = _score(params, peaks, hf_cache)
        sources.update(score_sources)
        counts.update(score_counts)
        if score is not None:
            out["score"] = score
    return Accounting(sources, counts, lora, trainable, _tokens(params, grid), out)


def _score(
    params: Params, peaks: Peaks, hf_cache: Path | None
) -> tuple[StageMemory | None, dict[str, str], dict[str, int]]:
    """CLIP and LPIPS on a batch of images, the VLM judge's language pass (its vision tower estimated)."""
    sc, res = params.score, params.sample.resolution
    clip = clip_model_cfg(sc.clip, hf_cache)
    config = vlm_config(sc.vlm, hf_cache)
    if clip is None or config is None:
        return None, {}, {}
    from transformers import Qwen2_5_VLForConditionalGeneration

    net = "alex" if sc.lpips == "tiny" else sc.lpips
    counts = {
        "clip": _n_params(_meta(open_clip_builder(*clip))),
        "lpips": _n_params(_meta(lpips_builder(net))),
        "vlm": _n_params(_meta(lambda: Qwen2_5_VLForConditionalGeneration(config))),
    }
    vb = DTYPES[sc.vlm_dtype].itemsize
    weights = 4 * (counts["clip"] + counts["lpips"]) + vb * counts["vlm"]  # open_clip and LPIPS load in float32
    size = int(clip[0]["vision_cfg"]["image_size"])
    b = sc.batch_size
    vision = config.vision_config
    patch = int(vision.patch_size) * int(vision.spatial_merge_size)
    image_tokens = max(1, min(res * res, sc.vlm_max_pixels) // (patch * patch))  # merged visual tokens per image
    patches = sc.vlm_batch_size * image_tokens * int(vision.spatial_merge_size) ** 2
    hid, inter = int(vision.hidden_size), int(vision.intermediate_size)
    rows, length, vdt = 4 * sc.vlm_batch_size, image_tokens + VLM_TEXT_TOKENS, DTYPES[sc.vlm_dtype]
    clip_run = lambda mod: mod.encode_image(torch.zeros(b, 3, size, size))  # noqa: E731
    lpips_run = lambda mod: mod(torch.zeros(b, 3, res, res), torch.zeros(b, 3, res, res), normalize=True)  # noqa: E731
    vlm_key = {"cfg": config.to_dict(), "dtype": sc.vlm_dtype, "rows": rows, "len": length}
    parts = {
        "clip_image": peaks(
            "clip_image", {"cfg": clip, "b": b},
            lambda: trace_forward(open_clip_builder(*clip), clip_run, torch.float32).peak,
        ),
        "lpips": peaks(
            "lpips", {"net": net, "b": b, "res": res},
            lambda: trace_forward(lpips_builder(net), lpips_run, torch.float32).peak,
        ),
        "vlm_language": peaks("vlm", vlm_key, lambda: vlm_language_peak(config, vdt, rows, length)),
        # not traced (its window indices are data-dependent): per patch, hidden + norm + q, k, v + attention
        # output (6 x hidden) and the gated MLP (3 x intermediate), one block alive at a time
        "vlm_vision_estimate": patches * (6 * hid + 3 * inter) * vb if peaks.activations else None,
    }  # fmt: skip
    sources = {"clip": sc.clip, "lpips": "tiny (alex, random trunk)" if sc.lpips == "tiny" else net, "vlm": sc.vlm}
    return StageMemory("score", weights, 0, _largest(parts), detail=parts), sources, counts
