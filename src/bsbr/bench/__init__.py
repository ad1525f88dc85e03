"""Benchmarks: side-by-side timings and memory, medians of repeats, JSON plus PNG plots."""
