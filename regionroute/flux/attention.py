"""Style-token attention capture: a diffusers attention processor that records exact maps (docs/method.md §3).

:class:`StyleAttentionRecorder` is installed with ``set_attn_processor``; its outputs equal
``FluxAttnProcessor``'s, and inside ``capture(...)`` it records, per supervised layer, the style
word's attention over the target tokens in float32 (``text_to_image`` or exact ``image_to_text``).
Used by ``train`` (the losses), ``infer`` and ``edit`` (saved maps); the math is in
:mod:`regionroute.flux.attention_maps`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal, get_args

import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import (
    FluxAttnProcessor,
    _get_qkv_projections,
    dispatch_attention_fn,
)

from regionroute.errors import ConfigError
from regionroute.flux.attention_maps import _layer_map, _mask_rows

__all__ = ["Direction", "Normalize", "StyleAttentionRecorder", "StyleAttnProcessor"]

Direction = Literal["text_to_image", "image_to_text"]
Normalize = Literal["all", "style_tokens"]
Implementation = Literal["rowwise", "naive"]
LayerSpec = Literal["all", "double", "single"] | Sequence[int | str]

_DOUBLE, _SINGLE = "transformer_blocks.", "single_transformer_blocks."


@dataclass
class _Capture:
    weights: torch.Tensor  # (B, W, K) float32 mask of each word over the style rows
    rows: torch.Tensor  # (K,) text positions that are style tokens in any sample
    n_text: int
    n_target: int
    squeeze: bool  # the mask was (B, L): drop the word dim
    layers: list[str]  # supervised layers, model order
    records: list[dict[str, torch.Tensor]] = field(default_factory=list)  # per forward: layer -> (B, W, N)
    n_events: int = 0  # maps stored (a checkpoint recomputation must not add any)
    in_forward: bool = False


class StyleAttnProcessor:
    """``FluxAttnProcessor`` with identical outputs that reports post-RoPE ``q, k`` to its recorder."""

    _attention_backend = None
    _parallel_config = None

    def __init__(self, recorder: StyleAttentionRecorder, name: str) -> None:
        self.recorder, self.name = recorder, name

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        # Same ops as diffusers 0.42 FluxAttnProcessor.__call__, plus one read-only call to the recorder.
        query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states
        )
        query = query.unflatten(-1, (-1, attn.head_dim))
        key = key.unflatten(-1, (-1, attn.head_dim))
        value = value.unflatten(-1, (-1, attn.head_dim))
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        if attn.added_kv_proj_dim is not None:
            encoder_query = attn.norm_added_q(encoder_query.unflatten(-1, (-1, attn.head_dim)))
            encoder_key = attn.norm_added_k(encoder_key.unflatten(-1, (-1, attn.head_dim)))
            encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))
            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        text_len = None if encoder_hidden_states is None else encoder_hidden_states.shape[1]
        self.recorder._observe(self.name, query, key, attention_mask, text_len)  # (B, T, H, d)

        hidden_states = dispatch_attention_fn(
            query, key, value, attn_mask=attention_mask, backend=self._attention_backend,
            parallel_config=self._parallel_config,
        )  # fmt: skip
        hidden_states = hidden_states.flatten(2, 3)
        hidden_states = hidden_states.to(query.dtype)
        if encoder_hidden_states is not None:
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1
            )
            hidden_states = attn.to_out[0](hidden_states.contiguous())
            hidden_states = attn.to_out[1](hidden_states)
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
            return hidden_states, encoder_hidden_states
        return hidden_states


def _select_layers(names: list[str], layers: LayerSpec) -> list[str]:
    if layers == "all":
        return list(names)
    if layers in ("double", "single"):
        prefix = _DOUBLE if layers == "double" else _SINGLE
        return [n for n in names if n.startswith(prefix)]
    if isinstance(layers, str) or not isinstance(layers, Sequence) or not layers:
        raise ConfigError(f"attention layers must be 'all', 'double', 'single' or a non-empty list, got {layers!r}")
    chosen: set[str] = set()
    for item in layers:
        if isinstance(item, int) and not isinstance(item, bool):
            if not 0 <= item < len(names):
                raise ConfigError(f"attention layer index {item} out of range: the model has {len(names)} layers")
            chosen.add(names[item])
            continue
        hits = [n for n in names if isinstance(item, str) and (n == item or n.startswith(item.rstrip(".") + "."))]
        if not hits:
            raise ConfigError(f"attention layer {item!r} matches none of the model's layers (e.g. {names[0]!r})")
        chosen.update(hits)
    return [n for n in names if n in chosen]  # model order


class StyleAttentionRecorder:
    """Records style-token attention maps over the target-image token grid (see module docstring).

    Args:
        direction: ``"text_to_image"`` (default) or ``"image_to_text"``.
        normalize: ``"all"`` (softmax over all keys, default) or ``"style_tokens"`` (image_to_text only).
        layers: ``"all"`` (default: every double and single block), ``"double"``, ``"single"``, or a list
            of global layer indices (double blocks first) and/or processor names or prefixes
            (``"single_transformer_blocks.3"``).
        implementation: ``"rowwise"`` (default) or ``"naive"`` (full ``T x T`` matrix; reference only).
        chunk_rows: target-image query rows per ``image_to_text`` chunk: the LSE pass holds one
            ``(B, heads, chunk_rows, T)`` float32 block, memory linear in the tokens ``T``.
    """

    def __init__(
        self,
        direction: Direction = "text_to_image",
        normalize: Normalize = "all",
        layers: LayerSpec = "all",
        implementation: Implementation = "rowwise",
        chunk_rows: int = 256,
    ) -> None:
        allowed = {"direction": Direction, "normalize": Normalize, "implementation": Implementation}
        for key, value in (("direction", direction), ("normalize", normalize), ("implementation", implementation)):
            if value not in get_args(allowed[key]):
                raise ConfigError(f"attention {key} must be one of {get_args(allowed[key])}, got {value!r}")
        if normalize == "style_tokens" and direction != "image_to_text":
            raise ConfigError("attention normalize 'style_tokens' only exists for direction 'image_to_text'")
        self.direction, self.normalize, self.layers = direction, normalize, layers
        self.implementation, self.chunk_rows = implementation, max(1, int(chunk_rows))
        self._options = (direction, normalize, implementation, self.chunk_rows)
        self.layer_names: list[str] = []
        self._originals: dict | None = None
        self._hooks: list = []
        self._active: _Capture | None = None
        self._last: _Capture | None = None

    def install(self, transformer) -> None:
        """Replace the selected layers' processors (``set_attn_processor``); keeps the originals."""
        if self._originals is not None:
            raise RuntimeError("StyleAttentionRecorder is already installed; remove() it first")
        originals = dict(transformer.attn_processors)
        selected = _select_layers(list(originals), self.layers)
        if bad := [n for n in selected if type(originals[n]) is not FluxAttnProcessor]:
            raise TypeError(f"{bad[0]} uses {type(originals[bad[0]]).__name__}, not diffusers' FluxAttnProcessor")
        new = dict(originals)
        for name in selected:  # keep the backend / parallel settings diffusers put on the originals
            new[name] = proc = StyleAttnProcessor(self, name)
            proc._attention_backend = originals[name]._attention_backend
            proc._parallel_config = originals[name]._parallel_config
        transformer.set_attn_processor(new)
        self._originals, self.layer_names = originals, selected
        self._hooks = [transformer.register_forward_pre_hook(self._start), transformer.register_forward_hook(self._end)]

    def remove(self, transformer) -> None:
        """Restore the processors that were in place before :meth:`install`."""
        if self._originals is None:
            raise RuntimeError("StyleAttentionRecorder is not installed")
        transformer.set_attn_processor(dict(self._originals))
        for hook in self._hooks:
            hook.remove()
        self._originals, self._hooks, self.layer_names = None, [], []

    def _start(self, module, args) -> None:  # transformer forward pre-hook: a new record per forward
        if self._active is not None:
            self._active.records.append({})
            self._active.in_forward = True

    def _end(self, module, args, output) -> None:  # after it, processor calls are checkpoint recomputations
        if self._active is not None:
            self._active.in_forward = False

    @contextmanager
    def capture(self, style_mask: torch.Tensor, n_text: int, n_target: int) -> Iterator[StyleAttentionRecorder]:
        """Record every transformer forward in the block. ``style_mask``: (B, L) or (B, W, L) bool, text positions."""
        if self._originals is None:
            raise RuntimeError("install() the recorder before capture()")
        if self._active is not None:
            raise RuntimeError("capture() does not nest")
        rows, weights, squeeze = _mask_rows(style_mask, n_text)
        self._active = _Capture(weights, rows, int(n_text), int(n_target), squeeze, list(self.layer_names))
        self._last = self._active
        try:
            yield self
        finally:
            self._active = None

    def _observe(self, name, query, key, attention_mask, text_len: int | None) -> None:
        cap = self._active
        if cap is None or not cap.in_forward:  # outside capture, or a checkpoint recomputation in backward
            return
        if name in cap.records[-1]:
            raise RuntimeError(f"{name} ran twice in one transformer forward")
        if attention_mask is not None:
            raise NotImplementedError("style-token attention capture does not support an attention_mask")
        batch, seq = query.shape[:2]
        if text_len not in (None, cap.n_text) or seq < cap.n_text + cap.n_target or batch != cap.weights.shape[0]:
            raise ValueError(
                f"{name}: batch {batch}, {seq} tokens (text {text_len}) do not fit the capture's "
                f"batch {cap.weights.shape[0]}, n_text={cap.n_text}, n_target={cap.n_target}"
            )
        amap = _layer_map(query, key, cap.rows, cap.weights, cap.n_text, cap.n_target, *self._options)
        cap.records[-1][name] = amap  # (B, W, N) float32
        cap.n_events += 1

    def layer_map(self, query: torch.Tensor, key: torch.Tensor, style_mask: torch.Tensor, n_target: int):
        """One layer's map from post-RoPE ``query``/``key`` (B, T, H, d), as a processor records it.

        Text positions are the first ``style_mask.shape[-1]`` tokens. Returns (B, N) or (B, W, N) float32.
        For custom processors, tests and benchmarks; needs no installed transformer.
        """
        rows, weights, squeeze = _mask_rows(style_mask, style_mask.shape[-1])
        amap = _layer_map(query, key, rows, weights, style_mask.shape[-1], n_target, *self._options)
        return amap[:, 0] if squeeze else amap

    @property
    def n_recorded(self) -> int:
        """Layer maps recorded by the last capture: n_forwards x supervised layers, recomputations excluded."""
        return 0 if self._last is None else self._last.n_events

    @property
    def n_forwards(self) -> int:
        """Transformer forwards recorded by the last capture (e.g. one per denoising step)."""
        return 0 if self._last is None else len(self._last.records)

    def per_layer(self, forward: int = -1) -> torch.Tensor:
        """Maps per supervised layer of one recorded forward (default: the last), (B, n_layers[, W], N)."""
        cap = self._last
        if cap is None or not cap.records:
            raise RuntimeError("no attention recorded: call the transformer inside capture()")
        records = cap.records[forward]
        missing = [n for n in cap.layers if n not in records]
        if missing:
            raise RuntimeError(f"{len(missing)} supervised layers recorded nothing (first: {missing[0]})")
        out = torch.stack([records[n] for n in cap.layers], dim=1)  # (B, n_layers, W, N)
        return out[:, :, 0] if cap.squeeze else out

    def maps(self, forward: int = -1) -> torch.Tensor:
        """Mean over supervised layers, (B, N) or (B, W, N) for a (B, W, L) mask; float32, differentiable."""
        return self.per_layer(forward).mean(dim=1)

    def clear(self) -> None:
        """Drop the last capture's maps (and the graph they hold)."""
        self._last = None
