"""``bsbr bench ...``: every benchmark subcommand is listed here, in :data:`BENCH_COMMANDS`; its module
(imported only when that benchmark is chosen) adds the arguments with ``register(bench_sub)``."""
from __future__ import annotations

# name -> (help, module whose register(bench_sub) defines it)
BENCH_COMMANDS = {
    "attention": ("BSBR vs standard attention (and bsbr 0.1.1's, with --earlier-wheel): time and peak memory vs length", "bsbr.bench.attention"),
    "models": ("every attention in one LM shell: time, train time, memory vs length", "bsbr.bench.models"),
    "converted": ("a converted model vs its source: prefill and decode speed", "bsbr.bench.converted"),
    "quality": ("train each attention in one small LM shell; eval loss by position", "bsbr.bench.quality"),
}


def register(sub) -> None:
    from ..cli import LazyParser, add_lazy_commands

    p = sub.add_parser("bench", help="benchmarks: speed and memory, side by side, JSON + PNG")
    p.commands = p.add_subparsers(dest="bench_command", metavar="BENCH", parser_class=LazyParser)
    add_lazy_commands(p.commands, BENCH_COMMANDS)
