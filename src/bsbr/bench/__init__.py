"""Benchmarks: side-by-side timings and memory, medians of repeats, JSON plus PNG plots. The
``bsbr bench`` subcommands are listed in :mod:`bsbr.bench.cli`, their command lines in :mod:`bsbr.bench.parsers`."""
