"""Standard causal softmax attention (SDPA) with the same projections as BSBRAttention: the baseline
that benchmarks and tests compare against."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ..ops.checks import mask_padding, zero_padded
from .multihead import MultiHeadBase


class StandardAttention(MultiHeadBase):
    def __init__(self, hidden_dim: int, num_heads: int, dropout: float = 0.0, *,
                 num_kv_heads: Optional[int] = None, head_dim: Optional[int] = None, bias: bool = True,
                 out_bias: Optional[bool] = None):
        super().__init__(hidden_dim, num_heads, dropout, head_dim, bias, out_bias, num_kv_heads)

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                position_embeddings: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        q, k, v, valid = self.project(hidden_states, attention_mask, position_embeddings)
        gqa = self.num_heads != self.num_kv_heads
        if valid is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:  # padding needs an explicit (n x n) mask
            n = q.shape[2]
            allowed = mask_padding(torch.ones(1, n, n, dtype=torch.bool, device=q.device).tril(), valid)
            o = zero_padded(F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None], enable_gqa=gqa), valid)
        return self.output(o)
