"""BSBR attention in three forms with one meaning: naive (reference), chunk (default), recurrent."""
from .chunk import chunk_bsbr_attention
from .naive import naive_bsbr_attention
from .options import VARIANTS, BSBROptions
from .recurrent import bsbr_attention_step, recurrent_bsbr_attention
from .state import BSBRState

__all__ = [
    "VARIANTS",
    "BSBROptions",
    "BSBRState",
    "bsbr_attention_step",
    "chunk_bsbr_attention",
    "naive_bsbr_attention",
    "recurrent_bsbr_attention",
]
