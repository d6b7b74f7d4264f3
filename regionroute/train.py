"""Stage ``train``: the LoRA-MoE experts on the pseudo-GT, flow matching + Focus/Cover (docs/method.md §2, §4-5).

:func:`train` runs the loop (accelerate: mixed precision, DDP; docs/scaling.md §3) on the
encoded data (:class:`regionroute.objective.TrainCache`), one micro-batch's loss being
:class:`regionroute.objective.Objective`. Micro-batches are drawn from ``(seed, step, micro)``,
so a run resumed from a checkpoint (keyed on data, model, code and params) equals the
uninterrupted run; the model is exported by :mod:`regionroute.lora_moe.export`.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from regionroute.config import CompositeConfig, LoraConfig, LossConfig, TrainConfig
from regionroute.errors import UserError
from regionroute.files import (
    atomic_dir,
    prepare_resumable_dir,
    read_json,
    write_json,
)
from regionroute.objective import Objective, TrainCache, probe_attention

__all__ = [
    "TrainingError",
    "train",
]

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
    lora_cfg: LoraConfig,
    loss_cfg: LossConfig,
    cfg: TrainConfig,
    out_dir: Path,
    ckpt_dir: Path,
    live_dir: Path | None = None,
    base_model: str = "",
    base_key: dict[str, str] | None = None,
    code: str = "",
    on_step: Callable[[int], None] | None = None,
    instruction: str = CompositeConfig.instruction,
) -> dict[str, float]:
    """Train the experts; write the model to ``out_dir``; return the final logged values.

    ``base_model`` is the reference written to ``regionroute.json`` (what ``edit`` loads);
    ``base_key`` its content key (:func:`regionroute.models.kontext.kontext_key`) and ``code``
    the stage's code key, both part of the resume key; ``instruction`` the template the training
    instructions were made with (``composite.instruction``), stored in ``regionroute.json`` and shown in
    the model card. The summary also holds ``probe_before/*`` and ``probe_after/*``: the attention terms
    on a fixed batch (:func:`probe_attention`) at the start and the end. ``on_step(step)`` runs after
    each optimizer step (tests simulate a kill with it).
    """
    from regionroute.checkpoint import checkpoints, save_checkpoint
    from regionroute.flux.attention import StyleAttentionRecorder
    from regionroute.lora_moe import RoutedTransformer, save_moe

    accelerator = _accelerator(cfg, pipe)
    key = {"base": base_key or {"reference": base_model}, "styles": list(styles), "lora": asdict(lora_cfg),
           "loss": asdict(loss_cfg), "train": {k: v for k, v in asdict(cfg).items() if k not in _NOT_IN_KEY},
           "data": cache.digest(), "code": code, "processes": accelerator.num_processes}  # fmt: skip
    if accelerator.is_main_process:  # rank 0 keys (or clears) the directory before any rank lists it
        prepare_resumable_dir(ckpt_dir, key)
    accelerator.wait_for_everyone()
    start, state, moe, parts = _restore(pipe.transformer, ckpt_dir, styles, lora_cfg, cfg)
    optimizer, scheduler = parts["optimizer"], parts["scheduler"]
    recorder = StyleAttentionRecorder(
        direction=loss_cfg.direction, normalize=loss_cfg.normalize, layers=loss_cfg.layers
    )
    recorder.install(pipe.transformer)
    model, optimizer = accelerator.prepare(RoutedTransformer(moe), optimizer)  # DDP: experts AND the learned gate
    mean_over_ranks = None
    if accelerator.num_processes > 1:
        mean_over_ranks = lambda t: accelerator.reduce(t.detach().clone(), reduction="mean")  # noqa: E731
    objective = Objective(pipe, model, moe, recorder, cache, cfg, loss_cfg, lora_cfg.balance_weight, mean_over_ranks)
    log = _Log(accelerator, ckpt_dir, live_dir, start, state)
    before = log.probe_before(objective, start)
    bar = tqdm(total=cfg.steps, initial=start, desc="train", unit="step", disable=not accelerator.is_main_process)
    for step in range(start, cfg.steps):
        for micro in range(cfg.gradient_accumulation):
            # the global micro-batch is drawn from (seed, step, micro) alone; this rank takes its slice
            gen = torch.Generator().manual_seed(hash((cfg.seed, step, micro)) % 2**63)
            draw = objective.draw(gen, cfg.batch_size, accelerator.num_processes, accelerator.process_index)
            last_micro = micro == cfg.gradient_accumulation - 1
            with accelerator.no_sync(model) if not last_micro else nullcontext():  # all-reduce once per step
                with accelerator.autocast():
                    terms = objective(draw)
                values = _reduce_terms(accelerator, terms)  # the same on every rank: all stop together
                if not np.isfinite(values["total"]):
                    _stop(step, values, checkpoints(ckpt_dir))
                accelerator.backward(terms["total"] / cfg.gradient_accumulation)
            log.add(values, cfg.gradient_accumulation)
        accelerator.clip_grad_norm_(moe.trainable_parameters(), cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        bar.update(1)
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            bar.set_postfix(loss=f"{log.flush(done, cfg.log_every, scheduler, moe)['total']:.4f}")
        if accelerator.is_main_process and (done % cfg.checkpoint_every == 0 or done == cfg.steps):
            save_checkpoint(
                ckpt_dir, done, parts, log.state(), cfg.keep_checkpoints, write=lambda d: save_moe(moe, d / "moe")
            )
        if on_step is not None:
            on_step(done)
    bar.close()
    summary = log.summary(before, probe_attention(objective))
    recorder.remove(pipe.transformer)
    if accelerator.is_main_process:
        config = {
            "base_model": base_model,
            "dtype": str(pipe.transformer.dtype).removeprefix("torch."),  # what `regionroute edit` loads the base in
            "styles": list(styles), "instruction": instruction, "lora": asdict(lora_cfg), "loss": asdict(loss_cfg),
            "train": asdict(cfg), "processes": accelerator.num_processes,  # global batch = processes x batch_size
            "latent_hw": list(cache.latent_hw), "vae_scale_factor": int(pipe.vae_scale_factor),  # pixels per latent
        }  # fmt: skip
        _export(out_dir, moe, config)
        log.finish(live_dir)
    accelerator.wait_for_everyone()  # the model is written when any rank returns
    return summary


def _accelerator(cfg: TrainConfig, pipe: Any) -> Any:
    """A fresh accelerator for this run (one process may train several configurations: tests, notebooks)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=False)  # the precision is per run; the process group stays
    cpu = pipe._execution_device.type == "cpu"
    return Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=1, cpu=cpu)


def _restore(
    transformer: Any, ckpt_dir: Path, styles: tuple[str, ...], lora_cfg: LoraConfig, cfg: TrainConfig
) -> tuple[int, dict[str, Any], Any, dict[str, Any]]:
    """(start step, loop state, experts, the checkpoint's parts: optimizer and LR schedule), resumed or fresh."""
    from diffusers.optimization import get_scheduler

    from regionroute.checkpoint import checkpoints, load_checkpoint
    from regionroute.lora_moe import inject_lora_moe, load_moe

    transformer.requires_grad_(False)
    ckpts = checkpoints(ckpt_dir)  # the same on every rank: nothing is written before the loop
    torch.manual_seed(cfg.seed)  # expert init (A ~ gaussian) is part of the run's seed
    moe = load_moe(transformer, ckpts[-1] / "moe") if ckpts else inject_lora_moe(transformer, lora_cfg, styles)
    if cfg.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.train()
    optimizer = _make_optimizer(moe.trainable_parameters(), cfg)
    scheduler = get_scheduler(
        cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps, num_training_steps=cfg.steps
    )
    parts = {"optimizer": optimizer, "scheduler": scheduler}  # saved by the loop under these names
    state = load_checkpoint(ckpts[-1], parts) if ckpts else {"step": 0, "sums": {}, "last": {}, "n_empty_total": 0.0}
    return int(state["step"]), state, moe, parts


def _stop(step: int, values: dict[str, float], good: list[Path]) -> None:
    where = f"last good checkpoint: {good[-1]}" if good else "no checkpoint was written yet"
    shown = ", ".join(f"{k}={v:.4g}" for k, v in values.items())
    raise TrainingError(f"non-finite loss at step {step + 1} ({shown}); stopped, {where}")


class _Log:
    """The logging window's sums, the last logged values and the dvclive run (rank 0), restored on resume.

    dvclive logs live beside the checkpoints (same key, they survive a resume) and are copied
    to ``live_dir`` at the end (DVC deletes stage outputs before re-running a stage).
    """

    def __init__(self, accelerator: Any, ckpt_dir: Path, live_dir: Path | None, start: int, state: dict) -> None:
        from regionroute.live import trim_live_logs

        self.accelerator, self.ckpt_dir = accelerator, ckpt_dir
        self.sums: dict[str, float] = dict(state["sums"])  # the current logging window
        self.last: dict[str, float] = dict(state["last"])
        self.n_empty_total = float(state["n_empty_total"])
        self.live = None
        if accelerator.is_main_process and live_dir:
            trim_live_logs(ckpt_dir / "dvclive", start)  # rows the interrupted run logged past its checkpoint
            from dvclive import Live

            self.live = Live(dir=str(ckpt_dir / "dvclive"), resume=start > 0, save_dvc_exp=False, dvcyaml=None)

    def probe_before(self, objective: Objective, start: int) -> dict[str, float]:
        """The probe at step 0, kept across resumptions."""
        path = self.ckpt_dir / "probe_before.json"
        if start > 0 and path.is_file():
            return read_json(path)
        before = probe_attention(objective)
        if self.accelerator.is_main_process:
            write_json(path, before)
        return before

    def add(self, values: dict[str, float], accumulation: int) -> None:
        """One micro-batch: ``n_empty`` summed per step, the rest averaged over the micro-batches."""
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + v * (1.0 if k == "n_empty" else 1.0 / accumulation)
        self.n_empty_total += values.get("n_empty", 0.0)

    def flush(self, done: int, every: int, scheduler: Any, moe: Any) -> dict[str, float]:
        """Close the window ending at step ``done``: its means, the LR, the router's entropy; logged."""
        window = every if done % every == 0 else done % every
        self.last = {k: v / window for k, v in self.sums.items()}
        self.last["lr"] = scheduler.get_last_lr()[0]
        gates = moe.gate_weights()
        if gates is not None:  # mean gate of the last micro-batch, over all ranks
            q = self.accelerator.reduce(gates.mean(0).float(), reduction="mean")
            self.last["router_entropy"] = float(-(q.clamp_min(1e-12).log() * q).sum())
        if self.live is not None:
            self.live.step = done
            for k, v in self.last.items():
                self.live.log_metric(f"train/{k}", float(v))
            self.live.make_summary()  # metrics.json = the latest values
        self.sums = {}
        return self.last

    def state(self) -> dict[str, Any]:
        return {"sums": self.sums, "last": self.last, "n_empty_total": self.n_empty_total}

    def summary(self, before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
        summary = {**self.last, "n_empty_total": self.n_empty_total,
                   **{f"probe_before/{k}": v for k, v in before.items()},
                   **{f"probe_after/{k}": v for k, v in after.items()}}  # fmt: skip
        if self.live is not None:
            for k, v in summary.items():
                if k.startswith("probe") or k == "n_empty_total":
                    self.live.summary[k] = v
        return summary

    def finish(self, live_dir: Path | None) -> None:
        if self.live is None or live_dir is None:
            return
        self.live.make_summary()
        self.live.end()
        with atomic_dir(live_dir) as tmp:
            shutil.copytree(self.ckpt_dir / "dvclive", tmp, dirs_exist_ok=True)
            # dvclive keeps a resumed run's summary in the order it read it back: sorted, as all our JSON
            write_json(tmp / "metrics.json", read_json(tmp / "metrics.json"))


def _export(out_dir: Path, moe: Any, config: dict[str, Any]) -> None:
    """The trained model: the whole MoE, one diffusers LoRA per expert, ``regionroute.json`` and its model card."""
    from regionroute.lora_moe import export_experts, save_moe
    from regionroute.lora_moe.export import write_model_config
    from regionroute.model_card import write_model_card

    with atomic_dir(out_dir) as tmp:
        save_moe(moe, tmp / "moe")
        export_experts(moe, tmp / "lora")
        write_model_config(tmp, config)
        write_model_card(tmp, config)


def _reduce_terms(accelerator: Any, terms: dict[str, torch.Tensor]) -> dict[str, float]:
    """Loss terms as floats: means over the processes (``n_empty``: the sum), in one all-reduce."""
    names = sorted(terms)
    vec = torch.stack([terms[k].detach().float().reshape(()).to(accelerator.device) for k in names])
    if accelerator.num_processes > 1:
        vec = accelerator.reduce(vec, reduction="sum")
    n = accelerator.num_processes
    return {k: v if k == "n_empty" else v / n for k, v in zip(names, vec.tolist(), strict=True)}
