"""Dual-stream LoRA-MoE (docs/method.md §5) on the tiny FLUX.1-Kontext transformer.

Known answers: exact identity at init, one expert per sample under style routing, a
layer-level reference formula for both routings, the balance loss's minimum, gradients
only where they belong, bit-exact unmerge, and exported experts that plain diffusers
(``FluxKontextPipeline.load_lora_weights``) turns into the same model as the MoE.
"""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch
import yaml
from torch import nn

from regionroute.config import load_section
from regionroute.errors import ConfigError, DataError, UserError
from regionroute.lora_moe import (
    LoraConfig,
    MoELoraLinear,
    RoutingContext,
    balance_loss,
    export_experts,
    inject_lora_moe,
    load_moe,
    save_moe,
)

STYLES = ["pixel-art", "cyberpunk", "expressionism", "line-art"]


@pytest.fixture(scope="module")
def pipe():
    from regionroute.tiny.kontext import build_tiny_kontext

    return build_tiny_kontext(seed=0)


@pytest.fixture
def transformer(pipe):
    return copy.deepcopy(pipe.transformer)  # a fresh, unwrapped copy per test


def flux_inputs(transformer, batch: int = 3, h: int = 2, w: int = 3, text_len: int = 5, seed: int = 0) -> dict:
    """Transformer kwargs laid out as FluxKontextPipeline builds them: [target | context] image tokens."""
    from diffusers import FluxKontextPipeline

    cfg = transformer.config
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, h * w, cfg.in_channels, generator=g)  # (B, N, C) packed target latents
    image_latents = torch.randn(batch, h * w, cfg.in_channels, generator=g)  # (B, N, C) context latents
    latent_ids = FluxKontextPipeline._prepare_latent_image_ids(batch, h, w, "cpu", torch.float32)  # (N, 3)
    image_ids = FluxKontextPipeline._prepare_latent_image_ids(batch, h, w, "cpu", torch.float32)
    image_ids[..., 0] = 1  # the context image's ids, as the pipeline sets them
    return {
        "hidden_states": torch.cat([latents, image_latents], dim=1),  # (B, 2N, C)
        "encoder_hidden_states": torch.randn(batch, text_len, cfg.joint_attention_dim, generator=g),
        "pooled_projections": torch.randn(batch, cfg.pooled_projection_dim, generator=g),
        "timestep": torch.rand(batch, generator=g),
        "guidance": torch.full((batch,), 3.5),
        "txt_ids": torch.zeros(text_len, 3),
        "img_ids": torch.cat([latent_ids, image_ids], dim=0),  # (2N, 3)
        "return_dict": False,
    }


def run(transformer, inputs) -> torch.Tensor:
    with torch.no_grad():
        return transformer(**inputs)[0]  # (B, 2N, C)


@torch.no_grad()
def perturb(moe, seed: int = 1, experts: list[int] | None = None) -> None:
    """Give the chosen experts random nonzero A and B."""
    g = torch.Generator().manual_seed(seed)
    for layer in moe.layers.values():
        for e in experts if experts is not None else range(moe.num_experts):
            layer.lora_A[e].copy_(torch.randn(layer.lora_A[e].shape, generator=g) * 0.3)
            layer.lora_B[e].copy_(torch.randn(layer.lora_B[e].shape, generator=g) * 0.3)


# -- config -------------------------------------------------------------------------------
def test_config_defaults_are_the_paper_and_bad_values_name_the_key(tmp_path):
    cfg = LoraConfig()
    assert (cfg.rank, cfg.alpha, cfg.init, cfg.routing, cfg.scaling) == (4, 4.0, "gaussian", "style", 1.0)
    assert cfg.double_targets == ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0")
    assert cfg.single_targets == ("attn.to_q", "attn.to_k", "attn.to_v")
    assert LoraConfig.from_dict(cfg.to_dict()) == cfg
    for kwargs, key in [
        ({"rank": 0}, "lora.rank"),
        ({"alpha": 0.0}, "lora.alpha"),
        ({"dropout": 1.0}, "lora.dropout"),
        ({"double_stream": False, "single_stream": False}, "lora.double_stream"),
        ({"double_targets": ("attn.to_qq",)}, "lora.double_targets"),
        ({"single_targets": ("attn.to_out.0",)}, "lora.single_targets"),
        ({"router_temperature": 0.0}, "lora.router_temperature"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(key)):
            LoraConfig(**kwargs)
    params = tmp_path / "params.yaml"
    section = {**cfg.to_dict(), "rank": 8, "routing": "learned", "single_stream": False}
    params.write_text(yaml.safe_dump({"lora": section}))
    loaded = load_section(params, "lora", LoraConfig)
    assert (loaded.rank, loaded.routing, loaded.single_stream) == (8, "learned", False)
    params.write_text(yaml.safe_dump({"lora": {**section, "routing": "mole"}}))
    with pytest.raises(ConfigError, match=r"lora\.routing"):
        load_section(params, "lora", LoraConfig)
    params.write_text("lora:\n  ranks: 4\n")
    with pytest.raises(ConfigError, match=r"lora\.ranks: unknown key"):
        load_section(params, "lora", LoraConfig)


# -- layer: known answers ------------------------------------------------------------------
@pytest.mark.parametrize("base_dtype", [torch.float32, torch.bfloat16])
def test_layer_matches_reference_formula_for_both_routings(base_dtype):
    torch.manual_seed(0)
    base = nn.Linear(6, 5).to(base_dtype)
    ctx = RoutingContext()
    layer = MoELoraLinear(base, num_experts=3, rank=2, alpha=3.0, context=ctx)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(4, 7, 6).to(base_dtype)  # (B, T, in)
    ref_base = base(x).float()
    a, b, s = layer.lora_A.detach(), layer.lora_B.detach(), 3.0 / 2
    xf = x.float()

    ctx.expert_ids = torch.tensor([2, 0, 1, 2])
    out = layer(x)
    ref = torch.stack([ref_base[i] + s * xf[i] @ a[e].T @ b[e].T for i, e in enumerate([2, 0, 1, 2])])
    tol = {"atol": 1e-5, "rtol": 1e-5} if base_dtype == torch.float32 else {"atol": 3e-2, "rtol": 2e-2}
    torch.testing.assert_close(out.float(), ref, **tol)
    assert out.dtype == base_dtype

    ctx.clear()
    ctx.gates = torch.softmax(torch.randn(4, 3), dim=-1)
    out = layer(x)
    ref = ref_base + sum(ctx.gates[:, e, None, None] * s * (xf @ a[e].T @ b[e].T) for e in range(3))
    torch.testing.assert_close(out.float(), ref, **tol)

    ctx.clear()
    with pytest.raises(RuntimeError, match="route"):
        layer(x)


def test_layer_merge_and_unmerge_are_exact_in_bf16():
    torch.manual_seed(0)
    base = nn.Linear(8, 8).to(torch.bfloat16)
    original = base.weight.detach().clone()
    ctx = RoutingContext(expert_ids=torch.tensor([1]))
    layer = MoELoraLinear(base, num_experts=2, rank=4, alpha=4.0, context=ctx)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(2, 3, 8, dtype=torch.bfloat16)
    routed = layer(x)
    layer.merge(1)
    assert not torch.equal(base.weight, original)
    torch.testing.assert_close(layer(x), routed, atol=5e-2, rtol=2e-2)  # bf16 rounding of W + dW
    layer.unmerge()
    assert torch.equal(base.weight, original)
    assert torch.equal(layer(x), routed)


# -- the whole transformer -----------------------------------------------------------------
@pytest.mark.parametrize("routing", ["style", "learned"])
def test_moe_at_init_is_exactly_the_base_model(transformer, routing):
    inputs = flux_inputs(transformer)
    expected = run(transformer, inputs)
    moe = inject_lora_moe(transformer, LoraConfig(routing=routing), STYLES)
    assert len(moe.layers) == 2 * 4 + 2 * 3
    moe.route(style_ids=torch.tensor([0, 3, 1]), pooled=inputs["pooled_projections"])
    assert torch.equal(run(transformer, inputs), expected)


def test_style_routing_computes_only_the_routed_expert(transformer):
    inputs = flux_inputs(transformer)
    base = run(transformer, inputs)
    moe = inject_lora_moe(transformer, LoraConfig(), STYLES)
    perturb(moe, experts=[1])  # only "cyberpunk" differs from the base model
    moe.route(style_ids=moe.style_ids(["pixel-art", "cyberpunk", "line-art"]))
    out = run(transformer, inputs)
    assert torch.equal(out[0], base[0]) and torch.equal(out[2], base[2])
    assert (out[1] - base[1]).abs().max() > 1e-3
    assert torch.equal(moe.gate_weights(), torch.eye(4)[[0, 1, 3]])
    assert moe.balance_loss().item() == 0.0
    # a routing batch of 1 broadcasts: every sample through "cyberpunk"
    moe.route(style_ids=torch.tensor([1]))
    assert not torch.equal(run(transformer, inputs)[0], base[0])
    with pytest.raises(UserError, match="style_ids"):
        moe.route(style_ids=torch.tensor([4]))
    with pytest.raises(UserError):
        moe.route(pooled=inputs["pooled_projections"])  # style routing needs ids


def test_learned_gates_sum_to_one_and_balance_loss_is_minimal_at_uniform_use(transformer):
    moe = inject_lora_moe(transformer, LoraConfig(routing="learned", router_temperature=0.5), STYLES)
    with torch.no_grad():
        moe.router.gate.weight.normal_()
    pooled = torch.randn(6, transformer.config.pooled_projection_dim)
    moe.route(pooled=pooled)
    gates = moe.gate_weights()
    assert gates.shape == (6, 4)
    torch.testing.assert_close(gates.sum(-1), torch.ones(6))
    logits = moe.router.logits(pooled)
    torch.testing.assert_close(gates, torch.softmax(logits / 0.5, -1))

    e = 4
    uniform = torch.full((3, e), 1 / e)
    assert balance_loss(uniform).item() == pytest.approx(e * math.log(e), rel=1e-6)
    for _ in range(20):
        random_gates = torch.softmax(torch.randn(3, e) * 2, -1)
        assert balance_loss(random_gates) > balance_loss(uniform)
    assert moe.balance_loss() >= e * math.log(e) - 1e-5


def test_training_updates_only_experts_and_router(transformer):
    inputs = flux_inputs(transformer, batch=2)
    moe = inject_lora_moe(transformer, LoraConfig(routing="learned"), STYLES)
    trainable = moe.trainable_parameters()
    assert {id(p) for p in transformer.parameters() if p.requires_grad} <= {id(p) for p in trainable}
    frozen = {n: p.detach().clone() for n, p in transformer.named_parameters() if not p.requires_grad}
    before = [p.detach().clone() for p in trainable]
    opt = torch.optim.SGD(trainable, lr=0.5)
    target = torch.randn_like(inputs["hidden_states"])
    for _ in range(3):
        opt.zero_grad()
        moe.route(pooled=inputs["pooled_projections"])
        out = transformer(**inputs)[0]
        loss = (out - target).pow(2).mean() + 0.01 * moe.balance_loss()
        loss.backward()
        assert all(p.grad is None for p in transformer.parameters() if not p.requires_grad)
        assert all(torch.isfinite(p.grad).all() for p in trainable)
        opt.step()
    assert all(torch.isfinite(p).all() for p in trainable)
    changed = [not torch.equal(b, p) for b, p in zip(before, trainable, strict=True)]
    assert all(changed), "every expert's A and B and the gate should move"
    for n, p in transformer.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


def test_learned_gate_gradients_survive_gradient_checkpointing(pipe):
    """The gates are captured by every layer, not passed as block inputs: checkpointing must keep them."""
    grads = []
    for checkpointing in (False, True):
        transformer = copy.deepcopy(pipe.transformer)
        if checkpointing:
            transformer.enable_gradient_checkpointing()
        inputs = flux_inputs(transformer, batch=2)
        moe = inject_lora_moe(transformer, LoraConfig(routing="learned"), STYLES)
        perturb(moe)
        moe.route(pooled=inputs["pooled_projections"])
        transformer(**inputs)[0].pow(2).mean().backward()
        grads.append(moe.router.gate.weight.grad.clone())
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0])


def test_style_routing_sends_no_gradient_to_unrouted_experts(transformer):
    inputs = flux_inputs(transformer, batch=2)
    moe = inject_lora_moe(transformer, LoraConfig(), STYLES)
    perturb(moe)
    moe.route(style_ids=torch.tensor([0, 2]))
    transformer(**inputs)[0].pow(2).mean().backward()
    for layer in moe.layers.values():
        for grad in (layer.lora_A.grad, layer.lora_B.grad):
            assert grad[[0, 2]].abs().sum() > 0
            assert torch.equal(grad[[1, 3]], torch.zeros_like(grad[[1, 3]]))


@pytest.mark.parametrize(
    ("kwargs", "double", "single"),
    [
        ({"double_stream": False}, 0, 2 * 3),
        ({"single_stream": False}, 2 * 4, 0),
        ({"double_targets": ("attn.to_q", "ff"), "single_targets": ("proj_mlp", "proj_out")}, 2 * 3, 2 * 2),
    ],
)
def test_stream_switches_and_targets_and_remove(transformer, kwargs, double, single):
    originals = {n: m for n, m in transformer.named_modules() if isinstance(m, nn.Linear)}
    keys = list(transformer.state_dict())
    moe = inject_lora_moe(transformer, LoraConfig(**kwargs), STYLES)
    wrapped = [n for n, m in transformer.named_modules() if isinstance(m, MoELoraLinear)]
    assert sum(n.startswith("transformer_blocks.") for n in wrapped) == double
    assert sum(n.startswith("single_transformer_blocks.") for n in wrapped) == single
    if "ff" in kwargs.get("double_targets", ()):
        assert "transformer_blocks.1.ff.net.2" in wrapped and "transformer_blocks.1.ff_context.net.2" not in wrapped
    with pytest.raises(UserError, match="already carries"):
        inject_lora_moe(transformer, LoraConfig(), STYLES)
    moe.remove()
    assert list(transformer.state_dict()) == keys
    for n, m in transformer.named_modules():
        if isinstance(m, nn.Linear):
            assert originals[n] is m
    assert all(p.requires_grad for p in transformer.parameters())


def test_merge_is_the_routed_model_and_unmerge_is_exact(transformer):
    inputs = flux_inputs(transformer, batch=2)
    weights = {n: p.detach().clone() for n, p in transformer.named_parameters()}
    moe = inject_lora_moe(transformer, LoraConfig(alpha=8.0), STYLES)
    perturb(moe)
    moe.route(style_ids=torch.tensor([2]))
    routed = run(transformer, inputs)
    moe.merge("expressionism")
    assert moe.merged == "expressionism"
    moe.route(style_ids=torch.tensor([0]))  # ignored while merged
    torch.testing.assert_close(run(transformer, inputs), routed, atol=1e-5, rtol=1e-5)
    with pytest.raises(UserError, match="already merged"):
        moe.merge("line-art")
    moe.unmerge()
    moe.route(style_ids=torch.tensor([2]))
    assert torch.equal(run(transformer, inputs), routed)
    moe.merge(2, exact=False)  # subtract-on-unmerge: fp32 rounding only
    moe.remove()
    for n, p in transformer.named_parameters():
        torch.testing.assert_close(p, weights[n], atol=1e-6, rtol=0)


# -- export --------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")
@pytest.mark.parametrize("fold_scale", [True, False])
def test_exported_experts_load_in_plain_diffusers(pipe, transformer, tmp_path, fold_scale):
    from diffusers import FluxKontextPipeline

    inputs = flux_inputs(transformer, batch=2)
    moe = inject_lora_moe(transformer, LoraConfig(rank=4, alpha=8.0), STYLES)  # alpha != rank: scale 2
    perturb(moe)
    paths = export_experts(moe, tmp_path, fold_scale=fold_scale)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{s}.safetensors" for s in STYLES)
    expected = {}
    for style in ("cyberpunk", "line-art"):
        moe.route(style_ids=moe.style_ids([style]))
        expected[style] = run(transformer, inputs)

    plain = FluxKontextPipeline(**{**pipe.components, "transformer": copy.deepcopy(pipe.transformer)})
    for style in ("cyberpunk", "line-art"):
        plain.load_lora_weights(tmp_path, weight_name=paths[style].name, adapter_name=style)
    for style in ("cyberpunk", "line-art"):
        plain.set_adapters([style])
        # tolerance: fp32, same math in another order (and B * 2 folded when fold_scale)
        torch.testing.assert_close(run(plain.transformer, inputs), expected[style], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(expected["cyberpunk"], expected["line-art"])


def test_save_load_moe_round_trip(transformer, pipe, tmp_path):
    inputs = flux_inputs(transformer)
    moe = inject_lora_moe(transformer, LoraConfig(routing="learned", alpha=2.0, single_stream=False), STYLES)
    perturb(moe)
    with torch.no_grad():
        moe.router.gate.weight.normal_()
    moe.route(pooled=inputs["pooled_projections"])
    expected, gates = run(transformer, inputs), moe.gate_weights()
    save_moe(moe, tmp_path / "moe")

    fresh = copy.deepcopy(pipe.transformer)
    loaded = load_moe(fresh, tmp_path / "moe")
    assert loaded.config == moe.config and loaded.experts == moe.experts
    loaded.route(pooled=inputs["pooled_projections"])
    assert torch.equal(loaded.gate_weights(), gates)
    assert torch.equal(run(fresh, inputs), expected)

    loaded.remove()
    (tmp_path / "moe" / "moe.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(DataError, match=r"moe\.safetensors"):
        load_moe(fresh, tmp_path / "moe")
    assert not any(isinstance(m, MoELoraLinear) for m in fresh.modules())
    with pytest.raises(DataError, match="not found"):
        load_moe(fresh, tmp_path / "missing")


_EXPORT = """
import sys, torch
from regionroute.lora_moe import LoraConfig, export_experts, inject_lora_moe
from regionroute.tiny.kontext import build_tiny_kontext
moe = inject_lora_moe(build_tiny_kontext(seed=0).transformer, LoraConfig(), [f"e{i}" for i in range(8)])
torch.manual_seed(0)
with torch.no_grad():
    for p in moe.trainable_parameters():
        p.add_(torch.randn_like(p))
for run in ("1", "2"):  # twice in each process too
    export_experts(moe, f"{sys.argv[1]}/{run}")
"""


def test_identical_experts_exported_by_two_processes_are_identical_bytes(tmp_path):
    """safetensors orders a header's metadata keys at random per process: the files must not depend on it."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    procs = [subprocess.Popen([sys.executable, "-c", _EXPORT, str(tmp_path / run)], cwd=ROOT) for run in "ab"]
    assert [p.wait() for p in procs] == [0, 0]
    names = sorted(p.name for p in (tmp_path / "a" / "1").iterdir())
    assert names == [f"e{i}.safetensors" for i in range(8)]
    for name in names:
        first = (tmp_path / "a" / "1" / name).read_bytes()
        for run in ("a/2", "b/1", "b/2"):
            assert (tmp_path / run / name).read_bytes() == first, f"{run}/{name}"
