"""Cost of style-token attention supervision: forward+backward of a Flux transformer with vs without it.

Benchmark for :mod:`regionroute.flux.attention` (docs/method.md section 3): real per-layer
dimensions (24 heads x 128 = 3072 hidden, T5 width 4096), a configurable number of double
and single blocks and token counts. Modes, all measured in one run:

* ``none``: stock processors, the flow-matching-like loss only (the reference);
* ``text_to_image``: row-wise style-token capture + a loss on the maps;
* ``image_to_text``: exact image-to-text capture (LSE from the flash kernel on CPU, else chunked;
  analytic backward in query chunks);
* ``naive``: the full ``T x T`` softmax per layer (what must be avoided), for contrast.

Timing: all modes are interleaved repeat by repeat in one process, in a rotating order (so a
change of load on a shared machine hits every mode alike); warmup, then the median of
``--repeats`` (``time_ratio``) and, as a contention-robust check, the ratio of minima.
Frozen weights (no weight gradients, as with LoRA training); gradients flow to the inputs.

Peak memory, after the timing, one more step per mode: on CUDA ``torch.cuda.max_memory_allocated``
(reset per step) minus the memory allocated before the step; on CPU the torch profiler's memory
timeline (``profile_memory=True``; every CPU tensor allocation and free, from which the live
total at each event follows) minus the live total at the first event. Both are the step's peak
working memory, weights and inputs excluded, exact and deterministic (the resident set size
was tried first and moved by +-20 MB from step to step: lazily mapped library pages, allocator
caching). ``peak_mem_ratio`` is that peak divided by the ``none`` mode's.

Threads: ``--threads 1`` gives stable ratios on a shared CPU (with more threads than free cores
every parallel op waits for a descheduled sibling thread and small ops cost milliseconds).

Prints one JSON object per (mode, token scale) on stdout. Example (CPU, default sizes)::

    python benchmarks/attention_overhead.py --scales 1 2 --threads 1
    python benchmarks/attention_overhead.py --preset kontext1024 --double 2 --single 2   # GPU
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time

import torch

from regionroute.flux.attention import StyleAttentionRecorder

MODES = ("none", "text_to_image", "image_to_text", "naive")
PRESETS = {"kontext1024": {"text": 512, "target": 4096, "context": 4096, "dtype": "bfloat16"}}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS))
    p.add_argument("--double", type=int, default=1, help="double-stream blocks")
    p.add_argument("--single", type=int, default=1, help="single-stream blocks")
    p.add_argument("--heads", type=int, default=24)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--text", type=int, default=64, help="text tokens L")
    p.add_argument("--target", type=int, default=256, help="target-image tokens N")
    p.add_argument("--context", type=int, default=256, help="context-image tokens (Kontext; 0 for plain Flux)")
    p.add_argument("--scales", type=int, nargs="+", default=[1], help="multiply the image token counts")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    args = p.parse_args(argv)
    for key, value in PRESETS.get(args.preset, {}).items():
        if key != "dtype" or args.dtype is None:
            setattr(args, key, value)
    args.dtype = args.dtype or "float32"
    return args


def build(args: argparse.Namespace, scale: int):
    """Transformer with real per-layer dims, inputs [text | target | context] with Kontext ids, a style mask."""
    from diffusers import FluxKontextPipeline, FluxTransformer2DModel
    from diffusers.utils import logging

    logging.set_verbosity_error()
    rope = args.head_dim // 8  # Flux: 16, 56, 56 for head_dim 128
    dev, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    tr = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=args.double, num_single_layers=args.single,
        attention_head_dim=args.head_dim, num_attention_heads=args.heads, joint_attention_dim=4096,
        pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=[rope, (args.head_dim - rope) // 2, (args.head_dim - rope) // 2],
    ).to(dev, dtype).requires_grad_(False)  # fmt: skip
    n, n_ctx = args.target * scale, args.context * scale
    w = max(1, int(n**0.5))
    while n % w:
        w -= 1
    ids = FluxKontextPipeline._prepare_latent_image_ids(1, n // w, w, dev, dtype)  # (N, 3)
    if n_ctx:
        ctx = FluxKontextPipeline._prepare_latent_image_ids(1, n_ctx // w, w, dev, dtype)
        ctx[..., 0] = 1
        ids = torch.cat([ids, ctx])
    b = args.batch
    inp = {
        "hidden_states": torch.randn(b, ids.shape[0], 64, device=dev, dtype=dtype),
        "encoder_hidden_states": torch.randn(b, args.text, 4096, device=dev, dtype=dtype),
        "pooled_projections": torch.randn(b, 768, device=dev, dtype=dtype),
        "timestep": torch.full((b,), 0.5, device=dev, dtype=dtype),
        "guidance": torch.ones(b, device=dev, dtype=dtype),
        "img_ids": ids,
        "txt_ids": torch.zeros(args.text, 3, device=dev, dtype=dtype),
    }
    mask = torch.zeros(b, args.text, dtype=torch.bool, device=dev)
    for i in range(b):  # a 3-token style word, at a different place per sample
        mask[i, 5 + 2 * i : 8 + 2 * i] = True
    return tr, inp, mask, n


def recorder(mode: str) -> StyleAttentionRecorder:
    return StyleAttentionRecorder(
        direction="text_to_image" if mode == "text_to_image" else "image_to_text",
        implementation="naive" if mode == "naive" else "rowwise",
    )


def step(tr, inp: dict, mask: torch.Tensor, n: int, mode: str) -> None:
    """One forward+backward; supervised modes add a loss on the recorded maps."""
    x = inp["hidden_states"].detach().requires_grad_()
    e = inp["encoder_hidden_states"].detach().requires_grad_()
    call = {**inp, "hidden_states": x, "encoder_hidden_states": e}
    if mode == "none":
        loss = tr(**call).sample[:, :n].float().square().mean()
    else:
        rec = recorder(mode)
        rec.install(tr)
        with rec.capture(mask, n_text=mask.shape[1], n_target=n):
            out = tr(**call).sample
        maps = rec.maps()  # (B, N)
        rec.remove(tr)
        loss = out[:, :n].float().square().mean() + (maps / maps.sum(-1, keepdim=True)).square().sum()
    loss.backward()
    if x.is_cuda:
        torch.cuda.synchronize()


def layer_inputs(args: argparse.Namespace, inp: dict, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Random post-RoPE query and key of one layer, (B, T, H, d), requiring grad."""
    seq, dev, dtype = mask.shape[1] + inp["hidden_states"].shape[1], inp["img_ids"].device, inp["img_ids"].dtype
    shape = (args.batch, seq, args.heads, args.head_dim)
    return tuple(torch.randn(shape, device=dev, dtype=dtype).requires_grad_() for _ in "qk")


def layer_step(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor, n: int, mode: str) -> None:
    """The capture of ONE layer alone: forward+backward of its map, including the q/k gradients it makes."""
    q.grad = k.grad = None
    recorder(mode).layer_map(q, k, mask, n).square().sum().backward()


def cpu_peak(fn, *args) -> int:
    """Peak of live torch CPU allocations during ``fn(*args)``, from the profiler's memory timeline."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import MemoryProfileTimeline

    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        fn(*args)
    _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline(torch.device("cpu"))
    totals = [sum(row) for row in sizes]  # bytes alive at each event, all categories
    return max(totals) - totals[0]  # minus what was alive at the first event (weights, inputs)


def cuda_peak(fn, *args) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn(*args)
    return torch.cuda.max_memory_allocated() - base


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    modes = ["none", *[m for m in args.modes if m != "none"]]
    for scale in args.scales:
        tr, inp, mask, n = build(args, scale)
        times: dict[str, list[float]] = {m: [] for m in modes}
        for r in range(args.warmup + args.repeats):
            for mode in modes[r % len(modes) :] + modes[: r % len(modes)]:  # interleaved, rotating order
                t0 = time.perf_counter()
                step(tr, inp, mask, n, mode)
                if r >= args.warmup:
                    times[mode].append(time.perf_counter() - t0)
        peak_fn = cuda_peak if args.device.startswith("cuda") else cpu_peak
        peaks = {m: peak_fn(step, tr, inp, mask, n, m) for m in modes}
        q, k = layer_inputs(args, inp, mask)
        layer = {m: peak_fn(layer_step, q, k, mask, n, m) if m != "none" else 0 for m in modes}
        t_ref, t_min, m_ref = statistics.median(times["none"]), min(times["none"]), peaks["none"]
        for mode in modes:
            t = statistics.median(times[mode])
            print(json.dumps({
                "mode": mode, "time_ratio": round(t / t_ref, 3), "peak_mem_ratio": round(peaks[mode] / m_ref, 3),
                "time_ratio_min": round(min(times[mode]) / t_min, 3), "time_s": round(t, 3),
                "peak_mem_mb": round(peaks[mode] / 2**20, 1), "layer_capture_mb": round(layer[mode] / 2**20, 2),
                "device": args.device,
                "dtype": args.dtype, "batch": args.batch, "text": args.text, "target": n,
                "context": args.context * scale, "double": args.double, "single": args.single,
                "heads": args.heads, "head_dim": args.head_dim, "repeats": args.repeats,
                "threads": torch.get_num_threads(),
            }), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
