"""Style-token attention capture (regionroute.flux.attention) against a naive full-softmax reference."""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxKontextPipeline, FluxTransformer2DModel
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor, _get_qkv_projections

from regionroute.config import LossConfig
from regionroute.errors import ConfigError
from regionroute.flux import attention_maps
from regionroute.flux.attention import StyleAttentionRecorder, StyleAttnProcessor
from regionroute.losses import attention_losses
from regionroute.metrics.attention import attention_mass_inside

L, GH, GW = 8, 3, 4  # text tokens, target token grid
N = GH * GW


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Toy tensors: a second intra-op thread only adds waits on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_transformer(seed: int = 0) -> FluxTransformer2DModel:
    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
    )  # fmt: skip


def inputs(batch: int = 2, context: bool = True, seed: int = 1) -> dict:
    """Kontext-style call: [text | target | context], context ids get ids[..., 0] = 1 (as FluxKontextPipeline)."""
    g = torch.Generator().manual_seed(seed)
    ids = FluxKontextPipeline._prepare_latent_image_ids(batch, GH, GW, "cpu", torch.float32)  # (N, 3)
    if context:
        ctx = ids.clone()
        ctx[..., 0] = 1
        ids = torch.cat([ids, ctx])
    return {
        "hidden_states": torch.randn(batch, ids.shape[0], 4, generator=g),
        "encoder_hidden_states": torch.randn(batch, L, 32, generator=g),
        "pooled_projections": torch.randn(batch, 32, generator=g),
        "timestep": torch.rand(batch, generator=g),
        "img_ids": ids,
        "txt_ids": torch.zeros(L, 3),
    }


def style_mask() -> torch.Tensor:
    mask = torch.zeros(2, L, dtype=torch.bool)  # different spans per sample
    mask[0, [2, 3, 4]] = True  # a 3-token word
    mask[1, 5] = True  # a 1-token word
    return mask


class NaiveProcessor(FluxAttnProcessor):
    """Independent reference: stock projections, full (T x T) softmax in plain autograd."""

    def __init__(self, out: list, mask: torch.Tensor, direction: str, n_target: int) -> None:
        super().__init__()
        self.out, self.mask, self.direction, self.n_target = out, mask.float(), direction, n_target

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        q, k, _, eq, ek, _ = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        q, k = attn.norm_q(q.unflatten(-1, (-1, attn.head_dim))), attn.norm_k(k.unflatten(-1, (-1, attn.head_dim)))
        if encoder_hidden_states is not None:
            q = torch.cat([attn.norm_added_q(eq.unflatten(-1, (-1, attn.head_dim))), q], 1)
            k = torch.cat([attn.norm_added_k(ek.unflatten(-1, (-1, attn.head_dim))), k], 1)
        q, k = (apply_rotary_emb(x, image_rotary_emb, sequence_dim=1).float().transpose(1, 2) for x in (q, k))
        p = torch.softmax(q @ k.transpose(-1, -2) / attn.head_dim**0.5, dim=-1).mean(1)  # (B, T, T)
        tgt = slice(L, L + self.n_target)
        if self.direction == "text_to_image":
            self.out.append(torch.einsum("bs,bsn->bn", self.mask, p[:, :L, tgt]))
        else:
            self.out.append(torch.einsum("bs,bns->bn", self.mask, p[:, tgt, :L]))
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)


def run_naive(tr, inp, direction: str, n_target: int = N):
    out: list = []
    tr.set_attn_processor(NaiveProcessor(out, style_mask(), direction, n_target))
    try:
        sample = tr(**inp).sample
    finally:
        tr.set_attn_processor(FluxAttnProcessor())
    return sample, torch.stack(out, 1).mean(1), torch.stack(out, 1)


def run_recorder(tr, inp, rec, n_target: int = N, mask=None):
    rec.install(tr)
    try:
        with rec.capture(style_mask() if mask is None else mask, n_text=L, n_target=n_target):
            sample = tr(**inp).sample
    finally:
        rec.remove(tr)
    return sample, rec.maps(), rec.per_layer()


def grads(tr, inp, fn, **kw):
    inp = {k: v.clone().requires_grad_(v.is_floating_point() and k.endswith("states")) for k, v in inp.items()}
    sample, maps, per_layer = fn(tr, inp, **kw)
    w = torch.linspace(-1, 2, maps.numel()).reshape(maps.shape)
    (sample.square().mean() + (maps * w).sum()).backward()
    return sample, maps, per_layer, inp["hidden_states"].grad, inp["encoder_hidden_states"].grad


@pytest.mark.parametrize(
    ("direction", "context", "lse_kernel"),
    [
        ("text_to_image", True, True),
        ("text_to_image", False, True),
        ("image_to_text", True, True),  # LSE from the CPU flash kernel
        ("image_to_text", True, False),  # LSE from chunked logsumexp (the path off CPU)
        ("image_to_text", False, True),
    ],
)
def test_maps_and_gradients_match_naive(direction, context, lse_kernel, monkeypatch):
    if not lse_kernel:
        monkeypatch.setattr(attention_maps, "_CPU_FLASH", None)
    tr = tiny_transformer()
    inp = inputs(context=context)
    ref = grads(tr, inp, lambda t, i: run_naive(t, i, direction))
    # chunk_rows=5: several uneven query chunks, so the chunked LSE and backward are exercised.
    rec = StyleAttentionRecorder(direction=direction, chunk_rows=5)
    got = grads(tr, inp, lambda t, i: run_recorder(t, i, rec))
    assert torch.equal(got[0], ref[0])  # transformer output untouched
    assert got[1].shape == (2, N) and got[1].dtype == torch.float32
    assert got[2].shape == (2, 2, N)  # 1 double + 1 single block
    torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[2], ref[2], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[3], ref[3], rtol=1e-4, atol=1e-6)  # d/d hidden states
    torch.testing.assert_close(got[4], ref[4], rtol=1e-4, atol=1e-6)  # d/d text states
    # text_to_image rows are softmax rows restricted to the target: mass per token < 1.
    if direction == "text_to_image":
        assert (got[1].sum(-1) < torch.tensor([3.0, 1.0])).all()


def test_output_identical_to_stock_and_nothing_recorded_outside_capture():
    tr = tiny_transformer()
    inp = inputs()
    stock = tr(**inp).sample
    rec = StyleAttentionRecorder(direction="image_to_text")
    originals = dict(tr.attn_processors)
    rec.install(tr)
    assert all(isinstance(p, StyleAttnProcessor) for p in tr.attn_processors.values())
    assert torch.equal(tr(**inp).sample, stock)
    assert rec.n_recorded == 0
    with rec.capture(style_mask(), n_text=L, n_target=N):
        assert torch.equal(tr(**inp).sample, stock)
    assert rec.n_recorded == 2
    with rec.capture(style_mask(), L, N):  # e.g. a whole pipeline call: one record per forward (step)
        tr(**inp)
        tr(**{**inp, "timestep": inp["timestep"] * 0.5})
    assert rec.n_forwards == 2 and rec.n_recorded == 4
    first, last = rec.maps(forward=0), rec.maps()
    assert torch.equal(rec.maps(forward=1), last) and not torch.allclose(first, last)
    rec.remove(tr)
    assert all(tr.attn_processors[n] is p for n, p in originals.items())


@pytest.mark.parametrize("direction", ["text_to_image", "image_to_text"])
def test_gradient_checkpointing_records_once_with_same_maps(direction):
    tr = tiny_transformer()
    inp = inputs()
    rec = StyleAttentionRecorder(direction=direction)
    plain = grads(tr, inp, lambda t, i: run_recorder(t, i, rec))
    tr.enable_gradient_checkpointing()
    ckpt = grads(tr, inp, lambda t, i: run_recorder(t, i, rec))
    assert rec.n_recorded == 2  # the recomputation in backward did not record again
    for a, b in zip(ckpt, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    # Backward inside the capture: the recomputed forward runs while capturing, and still records nothing.
    rec.install(tr)
    x = inp["hidden_states"].clone().requires_grad_()
    with rec.capture(style_mask(), n_text=L, n_target=N):
        sample = tr(**{**inp, "hidden_states": x}).sample
        maps = rec.maps()
        w = torch.linspace(-1, 2, maps.numel()).reshape(maps.shape)
        (sample.square().mean() + (maps * w).sum()).backward()
    rec.remove(tr)
    assert rec.n_recorded == 2
    torch.testing.assert_close(maps, plain[1], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(x.grad, plain[3], rtol=1e-5, atol=1e-7)


def test_bf16_maps_in_fp32_close_to_fp32():
    tr = tiny_transformer()
    inp = inputs()
    _, ref, _ = run_recorder(tr, inp, StyleAttentionRecorder(direction="image_to_text"))
    tr = tr.to(torch.bfloat16)
    inp16 = {k: v.to(torch.bfloat16) for k, v in inp.items()}
    stock = tr(**inp16).sample
    for direction in ("text_to_image", "image_to_text"):
        got = grads(tr, inp16, lambda t, i, d=direction: run_recorder(t, i, StyleAttentionRecorder(direction=d)))
        assert torch.equal(got[0], stock)
        assert got[1].dtype == torch.float32 and all(torch.isfinite(g).all() for g in got[3:])
    torch.testing.assert_close(got[1], ref, rtol=0.1, atol=2e-3)  # bf16 activations, fp32 map


def test_naive_implementation_agrees_and_layers_select():
    tr = tiny_transformer()
    inp = inputs()
    _, rowwise, _ = run_recorder(tr, inp, StyleAttentionRecorder(direction="image_to_text"))
    _, naive, _ = run_recorder(tr, inp, StyleAttentionRecorder(direction="image_to_text", implementation="naive"))
    torch.testing.assert_close(rowwise, naive, rtol=1e-5, atol=1e-7)
    _, _, double = run_recorder(tr, inp, StyleAttentionRecorder(layers="double"))
    _, _, single = run_recorder(tr, inp, StyleAttentionRecorder(layers=["single_transformer_blocks.0"]))
    _, _, both = run_recorder(tr, inp, StyleAttentionRecorder(layers=[0, 1]))
    assert double.shape == single.shape == (2, 1, N)
    torch.testing.assert_close(both, torch.cat([double, single], 1))
    with pytest.raises(ConfigError, match="matches none"):
        StyleAttentionRecorder(layers=["blocks.7"]).install(tr)
    with pytest.raises(ConfigError):
        StyleAttentionRecorder(direction="text_to_image", normalize="style_tokens")


def test_style_tokens_normalization_is_constant():
    """The public code's renormalization over the style tokens: summed over the word it is identically 1."""
    tr = tiny_transformer()
    _, maps, per_layer = run_recorder(tr, inputs(), StyleAttentionRecorder("image_to_text", normalize="style_tokens"))
    torch.testing.assert_close(maps, torch.ones(2, N))
    torch.testing.assert_close(per_layer, torch.ones_like(per_layer))  # 1-token and 3-token words alike
    # One mask row per token gives the public per-token maps: they vary, and sum to 1 over the word.
    per_token = torch.zeros(2, 3, L, dtype=torch.bool)
    per_token[0, [0, 1, 2], [2, 3, 4]] = True
    per_token[1, :, 5] = True
    rec = StyleAttentionRecorder("image_to_text", normalize="style_tokens")
    _, tok_maps, _ = run_recorder(tr, inputs(), rec, mask=per_token)
    assert tok_maps.shape == (2, 3, N) and tok_maps[0].std() > 1e-3
    torch.testing.assert_close(tok_maps[0].sum(0), torch.ones(N))


def test_attention_losses_sgd_raise_mass_inside_mask():
    tr = tiny_transformer(seed=3)
    inp = inputs(batch=2)
    for name, p in tr.named_parameters():
        p.requires_grad_(any(k in name for k in ("to_q", "to_k", "add_q_proj", "add_k_proj")))
    masks = torch.zeros(2, GH, GW)
    masks[0, :2, :2] = 1.0  # object top-left
    masks[1, 1:, 2:] = 1.0  # object bottom-right
    rec = StyleAttentionRecorder()
    rec.install(tr)
    opt = torch.optim.SGD([p for p in tr.parameters() if p.requires_grad], lr=0.5)
    mass = []
    for _ in range(8):
        with rec.capture(style_mask(), n_text=L, n_target=N):
            tr(**inp)
        terms = attention_losses(rec.maps(), masks, LossConfig())
        mass.append(float(attention_mass_inside(rec.maps(), masks).mean()))
        opt.zero_grad()
        (terms["focus"] + terms["cover"]).backward()
        opt.step()
    rec.remove(tr)
    assert mass[-1] > mass[0] + 0.1, mass


@pytest.mark.parametrize("direction", ["text_to_image", "image_to_text"])
def test_layer_map_bf16_gradients_match_fp32_naive(direction):
    """bf16 q/k: maps and gradients computed in fp32 equal the naive map on the same (upcast) values."""
    g = torch.Generator().manual_seed(0)
    q16, k16 = (torch.randn(2, L + 2 * N, 2, 16, generator=g).to(torch.bfloat16).requires_grad_() for _ in "qk")
    q32, k32 = (x.detach().float().requires_grad_() for x in (q16, k16))
    w = torch.rand(2, N, generator=g)
    got = StyleAttentionRecorder(direction, chunk_rows=5).layer_map(q16, k16, style_mask(), N)
    ref = StyleAttentionRecorder(direction, implementation="naive").layer_map(q32, k32, style_mask(), N)
    assert got.dtype == torch.float32 and got.shape == (2, N)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    (got * w).sum().backward()
    (ref * w).sum().backward()
    assert q16.grad.dtype == k16.grad.dtype == torch.bfloat16
    torch.testing.assert_close(q16.grad.float(), q32.grad, rtol=1e-2, atol=1e-4)  # bf16 rounding of the grads
    torch.testing.assert_close(k16.grad.float(), k32.grad, rtol=1e-2, atol=1e-4)


@pytest.mark.parametrize("direction", ["text_to_image", "image_to_text"])
def test_maps_and_gradients_stay_float32_under_bf16_autocast(direction):
    """The docstring's promise: float32 maps (and grads) whatever autocast is active."""
    torch.manual_seed(0)
    b, L, n, heads, d = 2, 6, 32, 2, 16
    q = torch.randn(b, L + 2 * n, heads, d, requires_grad=True)
    k = torch.randn(b, L + 2 * n, heads, d, requires_grad=True)
    mask = torch.zeros(b, L, dtype=torch.bool)
    mask[:, 2:4] = True
    rec = StyleAttentionRecorder(direction=direction)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = rec.layer_map(q, k, mask, n)
        (auto * torch.arange(n)).sum().backward()
    gq, gk = q.grad.clone(), k.grad.clone()
    q.grad = k.grad = None
    ref = rec.layer_map(q, k, mask, n)
    (ref * torch.arange(n)).sum().backward()
    assert auto.dtype == torch.float32
    torch.testing.assert_close(auto, ref, rtol=1e-4, atol=0)
    torch.testing.assert_close(gq, q.grad, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(gk, k.grad, rtol=1e-4, atol=1e-7)
