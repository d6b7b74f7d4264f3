"""The ablation table from ``dvc exp show --json``: params from params.yaml only, metrics per experiment."""

from __future__ import annotations

import pytest

from regionroute.ablations import ablation_table
from regionroute.errors import UserError


def _state(rev: str, name: str | None, params: dict, score: dict | None, live: dict | None = None) -> dict:
    metrics = {"dvclive/train/metrics.json": {"data": live or {}}}
    if score is not None:
        metrics["metrics/score.json"] = {"data": score}
    return {"rev": rev, "name": name, "data": {"params": {"params.yaml": {"data": params}}, "metrics": metrics}}


def _params(focus: float, single: bool) -> dict:
    return {"loss": {"focus_weight": focus}, "lora": {"single_stream": single, "rank": 4}, "train": {"steps": 10}}


def test_rows_params_and_metrics_come_from_their_files():
    score = {"regionroute": {"rsm_text": 0.25, "mse_bg": 0.01}, "kontext": {"rsm_text": 0.2, "mse_bg": 0.04}}
    ws = _state("workspace", None, _params(0.1, True), score, live={"train": {"loss": 1.0}})
    ws["experiments"] = [
        {"name": "exp-a", "revs": [_state("a" * 40, "exp-a", _params(0.0, True), {"regionroute": {"rsm_text": 0.3}},
                                          live={"train": {"loss": 2.0}})]},
        {"name": "exp-b", "revs": [_state("b" * 40, "exp-b", _params(0.1, False), {"regionroute": {"mse_bg": 0.5}})]},
        {"name": "failed", "revs": [_state("c" * 40, "failed", _params(0.1, True), None)]},
    ]  # fmt: skip
    lines = ablation_table([ws]).splitlines()
    header = lines[0]
    assert "loss.focus_weight" in header and "lora.single_stream" in header
    assert "lora.rank" not in header and "train.steps" not in header  # equal in every row
    assert "train.loss" not in header  # a dvclive metric is never a param column
    rows = {line.split(" | ")[0][2:]: line for line in lines[2:]}
    assert set(rows) == {"workspace", "exp-a", "exp-b", "*base Kontext (workspace)*"}  # no metrics: no row
    assert "| exp-a | True | 0.0 | 0.3000 |" in rows["exp-a"]
    assert rows["exp-b"].endswith("| - | - | 0.5000 | - | - | - |")
    assert "0.2000" in rows["*base Kontext (workspace)*"]


def test_no_metrics_is_a_clear_error():
    with pytest.raises(UserError, match=r"metrics/score\.json"):
        ablation_table([_state("workspace", None, _params(0.1, True), None)])
