"""Stage ``sample``: crop/drop rule, determinism, and bad inputs (one line, exit 2, no output)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from regionroute.data.coco import crop_square
from regionroute.files import read_jsonl, read_mask
from stages import sample
from tests.conftest import TINY_DATA, run_stage, sample_argv


def test_crop_keeps_mask_centroid_and_reports_loss():
    image = np.zeros((100, 300, 3), np.uint8)
    mask = np.zeros((100, 300), bool)
    mask[40:60, 250:290] = True  # near the right edge of a wide image
    img_c, mask_c, (_x0, y0, scale), loss = crop_square(image, mask, 64)
    assert img_c.shape == (64, 64, 3) and mask_c.shape == (64, 64)
    assert scale == pytest.approx(0.64) and y0 == 0
    assert loss == pytest.approx(0.0, abs=0.05) and mask_c.sum() > 0
    # a mask wider than the crop loses area: the loss is the cut fraction
    wide = np.zeros((100, 300), bool)
    wide[40:60, 0:300] = True
    _, _mask_w, _, loss_w = crop_square(image, wide, 64)
    assert loss_w == pytest.approx(1 - 64 / 192, abs=0.02)


def test_sample_stage_writes_manifest_and_is_deterministic(params_file, tmp_path, capsys):
    params = params_file(data={"splits": {"train": {"coco": "train", "num": 8}, "eval": {"coco": "val", "num": 2}}})
    code, err = run_stage(sample.main, sample_argv(params, TINY_DATA, tmp_path / "a"), capsys)
    assert code == 0, err
    rows = read_jsonl(tmp_path / "a" / "manifest.jsonl")
    assert len(rows) == 8 and len({r["id"] for r in rows}) == 8
    for r in rows:
        mask = read_mask(tmp_path / "a" / r["mask"])
        assert mask.shape == (128, 128) and mask.any()
        assert r["object"] in {"car", "cat", "dog", "sports ball", "kite", "bottle"}
    stats = json.loads((tmp_path / "a" / "stats.json").read_text())
    assert stats["written"] == 8
    run_stage(sample.main, sample_argv(params, TINY_DATA, tmp_path / "b"), capsys)
    assert (tmp_path / "a" / "manifest.jsonl").read_text() == (tmp_path / "b" / "manifest.jsonl").read_text()
    other = params_file(
        sample={"seed": 1}, data={"splits": {"train": {"coco": "train", "num": 8}, "eval": {"coco": "val", "num": 2}}}
    )
    run_stage(sample.main, sample_argv(other, TINY_DATA, tmp_path / "c"), capsys)
    assert (tmp_path / "a" / "manifest.jsonl").read_text() != (tmp_path / "c" / "manifest.jsonl").read_text()


def _tiny_coco(root: Path, boxes: list[tuple[int, int, int, int]], size: tuple[int, int] = (400, 100)) -> Path:
    """A hand-made COCO split: one image per box (x0, y0, x1, y1), rectangle polygons."""
    from PIL import Image

    (root / "annotations").mkdir(parents=True)
    (root / "train").mkdir()
    w, h = size
    images, anns, caps = [], [], []
    for i, (x0, y0, x1, y1) in enumerate(boxes, start=1):
        Image.new("RGB", (w, h), (90, 120, 200)).save(root / "train" / f"{i}.png")
        images.append({"id": i, "file_name": f"{i}.png", "width": w, "height": h})
        anns.append(
            {
                "id": i,
                "image_id": i,
                "category_id": 18,
                "iscrowd": 0,
                "area": float((x1 - x0) * (y1 - y0)),
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]],
            }
        )
        caps.append({"id": i, "image_id": i, "caption": "a dog"})
    cats = [{"id": 18, "name": "dog", "supercategory": "animal"}]
    (root / "annotations" / "instances_train.json").write_text(
        json.dumps({"images": images, "annotations": anns, "categories": cats})
    )
    (root / "annotations" / "captions_train.json").write_text(json.dumps({"images": images, "annotations": caps}))
    return root


def test_drop_rule_counts_samples_losing_their_mask(params_file, tmp_path, capsys):
    # image 1: a box 300 px wide in a 400x100 image -> the 100 px crop keeps 1/3: dropped (> 50% lost)
    # image 2: a small box, kept whole
    root = _tiny_coco(tmp_path / "coco", [(50, 20, 350, 80), (10, 10, 40, 40)])
    params = params_file(
        sample={"resolution": 96},
        data={"splits": {"train": {"coco": "train", "num": 1}, "eval": {"coco": "val", "num": 1}}},
    )
    code, err = run_stage(sample.main, sample_argv(params, root, tmp_path / "o"), capsys)
    assert code == 0, err
    stats = json.loads((tmp_path / "o" / "stats.json").read_text())
    rows = read_jsonl(tmp_path / "o" / "manifest.jsonl")
    assert [r["image_id"] for r in rows] == [2]
    assert rows[0]["mask_loss"] == 0 and stats["written"] == 1  # nothing lossy is written
    # asking for both: one is dropped, so the request cannot be met and the error names the key
    params2 = params_file(
        sample={"resolution": 96},
        data={"splits": {"train": {"coco": "train", "num": 2}, "eval": {"coco": "val", "num": 1}}},
    )
    code, err = run_stage(sample.main, sample_argv(params2, root, tmp_path / "o2"), capsys)
    assert code == 2 and "asked for 2 pairs" in err and "1 dropped" in err
    # with the rule relaxed, both are kept and the lossy one reports its loss (~2/3)
    params3 = params_file(
        sample={"resolution": 96, "max_mask_loss": 0.9},
        data={"splits": {"train": {"coco": "train", "num": 2}, "eval": {"coco": "val", "num": 1}}},
    )
    code, err = run_stage(sample.main, sample_argv(params3, root, tmp_path / "o3"), capsys)
    assert code == 0, err
    loss = {r["image_id"]: r["mask_loss"] for r in read_jsonl(tmp_path / "o3" / "manifest.jsonl")}
    assert loss[1] == pytest.approx(2 / 3, abs=0.03) and loss[2] == 0


def _corrupt(root: Path, what: str) -> None:
    inst = root / "annotations" / "instances_train.json"
    data = json.loads(inst.read_text())
    if what == "missing_json":
        inst.unlink()
    elif what == "malformed_json":
        inst.write_text("{not json")
    elif what == "not_coco":
        inst.write_text(json.dumps({"images": []}))
    elif what == "missing_image":
        for f in (root / "train").iterdir():
            f.unlink()
    elif what == "corrupt_image":
        for f in (root / "train").iterdir():
            f.write_bytes(b"\xff\xd8garbage")
    elif what == "polygon_outside":
        for ann in data["annotations"]:
            ann["segmentation"] = [[5000, 5000, 5100, 5000, 5100, 5100]]
        inst.write_text(json.dumps(data))
    elif what == "file_name_outside":
        (root / "outside.jpg").write_bytes((root / "train" / data["images"][0]["file_name"]).read_bytes())
        for img in data["images"]:
            img["file_name"] = "../outside.jpg"  # a real image, next to the images folder
        inst.write_text(json.dumps(data))
    elif what == "no_usable_instance":
        for ann in data["annotations"]:
            ann["iscrowd"] = 1
        inst.write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("what", "needle"),
    [
        ("missing_json", "instances_train.json: file not found"),
        ("malformed_json", "instances_train.json: malformed JSON"),
        ("not_coco", "instances_train.json: missing or invalid 'annotations' list"),
        ("missing_image", ".jpg: image file not found"),
        ("corrupt_image", ".jpg: cannot read image"),
        ("polygon_outside", "polygon lies outside"),
        ("no_usable_instance", "no image has a usable instance"),
        ("file_name_outside", "images[0]: file_name '../outside.jpg' is not a path inside the images folder"),
    ],
)
def test_bad_inputs_give_one_line_and_no_output(params_file, tiny_data_copy, tmp_path, capsys, what, needle):
    _corrupt(tiny_data_copy, what)
    out = tmp_path / "out"
    code, err = run_stage(sample.main, sample_argv(params_file(), tiny_data_copy, out), capsys)
    assert code == 2
    last = err.strip().splitlines()[-1]  # progress bars may precede it on stderr
    assert last.startswith("error: ") and needle in last, err
    assert "Traceback" not in err and sum(line.startswith("error") for line in err.splitlines()) == 1
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


def test_asking_for_more_pairs_than_available_names_the_key(params_file, tmp_path, capsys):
    params = params_file(data={"splits": {"train": {"coco": "train", "num": 500}, "eval": {"coco": "val", "num": 2}}})
    code, err = run_stage(sample.main, sample_argv(params, TINY_DATA, tmp_path / "o"), capsys)
    assert code == 2 and "data.splits.train.num: asked for 500 pairs" in err
    assert not (tmp_path / "o").exists()


def test_unknown_category_filter_is_a_config_error(params_file, tmp_path, capsys):
    params = params_file(sample={"categories": ["unicorn"]})
    code, err = run_stage(sample.main, sample_argv(params, TINY_DATA, tmp_path / "o"), capsys)
    assert code == 2 and "sample.categories: unknown category 'unicorn'" in err


def test_everything_passed_over_is_counted_by_reason(params_file, tmp_path, capsys):
    root = _tiny_coco(tmp_path / "coco", [(10, 10, 40, 40), (12, 12, 44, 44), (50, 20, 350, 80), (5, 5, 30, 30)])
    inst = root / "annotations" / "instances_train.json"
    data = json.loads(inst.read_text())
    extra = dict(data["annotations"][0], id=100, iscrowd=1)  # a crowd region on image 1
    unknown = dict(data["annotations"][0], id=101, category_id=999)  # a category id not in categories
    tiny = dict(data["annotations"][0], id=102, area=4.0, segmentation=[[1, 1, 3, 1, 3, 3, 1, 3]])  # too small
    data["annotations"] += [extra, unknown, tiny]
    inst.write_text(json.dumps(data))
    caps_path = root / "annotations" / "captions_train.json"
    caps = json.loads(caps_path.read_text())
    caps["annotations"] = [c for c in caps["annotations"] if c["image_id"] != 4]  # image 4 has no caption
    caps_path.write_text(json.dumps(caps))
    params = params_file(
        sample={"resolution": 96, "min_area_frac": 0.0005},
        data={"splits": {"train": {"coco": "train", "num": 3}, "eval": {"coco": "val", "num": 1}}},
    )
    code, err = run_stage(sample.main, sample_argv(params, root, tmp_path / "o"), capsys)
    assert code == 2 and "crop_mask_loss 1" in err and "missing_caption 1" in err  # 4 images, only 2 usable
    assert "annotations crowd 1, too_small 1, unknown_category 1" in err
    params = params_file(
        sample={"resolution": 96, "min_area_frac": 0.0005},
        data={"splits": {"train": {"coco": "train", "num": 1}, "eval": {"coco": "val", "num": 1}}},
    )
    assert sample.main(sample_argv(params, root, tmp_path / "o1")) == 0
    assert "(skipped: annotations crowd 1, too_small 1, unknown_category 1" in capsys.readouterr().out
    stats = json.loads((tmp_path / "o1" / "stats.json").read_text())
    assert stats["skipped_annotations"] == {"crowd": 1, "too_small": 1, "unknown_category": 1}
