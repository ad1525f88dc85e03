"""Sliding-window causal attention: naive (reference, n x n mask) and chunk (blocked SDPA, default)."""
from .chunk import chunk_sliding_window_attention
from .naive import naive_sliding_window_attention

__all__ = ["chunk_sliding_window_attention", "naive_sliding_window_attention"]
