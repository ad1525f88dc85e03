"""Standard causal softmax attention (SDPA) with the same projections as BSBRAttention: the baseline
that benchmarks and tests compare against."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.checks import mask_padding, zero_padded
from .inputs import check_hidden_states, mask_to_valid, resolve_head_dim, resolve_kv_heads
from .rotary import apply_rotary


class StandardAttention(nn.Module):
    def __init__(self, hidden_dim: int, num_heads: int, dropout: float = 0.0, *,
                 num_kv_heads: Optional[int] = None, head_dim: Optional[int] = None, bias: bool = True,
                 out_bias: Optional[bool] = None):
        super().__init__()
        head_dim = resolve_head_dim(hidden_dim, num_heads, head_dim)
        num_kv_heads = resolve_kv_heads(num_heads, num_kv_heads)
        self.hidden_dim, self.num_heads, self.num_kv_heads, self.head_dim = hidden_dim, num_heads, num_kv_heads, head_dim
        self.q_proj = nn.Linear(hidden_dim, num_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden_dim, num_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden_dim, num_kv_heads * head_dim, bias=bias)
        self.out_proj = nn.Linear(num_heads * head_dim, hidden_dim, bias=bias if out_bias is None else out_bias)
        self.dropout_layer = nn.Dropout(dropout)

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                position_embeddings: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        check_hidden_states(hidden_states, self.hidden_dim)
        b, n, _ = hidden_states.shape
        valid = mask_to_valid(attention_mask, b, n)
        q = self.q_proj(hidden_states).view(b, n, self.num_heads, -1).transpose(1, 2)
        k = self.k_proj(hidden_states).view(b, n, self.num_kv_heads, -1).transpose(1, 2)
        v = self.v_proj(hidden_states).view(b, n, self.num_kv_heads, -1).transpose(1, 2)
        if position_embeddings is not None:
            q, k = apply_rotary(q, *position_embeddings), apply_rotary(k, *position_embeddings)
        gqa = self.num_heads != self.num_kv_heads
        if valid is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:  # padding needs an explicit (n x n) mask
            allowed = mask_padding(torch.ones(1, n, n, dtype=torch.bool, device=q.device).tril(), valid)
            o = zero_padded(F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None], enable_gqa=gqa), valid)
        return self.out_proj(self.dropout_layer(o.transpose(1, 2).reshape(b, n, -1)))
