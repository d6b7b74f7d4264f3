"""The ablation table: experiments side by side, from ``dvc exp show`` (docs/method.md §5 ablations).

Run the ablations as DVC experiments (``dvc exp run -S lora.single_stream=false``, ...),
then ``regionroute ablations`` writes ``reports/ablations.md``: one row per experiment
(and the workspace), the ``params.yaml`` params that differ between them, and
RegionRoute's metrics from ``metrics/score.json`` (with the base Kontext's row of the
workspace for reference). Numbers come from ``dvc exp show --json``; nothing is typed by
hand. Params and metrics are read from their own files, so a metric whose name looks like
a param (dvclive's ``train.loss``) can never be taken for one.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from regionroute.errors import UserError
from regionroute.io import atomic_path

__all__ = ["ABLATION_METRICS", "ExpRow", "ablation_table", "exp_rows", "exp_show_json", "write_ablations"]

PARAMS_FILE = "params.yaml"
SCORE_FILE = "metrics/score.json"
#: (metric key in metrics/score.json under the method, header)
ABLATION_METRICS: tuple[tuple[str, str], ...] = (
    ("rsm_text", "RSM text ↑"),
    ("mse_fg", "MSE_fg ↓"),
    ("lpips_bg", "LPIPS_bg ↓"),
    ("mse_bg", "MSE_bg ↓"),
    ("q1", "Q1 ↑"),
    ("q2", "Q2 ↓"),
    ("attn_mass_in", "attn mass in ↑"),
)
_PARAM_SECTIONS = ("lora.", "loss.", "train.", "sample.", "composite.", "stylize.")

ExpRow = tuple[str, dict[str, Any], dict[str, Any]]  # (label, flat params, score.json data)


def exp_show_json(repo: Path = Path(".")) -> list[dict[str, Any]]:
    """``dvc exp show --json`` of the workspace, its commits and their experiments."""
    try:
        proc = subprocess.run(
            ["dvc", "exp", "show", "--json", "--no-pager"], cwd=repo, capture_output=True, text=True, check=False
        )
    except FileNotFoundError:
        raise UserError("regionroute ablations: the 'dvc' command is not on PATH") from None
    if proc.returncode != 0:
        raise UserError(f"dvc exp show failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr else '?'}")
    return json.loads(proc.stdout)


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _file_data(state: Mapping[str, Any], kind: str, path: str) -> dict[str, Any]:
    data = (state.get("data") or {}).get(kind) or {}
    return dict((data.get(path) or {}).get("data") or {})


def exp_rows(show: list[dict[str, Any]]) -> Iterator[ExpRow]:
    """(label, params, score) for the workspace, each commit and every experiment on it."""
    for state in show:
        rev_id = str(state.get("rev", "?"))
        label = state.get("name") or (rev_id if rev_id == "workspace" else rev_id[:7])
        yield label, _flatten(_file_data(state, "params", PARAMS_FILE)), _file_data(state, "metrics", SCORE_FILE)
        for exp_range in state.get("experiments") or []:
            for rev in exp_range.get("revs") or []:
                name = rev.get("name") or exp_range.get("name") or str(rev.get("rev", "?"))[:7]
                params = _flatten(_file_data(rev, "params", PARAMS_FILE))
                yield name, params, _file_data(rev, "metrics", SCORE_FILE)


def _cell(value: Any) -> str:
    return "-" if value is None else f"{float(value):.4f}"


def ablation_table(show: list[dict[str, Any]]) -> str:
    """Markdown table: experiment | differing params | RegionRoute metrics (+ the base's reference row)."""
    rows = [(label, p, s) for label, p, s in exp_rows(show) if isinstance(s.get("regionroute"), Mapping)]
    if not rows:
        raise UserError(f"no RegionRoute metrics in {SCORE_FILE}: run `dvc repro` (or `dvc exp run`) first")
    keys = sorted({k for _, p, _ in rows for k in p if k.startswith(_PARAM_SECTIONS)})
    differing = [k for k in keys if len({json.dumps(p.get(k), sort_keys=True) for _, p, _ in rows}) > 1]
    header = ["experiment", *differing, *(h for _, h in ABLATION_METRICS)]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join([":---"] * (1 + len(differing)) + ["---:"] * len(ABLATION_METRICS)) + "|",
    ]
    for label, params, score in rows:
        cells = [label, *(str(params.get(k, "-")) for k in differing)]
        cells += [_cell(score["regionroute"].get(m)) for m, _ in ABLATION_METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    base = rows[0][2].get("kontext")
    if isinstance(base, Mapping):
        cells = [f"*base Kontext ({rows[0][0]})*", *("" for _ in differing)]
        cells += [_cell(base.get(m)) for m, _ in ABLATION_METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_ablations(out: Path, repo: Path = Path(".")) -> Path:
    """Write ``reports/ablations.md`` from the repository's experiments."""
    table = ablation_table(exp_show_json(repo))
    text = "\n".join([
        "# Ablations", "",
        "Generated by `regionroute ablations` from `dvc exp show --json`; params shown are the "
        f"`{PARAMS_FILE}` values that differ between the rows (workspace, commits and experiments). "
        f"Metrics: the `regionroute` method in `{SCORE_FILE}`; the last row is the base Kontext "
        "(no LoRA) of the first row, for reference.", "",
        table, "",
    ])  # fmt: skip
    with atomic_path(out) as tmp:
        tmp.write_text(text)
    return out
