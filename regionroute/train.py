"""Stage ``train``: LoRA-MoE on FLUX.1-Kontext with flow matching + attention supervision.

docs/method.md §2 (model input) and §4-5. The flow-matching inputs come from
:mod:`regionroute.flux.flow` (diffusers' Kontext LoRA script, helpers from
``diffusers.training_utils``); latents and text embeddings are computed once
(:func:`encode_dataset`), then the VAE and text encoders are freed.

The total loss is ``flow + w_focus * focus + w_cover * cover + w_balance * balance``
(one micro-batch: :class:`regionroute.objective.Objective`). Mixed precision, gradient
accumulation and multi-GPU (``accelerate launch``) come from accelerate. Every
micro-batch (sample indices, noise, sigmas) is drawn from a generator seeded by
``(seed, step, micro)``, so a run resumed from a checkpoint continues exactly as the
uninterrupted run would have (:mod:`regionroute.checkpoint`).

Data parallel (DDP under ``accelerate launch``, docs/scaling.md): ``train.batch_size`` is
per process, as in diffusers' scripts. Each micro-step draws the GLOBAL batch
(``num_processes x batch_size`` samples, noise and sigmas) from that generator and gives
each rank its slice, so N processes with batch b follow 1 process with batch N x b, up
to float noise: the flow loss is a mean over samples (DDP averages the ranks' gradients);
the MoLE balance loss is taken on the global batch's mean gate (one all-reduce, gradient
through the rank's own gates); the attention losses, means over the usable (non-empty)
masks, are weighted by the rank's share of the global batch's usable masks (one
all-reduce), so their average over ranks is the global batch's mean even when the ranks
hold different numbers of empty masks. DDP wraps
:class:`~regionroute.lora_moe.RoutedTransformer` (transformer AND learned gate: every
trainable parameter is all-reduced). Logged values are means over ranks (``n_empty``: the
sum; ``mass_inside``: the mean of the ranks' means). Rank 0 alone writes checkpoints,
logs and the model; every rank resumes from the same checkpoint; the checkpoint key holds
the process count (a 2-process checkpoint is only resumed by 2 processes).

Resume is keyed on content: the checkpoint directory's fingerprint holds the digest of
the encoded training tensors (so new pseudo-GT pixels, masks or instructions restart
training), the base model's files, the code of the objective, and every param that
changes the result or its logs. A non-finite loss stops the run and keeps the last good
checkpoint. Logged per step: each loss term, the LR, the attention mass inside the mask,
and ``n_empty``, the samples whose mask is empty on the token grid (no attention loss).
"""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from regionroute.config import CompositeConfig, LossConfig, TrainConfig
from regionroute.errors import UserError
from regionroute.files import (
    atomic_dir,
    prepare_resumable_dir,
    read_json,
    write_json,
)
from regionroute.objective import Objective, TrainCache, probe_attention

__all__ = [
    "CODE_MODULES",
    "EXPORT_MODULES",
    "TrainingError",
    "train",
]

#: Modules that define the trained experts (the regionroute/ deps of ``train`` in dvc.yaml).
CODE_MODULES: tuple[str, ...] = (
    "regionroute.train",
    "regionroute.checkpoint",
    "regionroute.objective",
    "regionroute.distributed",
    "regionroute.fingerprint",
    "regionroute.lora_moe.*",
    "regionroute.flux.*",
    "regionroute.losses",
    "regionroute.metrics.attention",
    "regionroute.models",
    "regionroute.models.kontext",
    "regionroute.tiny.kontext",
    "regionroute.tiny.text",
    "regionroute.toy.latent",
    "regionroute.files",
    "regionroute.config",
)
#: Modules that write the exported model's other files but not the experts (the model card): dvc.yaml deps of
#: ``train`` too, but not in the resume key: a run whose last checkpoint is its final step re-exports at once.
EXPORT_MODULES: tuple[str, ...] = ("regionroute.model_card",)
#: train params that change neither the experts nor the logs: a run may resume across them.
_NOT_IN_KEY = ("checkpoint_every", "keep_checkpoints")


class TrainingError(UserError):
    """Training stopped (non-finite loss); the message names the last good checkpoint."""


def _make_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw8bit":
        if not torch.cuda.is_available():
            raise UserError("train.optimizer: adamw8bit needs a CUDA GPU (bitsandbytes); use adamw on CPU")
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise UserError("train.optimizer: adamw8bit needs bitsandbytes (pip install bitsandbytes)") from None
        return bnb.optim.AdamW8bit(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)


def train(
    pipe: Any,
    cache: TrainCache,
    styles: tuple[str, ...],
    lora_cfg: Any,
    loss_cfg: LossConfig,
    cfg: TrainConfig,
    out_dir: Path,
    ckpt_dir: Path,
    live_dir: Path | None = None,
    base_model: str = "",
    base_key: dict[str, str] | None = None,
    on_step: Callable[[int], None] | None = None,
    instruction: str = CompositeConfig.instruction,
) -> dict[str, float]:
    """Train the experts; write the model to ``out_dir``; return the final logged values.

    ``base_model`` is the reference written to ``regionroute.json`` (what ``edit`` loads);
    ``base_key`` its content key (:func:`regionroute.models.kontext.kontext_key`), part of
    the resume key. The returned summary also holds ``probe_before/*`` and
    ``probe_after/*``: the attention terms on a fixed batch (:func:`probe_attention`) at
    the start and at the end of training.

    ``on_step(step)`` is called after each optimizer step (tests use it to simulate a kill).
    ``instruction``: the template the training instructions were made with (``composite.instruction``),
    stored in ``regionroute.json`` and shown in the model card (``README.md``, :mod:`regionroute.model_card`).
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from diffusers.optimization import get_scheduler

    from regionroute.checkpoint import checkpoints, load_state, save_checkpoint, trim_live_logs
    from regionroute.fingerprint import code_digest
    from regionroute.flux.attention import StyleAttentionRecorder
    from regionroute.lora_moe import RoutedTransformer, export_experts, inject_lora_moe, load_moe, save_moe
    from regionroute.lora_moe.export import write_model_config
    from regionroute.model_card import write_model_card

    # One process may train several configurations (tests, notebooks): the precision is per run.
    # Only the accelerator settings are reset; the process group (PartialState) stays.
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=1, cpu=pipe._execution_device.type == "cpu"
    )
    transformer = pipe.transformer
    transformer.requires_grad_(False)
    # a checkpoint is resumed only by a run that would have produced it (ablations share the dir);
    # rank 0 keys (or clears) the directory before any rank lists its checkpoints
    if accelerator.is_main_process:
        key = {
            "base": base_key or {"reference": base_model},
            "styles": list(styles),
            "lora": asdict(lora_cfg),
            "loss": asdict(loss_cfg),
            "train": {k: v for k, v in asdict(cfg).items() if k not in _NOT_IN_KEY},
            "data": cache.digest(),
            "code": code_digest(CODE_MODULES),
            "processes": accelerator.num_processes,
        }
        prepare_resumable_dir(ckpt_dir, key)
    accelerator.wait_for_everyone()
    ckpts = checkpoints(ckpt_dir)  # the same on every rank: nothing is written before the loop
    state = load_state(ckpts[-1]) if ckpts else {"step": 0, "sums": {}, "last": {}, "n_empty_total": 0.0}
    start = int(state["step"])
    torch.manual_seed(cfg.seed)  # expert init (A ~ gaussian) is part of the run's seed
    moe = load_moe(transformer, ckpts[-1] / "moe") if ckpts else inject_lora_moe(transformer, lora_cfg, styles)
    if cfg.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.train()
    recorder = StyleAttentionRecorder(
        direction=loss_cfg.direction, normalize=loss_cfg.normalize, layers=loss_cfg.layers
    )
    recorder.install(transformer)
    optimizer = _make_optimizer(moe.trainable_parameters(), cfg)
    if ckpts:
        optimizer.load_state_dict(torch.load(ckpts[-1] / "optimizer.pt", weights_only=True))
    scheduler = get_scheduler(
        cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps, num_training_steps=cfg.steps
    )
    with warnings.catch_warnings():  # fast-forward the schedule to the resumed step
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(start):
            scheduler.step()
    # DDP wraps the transformer AND the learned gate: every trainable parameter is all-reduced
    model, optimizer = accelerator.prepare(RoutedTransformer(moe), optimizer)
    mean_over_ranks = None
    if accelerator.num_processes > 1:
        mean_over_ranks = lambda t: accelerator.reduce(t.detach().clone(), reduction="mean")  # noqa: E731
    step_fn = Objective(pipe, model, moe, recorder, cache, cfg, loss_cfg, lora_cfg.balance_weight, mean_over_ranks)
    # dvclive logs live beside the checkpoints (same fingerprint, survive a resume) and are
    # copied to ``live_dir`` at the end (DVC deletes stage outputs before re-running a stage)
    live = None
    if accelerator.is_main_process and live_dir:
        trim_live_logs(ckpt_dir / "dvclive", start)  # rows the interrupted run logged past its checkpoint
        live = _live(ckpt_dir / "dvclive", resume=start > 0)
    sums: dict[str, float] = dict(state["sums"])  # the current logging window (restored on resume)
    last: dict[str, float] = dict(state["last"])
    n_empty_total = float(state["n_empty_total"])
    probe_path = ckpt_dir / "probe_before.json"  # the probe at step 0, kept across resumptions
    if start > 0 and probe_path.is_file():
        before = read_json(probe_path)
    else:
        before = probe_attention(step_fn)
        if accelerator.is_main_process:
            write_json(probe_path, before)
    bar = tqdm(total=cfg.steps, initial=start, desc="train", unit="step", disable=not accelerator.is_main_process)
    for step in range(start, cfg.steps):
        for micro in range(cfg.gradient_accumulation):
            # the global micro-batch is drawn from (seed, step, micro) alone; this rank takes its slice
            gen = torch.Generator().manual_seed(hash((cfg.seed, step, micro)) % 2**63)
            draw = step_fn.draw(gen, cfg.batch_size, accelerator.num_processes, accelerator.process_index)
            last_micro = micro == cfg.gradient_accumulation - 1
            with accelerator.no_sync(model) if not last_micro else nullcontext():  # all-reduce once per step
                with accelerator.autocast():
                    terms = step_fn(draw)
                values = _reduce_terms(accelerator, terms)  # the same on every rank: all stop together
                if not np.isfinite(values["total"]):
                    good = checkpoints(ckpt_dir)
                    where = f"last good checkpoint: {good[-1]}" if good else "no checkpoint was written yet"
                    shown = ", ".join(f"{k}={v:.4g}" for k, v in values.items())
                    raise TrainingError(f"non-finite loss at step {step + 1} ({shown}); stopped, {where}")
                accelerator.backward(terms["total"] / cfg.gradient_accumulation)
            for k, v in values.items():  # n_empty: samples per step; the rest: mean over micro-batches
                scale = 1.0 if k == "n_empty" else 1.0 / cfg.gradient_accumulation
                sums[k] = sums.get(k, 0.0) + v * scale
            n_empty_total += values.get("n_empty", 0.0)
        accelerator.clip_grad_norm_(moe.trainable_parameters(), cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        bar.update(1)
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            window = cfg.log_every if done % cfg.log_every == 0 else done % cfg.log_every
            last = {k: v / window for k, v in sums.items()}
            last["lr"] = scheduler.get_last_lr()[0]
            gates = moe.gate_weights()
            if gates is not None:  # mean gate of the last micro-batch, over all ranks
                q = accelerator.reduce(gates.mean(0).float(), reduction="mean")
                last["router_entropy"] = float(-(q.clamp_min(1e-12).log() * q).sum())
            bar.set_postfix(loss=f"{last['total']:.4f}")
            if live is not None:
                _log(live, last, done)
            sums = {}
        if accelerator.is_main_process and (done % cfg.checkpoint_every == 0 or done == cfg.steps):
            loop_state = {"sums": sums, "last": last, "n_empty_total": n_empty_total}
            save_checkpoint(ckpt_dir, done, moe, optimizer, loop_state, cfg.keep_checkpoints)
        if on_step is not None:
            on_step(done)
    bar.close()
    after = probe_attention(step_fn)
    summary = {
        **last,
        "n_empty_total": n_empty_total,
        **{f"probe_before/{k}": v for k, v in before.items()},
        **{f"probe_after/{k}": v for k, v in after.items()},
    }
    if live is not None:
        for k, v in summary.items():
            if k.startswith("probe") or k == "n_empty_total":
                live.summary[k] = v
    recorder.remove(transformer)
    if accelerator.is_main_process:
        with atomic_dir(out_dir) as tmp:
            save_moe(moe, tmp / "moe")
            export_experts(moe, tmp / "lora")
            config = {
                "base_model": base_model,
                "dtype": str(transformer.dtype).removeprefix("torch."),  # what `regionroute edit` loads the base in
                "styles": list(styles),
                "instruction": instruction,
                "lora": asdict(lora_cfg),
                "loss": asdict(loss_cfg),
                "train": asdict(cfg),
                "processes": accelerator.num_processes,  # global batch = processes x train.batch_size
                "latent_hw": list(cache.latent_hw),
            }
            write_model_config(tmp, config)
            write_model_card(tmp, config)
        if live is not None:
            live.make_summary()
            live.end()
            with atomic_dir(live_dir) as tmp:
                shutil.copytree(ckpt_dir / "dvclive", tmp, dirs_exist_ok=True)
    accelerator.wait_for_everyone()  # the model is written when any rank returns
    return summary


def _reduce_terms(accelerator: Any, terms: dict[str, torch.Tensor]) -> dict[str, float]:
    """Loss terms as floats: means over the processes (``n_empty``: the sum), in one all-reduce."""
    names = sorted(terms)
    vec = torch.stack([terms[k].detach().float().reshape(()).to(accelerator.device) for k in names])
    if accelerator.num_processes > 1:
        vec = accelerator.reduce(vec, reduction="sum")
    n = accelerator.num_processes
    return {k: v if k == "n_empty" else v / n for k, v in zip(names, vec.tolist(), strict=True)}


def _live(live_dir: Path, resume: bool) -> Any:
    from dvclive import Live

    return Live(dir=str(live_dir), resume=resume, save_dvc_exp=False, dvcyaml=None)


def _log(live: Any, values: dict[str, float], step: int) -> None:
    live.step = step
    for k, v in values.items():
        live.log_metric(f"train/{k}", float(v))
    live.make_summary()  # metrics.json = the latest values
