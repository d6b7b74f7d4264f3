"""Training-step overhead of the LoRA-MoE vs one plain LoRA (docs/method.md §5).

One training step (forward + backward + AdamW step) of a FluxTransformer2DModel with
the real per-layer sizes of FLUX.1 (hidden 3072 = 24 heads x 128, joint_attention_dim
4096, pooled 768, MLP ratio 4) and a configurable number of double / single blocks and
tokens, in three modes on the same frozen base weights (shared, not copied):

* ``lora``: one plain peft LoRA (rank r, gaussian init) on the same targets -- the
  public code's setup, the baseline of every ratio;
* ``style``: E experts, hard routing by style (batch samples on different experts);
* ``learned``: E experts, MoLE gate on the pooled embedding + balance loss.

Modes are timed interleaved (round robin after a warmup each), so load from other
processes hits them alike; the median is reported. Memory: on CUDA the step's peak
allocation above the weights; on CPU (no allocator peak counter) the bytes autograd
saves for backward plus the trainable state (parameters, gradients, AdamW moments),
the part of a step's memory that differs between the modes.

Prints one JSON line per mode. Example (CPU-sized)::

    python benchmarks/moe_overhead.py --double 1 --single 1 --text 64 --image 128 --batch 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from regionroute.lora_moe import LoraConfig, find_targets, inject_lora_moe

STYLE_TARGET = 1.10  # time_ratio the style-routed MoE should stay under


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--double", type=int, default=1, help="double-stream blocks (FLUX.1: 19)")
    p.add_argument("--single", type=int, default=1, help="single-stream blocks (FLUX.1: 38)")
    p.add_argument("--text", type=int, default=64, help="text tokens")
    p.add_argument("--image", type=int, default=128, help="tokens per image (target and context each)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="frozen base weights")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--modes", default="lora,style,learned")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def model_config(args: argparse.Namespace) -> dict:
    return {
        "patch_size": 1,
        "in_channels": 64,
        "num_layers": args.double,
        "num_single_layers": args.single,
        "attention_head_dim": 128,
        "num_attention_heads": 24,
        "joint_attention_dim": 4096,
        "pooled_projection_dim": 768,
        "guidance_embeds": True,
        "axes_dims_rope": (16, 56, 56),
    }


def make_inputs(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict:
    from diffusers import FluxKontextPipeline

    b, n, g = args.batch, args.image, torch.Generator().manual_seed(args.seed)
    w = 8
    h = n // w
    ids = FluxKontextPipeline._prepare_latent_image_ids(b, h, w, device, dtype)  # (N, 3)
    ctx_ids = ids.clone()
    ctx_ids[..., 0] = 1

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device, dtype)

    return {
        "hidden_states": rand(b, 2 * h * w, 64),  # [target | context] packed latents
        "encoder_hidden_states": rand(b, args.text, 4096),
        "pooled_projections": rand(b, 768),
        "timestep": torch.rand(b, generator=g).to(device, dtype),
        "guidance": torch.ones(b, device=device, dtype=dtype),
        "txt_ids": torch.zeros(args.text, 3, device=device, dtype=dtype),
        "img_ids": torch.cat([ids, ctx_ids]),
        "return_dict": False,
    }


def shared_copy(base: torch.nn.Module, config: dict) -> torch.nn.Module:
    """A second model object on the same weight tensors (no copy)."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel(**config)
    model.load_state_dict(base.state_dict(), assign=True)
    return model


def build_mode(mode: str, base: torch.nn.Module, config: dict, args: argparse.Namespace):
    """-> (model, trainable params, route() callable returning the extra loss)."""
    model = shared_copy(base, config)
    model.requires_grad_(False)
    experts = [f"style{i}" for i in range(args.experts)]
    cfg = LoraConfig(rank=args.rank, alpha=float(args.rank), routing="learned" if mode == "learned" else "style")
    if mode == "lora":
        from peft import LoraConfig as PeftLoraConfig
        from peft import inject_adapter_in_model

        targets = list(find_targets(model, cfg))
        peft_cfg = PeftLoraConfig(
            r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian", target_modules=targets
        )
        model = inject_adapter_in_model(peft_cfg, model)
        params = [p for n, p in model.named_parameters() if "lora_" in n]
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        return model, params, lambda inputs: None
    moe = inject_lora_moe(model, cfg, experts)
    ids = torch.arange(args.batch, device=args.device) % args.experts  # samples on different experts

    def route(inputs: dict) -> torch.Tensor | None:
        if mode == "style":
            moe.route(style_ids=ids)
            return None
        moe.route(pooled=inputs["pooled_projections"])
        return cfg.balance_weight * moe.balance_loss()

    return model, moe.trainable_parameters(), route


def train_step(model, opt, route, inputs: dict, target: torch.Tensor) -> None:
    extra = route(inputs)
    out = model(**inputs)[0][:, : target.shape[1]]  # prediction = the target-image tokens
    loss = F.mse_loss(out.float(), target)
    if extra is not None:
        loss = loss + extra
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def step_memory(model, opt, route, inputs, target, params, device: torch.device) -> int:
    """Bytes a step needs beyond the frozen weights (see module docstring)."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        train_step(model, opt, route, inputs, target)
        sync(device)
        return torch.cuda.max_memory_allocated() - before
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: set[int] = set()
    saved = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights and ptr not in seen:
            seen.add(ptr)
            saved += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        train_step(model, opt, route, inputs, target)
    state = sum(p.numel() * p.element_size() * 4 for p in params)  # param + grad + 2 AdamW moments
    return saved + state


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    config = model_config(args)
    torch.manual_seed(args.seed)
    from diffusers import FluxTransformer2DModel

    base = FluxTransformer2DModel(**config).to(device)
    if dtype != torch.float32:
        base = base.to(dtype)
    inputs = make_inputs(args, device, dtype)
    target = torch.randn(args.batch, args.image // 8 * 8, 64, device=device)
    modes = args.modes.split(",")
    runs = {}
    for mode in modes:
        model, params, route = build_mode(mode, base, config, args)
        opt = torch.optim.AdamW(params, lr=1e-4)
        for _ in range(args.warmup):
            train_step(model, opt, route, inputs, target)
        mem = step_memory(model, opt, route, inputs, target, params, device)
        runs[mode] = {"model": model, "opt": opt, "route": route, "times": [], "mem": mem, "params": params}
    for _ in range(args.repeats):
        for mode in modes:
            r = runs[mode]
            sync(device)
            t0 = time.perf_counter()
            train_step(r["model"], r["opt"], r["route"], inputs, target)
            sync(device)
            r["times"].append(time.perf_counter() - t0)
    ref = runs.get("lora", runs[modes[0]])
    ref_time, ref_min, ref_mem = statistics.median(ref["times"]), min(ref["times"]), ref["mem"]
    for mode in modes:
        r = runs[mode]
        med = statistics.median(r["times"])
        row = {
            "mode": mode,
            "time_ratio": round(med / ref_time, 4),
            "time_ratio_min": round(min(r["times"]) / ref_min, 4),  # less sensitive to other load
            "peak_mem_ratio": round(r["mem"] / ref_mem, 4),
            "median_s": round(med, 4),
            "min_s": round(min(r["times"]), 4),
            "peak_mem_mb": round(r["mem"] / 2**20, 1),
            "trainable_params": sum(p.numel() for p in r["params"]),
            "experts": 1 if mode == "lora" else args.experts,
            "rank": args.rank,
            "blocks": [args.double, args.single],
            "tokens": args.text + 2 * (args.image // 8 * 8),
            "batch": args.batch,
            "device": str(device),
            "dtype": args.dtype,
            "threads": torch.get_num_threads(),
            "repeats": args.repeats,
        }
        if mode == "style":
            row["meets_target"] = row["time_ratio"] <= STYLE_TARGET
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
