"""The rehearsal's checks on the finished pipeline, run inside the copy: ``python -m regionroute.rehearsal.verify``.

Started by :func:`regionroute.rehearsal.run.rehearse` with the stand-ins' environment; one ``PASS``/``FAIL``
line per check: the experts load with diffusers' ``load_lora_weights`` as the model card says (each target
module gets the file's A/B); score used the paper's judge paths (open_clip's ``ViT-L-14/openai``: QuickGELU,
ViT-L/14 size, the cached file; the Qwen2.5-VL processor at ``score.vlm_max_pixels`` on 1024 px images) and
one of its rows, recomputed here, is equal; the model card, the recorded dtype and the report.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import torch

from regionroute.config import Params, load_params
from regionroute.files import read_image, read_json, read_jsonl, read_mask

MODEL = Path("models/regionroute")


def check_lora(params: Params) -> str:
    """Load every exported expert as the model card says (``load_lora_weights``); compare A/B with the files."""
    from diffusers import FluxKontextPipeline
    from safetensors.torch import load_file

    from regionroute.models.kontext import kontext_source

    pipe = FluxKontextPipeline.from_pretrained(kontext_source(params.models), dtype=torch.float32)
    layers = read_json(MODEL / "moe" / "moe.json")["layers"]
    transformer = pipe.transformer
    styles = list(params.data.styles)
    for style in styles:
        pipe.load_lora_weights(str(MODEL), subfolder="lora", weight_name=f"{style}.safetensors", adapter_name=style)
        state = load_file(str(MODEL / "lora" / f"{style}.safetensors"))
        wrapped = [n for n, m in transformer.named_modules() if hasattr(m, "lora_A") and style in m.lora_A]
        if sorted(wrapped) != sorted(layers):
            raise AssertionError(f"{style}: adapters on {len(wrapped)} modules, the experts have {len(layers)}")
        for name in layers:
            module = transformer.get_submodule(name)
            for part in ("lora_A", "lora_B"):
                got = getattr(module, part)[style].weight
                if not torch.equal(got, state[f"transformer.{name}.{part}.weight"].to(got.dtype)):
                    raise AssertionError(f"{style}: {name}.{part} differs from the file")
    gen = torch.Generator().manual_seed(0)
    n_img, n_txt = 16, 8
    inputs = {
        "hidden_states": torch.randn(1, 2 * n_img, transformer.config.in_channels, generator=gen),
        "encoder_hidden_states": torch.randn(1, n_txt, transformer.config.joint_attention_dim, generator=gen),
        "pooled_projections": torch.randn(1, transformer.config.pooled_projection_dim, generator=gen),
        "timestep": torch.tensor([0.5]), "guidance": torch.tensor([3.5]),
        "img_ids": torch.zeros(2 * n_img, 3), "txt_ids": torch.zeros(n_txt, 3), "return_dict": False,
    }  # fmt: skip
    with torch.no_grad():
        for style in styles:
            pipe.set_adapters(style)
            out = transformer(**inputs)[0]
            if not torch.isfinite(out).all():
                raise AssertionError(f"{style}: non-finite output with the adapter")
    return f"{len(styles)} experts x {len(layers)} modules loaded by load_lora_weights, weights as exported"


def _rescored(params: Params) -> tuple[dict[str, float], dict[str, float], object, object]:
    """One regionroute row of the score stage, recomputed with the score stage's own classes."""
    from regionroute.metrics.rses import RSESScorer
    from regionroute.metrics.vlm import VLMJudge

    cfg = params.score
    scored = pd.read_csv("data/scores/per_sample.csv")
    row = scored[scored["method"] == "regionroute"].iloc[0]
    infer_row = next(r for r in read_jsonl("data/infer/regionroute/manifest.jsonl") if r["id"] == row["id"])
    root = Path("data/pseudo_gt/eval")
    rec = next(r for r in read_jsonl(root / "manifest.jsonl") if r["id"] == row["id"])
    edited = read_image(Path("data/infer/regionroute") / infer_row["image"])
    rses = RSESScorer(cfg.clip, cfg.lpips, device=cfg.device, dilate=cfg.dilate, template=cfg.template)
    judge = VLMJudge(cfg.vlm, device=cfg.device, dtype=cfg.vlm_dtype, seed=cfg.seed, max_pixels=cfg.vlm_max_pixels)
    frame = rses.score([edited], [read_image(root / rec["original"])], [read_mask(root / rec["mask"])],
                       [rec["style"]], pseudo_gt=[read_image(root / rec["pseudo_gt"])], ids=[rec["id"]])  # fmt: skip
    probs = judge.score([edited], [rec["object"]], [rec["style"]], [rec["sample_id"]], params.data.styles).probs[0]
    mine = frame.iloc[0][["rsm_text", "rsm_image", "lpips_bg"]].to_dict()
    mine |= dict(zip(["q1", "q2", "q3", "q4"], probs, strict=True))
    return mine, {k: float(row[k]) for k in mine}, rses, (judge, edited)


def check_score(params: Params) -> str:
    """The paper's judges, and one score row recomputed here equal to the stage's."""
    import open_clip
    from PIL import Image

    cfg = params.score
    mine, stage, rses, (judge, edited) = _rescored(params)
    visual = rses.clip.visual
    quick = any(isinstance(m, open_clip.transformer.QuickGELU) for m in rses.clip.modules())
    name, tag = cfg.clip.split("/")
    path = open_clip.pretrained.download_pretrained(open_clip.get_pretrained_cfg(name, tag))
    if not quick or visual.transformer.width != 1024 or len(visual.transformer.resblocks) != 24:
        raise AssertionError(f"{cfg.clip}: not ViT-L/14 with QuickGELU (quick_gelu={quick})")
    size = judge.processor.image_processor.size
    if size["longest_edge"] != cfg.vlm_max_pixels or edited.shape[:2] != (1024, 1024):
        raise AssertionError(f"VLM processor size {size}, edited images {edited.shape[:2]}")
    grid = judge.processor.image_processor(images=[Image.fromarray(edited)], return_tensors="pt")["image_grid_thw"]
    tokens = int(grid.prod()) // judge.processor.image_processor.merge_size**2
    off = {k: (mine[k], stage[k]) for k in mine if not math.isclose(mine[k], stage[k], rel_tol=1e-3, abs_tol=1e-4)}
    if off:
        raise AssertionError(f"recomputed row differs from data/scores/per_sample.csv: {off}")
    return (
        f"{cfg.clip} QuickGELU ViT-L/14 from {Path(path).parent.parent.parent.name}/{Path(path).name}; Qwen2.5-VL "
        f"processor max_pixels {size['longest_edge']}: a 1024 px crop -> {tokens} visual tokens; one row recomputed "
        f"equal (rsm_text {stage['rsm_text']:.4f}, q1 {stage['q1']:.4f})"
    )


def check_outputs(params: Params) -> str:
    """The model card (front matter) and the report were written."""
    from huggingface_hub import ModelCard

    card = ModelCard.load(MODEL / "README.md")
    data = card.data
    missing = {"lora", "flux", *params.data.styles} - set(data.tags or [])
    if data.base_model != params.models.kontext or data.library_name != "diffusers" or not data.license or missing:
        raise AssertionError(f"model card front matter: base_model {data.base_model}, tags missing {missing}")
    if "://" not in (data.to_dict().get("license_link") or "://"):
        raise AssertionError(f"model card: license_link {data.license_link!r} is relative to the base's repository")
    trained_dtype = read_json(MODEL / "regionroute.json").get("dtype")
    if trained_dtype != params.models.dtype:
        raise AssertionError(f"regionroute.json: dtype {trained_dtype!r}, models.dtype is {params.models.dtype!r}")
    report = Path("reports/results/results.md")
    if not report.is_file() or "regionroute" not in report.read_text():
        raise AssertionError(f"{report}: not written")
    return f"model card (license {data.license}, {len(data.tags)} tags), base dtype {trained_dtype}, {report} written"


def main() -> int:
    params = load_params("params.yaml")
    checks: dict[str, Callable[[Params], str]] = {
        "experts load with load_lora_weights": check_lora,
        "score used the paper's judge paths": check_score,
        "model card and report": check_outputs,
    }
    failed = 0
    for name, check in checks.items():
        try:
            print(f"PASS {name}: {check(params)}", flush=True)
        except Exception as exc:  # a failed check is reported, the others still run
            failed += 1
            print(f"FAIL {name}: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}")
    return failed


if __name__ == "__main__":
    raise SystemExit(main())
