"""A mixture of LoRA experts around one frozen ``nn.Linear`` (docs/method.md §5).

:class:`MoELoraLinear` computes ``y = W x + sum_e g_e (alpha/r) B_e A_e x`` with E stacked experts
(``lora_A`` (E, r, in), ``lora_B`` (E, out, r)); the routing comes from a :class:`RoutingContext`
shared by all layers and set once per batch: hard (only the routed expert runs) or soft (one
rank-E*r LoRA scaled by the gates). B starts at zero, so at init the layer equals its base.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MoELoraLinear", "RoutingContext"]


@dataclass
class RoutingContext:
    """The current batch's routing, shared by all MoE layers of one model.

    Exactly one of ``expert_ids`` (B,) long and ``gates`` (B, E) float is set while a
    forward runs; a leading dimension of 1 broadcasts over the batch.
    """

    expert_ids: torch.Tensor | None = None  # (B,) int64
    gates: torch.Tensor | None = None  # (B, E), rows sum to 1

    def clear(self) -> None:
        self.expert_ids = None
        self.gates = None


class MoELoraLinear(nn.Module):
    """``nn.Linear`` + E routed LoRA experts; the base weight stays frozen."""

    def __init__(
        self,
        base_layer: nn.Linear,
        num_experts: int,
        rank: int,
        alpha: float,
        context: RoutingContext,
        *,
        dropout: float = 0.0,
        init: str = "gaussian",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"MoELoraLinear wraps nn.Linear, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.num_experts = num_experts
        self.rank = rank
        self.scaling = alpha / rank
        self.context = context
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        device = base_layer.weight.device
        in_f, out_f = base_layer.in_features, base_layer.out_features
        self.lora_A = nn.Parameter(torch.empty(num_experts, rank, in_f, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(num_experts, out_f, rank, device=device, dtype=dtype))
        self.merged_expert: int | None = None
        self._unmerged_weight: torch.Tensor | None = None
        self._backup: torch.Tensor | None = None  # CPU buffer holding the unmerged weight while merged
        self.reset_parameters(init)

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def weight(self) -> torch.Tensor:
        """The base weight (code that reads ``module.weight.dtype`` keeps working)."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @torch.no_grad()
    def reset_parameters(self, init: str = "gaussian") -> None:
        """peft's initializations, per expert; B = 0 so the layer starts at the base."""
        for e in range(self.num_experts):
            if init == "gaussian":
                nn.init.normal_(self.lora_A[e], std=1.0 / self.rank)
            elif init == "kaiming":
                nn.init.kaiming_uniform_(self.lora_A[e], a=math.sqrt(5))
            else:
                raise ValueError(f"unknown init {init!r}")
        self.lora_B.zero_()

    def delta_weight(self, expert: int) -> torch.Tensor:
        """``(alpha / r) * B_e @ A_e``, (out, in), in the expert dtype."""
        return (self.lora_B[expert] @ self.lora_A[expert]) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, ..., in)
        result = self.base_layer(x)  # (B, ..., out)
        if self.merged_expert is not None:
            return result  # the merged expert is already in the base weight
        ctx = self.context
        batch = x.shape[0]
        h = self.lora_dropout(x.to(self.lora_A.dtype)).reshape(batch, -1, self.in_features)  # (B, T, in)
        if ctx.expert_ids is not None:
            delta = self._routed(h, ctx.expert_ids)
        elif ctx.gates is not None:
            delta = self._mixed(h, ctx.gates)
        else:
            raise RuntimeError("MoE LoRA layer called without routing: call LoraMoE.route(...) before the forward")
        return result + delta.reshape(result.shape).to(result.dtype)

    def _check_batch(self, n: int, batch: int, what: str) -> None:
        if n not in (1, batch):
            raise ValueError(f"routing {what} has batch {n}, the input has batch {batch}")

    def _routed(self, h: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Hard routing: sample b uses expert ids[b] only. h: (B, T, in) -> (B, T, out)."""
        self._check_batch(ids.shape[0], h.shape[0], "expert_ids")
        a = self.lora_A[ids]  # (B|1, r, in): gathered, one expert per sample
        b = self.lora_B[ids]  # (B|1, out, r)
        z = torch.matmul(h, a.transpose(1, 2)) * self.scaling  # (B, T, r)
        return torch.matmul(z, b.transpose(1, 2))  # (B, T, out)

    def _mixed(self, h: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """Soft routing: all experts as one rank-E*r LoRA. h: (B, T, in), gates: (B, E)."""
        self._check_batch(gates.shape[0], h.shape[0], "gates")
        e, r = self.num_experts, self.rank
        z = F.linear(h, self.lora_A.reshape(e * r, self.in_features))  # (B, T, E*r)
        g = gates.to(z.dtype).repeat_interleave(r, dim=1) * self.scaling  # (B, E*r)
        z = z * g[:, None, :]
        b = self.lora_B.permute(1, 0, 2).reshape(self.out_features, e * r)  # (out, E*r)
        return F.linear(z, b)  # (B, T, out)

    @torch.no_grad()
    def merge(self, expert: int, exact: bool = True) -> None:
        """Fold one expert into the base weight; the routed branch is skipped until unmerge.

        ``exact`` keeps a copy of the original weight so :meth:`unmerge` restores it
        bit for bit (subtracting the delta again would round, notably in bf16); the copy
        lives in CPU memory, so merging adds nothing to an accelerator's memory.
        """
        if self.merged_expert is not None:
            raise RuntimeError(f"expert {self.merged_expert} is already merged; unmerge first")
        w = self.base_layer.weight
        if exact:  # the buffer is reused across merges: no fresh allocation (page faults) per merge
            if self._backup is None or self._backup.shape != w.shape or self._backup.dtype != w.dtype:
                self._backup = torch.empty(w.shape, dtype=w.dtype, device="cpu")
            self._backup.copy_(w)
            self._unmerged_weight = self._backup
        a, b = self.lora_A[expert], self.lora_B[expert]  # (r, in), (out, r)
        if w.dtype == a.dtype and w.device == a.device:
            w.addmm_(b, a, alpha=self.scaling)  # in place, no (out, in) temporaries
        else:  # e.g. bf16 base, fp32 experts: add in fp32, round once
            w.copy_(torch.addmm(w.float(), b.float(), a.float(), alpha=self.scaling).to(w.dtype))
        self.merged_expert = expert

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge` (no-op when nothing is merged)."""
        if self.merged_expert is None:
            return
        w = self.base_layer.weight
        if self._unmerged_weight is not None:
            w.copy_(self._unmerged_weight.to(w.device))
        else:
            w.copy_((w.float() - self.delta_weight(self.merged_expert).float()).to(w.dtype))
        self._unmerged_weight = None
        self.merged_expert = None

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, rank={self.rank}, scaling={self.scaling:g}, merged={self.merged_expert}"
