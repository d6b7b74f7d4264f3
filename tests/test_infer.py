"""Stage ``infer`` (base / regionroute / oracle) and the ``regionroute edit`` command."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from regionroute import cli
from regionroute.config import InferConfig, ModelsConfig
from regionroute.files import read_image, read_jsonl, read_mask, write_image, write_json, write_jsonl, write_mask
from regionroute.infer import Editor, run_method
from regionroute.lora_moe import LoraConfig, inject_lora_moe, save_moe
from regionroute.models.kontext import load_kontext
from tests.conftest import killed_after_the_first_item, run_stage

STYLES = ("pixel-art", "line-art")
CFG = InferConfig(steps=5, max_sequence_length=32, batch_size=2, attention_steps=(1, 2, 3, 4, 5))
TINY = ModelsConfig(kontext="tiny", dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def eval_records(tmp_path_factory) -> Path:
    """Two samples x two styles; 128 px originals, masks, and pseudo-GT (= stylized inside the mask)."""
    root = tmp_path_factory.mktemp("eval")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(2):
        original = rng.integers(0, 255, (128, 128, 3), dtype=np.uint8)
        mask = np.zeros((128, 128), bool)
        mask[20:70, 30:90] = True
        write_image(root / f"o{i}.png", original)
        write_mask(root / f"m{i}.png", mask)
        for style in STYLES:
            pgt = original.copy()
            pgt[mask] = 255 - pgt[mask]
            write_image(root / f"p{i}_{style}.png", pgt)
            rows.append({"id": f"{i:03d}_{style}", "sample_id": f"{i:03d}", "image_id": i, "style": style,
                         "object": "dog", "original": f"o{i}.png", "mask": f"m{i}.png",
                         "pseudo_gt": f"p{i}_{style}.png", "area": 3000.0, "area_frac": 0.18})  # fmt: skip
    write_jsonl(root / "manifest.jsonl", rows)
    return root / "manifest.jsonl"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A 'trained' model: experts with nonzero B (so regionroute differs from kontext)."""
    return _trained(tmp_path_factory.mktemp("model"), TINY, text_length=32)


def _trained(out: Path, models: ModelsConfig, text_length: int) -> Path:
    """Experts with random nonzero B on ``models.kontext``, saved as the train stage exports them."""
    import torch

    moe = inject_lora_moe(load_kontext(models).transformer, LoraConfig(), STYLES)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in moe.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.5)
    save_moe(moe, out / "moe")
    config = {"base_model": models.kontext, "styles": list(STYLES), "train": {"max_sequence_length": text_length},
              "latent_hw": [16, 16]}  # fmt: skip
    write_json(out / "regionroute.json", config)
    return out


def _editor(model_dir: Path | None = None, merge: bool = True) -> Editor:
    from regionroute.lora_moe import load_moe

    pipe = load_kontext(TINY)
    moe = load_moe(pipe.transformer, model_dir / "moe") if model_dir else None
    return Editor(pipe, CFG, moe=moe, merge=merge)


def test_each_method_writes_one_image_per_pair_and_style(eval_records, model_dir, tmp_path):
    outs = {}
    for method, editor in (("base", _editor()), ("regionroute", _editor(model_dir)), ("oracle", None)):
        n = run_method(method, eval_records, tmp_path / method, CFG, editor, models=TINY, model_dir=model_dir)
        rows = read_jsonl(tmp_path / method / "manifest.jsonl")
        assert n == 4 and len(rows) == 4 and {r["style"] for r in rows} == set(STYLES)
        for r in rows:
            assert read_image(tmp_path / method / r["image"]).shape == (128, 128, 3)
            if method != "oracle":
                with np.load(tmp_path / method / r["attention"]) as z:
                    assert z["maps"].shape == (5, 8, 8) and list(z["steps"]) == [1, 2, 3, 4, 5]
                    np.testing.assert_allclose(z["mean"], z["maps"].mean(0), rtol=1e-6)
                    assert np.all(z["maps"] >= 0) and np.isfinite(z["maps"]).all()
                assert (tmp_path / method / "figures" / f"{r['id']}.png").is_file()
        outs[method] = {r["id"]: read_image(tmp_path / method / r["image"]) for r in rows}
    root = eval_records.parent
    for r in read_jsonl(eval_records):  # the oracle keeps the background exactly
        mask, original = read_mask(root / r["mask"]), read_image(root / r["original"])
        np.testing.assert_array_equal(outs["oracle"][r["id"]][~mask], original[~mask])
    assert any(not np.array_equal(outs["base"][k], outs["regionroute"][k]) for k in outs["base"])
    # resumable: a second run generates nothing
    assert run_method("oracle", eval_records, tmp_path / "oracle", CFG) == 0


def test_a_run_killed_mid_batch_resumes_to_the_bytes_of_an_uninterrupted_run(eval_records, model_dir, tmp_path,
                                                                              monkeypatch):  # fmt: skip
    def run(out: Path) -> int:
        return run_method("regionroute", eval_records, out, CFG, _editor(model_dir), models=TINY, model_dir=model_dir)

    assert run(tmp_path / "straight") == 4
    with killed_after_the_first_item(monkeypatch):
        run(tmp_path / "killed")
    regenerated = run(tmp_path / "killed")
    for sub in ("images", "attention"):
        for path in sorted((tmp_path / "straight" / sub).iterdir()):
            assert (tmp_path / "killed" / sub / path.name).read_bytes() == path.read_bytes(), path.name
    assert regenerated == 4  # the killed batch (2 pairs of one style) whole, and the other style's, not begun


def test_merged_and_routed_experts_give_the_same_edit(eval_records, model_dir):
    root = eval_records.parent
    image = read_image(root / "o0.png")
    merged, m_maps = _editor(model_dir, merge=True).edit([image], ["dog"], "line-art", [3])
    routed, r_maps = _editor(model_dir, merge=False).edit([image], ["dog"], "line-art", [3])
    assert np.abs(merged[0].astype(int) - routed[0]).max() <= 2
    np.testing.assert_allclose(m_maps, r_maps, rtol=1e-3, atol=1e-5)


def _edit(image: Path, model: Path, out: Path, capsys, *extra: str) -> list[str]:
    """Run ``regionroute edit``; return its stdout lines."""
    argv = ["edit", str(image), "--object", "dog", "--style", "pixel-art", "--model", str(model), "--out", str(out),
            "--steps", "2", *extra]  # fmt: skip
    code = cli.main(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out.splitlines()


def test_edit_command_end_to_end(model_dir, eval_records, tmp_path, capsys):
    out = tmp_path / "out.png"
    lines = _edit(eval_records.parent / "o0.png", model_dir, out, capsys, "--attention-png", str(tmp_path / "a.png"))
    assert read_image(out).shape == (128, 128, 3) and (tmp_path / "a.png").is_file()
    assert lines == [
        f"model: {model_dir} (experts on the base model 'tiny', from its regionroute.json)",  # no toy note
        f"wrote {out}: 128x128, edited at 128x128 (the model's working resolution)",
    ]


def test_edit_returns_the_inputs_size_from_a_smaller_working_resolution(model_dir, tmp_path, capsys):
    """200 x 150 is above the training area (128 x 128): edited at 144 x 96 (sides multiples of 16), resized back."""
    image = tmp_path / "wide.png"
    write_image(image, np.random.default_rng(1).integers(0, 255, (150, 200, 3), dtype=np.uint8))
    lines = _edit(image, model_dir, tmp_path / "out.png", capsys)
    assert read_image(tmp_path / "out.png").shape == (150, 200, 3)
    wrote = f"wrote {tmp_path / 'out.png'}: 200x150, edited at 144x96 (the model's working resolution) and resized back"
    assert lines[-1] == wrote


def test_edit_with_the_toy_world_says_once_that_photographs_are_out_of_its_reach(tmp_path, capsys):
    from regionroute.edit import TOY_NOTE

    model = _trained(tmp_path / "toy_model", ModelsConfig(kontext="toy", device="cpu"), text_length=16)
    image = tmp_path / "photo.png"  # a photograph's 4:3 aspect, above the toy world's 64 x 64 area
    write_image(image, np.random.default_rng(2).integers(0, 255, (75, 100, 3), dtype=np.uint8))
    lines = _edit(image, model, tmp_path / "out.png", capsys)
    assert lines[0] == f"model: {model} (experts on the base model 'toy', from its regionroute.json)"
    assert [line for line in lines if "toy world" in line] == [TOY_NOTE]
    assert "photographs are not meaningful" in TOY_NOTE and "configs/paper.yaml" in TOY_NOTE
    assert "edited at 64x48" in lines[-1] and read_image(tmp_path / "out.png").shape == (75, 100, 3)


def test_edit_applies_the_exif_orientation_of_a_photo(model_dir, tmp_path, capsys):
    from tests.test_files import _rotated_photo

    _rotated_photo(tmp_path / "photo.jpg")  # stored 128 x 64, shown 64 x 128
    out = tmp_path / "out.png"
    argv = ["edit", str(tmp_path / "photo.jpg"), "--object", "dog", "--style", "pixel-art", "--model", str(model_dir),
            "--out", str(out), "--steps", "2"]  # fmt: skip
    code, err = run_stage(cli.main, argv, capsys)
    assert code == 0, err
    assert read_image(out).shape == (128, 64, 3)


def test_edit_loads_the_base_in_the_dtype_the_experts_were_trained_in(
    model_dir, eval_records, tmp_path, capsys, monkeypatch
):
    """The paper trains on bf16 weights: `regionroute edit` without --dtype loaded FLUX.1-Kontext in float32
    (2x the memory: 63 GB of weights, over the 48 GB GPU `regionroute check` says infer fits)."""
    import shutil

    import regionroute.models.kontext as kontext
    from regionroute.files import read_json

    trained = tmp_path / "model"
    shutil.copytree(model_dir, trained)
    write_json(trained / "regionroute.json", {**read_json(trained / "regionroute.json"), "dtype": "bfloat16"})
    loaded, real = [], kontext.load_kontext
    monkeypatch.setattr(kontext, "load_kontext", lambda cfg: loaded.append(cfg.dtype) or real(cfg))
    argv = ["edit", str(eval_records.parent / "o0.png"), "--object", "dog", "--style", "pixel-art", "--model",
            str(trained), "--out", str(tmp_path / "out.png"), "--steps", "2"]  # fmt: skip
    code, err = run_stage(cli.main, argv, capsys)
    assert code == 0, err
    assert loaded == ["bfloat16"]
    code, err = run_stage(cli.main, [*argv, "--dtype", "float32"], capsys)  # an explicit --dtype still wins
    assert code == 0 and loaded == ["bfloat16", "float32"], err


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"image": "missing.png"}, "missing.png: image file not found"),
        ({"image": "corrupt.png"}, "corrupt.png: cannot read image"),
        ({"--style": "watercolor"}, "available: pixel-art, line-art"),
        ({"--model": "no_such_dir"}, "--model: "),
        ({"--object": "dog " * 40}, "--object: cannot place"),
    ],
)
def test_edit_command_errors_are_one_line(model_dir, eval_records, tmp_path, capsys, change, needle):
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG garbage")
    args = {"image": str(eval_records.parent / "o0.png"), "--object": "dog", "--style": "pixel-art",
            "--model": str(model_dir)}  # fmt: skip
    args |= {k: (str(tmp_path / v) if k in ("image", "--model") else v) for k, v in change.items()}
    argv = ["edit", args["image"], "--out", str(tmp_path / "o.png"), "--steps", "2"]
    for k in ("--object", "--style", "--model"):
        argv += [k, args[k]]
    code, err = run_stage(cli.main, argv, capsys)
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o.png").exists()


def test_unknown_method_is_one_line(eval_records, tmp_path, capsys):
    from stages import infer

    code, err = run_stage(infer.main, ["--method", "sdedit", "--records", str(eval_records), "--out",
                                       str(tmp_path / "x")], capsys)  # fmt: skip
    assert code == 2 and "unknown method 'sdedit'" in err


def test_attention_steps_beyond_steps_is_a_config_error():
    from regionroute.errors import ConfigError

    with pytest.raises(ConfigError, match=r"infer\.attention_steps: step 30 is outside"):
        dataclasses.replace(CFG, attention_steps=(30,))


@pytest.fixture(scope="module")
def learned_model_dir(tmp_path_factory) -> Path:
    """Experts trained with ``routing: learned``: nonzero B per expert and a nonzero MoLE gate."""
    import torch

    out = tmp_path_factory.mktemp("learned")
    pipe = load_kontext(TINY)
    moe = inject_lora_moe(pipe.transformer, LoraConfig(routing="learned", router_temperature=0.5), STYLES)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in moe.trainable_parameters():  # includes the gate's weight and bias
            p.add_(torch.randn_like(p) * 0.5)
    save_moe(moe, out / "moe")
    write_json(out / "regionroute.json", {"base_model": "tiny", "styles": list(STYLES),
                                          "train": {"max_sequence_length": 32}, "latent_hw": [16, 16]})  # fmt: skip
    return out


def test_learned_routing_is_applied_at_inference(eval_records, learned_model_dir):
    """Output == a pipeline whose weights carry sum_e g_e (alpha/r) B_e A_e, g = the gate computed by hand."""
    import torch
    from safetensors.torch import load_file

    from regionroute.flux.pipeline import kontext_edit

    root = eval_records.parent
    images = [read_image(root / "o0.png"), read_image(root / "o1.png")]
    objects, seeds, style = ["dog", "cat"], [3, 4], "line-art"
    outs, _ = _editor(learned_model_dir).edit(images, objects, style, seeds)

    state = load_file(str(learned_model_dir / "moe" / "moe.safetensors"))
    lora = LoraConfig(routing="learned", router_temperature=0.5)
    prompts = [CFG.instruction.format(object=o, style=style) for o in objects]
    pipe = load_kontext(TINY)
    _, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, device="cpu", max_sequence_length=32)
    gates = torch.softmax((pooled @ state["router.gate.weight"].T + state["router.gate.bias"]) / 0.5, dim=-1)
    assert gates.shape == (2, 2) and not torch.allclose(gates[0], gates[1])  # per-sample routing
    names = sorted({k.split(".", 1)[1].rsplit(".", 1)[0] for k in state if k.startswith("experts.")})
    for i in range(2):
        ref = load_kontext(TINY)
        with torch.no_grad():
            for name in names:
                a, b = state[f"experts.{name}.lora_A"], state[f"experts.{name}.lora_B"]  # (E, r, in), (E, out, r)
                delta = sum(gates[i, e] * lora.scaling * b[e] @ a[e] for e in range(len(STYLES)))
                ref.transformer.get_submodule(name).weight.add_(delta)
        expected = kontext_edit(ref, [images[i]], [prompts[i]], [seeds[i]], CFG.steps, CFG.guidance, 32)[0]
        assert np.abs(outs[i].astype(int) - expected).max() <= 2
    # and it is not what routing by the style name gives
    hard = _editor(learned_model_dir, merge=False)
    hard.learned = False
    by_name, _ = hard.edit(images[:1], objects[:1], style, seeds[:1])
    assert np.abs(by_name[0].astype(int) - outs[0]).max() > 2


def _copy_records(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src.parent, dst)
    return dst / src.name


def test_changed_inputs_are_recomputed_and_nothing_else(eval_records, tmp_path):
    records = _copy_records(eval_records, tmp_path / "eval")
    root = records.parent
    out = tmp_path / "base"
    cfg = dataclasses.replace(CFG, batch_size=1)  # a changed pair's batch mates are regenerated with it
    assert run_method("base", records, out, cfg, _editor(), models=TINY) == 4
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "images").iterdir()}
    write_image(root / "o1.png", 255 - read_image(root / "o1.png"))  # sample 1's pixels change, not its path
    assert run_method("base", records, out, cfg, _editor(), models=TINY) == 2
    for p in (out / "images").iterdir():
        assert (p.stat().st_mtime_ns == stamps[p.name]) == p.name.startswith("000_")
    # the oracle follows the pseudo-GT's pixels
    assert run_method("oracle", records, tmp_path / "oracle", cfg) == 4
    rows = read_jsonl(records)
    write_image(root / rows[0]["pseudo_gt"], read_image(root / rows[0]["pseudo_gt"]) // 2)
    assert run_method("oracle", records, tmp_path / "oracle", cfg) == 1
    for r in rows:
        np.testing.assert_array_equal(read_image(tmp_path / "oracle" / "images" / f"{r['id']}.png"),
                                      read_image(root / r["pseudo_gt"]))  # fmt: skip
    # a pair that disappears from the records is pruned
    write_jsonl(records, rows[1:])
    assert run_method("oracle", records, tmp_path / "oracle", cfg) == 0
    assert sorted(p.stem for p in (tmp_path / "oracle" / "images").iterdir()) == sorted(r["id"] for r in rows[1:])


def test_eval_noise_is_independent_of_the_pseudo_gt_noise():
    from regionroute.seeds import item_seed

    # deterministic, distinct per image and seed, and never one of the stylize stage's seeds
    assert item_seed("infer", 0, 72) == item_seed("infer", 0, 72)
    seeds = {item_seed("infer", s, i) for s in range(4) for i in range(5000)}
    assert len(seeds) == 4 * 5000
    assert not seeds & {item_seed("stylize", s, i) for s in range(4) for i in range(5000)}
    assert all(0 < s < 2**63 for s in seeds)


def test_the_stage_edits_with_the_image_seed(eval_records, tmp_path):
    from regionroute.flux.pipeline import kontext_edit
    from regionroute.seeds import item_seed

    editor = _editor()
    run_method("base", eval_records, tmp_path / "k", CFG, editor, models=TINY)
    rows = read_jsonl(tmp_path / "k" / "manifest.jsonl")
    r = next(r for r in rows if r["image_id"] == 1)
    assert r["seed"] == item_seed("infer", CFG.seed, 1) != CFG.seed + 1
    src = next(x for x in read_jsonl(eval_records) if x["id"] == r["id"])
    image = read_image(eval_records.parent / src["original"])
    prompt = CFG.instruction.format(object=r["object"], style=r["style"])
    ref = kontext_edit(editor.pipe, [image], [prompt], [r["seed"]], CFG.steps, CFG.guidance, CFG.max_sequence_length)[0]
    other = kontext_edit(
        editor.pipe, [image], [prompt], [CFG.seed + 1], CFG.steps, CFG.guidance, CFG.max_sequence_length
    )[0]
    got = read_image(tmp_path / "k" / r["image"])
    assert np.abs(got.astype(int) - ref.astype(int)).max() <= 1
    assert np.abs(got.astype(int) - other.astype(int)).max() > 1  # the seed matters: the check can fail
