"""The toy Kontext base: an exact latent through FluxKontextPipeline, the real classes, 'toy' resolution."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from regionroute.config import ModelsConfig
from regionroute.errors import UserError
from regionroute.toy.base import BaseConfig, build_toy_kontext

SMALL = BaseConfig(attention_head_dim=16, num_attention_heads=2, max_sequence_length=16)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("toy") / "kontext"
    build_toy_kontext(SMALL).save_pretrained(path)
    return path


def test_latent_round_trips_exactly_through_the_pipeline(saved):
    from regionroute.models.kontext import load_kontext

    pipe = load_kontext(ModelsConfig(kontext=str(saved), dtype="float32", device="cpu"))
    assert type(pipe.vae).__name__ == "PixelShuffleVAE" and pipe.vae_scale_factor == 4
    img = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    x = pipe.image_processor.preprocess(Image.fromarray(img), height=64, width=64)
    lat = pipe._encode_vae_image(x, generator=None)  # (1, 48, 16, 16)
    packed = pipe._pack_latents(lat, 1, *lat.shape[1:])
    assert packed.shape == (1, 64, 192)  # 8 x 8 tokens, one per 8 x 8 pixel patch
    z = pipe._unpack_latents(packed, 64, 64, pipe.vae_scale_factor) / pipe.vae.config.scaling_factor
    back = pipe.image_processor.postprocess(pipe.vae.decode(z, return_dict=False)[0], output_type="np")[0]
    np.testing.assert_array_equal(np.round(back * 255).astype(np.uint8), img)


def test_toy_pipeline_edits_at_its_own_size(saved):
    from regionroute.flux.pipeline import kontext_edit
    from regionroute.models.kontext import load_kontext

    pipe = load_kontext(ModelsConfig(kontext=str(saved), dtype="float32", device="cpu"))
    img = np.zeros((64, 64, 3), np.uint8)
    out = kontext_edit(pipe, [img, img], ["make the dog into pixel-art style"] * 2, [0, 1], 2, 2.5, 16)
    assert [o.shape for o in out] == [(64, 64, 3)] * 2
    assert pipe.transformer.config.in_channels == 192 and pipe.transformer.config.num_layers == 2


def test_pretraining_encodes_prompts_as_the_saved_pipeline_does(saved):
    """Known answer: the prompt table pretraining learns from equals what inference feeds the
    base (a fresh T5 in train mode would add dropout: 74% off before this was caught)."""
    from regionroute.models.kontext import load_kontext
    from regionroute.toy.pretrain import PromptTable

    table = PromptTable(build_toy_kontext(SMALL), ["dog"], ["red"], ["cyberpunk"], 16)
    pipe = load_kontext(ModelsConfig(kontext=str(saved), dtype="float32", device="cpu"))
    with torch.no_grad():
        embeds, pooled, _ = pipe.encode_prompt(prompt=table.prompts, prompt_2=None, max_sequence_length=16)
    torch.testing.assert_close(embeds, table.embeds, rtol=0, atol=0)
    torch.testing.assert_close(pooled, table.pooled, rtol=0, atol=0)


@pytest.mark.parametrize("mixing", [0.0, 1.0])
def test_text_mixing_zero_keeps_each_t5_token_to_its_own_word(mixing):
    import dataclasses

    pipe = build_toy_kontext(dataclasses.replace(SMALL, text_mixing=mixing))
    with torch.no_grad():
        embeds = pipe.encode_prompt(
            prompt=["make the image into cyberpunk style", "make the dog into expressionism style"],
            prompt_2=None,
            max_sequence_length=16,
        )[0]
    changed = (embeds[0] - embeds[1]).norm(dim=-1) > 1e-6  # per position
    if mixing == 0.0:  # only the object word (2) and the style word (4) differ: padding carries no style
        assert changed.nonzero().flatten().tolist() == [2, 4]
    else:  # a random T5 spreads both words over every token
        assert bool(changed.all())


def test_rope_axes_and_config_validation():
    from regionroute.toy.base import _rope_axes

    assert sum(_rope_axes(64)) == 64 and _rope_axes(128) == (16, 56, 56)
    with pytest.raises(UserError, match="size"):
        BaseConfig(size=60)


def test_toy_reference_names_the_missing_directory(monkeypatch, tmp_path):
    from regionroute import models

    monkeypatch.setattr(models, "REPO_ROOT", tmp_path)
    with pytest.raises(UserError, match=r"toy/models/kontext does not exist.*dvc repro --force toy/dvc.yaml"):
        models.resolve_reference("toy", "kontext", lambda p: None, "1")
    (tmp_path / "toy" / "models" / "kontext").mkdir(parents=True)
    assert models.resolve_reference("toy", "kontext", lambda p: None, "1") == str(tmp_path / "toy/models/kontext")
    torch.manual_seed(0)


def test_loading_the_committed_toy_base_logs_no_library_warning():
    """diffusers checks each component's type on load: the toy latent must be the AutoencoderKL the pipeline
    declares, or every load warns "Expected types for vae: ..., got PixelShuffleVAE"."""
    from regionroute.models.kontext import load_kontext

    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    loggers = [logging.getLogger(name) for name in ("diffusers", "transformers")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        pipe = load_kontext(ModelsConfig(kontext="toy", dtype="float32", device="cpu"))
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    assert type(pipe.vae).__name__ == "PixelShuffleVAE"
    assert [r.getMessage() for r in records] == []
