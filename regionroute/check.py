"""``regionroute check``: is everything a params file needs here, and does it fit? (docs/method.md §2, "Memory").

One :class:`Finding` per problem, each a line ``error: <key or file>: <what> (<fix>)``:

* models (``models.kontext``, ``score.clip``, ``score.lpips``, ``score.vlm``): ``tiny`` is built in
  code; ``toy``, a local directory or a hub id must have its files on disk (the hub's in the
  local Hugging Face cache: nothing is downloaded); a missing one is named with the command
  that fetches it (:mod:`regionroute.refs`);
* data: the COCO layout under ``data.root`` for every split, and enough usable images for
  ``data.splits.<split>.num`` (the annotation file is parsed once);
* device and memory: each stage's need (:mod:`regionroute.accounting`) against the free memory
  of its device (``torch.cuda.mem_get_info``, or the host's available RAM);
* settings that need something: ``train.optimizer: adamw8bit`` (bitsandbytes and CUDA),
  fp16/bf16 precision on a device without it;
* disk: the pipeline's outputs (and missing downloads) against the free space.

:func:`preflight` runs the part of the check that concerns one GPU stage, cheaply (no COCO
parse), and raises :class:`~regionroute.errors.UserError` listing its problems.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from regionroute.check_models import Finding, check_models, listed

if TYPE_CHECKING:
    from regionroute.accounting import Accounting
from regionroute.config import Params, load_params
from regionroute.errors import ConfigError, UserError

__all__ = ["GPU_STAGES", "Finding", "check", "format_report", "preflight"]

GPU_STAGES: tuple[str, ...] = ("stylize", "train", "infer", "score")
GIB = 2**30


def _gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / 2**20:.0f} MiB"


# -- data -----------------------------------------------------------------------------------------
def check_data(params: Params) -> list[Finding]:
    """The COCO layout of every split, with its counts against ``data.splits.<split>.num``."""
    from regionroute.files import read_json

    root, out = Path(params.data.root), []
    for split, cfg in sorted(params.data.splits.items()):
        key = f"data.splits.{split}"
        ann = root / "annotations"
        paths = [ann / f"instances_{cfg.coco}.json", ann / f"captions_{cfg.coco}.json"]
        absent = [str(p) for p in paths if not p.is_file()]
        if not (root / cfg.coco).is_dir():
            absent.append(f"{root / cfg.coco}/")
        if absent:
            fix = "COCO 2017: https://cocodataset.org/#download (images + annotations_trainval2017.zip)"
            out.append(Finding("error", key, f"missing {listed(absent)}", fix, ("sample",)))
            continue
        try:
            data = read_json(paths[0])
            images, anns = data["images"], data["annotations"]
        except (UserError, KeyError, TypeError) as exc:
            out.append(Finding("error", str(paths[0]), f"not a COCO instances file ({exc})", stages=("sample",)))
            continue
        usable = {a["image_id"] for a in anns if not a.get("iscrowd", 0)}
        names = {e.name for e in os.scandir(root / cfg.coco)}
        absent_files = [i["file_name"] for i in images if i["file_name"] not in names]
        counts = f"{len(images)} images, {len(anns)} annotations, {len(usable)} images with a non-crowd instance"
        if len(usable) < cfg.num:
            out.append(
                Finding(
                    "error",
                    f"{key}.num",
                    f"{cfg.num} pairs asked, {paths[0]} has {counts}",
                    f"lower {key}.num",
                    ("sample",),
                )
            )
        elif absent_files:
            out.append(
                Finding(
                    "error",
                    str(root / cfg.coco),
                    f"{len(absent_files)} of {len(images)} annotated images are missing ({listed(absent_files)})",
                    "complete the image download",
                    ("sample",),
                )
            )
        else:
            out.append(Finding("ok", key, f"{root}: {cfg.coco}: {counts}; {cfg.num} asked", stages=("sample",)))
    return out


# -- device, memory, optional dependencies ------------------------------------------------------------
def _device(params: Params, stage: str) -> tuple[str, str]:
    """(params key, resolved device type) of a stage; 'missing' when CUDA is asked and absent."""
    key = "score.device" if stage == "score" else "models.device"
    asked = params.score.device if stage == "score" else params.models.device
    if asked == "auto":
        return key, "cuda" if torch.cuda.is_available() else "cpu"
    return key, asked if asked == "cpu" or torch.cuda.is_available() else "missing"


def _free_bytes(device: str) -> tuple[int, str]:
    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        return free, f"free on {torch.cuda.get_device_name()}"
    try:
        with open("/proc/meminfo") as fh:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in fh}
        return info["MemAvailable"], "available host RAM"
    except (OSError, KeyError, ValueError, IndexError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "available host RAM"


_SHRINK = {
    "stylize": "lower stylize.batch_size",
    "train": "lower train.batch_size",
    "infer": "lower infer.batch_size",
    "score": "lower score.vlm_batch_size / score.batch_size",
}


def check_memory(params: Params, accounting: Accounting, stages: tuple[str, ...] = GPU_STAGES) -> list[Finding]:
    """Each stage's computed need against its device's free memory (CUDA: with the runtime reserve)."""
    out = []
    for stage in stages:
        mem = accounting.stages.get(stage)
        key, device = _device(params, stage)
        if device == "missing":
            out.append(
                Finding("error", key, "'cuda' requested but no CUDA device is available", "use auto or cpu", (stage,))
            )
            continue
        if mem is None or mem.tensors is None:
            continue
        need = mem.total if device == "cuda" else mem.tensors
        free, what = _free_bytes(device)
        if need <= free:
            out.append(Finding("ok", stage, f"needs {_gib(need)} on {device}, {_gib(free)} {what}", stages=(stage,)))
            continue
        fix = _SHRINK[stage]
        alt = mem.detail.get("transformer_checkpointing_on")
        reserve = mem.reserve if device == "cuda" else 0
        fixed = max(mem.weights + mem.trainable, mem.detail.get("encode_weights") or 0) + reserve
        encode = mem.detail.get("encode_phase") or 0
        if fixed > free:
            fix = f"the weights alone need {_gib(fixed)}: a device with more memory"
            if device == "cpu" and key == "models.device":
                fix += " (models.device: auto found no CUDA device)"
        elif encode + reserve > free and encode > mem.weights + mem.trainable + mem.activations:
            fix = f"encoding the dataset needs {_gib(encode + reserve)}: all weights + the VAE on 8 images at once"
        elif stage == "train" and not params.train.gradient_checkpointing and alt is not None:
            fix = f"set train.gradient_checkpointing: true (activations {_gib(alt)}), or {fix}"
        out.append(
            Finding("error", stage, f"needs {_gib(need)} on {device} ({key}), {_gib(free)} {what}", fix, (stage,))
        )
    return out


def check_settings(params: Params, stages: tuple[str, ...] = GPU_STAGES) -> list[Finding]:
    """Settings that need an optional package or a capable device."""
    out = []
    if "train" not in stages:
        return out
    _, device = _device(params, "train")
    if params.train.optimizer == "adamw8bit":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            out.append(
                Finding(
                    "error",
                    "train.optimizer",
                    "adamw8bit needs bitsandbytes, which is not installed",
                    "pip install bitsandbytes, or use adamw",
                    ("train",),
                )
            )
        if device != "cuda":
            out.append(
                Finding(
                    "error",
                    "train.optimizer",
                    f"adamw8bit needs a CUDA GPU, train runs on {device}",
                    "use adamw",
                    ("train",),
                )
            )
    if params.train.mixed_precision == "fp16" and device != "cuda":
        out.append(
            Finding(
                "error",
                "train.mixed_precision",
                f"fp16 mixed precision needs a CUDA GPU (train runs on {device})",
                "use bf16 or no",
                ("train",),
            )
        )
    wants_bf16 = params.train.mixed_precision == "bf16" or params.models.dtype == "bfloat16"
    if wants_bf16 and device == "cuda" and not torch.cuda.is_bf16_supported():
        out.append(
            Finding(
                "error",
                "train.mixed_precision",
                f"bfloat16 is not supported by {torch.cuda.get_device_name()}",
                "use fp16 / float16",
                ("train",),
            )
        )
    return out


# -- disk -------------------------------------------------------------------------------------------
def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_disk(params: Params, accounting: Accounting, findings: list[Finding]) -> list[Finding]:
    """The pipeline's outputs (x2: DVC keeps a copy in its cache) and the missing downloads vs free space."""
    d, res = params.data, params.sample.resolution
    pairs = sum(s.num for s in d.splits.values())
    eval_pairs = d.splits["eval"].num
    image = res * res * 3  # an RGB PNG is at most its raw pixels (+ headers)
    n_styles = len(d.styles)
    images = pairs * (image + res * res)  # samples: image + mask
    images += 2 * n_styles * pairs * image  # stylized + pseudo-GT
    images += 3 * n_styles * eval_pairs * 2 * image  # infer: 3 methods x (image + figure)
    lora = accounting.lora.get("lora_params", {}).get("total", 0) * 4
    models = lora * 2 + params.train.keep_checkpoints * (lora + accounting.trainable_bytes.get("optimizer", 0))
    outputs = 2 * (images + models)
    free = shutil.disk_usage(_existing(Path.cwd())).free
    out = []
    if outputs > free:
        out.append(
            Finding(
                "error",
                str(Path.cwd()),
                f"the pipeline's outputs need up to {_gib(outputs)} (images x2 for the DVC cache), {_gib(free)} free",
                "free disk space or lower data.splits.*.num",
            )
        )
    else:
        out.append(Finding("ok", "disk", f"outputs up to {_gib(outputs)}, {_gib(free)} free in {Path.cwd()}"))
    download = 0
    params_of = {"models.kontext": ("transformer", "text_encoder", "text_encoder_2", "vae"), "score.vlm": ("vlm",)}
    for f in findings:
        if f.level == "error" and f.key in params_of and "Hugging Face cache" in f.what:
            download += 2 * sum(accounting.params.get(k, 0) for k in params_of[f.key])  # bf16 checkpoints
    if download:
        from huggingface_hub import constants

        cache = Path(constants.HF_HUB_CACHE)
        free = shutil.disk_usage(_existing(cache)).free
        if download > free:
            out.append(
                Finding(
                    "error",
                    str(cache),
                    f"the missing weights need about {_gib(download)}, {_gib(free)} free",
                    "set HF_HOME to a larger disk",
                )
            )
    return out


# -- the whole check --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Report:
    """Findings (errors, warnings, ok lines) and the accounting of one params file."""

    params: str
    findings: list[Finding]
    accounting: Accounting | None = None  # None when the params are invalid

    @property
    def problems(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "error"]

    def to_dict(self) -> dict[str, Any]:
        findings = [{**asdict(f), "line": f.line()} for f in self.findings]
        return {"findings": findings, "accounting": self.accounting.to_dict() if self.accounting else None}


def _invalid(path: str | Path, exc: UserError) -> Finding:
    msg = str(exc)
    key, _, what = msg.partition(": ") if msg.startswith(str(path)) else (str(path), "", msg)
    return Finding("error", key, what)


def _account(
    params: Params, stages: tuple[str, ...], activations: bool, alternatives: bool
) -> tuple[Accounting | None, list[Finding]]:
    from regionroute.accounting import account

    try:
        return account(params, stages=stages, activations=activations, alternatives=alternatives), []
    except (UserError, OSError, ValueError, KeyError, TypeError) as exc:  # e.g. a malformed config.json
        return None, [Finding("error", "accounting", f"cannot build the models from their configs ({exc})")]


def check(params_path: str | Path = "params.yaml", *, activations: bool = True) -> Report:
    """Every check on one params file (``activations=False``: skip the traced activation memory)."""
    try:
        params = load_params(params_path)
    except ConfigError as exc:
        return Report(str(params_path), [_invalid(params_path, exc)])
    findings = check_models(params, GPU_STAGES) + check_data(params)
    acc, errors = _account(params, GPU_STAGES, activations, alternatives=True)
    findings += errors + check_settings(params)
    if acc is not None:
        findings += check_memory(params, acc) + check_disk(params, acc, findings)
    return Report(str(params_path), findings, acc)


def preflight(params_path: str | Path, stage: str) -> None:
    """The checks a GPU stage needs (models, settings, on CUDA its memory; no COCO parse): raise if any fails."""
    if stage not in GPU_STAGES:
        raise ValueError(f"preflight: unknown stage {stage!r} (one of {', '.join(GPU_STAGES)})")
    params = load_params(params_path)
    findings = check_models(params, (stage,)) + check_settings(params, (stage,))
    # the memory of models that are not there is moot; on the CPU the trace costs seconds a stage for nothing
    if _device(params, stage)[1] != "cpu" and not any(f.level == "error" for f in findings):
        acc, errors = _account(params, (stage,), activations=True, alternatives=False)
        findings += errors + (check_memory(params, acc, (stage,)) if acc is not None else [])
    problems = [f.line().removeprefix("error: ") for f in findings if f.level == "error"]
    if len(problems) == 1:
        raise UserError(problems[0])
    if problems:
        raise UserError(f"{stage}: {len(problems)} problems\n  " + "\n  ".join(problems))


# -- the human report -------------------------------------------------------------------------------
def _fmt(n: int | None) -> str:
    return "-" if n is None else (f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB")


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def format_accounting(acc: Accounting) -> str:
    """The accounting as text: models, LoRA-MoE, tokens and a per-stage memory table (markdown)."""
    lines = ["Models (parameters, from " + "; ".join(f"{k}: {v}" for k, v in acc.sources.items()) + "):"]
    lines.append("  " + ", ".join(f"{k} {_count(v)}" for k, v in acc.params.items()))
    if acc.lora:
        lp = acc.lora["lora_params"]
        per = ", ".join(f"{s} {_count(lp[s])}" for s in ("double", "single") if s in lp)
        mods = ", ".join(f"{k} x{v}" for k, v in acc.lora["lora_modules"].items())
        lines.append(f"  LoRA-MoE {_count(lp['total'])} ({per}, router {lp['router']}): {mods}")
        t = acc.trainable_bytes
        lines.append(
            f"  trainable state {_fmt(t['total'])} = params {_fmt(t['params'])} + grads {_fmt(t['grads'])}"
            f" + optimizer {_fmt(t['optimizer'])}"
        )
    for stage, tok in acc.tokens.items():
        lines.append(
            f"  tokens {stage}: text {tok['text']} + target {tok['image']} + context {tok['context']} = "
            f"{tok['sequence']}"
        )
    lines += [
        "",
        "| stage | weights | trainable | activations (peak) | reserve | total | largest part |",
        "|---" * 7 + "|",
    ]
    for name, s in acc.stages.items():
        parts = {k: v for k, v in s.detail.items() if v is not None and not k.startswith(("transformer_", "encode_w"))}
        top = max(parts, key=parts.get) if parts else "-"
        if top == "encode_phase":  # the encoders' phase of training is the larger one
            encoders = {k: v for k, v in parts.items() if k.startswith("encode_") and k != "encode_phase"}
            top = f"encode phase ({max(encoders, key=encoders.get).removeprefix('encode_')})"
        lines.append(
            f"| {name} | {_fmt(s.weights)} | {_fmt(s.trainable) if s.trainable else '-'} | "
            f"{_fmt(s.activations)} | {_fmt(s.reserve)} | {_fmt(s.total)} | {top} |"
        )
    train = acc.stages.get("train")
    if train is not None:
        on, off = (train.detail.get(f"transformer_checkpointing_{x}") for x in ("on", "off"))
        lines.append(
            f"\ntrain activations: gradient checkpointing on {_fmt(on)}, off {_fmt(off)}; encoding phase "
            f"(all weights + VAE/T5 on the encode batch) {_fmt(train.detail.get('encode_phase'))}"
        )
    lines.append(f"method: {acc.method}")
    return "\n".join(lines)


def format_report(report: Report, verbose: bool = True) -> str:
    """Problems first, then (``verbose``) the ok lines and the accounting."""
    shown = [f for f in report.findings if f.level != "ok"] + (
        [f for f in report.findings if f.level == "ok"] if verbose else []
    )
    lines = [f.line() for f in shown]
    if report.accounting is not None and verbose:
        lines += ["", format_accounting(report.accounting)]
    n_err = len(report.problems)
    n_warn = sum(f.level == "warning" for f in report.findings)
    lines.append(f"\n{report.params}: {n_err} error(s), {n_warn} warning(s)")
    return "\n".join(lines)
