"""Causal squared-ReLU attention of the gated attention unit (GAU): naive (masked quadratic
reference) and chunk (query-blocked, default)."""
from .chunk import chunk_gau_attention
from .naive import naive_gau_attention

__all__ = ["chunk_gau_attention", "naive_gau_attention"]
