"""DVC stage ``sample``: COCO pairs + one target mask each (regionroute.data.coco)."""

from __future__ import annotations

import argparse
from pathlib import Path

from regionroute.config import DataConfig, SampleConfig, load_section
from regionroute.errors import ConfigError, exit_on_user_error


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--params", type=Path, default=Path("params.yaml"))
    p.add_argument("--split", required=True, choices=["train", "eval"], help="which data.splits entry")
    p.add_argument("--instances", type=Path, required=True, help="COCO instances_<split>.json")
    p.add_argument("--captions", type=Path, required=True, help="COCO captions_<split>.json")
    p.add_argument("--images", type=Path, required=True, help="directory of the split's images")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    return p


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    data = load_section(args.params, "data", DataConfig)
    cfg = load_section(args.params, "sample", SampleConfig)
    split = data.splits[args.split]
    from regionroute.data.coco import sample_split, skip_summary

    try:
        stats = sample_split(
            args.instances,
            args.captions,
            args.images,
            args.out,
            cfg,
            split.num,
            split.coco,
            num_key=f"data.splits.{args.split}.num",
        )
    except ConfigError as exc:
        raise ConfigError(f"{args.params}: {exc}") from None
    skipped = skip_summary(stats["skipped_annotations"], stats["dropped"])
    print(f"sample {args.split}: wrote {stats['written']} pairs to {args.out} (skipped: {skipped})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
