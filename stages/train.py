"""DVC stage ``train``: LoRA-MoE + attention supervision on the pseudo-GT (regionroute.train)."""

from __future__ import annotations

import argparse
from pathlib import Path

from regionroute.config import CompositeConfig, DataConfig, LossConfig, ModelsConfig, TrainConfig, load_section
from regionroute.errors import exit_on_user_error


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--params", type=Path, default=Path("params.yaml"))
    p.add_argument("--records", type=Path, required=True, help="composite stage manifest.jsonl (train split)")
    p.add_argument("--out", type=Path, required=True, help="trained model directory")
    p.add_argument("--checkpoints", type=Path, required=True, help="checkpoint directory (resumed from)")
    p.add_argument("--live", type=Path, default=None, help="dvclive directory (metrics and plots)")
    return p


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from regionroute.check import preflight

    preflight(args.params, "train")  # missing weights, settings, GPU memory: one line each, before any work
    data = load_section(args.params, "data", DataConfig)
    models = load_section(args.params, "models", ModelsConfig)
    lora = load_section(args.params, "lora")
    loss = load_section(args.params, "loss", LossConfig)
    cfg = load_section(args.params, "train", TrainConfig)
    instruction = load_section(args.params, "composite", CompositeConfig).instruction  # for the model card
    import torch

    from regionroute import distributed as dist
    from regionroute.fingerprint import stage_code_digest
    from regionroute.models.kontext import kontext_key, load_kontext
    from regionroute.objective import encode_dataset
    from regionroute.train import train

    torch.manual_seed(cfg.seed)
    dist.state(models.device)  # one process, or this rank of `accelerate launch` (before loading models)
    with dist.main_first():
        pipe = load_kontext(models)
    # every rank: the draws index the whole set
    cache = encode_dataset(pipe, args.records, data.styles, cfg, object_elements=loss.object_weight != 1.0)
    # the encoders are not needed any more (docs/method.md §2: cache once, then free them)
    pipe.vae = pipe.text_encoder = pipe.text_encoder_2 = None
    summary = train(
        pipe, cache, data.styles, lora, loss, cfg, args.out, args.checkpoints, args.live,
        base_model=models.kontext, base_key=kontext_key(models), code=stage_code_digest("train"),
        instruction=instruction,
    )  # fmt: skip
    shown = {k: round(v, 5) for k, v in summary.items() if k.startswith(("probe", "total"))}
    if dist.is_main():
        print(f"train: wrote {args.out} ({shown})")
    return 0


if __name__ == "__main__":
    from regionroute.launch import launch

    raise SystemExit(launch("stages.train", main))
