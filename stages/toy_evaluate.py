"""Toy DVC stage ``evaluate``: the toy base's quality and the paper's premise in it (regionroute.toy.evaluate)."""

from __future__ import annotations

import argparse
from pathlib import Path

from regionroute.config import ModelsConfig, load_section
from regionroute.errors import exit_on_user_error
from regionroute.files import write_json
from regionroute.toy.base import BaseConfig
from regionroute.toy.evaluate import EvaluateConfig


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--params", type=Path, default=Path("toy/params.yaml"))
    p.add_argument("--model", type=Path, required=True, help="the toy base (pipeline directory)")
    p.add_argument("--metrics", type=Path, required=True, help="metrics JSON")
    p.add_argument("--figure", type=Path, required=True, help="figure PNG")
    p.add_argument("--report", type=Path, default=None, help="markdown report (next to the figure)")
    p.add_argument("--judge", type=Path, default=None, help="the judge stage's metrics, quoted in the report")
    return p


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    base = load_section(args.params, "base", BaseConfig)
    cfg = load_section(args.params, "evaluate", EvaluateConfig)
    import torch

    from regionroute.files import atomic_path, read_json
    from regionroute.models.kontext import load_kontext
    from regionroute.toy.evaluate import base_report, evaluate_base, save_figure

    torch.manual_seed(cfg.seed)
    pipe = load_kontext(ModelsConfig(kontext=str(args.model), dtype="float32", device="cpu"))
    metrics, shown = evaluate_base(pipe, cfg, base.size, base.max_sequence_length)
    write_json(args.metrics, metrics)
    save_figure(args.figure, shown)
    if args.report is not None:
        with atomic_path(args.report) as tmp:
            tmp.write_text(base_report(metrics, read_json(args.judge) if args.judge else None))
    s = metrics["summary"]
    print(
        f"toy evaluate: min style ratio {s['min_style_ratio']:.2f}, mean PSNR {s['mean_psnr']:.1f} dB, "
        f"background change vs filter {s['bg_change_vs_filter']:.2f}, "
        f"attention mass vs area {s['attn_mass_vs_area']:.2f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
