"""``bsbr bench ...`` subcommands (filled in by the benchmark modules)."""
from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks (speed, memory)")
    p.add_subparsers(dest="bench_command", metavar="BENCH")
