"""Accounting without weights: exact counts at the real dimensions, LoRA key names diffusers loads,
and the activation tracer validated on CPU (regionroute.check: accounting, memtrace, traces)."""

from __future__ import annotations

import logging
import math
import os
import subprocess
import sys
import warnings
from dataclasses import replace

import pytest
import torch

from regionroute.check.accounting import account, lora_summary, optimizer_state_bytes
from regionroute.check.configs import FLUX_KONTEXT_DEV
from regionroute.check.memtrace import LiveBytes, cuda_autocast, cuda_float32_policy
from regionroute.check.traces import FluxCall, TrainCall, trace_flux, trace_train
from regionroute.config import TrainConfig, load_params, load_section
from tests.conftest import ROOT

PAPER = ROOT / "configs" / "paper.yaml"
STYLES = ("pixel-art", "cyberpunk", "expressionism", "line-art")
DOUBLE, SINGLE = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0"), ("attn.to_q", "attn.to_k", "attn.to_v")
TINY = dict(
    patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
    joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 4, 8),
)  # fmt: skip


@pytest.fixture(scope="module")
def paper_counts():
    return account(load_params(PAPER), activations=False, use_cache=False)


def _lora(**overrides):
    from regionroute.lora_moe import LoraConfig

    return LoraConfig.from_dict({**load_section(PAPER, "lora").to_dict(), **overrides})


# -- exact counts at the real dimensions ---------------------------------------------------------------
def test_paper_model_sizes(paper_counts):
    p = paper_counts.params
    # FLUX.1 transformer 11.9B, T5-XXL encoder 4.76B, CLIP-L text 123M, FLUX VAE 83.8M, Qwen2.5-VL-7B 8.29B,
    # open_clip ViT-L-14 428M: the published sizes, here exact from the configs built on meta
    assert p["transformer"] == 11_901_408_320
    assert p["text_encoder_2"] == 4_762_310_656
    assert p["text_encoder"] == 123_060_480
    assert p["vae"] == 83_819_683
    assert p["vlm"] == 8_292_166_656
    assert p["clip"] == 427_616_513
    assert paper_counts.stages["stylize"].weights == 2 * sum(
        p[k] for k in ("transformer", "text_encoder", "text_encoder_2", "vae")
    )
    assert paper_counts.stages["train"].weights == 2 * p["transformer"]  # encoders are freed before training


def test_paper_lora_modules_and_params(paper_counts):
    lora = paper_counts.lora
    expected = {f"double:{t}": 19 for t in DOUBLE} | {f"single:{t}": 38 for t in SINGLE}
    assert lora["lora_modules"] == expected
    e, r, d = len(STYLES), 4, 3072  # experts, rank, hidden (every target is 3072 -> 3072)
    assert lora["lora_params"]["double"] == 19 * 4 * e * r * (d + d) == 7_471_104
    assert lora["lora_params"]["single"] == 38 * 3 * e * r * (d + d) == 11_206_656
    assert lora["lora_params"]["total"] == 18_677_760
    n = lora["lora_params"]["total"]
    assert paper_counts.trainable_bytes == {"params": 4 * n, "grads": 4 * n, "optimizer": 8 * n, "total": 16 * n}


def test_paper_tokens(paper_counts):
    assert paper_counts.tokens["train"] == {"text": 77, "image": 4096, "context": 4096, "sequence": 8269}
    assert paper_counts.tokens["stylize"]["sequence"] == 512 + 2 * 4096  # base Kontext's own length
    assert paper_counts.tokens["infer"]["sequence"] == 8269  # infer.max_sequence_length null: the experts' 77


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"double_stream": False}, {f"single:{t}": 38 for t in SINGLE}),
        ({"single_stream": False}, {f"double:{t}": 19 for t in DOUBLE}),
        ({"double_targets": ["attn.to_q", "ff"]}, {"double:attn.to_q": 19, "double:ff.net.0.proj": 19,
                                                   "double:ff.net.2": 19} | {f"single:{t}": 38 for t in SINGLE}),
    ],
)  # fmt: skip
def test_lora_ablations_inject_exactly_their_stream(overrides, expected):
    summary = lora_summary(FLUX_KONTEXT_DEV["transformer"], _lora(**overrides), STYLES)
    assert summary["lora_modules"] == expected


def test_optimizer_state_bytes():
    shapes = [(4, 4, 3072), (4, 3072, 4), (4, 750)]  # 49152, 49152 and 3000 elements
    assert optimizer_state_bytes(shapes, 4, "adamw") == 2 * 4 * (49152 * 2 + 3000)
    # bitsandbytes: uint8 moments + a float32 absmax per 2048 elements; float32 below 4096 elements; 2 qmaps
    big = 2 * 49152 + 2 * math.ceil(49152 / 2048) * 4
    assert optimizer_state_bytes(shapes, 4, "adamw8bit") == 2 * big + 2 * 3000 * 4 + 2 * 256 * 4


# -- exported key names are the ones diffusers loads into the real model ---------------------------------
def _real_flux_on_meta():
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        return FluxTransformer2DModel.from_config(FLUX_KONTEXT_DEV["transformer"])


def _diffusers_wrapped(state_dict, metadata):
    """Load a LoRA file's state dict with diffusers into a fresh real-dimension model; the wrapped modules."""
    from diffusers import FluxKontextPipeline
    from peft.tuners.tuners_utils import BaseTunerLayer

    messages: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("diffusers")
    logger.addHandler(handler)
    try:
        model = _real_flux_on_meta()
        FluxKontextPipeline.load_lora_into_transformer(
            state_dict, network_alphas=None, transformer=model, adapter_name="style", metadata=metadata,
            low_cpu_mem_usage=True,
        )  # fmt: skip
    finally:
        logger.removeHandler(handler)
    wrapped = {n: m for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)}
    return wrapped, messages


def test_exported_lora_keys_load_into_the_real_model_with_diffusers(tmp_path):
    from diffusers import FluxKontextPipeline

    from regionroute.lora_moe import export_experts, inject_lora_moe

    model = _real_flux_on_meta()
    moe = inject_lora_moe(model, _lora(), STYLES[:2])
    for layer in moe.layers.values():  # real expert weights (75 MB), the base stays on meta
        layer.lora_A = torch.nn.Parameter(torch.randn(layer.lora_A.shape))
        layer.lora_B = torch.nn.Parameter(torch.randn(layer.lora_B.shape))
    path = export_experts(moe, tmp_path)["pixel-art"]
    state_dict, metadata = FluxKontextPipeline.lora_state_dict(path, return_lora_metadata=True)
    expected = {f"transformer_blocks.{i}.{t}" for i in range(19) for t in DOUBLE}
    expected |= {f"single_transformer_blocks.{i}.{t}" for i in range(38) for t in SINGLE}
    assert all(k.startswith("transformer.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in state_dict)

    wrapped, messages = _diffusers_wrapped(state_dict, metadata)
    assert set(wrapped) == expected
    assert not [m for m in messages if "unexpected" in m or "missing" in m.lower()], messages
    layer = wrapped["single_transformer_blocks.37.attn.to_v"]
    assert tuple(layer.lora_A["style"].weight.shape) == (4, 3072) and layer.scaling["style"] == 1.0

    # the same check fails on a wrong name: it is not vacuous
    bad = dict(state_dict)
    for suffix in ("lora_A.weight", "lora_B.weight"):
        bad[f"transformer.transformer_blocks.0.attn.to_qq.{suffix}"] = bad.pop(
            f"transformer.transformer_blocks.0.attn.to_q.{suffix}"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # peft notes the target it could not fill
        wrapped, messages = _diffusers_wrapped(bad, metadata)
    assert set(wrapped) != expected and any("unexpected" in m for m in messages)


# -- the activation tracer ---------------------------------------------------------------------------
def test_live_bytes_known_answers():
    x = torch.randn(1000)  # before the trace: not counted
    with LiveBytes() as t:
        y = x * 2  # +4000
        z = y.view(10, 100)  # a view: no new storage
        y.add_(1)  # in place: none either
        w = torch.exp(z)  # +4000
        assert t.live == 8000
        del w  # freed
        assert (t.live, t.peak) == (4000, 8000)
        y.requires_grad_(True)
        s = (y * y).sum()  # y*y (4000) lives until sum (4) is made; autograd saves y (not new)
        assert (t.live, t.peak) == (4004, 8004)
        del s, z, y
        assert t.live == 0


@pytest.mark.parametrize("autocast", [None, torch.bfloat16])
def test_retained_bytes_equal_saved_tensors_plus_output(autocast):
    """What the tracer says the forward keeps = what autograd packs (saved_tensors_hooks) + the output."""
    from diffusers import FluxTransformer2DModel

    from regionroute.lora_moe import inject_lora_moe

    torch.manual_seed(0)
    model = FluxTransformer2DModel(**TINY).to(torch.bfloat16)
    moe = inject_lora_moe(model, _lora(), STYLES[:2])
    moe.route(style_ids=torch.tensor([0, 1]))
    b, L, n, dt = 2, 8, 16, torch.bfloat16
    inputs = dict(
        hidden_states=torch.randn(b, 2 * n, 16, dtype=dt), timestep=torch.rand(b, dtype=dt),
        pooled_projections=torch.randn(b, 32, dtype=dt), encoder_hidden_states=torch.randn(b, L, 32, dtype=dt),
        txt_ids=torch.zeros(L, 3, dtype=dt), img_ids=torch.zeros(2 * n, 3, dtype=dt), guidance=torch.ones(b),
        return_dict=False,
    )  # fmt: skip
    packed = {}

    def pack(t):
        packed[t.untyped_storage()._cdata] = t.untyped_storage()
        return t

    with LiveBytes() as tracker, cuda_float32_policy(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with cuda_autocast(autocast):
            out = model(**inputs)[0]
        kept = {k: st for k, st in packed.items() if k in tracker._refs}  # saved tensors allocated by the forward
        kept[out.untyped_storage()._cdata] = out.untyped_storage()
        assert tracker.live == sum(st.nbytes() for st in kept.values()) > 0


def _train(direction="text_to_image", lora=None, object_weight=1.0, **train):
    """A training micro-batch at tiny dimensions: batch 2, 8 T5 tokens, a 4 x 4 token grid."""
    loss = replace(load_section(PAPER, "loss"), direction=direction, object_weight=object_weight)
    cfg = TrainConfig(**{"batch_size": 2, "max_sequence_length": 8, **train})
    return TrainCall(cfg, lora or _lora(), loss, STYLES, (4, 4))


def _calls():
    lora, att = _lora(), ("text_to_image", "all", "all")
    return {
        "train, checkpointing, bf16 autocast": _train(gradient_checkpointing=True, mixed_precision="bf16"),
        "train, no checkpointing": _train(gradient_checkpointing=False, mixed_precision="bf16"),
        "train, image_to_text, learned routing": _train(
            "image_to_text", _lora(routing="learned"), gradient_checkpointing=True, mixed_precision="no"
        ),
        "train, object weight (toy)": _train(object_weight=20.0, mixed_precision="bf16"),
        "infer, routed experts, recorder": FluxCall(3, 8, (4, 4), lora=lora, experts=STYLES, attention=att),
        "stylize": FluxCall(2, 8, (4, 4)),
    }  # fmt: skip


def _trace(call, dtype=torch.bfloat16, fake=True, config=TINY):
    return (trace_train if isinstance(call, TrainCall) else trace_flux)(config, dtype, call, fake=fake)


@pytest.mark.parametrize("name", list(_calls()))
def test_fake_tensor_trace_equals_real_cpu_trace(name):
    """The traced bytes on fake tensors are those of the same code path on real CPU tensors (tiny dims)."""
    call = _calls()[name]
    fake, real = _trace(call, fake=True), _trace(call, fake=False)
    assert fake == real and fake.peak > 0


def test_the_train_trace_runs_the_training_objective(monkeypatch):
    """trace_train calls regionroute.objective.Objective: a change to the objective changes the trace."""
    from regionroute.objective import Objective

    call = _calls()["train, checkpointing, bf16 autocast"]
    before = _trace(call)
    real_call = Objective.__call__

    def with_an_extra_tensor(self, draw):
        terms = real_call(self, draw)
        terms["extra"] = torch.zeros(1000, 1000)  # kept alive by the terms, like any logged tensor
        return terms

    monkeypatch.setattr(Objective, "__call__", with_an_extra_tensor)
    after = _trace(call)
    assert after.retained == before.retained + 4_000_000 and after.peak >= before.peak + 4_000_000


def test_checkpointing_and_precision_change_the_trace():
    calls = _calls()
    ckpt = _trace(calls["train, checkpointing, bf16 autocast"])
    full = _trace(calls["train, no checkpointing"])
    assert ckpt.retained < full.retained and ckpt.peak < full.peak
    assert _trace(calls["stylize"], torch.float32).peak > _trace(calls["stylize"]).peak


def test_accounting_prints_no_library_warning(tmp_path):
    """Traced under CPU bf16 autocast, the attention's RMSNorm makes torch note once per process that it cannot use
    its fused kernel (harmless; `regionroute check` would print it): dropped. A fresh process, where it is not spent."""
    script = "from regionroute.check.accounting import account\nfrom regionroute.config import load_params\n"
    script += "account(load_params('params.yaml'))\n"
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [line for line in proc.stderr.splitlines() if "Warning" in line or "Mismatch" in line] == []


def test_default_accounting_is_complete(monkeypatch, regionroute_cache):
    monkeypatch.setenv("XDG_CACHE_HOME", str(regionroute_cache))
    params = load_params(ROOT / "params.yaml")
    acc = account(params, use_cache=False)  # traced now
    assert set(acc.stages) == {"stylize", "train", "infer", "score"}
    # image tokens as the toy model makes them: its VAE's latent, packed 2x2 (8 x 8 at 64 px, not 16 px tokens)
    from regionroute.toy.latent import PixelShuffleVAE

    vae = PixelShuffleVAE.from_pretrained(ROOT / "toy" / "models" / "kontext" / "vae")
    res = params.sample.resolution
    latent = vae.encode(torch.zeros(1, 3, res, res)).latent_dist.mode()
    assert acc.tokens["train"]["image"] == latent.shape[-2] * latent.shape[-1] // 4 == 64
    for stage in acc.stages.values():
        assert stage.activations > 0 and stage.total == stage.tensors + stage.reserve
    train = acc.stages["train"]
    assert train.detail["transformer_checkpointing_on"] < train.detail["transformer_checkpointing_off"]
    account(params)  # written to the session's cache (or read, when an earlier test wrote it)
    cached = account(load_params(ROOT / "params.yaml"))  # read back
    assert cached.to_dict() == acc.to_dict() and list((regionroute_cache / "regionroute" / "accounting").glob("*.json"))


@pytest.mark.slow
def test_fake_trace_equals_real_cpu_trace_at_the_real_width():
    """One double and one single FLUX.1-Kontext block at the real width (3072, 24 heads of 128, T5 width 4096)."""
    cfg = dict(FLUX_KONTEXT_DEV["transformer"], num_layers=1, num_single_layers=1)
    call = replace(_train(gradient_checkpointing=True, mixed_precision="bf16", max_sequence_length=16), grid=(8, 8))
    assert _trace(call, config=cfg, fake=True) == _trace(call, config=cfg, fake=False)
