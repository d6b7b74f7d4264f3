"""Activation memory measured by executing the real code path on fake tensors (docs/method.md §2, "Memory").

Used by :mod:`regionroute.accounting` (``regionroute check``): nothing here needs weights,
an accelerator or real memory. A model is built inside ``FakeTensorMode`` (tensors carry
shapes, dtypes and a CPU device but no data), the stage's forward (and backward) runs on
it, and :class:`LiveBytes` counts the bytes of every storage an aten op freshly allocates
(outputs of ops whose schema says they alias an input -- views, in-place ops -- are not
new memory), from the moment it is created until autograd, the caller or Python drop the
last reference to it. ``retained`` is what is still alive when the forward returns (what
the backward needs: saved tensors, checkpoint inputs, outputs); ``peak`` the largest total
seen at any moment of the forward and backward. Weights and buffers created before the
trace are not counted (they are accounted as weights).

What is traced: :func:`trace_flux` (one FLUX transformer call as ``train``, ``stylize`` or ``infer``
makes it), :func:`t5_peak`, :func:`clip_text_peak`, :func:`vae_peak` (the Kontext pipeline's other
models) and :func:`vlm_language_peak` plus :func:`trace_forward` on :func:`open_clip_builder` /
:func:`lpips_builder` (the ``score`` stage's models).

Why fake and not ``meta``: on ``meta`` tensors PyTorch picks the *math* attention (it
materializes the T x T matrix) and runs backward on a worker thread; fake CPU tensors take
the fused CPU flash kernel, which saves what the CUDA flash/cuDNN kernels save (q, k, v,
out and the log-sum-exp), and keep the backward on the caller's thread.

Mixed precision: ``autocast=bfloat16`` runs the trace under CPU autocast, whose
lower-precision list (linear, matmul, bmm, addmm, baddbmm, conv, attention) matches
CUDA's, plus :class:`_CudaFloat32Policy`, which reproduces CUDA autocast's float32 list
(``layer_norm``, ``group_norm``, ``softmax``, ``sum``, ``pow``, ...: CPU autocast leaves
those in bf16, CUDA autocast upcasts them, and their float32 outputs are saved for the
backward).

What is not counted: the CUDA context, cuBLAS/cuDNN workspaces and allocator rounding or
fragmentation (:mod:`regionroute.accounting` adds a fixed reserve for them), and host-side
tensors that the real run copies to the device with ``.to(device)`` (a no-op on the traced
CPU device; a few MiB for the paper's batch: noise, indices, sigmas).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map_only

from regionroute.config import LoraConfig, LossConfig

__all__ = [
    "FluxCall",
    "LiveBytes",
    "Trace",
    "build_fake",
    "clip_text_peak",
    "cuda_autocast",
    "cuda_float32_policy",
    "fake_mode",
    "lpips_builder",
    "open_clip_builder",
    "real_mode",
    "t5_peak",
    "trace_flux",
    "trace_forward",
    "vae_peak",
    "vlm_language_peak",
]

#: CUDA autocast's float32 list (torch.amp docs, "CUDA Ops that can autocast to float32"),
#: by the ``__name__`` of the function or method PyTorch dispatches to a TorchFunctionMode.
_CUDA_FP32_OPS = frozenset(
    {
        "__pow__", "__rdiv__", "__rpow__", "__rtruediv__", "acos", "asin", "binary_cross_entropy_with_logits",
        "cosh", "cosine_embedding_loss", "cdist", "cosine_similarity", "cross_entropy", "cumprod", "cumsum",
        "dist", "erfinv", "exp", "expm1", "group_norm", "hinge_embedding_loss", "kl_div", "l1_loss",
        "layer_norm", "log", "log_softmax", "log10", "log1p", "log2", "margin_ranking_loss", "mse_loss",
        "multilabel_margin_loss", "multi_margin_loss", "nll_loss", "norm", "normalize", "pdist",
        "poisson_nll_loss", "pow", "prod", "reciprocal", "rsqrt", "sinh", "smooth_l1_loss", "soft_margin_loss",
        "softmax", "softmin", "softplus", "sum", "renorm", "tan", "triplet_margin_loss",
    }
)  # fmt: skip


@dataclass(frozen=True)
class Trace:
    """Bytes measured by :class:`LiveBytes` over one traced region."""

    retained: int  # alive when the forward returned (saved for backward, checkpoint inputs, outputs)
    peak: int  # the most alive at any moment of the forward and the backward


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of storages allocated by aten ops while they are alive (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._refs: dict[int, weakref.ref] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not any(ret.alias_info is not None for ret in func._schema.returns):
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self._track(t)
        return out

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage._cdata  # the StorageImpl, unique while alive
        if key in self._refs:
            return
        nbytes = storage.nbytes()
        self._refs[key] = weakref.ref(storage, lambda _ref, k=key, n=nbytes: self._release(k, n))
        self.live += nbytes
        self.peak = max(self.peak, self.live)

    def _release(self, key: int, nbytes: int) -> None:
        if self._refs.pop(key, None) is not None:
            self.live -= nbytes


class _CudaFloat32Policy(TorchFunctionMode):
    """Under CPU autocast, run CUDA autocast's float32-list ops in float32 (as CUDA would)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") in _CUDA_FP32_OPS and torch.is_autocast_enabled("cpu"):

            def up(t: torch.Tensor) -> torch.Tensor:
                return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t

            args, kwargs = tree_map_only(torch.Tensor, up, (args, kwargs))
        return func(*args, **kwargs)


@contextlib.contextmanager
def cuda_autocast(dtype: torch.dtype | None) -> Iterator[None]:
    """CPU autocast to ``dtype`` (``None``: none); with :func:`cuda_float32_policy` around it, CUDA's policy.
    Torch's RMSNorm notice under autocast is dropped, as in training (:func:`quiet_rms_norm_notice`)."""
    from regionroute.flux.flow import quiet_rms_norm_notice

    if dtype is None:
        yield
        return
    with quiet_rms_norm_notice(), torch.autocast("cpu", dtype=dtype):
        yield


def cuda_float32_policy() -> contextlib.AbstractContextManager:
    """Wherever CPU autocast is on, upcast CUDA's float32-list ops (keep it on over the backward: a
    checkpointed block re-runs its forward there, under the autocast state it was recorded with)."""
    return _CudaFloat32Policy()


def fake_mode() -> contextlib.AbstractContextManager:
    """A ``FakeTensorMode`` in which real CPU tensors (masks, indices) may be mixed with fake ones."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode(allow_non_fake_inputs=True)


def real_mode() -> contextlib.AbstractContextManager:
    """Leave the fake mode for data-dependent bookkeeping (style-token rows, expert ids)."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    return unset_fake_temporarily()


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_fake(
    build: Callable[[], nn.Module], dtype: torch.dtype, mode: contextlib.AbstractContextManager
) -> nn.Module:
    """``build()`` with floating parameters created in ``dtype`` (``.to(dtype)`` cannot swap fake parameters)."""
    with mode, _default_dtype(dtype):
        return build()


def trace_forward(
    build: Callable[[], nn.Module],
    run: Callable[[nn.Module], object],
    dtype: torch.dtype,
    *,
    autocast: torch.dtype | None = None,
    fake: bool = True,
) -> Trace:
    """Peak bytes of ``run(model)`` under ``no_grad`` (an inference forward); ``run`` creates its own inputs."""
    mode = fake_mode() if fake else contextlib.nullcontext()
    model = build_fake(build, dtype, mode)
    tracker = LiveBytes()
    with mode, torch.no_grad(), tracker, cuda_float32_policy(), cuda_autocast(autocast):
        out = run(model)
        retained = tracker.live
        del out
    return Trace(retained=retained, peak=tracker.peak)


@dataclass(frozen=True)
class FluxCall:
    """One FLUX transformer call as a stage makes it (shapes, precision, experts, attention capture)."""

    batch: int
    text_len: int  # T5 tokens L
    grid: tuple[int, int]  # target-image token grid (h, w); the context image adds as many tokens
    train: bool  # True: forward + backward of regionroute.train's loss; False: one denoising step under no_grad
    checkpointing: bool = False
    autocast: torch.dtype | None = None
    lora: LoraConfig | None = None  # experts injected (None: the base model, or a merged expert)
    experts: tuple[str, ...] = ()
    attention: tuple[str, str, str] | None = None  # recorder (direction, normalize, layers), or None
    loss: LossConfig | None = None  # train: the attention-loss options and weights
    guidance: float = 1.0
    style_tokens: int = 3  # T5 tokens per style word (pixel-art: 3); samples get disjoint spans (worst case)


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


def trace_flux(config: dict, weight_dtype: torch.dtype, call: FluxCall, *, fake: bool = True) -> Trace:
    """Bytes of one transformer call with the real code path: diffusers' blocks, our MoE layers and recorder.

    Training mirrors :class:`regionroute.train._Step` (inputs built from the cached latents, flow-matching
    loss, Focus/Cover on the recorded maps, backward); inference mirrors one step of
    ``FluxKontextPipeline.__call__`` with the recorder of :class:`regionroute.infer.Editor`. The
    expert gradients are allocated before the trace: they are trainable state, not activations.
    """
    from diffusers import FluxTransformer2DModel
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    from regionroute.flux.attention import StyleAttentionRecorder
    from regionroute.lora_moe import inject_lora_moe
    from regionroute.losses import _cover, _focus, pair_maps_masks

    mode = fake_mode() if fake else contextlib.nullcontext()
    model = build_fake(lambda: FluxTransformer2DModel.from_config(config), weight_dtype, mode)
    b, L, (h, w) = call.batch, call.text_len, call.grid
    n, c = h * w, int(config["in_channels"])
    dj, dp = int(config["joint_attention_dim"]), int(config["pooled_projection_dim"])
    with mode:
        moe = inject_lora_moe(model, call.lora, call.experts) if call.lora is not None else None
        model.train(call.train)
        if call.train and call.checkpointing:
            model.enable_gradient_checkpointing(_checkpoint_with_policy)
        if call.train and moe is not None:
            for p in moe.trainable_parameters():
                p.grad = torch.zeros_like(p)
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
        stack.enter_context(torch.enable_grad() if call.train else torch.no_grad())
        f32, dt = torch.float32, weight_dtype
        if call.train:  # regionroute.train._Step.__call__
            x0, noise, ctx = (torch.zeros(b, n, c, dtype=f32) for _ in range(3))  # (B, N, C*4) from the cache
            sigma = torch.full((b, 1, 1), 0.5, dtype=f32)
            xt = (1 - sigma) * x0 + sigma * noise
            hidden = torch.cat([xt, ctx], dim=1).to(dt)  # (B, 2N, C*4)
            pooled = torch.zeros(b, dp, dtype=f32)
            timestep = sigma.view(-1).to(dt)
        else:  # FluxKontextPipeline.__call__, one denoising step
            latents = torch.zeros(b, n, c, dtype=dt)
            hidden = torch.cat([latents, torch.zeros(b, n, c, dtype=dt)], dim=1)  # (B, 2N, C*4)
            pooled = torch.zeros(b, dp, dtype=dt)
            timestep = torch.full((b,), 0.5, dtype=dt) / 1000
        if moe is not None:
            if call.lora.routing == "learned":
                moe.route(pooled=pooled)
            else:
                moe.context.expert_ids = expert_ids  # LoraMoE.route without its host-side id check
        kwargs = dict(
            hidden_states=hidden,
            timestep=timestep,
            pooled_projections=pooled.to(dt),
            encoder_hidden_states=torch.zeros(b, L, dj, dtype=dt),
            txt_ids=torch.zeros(L, 3, dtype=dt),
            img_ids=torch.zeros(2 * n, 3, dtype=dt),
            guidance=torch.full((b,), call.guidance, dtype=f32),
            return_dict=False,
        )
        with cuda_autocast(call.autocast):
            out = model(**kwargs)[0]
            if call.autocast is not None:
                out = out.float()  # accelerate's convert_outputs_to_fp32 around the prepared model
            pred = out[:, :n]
            if call.train:
                weight = compute_loss_weighting_for_sd3("none", sigma).float()
                total = (weight * (pred.float() - (noise - x0)) ** 2).mean() + moe.balance_loss()
                if recorder is not None and call.loss is not None:
                    cfg = call.loss
                    # attention_losses() counts the usable masks on the host (int()): same tensors, without the count
                    a, m = pair_maps_masks(recorder.maps().view(b, h, w), torch.ones(b, h, w, dtype=f32))  # (B, 1, N)
                    focus = _focus(a, m, cfg.focus_distribution, cfg.tau).sum() / b
                    cover = _cover(a, m, cfg.cover_map, cfg.alpha).sum() / b
                    total = total + cfg.focus_weight * focus + cfg.cover_weight * cover
            else:
                latents = (latents.float() + 0.1 * pred.float()).to(dt)  # the scheduler's Euler step
        retained = tracker.live
        if call.train:
            total.backward()
            del total
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
    from regionroute.model_configs import vae_class, vae_scale_factor

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
