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
from regionroute.files import atomic_path

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
#: metrics the comparison column judges (Q1/Q2 only mean something with a real VLM judge)
JUDGED: frozenset[str] = frozenset({"rsm_text", "mse_fg", "lpips_bg", "mse_bg", "attn_mass_in"})
#: relative change below which a row is "not worse" (run-to-run noise of the toy world is a few %)
TOLERANCE = 0.05
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
                if (rev.get("data") or {}).get("rev") == "workspace":
                    continue  # running: dvc shows the workspace's files, not the experiment's
                name = rev.get("name") or exp_range.get("name") or str(rev.get("rev", "?"))[:7]
                params = _flatten(_file_data(rev, "params", PARAMS_FILE))
                yield name, params, _file_data(rev, "metrics", SCORE_FILE)


def _cell(value: Any) -> str:
    return "-" if value is None else f"{float(value):.4f}"


def _compare(score: Mapping[str, Any], ref: Mapping[str, Any]) -> str:
    """Which judged metrics are worse / better than the reference's by more than TOLERANCE (relative)."""
    worse, better = [], []
    for key, header in ABLATION_METRICS:
        a, b = score.get(key), ref.get(key)
        if key not in JUDGED or a is None or b is None:
            continue
        sign = 1.0 if header.endswith("↑") else -1.0
        change = sign * (float(a) - float(b)) / max(abs(float(b)), 1e-12)
        if change < -TOLERANCE:
            worse.append(header[:-2])
        elif change > TOLERANCE:
            better.append(header[:-2])
    verdict = f"worse: {', '.join(worse)}" if worse else "not worse on any"
    return f"{verdict}; better: {', '.join(better)}" if better else verdict


def ablation_table(show: list[dict[str, Any]]) -> str:
    """Markdown table: experiment | differing params | RegionRoute metrics | computed comparison with the
    reference (the first commit row: what the experiments start from) | the base's reference row."""
    rows = [(label, p, s) for label, p, s in exp_rows(show) if isinstance(s.get("regionroute"), Mapping)]
    if not rows:
        raise UserError(f"no RegionRoute metrics in {SCORE_FILE}: run `dvc repro` (or `dvc exp run`) first")
    if len(rows) > 1 and rows[0][0] == "workspace" and rows[0][1:] == rows[1][1:]:
        rows = rows[1:]  # an unchanged workspace repeats its commit
    ref_label, ref = rows[0][0], rows[0][2]["regionroute"]
    keys = sorted({k for _, p, _ in rows for k in p if k.startswith(_PARAM_SECTIONS)})
    differing = [k for k in keys if len({json.dumps(p.get(k), sort_keys=True) for _, p, _ in rows}) > 1]
    header = ["experiment", *differing, *(h for _, h in ABLATION_METRICS), f"vs {ref_label}"]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join([":---"] * (1 + len(differing)) + ["---:"] * len(ABLATION_METRICS) + [":---"]) + "|",
    ]
    for i, (label, params, score) in enumerate(rows):
        cells = [label, *(str(params.get(k, "-")) for k in differing)]
        cells += [_cell(score["regionroute"].get(m)) for m, _ in ABLATION_METRICS]
        cells.append("(reference)" if i == 0 else _compare(score["regionroute"], ref))
        lines.append("| " + " | ".join(cells) + " |")
    bases: list[Mapping[str, Any]] = []  # one row per distinct base (another sample seed: other pairs)
    for label, _, score in rows:
        base = score.get("base")
        if isinstance(base, Mapping) and base not in bases:
            bases.append(base)
            cells = [f"*base Kontext ({label})*", *("" for _ in differing)]
            cells += [_cell(base.get(m)) for m, _ in ABLATION_METRICS] + [""]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_ablations(out: Path, repo: Path = Path(".")) -> Path:
    """Write ``reports/ablations.md`` from the repository's experiments."""
    table = ablation_table(exp_show_json(repo))
    text = "\n".join([
        "# Ablations", "",
        "Generated by `regionroute ablations` from `dvc exp show --json`; params shown are the "
        f"`{PARAMS_FILE}` values that differ between the rows (workspace, commits and experiments). "
        f"Metrics: the `regionroute` method in `{SCORE_FILE}`; the last rows are the base Kontext "
        "(no LoRA) of the first row, and of any row evaluated on other pairs (another sample seed), "
        "for reference. The last column is computed: the metrics on which "
        f"a row is worse (or better) than the first row by more than {TOLERANCE:.0%} relative "
        f"({', '.join(sorted(JUDGED))}; Q1/Q2 are left out: they only mean something with a real VLM).", "",
        table, "",
    ])  # fmt: skip
    with atomic_path(out) as tmp:
        tmp.write_text(text)
    return out
