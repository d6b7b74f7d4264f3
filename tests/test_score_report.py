"""Stages ``score`` and ``report`` on a hand-made eval set: known answers, determinism."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from regionroute.config import ScoreConfig
from regionroute.files import read_json, write_image, write_jsonl, write_mask
from regionroute.report import TINY_NOTE
from stages import report, score
from tests.conftest import run_stage


@pytest.fixture(scope="module")
def eval_set(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    """Two pairs; method 'oracle' = pseudo-GT (background exact), 'global' = edited everywhere."""
    root = tmp_path_factory.mktemp("score")
    rng = np.random.default_rng(0)
    rows = []
    methods = {"oracle": root / "oracle", "global": root / "global"}
    manifests: dict[str, list] = {m: [] for m in methods}
    for i, area in enumerate((500.0, 20000.0)):
        original = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
        mask = np.zeros((64, 64), bool)
        mask[10:40, 12:44] = True
        pgt = original.copy()
        pgt[mask] = 255 - pgt[mask]
        write_image(root / f"o{i}.png", original)
        write_mask(root / f"m{i}.png", mask)
        write_image(root / f"p{i}.png", pgt)
        rid = f"{i:03d}_pixel-art"
        rows.append({"id": rid, "sample_id": f"{i:03d}", "image_id": i, "style": "pixel-art", "object": "dog",
                     "original": f"o{i}.png", "mask": f"m{i}.png", "pseudo_gt": f"p{i}.png", "area": area,
                     "area_frac": 0.23})  # fmt: skip
        edited = {"oracle": pgt, "global": np.clip(pgt.astype(int) + 40, 0, 255).astype(np.uint8)}
        for m, d in methods.items():
            write_image(d / "images" / f"{rid}.png", edited[m])
            manifests[m].append({"id": rid, "sample_id": f"{i:03d}", "style": "pixel-art", "object": "dog",
                                 "image": f"images/{rid}.png", "attention": None})  # fmt: skip
    for m, d in methods.items():
        write_jsonl(d / "manifest.jsonl", manifests[m])
    write_jsonl(root / "manifest.jsonl", rows)
    return root / "manifest.jsonl", methods


def _score(params_file, eval_set, out: Path, capsys) -> None:
    records, methods = eval_set
    params = params_file(data={"styles": ["pixel-art", "line-art"]})
    argv = ["--params", str(params), "--records", str(records), "--per-sample", str(out / "per_sample.csv"),
            "--by-size", str(out / "by_size.csv"), "--metrics", str(out / "score.json")]  # fmt: skip
    for m, d in methods.items():
        argv += ["--method", m, str(d)]
    code, err = run_stage(score.main, argv, capsys)
    assert code == 0, err


def test_score_stage_known_answers(params_file, eval_set, tmp_path, capsys):
    import pandas as pd

    _score(params_file, eval_set, tmp_path, capsys)
    metrics = read_json(tmp_path / "score.json")
    assert set(metrics) == {"oracle", "global"} and metrics["oracle"]["n"] == 2
    assert metrics["oracle"]["mse_bg"] == 0 and metrics["global"]["mse_bg"] > 0.01
    assert metrics["oracle"]["lpips_bg"] < metrics["global"]["lpips_bg"]
    assert metrics["oracle"]["rsm_image"] == pytest.approx(1.0, abs=1e-5)
    for q in ("q1", "q2", "q3", "q4"):
        assert 0 <= metrics["global"][q] <= 1
    per = pd.read_csv(tmp_path / "per_sample.csv")
    assert len(per) == 4 and set(per["size"]) == {"small", "large"}  # 500 < 32^2 <= ... 20000 >= 96^2
    assert per["attn_mass_in"].isna().all()  # no attention maps for these methods
    by_size = pd.read_csv(tmp_path / "by_size.csv")
    assert set(by_size["size"]) == {"small", "medium", "large"}


def _report(params, eval_set, scores: Path, out: Path, capsys, readme: Path | None = None) -> None:
    records, methods = eval_set
    argv = ["--params", str(params), "--per-sample", str(scores / "per_sample.csv"), "--by-size",
            str(scores / "by_size.csv"), "--records", str(records), "--out", str(out), "--targets",
            str(out / "targets.json")]  # fmt: skip
    argv += ["--readme", str(readme)] if readme else []
    for m, d in methods.items():
        argv += ["--method", m, str(d)]
    code, err = run_stage(report.main, argv, capsys)
    assert code == 0, err


def test_report_is_generated_from_the_scores_and_byte_identical(params_file, eval_set, tmp_path, capsys):
    _score(params_file, eval_set, tmp_path, capsys)
    params = params_file(data={"styles": ["pixel-art", "line-art"]})
    for name in ("a", "b"):
        _report(params, eval_set, tmp_path, tmp_path / name, capsys)
    md = (tmp_path / "a" / "results.md").read_text()
    assert md == (tmp_path / "b" / "results.md").read_text()
    assert md.startswith("# RegionRoute results\n\n" + TINY_NOTE)  # tiny params use tiny models
    mse = read_json(tmp_path / "score.json")["global"]["mse_bg"]
    assert f"{mse:.5f} [" in md  # the mean of the per-sample table, with its interval
    assert "oracle (GT mask) (uses the GT mask: upper bound)" in md
    for fig in ("grid.png",):
        assert (tmp_path / "a" / "figures" / fig).read_bytes() == (tmp_path / "b" / "figures" / fig).read_bytes()


def test_score_config_rejects_bad_template():
    from regionroute.errors import ConfigError

    with pytest.raises(ConfigError, match=r"score\.template"):
        ScoreConfig(template="an image")


def test_the_toy_report_judges_the_targets_and_fills_the_readme(params_file, eval_set, tmp_path, capsys):
    """A toy-world report: the targets table and metrics/targets.json, written between the README's markers."""
    import pandas as pd

    from regionroute.report import README_BEGIN, README_END, world_of

    _score(params_file, eval_set, tmp_path, capsys)
    per = pd.read_csv(tmp_path / "per_sample.csv", dtype={"sample_id": str})
    ours = per[per["method"] == "global"].assign(method="regionroute")
    ours["mse_bg"] = per[per["method"] == "global"]["mse_bg"].to_numpy() * 0.1
    pd.concat([per.assign(method=per["method"].replace({"global": "base"})), ours]).to_csv(
        tmp_path / "per_sample.csv", index=False
    )
    readme = tmp_path / "README.md"
    readme.write_text(f"# X\n\n{README_BEGIN}\nSTALE-TEXT\n{README_END}\n\nmore\n")
    params = params_file(models={"kontext": "toy", "dtype": "float32", "device": "auto"},
                         score={"clip": "toy", "lpips": "alex", "vlm": "tiny"})  # fmt: skip
    _report(params, eval_set, tmp_path, tmp_path / "r", capsys, readme)
    targets = read_json(tmp_path / "r" / "targets.json")
    assert targets["mse_bg"]["ratio"] == pytest.approx(0.1, abs=1e-3) and targets["mse_bg"]["verdict"] == "holds"
    text = readme.read_text()
    assert "STALE-TEXT" not in text and text.endswith(f"{README_END}\n\nmore\n") and "| background MSE" in text
    results = (tmp_path / "r" / "results.md").read_text()
    assert "The toy world's targets" in results
    assert "q1" not in targets and "q2" not in targets and "Q1 and Q2 are not judged" in text  # random VLM
    assert "> Not meaningful here" in results
    assert world_of("toy", "toy", "alex", "tiny") == "toy" and world_of("tiny", "tiny", "tiny", "tiny") == "tiny"
    assert world_of("black-forest-labs/FLUX.1-Kontext-dev", "ViT-L-14/openai", "alex", "Qwen/x") == "real"
