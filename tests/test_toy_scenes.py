"""Toy scenes and style filters: deterministic, exact masks, COCO the sample stage reads, distinct styles."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from regionroute.config import SampleConfig
from regionroute.data.coco import sample_split
from regionroute.seeds import stream
from regionroute.toy.dataset import ScenesConfig, write_toy_dataset
from regionroute.toy.filters import STYLES, apply_style, recolour
from regionroute.toy.scenes import CATEGORIES, COLOURS, render_batch, render_scene


def test_scenes_are_deterministic_with_exact_disjoint_masks():
    a = render_batch(np.random.default_rng(3), 40)
    b = render_batch(np.random.default_rng(3), 40)
    names = {c[1] for c in CATEGORIES}
    areas = []
    for s, t in zip(a, b, strict=True):
        np.testing.assert_array_equal(s.image, t.image)
        assert s.image.shape == (64, 64, 3) and s.image.dtype == np.uint8
        assert 1 <= len(s.masks) <= 3 and len(s.objects) == len(s.colours) == len(s.masks)
        assert set(s.objects) <= names and set(s.colours) <= set(COLOURS)
        assert all(m.any() for m in s.masks) and int(s.masks.sum(0).max()) == 1  # non-empty, disjoint
        areas += list(s.masks.reshape(len(s.masks), -1).mean(1))
    assert 0.02 < float(np.median(areas)) < 0.15  # objects clearly smaller than the image
    assert len({c[1] for c in CATEGORIES}) >= 4


def test_coco_export_is_exact_reproducible_and_sampled_by_the_pipeline(tmp_path):
    from pycocotools.coco import COCO

    cfg = ScenesConfig(train=12, val=4, test=3, seed=5)
    write_toy_dataset(tmp_path / "a", cfg)
    write_toy_dataset(tmp_path / "b", cfg)
    for f in sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file()):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    coco = COCO(str(tmp_path / "a" / "annotations" / "instances_train.json"))
    scenes = render_batch(stream("scenes/train", 5), 12)
    ann = iter(sorted(coco.anns))
    for scene in scenes:
        for mask in scene.masks:
            np.testing.assert_array_equal(coco.annToMask(coco.anns[next(ann)]).astype(bool), mask)
    caps = json.loads((tmp_path / "a" / "annotations" / "captions_train.json").read_text())
    assert len(caps["annotations"]) == 12
    stats = sample_split(tmp_path / "a" / "annotations" / "instances_train.json",
                         tmp_path / "a" / "annotations" / "captions_train.json", tmp_path / "a" / "train",
                         tmp_path / "s", SampleConfig(resolution=64), 12, "train")  # fmt: skip
    assert stats["written"] == 12 and stats["dropped"] == {} and stats["skipped_annotations"] == {}


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    scenes = render_batch(np.random.default_rng(0), 64)
    return torch.from_numpy(np.stack([s.image for s in scenes])).permute(0, 3, 1, 2).float() / 255


def test_styles_are_deterministic_in_range_and_far_apart(images):
    outs = {s: apply_style(images, s) for s in STYLES}
    for s in STYLES:
        assert outs[s].shape == images.shape and float(outs[s].min()) >= 0 and float(outs[s].max()) <= 1
        torch.testing.assert_close(outs[s], apply_style(images, s), rtol=0, atol=0)
    for a in STYLES:
        for b in STYLES:
            if a < b:  # a base that is 3x closer to the requested style than to the others needs room
                assert float(((outs[a] - outs[b]) ** 2).mean()) > 0.04, (a, b)
    with pytest.raises(ValueError, match="unknown toy style"):
        apply_style(images, "watercolor")


def test_styles_are_local(images):
    """Receptive field <= 5 px: a change at one pixel leaves pixels 8+ px away untouched."""
    x = images[:1].clone()
    y = x.clone()
    y[..., 32, 32] = 1 - y[..., 32, 32]
    far = torch.ones(64, 64, dtype=torch.bool)
    far[24:41, 24:41] = False
    for s in STYLES:
        torch.testing.assert_close(apply_style(x, s)[..., far], apply_style(y, s)[..., far], rtol=0, atol=0)


def test_recolour_changes_only_the_mask_and_keeps_shading():
    scene = render_scene(np.random.default_rng(1))
    x = torch.from_numpy(scene.image).permute(2, 0, 1)[None].float() / 255
    m = torch.from_numpy(scene.masks[0])[None]
    out = recolour(x, m, torch.tensor([[0.1, 0.3, 0.9]]))
    assert torch.equal(out[..., ~m[0]], x[..., ~m[0]])  # bit-identical outside
    inside = out[0][:, m[0]]  # (3, P)
    assert float(inside[2].mean()) > float(inside[0].mean())  # blue now
    assert float(inside.std(1).mean()) > 0  # shading/pattern survive


def test_scenes_render_rectangular_images_with_objects_inside():
    scene = render_scene(np.random.default_rng(2), (96, 48), margin=0.05)
    assert scene.image.shape == (48, 96, 3) and scene.masks.shape[1:] == (48, 96)
    assert all(m.any() for m in scene.masks)
