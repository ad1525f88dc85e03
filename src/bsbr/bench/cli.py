"""``bsbr bench ...``: each benchmark module adds its own subcommand via ``register(bench_sub)``."""
from __future__ import annotations

import importlib

BENCH_MODULES = ["bsbr.bench.attention", "bsbr.bench.models", "bsbr.bench.quality", "bsbr.bench.converted"]


def register(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks: speed and memory, side by side, JSON + PNG")
    bench_sub = p.add_subparsers(dest="bench_command", metavar="BENCH")
    for name in BENCH_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:  # a benchmark module not written yet must not break the CLI
            if e.name != name:
                raise
            continue
        mod.register(bench_sub)
