"""Toy base pretraining: the batches encode the premise, the loop resumes exactly, the export loads."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from regionroute.config import ModelsConfig
from regionroute.toy.base import BaseConfig, build_toy_kontext
from regionroute.toy.filters import STYLES, apply_style
from regionroute.toy.pretrain import TONES, encode_images, make_batch, pretrain, tone_edit

TINY = BaseConfig(attention_head_dim=16, num_attention_heads=2, steps=4, batch_size=4, warmup_steps=1,
                  checkpoint_every=2, log_every=1, mixed_precision="no", save_dtype="float32")  # fmt: skip


def test_batches_encode_the_premise():
    """Naming an object still styles the whole image; a colour edit changes exactly that category."""
    cfg = dataclasses.replace(TINY, p_global=0.3, p_object_style=0.35)
    batch = make_batch(np.random.default_rng(0), cfg, 64)
    x, y, tasks = batch["context"], batch["target"], batch["tasks"]
    assert set(tasks.tolist()) == {0, 1, 2}
    for i, prompt in enumerate(batch["prompts"]):
        if tasks[i] < 2:  # "make the image into ..." or "make the <object> into ... style": the whole image
            style = prompt.split(" into ")[1].removesuffix(" style")
            assert style in STYLES and (tasks[i] == 0) == prompt.startswith("make the image into")
            torch.testing.assert_close(y[i : i + 1], apply_style(x[i : i + 1], style))
        else:  # "make the <object> <colour>": only some pixels change, the rest is bit-identical
            changed = (y[i] != x[i]).any(0)
            assert prompt.startswith("make the ") and " into " not in prompt
            assert 0 < float(changed.float().mean()) < 0.5


def test_tone_edits_stay_inside_the_named_object():
    """With p_tone = 1 every local edit re-tones the named category only, as tone_edit does."""
    cfg = dataclasses.replace(TINY, p_global=0.0, p_object_style=0.0, p_tone=1.0)
    batch = make_batch(np.random.default_rng(1), cfg, 24)
    x, y = batch["context"], batch["target"]
    assert set(batch["tasks"].tolist()) == {3}
    seen = set()
    for i, prompt in enumerate(batch["prompts"]):
        tone = prompt.rsplit(" ", 1)[1]
        seen.add(tone)
        changed = (y[i] != x[i]).any(0)
        assert tone in TONES and 0 < float(changed.float().mean()) < 0.5
        torch.testing.assert_close(y[i : i + 1], tone_edit(x[i : i + 1], changed[None], [tone]))
    assert seen == set(TONES)
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[0, 1:3, 1:3] = True
    img = torch.rand(1, 3, 4, 4)
    neg = tone_edit(img, mask, ["negative"])
    torch.testing.assert_close(neg[0][:, mask[0]], 1 - img[0][:, mask[0]])
    torch.testing.assert_close(neg[0][:, ~mask[0]], img[0][:, ~mask[0]], rtol=0, atol=0)
    with pytest.raises(ValueError, match="unknown tone"):
        tone_edit(img, mask, ["sepia"])


def test_without_the_pooled_path_the_projection_stays_zero(tmp_path):
    cfg = dataclasses.replace(TINY, pooled_text=False, steps=2)
    pipe = build_toy_kontext(cfg)
    pretrain(pipe, cfg, tmp_path / "a", tmp_path / "c")
    for name, param in pipe.transformer.time_text_embed.text_embedder.named_parameters():
        assert not param.any(), name
    assert pipe.transformer.time_text_embed.guidance_embedder.linear_1.weight.requires_grad


def test_latent_of_a_batch_is_the_pipelines(tmp_path):
    pipe = build_toy_kontext(TINY)
    x = torch.rand(2, 3, 64, 64)
    z = encode_images(pipe, x)  # (2, 64, 192)
    unpacked = pipe._unpack_latents(z, 64, 64, pipe.vae_scale_factor) / pipe.vae.config.scaling_factor
    torch.testing.assert_close(pipe.vae.decode(unpacked, return_dict=False)[0], x * 2 - 1)


class _Kill(Exception):
    pass


def test_pretraining_resumes_exactly_and_exports_a_loadable_pipeline(tmp_path, monkeypatch):
    from regionroute.models.kontext import load_kontext
    from regionroute.toy import pretrain as module

    straight = build_toy_kontext(TINY)
    pretrain(straight, TINY, tmp_path / "a", tmp_path / "ca", tmp_path / "la")

    real = module.encode_images
    calls = {"n": 0}

    def dying(pipe, images):
        calls["n"] += 1
        if calls["n"] == 7:  # two encodes a step: dies inside step 4, after the step-2 checkpoint
            raise _Kill
        return real(pipe, images)

    monkeypatch.setattr(module, "encode_images", dying)
    with pytest.raises(_Kill):
        pretrain(build_toy_kontext(TINY), TINY, tmp_path / "b", tmp_path / "cb", tmp_path / "lb")
    monkeypatch.setattr(module, "encode_images", real)
    resumed = build_toy_kontext(TINY)
    pretrain(resumed, TINY, tmp_path / "b", tmp_path / "cb", tmp_path / "lb")
    done = resumed.transformer.state_dict()
    for k, a in straight.transformer.state_dict().items():
        torch.testing.assert_close(a, done[k], rtol=0, atol=0, msg=k)
    loss_a = (tmp_path / "la" / "plots" / "metrics" / "base" / "loss.tsv").read_text()
    loss_b = (tmp_path / "lb" / "plots" / "metrics" / "base" / "loss.tsv").read_text()
    assert loss_a == loss_b and len(loss_a.splitlines()) == 1 + TINY.steps
    pipe = load_kontext(ModelsConfig(kontext=str(tmp_path / "a"), dtype="float32", device="cpu"))
    for k, v in pipe.transformer.state_dict().items():
        torch.testing.assert_close(v, straight.transformer.state_dict()[k], rtol=0, atol=0)
