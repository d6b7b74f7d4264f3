"""The math of the style-token attention maps: row-wise, exact, float32 (docs/method.md §3).

Per layer, from post-RoPE ``q, k`` (B, T, H, d): the style rows' softmax over all keys
(``_TextToImageMap``), ``exp(q_i . k_s - LSE_i)`` without a T x T matrix (``_ImageToTextMap``),
both with analytic backwards; the public code's form and a naive full softmax for reference.
Used by :mod:`regionroute.flux.attention`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import torch

Direction = Literal["text_to_image", "image_to_text"]


def _keep(t: torch.Tensor) -> torch.Tensor:
    return t


def _heads(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2).float().contiguous()  # (B, T, H, d) -> (B, H, T, d) float32


def _chunks(n: int, chunk: int) -> Iterator[slice]:
    return (slice(c, min(c + chunk, n)) for c in range(0, n, chunk))


def _key_chunks(k: torch.Tensor, chunk: int = 256) -> Iterator[tuple[slice, torch.Tensor]]:
    """Float32 (B, H, c, d) copies of ``chunk`` keys at a time: never a full float32 copy of ``k``."""
    for c in _chunks(k.shape[1], chunk):
        yield c, k[:, c].transpose(1, 2).to(torch.float32, memory_format=torch.contiguous_format)


class _TextToImageMap(torch.autograd.Function):
    """``a[b, w, n] = 1/H sum_{h,k} w[b, w, k] softmax_j(q_k . k_j * scale)[t0 + n]`` for style rows ``k``.

    Keys are read in chunks, so the only transient of key size is the key gradient itself.
    """

    @staticmethod
    def forward(ctx, q_rows, k, weights, t0: int, n: int, scale: float):  # q_rows (B, K, H, d), k (B, T, H, d)
        qf = _heads(q_rows) * scale  # (B, H, K, d)
        p = torch.softmax(torch.cat([qf @ kc.mT for _, kc in _key_chunks(k)], -1), dim=-1)  # (B, H, K, T)
        a = torch.einsum("bwk,bhkn->bwn", weights, p[..., t0 : t0 + n]) / k.shape[2]  # (B, W, N)
        ctx.save_for_backward(q_rows, k, weights, p)
        ctx.meta = (t0, n, scale)
        return a

    @staticmethod
    def backward(ctx, grad):  # grad (B, W, N)
        with _no_autocast(grad.device):
            return _TextToImageMap._backward(ctx, grad)

    @staticmethod
    def _backward(ctx, grad):
        q_rows, k, weights, p = ctx.saved_tensors
        t0, n, scale = ctx.meta
        dp_t = torch.einsum("bwn,bwk->bkn", grad.float(), weights)[:, None] / k.shape[2]  # (B, 1, K, N)
        p_t = p[..., t0 : t0 + n]  # (B, H, K, N)
        dlogits = -p * (p_t * dp_t).sum(-1, keepdim=True)  # softmax backward, (B, H, K, T)
        dlogits[..., t0 : t0 + n] += p_t * dp_t
        dlogits *= scale
        qf = _heads(q_rows)  # (B, H, K, d)
        dq = torch.zeros_like(qf)
        dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)  # (B, T, H, d)
        for c, kc in _key_chunks(k):
            dq += dlogits[..., c] @ kc
            dk[:, c] = (dlogits[..., c].mT @ qf).transpose(1, 2)
        return dq.transpose(1, 2).to(q_rows.dtype), dk, None, None, None, None


_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _lse(qs: torch.Tensor, kf: torch.Tensor, chunk: int) -> torch.Tensor:
    """``logsumexp_j qs_i . k_j`` (B, H, N) for pre-scaled queries, without an N x T matrix in memory.

    CPU: the flash kernel's own LSE output (one fused pass, ~3x faster than chunked logsumexp here).
    Elsewhere: query chunks of ``chunk`` rows. Called under no_grad; the gradient is analytic.
    """
    if qs.device.type == "cpu" and _CPU_FLASH is not None:
        return _CPU_FLASH(qs, kf, kf, scale=1.0)[1]
    return torch.cat([torch.logsumexp(qs[:, :, c] @ kf.mT, dim=-1) for c in _chunks(qs.shape[2], chunk)], -1)


class _ImageToTextMap(torch.autograd.Function):
    """``a[b, w, n] = 1/H sum_{h,k} w[b, w, k] exp(q_n . k_k * scale - LSE_n)``, LSE over all keys."""

    @staticmethod
    def forward(ctx, q, k, rows, weights, t0: int, n: int, scale: float, chunk: int):  # q, k (B, T, H, d)
        kf, qs = _heads(k), _heads(q[:, t0 : t0 + n]) * scale  # (B, H, T, d), (B, H, N, d)
        lse = _lse(qs, kf, chunk)  # (B, H, N)
        att = (qs @ kf.index_select(2, rows).mT).sub_(lse[..., None]).exp_()  # (B, H, N, K)
        a = torch.einsum("bwk,bhnk->bwn", weights, att) / q.shape[2]  # (B, W, N)
        ctx.save_for_backward(q, k, rows, weights, lse, att)
        ctx.meta = (t0, n, scale, chunk)
        return a

    @staticmethod
    def backward(ctx, grad):  # grad (B, W, N)
        with _no_autocast(grad.device):
            return _ImageToTextMap._backward(ctx, grad)

    @staticmethod
    def _backward(ctx, grad):
        q, k, rows, weights, lse, att = ctx.saved_tensors
        t0, n, scale, chunk = ctx.meta
        kf, qs = _heads(k), _heads(q[:, t0 : t0 + n]) * scale  # (B, H, T, d), (B, H, N, d)
        dz = att * torch.einsum("bwn,bwk->bnk", grad.float(), weights)[:, None] / q.shape[2]  # dL/dz, (B, H, N, K)
        glse = -dz.sum(-1, keepdim=True)  # dL/dLSE, (B, H, N, 1)
        dqs = dz @ kf.index_select(2, rows)  # dL/d(scaled q), (B, H, N, d)
        dkf = torch.zeros_like(kf).index_add_(2, rows, dz.mT @ qs)  # (B, H, T, d)
        for c in _chunks(n, chunk):  # LSE term, one (B, H, c, T) block of P at a time
            pg = (qs[:, :, c] @ kf.mT).sub_(lse[:, :, c, None]).exp_().mul_(glse[:, :, c])
            dqs[:, :, c] += pg @ kf  # dLSE_i/dqs_i = (P K)_i
            dkf += pg.mT @ qs[:, :, c]  # dLSE_i/dk_j = P_ij qs_i
            del pg  # one (B, H, c, T) block alive at a time
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)  # (B, T, H, d)
        dq[:, t0 : t0 + n] = (dqs * scale).transpose(1, 2)
        return dq.to(q.dtype), dkf.transpose(1, 2).to(k.dtype), None, None, None, None, None, None


def _style_token_map(q, k, rows, weights, t0: int, n: int, scale: float) -> torch.Tensor:
    """Public code's ``image_to_text``: softmax over each sample's selected style tokens only."""
    z = _heads(q[:, t0 : t0 + n]) @ _heads(k[:, rows]).mT * scale  # (B, H, N, K)
    own = (weights > 0).any(1)  # (B, K): the sample's own style tokens
    att = torch.softmax(z.masked_fill(~own[:, None, None, :], float("-inf")), dim=-1)
    return torch.einsum("bwk,bhnk->bwn", weights, att) / q.shape[2]


def _naive_map(q, k, rows, weights, t0: int, n: int, scale: float, direction: Direction) -> torch.Tensor:
    """Full ``T x T`` softmax per layer (reference and benchmark contrast; never for training at scale)."""
    p = torch.softmax(_heads(q) @ _heads(k).mT * scale, dim=-1)  # (B, H, T, T)
    if direction == "text_to_image":
        return torch.einsum("bwk,bhkn->bwn", weights, p[:, :, rows, t0 : t0 + n]) / q.shape[2]
    return torch.einsum("bwk,bhnk->bwn", weights, p[:, :, t0 : t0 + n][..., rows]) / q.shape[2]


def _mask_rows(style_mask: torch.Tensor, n_text: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(B, L) or (B, W, L) bool mask -> rows (K,) style in any sample, weights (B, W, K) float32, squeeze."""
    mask = style_mask.bool()
    squeeze = mask.dim() == 2
    mask = mask[:, None] if squeeze else mask  # (B, W, L)
    if mask.dim() != 3 or mask.shape[-1] != n_text:
        raise ValueError(f"style_mask must be (B, {n_text}) or (B, W, {n_text}), got {tuple(style_mask.shape)}")
    if not bool(mask.any(-1).all()):
        raise ValueError("every style_mask row must select at least one text position")
    rows = mask.any(0).any(0).nonzero().squeeze(1)  # (K,)
    return rows, mask[..., rows].float(), squeeze


def _no_autocast(device: torch.device) -> torch.autocast:
    """Autocast off on ``device``: the maps and their gradients stay float32 under bf16/fp16 training."""
    return torch.autocast(device_type=device.type, enabled=False)


def _layer_map(query, key, rows, weights, n_text, n_target, direction, normalize, implementation, chunk_rows):
    args = (n_text, n_target, query.shape[-1] ** -0.5)
    rows, weights = rows.to(query.device), weights.to(query.device)
    # The map's saved tensors bypass any checkpoint hooks (see module docstring); autocast is off
    # so every matmul of the map runs in float32 (under bf16 autocast, logits minus LSE would cancel).
    with torch.autograd.graph.saved_tensors_hooks(_keep, _keep), _no_autocast(query.device):
        if implementation == "naive":
            return _naive_map(query, key, rows, weights, *args, direction)
        if direction == "text_to_image":
            return _TextToImageMap.apply(query[:, rows], key, weights, *args)
        if normalize == "style_tokens":
            return _style_token_map(query, key, rows, weights, *args)
        return _ImageToTextMap.apply(query, key, rows, weights, *args, chunk_rows)
