"""Routers: which expert, or which mixture, serves each sample (docs/method.md §5).

``style``: hard routing by the sample's style id (the public code's ``set_adapters([style])``).
``learned``: MoLE's linear gate on the pooled text embedding, ``softmax(logits / T)``, starting at
zero (uniform routing), with the balance loss :func:`balance_loss` ``-sum_i log q_i``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from regionroute.errors import UserError

__all__ = ["LearnedRouter", "balance_loss", "one_hot_gates", "validate_expert_ids"]


def validate_expert_ids(expert_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Check a (B,) integer tensor of expert ids; returns it as int64."""
    if expert_ids.ndim != 1 or expert_ids.dtype.is_floating_point or expert_ids.dtype == torch.bool:
        shape = tuple(expert_ids.shape)
        raise UserError(f"style_ids must be a 1-D integer tensor (B,), got shape {shape} {expert_ids.dtype}")
    # One host sync per batch (not per layer): an out-of-range id would otherwise index garbage on GPU.
    if expert_ids.numel() and (int(expert_ids.min()) < 0 or int(expert_ids.max()) >= num_experts):
        raise UserError(f"style_ids must lie in [0, {num_experts}), got {expert_ids.tolist()}")
    return expert_ids.long()


def one_hot_gates(expert_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(B,) ids -> (B, E) one-hot float gates (for logging; the layers use the ids)."""
    return F.one_hot(expert_ids.long(), num_experts).float()


def balance_loss(
    gates: torch.Tensor, eps: float = 1e-8, batch_mean: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> torch.Tensor:
    """MoLE balance loss ``-sum_i log q_i``; gates (B, E) -> scalar, minimal (E log E) at uniform use.

    ``batch_mean`` maps this batch's (E,) mean gate to the one the loss is taken on: under
    data parallelism, the mean over every process's batch (the global batch's ``q``).
    """
    q = gates.float().mean(dim=0)  # (E,) mean gate weight of each expert over the batch
    if batch_mean is not None:
        q = batch_mean(q)
    return -torch.log(q.clamp_min(eps)).sum()


class LearnedRouter(nn.Module):
    """MoLE gate: pooled text embedding (B, D) -> expert weights (B, E), rows sum to 1."""

    def __init__(
        self,
        in_features: int,
        num_experts: int,
        temperature: float = 1.0,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature
        self.gate = nn.Linear(in_features, num_experts, device=device, dtype=dtype)
        nn.init.zeros_(self.gate.weight)
        nn.init.zeros_(self.gate.bias)

    @property
    def num_experts(self) -> int:
        return self.gate.out_features

    def logits(self, pooled: torch.Tensor) -> torch.Tensor:
        """(B, D) -> (B, E) gate logits."""
        if pooled.ndim != 2 or pooled.shape[1] != self.gate.in_features:
            raise UserError(
                f"pooled must be (B, {self.gate.in_features}) (the pooled text embedding), got {tuple(pooled.shape)}"
            )
        return self.gate(pooled.to(self.gate.weight.dtype))

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """(B, D) -> (B, E) = softmax(logits / temperature)."""
        return torch.softmax(self.logits(pooled).float() / self.temperature, dim=-1)
