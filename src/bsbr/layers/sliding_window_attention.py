"""SlidingWindowAttention: causal softmax attention over the last ``window_size`` tokens
(Longformer/Mistral-style local attention), with the projections of BSBRAttention. With
``window_size`` equal to BSBR's chunk size it is the "local attention only" baseline that tells
whether BSBR's retrieval of earlier chunks is worth its cost."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..ops.sliding_window import chunk_sliding_window_attention
from .multihead import MultiHeadBase
from ..ops.checks import check_int


class SlidingWindowAttention(MultiHeadBase):
    """Args:
        hidden_dim, num_heads, window_size: model width, heads, the last positions each token sees (itself
            included). The window counts positions: padding inside a sequence takes part of it (left and right
            padding do not change a sequence's output; the other layers skip padding wherever it lies).
        dropout: on the attention output before ``out_proj``.
        head_dim: default ``hidden_dim // num_heads``. bias / out_bias: projection biases.
    """

    def __init__(self, hidden_dim: int, num_heads: int, window_size: int, dropout: float = 0.0, *,
                 head_dim: Optional[int] = None, bias: bool = True, out_bias: Optional[bool] = None):
        super().__init__(hidden_dim, num_heads, dropout, head_dim, bias, out_bias)
        check_int("window_size", window_size)
        self.window_size = window_size

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                position_embeddings: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        q, k, v, valid = self.project(hidden_states, attention_mask, position_embeddings)
        o, _ = chunk_sliding_window_attention(q, k, v, window_size=self.window_size, valid=valid)
        return self.output(o)
