"""The activation-memory tracer: real code run on fake tensors (docs/method.md §2, "Memory").

A model is built in ``FakeTensorMode`` (:func:`fake_mode`: shapes, dtypes, a CPU device, no data;
no weights, accelerator or memory needed) and code runs on it while :class:`LiveBytes` counts the
bytes of every live storage, under CUDA's autocast policy (:func:`cuda_autocast` +
:func:`cuda_float32_policy`). :func:`trace_forward` traces one inference forward; the stages'
calls are traced by :mod:`regionroute.check.traces`.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map_only

__all__ = [
    "LiveBytes",
    "Trace",
    "build_fake",
    "cuda_autocast",
    "cuda_float32_policy",
    "fake_mode",
    "real_mode",
    "trace_forward",
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
    """Counts the bytes of the storages aten ops allocate, from their creation until their last reference dies.

    Outputs of ops whose schema says they alias an input (views, in-place ops) are not new memory;
    storages created before the trace (weights, buffers) are not counted (they are the weights).
    Not counted either: the CUDA context, cuBLAS/cuDNN workspaces and allocator rounding (the
    accounting's reserve).
    """

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
    """Under CPU autocast, run CUDA autocast's float32-list ops in float32 (as CUDA would).

    CPU autocast's lower-precision list (linear, matmul, conv, attention) matches CUDA's; its
    float32 list does not: ``layer_norm``, ``softmax``, ``sum``, ``pow``... stay bf16 on the CPU,
    while CUDA upcasts them and saves their float32 outputs for the backward.
    """

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

    Torch's RMSNorm notice under autocast is dropped, as in training (``quiet_rms_norm_notice``).
    """
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
    """A ``FakeTensorMode`` in which real CPU tensors (masks, indices) may be mixed with fake ones.

    Fake, not ``meta``: on ``meta`` PyTorch picks the math attention (the T x T matrix) and runs the
    backward on a worker thread; fake CPU tensors take the fused CPU flash kernel, which saves what
    the CUDA flash/cuDNN kernels save (q, k, v, out, log-sum-exp), and keep the backward here.
    """
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
