"""The data and disk part of ``regionroute check`` (docs/method.md §2).

:func:`check_data`: the COCO layout under ``data.root`` for every split and enough usable
images for ``data.splits.<split>.num`` (the annotation file is parsed once).
:func:`check_disk`: the pipeline's outputs and the missing downloads against the free space.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from regionroute.check.report import Finding, gib, listed
from regionroute.config import Params
from regionroute.errors import UserError

if TYPE_CHECKING:
    from regionroute.check.accounting import Accounting

__all__ = ["check_data", "check_disk"]


def check_data(params: Params) -> list[Finding]:
    """The COCO layout of every split, with its counts against ``data.splits.<split>.num``."""
    from regionroute.files import read_json

    root, out = Path(params.data.root), []
    for split, cfg in sorted(params.data.splits.items()):
        key = f"data.splits.{split}"
        ann = root / "annotations"
        paths = [ann / f"instances_{cfg.coco}.json", ann / f"captions_{cfg.coco}.json"]
        absent = [str(p) for p in paths if not p.is_file()]
        if not (root / cfg.coco).is_dir():
            absent.append(f"{root / cfg.coco}/")
        if absent:
            fix = "COCO 2017: https://cocodataset.org/#download (images + annotations_trainval2017.zip)"
            out.append(Finding("error", key, f"missing {listed(absent)}", fix, ("sample",)))
            continue
        try:
            data = read_json(paths[0])
            images, anns = data["images"], data["annotations"]
        except (UserError, KeyError, TypeError) as exc:
            out.append(Finding("error", str(paths[0]), f"not a COCO instances file ({exc})", stages=("sample",)))
            continue
        usable = {a["image_id"] for a in anns if not a.get("iscrowd", 0)}
        names = {e.name for e in os.scandir(root / cfg.coco)}
        absent_files = [i["file_name"] for i in images if i["file_name"] not in names]
        counts = f"{len(images)} images, {len(anns)} annotations, {len(usable)} images with a non-crowd instance"
        if len(usable) < cfg.num:
            out.append(
                Finding(
                    "error",
                    f"{key}.num",
                    f"{cfg.num} pairs asked, {paths[0]} has {counts}",
                    f"lower {key}.num",
                    ("sample",),
                )
            )
        elif absent_files:
            out.append(
                Finding(
                    "error",
                    str(root / cfg.coco),
                    f"{len(absent_files)} of {len(images)} annotated images are missing ({listed(absent_files)})",
                    "complete the image download",
                    ("sample",),
                )
            )
        else:
            out.append(Finding("ok", key, f"{root}: {cfg.coco}: {counts}; {cfg.num} asked", stages=("sample",)))
    return out


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_disk(params: Params, accounting: Accounting, findings: list[Finding]) -> list[Finding]:
    """The pipeline's outputs (x2: DVC keeps a copy in its cache) and the missing downloads vs free space."""
    d, res = params.data, params.sample.resolution
    pairs = sum(s.num for s in d.splits.values())
    eval_pairs = d.splits["eval"].num
    image = res * res * 3  # an RGB PNG is at most its raw pixels (+ headers)
    n_styles = len(d.styles)
    images = pairs * (image + res * res)  # samples: image + mask
    images += 2 * n_styles * pairs * image  # stylized + pseudo-GT
    images += 3 * n_styles * eval_pairs * 2 * image  # infer: 3 methods x (image + figure)
    lora = accounting.lora.get("lora_params", {}).get("total", 0) * 4
    models = lora * 2 + params.train.keep_checkpoints * (lora + accounting.trainable_bytes.get("optimizer", 0))
    outputs = 2 * (images + models)
    free = shutil.disk_usage(_existing(Path.cwd())).free
    out = []
    if outputs > free:
        out.append(
            Finding(
                "error",
                str(Path.cwd()),
                f"the pipeline's outputs need up to {gib(outputs)} (images x2 for the DVC cache), {gib(free)} free",
                "free disk space or lower data.splits.*.num",
            )
        )
    else:
        out.append(Finding("ok", "disk", f"outputs up to {gib(outputs)}, {gib(free)} free in {Path.cwd()}"))
    download = 0
    params_of = {"models.kontext": ("transformer", "text_encoder", "text_encoder_2", "vae"), "score.vlm": ("vlm",)}
    for f in findings:
        if f.level == "error" and f.key in params_of and "Hugging Face cache" in f.what:
            download += 2 * sum(accounting.params.get(k, 0) for k in params_of[f.key])  # bf16 checkpoints
    if download:
        from huggingface_hub import constants

        cache = Path(constants.HF_HUB_CACHE)
        free = shutil.disk_usage(_existing(cache)).free
        if download > free:
            out.append(
                Finding(
                    "error",
                    str(cache),
                    f"the missing weights need about {gib(download)}, {gib(free)} free",
                    "set HF_HOME to a larger disk",
                )
            )
    return out
