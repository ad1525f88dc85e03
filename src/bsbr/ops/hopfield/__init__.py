"""Causal modern-Hopfield attention: naive (masked quadratic reference) and chunk (fused SDPA per step)."""
from .chunk import chunk_hopfield_attention
from .naive import naive_hopfield_attention

__all__ = ["chunk_hopfield_attention", "naive_hopfield_attention"]
