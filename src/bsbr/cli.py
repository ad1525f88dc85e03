"""The ``bsbr`` command. Each feature module registers its own subcommands (``register(subparsers)``);
heavy imports happen inside the commands so ``bsbr --help`` stays fast."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

# module -> it adds one or more subcommands
COMMAND_MODULES = [
    "bsbr.demo",
    "bsbr.convert.cli",
    "bsbr.distill.cli",
    "bsbr.bench.cli",
    "bsbr.evaluate.cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bsbr", description="Block Sparse attention with Block Retrieval")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, FileNotFoundError) as e:
        # user errors: one clear line, no traceback (use -v for the traceback)
        if args.verbose:
            raise
        print(f"bsbr {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
