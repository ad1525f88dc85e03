"""HopfieldAttention: causal modern-Hopfield retrieval (Ramsauer et al., 2021) as an attention layer,
the earlier bsbr library's "HopfieldNetwork" baseline made causal. A learned inverse temperature
beta per head (stored as log beta, so it stays positive), and ``num_steps`` Hopfield updates of the
query before the values are read out: num_steps = 1 is standard attention with a learned temperature.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import nn

from ..ops.hopfield import chunk_hopfield_attention
from .multihead import MultiHeadBase
from ..ops.checks import check_int, check_number


class HopfieldAttention(MultiHeadBase):
    """Args:
        hidden_dim, num_heads, dropout, head_dim, bias, out_bias: as in SlidingWindowAttention.
        num_steps: Hopfield updates (>= 1); the cost is num_steps causal attentions.
        beta: initial inverse temperature, default ``1/sqrt(head_dim)``.
    """

    def __init__(self, hidden_dim: int, num_heads: int, dropout: float = 0.0, *, head_dim: Optional[int] = None,
                 bias: bool = True, out_bias: Optional[bool] = None, num_steps: int = 2,
                 beta: Optional[float] = None):
        super().__init__(hidden_dim, num_heads, dropout, head_dim, bias, out_bias)
        check_int("num_steps", num_steps)
        if beta is None:
            beta = self.head_dim ** -0.5
        check_number("beta", beta, 0, above=True)
        self.num_steps = num_steps
        self.log_beta = nn.Parameter(torch.full((num_heads,), math.log(beta)))

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                position_embeddings: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        q, k, v, valid = self.project(hidden_states, attention_mask, position_embeddings)
        o, _ = chunk_hopfield_attention(q, k, v, beta=self.log_beta.exp(), num_steps=self.num_steps, valid=valid)
        return self.output(o)
