"""Tables across DVC experiments: ``regionroute ablations`` and ``regionroute replicates`` (from ``dvc exp show``).

Rows are the workspace, its commits and their experiments; params come from every params
file (``toy/params.yaml`` keys keep their file's name), metrics from ``metrics/score.json``
and ``metrics/targets.json``. Rows evaluated on the same pairs share the base's metrics
exactly (its outputs do not depend on training): a row is compared with the main row of
its own pairs, and a row on other pairs says so. Nothing is typed by hand.
"""

from __future__ import annotations

import json
import math
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from regionroute.errors import UserError
from regionroute.files import atomic_path
from regionroute.targets import TARGETS

__all__ = [
    "ExpRow",
    "ablation_table",
    "exp_rows",
    "exp_show_json",
    "replicate_summary",
    "replicate_table",
    "write_table",
]

SCORE_FILE, TARGETS_FILE = "metrics/score.json", "metrics/targets.json"
#: relative change below which a row is "not worse" than its main row
TOLERANCE = 0.05


@dataclass(frozen=True)
class ExpRow:
    """One row: its label, flat params (``section.key``; other files as ``file:section.key``), metrics."""

    label: str
    params: dict[str, Any]
    score: dict[str, Any]
    targets: dict[str, Any]

    @property
    def pairs(self) -> str:
        """Rows with equal keys were evaluated on the same pairs (the base's metrics, exactly)."""
        return json.dumps(self.score.get("base"), sort_keys=True)


def exp_show_json(repo: Path = Path(".")) -> list[dict[str, Any]]:
    """``dvc exp show --json`` of the workspace, its commits and their experiments."""
    try:
        proc = subprocess.run(["dvc", "exp", "show", "--json", "--no-pager"], cwd=repo, capture_output=True, text=True)
    except FileNotFoundError:
        raise UserError("the 'dvc' command is not on PATH") from None
    if proc.returncode != 0:
        raise UserError(f"dvc exp show failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(proc.stdout)


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, Mapping) else {f"{prefix}{k}": v})
    return out


def _row(label: str, state: Mapping[str, Any]) -> ExpRow:
    data = state.get("data") or {}
    params: dict[str, Any] = {}
    for path, content in sorted((data.get("params") or {}).items()):
        prefix = "" if path == "params.yaml" else f"{path}:"
        params.update(_flatten((content or {}).get("data") or {}, prefix))
    metrics = data.get("metrics") or {}

    def read(path: str) -> dict[str, Any]:
        return dict((metrics.get(path) or {}).get("data") or {})

    return ExpRow(label, params, read(SCORE_FILE), read(TARGETS_FILE))


def exp_rows(show: list[dict[str, Any]]) -> Iterator[ExpRow]:
    """Every row with RegionRoute metrics; an unchanged workspace is not repeated, running experiments are skipped."""
    rows: list[ExpRow] = []
    for state in show:
        rev_id = str(state.get("rev", "?"))
        rows.append(_row(state.get("name") or (rev_id if rev_id == "workspace" else rev_id[:7]), state))
        for exp_range in state.get("experiments") or []:
            for rev in exp_range.get("revs") or []:
                if (rev.get("data") or {}).get("rev") == "workspace":
                    continue  # running: dvc shows the workspace's files, not the experiment's
                rows.append(_row(rev.get("name") or exp_range.get("name") or str(rev.get("rev", "?"))[:7], rev))
    rows = [r for r in rows if isinstance(r.score.get("regionroute"), Mapping)]
    if not rows:
        raise UserError(f"no RegionRoute metrics in {SCORE_FILE}: run `dvc repro` (or `dvc exp run`) first")
    if (
        len(rows) > 1
        and rows[0].label == "workspace"
        and (rows[0].params, rows[0].score) == (rows[1].params, rows[1].score)
    ):
        rows = rows[1:]
    yield from rows


def _table(header: list[str], rows: list[list[str]], left: int) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join([":---"] * left + ["---:"] * (len(header) - left)) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _num(value: Any, digits: int = 4) -> str:
    return "-" if value is None or not math.isfinite(float(value)) else f"{float(value):.{digits}f}"


def _compare(row: ExpRow, main: ExpRow) -> str:
    """The targets' metrics on which ``row`` is worse / better than ``main`` by more than TOLERANCE (relative)."""
    worse, better = [], []
    for t in TARGETS:
        if t.metric not in row.targets:  # not judged (Q1/Q2 with the random tiny VLM)
            continue
        a, b = row.score["regionroute"].get(t.metric), main.score["regionroute"].get(t.metric)
        if a is None or b is None or not b:
            continue
        up = t.relation == ">=" or t.metric in ("rsm_text", "q1")
        change = (1.0 if up else -1.0) * (float(a) - float(b)) / abs(float(b))
        if change < -TOLERANCE:
            worse.append(t.metric)
        elif change > TOLERANCE:
            better.append(t.metric)
    verdict = f"worse: {', '.join(worse)}" if worse else "not worse on any"
    return f"{verdict}; better: {', '.join(better)}" if better else verdict


def ablation_table(show: list[dict[str, Any]]) -> str:
    """Experiment | every differing param | each target: RegionRoute (ratio to its own base) | verdicts | vs main."""
    rows = list(exp_rows(show))
    keys = sorted({k for r in rows for k in r.params})
    differing = [k for k in keys if len({json.dumps(r.params.get(k), sort_keys=True) for r in rows}) > 1]
    mains: dict[str, ExpRow] = {}
    for r in rows:
        mains.setdefault(r.pairs, r)  # the first row of each set of pairs: the workspace/commit when it has them
    shown = [t for t in TARGETS if any(t.metric in r.targets for r in rows)]  # Q1/Q2 only with a trained VLM
    header = ["experiment", *differing, *(f"{t.metric} (x {t.reference})" for t in shown), "holds", "vs main"]
    body = []
    for r in rows:
        cells = [r.label, *(str(r.params.get(k, "-")) for k in differing)]
        for t in shown:
            value, judged = r.score["regionroute"].get(t.metric), r.targets.get(t.metric) or {}
            ratio = f" ({_num(judged['ratio'], 2)}x)" if judged.get("ratio") is not None else ""
            cells.append(f"{_num(value)}{ratio}")
        verdicts = [v.get("verdict") for v in r.targets.values()]
        cells.append(f"{sum(v == 'holds' for v in verdicts)}/{len(verdicts)}" if verdicts else "-")
        main = mains[r.pairs]
        if main is r:  # the first row of its pairs: the others on them are compared with it
            cells.append("(main row of these pairs)")
        else:
            cells.append(_compare(r, main))
        body.append(cells)
    return _table(header, body, 1 + len(differing))


def _replicates(show: list[dict[str, Any]], prefix: str) -> list[ExpRow]:
    """The main row (the workspace or commit) and the experiments named ``prefix*``."""
    rows = list(exp_rows(show))
    return [rows[0], *(r for r in rows[1:] if r.label.startswith(prefix))]


def _mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (NaN where undefined)."""
    mean = sum(values) / len(values) if values else float("nan")
    sd = math.sqrt(sum((x - mean) ** 2 for x in values) / (len(values) - 1)) if len(values) > 1 else float("nan")
    return mean, sd


def replicate_table(show: list[dict[str, Any]], prefix: str = "rep-") -> str:
    """Each target's ratio [95% CI] and verdict per replicate (the main row, ``rep-*`` experiments); mean, spread."""
    reps = _replicates(show, prefix)
    header = ["target", "main run", *(r.label for r in reps[1:]), "mean", "sd", "min-max"]
    body = []
    for t in TARGETS:
        cells, ratios = [f"{t.metric} ({t.bound} x {t.reference})"], []
        for r in reps:
            j = r.targets.get(t.metric) or {}
            if j.get("ratio") is None:
                cells.append("-")
                continue
            ratios.append(float(j["ratio"]))
            cells.append(f"{j['ratio']:.3f} [{_num(j['lo'], 3)}, {_num(j['hi'], 3)}] {j['verdict']}")
        mean, sd = _mean_sd(ratios)
        span = f"{min(ratios):.3f}-{max(ratios):.3f}" if ratios else "-"
        body.append([*cells, _num(mean, 3), _num(sd, 3), span])
    return _table(header, body, 1)


def replicate_summary(show: list[dict[str, Any]], prefix: str = "rep-") -> str:
    """The README's short form: per target, each replicate's ratio, their mean +- sd, and in how many it holds."""
    reps = _replicates(show, prefix)
    body = []
    for t in TARGETS:
        judged = [r.targets[t.metric] for r in reps if (r.targets.get(t.metric) or {}).get("ratio") is not None]
        if not judged:
            continue
        ratios = [float(j["ratio"]) for j in judged]
        mean, sd = _mean_sd(ratios)
        held = sum(j["verdict"] == "holds" for j in judged)
        body.append([t.what, t.bound, ", ".join(f"{x:.3f}" for x in ratios), f"{mean:.3f} ± {_num(sd, 3)}",
                     f"{held} of {len(judged)}"])  # fmt: skip
    labels = ", ".join(["the main run", *(r.label for r in reps[1:])])
    intro = f"{len(reps)} runs ({labels}), from `regionroute replicates` (reports/replicates.md):"
    return intro + "\n\n" + _table(["target", "bound", "ratio per run", "mean ± sd", "holds in"], body, 2)


#: kind -> (title, intro, table function)
TABLES: dict[str, tuple[str, str, Any]] = {
    "ablations": ("Ablations", (
        "Generated by `regionroute ablations` from `dvc exp show --json`. Params: every key (of any params file) "
        "that differs between the rows. Each judged target's cell (Q1/Q2 only with a trained VLM judge): "
        "RegionRoute's mean (its ratio to the reference of the "
        "same run: the base, or the oracle for q1); `holds`: targets whose whole 95% interval clears "
        "(`metrics/targets.json`). `vs main`: the target metrics on which a row is worse (or better) by more than "
        f"{TOLERANCE:.0%} relative than the main row of its pairs (the first row evaluated on the same pairs)."
    ), ablation_table),
    "replicates": ("Replicates", (
        "Generated by `regionroute replicates` from `dvc exp show --json`: the main run and each `rep-*` "
        "experiment, worlds that differ in every random draw of the data and training (scenes, evaluation pairs, "
        "stylize and evaluation noise, the experts' training seed; the toy base and judges are shared: they never "
        "saw these scenes). Each cell: the target's ratio [95% paired bootstrap interval over the test images] "
        "and its verdict; then the mean, standard deviation and range of the ratios over the replicates."
    ), replicate_table),
}  # fmt: skip


REPLICATES_BEGIN = "<!-- replicates:begin (written by regionroute replicates --readme) -->"
REPLICATES_END = "<!-- replicates:end -->"


def write_table(
    kind: str, out: Path, repo: Path = Path("."), readme: Path | None = None, title: str | None = None
) -> Path:
    """``reports/ablations.md`` or ``reports/replicates.md`` from the repository's experiments; for the replicates,
    ``readme`` gets :func:`replicate_summary` between its replicate markers; ``title`` replaces the default one."""
    default_title, intro, table = TABLES[kind]
    title = title or default_title
    show = exp_show_json(repo)
    if readme is not None and kind == "replicates":
        from regionroute.report import update_readme

        update_readme(readme, replicate_summary(show), REPLICATES_BEGIN, REPLICATES_END)
    with atomic_path(out) as tmp:
        tmp.write_text(f"# {title}\n\n{intro}\n\n{table(show)}\n")
    return out
