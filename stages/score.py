"""DVC stage ``score``: RSES + VLM judge + attention localization per method (regionroute.score)."""

from __future__ import annotations

import argparse
from pathlib import Path

from regionroute.config import DataConfig, ScoreConfig, load_section
from regionroute.errors import exit_on_user_error


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--params", type=Path, default=Path("params.yaml"))
    p.add_argument("--records", type=Path, required=True, help="composite stage manifest.jsonl (eval split)")
    p.add_argument(
        "--method",
        nargs=2,
        action="append",
        metavar=("NAME", "DIR"),
        required=True,
        help="a method's infer output directory (repeat per method)",
    )
    p.add_argument("--per-sample", type=Path, required=True, help="per-sample scores (CSV)")
    p.add_argument("--by-size", type=Path, required=True, help="size-stratified means (CSV)")
    p.add_argument("--metrics", type=Path, required=True, help="per-method means (JSON, DVC metrics)")
    return p


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from regionroute.check import preflight

    preflight(args.params, "score")  # missing weights, settings, GPU memory: one line each, before any work
    data = load_section(args.params, "data", DataConfig)
    cfg = load_section(args.params, "score", ScoreConfig)
    from regionroute import distributed as dist
    from regionroute.score import score_methods, write_scores

    dist.state(cfg.device)  # one process, or this rank of `accelerate launch` (before loading models)
    df = score_methods({name: Path(d) for name, d in args.method}, args.records, cfg, data.styles)
    if dist.is_main():  # every rank has the gathered table; one writes it
        write_scores(df, args.per_sample, args.by_size, args.metrics)
        print(f"score: {len(df)} rows -> {args.metrics}")
    return 0


if __name__ == "__main__":
    from regionroute.launch import launch

    raise SystemExit(launch("stages.score", main))
