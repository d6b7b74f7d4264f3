"""The pipeline's graph, read statically from dvc.yaml (DVC's own index, nothing runs): what each change re-runs.

A params key re-runs the stages that list it (or its section) and everything downstream of them;
the end-to-end runs in tests/test_pipeline.py check one cold repro, one no-op and one experiment.
"""

from __future__ import annotations

from pathlib import Path

import networkx as nx
import pytest
from dvc.dependency.param import ParamsDependency
from dvc.repo import Repo

ROOT = Path(__file__).resolve().parents[1]
STYLIZE = {"stylize@pixel-art", "stylize@cyberpunk", "stylize@expressionism", "stylize@line-art"}
MAIN = {"sample@train", "sample@eval", *STYLIZE, "composite", "train", "infer@base", "infer@regionroute",
        "infer@oracle", "score", "report"}  # fmt: skip


@pytest.fixture(scope="module")
def graph() -> nx.DiGraph:
    with Repo(str(ROOT)) as repo:
        g = repo.index.graph
        return nx.relabel_nodes(g, {s: s.addressing for s in g.nodes})  # edges point upstream (stage -> its deps)


@pytest.fixture(scope="module")
def params_of() -> dict[str, set[str]]:
    with Repo(str(ROOT)) as repo:
        return {s.addressing: {k for d in s.deps if isinstance(d, ParamsDependency) for k in (d.params or [])}
                for s in repo.index.stages}  # fmt: skip


def reruns(graph: nx.DiGraph, params_of: dict[str, set[str]], key: str) -> set[str]:
    """The stages a change of the params key ``key`` re-runs."""
    direct = {s for s, keys in params_of.items() if any(key == k or key.startswith(k + ".") for k in keys)}
    return direct | {up for s in direct for up in nx.ancestors(graph, s)}


def test_the_main_pipeline_has_its_stages_and_the_toy_models_upstream(graph):
    assert set(graph.nodes) >= MAIN
    assert "toy/dvc.yaml:base" in nx.descendants(graph, "train")  # train depends on the toy base's output


@pytest.mark.parametrize(
    "key",
    ["loss.cover_weight", "loss.focus_weight", "loss.object_weight", "lora.rank", "lora.routing",
     "lora.double_stream", "train.steps", "train.learning_rate"],
)  # fmt: skip
def test_an_ablation_reruns_the_trained_model_and_what_reads_it_never_the_baselines(graph, params_of, key):
    assert reruns(graph, params_of, key) == {"train", "infer@regionroute", "score", "report"}


def test_data_changes_reach_exactly_their_consumers(graph, params_of):
    assert reruns(graph, params_of, "composite.method") == MAIN - {"sample@train", "sample@eval"} - {
        s for s in MAIN if s.startswith("stylize")
    }
    stylize = reruns(graph, params_of, "stylize.seed")
    assert "infer@oracle" in stylize and "train" in stylize and "sample@eval" not in stylize
    assert reruns(graph, params_of, "data.splits.eval.num") == {"sample@eval"} | {
        s for s in MAIN if s.startswith(("stylize", "composite", "train", "infer", "score", "report"))
    }
    assert reruns(graph, params_of, "score.vlm") == {"score", "report"}


def test_the_baselines_do_not_depend_on_the_trained_model(graph):
    for stage in ("infer@base", "infer@oracle"):
        assert "train" not in nx.descendants(graph, stage)
    assert "train" in nx.descendants(graph, "infer@regionroute")
