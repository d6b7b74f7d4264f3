"""Stage ``train``: attention loss goes down, resume is exact, NaN stops cleanly, errors are one line."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from regionroute.config import LossConfig, ModelsConfig, TrainConfig
from regionroute.files import write_image, write_jsonl, write_mask
from regionroute.lora_moe import LoraConfig, load_moe
from regionroute.lora_moe.export import read_model_config
from regionroute.models.kontext import load_kontext
from regionroute.objective import encode_dataset
from regionroute.train import TrainingError, train
from stages import train as train_stage
from tests.conftest import ROOT, run_stage

STYLES = ("pixel-art", "cyberpunk")
CFG = TrainConfig(steps=6, learning_rate=1e-2, batch_size=2, gradient_accumulation=2, mixed_precision="no",
                  gradient_checkpointing=False, max_sequence_length=32, checkpoint_every=2, log_every=2)  # fmt: skip
LOSS = LossConfig(focus_weight=1.0, cover_weight=0.1)
LORA = LoraConfig()


def _records(root: Path, n: int = 6, size: int = 128) -> Path:
    """Hand-made records: a bright square object (mask) on noise; the pseudo-GT recolours it."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        original = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
        mask = np.zeros((size, size), bool)
        y, x = rng.integers(0, size // 2, 2)
        mask[y : y + size // 3, x : x + size // 3] = True
        pgt = original.copy()
        pgt[mask] = (255, 0, 255) if i % 2 else (0, 255, 255)
        style = STYLES[i % 2]
        for name, img in (("o", original), ("p", pgt)):
            write_image(root / f"{name}{i}.png", img)
        write_mask(root / f"m{i}.png", mask)
        rows.append({"id": f"{i}_{style}", "style": style, "object": "dog", "original": f"o{i}.png",
                     "pseudo_gt": f"p{i}.png", "mask": f"m{i}.png",
                     "instruction": f"make the dog into {style} style"})  # fmt: skip
    write_jsonl(root / "manifest.jsonl", rows)
    return root / "manifest.jsonl"


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    records = _records(tmp_path_factory.mktemp("records"))
    pipe = load_kontext(ModelsConfig(kontext="tiny", dtype="float32", device="cpu"))
    return records, encode_dataset(pipe, records, STYLES, CFG, object_elements=True)


def _pipe():
    return load_kontext(ModelsConfig(kontext="tiny", dtype="float32", device="cpu"))


def test_training_lowers_attention_loss_and_trains_only_experts(encoded, tmp_path):
    _, cache = encoded
    pipe = _pipe()
    base = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    cfg = dataclasses.replace(CFG, steps=30, gradient_accumulation=1)
    summary = train(pipe, cache, STYLES, LORA, LOSS, cfg, tmp_path / "model", tmp_path / "ckpt", tmp_path / "live")
    before = summary["probe_before/focus"] + 0.1 * summary["probe_before/cover"]
    after = summary["probe_after/focus"] + 0.1 * summary["probe_after/cover"]
    assert after < before, summary
    assert all(np.isfinite(v) for v in summary.values())
    # the base weights did not move (only the experts train)
    for k, v in pipe.transformer.state_dict().items():
        if k in base:
            torch.testing.assert_close(v, base[k], rtol=0, atol=0)
    moe_state = load_moe(_pipe().transformer, tmp_path / "model" / "moe").state_dict()
    assert any(k.endswith("lora_B") and v.abs().sum() > 0 for k, v in moe_state.items())
    config = read_model_config(tmp_path / "model")
    assert config["styles"] == list(STYLES) and (tmp_path / "model" / "lora" / "pixel-art.safetensors").is_file()
    assert config["dtype"] == "float32"  # the base's dtype in training: what `regionroute edit` loads it in
    assert (tmp_path / "model" / "README.md").is_file()  # the model card
    assert (tmp_path / "live" / "metrics.json").is_file()


class _Kill(Exception):
    pass


def test_killed_run_resumes_to_the_same_result(encoded, tmp_path):
    _, cache = encoded

    def kill_at_3(step: int) -> None:
        if step == 3:
            raise _Kill

    with pytest.raises(_Kill):
        train(_pipe(), cache, STYLES, LORA, LOSS, CFG, tmp_path / "m1", tmp_path / "c1", on_step=kill_at_3)
    assert not (tmp_path / "m1").exists()  # nothing that looks finished
    steps_done = []
    train(_pipe(), cache, STYLES, LORA, LOSS, CFG, tmp_path / "m1", tmp_path / "c1", on_step=steps_done.append)
    assert steps_done == [3, 4, 5, 6]  # resumed from the step-2 checkpoint, ends at train.steps
    train(_pipe(), cache, STYLES, LORA, LOSS, CFG, tmp_path / "m2", tmp_path / "c2")
    resumed = load_moe(_pipe().transformer, tmp_path / "m1" / "moe").state_dict()
    straight = load_moe(_pipe().transformer, tmp_path / "m2" / "moe").state_dict()
    for k in straight:
        torch.testing.assert_close(resumed[k], straight[k], rtol=1e-5, atol=1e-6)


def test_checkpoints_of_another_config_are_not_resumed(encoded, tmp_path):
    _, cache = encoded
    train(_pipe(), cache, STYLES, LORA, LOSS, dataclasses.replace(CFG, steps=2), tmp_path / "m", tmp_path / "c")
    steps_done = []
    other = dataclasses.replace(LOSS, focus_weight=0.0)
    train(_pipe(), cache, STYLES, LORA, other, CFG, tmp_path / "m", tmp_path / "c", on_step=steps_done.append)
    assert steps_done[0] == 1


def test_non_finite_loss_stops_and_keeps_last_checkpoint(encoded, tmp_path):
    _, cache = encoded
    poisoned = dataclasses.replace(cache, x0=cache.x0.clone())

    def poison(step: int) -> None:
        if step == 2:
            poisoned.x0[:] = float("nan")

    with pytest.raises(TrainingError, match=r"non-finite loss at step 3 .*last good checkpoint: .*step-0000002"):
        train(_pipe(), poisoned, STYLES, LORA, LOSS, CFG, tmp_path / "m", tmp_path / "c", on_step=poison)
    assert (tmp_path / "c" / "step-0000002" / "state.json").is_file() and not (tmp_path / "m").exists()


def test_stage_reports_missing_records_in_one_line(params_file, tmp_path, capsys):
    argv = ["--params", str(params_file()), "--records", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "m"),
            "--checkpoints", str(tmp_path / "c")]  # fmt: skip
    code, err = run_stage(train_stage.main, argv, capsys)
    assert code == 2 and "nope.jsonl: file not found" in err.strip().splitlines()[-1]


def _tsv(live: Path, name: str) -> list[tuple[int, float]]:
    rows = (live / "plots" / "metrics" / "train" / f"{name}.tsv").read_text().splitlines()[1:]
    return [(int(step), float(value)) for step, value in (r.split("\t") for r in rows)]


def test_new_pseudo_gt_pixels_restart_training(encoded, tmp_path):
    """Same records, paths and count; other pixels: every step runs again and the experts differ."""
    from regionroute.files import read_json

    _, cache = encoded
    cfg = dataclasses.replace(CFG, steps=4)
    train(_pipe(), cache, STYLES, LORA, LOSS, cfg, tmp_path / "m", tmp_path / "c", tmp_path / "live")
    first = load_moe(_pipe().transformer, tmp_path / "m" / "moe").state_dict()
    other = dataclasses.replace(cache, x0=cache.x0.flip(1))  # e.g. composite.method changed the pseudo-GT
    steps_done = []
    train(_pipe(), other, STYLES, LORA, LOSS, cfg, tmp_path / "m", tmp_path / "c", tmp_path / "live",
          on_step=steps_done.append)  # fmt: skip
    assert steps_done == [1, 2, 3, 4]
    assert read_json(tmp_path / "live" / "metrics.json")["step"] == 4
    assert [s for s, _ in _tsv(tmp_path / "live", "total")] == [2, 4]
    second = load_moe(_pipe().transformer, tmp_path / "m" / "moe").state_dict()
    assert any(not torch.equal(first[k], second[k]) for k in first if k.endswith("lora_B"))


def test_resumed_run_logs_exactly_what_the_uninterrupted_run_logs(encoded, tmp_path):
    _, cache = encoded
    # a learning rate that changes every step: the resumed run continues the schedule's state
    cfg = dataclasses.replace(CFG, log_every=1, checkpoint_every=2, lr_scheduler="cosine", lr_warmup_steps=2)

    def kill_at_3(step: int) -> None:  # step 3 is logged, the last checkpoint is step 2
        if step == 3:
            raise _Kill

    with pytest.raises(_Kill):
        train(_pipe(), cache, STYLES, LORA, LOSS, cfg, tmp_path / "m1", tmp_path / "c1", tmp_path / "l1",
              on_step=kill_at_3)  # fmt: skip
    summary = train(_pipe(), cache, STYLES, LORA, LOSS, cfg, tmp_path / "m1", tmp_path / "c1", tmp_path / "l1")
    straight = train(_pipe(), cache, STYLES, LORA, LOSS, cfg, tmp_path / "m2", tmp_path / "c2", tmp_path / "l2")
    for name in ("total", "flow", "focus", "cover", "n_empty", "lr"):
        resumed, ref = _tsv(tmp_path / "l1", name), _tsv(tmp_path / "l2", name)
        assert [s for s, _ in resumed] == [1, 2, 3, 4, 5, 6]
        np.testing.assert_allclose([v for _, v in resumed], [v for _, v in ref], rtol=1e-5)
    assert summary["n_empty_total"] == straight["n_empty_total"]
    # the summary DVC hashes: the same keys in the same order (the values agree to float noise, above)
    resumed, ref = ((tmp_path / run / "metrics.json").read_text() for run in ("l1", "l2"))
    assert re.findall(r'"([^"]+)":', resumed) == re.findall(r'"([^"]+)":', ref)


def test_empty_masks_are_counted_per_step(encoded, tmp_path):
    _, cache = encoded
    empty = dataclasses.replace(cache, mask_grid=cache.mask_grid.clone())
    empty.mask_grid[::2] = 0  # half the records lose their mask on the token grid
    cfg = dataclasses.replace(CFG, steps=2, log_every=1)
    summary = train(_pipe(), empty, STYLES, LORA, LOSS, cfg, tmp_path / "m", tmp_path / "c", tmp_path / "live")
    counts = [v for _, v in _tsv(tmp_path / "live", "n_empty")]
    assert len(counts) == 2 and summary["n_empty_total"] == sum(counts) > 0
    # samples per step: at most batch_size x gradient_accumulation
    assert all(0 <= c <= cfg.batch_size * cfg.gradient_accumulation for c in counts)


def test_paper_training_path_bf16_checkpointing_accumulation(encoded, tmp_path, monkeypatch):
    """bf16 autocast + gradient checkpointing + accumulation: finite, and maps float32 = fp32 maps of the same q/k."""
    from regionroute.flux import attention

    _, cache = encoded
    checked = []
    real = attention._layer_map

    def spy(query, key, *args):
        out = real(query, key, *args)
        with torch.autocast("cpu", enabled=False):
            ref = real(query.detach().float(), key.detach().float(), *args)
        checked.append((out.dtype, float(((out.detach() - ref).abs() / ref.abs().clamp_min(1e-12)).max())))
        return out

    monkeypatch.setattr(attention, "_layer_map", spy)
    cfg = dataclasses.replace(CFG, steps=2, mixed_precision="bf16", gradient_checkpointing=True,
                              gradient_accumulation=2)  # fmt: skip
    summary = train(_pipe(), cache, STYLES, LORA, LOSS, cfg, tmp_path / "m", tmp_path / "c")
    assert all(np.isfinite(v) for v in summary.values()), summary
    assert checked and all(dtype == torch.float32 for dtype, _ in checked)
    assert max(err for _, err in checked) < 1e-4, max(err for _, err in checked)


def test_bf16_training_prints_no_library_warning(tmp_path):
    """torch notes once per process that RMSNorm under bf16 autocast cannot use its fused kernel (harmless): the
    train loop drops that notice. Run in a fresh process, where the note has not been printed yet."""
    script = textwrap.dedent(f"""
        import dataclasses
        from pathlib import Path
        from regionroute.objective import encode_dataset
        from regionroute.train import train
        from tests.test_train import CFG, LORA, LOSS, STYLES, _pipe, _records
        root, pipe = Path({str(tmp_path)!r}), _pipe()
        cfg = dataclasses.replace(CFG, steps=1, mixed_precision="bf16", gradient_accumulation=1)
        cache = encode_dataset(pipe, _records(root, n=2), STYLES, cfg, object_elements=True)
        train(pipe, cache, STYLES, LORA, LOSS, cfg, root / "m", root / "c")
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [line for line in proc.stderr.splitlines() if "Warning" in line or "Mismatch" in line] == []


@pytest.mark.parametrize("object_weight", [0.0, 3.0])
def test_object_weight_scales_the_flow_loss_of_the_masks_values(encoded, object_weight):
    """Known answer: the flow loss with the object's latent values weighted by hand-made coverage."""
    from regionroute.flux.flow import kontext_image_ids, noisy, transformer_inputs
    from regionroute.lora_moe import RoutedTransformer, inject_lora_moe
    from regionroute.objective import Objective

    _, cache = encoded
    pipe = _pipe()
    moe = inject_lora_moe(pipe.transformer, LORA, STYLES)
    model = RoutedTransformer(moe)
    loss = dataclasses.replace(LOSS, focus_weight=0.0, cover_weight=0.0)
    draw = Objective(pipe, model, moe, None, cache, CFG, loss, 0.0).draw(torch.Generator().manual_seed(0), 2)
    flows = {w: Objective(pipe, model, moe, None, cache, CFG, dataclasses.replace(loss, object_weight=w), 0.0)(draw)
             for w in (1.0, object_weight)}  # fmt: skip
    idx, c = draw["idx"], cache
    x0, noise, sigma = c.x0[idx], draw["noise"], draw["sigma"]
    ids = kontext_image_ids(c.latent_hw, torch.device("cpu"), torch.float32)
    kwargs = transformer_inputs(noisy(x0, noise, sigma), c.context[idx], sigma, c.prompt_embeds[idx], c.pooled[idx],
                                ids, CFG.guidance, torch.float32)  # fmt: skip
    with torch.no_grad():
        pred = model(style_ids=c.style_ids[idx], pooled=c.pooled[idx], **kwargs)[0][:, : x0.shape[1]]
    err = (pred - (noise - x0)) ** 2  # (B, N, C); the default weighting_scheme "none" weighs 1
    cover = c.object_elements[idx]
    assert 0 < float(cover.mean()) < 1  # the hand-made masks cover some values, not all
    # a VAE latent: each value weighs its latent pixel's area coverage, which averages to the token's
    torch.testing.assert_close(cover.mean(-1), c.mask_grid[idx].flatten(1))
    torch.testing.assert_close(flows[1.0]["flow"].detach(), err.mean())
    values = 1 + (object_weight - 1) * cover  # then scaled to mean 1 per sample
    expected = (err * values / values.mean((1, 2), keepdim=True)).mean()
    torch.testing.assert_close(flows[object_weight]["flow"].detach(), expected)
    bare = dataclasses.replace(cache, object_elements=torch.zeros(cache.n_records, 0, 0))
    with pytest.raises(ValueError, match="object_elements"):
        Objective(pipe, model, moe, None, bare, CFG, dataclasses.replace(loss, object_weight=3.0), 0.0)(draw)


def test_element_coverage_of_the_toy_latent_is_each_values_own_pixel():
    """Known answer: the pixel-shuffle latent's values inside a hand-made mask are those of the mask's pixels."""
    from regionroute.losses import downsample_mask, element_coverage
    from regionroute.toy.latent import PixelShuffleVAE

    vae = PixelShuffleVAE()  # factor 4: 48 values per latent pixel
    mask = torch.zeros(2, 16, 16)
    mask[0, 3:9, 5:14] = 1  # straddles latent pixels
    mask[1, 0, 0] = 1  # one pixel
    image = torch.rand(2, 3, 16, 16)
    cover = element_coverage(vae, mask, (2, 48, 4, 4))
    assert cover.shape == (2, 48, 4, 4) and set(cover.unique().tolist()) == {0.0, 1.0}
    latent = vae.encode(image).latent_dist.mode()
    torch.testing.assert_close(latent * cover, vae.encode(image * mask[:, None]).latent_dist.mode())
    torch.testing.assert_close(cover.mean(1), downsample_mask(mask, 4, 4))  # a latent pixel's area coverage
