"""Dual-stream LoRA-MoE: one LoRA expert per style on FLUX.1-Kontext (docs/method.md §5).

Structured like a small peft tuner (its ``LoraConfig`` lives in :mod:`regionroute.config`): ``layer``
(the routed MoE LoRA around one ``nn.Linear``), ``router`` (style or learned gate), ``inject`` (wrap
the targets, return a :class:`LoraMoE` handle), ``routed`` (transformer + gate, for DDP), ``export``
(diffusers LoRA files per expert, the whole MoE, the model's ``regionroute.json``).
"""

from regionroute.config import DOUBLE_STREAM_TARGETS, SINGLE_STREAM_TARGETS, LoraConfig
from regionroute.lora_moe.export import expert_lora_state_dict, export_experts, load_moe, save_moe
from regionroute.lora_moe.inject import LoraMoE, find_targets, inject_lora_moe
from regionroute.lora_moe.layer import MoELoraLinear, RoutingContext
from regionroute.lora_moe.routed import RoutedTransformer
from regionroute.lora_moe.router import LearnedRouter, balance_loss

__all__ = [
    "DOUBLE_STREAM_TARGETS",
    "SINGLE_STREAM_TARGETS",
    "LearnedRouter",
    "LoraConfig",
    "LoraMoE",
    "MoELoraLinear",
    "RoutedTransformer",
    "RoutingContext",
    "balance_loss",
    "expert_lora_state_dict",
    "export_experts",
    "find_targets",
    "inject_lora_moe",
    "load_moe",
    "save_moe",
]
