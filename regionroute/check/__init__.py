"""``regionroute check``: is everything a params file needs here, and does it fit? (docs/method.md §2, "Memory").

:func:`check` runs every check on one params file: the models (:mod:`.models`), the data and
disk (:mod:`.data`), the device, memory and settings (:mod:`.device`) against the accounting
(:mod:`.accounting`); :func:`format_report` prints it. :func:`preflight` runs, cheaply (no COCO
parse), the part that concerns one GPU stage and raises :class:`~regionroute.errors.UserError`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from regionroute.check import device
from regionroute.check.data import check_data, check_disk
from regionroute.check.device import GPU_STAGES, check_memory, check_settings
from regionroute.check.models import check_models
from regionroute.check.report import Finding, Report, format_report
from regionroute.config import Params, load_params
from regionroute.errors import ConfigError, UserError

if TYPE_CHECKING:
    from regionroute.check.accounting import Accounting

__all__ = ["GPU_STAGES", "Finding", "Report", "check", "format_report", "preflight"]


def _invalid(path: str | Path, exc: UserError) -> Finding:
    msg = str(exc)
    key, _, what = msg.partition(": ") if msg.startswith(str(path)) else (str(path), "", msg)
    return Finding("error", key, what)


def _account(
    params: Params, stages: tuple[str, ...], activations: bool, alternatives: bool
) -> tuple[Accounting | None, list[Finding]]:
    from regionroute.check.accounting import account

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
    if device.stage_device(params, stage)[1] != "cpu" and not any(f.level == "error" for f in findings):
        acc, errors = _account(params, (stage,), activations=True, alternatives=False)
        findings += errors + (check_memory(params, acc, (stage,)) if acc is not None else [])
    problems = [f.line().removeprefix("error: ") for f in findings if f.level == "error"]
    if len(problems) == 1:
        raise UserError(problems[0])
    if problems:
        raise UserError(f"{stage}: {len(problems)} problems\n  " + "\n  ".join(problems))
