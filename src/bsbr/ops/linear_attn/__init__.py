"""Causal linear attention (Katharopoulos et al., 2020) over feature-mapped q/k: naive (quadratic
reference), chunk (default) and recurrent (decoding) forms."""
from .chunk import chunk_linear_attention
from .naive import naive_linear_attention
from .recurrent import recurrent_linear_attention

__all__ = ["chunk_linear_attention", "naive_linear_attention", "recurrent_linear_attention"]
