"""Put LoRA experts into a FLUX transformer and route them (docs/method.md §5).

:func:`inject_lora_moe` wraps the configured targets of the double- and single-stream blocks
(matched with peft's ``check_target_module_exists``, peft's names and init) in
:class:`~regionroute.lora_moe.layer.MoELoraLinear` and returns a :class:`LoraMoE` handle: route a
batch, merge one expert into the weights and unmerge it exactly, list the trainable parameters.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import torch
from torch import nn

from regionroute.config import LoraConfig
from regionroute.errors import UserError
from regionroute.lora_moe.layer import MoELoraLinear, RoutingContext
from regionroute.lora_moe.router import LearnedRouter, balance_loss, one_hot_gates, validate_expert_ids
from regionroute.models import DTYPES

__all__ = ["STREAMS", "LoraMoE", "find_targets", "inject_lora_moe"]

#: stream name -> (attribute of the transformer holding its blocks, config switch, config targets)
STREAMS: dict[str, tuple[str, str, str]] = {
    "double": ("transformer_blocks", "double_stream", "double_targets"),
    "single": ("single_transformer_blocks", "single_stream", "single_targets"),
}
_EXPERT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")  # a file name and a peft adapter name


def _target_matcher(target: str) -> Callable[[str], bool]:
    """peft's rule for one target: a module name is ``target`` or ends with ``.target``."""
    from peft import LoraConfig as PeftLoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    peft_config = PeftLoraConfig(target_modules=[target])
    return lambda name: bool(check_target_module_exists(peft_config, name))


def find_targets(transformer: nn.Module, config: LoraConfig) -> dict[str, str]:
    """Full names of the ``nn.Linear`` modules to wrap -> their stream (``double``/``single``).

    A Linear is selected when it, or a container above it inside its block (``ff``),
    matches a target. A target that matches nothing in an enabled stream is an error.
    """
    found: dict[str, str] = {}
    for stream, (attr, switch, targets_key) in STREAMS.items():
        if not getattr(config, switch):
            continue
        blocks = getattr(transformer, attr, None)
        if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
            raise UserError(f"lora.{switch}: the transformer has no '{attr}' blocks to put experts in")
        for target in getattr(config, targets_key):
            matches = _target_matcher(target)
            hits = []
            for name, module in blocks.named_modules(prefix=attr):
                if not isinstance(module, nn.Linear):
                    continue
                parts = name.split(".")
                # the Linear itself, then its ancestors down to "<attr>.<i>.<child>"
                if any(matches(".".join(parts[:k])) for k in range(len(parts), 2, -1)):
                    hits.append(name)
            if not hits:
                raise UserError(f"lora.{targets_key}: target {target!r} matches no nn.Linear in {attr}.*")
            found.update(dict.fromkeys(hits, stream))
    return dict(sorted(found.items(), key=lambda kv: _natural_key(kv[0])))


def _natural_key(name: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in name.split("."))


class LoraMoE:
    """Handle on the experts injected into one transformer (created by :func:`inject_lora_moe`)."""

    def __init__(
        self,
        transformer: nn.Module,
        config: LoraConfig,
        experts: Sequence[str],
        layers: dict[str, MoELoraLinear],
        streams: dict[str, str],
        context: RoutingContext,
        router: LearnedRouter | None,
        frozen_flags: list[tuple[nn.Parameter, bool]],
    ) -> None:
        self.transformer = transformer
        self.config = config
        self.experts: tuple[str, ...] = tuple(experts)
        self.layers = layers  # full module name -> layer, in model order
        self.streams = streams  # full module name -> "double" | "single"
        self.context = context
        self.router = router
        self._frozen_flags = frozen_flags
        self._gates: torch.Tensor | None = None  # (B, E) learned gates of the last route()
        self._removed = False

    # -- routing -----------------------------------------------------------------------
    @property
    def num_experts(self) -> int:
        return len(self.experts)

    @property
    def device(self) -> torch.device:
        return next(iter(self.layers.values())).lora_A.device

    def expert_index(self, expert: str | int) -> int:
        """Index of an expert given by name (``"pixel-art"``) or index."""
        if isinstance(expert, int) and not isinstance(expert, bool):
            if not 0 <= expert < self.num_experts:
                raise UserError(f"expert index {expert} out of range [0, {self.num_experts})")
            return expert
        if expert not in self.experts:
            raise UserError(f"unknown expert {expert!r} (experts: {', '.join(self.experts)})")
        return self.experts.index(expert)

    def style_ids(self, styles: Sequence[str]) -> torch.Tensor:
        """Style names -> (B,) int64 expert ids on the experts' device."""
        return torch.tensor([self.expert_index(s) for s in styles], dtype=torch.long, device=self.device)

    def route(self, style_ids: torch.Tensor | None = None, pooled: torch.Tensor | None = None) -> None:
        """Set the routing of the next forward(s).

        ``style`` routing: ``style_ids`` (B,) picks one expert per sample. ``learned``
        routing: the gate computes (B, E) weights from ``pooled`` (B, D), the pooled
        text embedding the transformer also gets; call this inside the training step so
        the gate is in the autograd graph. With ``learned`` routing and no ``pooled``,
        ``style_ids`` forces hard routing (e.g. to run one exported expert). A batch of
        1 broadcasts over the transformer's batch.
        """
        self._check_active()
        self.context.clear()
        self._gates = None
        if self.config.routing == "learned" and pooled is not None:
            assert self.router is not None
            self._gates = self.router(pooled.to(self.router.gate.weight.device))  # (B, E)
            self.context.gates = self._gates
        elif style_ids is not None:
            self.context.expert_ids = validate_expert_ids(style_ids.to(self.device), self.num_experts)
        elif self.config.routing == "style":
            raise UserError("style routing needs style_ids (B,)")
        else:
            raise UserError("learned routing needs pooled (B, D) (or style_ids to force experts)")

    def balance_loss(self, batch_mean: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """MoLE balance loss of the last learned routing (unweighted; 0 for hard routing).

        The trainer adds ``config.balance_weight * moe.balance_loss()`` to its loss;
        ``batch_mean``: see :func:`~regionroute.lora_moe.router.balance_loss` (data parallelism).
        """
        if self._gates is None:
            return torch.zeros((), device=self.device)
        return balance_loss(self._gates, batch_mean=batch_mean)

    def gate_weights(self) -> torch.Tensor | None:
        """The last routing as (B, E) weights (one-hot for hard routing), detached; None before any."""
        if self._gates is not None:
            return self._gates.detach()
        if self.context.expert_ids is not None:
            return one_hot_gates(self.context.expert_ids, self.num_experts)
        return None

    # -- training ------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        """Expert weights (and the gate): the only parameters with ``requires_grad``."""
        params = [p for layer in self.layers.values() for p in (layer.lora_A, layer.lora_B)]
        if self.router is not None:
            params += list(self.router.parameters())
        return params

    def state_dict(self) -> dict[str, torch.Tensor]:
        """``experts.<module>.lora_A`` (E, r, in), ``...lora_B`` (E, out, r), ``router.gate.*``."""
        sd = {}
        for name, layer in self.layers.items():
            sd[f"experts.{name}.lora_A"] = layer.lora_A.detach()
            sd[f"experts.{name}.lora_B"] = layer.lora_B.detach()
        if self.router is not None:
            sd.update({f"router.{k}": v.detach() for k, v in self.router.state_dict().items()})
        return sd

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Strict inverse of :meth:`state_dict`: same keys, same shapes."""
        own = self.state_dict()
        missing, unexpected = sorted(set(own) - set(state_dict)), sorted(set(state_dict) - set(own))
        if missing or unexpected:
            raise UserError(f"MoE state mismatch: missing {missing[:3]}, unexpected {unexpected[:3]}")
        for key, value in own.items():
            if value.shape != state_dict[key].shape:
                raise UserError(f"MoE state {key}: shape {tuple(state_dict[key].shape)}, expected {tuple(value.shape)}")
            value.copy_(state_dict[key])

    # -- inference -----------------------------------------------------------------------
    @property
    def merged(self) -> str | None:
        """Name of the expert merged into the base weights, if any."""
        idx = next(iter(self.layers.values())).merged_expert
        return None if idx is None else self.experts[idx]

    def merge(self, expert: str | int, exact: bool = True) -> None:
        """Fold one expert into the base weights of every wrapped layer (single-style inference).

        The routed branch is skipped while merged, so routing is ignored. ``exact`` keeps
        a copy of the original weights (extra memory) so :meth:`unmerge` is bit-exact.
        """
        self._check_active()
        idx = self.expert_index(expert)
        if self.merged is not None:
            raise UserError(f"expert {self.merged!r} is already merged; unmerge() first")
        for layer in self.layers.values():
            layer.merge(idx, exact=exact)

    def unmerge(self) -> None:
        """Restore the base weights (no-op when nothing is merged)."""
        for layer in self.layers.values():
            layer.unmerge()

    def remove(self) -> None:
        """Unmerge, put the original ``nn.Linear`` modules back and restore ``requires_grad``."""
        if self._removed:
            return
        self.unmerge()
        for name, layer in self.layers.items():
            parent_name, _, child = name.rpartition(".")
            setattr(self.transformer.get_submodule(parent_name), child, layer.base_layer)
        for param, flag in self._frozen_flags:
            param.requires_grad_(flag)
        self.context.clear()
        self._gates = None
        self._removed = True

    def _check_active(self) -> None:
        if self._removed:
            raise RuntimeError("this LoraMoE was removed from its transformer")


def inject_lora_moe(transformer: nn.Module, config: LoraConfig, experts: Sequence[str]) -> LoraMoE:
    """Wrap the configured targets in MoE LoRA layers (one expert per name in ``experts``).

    Freezes every other parameter of ``transformer``. The learned router (``routing:
    learned``) reads the pooled text embedding, of size ``transformer.config.pooled_projection_dim``.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    experts = list(experts)
    if not experts:
        raise UserError("LoRA-MoE needs at least one expert (style)")
    for name in experts:
        if not isinstance(name, str) or not _EXPERT_NAME.match(name):
            raise UserError(f"expert name {name!r} must be letters, digits, '-' or '_' (it names a file)")
    if len(set(experts)) != len(experts):
        raise UserError(f"duplicate expert name in {experts}")
    for module in transformer.modules():
        if isinstance(module, MoELoraLinear | BaseTunerLayer):
            raise UserError("the transformer already carries LoRA layers: remove/unload them before injecting experts")

    streams = find_targets(transformer, config)
    frozen_flags = [(p, p.requires_grad) for p in transformer.parameters()]
    transformer.requires_grad_(False)
    context = RoutingContext()
    layers: dict[str, MoELoraLinear] = {}
    for name in streams:
        base = transformer.get_submodule(name)
        layer = MoELoraLinear(
            base,
            num_experts=len(experts),
            rank=config.rank,
            alpha=config.alpha,
            context=context,
            dropout=config.dropout,
            init=config.init,
            dtype=DTYPES[config.dtype],
        )
        parent_name, _, child = name.rpartition(".")
        setattr(transformer.get_submodule(parent_name), child, layer)
        layers[name] = layer

    router = None
    if config.routing == "learned":
        pooled_dim = int(transformer.config.pooled_projection_dim)
        device = next(iter(layers.values())).lora_A.device
        router = LearnedRouter(pooled_dim, len(experts), config.router_temperature, device=device)
    return LoraMoE(transformer, config, experts, layers, streams, context, router, frozen_flags)
