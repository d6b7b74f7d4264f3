"""Typed configuration: both shipped configs validate; bad values fail naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from regionroute.config import SECTIONS, load_params, load_section
from regionroute.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def _keys(d: object, prefix: str = "") -> set[str]:
    if not isinstance(d, dict):
        return {prefix}
    out = set()
    for k, v in d.items():
        out |= _keys(v, f"{prefix}.{k}" if prefix else k)
    return out


def test_shipped_configs_validate_with_same_structure():
    """params.yaml (the default), configs/tiny.yaml and configs/paper.yaml: one structure, one switch apart."""
    tiny = load_params(ROOT / "configs" / "tiny.yaml")
    paper = load_params(ROOT / "configs" / "paper.yaml")
    assert load_params(ROOT / "params.yaml").models.kontext == "toy"  # the default is the toy world
    assert tiny.models.kontext == "tiny"
    assert paper.models.kontext == "black-forest-labs/FLUX.1-Kontext-dev"
    assert paper.sample.resolution == 1024 and paper.data.splits["train"].num == 150
    assert paper.data.styles == ("pixel-art", "cyberpunk", "expressionism", "line-art")
    names = ("params.yaml", "configs/tiny.yaml")
    raw = {name: yaml.safe_load((ROOT / name).read_text()) for name in names}
    raw_paper = yaml.safe_load((ROOT / "configs" / "paper.yaml").read_text())
    for config in raw.values():
        assert _keys(config) == _keys(raw_paper)
        assert set(config) == set(SECTIONS)


@pytest.mark.parametrize(
    ("section", "values", "needle"),
    [
        ("sample", {"resolution": 100}, "sample.resolution: must be a positive multiple of 16"),
        ("sample", {"bogus": 1}, "sample.bogus: unknown key"),
        ("sample", {"seed": "zero"}, "sample.seed: expected an integer"),
        ("sample", {"min_area_frac": 1.5}, "sample.min_area_frac: must be in [0, 1)"),
        ("stylize", {"instruction": "make it nice"}, "stylize.instruction: must contain '{style}'"),
        ("composite", {"method": "poisson"}, "composite.method: must be one of seamless, alpha"),
        ("data", {"styles": ["pixle-art"]}, "data.styles: unknown style 'pixle-art'"),
        ("data", {"splits": {"train": {"coco": "x", "num": 0}, "eval": {"coco": "y", "num": 1}}},
         "data.splits.train.num: must be >= 1"),
    ],
)  # fmt: skip
def test_bad_values_name_the_key(params_file, section, values, needle):
    path = params_file(**{section: values})
    with pytest.raises(ConfigError) as info:
        load_params(path)
    msg = str(info.value)
    assert needle in msg and str(path) in msg and "\n" not in msg


def test_empty_and_missing_sections(params_file, tmp_path):
    path = params_file(stylize=None)
    with pytest.raises(ConfigError, match=r"stylize: section is empty"):
        load_section(path, "stylize")
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [unclosed\n")
    with pytest.raises(ConfigError, match="malformed YAML"):
        load_section(bad, "models")
    with pytest.raises(ConfigError, match="params file not found"):
        load_section(tmp_path / "nope.yaml", "models")


def test_extra_styles_are_accepted_when_declared(params_file):
    path = params_file(data={"styles": ["pixel-art", "claymation"], "extra_styles": ["claymation"]})
    assert load_params(path).data.styles == ("pixel-art", "claymation")


def test_a_deleted_key_is_an_error_naming_it(params_file):
    """No silent default (train.steps would become the paper's 10000): the params file holds every setting."""
    path = params_file()
    for section, keys in (
        ("train", ["steps"]),
        ("data", ["splits", "eval", "num"]),
        ("infer", ["max_sequence_length"]),
    ):
        raw = yaml.safe_load(path.read_text())
        parent = raw[section]
        for key in keys[:-1]:
            parent = parent[key]
        del parent[keys[-1]]
        broken = path.with_name(f"no-{keys[-1]}.yaml")
        broken.write_text(yaml.safe_dump(raw))
        with pytest.raises(ConfigError, match=rf"^{broken}: {section}\.{'.'.join(keys)}: missing"):
            load_section(broken, section)


def test_the_toy_world_params_are_complete():
    from regionroute.toy.base import BaseConfig
    from regionroute.toy.dataset import ScenesConfig
    from regionroute.toy.evaluate import EvaluateConfig
    from regionroute.toy.judge import JudgeConfig

    for name, cls in (("scenes", ScenesConfig), ("base", BaseConfig), ("judge", JudgeConfig),
                      ("evaluate", EvaluateConfig)):  # fmt: skip
        load_section(ROOT / "toy" / "params.yaml", name, cls)
