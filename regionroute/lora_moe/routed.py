"""The transformer and its learned gate as one ``nn.Module``, so DDP synchronises both (docs/method.md §5).

``train`` hands :class:`RoutedTransformer` to ``accelerator.prepare``: DDP all-reduces only the
parameters of the module it wraps, so the gate is a submodule and routing happens in ``forward``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from regionroute.lora_moe.inject import LoraMoE

__all__ = ["RoutedTransformer"]


class RoutedTransformer(nn.Module):
    """``forward(style_ids, pooled, **transformer_kwargs)`` = route the experts, then run the transformer."""

    def __init__(self, moe: LoraMoE) -> None:
        super().__init__()
        self.transformer = moe.transformer
        self.router = moe.router  # None with style routing (no parameters to synchronise)
        self.moe = moe  # not a Module: a plain attribute, its parameters are the ones above

    def forward(self, style_ids: torch.Tensor, pooled: torch.Tensor, **kwargs: Any) -> Any:
        """``style_ids`` (B,) / ``pooled`` (B, D) route as :meth:`LoraMoE.route` does; kwargs go to the transformer."""
        self.moe.route(style_ids=style_ids, pooled=pooled)
        return self.transformer(**kwargs)
