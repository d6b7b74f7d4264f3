"""The training objective on one micro-batch, and the encoded data it draws from (docs/method.md §2, §4, §5).

:func:`encode_dataset` encodes the records once (VAE latents, T5/CLIP text, masks on the token
grid) into a :class:`TrainCache`; :class:`Objective` draws a micro-batch and returns the named
terms (flow, Focus, Cover, balance, attention mass inside the mask); under DDP the balance and
attention terms are weighted so the ranks' average gradient is the global batch's.
:func:`probe_attention` evaluates the attention terms on a fixed batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from regionroute.config import LossConfig, TrainConfig
from regionroute.errors import DataError
from regionroute.files import read_image, read_jsonl, read_mask

__all__ = ["Objective", "TrainCache", "encode_dataset", "probe_attention"]


@dataclass
class TrainCache:
    """Everything the loop needs, encoded once. Shapes for B samples, text length L, N tokens."""

    x0: torch.Tensor  # (B, N, C*4) packed target latents
    context: torch.Tensor  # (B, N, C*4) packed context latents
    prompt_embeds: torch.Tensor  # (B, L, D) T5
    pooled: torch.Tensor  # (B, Dp) CLIP pooled
    style_mask: torch.Tensor  # (B, L) bool, the style word's T5 tokens
    mask_grid: torch.Tensor  # (B, h, w) soft (area-averaged) mask on the token grid
    object_elements: torch.Tensor  # (B, N, C*4) each packed latent value's mask coverage; (B, 0, 0) if not encoded
    style_ids: torch.Tensor  # (B,) int64 expert index
    latent_hw: tuple[int, int]  # unpacked latent (H/8, W/8)

    @property
    def n_records(self) -> int:
        return self.x0.shape[0]

    def digest(self) -> str:
        """Content key of every cached tensor (pixels, masks, instructions, styles as encoded)."""
        from regionroute.fingerprint import tensor_digest

        return tensor_digest({f.name: getattr(self, f.name) for f in fields(self)})


def encode_dataset(
    pipe: Any, records_path: Path, styles: tuple[str, ...], cfg: TrainConfig, batch_size: int = 8,
    object_elements: bool = False) -> TrainCache:  # fmt: skip
    """Encode images (VAE), instructions (T5 + CLIP) and, if asked, each latent value's mask coverage once."""
    from regionroute.flux.tokens import style_token_mask
    from regionroute.losses import downsample_mask, element_coverage

    records = read_jsonl(records_path)
    if not records:
        raise DataError(f"{records_path}: no training records")
    unknown = sorted({r["style"] for r in records} - set(styles))
    if unknown:
        raise DataError(f"{records_path}: style {unknown[0]!r} is not in data.styles ({', '.join(styles)})")
    root = records_path.parent
    device, vae = pipe._execution_device, pipe.vae
    shift, scale = vae.config.shift_factor, vae.config.scaling_factor
    out: dict[str, list[torch.Tensor]] = {k: [] for k in ("x0", "context", "prompt", "pooled", "mask", "elements")}
    latent_hw = None
    with torch.no_grad():
        for start in tqdm(range(0, len(records), batch_size), desc="encode", unit="batch"):
            batch = records[start : start + batch_size]
            for key, field in (("x0", "pseudo_gt"), ("context", "original")):
                images = np.stack([read_image(root / r[field]) for r in batch])  # (b, H, W, 3)
                x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1).to(device, vae.dtype)
                lat = (vae.encode(x).latent_dist.mode() - shift) * scale  # (b, C, H/8, W/8)
                b, c, h, w = lat.shape
                latent_hw = (h, w)
                out[key].append(pipe._pack_latents(lat, b, c, h, w).float().cpu())
            prompts = [r["instruction"] for r in batch]
            embeds, pooled, _ = pipe.encode_prompt(
                prompt=prompts, prompt_2=None, device=device, max_sequence_length=cfg.max_sequence_length
            )
            out["prompt"].append(embeds.float().cpu())
            out["pooled"].append(pooled.float().cpu())
            masks = torch.from_numpy(np.stack([read_mask(root / r["mask"]) for r in batch])).float()
            out["mask"].append(downsample_mask(masks, latent_hw[0] // 2, latent_hw[1] // 2))
            if object_elements:
                cov = element_coverage(vae, masks.to(device), lat.shape)  # (b, C, H/8, W/8)
                out["elements"].append(pipe._pack_latents(cov, b, c, h, w).float().cpu())
    style_mask = style_token_mask(
        pipe.tokenizer_2, [r["instruction"] for r in records], [r["style"] for r in records], cfg.max_sequence_length
    )
    return TrainCache(
        x0=torch.cat(out["x0"]),
        context=torch.cat(out["context"]),
        prompt_embeds=torch.cat(out["prompt"]),
        pooled=torch.cat(out["pooled"]),
        style_mask=style_mask,
        mask_grid=torch.cat(out["mask"]),
        object_elements=torch.cat(out["elements"]) if object_elements else torch.zeros(len(records), 0, 0),
        style_ids=torch.tensor([styles.index(r["style"]) for r in records]),
        latent_hw=latent_hw,
    )


class Objective:
    """One forward of the flow-matching + attention objective on a micro-batch."""

    def __init__(
        self,
        pipe: Any,
        model: Any,
        moe: Any,
        recorder: Any,
        cache: TrainCache,
        cfg: TrainConfig,
        loss_cfg: LossConfig,
        balance_weight: float,
        mean_over_ranks: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        from regionroute.flux.flow import FlowSchedule, kontext_image_ids

        self.model, self.moe, self.recorder, self.cache, self.cfg = model, moe, recorder, cache, cfg
        self.loss_cfg, self.balance_weight = loss_cfg, balance_weight
        self.mean_over_ranks = mean_over_ranks  # (t) -> mean of t over the processes, no grad; None: 1 process
        self.schedule = FlowSchedule(
            pipe.scheduler.config, cfg.weighting_scheme, cfg.logit_mean, cfg.logit_std, cfg.mode_scale
        )
        self.device = next(moe.transformer.parameters()).device
        self.dtype = next(moe.transformer.parameters()).dtype
        self.img_ids = kontext_image_ids(cache.latent_hw, self.device, self.dtype)
        self.supervise = loss_cfg.focus_weight > 0 or loss_cfg.cover_weight > 0

    def draw(self, gen: torch.Generator, batch_size: int, ranks: int = 1, rank: int = 0) -> dict[str, torch.Tensor]:
        """Rank ``rank``'s slice of the global micro-batch: ``ranks x batch_size`` samples drawn from ``gen``."""
        n = batch_size * ranks
        idx = torch.randint(self.cache.n_records, (n,), generator=gen)
        noise = torch.randn(self.cache.x0[idx].shape, generator=gen)
        sigma = self.schedule.sample(n, gen)
        mine = slice(rank * batch_size, (rank + 1) * batch_size)
        return {"idx": idx[mine], "noise": noise[mine], "sigma": sigma[mine]}

    def __call__(self, draw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        from regionroute.flux.flow import flow_loss, noisy, quiet_rms_norm_notice, transformer_inputs
        from regionroute.losses import attention_losses
        from regionroute.metrics.attention import attention_mass_inside

        c, dev = self.cache, self.device
        idx = draw["idx"]
        x0, noise, sigma = c.x0[idx].to(dev), draw["noise"].to(dev), draw["sigma"].to(dev)
        n = x0.shape[1]
        b = x0.shape[0]
        route = {"style_ids": c.style_ids[idx].to(dev), "pooled": c.pooled[idx].to(dev)}  # routed in the forward
        kwargs = transformer_inputs(
            noisy(x0, noise, sigma), c.context[idx].to(dev), sigma, c.prompt_embeds[idx], c.pooled[idx],
            self.img_ids, self.cfg.guidance, self.dtype,
        )  # fmt: skip
        if self.supervise:
            with self.recorder.capture(
                style_mask=c.style_mask[idx].to(dev), n_text=c.prompt_embeds.shape[1], n_target=n
            ), quiet_rms_norm_notice():  # fmt: skip
                pred = self.model(**route, **kwargs)[0][:, :n]
            maps = self.recorder.maps()  # (B, N) float32
        else:
            with quiet_rms_norm_notice():
                pred = self.model(**route, **kwargs)[0][:, :n]
        weight = self.schedule.loss_weight(sigma.view(-1, 1, 1))
        if self.loss_cfg.object_weight != 1.0:  # not the paper's: the object's latent values count more
            if c.object_elements.shape[1:] != x0.shape[1:]:
                raise ValueError("loss.object_weight != 1 needs encode_dataset(..., object_elements=True)")
            coverage = c.object_elements[idx].to(dev)  # (B, N, C) in [0, 1]
            values = 1 + (self.loss_cfg.object_weight - 1) * coverage
            weight = weight * values / values.mean((1, 2), keepdim=True).clamp_min(1e-8)  # mean 1 per sample
        flow = flow_loss(pred, x0, noise, weight)
        terms = {"flow": flow, "balance": self.moe.balance_loss(batch_mean=self._global_mean)}
        total = flow + self.balance_weight * terms["balance"]
        if self.supervise:
            h, w = c.mask_grid.shape[1:]
            masks = c.mask_grid[idx].to(dev)
            att = attention_losses(maps.view(b, h, w), masks, self.loss_cfg)
            focus, cover = att["focus"], att["cover"]
            if self.mean_over_ranks is not None:  # this rank's share of the global batch's usable masks:
                used = torch.tensor(float(att["n_used"]), device=dev)  # DDP's average of the ranks' weighted
                mean_used = self.mean_over_ranks(used)  # means is then the global batch's mean
                share = used / mean_used if float(mean_used) > 0 else torch.zeros((), device=dev)
                focus, cover = focus * share, cover * share
            terms |= {"focus": focus, "cover": cover, "n_empty": torch.tensor(float(att["n_empty"]))}
            total = total + self.loss_cfg.focus_weight * focus + self.loss_cfg.cover_weight * cover
            terms["mass_inside"] = torch.nanmean(attention_mass_inside(maps.detach().view(b, h, w), masks))
        terms["total"] = total
        return terms

    def _global_mean(self, q: torch.Tensor) -> torch.Tensor:
        """Value: ``q``'s mean over the processes (the global batch's mean gate); gradient: ``q``'s own.

        DDP averages the ranks' gradients, which then equal the gradient of the balance loss
        on the global batch's mean gate (a 1-process run with the global batch).
        """
        if self.mean_over_ranks is None:
            return q
        return q + (self.mean_over_ranks(q.detach()) - q).detach()


def probe_attention(objective: Objective, n: int = 8, seed: int = 1234) -> dict[str, float]:
    """Attention terms on a FIXED set of samples, noise and sigmas (no grad): comparable over training."""
    if not objective.supervise:
        return {}
    gen = torch.Generator().manual_seed(seed)
    n = min(n, objective.cache.n_records)
    draw = {
        "idx": torch.arange(n),
        "noise": torch.randn(objective.cache.x0[:n].shape, generator=gen),
        "sigma": torch.linspace(0.3, 0.7, n),
    }
    with torch.no_grad():
        terms = objective(draw)
    return {k: float(terms[k]) for k in ("focus", "cover", "mass_inside")}
