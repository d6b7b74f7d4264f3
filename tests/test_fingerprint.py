"""Content keys (regionroute.fingerprint): bytes not paths, code keys in step with dvc.yaml."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml

from regionroute import infer, stylize, train
from regionroute.files import prepare_resumable_dir
from regionroute.fingerprint import ItemStore, model_digest, module_files, tensor_digest, tree_digest

ROOT = Path(__file__).resolve().parents[1]


def _dvc_code_deps(stage: str) -> set[Path]:
    """The regionroute/ python files a dvc.yaml stage depends on (directories expanded)."""
    entry = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]
    deps = entry.get("do", entry)["deps"]
    files: set[Path] = set()
    for dep in deps:
        if not dep.startswith("regionroute/"):
            continue
        path = ROOT / dep
        files.update(path.rglob("*.py") if path.is_dir() else [path])
    return {f.resolve() for f in files}


@pytest.mark.parametrize(("stage", "module"), [("stylize", stylize), ("train", train), ("infer", infer)])
def test_code_keys_cover_exactly_the_stage_deps_in_dvc_yaml(stage, module):
    """A resume key and DVC's own re-run decision look at the same code (train: plus the model card's)."""
    modules = module.CODE_MODULES + getattr(module, "EXPORT_MODULES", ())
    assert {f.resolve() for f in module_files(modules)} == _dvc_code_deps(stage)


def test_tree_digest_is_content_not_path(tmp_path):
    a = tmp_path / "a"
    (a / "sub").mkdir(parents=True)
    (a / "x.bin").write_bytes(b"one")
    (a / "sub" / "y.bin").write_bytes(b"two")
    b = tmp_path / "b"
    shutil.copytree(a, b)
    assert tree_digest(a) == tree_digest(b) == model_digest(str(a)).removeprefix("dir:")
    (b / "sub" / "y.bin").write_bytes(b"tw0")  # same size, other bytes
    assert tree_digest(a) != tree_digest(b)


def test_hub_ids_are_keyed_by_their_cached_commit_or_marked_unresolved():
    assert model_digest("nobody/not-a-cached-model") == "hub:nobody/not-a-cached-model@unresolved"


def test_tensor_digest_sees_values_dtypes_and_shapes():
    x = torch.arange(6.0)
    base = tensor_digest({"x": x})
    assert base == tensor_digest({"x": x.clone()})
    assert base != tensor_digest({"x": x.view(2, 3)})
    assert base != tensor_digest({"x": x.double()})
    y = x.clone()
    y[3] += 1e-6
    assert base != tensor_digest({"x": y})


def test_item_store_keeps_only_items_with_their_key_and_files(tmp_path):
    store = ItemStore(tmp_path)
    (tmp_path / "images").mkdir()
    for item in ("a", "b"):
        (tmp_path / "images" / f"{item}.png").write_bytes(b"x")
        store.mark(item, f"key-{item}")
    assert store.done("a", "key-a", ["images/a.png"]) and not store.done("a", "key-b")
    (tmp_path / "images" / "b.png").unlink()
    assert not store.done("b", "key-b", ["images/b.png"])
    assert store.prune({"b"}, ["images"]) == 1
    assert not (tmp_path / "images" / "a.png").exists() and not store.done("a", "key-a")


def test_a_changed_fingerprint_restarts_with_one_line_naming_what_changed(tmp_path, capsys):
    out = prepare_resumable_dir(tmp_path / "out", {"model": "m1", "params": {"steps": 4}})
    (out / "kept.png").write_bytes(b"x")
    prepare_resumable_dir(tmp_path / "out", {"model": "m1", "params": {"steps": 4}})
    assert (out / "kept.png").is_file() and capsys.readouterr().err == ""
    prepare_resumable_dir(tmp_path / "out", {"model": "m2", "params": {"steps": 4}})
    err = capsys.readouterr().err.strip().splitlines()
    assert not (out / "kept.png").exists()
    assert len(err) == 1 and "changed: model" in err[0] and "starting from scratch" in err[0]
