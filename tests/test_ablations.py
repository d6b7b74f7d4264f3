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
    score = {"regionroute": {"rsm_text": 0.25, "mse_bg": 0.01}, "base": {"rsm_text": 0.2, "mse_bg": 0.04}}
    ws = _state("workspace", None, _params(0.1, True), score, live={"train": {"loss": 1.0}})
    ws["experiments"] = [
        {"name": "exp-a", "revs": [_state("a" * 40, "exp-a", _params(0.0, True), {"regionroute": {"rsm_text": 0.3}},
                                          live={"train": {"loss": 2.0}})]},
        {"name": "exp-b", "revs": [_state("b" * 40, "exp-b", _params(0.1, False), {"regionroute": {"mse_bg": 0.5}})]},
        {"name": "failed", "revs": [_state("c" * 40, "failed", _params(0.1, True), None)]},
        {"name": "running", "revs": [{**_state("d" * 40, "running", _params(0.2, True), score),
                                      "data": {**ws["data"], "rev": "workspace"}}]},  # dvc shows the workspace's files
    ]  # fmt: skip
    lines = ablation_table([ws]).splitlines()
    header = lines[0]
    assert "loss.focus_weight" in header and "lora.single_stream" in header
    assert "lora.rank" not in header and "train.steps" not in header  # equal in every row
    assert "train.loss" not in header  # a dvclive metric is never a param column
    rows = {line.split(" | ")[0][2:]: line for line in lines[2:]}
    assert set(rows) == {"workspace", "exp-a", "exp-b", "*base Kontext (workspace)*"}  # no metrics / running: no row
    assert "| exp-a | True | 0.0 | 0.3000 |" in rows["exp-a"]
    assert rows["exp-b"].endswith("| - | - | 0.5000 | - | - | - | worse: MSE_bg |")  # 0.5 vs 0.01, computed
    assert rows["exp-a"].endswith("| not worse on any; better: RSM text |")  # 0.3 vs 0.25
    assert rows["workspace"].endswith("| (reference) |")
    assert "0.2000" in rows["*base Kontext (workspace)*"]


def test_no_metrics_is_a_clear_error():
    with pytest.raises(UserError, match=r"metrics/score\.json"):
        ablation_table([_state("workspace", None, _params(0.1, True), None)])


def test_an_unchanged_workspace_is_not_repeated():
    score = {"regionroute": {"rsm_text": 0.25}}
    ws, head = _state("workspace", None, _params(0.1, True), score), _state("e" * 40, "main", _params(0.1, True), score)
    head["experiments"] = [{"name": "x", "revs": [_state("f" * 40, "x", _params(0.0, True), score)]}]
    lines = ablation_table([ws, head]).splitlines()
    assert [line.split(" | ")[0][2:] for line in lines[2:]] == ["main", "x"]
    assert lines[0].endswith("| vs main |") and lines[3].endswith("| not worse on any |")


def test_rows_on_other_pairs_get_their_own_base_row():
    def score(base: float) -> dict:
        return {"regionroute": {"mse_bg": 0.01}, "base": {"mse_bg": base}}

    ws = _state("workspace", None, _params(0.1, True), score(0.08))
    ws["experiments"] = [
        {"name": "same-pairs", "revs": [_state("a" * 40, "same-pairs", _params(0.0, True), score(0.08))]},
        {"name": "seed-1", "revs": [_state("b" * 40, "seed-1", _params(0.1, False), score(0.07))]},
    ]
    labels = [line.split(" | ")[0][2:] for line in ablation_table([ws]).splitlines()[2:]]
    assert labels[-2:] == ["*base Kontext (workspace)*", "*base Kontext (seed-1)*"]
