"""DVC stage ``infer``: one method (base, regionroute, oracle) on the eval pairs (regionroute.infer)."""

from __future__ import annotations

import argparse
from pathlib import Path

from regionroute.config import InferConfig, ModelsConfig, TrainConfig, load_section
from regionroute.errors import exit_on_user_error


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--params", type=Path, default=Path("params.yaml"))
    p.add_argument("--method", required=True, help="base | regionroute | oracle")
    p.add_argument("--records", type=Path, required=True, help="composite stage manifest.jsonl (eval split)")
    p.add_argument("--model", type=Path, default=None, help="trained model directory (regionroute only)")
    p.add_argument("--out", type=Path, required=True, help="output directory for this method")
    return p


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from regionroute.check import preflight

    preflight(args.params, "infer")  # missing weights, settings, GPU memory: one line each, before any work
    models = load_section(args.params, "models", ModelsConfig)
    cfg = load_section(args.params, "infer", InferConfig)
    trained_length = load_section(args.params, "train", TrainConfig).max_sequence_length
    from regionroute.errors import UserError
    from regionroute.infer import METHODS, Editor, resolve_text_length, run_method

    if args.method == "regionroute":
        from regionroute.lora_moe.export import read_model_config

        if args.model is None:
            raise UserError("--model: the regionroute method needs the trained model directory")
        stored = int(read_model_config(args.model)["train"]["max_sequence_length"])
        if cfg.max_sequence_length is None and stored != trained_length:
            raise UserError(
                f"{args.model}: trained with max_sequence_length {stored} but train.max_sequence_length is "
                f"{trained_length}: re-run the train stage (dvc repro) or set infer.max_sequence_length"
            )
    cfg = resolve_text_length(cfg, trained_length)
    from regionroute import distributed as dist

    dist.state(models.device)  # one process, or this rank of `accelerate launch` (before loading models)
    editor = None
    if args.method in METHODS and args.method != "oracle":
        from regionroute.models.kontext import load_kontext

        with dist.main_first():
            pipe = load_kontext(models)
        moe = None
        if args.method == "regionroute":
            from regionroute.lora_moe import load_moe

            moe = load_moe(pipe.transformer, args.model / "moe")
        editor = Editor(pipe, cfg, moe=moe, merge=cfg.merge_expert)
    from regionroute.fingerprint import stage_code_digest

    n = run_method(
        args.method, args.records, args.out, cfg, editor, models=models, model_dir=args.model,
        code=stage_code_digest("infer"),
    )  # fmt: skip
    if dist.is_main():
        print(f"infer {args.method}: generated {n} images in {args.out}")
    return 0


if __name__ == "__main__":
    from regionroute.launch import launch

    raise SystemExit(launch("stages.infer", main))
