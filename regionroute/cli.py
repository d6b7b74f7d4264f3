"""The ``regionroute`` console command (users' entry point outside DVC).

Subcommands:
  make-demo ROOT   write the synthetic COCO-format demo dataset (committed under data/demo)
"""

from __future__ import annotations

import argparse

from regionroute.errors import exit_on_user_error

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="regionroute", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("make-demo", help="write the synthetic COCO-format demo dataset")
    demo.add_argument("root", help="output directory, e.g. data/demo")
    demo.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    return parser


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "make-demo":
        from regionroute.data.demo import build_demo

        build_demo(args.root, seed=args.seed)
        print(f"wrote demo dataset to {args.root}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
