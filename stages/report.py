"""DVC stage ``report``: reports/results (results.md, figures) and metrics/targets.json (regionroute.report)."""

from __future__ import annotations

import argparse
from pathlib import Path

from regionroute.config import ModelsConfig, ScoreConfig, load_section
from regionroute.errors import exit_on_user_error


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--params", type=Path, default=Path("params.yaml"))
    p.add_argument("--per-sample", type=Path, required=True, help="per-sample scores (score stage CSV)")
    p.add_argument("--by-size", type=Path, required=True, help="size-stratified means (score stage CSV)")
    p.add_argument("--records", type=Path, required=True, help="composite stage manifest.jsonl (eval split)")
    p.add_argument(
        "--method", nargs=2, action="append", metavar=("NAME", "DIR"), required=True,
        help="a method's infer output directory (repeat per method)",
    )  # fmt: skip
    p.add_argument("--out", type=Path, required=True, help="report directory (results.md, figures/)")
    p.add_argument("--targets", type=Path, required=True, help="the judged targets (JSON metrics file)")
    p.add_argument("--readme", type=Path, default=None, help="a README whose result markers get the targets table")
    return p


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    models = load_section(args.params, "models", ModelsConfig)
    score = load_section(args.params, "score", ScoreConfig)
    from regionroute.report import world_of, write_report

    world = world_of(models.kontext, score.clip, score.lpips, score.vlm)
    methods = {name: Path(d) for name, d in args.method}
    md = write_report(
        args.out,
        args.per_sample,
        args.by_size,
        args.records,
        methods,
        args.targets,
        world,
        score.seed,
        args.readme,
        random_vlm=score.vlm == "tiny",
    )
    print(f"report: wrote {md} and {args.targets}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
