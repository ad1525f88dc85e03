"""Functional attention math (no nn.Module). Every op has a reference beside its fast forms."""
from .bsbr import (
    VARIANTS,
    BSBROptions,
    BSBRState,
    bsbr_attention_step,
    chunk_bsbr_attention,
    naive_bsbr_attention,
    recurrent_bsbr_attention,
)

__all__ = [
    "VARIANTS",
    "BSBROptions",
    "BSBRState",
    "bsbr_attention_step",
    "chunk_bsbr_attention",
    "naive_bsbr_attention",
    "recurrent_bsbr_attention",
]
