"""The model card ``README.md`` the train stage writes (regionroute.model_card)."""

from __future__ import annotations

from dataclasses import asdict

from huggingface_hub import ModelCard

from regionroute.config import CompositeConfig, LoraConfig, LossConfig, TrainConfig
from regionroute.model_card import BASE_LICENSES, write_model_card

STYLES = ["pixel-art", "line-art"]


def _config(base: str) -> dict:
    return {"base_model": base, "dtype": "bfloat16", "styles": STYLES, "instruction": CompositeConfig.instruction,
            "lora": asdict(LoraConfig()), "loss": asdict(LossConfig()), "train": asdict(TrainConfig()),
            "processes": 1, "latent_hw": [128, 128]}  # fmt: skip


def test_card_front_matter_and_loading_instructions(tmp_path):
    base = "black-forest-labs/FLUX.1-Kontext-dev"  # not in this machine's cache: its licence is the known one
    path = write_model_card(tmp_path, _config(base))
    card = ModelCard.load(path)
    assert card.data.base_model == base and card.data.library_name == "diffusers"
    assert {"lora", "flux", *STYLES} <= set(card.data.tags)
    assert card.data.license == "other" and card.data.license_name == BASE_LICENSES[base]["license_name"]
    assert card.data.instance_prompt == "make the {object} into {style} style"
    for style in STYLES:
        assert f'subfolder="lora", weight_name="{style}.safetensors", adapter_name="{style}"' in card.text
    assert "| training resolution | 1024 x 1024 px (64 x 64 tokens) |" in card.text
    assert "gradient checkpointing on" in card.text
    first = path.read_bytes()
    write_model_card(tmp_path, _config(base))
    assert path.read_bytes() == first  # no date, no machine: identical training, identical bytes


def test_card_of_a_model_trained_on_a_directory_reads_its_licence(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: mit\n---\nA base.\n")
    card = ModelCard.load(write_model_card(tmp_path, _config(str(base))))
    assert card.data.license == "mit" and card.data.base_model is None and str(base) in card.text  # not a hub id
    assert ModelCard.load(write_model_card(tmp_path, _config("tiny"))).data.license == "apache-2.0"


def test_card_of_the_toy_world_gives_its_64_px_training_resolution(tmp_path):
    config = _config("toy") | {"latent_hw": [16, 16], "vae_scale_factor": 4}  # the toy latent: 4 px per value
    card = ModelCard.load(write_model_card(tmp_path, config))
    assert "| training resolution | 64 x 64 px (8 x 8 tokens) |" in card.text and card.data.base_model is None
