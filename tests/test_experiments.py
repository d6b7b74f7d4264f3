"""Ablation and replicate tables from ``dvc exp show --json``: every differing param; rows compared on their pairs."""

from __future__ import annotations

import pytest

from regionroute.errors import UserError
from regionroute.experiments import ablation_table, replicate_summary, replicate_table


def _state(rev: str, name: str | None, params: dict, score: dict | None, targets: dict | None = None,
           toy: dict | None = None) -> dict:  # fmt: skip
    metrics = {"dvclive/train/metrics.json": {"data": {"train": {"loss": 1.0}}}}
    if score is not None:
        metrics["metrics/score.json"] = {"data": score}
    if targets is not None:
        metrics["metrics/targets.json"] = {"data": targets}
    files = {"params.yaml": {"data": params}, "toy/params.yaml": {"data": toy or {"scenes": {"seed": 0}}}}
    return {"rev": rev, "name": name, "data": {"params": files, "metrics": metrics}}


def _params(focus: float = 0.1, steps: int = 20, seed: int = 0) -> dict:
    return {"loss": {"focus_weight": focus}, "infer": {"steps": steps}, "train": {"seed": seed, "lr": 1}}


def _score(ours: float, base: float = 0.08) -> dict:
    return {"regionroute": {"mse_bg": ours, "rsm_text": 0.6}, "base": {"mse_bg": base, "rsm_text": 0.7}}


def _targets(ratio: float, verdict: str) -> dict:
    return {"mse_bg": {"ratio": ratio, "lo": ratio - 0.05, "hi": ratio + 0.05, "verdict": verdict}}


def test_every_differing_param_of_every_section_and_file_is_shown():
    ws = _state("workspace", None, _params(), _score(0.01), _targets(0.125, "holds"))
    ws["experiments"] = [
        {"name": "steps-40", "revs": [_state("a" * 40, "steps-40", _params(steps=40), _score(0.02, 0.09))]},
        {"name": "no-focus", "revs": [_state("b" * 40, "no-focus", _params(focus=0.0), _score(0.02),
                                             _targets(0.25, "holds"))]},
        {"name": "rep-1", "revs": [_state("c" * 40, "rep-1", _params(seed=1), _score(0.01, 0.07),
                                          toy={"scenes": {"seed": 1}})]},
        {"name": "failed", "revs": [_state("d" * 40, "failed", _params(), None)]},
    ]  # fmt: skip
    lines = ablation_table([ws]).splitlines()
    header = lines[0]
    for key in ("infer.steps", "loss.focus_weight", "train.seed", "toy/params.yaml:scenes.seed"):
        assert key in header
    assert "train.lr" not in header and "train.loss" not in header  # equal everywhere; a metric is never a param
    rows = {line.split(" | ")[0][2:]: line for line in lines[2:]}
    assert set(rows) == {"workspace", "steps-40", "no-focus", "rep-1"}
    assert rows["workspace"].endswith("| 0.0100 (0.12x) | 1/1 | (main row of these pairs) |")
    assert "rsm_text" not in header  # a target no row judged (Q1/Q2 with the random VLM) gets no column
    assert rows["no-focus"].endswith("| worse: mse_bg |")  # same pairs as the workspace: compared with it
    # other pairs (another base): never marked better or worse than the workspace; each is its pairs' main row
    assert rows["steps-40"].endswith("| (main row of these pairs) |")
    assert rows["rep-1"].endswith("| (main row of these pairs) |")


def test_no_metrics_is_a_clear_error():
    with pytest.raises(UserError, match=r"metrics/score\.json"):
        ablation_table([_state("workspace", None, _params(), None)])


def test_replicates_give_each_ratio_and_the_spread():
    ws = _state("workspace", None, _params(), _score(0.01), _targets(0.2, "holds"))
    ws["experiments"] = [
        {"name": f"rep-{i}", "revs": [_state(str(i) * 40, f"rep-{i}", _params(seed=i), _score(0.01, 0.05 + i),
                                             _targets(r, v))]}
        for i, (r, v) in ((1, (0.4, "holds")), (2, (0.6, "fails")))
    ]  # fmt: skip
    ws["experiments"].append(
        {"name": "other", "revs": [_state("e" * 40, "x", _params(focus=0), _score(0.5), _targets(9, "f"))]}
    )
    table = replicate_table([ws])
    line = next(x for x in table.splitlines() if x.startswith("| mse_bg"))
    assert "0.200 [0.150, 0.250] holds" in line and "0.600 [0.550, 0.650] fails" in line and "9.0" not in line
    assert line.endswith("| 0.400 | 0.200 | 0.200-0.600 |")  # mean, sample sd, range of 0.2, 0.4, 0.6
    summary = replicate_summary([ws])
    line = next(x for x in summary.splitlines() if x.startswith("| background MSE"))
    assert line.endswith("| <= 0.5 | 0.200, 0.400, 0.600 | 0.400 ± 0.200 | 2 of 3 |")
    assert summary.startswith("3 runs (the main run, rep-1, rep-2)")
