"""Benchmarks: side-by-side timings and memory, medians of repeats, JSON plus PNG plots.

Every ``bsbr bench`` subcommand is listed in :mod:`bsbr.bench.cli`; each command module (attention,
models, quality, converted) adds its own parser there with ``register(bench_sub)``.
"""
