"""DeltaNet's delta rule: naive (the explicit recurrence, reference and decoding form) and chunk
(WY/UT-transform chunkwise algorithm, default)."""
from .chunk import chunk_delta_rule
from .naive import naive_delta_rule

__all__ = ["chunk_delta_rule", "naive_delta_rule"]
