"""The findings of ``regionroute check`` and their text report (docs/method.md §2, "Memory").

A :class:`Finding` is one line ``<level>: <key or file>: <what> (<fix>)``; a :class:`Report`
holds the findings and the accounting of one params file; :func:`format_report` prints them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from regionroute.check.accounting import Accounting

__all__ = ["Finding", "Level", "Report", "format_accounting", "format_report", "gib", "listed"]

Level = Literal["error", "warning", "ok"]
GIB = 2**30


@dataclass(frozen=True)
class Finding:
    """One line of the report; ``stages``: the stages it concerns (empty: the whole pipeline)."""

    level: Level
    key: str  # params key or file
    what: str
    fix: str = ""
    stages: tuple[str, ...] = ()

    def line(self) -> str:
        return f"{self.level}: {self.key}: {self.what}" + (f" ({self.fix})" if self.fix else "")


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


def listed(items: list[str]) -> str:
    """The first three items, and how many more."""
    return ", ".join(items[:3]) + (f" and {len(items) - 3} more" if len(items) > 3 else "")


def gib(n: float) -> str:
    """Bytes for a finding: GiB with one decimal, MiB below 1 GiB."""
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / 2**20:.0f} MiB"


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
