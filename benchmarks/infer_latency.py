"""Per-image denoising latency: ``regionroute`` (routed LoRA-MoE) vs ``base``, side by side.

Same transformer dims for every mode (real FLUX per-layer sizes, 24 heads x 128; block
and token counts configurable), the Kontext sequence ``[text | target | context]``, the
denoising loop's transformer calls (the part of ``FluxKontextPipeline.__call__`` that
differs between the methods). Modes:

* ``base``: the base transformer;
* ``regionroute_merged``: 4 style experts injected, the style's expert merged into the
  base weights once per group of ``--images`` same-style images (what the ``infer``
  stage does with ``infer.merge_expert: true``, the default) and unmerged after; the
  merge/unmerge time is included and spread over the group;
* ``regionroute_routed``: the experts' LoRA branch computed at every step (no merge).

Each mode runs in a fresh subprocess (so the peak resident memory, read from
``getrusage``, is comparable on CPU; on CUDA ``max_memory_allocated`` is used), the
modes interleaved over the repeats; times are medians. Prints one JSON object per mode
with ``time_ratio`` and ``peak_mem_ratio`` relative to ``base``.

    python benchmarks/infer_latency.py                       # CPU-sized default
    python benchmarks/infer_latency.py --preset kontext1024  # 19+38 blocks, 512 + 2 x 4096 tokens (GPU)
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

MODES = ("base", "regionroute_merged", "regionroute_routed")
PRESETS = {
    "cpu": {"double": 1, "single": 1, "text": 32, "image": 64, "steps": 4, "images": 4},
    "kontext1024": {"double": 19, "single": 38, "text": 512, "image": 4096, "steps": 28, "images": 4},
}


def _worker(args: argparse.Namespace) -> dict:
    import torch
    from diffusers import FluxKontextPipeline, FluxTransformer2DModel

    from regionroute.config import PAPER_STYLES
    from regionroute.lora_moe import LoraConfig, inject_lora_moe

    device = torch.device(args.device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    torch.manual_seed(0)
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=args.double, num_single_layers=args.single,
        attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
        guidance_embeds=True, axes_dims_rope=(16, 56, 56),
    ).to(device, dtype).eval()  # fmt: skip
    side = int(args.image**0.5)
    ids = FluxKontextPipeline._prepare_latent_image_ids(1, side, side, device, dtype)
    ctx = ids.clone()
    ctx[..., 0] = 1
    inputs = {
        "hidden_states": torch.randn(1, 2 * args.image, 64, device=device, dtype=dtype),
        "encoder_hidden_states": torch.randn(1, args.text, 4096, device=device, dtype=dtype),
        "pooled_projections": torch.randn(1, 768, device=device, dtype=dtype),
        "txt_ids": torch.zeros(args.text, 3, device=device, dtype=dtype),
        "img_ids": torch.cat([ids, ctx]),
        "guidance": torch.full((1,), 3.5, device=device),
        "return_dict": False,
    }
    moe = None
    if args.mode != "base":
        moe = inject_lora_moe(model, LoraConfig(), PAPER_STYLES)
        with torch.no_grad():
            for p in moe.trainable_parameters():
                p.normal_(0, 0.01)  # a "trained" expert: nonzero B

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def denoise(steps: int, images: int) -> None:
        if args.mode == "regionroute_merged":
            moe.merge("pixel-art")
        elif args.mode == "regionroute_routed":
            moe.route(style_ids=moe.style_ids(["pixel-art"]))
        for _ in range(images):
            for k in range(steps):
                model(timestep=torch.full((1,), 1 - k / steps, device=device, dtype=dtype), **inputs)
        if args.mode == "regionroute_merged":
            moe.unmerge()

    with torch.no_grad():
        denoise(1, 1)  # warmup
        sync()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        denoise(args.steps, args.images)
        sync()
        seconds = (time.perf_counter() - t0) / args.images
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # fmt: skip
    return {"mode": args.mode, "seconds": seconds, "peak_mem_mb": peak}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    for key in ("double", "single", "text", "image", "steps", "images"):
        p.add_argument(f"--{key}", type=int, default=None)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)  # worker
    args = p.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.mode:
        print(json.dumps(_worker(args)))
        return 0
    results: dict[str, list[dict]] = {m: [] for m in MODES}
    for _ in range(args.repeats):
        for mode in MODES:  # interleaved: drifts in machine load hit every mode alike
            cmd = [sys.executable, __file__, "--mode", mode, "--device", args.device, "--dtype", args.dtype]
            for key in ("double", "single", "text", "image", "steps", "images"):
                cmd += [f"--{key}", str(getattr(args, key))]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            results[mode].append(json.loads(out.strip().splitlines()[-1]))
    base_t = statistics.median(r["seconds"] for r in results["base"])
    base_m = max(r["peak_mem_mb"] for r in results["base"])
    for mode in MODES:
        t = statistics.median(r["seconds"] for r in results[mode])
        m = max(r["peak_mem_mb"] for r in results[mode])
        print(json.dumps({
            "mode": mode, "time_ratio": round(t / base_t, 4), "peak_mem_ratio": round(m / base_m, 4),
            "median_s_per_image": round(t, 4), "peak_mem_mb": round(m, 1), "steps": args.steps, "images": args.images,
            "blocks": [args.double, args.single], "tokens": args.text + 2 * args.image, "device": args.device,
            "dtype": args.dtype, "repeats": args.repeats,
        }))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
