"""stylize, infer and score under 2 processes give what 1 process gives (docs/scaling.md).

Each test runs the stage once in this process (plain ``python`` semantics) and once as
``python -m stages.<name>`` with a 2-process accelerate config (the stage re-launches
itself under ``accelerate launch``: 2 CPU processes, gloo), on the same inputs, and
compares manifests, markers (content keys), images / maps (float noise from the batch
composition allowed) and per-sample scores. The stylize eval split has ONE item for the
two processes (N larger than the number of items).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from regionroute.files import read_image, read_json, read_jsonl, write_image, write_json, write_jsonl, write_mask
from stages import infer, sample, score, stylize
from tests.conftest import TINY_DATA, run_stage, sample_argv
from tests.test_distributed_launch import run_launched

pytestmark = pytest.mark.distributed

TINY = {"kontext": "tiny", "dtype": "float32", "device": "cpu"}
STYLES = ["pixel-art", "line-art"]


def _markers(out: Path) -> dict[str, str]:
    return {p.stem: read_json(p)["key"] for p in sorted((out / "items").glob("*.json"))}


def _assert_images_close(a: Path, b: Path, names: list[str], levels: int = 2) -> None:
    for name in names:
        diff = np.abs(read_image(a / name).astype(int) - read_image(b / name).astype(int)).max()
        assert diff <= levels, f"{name}: 1 vs 2 processes differ by {diff} levels"


def test_stylize_two_processes_equal_one(params_file, tmp_path, capsys):
    splits = {"train": {"coco": "train", "num": 3}, "eval": {"coco": "val", "num": 1}}  # eval: 1 item, 2 ranks
    # batch 4: the 3 train images are one batch, whole on one rank, whatever the number of processes
    params = params_file(models=TINY, data={"splits": splits, "styles": STYLES}, stylize={"steps": 2, "batch_size": 4})
    for split, coco in (("train", "train"), ("eval", "val")):
        code, err = run_stage(
            sample.main, sample_argv(params, TINY_DATA, tmp_path / "samples" / split, split, coco), capsys
        )
        assert code == 0, err
    argv = ["--params", str(params), "--style", "pixel-art", "--samples", str(tmp_path / "samples")]
    code, err = run_stage(stylize.main, [*argv, "--out", str(tmp_path / "one")], capsys)
    assert code == 0, err
    proc = run_launched("stages.stylize", [*argv, "--out", str(tmp_path / "two")], tmp_path)
    assert "generated 4 images" in proc.stdout and proc.stdout.count("generated") == 1  # rank 0 reports, once
    for split, n in (("train", 3), ("eval", 1)):
        one, two = tmp_path / "one" / split, tmp_path / "two" / split
        assert (one / "manifest.jsonl").read_text() == (two / "manifest.jsonl").read_text()
        assert read_json(one / "fingerprint.json") == read_json(two / "fingerprint.json")
        assert _markers(one) == _markers(two) and len(_markers(two)) == n
        _assert_images_close(one, two, [r["stylized"] for r in read_jsonl(one / "manifest.jsonl")])
        assert not list(two.rglob(".*.tmp*"))  # no temporary file left by any rank
    # content keys do not depend on the process count: one process keeps every 2-process image
    images = sorted((tmp_path / "two").rglob("images/*.png"))
    before = [p.stat().st_mtime_ns for p in images]
    code, err = run_stage(stylize.main, [*argv, "--out", str(tmp_path / "two")], capsys)
    assert code == 0, err
    assert [p.stat().st_mtime_ns for p in images] == before and len(images) == 4


@pytest.fixture(scope="module")
def eval_set(tmp_path_factory) -> tuple[Path, Path]:
    """Three samples x two styles (6 pairs) and a 'trained' model with nonzero experts."""
    import torch

    from regionroute.config import ModelsConfig
    from regionroute.lora_moe import LoraConfig, inject_lora_moe, save_moe
    from regionroute.models.kontext import load_kontext

    root = tmp_path_factory.mktemp("eval")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(3):
        original = rng.integers(0, 255, (128, 128, 3), dtype=np.uint8)
        mask = np.zeros((128, 128), bool)
        mask[20 + 10 * i : 70, 30:90] = True
        write_image(root / f"o{i}.png", original)
        write_mask(root / f"m{i}.png", mask)
        for style in STYLES:
            pgt = original.copy()
            pgt[mask] = 255 - pgt[mask]
            write_image(root / f"p{i}_{style}.png", pgt)
            rows.append({"id": f"{i:03d}_{style}", "sample_id": f"{i:03d}", "image_id": i, "style": style,
                         "object": "dog", "original": f"o{i}.png", "mask": f"m{i}.png",
                         "pseudo_gt": f"p{i}_{style}.png", "area": 500.0 + 9000 * i, "area_frac": 0.18})  # fmt: skip
    write_jsonl(root / "manifest.jsonl", rows)
    model = tmp_path_factory.mktemp("model")
    pipe = load_kontext(ModelsConfig(**TINY))
    moe = inject_lora_moe(pipe.transformer, LoraConfig(), STYLES)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in moe.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.5)
    save_moe(moe, model / "moe")
    write_json(model / "regionroute.json", {"base_model": "tiny", "styles": STYLES,
                                            "train": {"max_sequence_length": 32}, "latent_hw": [16, 16]})  # fmt: skip
    return root / "manifest.jsonl", model


def test_infer_two_processes_equal_one(params_file, eval_set, tmp_path, capsys):
    records, model = eval_set
    # 6 pairs, batch 2: per style batches of 2 and 1, two whole batches per rank
    params = params_file(models=TINY, data={"styles": STYLES}, train={"max_sequence_length": 32},
                         infer={"steps": 3, "attention_steps": [1, 3], "batch_size": 2})  # fmt: skip
    argv = ["--params", str(params), "--method", "regionroute", "--records", str(records), "--model", str(model)]
    code, err = run_stage(infer.main, [*argv, "--out", str(tmp_path / "one")], capsys)
    assert code == 0, err
    run_launched("stages.infer", [*argv, "--out", str(tmp_path / "two")], tmp_path)
    one, two = tmp_path / "one", tmp_path / "two"
    assert (one / "manifest.jsonl").read_text() == (two / "manifest.jsonl").read_text()
    assert read_json(one / "fingerprint.json") == read_json(two / "fingerprint.json")
    assert _markers(one) == _markers(two) and len(_markers(two)) == 6
    rows = read_jsonl(one / "manifest.jsonl")
    _assert_images_close(one, two, [r["image"] for r in rows])
    for r in rows:
        with np.load(one / r["attention"]) as a, np.load(two / r["attention"]) as b:
            np.testing.assert_allclose(a["maps"], b["maps"], rtol=1e-4, atol=1e-7)


def _scored(tmp: Path) -> tuple[Path, dict[str, Path]]:
    """Pairs scored by two 'methods' of different lengths, so a rank's slice spans both methods."""
    rng = np.random.default_rng(1)
    rows, methods = [], {"oracle": tmp / "oracle", "global": tmp / "global"}
    manifests: dict[str, list] = {m: [] for m in methods}
    for i, area in enumerate((500.0, 5000.0, 20000.0)):
        original = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
        mask = np.zeros((64, 64), bool)
        mask[10:40, 12 + 4 * i : 44] = True
        pgt = original.copy()
        pgt[mask] = 255 - pgt[mask]
        write_image(tmp / f"o{i}.png", original)
        write_mask(tmp / f"m{i}.png", mask)
        write_image(tmp / f"p{i}.png", pgt)
        rid = f"{i:03d}_pixel-art"
        rows.append({"id": rid, "sample_id": f"{i:03d}", "image_id": i, "style": "pixel-art", "object": "dog",
                     "original": f"o{i}.png", "mask": f"m{i}.png", "pseudo_gt": f"p{i}.png", "area": area,
                     "area_frac": 0.2})  # fmt: skip
        edited = {"oracle": pgt, "global": np.clip(pgt.astype(int) + 40 * (i + 1), 0, 255).astype(np.uint8)}
        for m, d in methods.items():
            if m == "oracle" and i == 2:
                continue  # oracle: 2 rows, global: 3 rows -> ranks get [oracle, oracle, global], [global, global]
            write_image(d / "images" / f"{rid}.png", edited[m])
            manifests[m].append({"id": rid, "sample_id": f"{i:03d}", "style": "pixel-art", "object": "dog",
                                 "image": f"images/{rid}.png", "attention": None})  # fmt: skip
    for m, d in methods.items():
        write_jsonl(d / "manifest.jsonl", manifests[m])
    write_jsonl(tmp / "manifest.jsonl", rows)
    return tmp / "manifest.jsonl", methods


def test_score_two_processes_equal_one(params_file, tmp_path, capsys):
    records, methods = _scored(tmp_path)
    tiny_scorers = {"clip": "tiny", "lpips": "tiny", "vlm": "tiny", "device": "cpu", "batch_size": 4}
    params = params_file(data={"styles": STYLES}, score=tiny_scorers)
    argv = ["--params", str(params), "--records", str(records)]
    for m, d in methods.items():
        argv += ["--method", m, str(d)]
    outs = {}
    for n in ("one", "two"):
        out = tmp_path / n
        files = ["--per-sample", str(out / "per_sample.csv"), "--by-size", str(out / "by_size.csv"),
                 "--metrics", str(out / "score.json")]  # fmt: skip
        if n == "one":
            code, err = run_stage(score.main, [*argv, *files], capsys)
            assert code == 0, err
        else:
            run_launched("stages.score", [*argv, *files], tmp_path)
        outs[n] = out
    one = pd.read_csv(outs["one"] / "per_sample.csv")
    two = pd.read_csv(outs["two"] / "per_sample.csv")
    assert len(one) == 5 and list(one.columns) == list(two.columns)
    assert one[["method", "id", "size"]].equals(two[["method", "id", "size"]])  # same rows, same order
    numeric = one.select_dtypes("number").columns
    np.testing.assert_allclose(one[numeric].to_numpy(float), two[numeric].to_numpy(float), rtol=1e-4, atol=1e-6)
    m1, m2 = read_json(outs["one"] / "score.json"), read_json(outs["two"] / "score.json")
    assert m1.keys() == m2.keys() and all(m1[k]["n"] == m2[k]["n"] for k in m1)
    for k in m1:
        np.testing.assert_allclose([m1[k][c] for c in sorted(m1[k])], [m2[k][c] for c in sorted(m1[k])], rtol=1e-4)
