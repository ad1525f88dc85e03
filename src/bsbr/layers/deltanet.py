"""DeltaNet: linear attention whose state is updated with the delta rule (Schlag et al., 2021;
Yang et al., 2024): each token overwrites what its key retrieved instead of adding to it, so the
d x d state does not saturate as plain linear attention's does.

q, k = L2-normalised SiLU features (the key norm of 1 makes each write a projection update),
beta_t = sigmoid(w_beta . x_t) per head. No short convolution and no output norm (the smallest
DeltaNet), no rotary positions (the recurrence knows the order; ``position_embeddings`` is accepted
so that layers swap freely).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.deltanet import chunk_delta_rule, naive_delta_rule
from .multihead import MultiHeadBase
from ..ops.checks import check_int, zero_padded


class DeltaNet(MultiHeadBase):
    """Args:
        hidden_dim, num_heads, dropout, head_dim, bias, out_bias: as in SlidingWindowAttention.
        chunk_size: tokens per chunk of the chunkwise algorithm (speed knob; results do not depend on it).
    """

    rotary_dim = 0  # no rotary positions (AttentionLM builds none for it)

    def __init__(self, hidden_dim: int, num_heads: int, dropout: float = 0.0, *, head_dim: Optional[int] = None,
                 bias: bool = True, out_bias: Optional[bool] = None, chunk_size: int = 64):
        super().__init__(hidden_dim, num_heads, dropout, head_dim, bias, out_bias)
        check_int("chunk_size", chunk_size)
        self.chunk_size = chunk_size
        self.beta_proj = nn.Linear(hidden_dim, num_heads, bias=True)

    def _inputs(self, hidden_states, attention_mask):
        q, k, v, valid = self.project(hidden_states, attention_mask)
        q = F.normalize(F.silu(q), dim=-1)
        k = F.normalize(F.silu(k), dim=-1)
        beta = torch.sigmoid(self.beta_proj(hidden_states)).transpose(1, 2)  # (b, h, n)
        if valid is not None:  # beta = 0: a padded token writes nothing
            beta = beta * valid[:, None, :].to(beta.dtype)
        return q, k, v, beta, valid

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                position_embeddings: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        q, k, v, beta, valid = self._inputs(hidden_states, attention_mask)
        o, _ = chunk_delta_rule(q, k, v, beta, chunk_size=self.chunk_size)
        return self.output(zero_padded(o, valid))

    def step(self, hidden_states: torch.Tensor, state: Optional[torch.Tensor] = None,
             attention_mask: Optional[torch.Tensor] = None, position_embeddings=None):
        """Decode: continue from ``state`` ((b, h, d, d) or None) token by token. Returns (output, state)."""
        q, k, v, beta, valid = self._inputs(hidden_states, attention_mask)
        o, state = naive_delta_rule(q, k, v, beta, initial_state=state, output_final_state=True)
        return self.output(zero_padded(o, valid)), state
