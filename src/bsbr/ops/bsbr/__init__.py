"""BSBR attention in three forms with one signature: naive (reference), chunk (default), recurrent."""
from .chunk import chunk_bsbr_attention
from .naive import naive_bsbr_attention
from .recurrent import bsbr_attention_step, recurrent_bsbr_attention
from .utils import VARIANTS, BSBRState

__all__ = [
    "VARIANTS",
    "BSBRState",
    "bsbr_attention_step",
    "chunk_bsbr_attention",
    "naive_bsbr_attention",
    "recurrent_bsbr_attention",
]
