"""DVC stage ``composite``: pseudo-GT by seamless clone / alpha (regionroute.composite)."""

from __future__ import annotations

import argparse
from pathlib import Path

from regionroute.config import CompositeConfig, DataConfig, load_section
from regionroute.errors import exit_on_user_error


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--params", type=Path, default=Path("params.yaml"))
    p.add_argument("--samples", type=Path, required=True, help="sample stage output root (train/, eval/)")
    p.add_argument("--stylized", type=Path, required=True, help="stylize stage output root (<style>/<split>/)")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    return p


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    data = load_section(args.params, "data", DataConfig)
    cfg = load_section(args.params, "composite", CompositeConfig)
    from regionroute.composite import composite_splits

    used = composite_splits(args.samples, args.stylized, args.out, data.styles, sorted(data.splits), cfg)
    for split, counts in used.items():
        print(f"composite {split}: {sum(counts.values())} records, methods {dict(sorted(counts.items()))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
