"""DVC stage ``stylize``: global Kontext stylization, one style per run (regionroute.stylize)."""

from __future__ import annotations

import argparse
from pathlib import Path

from regionroute.config import DataConfig, ModelsConfig, StylizeConfig, load_section
from regionroute.errors import ConfigError, exit_on_user_error


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--params", type=Path, default=Path("params.yaml"))
    p.add_argument("--style", required=True, help="one of data.styles")
    p.add_argument("--samples", type=Path, required=True, help="sample stage output root (has train/, eval/)")
    p.add_argument("--out", type=Path, required=True, help="output directory for this style")
    return p


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from regionroute.check import preflight

    preflight(args.params, "stylize")  # missing weights, settings, GPU memory: one line each, before any work
    data = load_section(args.params, "data", DataConfig)
    models = load_section(args.params, "models", ModelsConfig)
    cfg = load_section(args.params, "stylize", StylizeConfig)
    if args.style not in data.styles:
        raise ConfigError(f"--style: unknown style {args.style!r} (data.styles: {', '.join(data.styles)})")
    from regionroute import distributed as dist
    from regionroute.models.kontext import load_kontext
    from regionroute.stylize import stylize_splits

    samples = {split: args.samples / split for split in data.splits}
    dist.state(models.device)  # one process, or this rank of `accelerate launch` (before loading models)
    with dist.main_first():
        pipe = load_kontext(models)
    from regionroute.fingerprint import stage_code_digest

    done = stylize_splits(pipe, samples, args.out, args.style, cfg, models, stage_code_digest("stylize"))
    if dist.is_main():
        print(f"stylize {args.style}: generated {sum(done.values())} images in {args.out}")
    return 0


if __name__ == "__main__":
    from regionroute.launch import launch

    raise SystemExit(launch("stages.stylize", main))
