"""Pretraining the toy Kontext base on procedural scenes, with the ``train`` stage's flow-matching blocks (docs/toy.md).

The toy pipeline's ``base`` stage (:func:`pretrain`). Each sample is a scene and one edit that
makes the paper's premise true: ``make the image into {style} style`` and ``make the {object} into
{style} style`` both style the whole image; ``make the {object} {colour|tone}`` changes only the
object. Each step's scenes, tasks and noise come from the seed scheme's ``base`` stream keyed by the
step, so a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from regionroute.files import atomic_dir, prepare_resumable_dir
from regionroute.toy.base import BaseConfig

__all__ = ["TONES", "PromptTable", "make_batch", "pretrain", "step_rng", "tone_edit"]

#: Local non-style edits of the named object (besides recolouring), pixel-wise or 3 x 3.
TONES: tuple[str, ...] = ("grayscale", "negative", "blurry")


class PromptTable:
    """Every instruction of the toy world, encoded once: T5 (P, L, D) and pooled CLIP (P, Dp)."""

    def __init__(self, pipe: Any, objects: list[str], edits: list[str], styles: list[str], length: int) -> None:
        prompts = [f"make the image into {s} style" for s in styles]
        prompts += [f"make the {o} into {s} style" for o in objects for s in styles]
        prompts += [f"make the {o} {c}" for o in objects for c in edits]
        self.prompts = prompts
        self.index = {p: i for i, p in enumerate(prompts)}
        with torch.no_grad():
            embeds, pooled, _ = pipe.encode_prompt(
                prompt=prompts, prompt_2=None, device=torch.device("cpu"), max_sequence_length=length
            )
        self.embeds, self.pooled = embeds.float(), pooled.float()

    def lookup(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.tensor([self.index[p] for p in prompts])
        return self.embeds[idx], self.pooled[idx]


def tone_edit(images: torch.Tensor, masks: torch.Tensor, tones: list[str]) -> torch.Tensor:
    """Re-tone the masked pixels of each image (B, 3, H, W) by ``tones[b]``; pixels outside are bit-identical."""
    import torch.nn.functional as F

    from regionroute.toy.filters import _luma

    unknown = sorted(set(tones) - set(TONES))
    if unknown:
        raise ValueError(f"unknown tone {unknown[0]!r} (one of {', '.join(TONES)})")
    out = images.clone()
    for tone in sorted(set(tones)):  # one call per tone, as make_batch does per style
        idx = torch.tensor([b for b, t in enumerate(tones) if t == tone])
        x = images[idx]
        if tone == "grayscale":
            y = _luma(x).expand_as(x)
        elif tone == "negative":
            y = 1 - x
        else:  # blurry
            y = F.avg_pool2d(F.pad(x, (2, 2, 2, 2), mode="replicate"), 5, stride=1)
        out[idx] = torch.where(masks[idx].bool()[:, None], y, x)
    return out


def make_batch(rng: np.random.Generator, cfg: BaseConfig, n: int) -> dict[str, Any]:
    """``n`` scenes with an edit each: context and target images (n, 3, S, S) in [0, 1], prompts, tasks."""
    from regionroute.toy.filters import STYLES, apply_style, recolour
    from regionroute.toy.scenes import COLOURS, render_batch

    scenes = render_batch(rng, n, cfg.size)
    x = torch.from_numpy(np.stack([s.image for s in scenes])).permute(0, 3, 1, 2).float() / 255  # (n, 3, S, S)
    p_local = 1.0 - cfg.p_global - cfg.p_object_style
    p_task = [cfg.p_global, cfg.p_object_style, p_local * (1 - cfg.p_tone), p_local * cfg.p_tone]
    tasks = rng.choice(4, size=n, p=p_task)  # 0 image, 1 object style, 2 colour, 3 tone
    styles = rng.integers(len(STYLES), size=n)
    target = x.clone()
    prompts: list[str] = [""] * n
    for s, style in enumerate(STYLES):
        idx = np.flatnonzero((tasks < 2) & (styles == s))
        if idx.size:
            target[idx] = apply_style(x[idx], style)
    colour_names = list(COLOURS)
    local = np.flatnonzero(tasks >= 2)
    masks = torch.zeros(len(local), cfg.size, cfg.size, dtype=torch.bool)
    rgb = torch.zeros(len(local), 3)
    tones: list[str] = []
    for j, i in enumerate(local):
        scene = scenes[i]
        k = int(rng.integers(len(scene.objects)))
        obj = scene.objects[k]
        same = [m for m, o in zip(scene.masks, scene.objects, strict=True) if o == obj]  # every instance named
        masks[j] = torch.from_numpy(np.any(same, axis=0))
        if tasks[i] == 2:
            choices = [c for c in colour_names if c != scene.colours[k]]
            edit = choices[int(rng.integers(len(choices)))]
            rgb[j] = torch.tensor(COLOURS[edit], dtype=torch.float32) / 255
        else:
            edit = TONES[int(rng.integers(len(TONES)))]
            tones.append(edit)
        prompts[i] = f"make the {obj} {edit}"
    recol, retone = tasks[local] == 2, tasks[local] == 3
    if recol.any():
        target[local[recol]] = recolour(x[local[recol]], masks[recol], rgb[recol])
    if retone.any():
        target[local[retone]] = tone_edit(x[local[retone]], masks[retone], tones)
    for i in np.flatnonzero(tasks < 2):
        style = STYLES[int(styles[i])]
        if tasks[i] == 0:
            prompts[i] = f"make the image into {style} style"
        else:
            obj = scenes[i].objects[int(rng.integers(len(scenes[i].objects)))]
            prompts[i] = f"make the {obj} into {style} style"
    return {"context": x, "target": target, "prompts": prompts, "tasks": torch.from_numpy(tasks)}


def step_rng(cfg: BaseConfig, step: int) -> np.random.Generator:
    """The generator of one pretraining step (the seed scheme's ``base`` stream, keyed by the step)."""
    from regionroute.seeds import stream

    return stream("base", cfg.seed, step)


_TASKS = ("loss_image_style", "loss_object_style", "loss_colour", "loss_tone")  # per-task logs, by task code


def encode_images(pipe: Any, images: torch.Tensor) -> torch.Tensor:
    """(B, 3, S, S) in [0, 1] -> packed latents (B, N, C) exactly as the pipeline encodes an image."""
    vae = pipe.vae
    z = vae.encode(images * 2 - 1).latent_dist.mode()
    z = (z - vae.config.shift_factor) * vae.config.scaling_factor  # (B, C, h, w)
    b, c, h, w = z.shape
    return pipe._pack_latents(z, b, c, h, w)


def pretrain(
    pipe: Any, cfg: BaseConfig, out_dir: Path, ckpt_dir: Path, live_dir: Path | None = None, code: str = ""
) -> dict:
    """Train ``pipe.transformer``; save the whole pipeline to ``out_dir``; return the last logged values.

    ``code``: the stage's code key, part of the checkpoints' key with the params.
    """
    from diffusers.optimization import get_scheduler

    from regionroute.checkpoint import checkpoints, load_checkpoint, save_checkpoint
    from regionroute.flux.flow import (
        FlowSchedule,
        flow_loss,
        kontext_image_ids,
        noisy,
        quiet_rms_norm_notice,
        transformer_inputs,
    )
    from regionroute.live import trim_live_logs
    from regionroute.toy.filters import STYLES
    from regionroute.toy.scenes import CATEGORIES, COLOURS

    prepare_resumable_dir(ckpt_dir, {"base": asdict(cfg), "code": code})
    transformer = pipe.transformer
    table = PromptTable(
        pipe, [c[1] for c in CATEGORIES], list(COLOURS) + list(TONES), list(STYLES), cfg.max_sequence_length
    )
    schedule = FlowSchedule(pipe.scheduler.config)
    grid = cfg.size // cfg.latent_factor  # unpacked latent side
    img_ids = kontext_image_ids((grid, grid), torch.device("cpu"), torch.float32)
    if not cfg.pooled_text:  # zero since build_toy_kontext; frozen, so it stays zero
        transformer.time_text_embed.text_embedder.requires_grad_(False)
    params = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.steps)
    parts = {"transformer": transformer, "optimizer": optimizer, "scheduler": scheduler}
    start, sums = 0, {}
    if ckpts := checkpoints(ckpt_dir):
        state = load_checkpoint(ckpts[-1], parts)
        start, sums = int(state["step"]), dict(state["sums"])
    live = None
    if live_dir is not None:
        from dvclive import Live

        trim_live_logs(ckpt_dir / "dvclive", start)
        live = Live(dir=str(ckpt_dir / "dvclive"), resume=start > 0, save_dvc_exp=False, dvcyaml=None)
    transformer.train()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.mixed_precision == "bf16")
    last: dict[str, float] = {}
    lo, hi = cfg.guidance_range
    for step in tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="toy base", unit="step"):
        rng = step_rng(cfg, step)  # scenes, tasks, then the torch draws of this step
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        batch = make_batch(rng, cfg, cfg.batch_size)
        with torch.no_grad():
            x0, context = encode_images(pipe, batch["target"]), encode_images(pipe, batch["context"])
        embeds, pooled = table.lookup(batch["prompts"])
        noise = torch.randn(x0.shape, generator=gen)
        sigma = schedule.sample(cfg.batch_size, gen)
        guidance = lo + (hi - lo) * torch.rand(cfg.batch_size, generator=gen)
        kwargs = transformer_inputs(
            noisy(x0, noise, sigma), context, sigma, embeds, pooled, img_ids, guidance, torch.float32
        )
        with autocast, quiet_rms_norm_notice():
            pred = transformer(**kwargs)[0][:, : x0.shape[1]]
        per = ((pred.float() - (noise - x0)) ** 2).mean(dim=(1, 2))  # (B,) for the per-task logs
        loss = flow_loss(pred, x0, noise, schedule.loss_weight(sigma.view(-1, 1, 1)))
        if not torch.isfinite(loss):
            raise RuntimeError(f"toy base: non-finite loss at step {step + 1}")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
        for t, name in enumerate(_TASKS):
            sel = batch["tasks"] == t
            if bool(sel.any()):
                sums[name] = sums.get(name, 0.0) + float(per[sel].mean().detach())
                sums[name + "_n"] = sums.get(name + "_n", 0.0) + 1
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            window = cfg.log_every if done % cfg.log_every == 0 else done % cfg.log_every
            last = {"loss": sums["loss"] / window, "lr": scheduler.get_last_lr()[0]}
            for name in _TASKS:
                if sums.get(name + "_n"):
                    last[name] = sums[name] / sums[name + "_n"]
            if live is not None:
                live.step = done
                for k, v in last.items():
                    live.log_metric(f"base/{k}", v)
                live.make_summary()
            sums = {}
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            save_checkpoint(ckpt_dir, done, parts, {"sums": sums})
    transformer.eval()
    save_dtype = torch.bfloat16 if cfg.save_dtype == "bfloat16" else torch.float32
    with atomic_dir(out_dir) as tmp:
        transformer.to(save_dtype)
        pipe.save_pretrained(tmp, safe_serialization=True)
        transformer.to(torch.float32)
    if live is not None:
        live.end()
        with atomic_dir(live_dir) as tmp:
            shutil.copytree(ckpt_dir / "dvclive", tmp, dirs_exist_ok=True)
    return last
