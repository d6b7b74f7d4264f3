"""The rehearsal's parts (regionroute.rehearsal): hub cache layout, COCO-layout data, stand-ins, params.

The rehearsal itself (``regionroute rehearse``, about 15 minutes) runs as its own CI step.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml

from regionroute.rehearsal.hub import repo_folder, verify_cache, write_snapshot

ROOT = Path(__file__).resolve().parents[1]


def test_snapshot_is_a_hub_cache_that_huggingface_hub_reads(tmp_path):
    from huggingface_hub import try_to_load_from_cache

    def files(name: str) -> Path:
        src = tmp_path / name
        (src / "sub").mkdir(parents=True)
        (src / "config.json").write_text('{"a": 1}')
        (src / "sub" / "w.safetensors").write_bytes(b"\0" * 100)
        return src

    commit = write_snapshot(tmp_path / "hub", "org/model", files("one")).name
    assert write_snapshot(tmp_path / "hub2", "org/model", files("two")).name == commit  # keyed on content
    assert verify_cache(tmp_path / "hub") == ["org/model"]
    root = repo_folder(tmp_path / "hub", "org/model")
    assert (root / "refs" / "main").read_text() == commit
    found = try_to_load_from_cache("org/model", "sub/w.safetensors", cache_dir=tmp_path / "hub")
    assert Path(found).read_bytes() == b"\0" * 100 and Path(found).is_symlink()
    blobs = {p.name for p in (root / "blobs").iterdir()}
    assert len(blobs) == 2 and {len(b) for b in blobs} == {64, 40}  # LFS: sha256; a small text file: git sha1


def test_coco_layout_has_what_real_coco_has(tmp_path):
    from PIL import Image

    from regionroute.data.coco import load_coco
    from regionroute.rehearsal.coco import write_coco

    counts = write_coco(tmp_path)
    sizes, modes, crowd, multi = set(), set(), 0, 0
    for split, n in counts.items():
        coco, caps = load_coco(tmp_path / f"annotations/instances_{split}.json",
                               tmp_path / f"annotations/captions_{split}.json")  # fmt: skip
        ids = sorted(c["id"] for c in coco.dataset["categories"])
        assert len(ids) == 80 and ids[-1] == 90 and 12 not in ids and 83 not in ids
        assert len(coco.imgs) == n and all(len(caps[i]) == 5 for i in coco.imgs)
        for img in coco.imgs.values():
            with Image.open(tmp_path / split / img["file_name"]) as im:
                assert im.format == "JPEG" and im.size == (img["width"], img["height"])
                sizes.add(im.size)
                modes.add(im.mode)
        for ann in coco.dataset["annotations"]:
            mask = coco.annToMask(ann)
            assert abs(mask.sum() - ann["area"]) <= 1 + 2 * (ann["area"] == 0)  # the degenerate one: a few pixels
            crowd += ann["iscrowd"] and isinstance(ann["segmentation"]["counts"], list)
            multi += not ann["iscrowd"] and len(ann["segmentation"]) > 1
    assert {(640, 480), (480, 640), (427, 640)} <= sizes and modes == {"RGB", "L"}
    assert crowd >= 2 and multi >= 3


def test_kontext_standin_loads_as_the_paper_model_from_the_cache(tmp_path):
    from diffusers import FluxKontextPipeline

    from regionroute.check.configs import FLUX_KONTEXT_DEV
    from regionroute.flux.tokens import style_token_mask
    from regionroute.rehearsal.kontext import KONTEXT_REPO, write_kontext

    snapshot = write_snapshot(tmp_path / "hub", KONTEXT_REPO, write_kontext(tmp_path / "files"))
    for folder, index in (("transformer", "diffusion_pytorch_model"), ("text_encoder_2", "model")):
        index_map = json.loads((snapshot / folder / f"{index}.safetensors.index.json").read_text())["weight_map"]
        assert len(set(index_map.values())) >= 2
    for name, real in FLUX_KONTEXT_DEV.items():
        assert set(real) <= set(json.loads((snapshot / name / "config.json").read_text())), name
    pipe = FluxKontextPipeline.from_pretrained(KONTEXT_REPO, cache_dir=tmp_path / "hub", local_files_only=True)
    tokens = pipe.tokenizer_2.convert_ids_to_tokens(pipe.tokenizer_2("make the dog into pixel-art style").input_ids)
    assert tokens == ["▁make", "▁the", "▁dog", "▁into", "▁pixel", "-", "art", "▁style", "</s>"]
    mask = style_token_mask(pipe.tokenizer_2, ["make the dog into pixel-art style"], ["pixel-art"], 77)
    assert mask[0].nonzero().flatten().tolist() == [4, 5, 6]
    assert pipe.tokenizer("a dog").input_ids == [49406, 320, 1929, 49407]  # CLIP's real vocabulary
    assert pipe.vae_scale_factor == 8 and pipe.transformer.config.in_channels == 64  # 1024 px -> 4096 tokens


def test_qwen_standin_loads_its_published_key_names_and_processor(tmp_path):
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    from regionroute.rehearsal.judges import write_qwen

    files = write_qwen(tmp_path / "qwen")
    keys = json.loads((files / "model.safetensors.index.json").read_text())["weight_map"]
    assert any(k.startswith("visual.blocks.") for k in keys) and any(k.startswith("model.layers.") for k in keys)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(files)
    processor = AutoProcessor.from_pretrained(files)
    loaded = model.state_dict()
    assert all(np.isfinite(v.float().numpy()).all() for v in loaded.values())
    assert processor.image_processor.size["longest_edge"] == 12845056  # preprocessor_config's max_pixels


def test_params_differ_from_the_paper_config_in_counts_and_device_only(tmp_path):
    from regionroute.config import load_params
    from regionroute.rehearsal.run import CHANGES, write_params

    write_params(ROOT / "configs" / "paper.yaml", tmp_path / "params.yaml")
    paper, mine = (yaml.safe_load(p.read_text()) for p in (ROOT / "configs" / "paper.yaml", tmp_path / "params.yaml"))

    def leaves(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            out |= leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v}
        return out

    changed = {k for k, v in leaves(mine).items() if leaves(paper).get(k) != v}
    assert changed == set(leaves(CHANGES))
    params = load_params(tmp_path / "params.yaml")
    assert params.sample.resolution == 1024 and params.models.dtype == "bfloat16"
    assert params.train.gradient_checkpointing and params.train.mixed_precision == "bf16"
    assert Counter(k.split(".")[-1] for k in changed)["device"] == 2  # models.device, score.device: cpu


@pytest.mark.parametrize("argv", [["/r/stages/infer.py", "--method", "oracle"], ["/r/regionroute/cli.py", "edit"]])
def test_rss_table_names_stages_as_dvc_does(tmp_path, argv):
    from regionroute.rehearsal.run import rss_table

    log = tmp_path / "rss.jsonl"
    log.write_text(json.dumps({"argv": argv, "pid": 1, "peak_rss": 2**30, "seconds": 1.0}) + "\n")
    name = "infer@oracle" if "infer" in argv[0] else "regionroute edit"
    line = rss_table(log)[0]
    assert line.strip().startswith(f"{name} ") and line.endswith("peak RSS   1.00 GiB")
