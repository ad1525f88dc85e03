"""``bsbr bench ...``: every benchmark subcommand is listed here, in :data:`BENCH_COMMANDS`;
:mod:`bsbr.bench.parsers` adds the chosen one's arguments, and its module is imported when it runs."""
from __future__ import annotations

BENCH_COMMANDS = {
    "attention": "BSBR vs standard attention (and bsbr 0.1.1's, with --earlier-wheel): time and peak memory vs length",
    "models": "every attention in one LM shell: time, train time, memory vs length",
    "converted": "a converted model vs its source: prefill and decode speed",
    "quality": "train each attention in one small LM shell; eval loss by position",
}


def register(sub) -> None:
    from ..cli import LazyParser, add_lazy_commands

    p = sub.add_parser("bench", help="benchmarks: speed and memory, side by side, JSON + PNG")
    p.commands = p.add_subparsers(dest="bench_command", metavar="BENCH", parser_class=LazyParser)
    add_lazy_commands(p.commands, {name: (text, "bsbr.bench.parsers") for name, text in BENCH_COMMANDS.items()})
