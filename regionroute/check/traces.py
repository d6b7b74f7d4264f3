"""The calls of each GPU stage, traced on fake tensors, and their cache (docs/method.md §2, "Memory").

Used by :mod:`regionroute.check.accounting`, with the tracer of :mod:`regionroute.check.memtrace`:
:func:`trace_train` runs the real :class:`~regionroute.objective.Objective` (forward and backward),
:func:`trace_flux` one denoising step, and :func:`t5_peak`, :func:`clip_text_peak`, :func:`vae_peak`,
:func:`vlm_language_peak` the other models' forwards. :class:`Peaks` caches each peak on disk, keyed
on its inputs and on the library's code (every module of ``regionroute``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from regionroute.check.memtrace import (
    LiveBytes,
    Trace,
    build_fake,
    cuda_autocast,
    cuda_float32_policy,
    fake_mode,
    real_mode,
    trace_forward,
)
from regionroute.config import LoraConfig, LossConfig, TrainConfig
from regionroute.objective import TrainCache

__all__ = [
    "AUTOCAST",
    "FluxCall",
    "Peaks",
    "TrainCall",
    "clip_text_peak",
    "lpips_builder",
    "open_clip_builder",
    "t5_peak",
    "trace_flux",
    "trace_train",
    "vae_peak",
    "vlm_language_peak",
]

#: The code the traces run (and the accounting that sets them up): a change to any of it re-traces.


@dataclass(frozen=True)
class Peaks:
    """Traced activation peaks, cached on disk by content; every peak is None when ``activations`` is off.

    ``peaks(name, key, compute)``: the cached peak of ``compute()``, keyed on ``name``, ``key`` (the
    call's inputs: configs, shapes, dtypes) and the library's code; the paper's training trace takes
    tens of seconds.
    """

    activations: bool
    use_cache: bool

    def __call__(self, name: str, key: dict[str, Any], compute: Callable[[], int]) -> int | None:
        if not self.activations:
            return None
        from regionroute import REPO_ROOT
        from regionroute.files import write_json
        from regionroute.fingerprint import code_digest
        from regionroute.models import cache_dir

        full = {"what": name, **key}
        keyed = json.dumps(
            {**full, "src": code_digest((REPO_ROOT / "regionroute").rglob("*.py"))}, sort_keys=True, default=str
        )
        digest = hashlib.sha256(keyed.encode())
        path = cache_dir() / "accounting" / f"{digest.hexdigest()[:24]}.json"
        if self.use_cache and path.is_file():
            try:
                return int(json.loads(path.read_text())["peak"])
            except (OSError, ValueError, KeyError):
                pass
        peak = compute()
        if self.use_cache:
            write_json(path, {"key": json.loads(json.dumps(full, default=str)), "peak": peak})
        return peak


#: ``train.mixed_precision`` -> the autocast dtype accelerate uses.
AUTOCAST: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class FluxCall:
    """One denoising step of an inference stage (shapes, experts, attention capture)."""

    batch: int
    text_len: int  # T5 tokens L
    grid: tuple[int, int]  # target-image token grid (h, w); the context image adds as many tokens
    lora: LoraConfig | None = None  # experts injected (None: the base model, or a merged expert)
    experts: tuple[str, ...] = ()
    attention: tuple[str, str, str] | None = None  # recorder (direction, normalize, layers), or None
    guidance: float = 1.0
    style_tokens: int = 3  # T5 tokens per style word (pixel-art: 3); samples get disjoint spans (worst case)


@dataclass(frozen=True)
class TrainCall:
    """One micro-batch of ``train``: batch, text length, precision, checkpointing come from ``train``."""

    train: TrainConfig
    lora: LoraConfig
    loss: LossConfig
    experts: tuple[str, ...]
    grid: tuple[int, int]  # target-image token grid (h, w)
    style_tokens: int = 3  # T5 tokens per style word; samples get disjoint spans (worst case)


def _checkpoint_with_policy(module: nn.Module, *args: object) -> object:
    """diffusers' default checkpointing function, with the float32 policy re-entered for the recomputation
    (PyTorch does not carry function modes into the backward, unlike the autocast state)."""
    from torch.utils.checkpoint import checkpoint

    contexts = lambda: (contextlib.nullcontext(), cuda_float32_policy())  # noqa: E731
    return checkpoint(module.__call__, *args, use_reentrant=False, context_fn=contexts)


def _style_mask(batch: int, text_len: int, k: int) -> torch.Tensor:
    mask = torch.zeros(batch, text_len, dtype=torch.bool)  # (B, L)
    k = min(k, text_len)
    for b in range(batch):
        start = min(2 + b * k, text_len - k)
        mask[b, start : start + k] = True
    return mask


def _flux(
    config: dict, weight_dtype: torch.dtype, lora: LoraConfig | None, experts: tuple[str, ...], fake: bool
) -> tuple[nn.Module, Any, contextlib.AbstractContextManager]:
    """The transformer built from ``config`` (fake or real), the experts injected: (model, moe or None, mode)."""
    from diffusers import FluxTransformer2DModel

    from regionroute.lora_moe import inject_lora_moe

    mode = fake_mode() if fake else contextlib.nullcontext()
    model = build_fake(lambda: FluxTransformer2DModel.from_config(config), weight_dtype, mode)
    with mode:
        moe = inject_lora_moe(model, lora, experts) if lora is not None else None
    return model, moe, mode


def _train_cache(config: dict, call: TrainCall) -> TrainCache:
    """One micro-batch's :class:`~regionroute.objective.TrainCache`: real zeros, as ``train`` keeps it on the host."""
    b, L, (h, w) = call.train.batch_size, call.train.max_sequence_length, call.grid
    n, c = h * w, int(config["in_channels"])  # packed latents (B, N, C*4)
    elements = (b, n, c) if call.loss.object_weight != 1.0 else (b, 0, 0)
    return TrainCache(
        x0=torch.zeros(b, n, c),
        context=torch.zeros(b, n, c),
        prompt_embeds=torch.zeros(b, L, int(config["joint_attention_dim"])),
        pooled=torch.zeros(b, int(config["pooled_projection_dim"])),
        style_mask=_style_mask(b, L, call.style_tokens),
        mask_grid=torch.ones(b, h, w),  # every sample supervised
        object_elements=torch.zeros(elements),
        style_ids=torch.arange(b) % max(1, len(call.experts)),
        latent_hw=(2 * h, 2 * w),
    )


def trace_train(config: dict, weight_dtype: torch.dtype, call: TrainCall, *, fake: bool = True) -> Trace:
    """Bytes of one training micro-batch: the real :class:`~regionroute.objective.Objective`, forward and backward.

    Built as ``train`` builds it: experts injected, recorder installed, gradient checkpointing,
    the :class:`~regionroute.lora_moe.RoutedTransformer` with accelerate's float32 outputs under
    mixed precision, the step under autocast, ``backward`` on the total. The cache and the draw are
    real host tensors (zeros) and the Objective runs outside the fake mode, so its host-side reads
    (expert ids, style-token rows, mask counts) see data; every tensor the fake weights touch is fake.
    The draw is made inside the trace and dropped before the backward, like its device copies in
    ``train``. The expert gradients are allocated before the trace: they are trainable state.
    """
    from accelerate.utils import convert_outputs_to_fp32
    from diffusers import FlowMatchEulerDiscreteScheduler

    from regionroute.flux.attention import StyleAttentionRecorder
    from regionroute.lora_moe import RoutedTransformer
    from regionroute.objective import Objective

    tr, loss = call.train, call.loss
    model, moe, mode = _flux(config, weight_dtype, call.lora, call.experts, fake)
    with mode:
        if tr.gradient_checkpointing:
            model.enable_gradient_checkpointing(_checkpoint_with_policy)
        model.train()
        for p in moe.trainable_parameters():
            p.grad = torch.zeros_like(p)
    recorder = StyleAttentionRecorder(direction=loss.direction, normalize=loss.normalize, layers=loss.layers)
    recorder.install(model)
    routed = RoutedTransformer(moe)
    amp = AUTOCAST.get(tr.mixed_precision)
    if amp is not None:  # what accelerator.prepare wraps around the model's forward
        routed.forward = convert_outputs_to_fp32(routed.forward)
    pipe = SimpleNamespace(scheduler=FlowMatchEulerDiscreteScheduler())  # its sigmas are for draws: the trace gives one
    objective = Objective(pipe, routed, moe, recorder, _train_cache(config, call), tr, loss, call.lora.balance_weight)
    b, (h, w), c = tr.batch_size, call.grid, int(config["in_channels"])
    tracker = LiveBytes()
    with tracker, cuda_float32_policy(), torch.enable_grad():
        draw = {"idx": torch.arange(b), "noise": torch.zeros(b, h * w, c), "sigma": torch.full((b,), 0.5)}
        with cuda_autocast(amp):  # accelerator.autocast() around the step
            terms = objective(draw)
        del draw
        retained = tracker.live
        (terms["total"] / tr.gradient_accumulation).backward()  # accelerator.backward
        del terms
    return Trace(retained=retained, peak=tracker.peak)


def trace_flux(config: dict, weight_dtype: torch.dtype, call: FluxCall, *, fake: bool = True) -> Trace:
    """Bytes of one denoising step of ``FluxKontextPipeline.__call__`` under ``no_grad``, with the experts
    and the recorder of :class:`regionroute.infer.Editor` (stylize: the base model, no recorder)."""
    from regionroute.flux.attention import StyleAttentionRecorder

    model, moe, mode = _flux(config, weight_dtype, call.lora, call.experts, fake)
    model.train(False)
    b, L, (h, w) = call.batch, call.text_len, call.grid
    n, c = h * w, int(config["in_channels"])
    dj, dp = int(config["joint_attention_dim"]), int(config["pooled_projection_dim"])
    recorder = None
    if call.attention is not None:
        direction, normalize, layers = call.attention
        recorder = StyleAttentionRecorder(direction=direction, normalize=normalize, layers=layers)  # type: ignore[arg-type]
        recorder.install(model)
    expert_ids = torch.arange(b) % max(1, len(call.experts))  # (B,) real: routing needs no data of the model
    tracker = LiveBytes()
    with contextlib.ExitStack() as stack:
        if recorder is not None:
            with real_mode():  # the style rows are data (a real mask), as in the stages
                stack.enter_context(
                    recorder.capture(style_mask=_style_mask(b, L, call.style_tokens), n_text=L, n_target=n)
                )
        stack.enter_context(mode)
        stack.enter_context(tracker)
        stack.enter_context(cuda_float32_policy())
        stack.enter_context(torch.no_grad())
        dt = weight_dtype
        latents = torch.zeros(b, n, c, dtype=dt)
        hidden = torch.cat([latents, torch.zeros(b, n, c, dtype=dt)], dim=1)  # (B, 2N, C*4)
        pooled = torch.zeros(b, dp, dtype=dt)
        if moe is not None:
            if call.lora.routing == "learned":
                moe.route(pooled=pooled)
            else:
                moe.context.expert_ids = expert_ids  # LoraMoE.route without its host-side id check
        kwargs = dict(
            hidden_states=hidden,
            timestep=torch.full((b,), 0.5, dtype=dt) / 1000,
            pooled_projections=pooled.to(dt),
            encoder_hidden_states=torch.zeros(b, L, dj, dtype=dt),
            txt_ids=torch.zeros(L, 3, dtype=dt),
            img_ids=torch.zeros(2 * n, 3, dtype=dt),
            guidance=torch.full((b,), call.guidance, dtype=torch.float32),
            return_dict=False,
        )
        out = model(**kwargs)[0]
        pred = out[:, :n]
        latents = (latents.float() + 0.1 * pred.float()).to(dt)  # the scheduler's Euler step
        retained = tracker.live
        del out, pred
    return Trace(retained=retained, peak=tracker.peak)


# -- the other models of the stages (inference forwards) ----------------------------------------------
def t5_peak(cfg: dict[str, Any], batch: int, length: int, dtype: torch.dtype) -> int:
    from transformers import T5Config, T5EncoderModel

    ids = lambda: torch.zeros(batch, length, dtype=torch.long)  # noqa: E731
    return trace_forward(lambda: T5EncoderModel(T5Config(**cfg)), lambda m: m(input_ids=ids())[0], dtype).peak


def clip_text_peak(cfg: dict[str, Any], batch: int, dtype: torch.dtype) -> int:
    from transformers import CLIPTextConfig, CLIPTextModel

    ids = lambda: torch.zeros(batch, 77, dtype=torch.long)  # noqa: E731
    return trace_forward(lambda: CLIPTextModel(CLIPTextConfig(**cfg)), lambda m: m(input_ids=ids())[1], dtype).peak


def vae_peak(cfg: dict[str, Any], batch: int, res: int, dtype: torch.dtype, decode: bool) -> int:
    """Peak of the VAE encoding ``batch`` images of ``res`` px, or decoding their latents.

    The class is the config's (``AutoencoderKL``, or the toy world's ``PixelShuffleVAE``); the
    latent side is ``res / 2 ** (len(block_out_channels) - 1)``, as the pipeline computes it.
    """
    from regionroute.check.configs import vae_class, vae_scale_factor

    side = res // vae_scale_factor(cfg)
    if decode:
        lat = lambda: torch.zeros(batch, int(cfg["latent_channels"]), side, side, dtype=dtype)  # noqa: E731
        run = lambda m: m.decode(lat()).sample  # noqa: E731
    else:
        run = lambda m: m.encode(torch.zeros(batch, 3, res, res, dtype=dtype)).latent_dist.mode()  # noqa: E731
    return trace_forward(lambda: vae_class(cfg).from_config(cfg), run, dtype).peak


def open_clip_builder(model_cfg: dict[str, Any], quick_gelu: bool) -> Callable[[], nn.Module]:
    import open_clip

    return lambda: open_clip.model.CLIP(**model_cfg, quick_gelu=quick_gelu)


def lpips_builder(net: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import warnings

        import lpips

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return lpips.LPIPS(net=net, pretrained=False, pnet_rand=True, spatial=True, verbose=False)

    return build


def vlm_language_peak(config: Any, dtype: torch.dtype, rows: int, length: int) -> int:
    """The judge's language-model pass: ``rows`` prompts of ``length`` tokens, logits at the last position only."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    hidden = int(config.text_config.hidden_size)

    def run(m: nn.Module) -> torch.Tensor:
        out = m.model.language_model(
            inputs_embeds=torch.zeros(rows, length, hidden, dtype=dtype),
            attention_mask=torch.ones(rows, length, dtype=torch.long),
            position_ids=torch.zeros(3, rows, length, dtype=torch.long),  # M-RoPE (t, h, w)
            use_cache=False,
        )
        return m.lm_head(out.last_hidden_state[:, -1:])  # logits_to_keep=1

    return trace_forward(lambda: Qwen2_5_VLForConditionalGeneration(config), run, dtype).peak
