"""``regionroute check`` and ``preflight``: findings for models, data, memory, settings (regionroute.check)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

import regionroute.check as chk
from regionroute.check import check, device, format_report, preflight
from regionroute.check.models import check_clip, check_kontext, check_lpips, check_vlm
from regionroute.cli import main
from regionroute.errors import UserError
from regionroute.models import Reference, parse_reference, resolve_reference
from tests.conftest import ROOT, TINY_DATA

KONTEXT = "black-forest-labs/FLUX.1-Kontext-dev"
COMMIT = "0" * 40


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch, regionroute_cache: Path):
    """Empty Hugging Face and torch hub caches, regionroute's (content-keyed) cache of the session, run from
    the repository root."""
    from huggingface_hub import constants

    monkeypatch.setenv("XDG_CACHE_HOME", str(regionroute_cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch"))
    monkeypatch.chdir(ROOT)
    return tmp_path


def cache_file(cache: Path, repo: str, rel: str, content: bytes = b"") -> Path:
    """Put one file of ``repo`` into a Hugging Face cache laid out as ``hf download`` leaves it."""
    repo_dir = cache / f"models--{repo.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(COMMIT)
    path = repo_dir / "snapshots" / COMMIT / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


TINY_PARAMS = ROOT / "configs" / "tiny.yaml"  # the tiny random models: the memory arithmetic the tests pin


def write_params(tmp_path: Path, base: Path = TINY_PARAMS, **sections: dict) -> Path:
    raw = yaml.safe_load(base.read_text())
    for name, values in sections.items():
        raw[name].update(values)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def errors(report) -> dict[str, str]:
    return {f.key: f.line() for f in report.problems}


# -- the default configuration and the toy world pass --------------------------------------------------
def test_default_params_pass(capsys):
    assert main(["check", "--params", str(ROOT / "params.yaml"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert not [f for f in out["findings"] if f["level"] == "error"]
    assert set(out["accounting"]["stages"]) == {"stylize", "train", "infer", "score"}
    assert all(s["total"] > 0 for s in out["accounting"]["stages"].values())
    assert main(["check"]) == 0  # params.yaml of the working directory, human output
    text = capsys.readouterr().out
    assert "| stage | weights |" in text and "0 error(s)" in text


@pytest.fixture
def toy_models(tmp_path: Path, monkeypatch) -> Path:
    """Stand-ins for the committed toy models (toy/models/kontext, toy/models/clip): same layouts."""
    from regionroute import models
    from regionroute.tiny.clip import save_tiny_clip
    from regionroute.tiny.kontext import save_tiny_kontext

    root = tmp_path / "toy" / "models"
    save_tiny_kontext(root / "kontext")
    save_tiny_clip(root / "clip")
    monkeypatch.setattr(models, "REPO_ROOT", tmp_path)
    return root


def test_toy_world_passes_and_missing_files_are_named(tmp_path, toy_models):
    params = write_params(tmp_path, models={"kontext": "toy"}, score={"clip": "toy"}, data={"root": str(TINY_DATA)})
    report = check(params)
    assert not report.problems, format_report(report)
    assert report.accounting.sources["kontext"].startswith("toy")
    (toy_models / "kontext" / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    (toy_models / "clip" / "open_clip_model.safetensors").unlink()
    found = errors(check(params, activations=False))
    assert "transformer/diffusion_pytorch_model.safetensors" in found["models.kontext"]
    assert "toy" in found["models.kontext"] and "open_clip_model.safetensors" in found["score.clip"]


# -- hub models: the cache, and the command that fills it -------------------------------------------------
def test_paper_models_and_data_missing_are_named_with_their_fix():
    report = check(ROOT / "configs" / "paper.yaml", activations=False)
    found = errors(report)
    assert f"hf download {KONTEXT}" in found["models.kontext"] and "licence" in found["models.kontext"]
    assert "is not in the local Hugging Face cache" in found["models.kontext"]
    assert "hf download timm/vit_large_patch14_clip_224.openai open_clip_model.safetensors" in found["score.clip"]
    assert "hf download Qwen/Qwen2.5-VL-7B-Instruct" in found["score.vlm"]
    assert "instances_train2017.json" in found["data.splits.train"]
    assert "val2017/" in found["data.splits.eval"]
    lpips = next(f for f in report.findings if f.key == "score.lpips")
    assert lpips.level in ("ok", "warning") and (lpips.level == "ok" or "regionroute fetch-lpips" in lpips.fix)


def test_models_found_in_the_hub_cache(isolated):
    from regionroute.tiny.kontext import save_tiny_kontext

    cache = isolated / "hf"
    snapshot = cache_file(cache, "org/kontext-mini", "model_index.json").parent
    save_tiny_kontext(snapshot)
    assert check_kontext("org/kontext-mini").level == "ok"
    (snapshot / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    assert "vae/diffusion_pytorch_model.safetensors" in check_kontext("org/kontext-mini").what

    assert check_clip("ViT-L-14/openai").level == "error"
    cache_file(cache, "timm/vit_large_patch14_clip_224.openai", "open_clip_model.safetensors")
    assert check_clip("ViT-L-14/openai").level == "ok"

    vlm = "Qwen/Qwen2.5-VL-7B-Instruct"
    for rel in ("config.json", "tokenizer_config.json", "preprocessor_config.json", "model-00001-of-00002.safetensors"):
        cache_file(cache, vlm, rel, b"{}")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    cache_file(cache, vlm, "model.safetensors.index.json", json.dumps(index).encode())
    finding = check_vlm(vlm)
    assert finding.level == "error" and "model-00002-of-00002.safetensors" in finding.what
    assert "model-00001" not in finding.what
    cache_file(cache, vlm, "model-00002-of-00002.safetensors")
    assert check_vlm(vlm).level == "ok"


def test_lpips_weights_are_a_warning_until_fetched(isolated, monkeypatch):
    from regionroute import models

    monkeypatch.setattr(models, "cache_dir", lambda: isolated / "rr")
    assert check_lpips("tiny").level == "ok"
    missing = check_lpips("alex")
    assert missing.level == "warning" and "regionroute fetch-lpips --net alex" in missing.fix
    weights = isolated / "rr" / "lpips" / "alex.safetensors"
    weights.parent.mkdir(parents=True)
    weights.touch()
    assert check_lpips("alex").level == "ok"
    assert check_lpips("squeeze").level == "warning"
    assert check_lpips("resnet").level == "error"


def test_bad_references():
    assert "no such directory" in check_kontext("./no/such/dir").what
    assert "not a hub id" in check_kontext("a/b/c").what
    assert "unknown open_clip model" in check_clip("ViT-Q-99/openai").what
    assert "neither a pretrained tag" in check_clip("ViT-L-14/no-such-tag").what


# -- model references: one parser for the loaders and the check ------------------------------------------
@pytest.mark.parametrize(
    ("ref", "open_clip", "expected"),
    [
        ("tiny", False, Reference("tiny", "tiny")),
        ("models/flux", False, Reference("dir", "models/flux", path=Path("models/flux"))),  # models/ is here: a path
        ("./models/flux", False, Reference("dir", "./models/flux", path=Path("models/flux"))),
        ("org/name", False, Reference("hub", "org/name", repo="org/name")),  # no org/ here: a hub id
        ("ViT-L-14/openai", True, Reference("open_clip", "ViT-L-14/openai")),
        ("ViT-B-32//ckpt/file.pt", True, Reference("open_clip", "ViT-B-32//ckpt/file.pt")),  # a checkpoint file
        ("hf-hub:org/repo", True, Reference("hub", "hf-hub:org/repo", repo="org/repo")),
        ("models/flux", True, Reference("dir", "models/flux", path=Path("models/flux"))),
    ],
)  # fmt: skip
def test_parse_reference(tmp_path, monkeypatch, ref, open_clip, expected):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "flux").mkdir(parents=True)
    assert parse_reference(ref, "kontext", open_clip=open_clip) == expected


@pytest.mark.parametrize("ref", ["models/none", "./x", "models/flux/none"])
def test_a_relative_path_that_does_not_exist_is_a_missing_directory_not_a_hub_id(tmp_path, monkeypatch, ref):
    """``models/none`` beside an existing ``models/``: the loaders and the check say 'no such directory'."""

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "flux").mkdir(parents=True)
    finding = check_kontext(ref)
    assert finding.level == "error" and finding.what == f"model reference {ref!r}: no such directory"
    assert "hf download" not in finding.fix and "Hugging Face" not in finding.what
    assert check_vlm(ref).what == finding.what and check_clip(ref).what == finding.what
    with pytest.raises(UserError, match="no such directory"):
        resolve_reference(ref, "kontext", lambda path: None, "1")
    with pytest.raises(UserError, match="no such directory"):
        parse_reference(ref, "clip", open_clip=True)


def test_file_and_toy_references(tmp_path, monkeypatch):
    from regionroute import models

    monkeypatch.chdir(tmp_path)
    (tmp_path / "weights.safetensors").touch()
    assert (
        check_kontext("weights.safetensors").what
        == "model reference 'weights.safetensors': is a file, expected a model directory"
    )
    monkeypatch.setattr(models, "REPO_ROOT", tmp_path)  # the loaders' side: tests/test_toy_base.py
    missing = check_kontext("toy")
    assert "toy/models/kontext does not exist" in missing.what and "dvc repro --force toy/dvc.yaml" in missing.what
    (tmp_path / "toy" / "models" / "kontext").mkdir(parents=True)
    assert "lacks model_index.json" in check_kontext("toy").what


# -- data --------------------------------------------------------------------------------------------------
def test_coco_layout_and_counts(tmp_path, tiny_data_copy):
    params = write_params(tmp_path, data={"root": str(tiny_data_copy)})
    (tiny_data_copy / "annotations" / "captions_val.json").unlink()
    next((tiny_data_copy / "train").iterdir()).unlink()
    found = errors(check(params, activations=False))
    assert "captions_val.json" in found["data.splits.eval"]
    assert "1 of 24 annotated images are missing" in found[str(tiny_data_copy / "train")]
    splits = {"train": {"coco": "train", "num": 99}, "eval": {"coco": "val", "num": 6}}
    params = write_params(tmp_path, data={"root": str(TINY_DATA), "splits": splits})
    found = errors(check(params, activations=False))
    assert (
        "99 pairs asked" in found["data.splits.train.num"]
        and "24 images with a non-crowd" in found["data.splits.train.num"]
    )


# -- device, memory, settings -----------------------------------------------------------------------------
def test_memory_shortfall_is_an_error_per_stage(tmp_path, monkeypatch):
    monkeypatch.setattr(device, "free_bytes", lambda kind: (2**20, "free in the test"))
    found = errors(check(TINY_PARAMS))
    for stage in ("stylize", "train", "infer", "score"):
        assert found[stage].startswith(f"error: {stage}: needs ") and "1 MiB free in the test" in found[stage]
        assert "the weights alone need" in found[stage]
    monkeypatch.setattr(device, "free_bytes", lambda kind: (4 * 2**20, "free in the test"))
    found = errors(check(TINY_PARAMS))
    assert "lower stylize.batch_size" in found["stylize"]
    assert "encoding the dataset needs" in found["train"]  # the tiny VAE pass on 8 images is its peak
    # a training phase larger than the encoding phase: the checkpointing switch is the suggested fix
    params = write_params(tmp_path, train={"gradient_checkpointing": False, "batch_size": 64})
    train = check(params).accounting.stages["train"]
    assert train.weights + train.trainable + train.activations > train.detail["encode_phase"] + 2**20
    monkeypatch.setattr(device, "free_bytes", lambda kind: (train.detail["encode_phase"] + 2**20, "free"))
    assert "set train.gradient_checkpointing: true" in errors(check(params))["train"]


def test_cuda_asked_without_cuda(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    params = write_params(tmp_path, models={"device": "cuda"})
    found = errors(check(params, activations=False))
    assert "'cuda' requested but no CUDA device is available" in found["models.device"]


def test_adamw8bit_needs_bitsandbytes_and_cuda(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_bnb(name, *args, **kwargs):
        if name == "bitsandbytes":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_bnb)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    params = write_params(tmp_path, train={"optimizer": "adamw8bit"})
    lines = [f.line() for f in check(params, activations=False).problems]
    assert any("bitsandbytes" in line and "train.optimizer" in line for line in lines)
    assert any("adamw8bit needs a CUDA GPU" in line for line in lines)


def test_invalid_params_is_one_line(tmp_path, capsys):
    params = write_params(tmp_path, lora={"rank": 0})
    report = check(params)
    assert [f.line() for f in report.findings] == [f"error: {params}: lora.rank: must be >= 1, got 0"]
    assert main(["check", "--params", str(params)]) == 1
    assert "lora.rank" in capsys.readouterr().out


# -- preflight --------------------------------------------------------------------------------------------
def test_preflight_passes_on_the_default_params_without_reading_coco(monkeypatch):
    monkeypatch.setattr(chk, "check_data", lambda params: pytest.fail("preflight parsed the COCO files"))
    for stage in ("stylize", "train", "infer", "score"):
        preflight(ROOT / "params.yaml", stage)


def test_preflight_raises_the_stage_problems(tmp_path, monkeypatch):
    params = write_params(tmp_path, score={"vlm": "org/not-downloaded"})
    preflight(params, "train")  # the VLM is not the train stage's business
    with pytest.raises(UserError, match=r"score.vlm: org/not-downloaded is not in the local Hugging Face cache"):
        preflight(params, "score")
    monkeypatch.setattr(device, "free_bytes", lambda kind: (2**20, "free in the test"))
    preflight(TINY_PARAMS, "train")  # on the CPU the stage runs without the memory trace
    monkeypatch.setattr(device, "stage_device", lambda params, stage: ("models.device", "cuda"))
    with pytest.raises(UserError, match=r"^train: needs .* on cuda \(models.device\)"):
        preflight(TINY_PARAMS, "train")
    with pytest.raises(ValueError, match="unknown stage"):
        preflight(TINY_PARAMS, "sample")


@pytest.mark.slow
def test_paper_check_cli_json(capsys):
    """The acceptance run: every missing piece named, the accounting computed at the real dimensions."""
    assert main(["check", "--params", "configs/paper.yaml", "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    keys = {f["key"] for f in out["findings"] if f["level"] == "error"}
    assert {"models.kontext", "score.clip", "score.vlm", "data.splits.train", "data.splits.eval"} <= keys
    train = out["accounting"]["stages"]["train"]
    assert train["detail"]["transformer_checkpointing_on"] < train["detail"]["transformer_checkpointing_off"]
    assert out["accounting"]["params"]["transformer"] == 11_901_408_320
