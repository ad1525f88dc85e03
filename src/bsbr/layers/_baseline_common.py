"""Pieces shared by the baseline attention layers: argument checks and the q/k/v/out projections
that every multi-head baseline has (named as in BSBRAttention, so layers swap one for another)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from .inputs import check_hidden_states, mask_to_valid, resolve_head_dim
from .rotary import apply_rotary


def check_dropout(dropout) -> float:
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be a float in [0, 1), got {dropout!r}")
    return float(dropout)


class MultiHeadBase(nn.Module):
    """Base of the multi-head baselines: q_proj / k_proj / v_proj / out_proj on the layer itself
    (the parameter names of BSBRAttention and StandardAttention), plus the head split and merge."""

    def __init__(self, hidden_dim: int, num_heads: int, dropout: float, head_dim: Optional[int], bias: bool,
                 out_bias: Optional[bool]):
        super().__init__()
        head_dim = resolve_head_dim(hidden_dim, num_heads, head_dim)
        self.hidden_dim, self.num_heads, self.head_dim = hidden_dim, num_heads, head_dim
        self.dropout = check_dropout(dropout)
        self.q_proj = nn.Linear(hidden_dim, num_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden_dim, num_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden_dim, num_heads * head_dim, bias=bias)
        self.out_proj = nn.Linear(num_heads * head_dim, hidden_dim, bias=bias if out_bias is None else out_bias)
        self.dropout_layer = nn.Dropout(self.dropout)

    def heads(self, t: torch.Tensor) -> torch.Tensor:  # (b, n, h*d) -> (b, h, n, d)
        b, n, _ = t.shape
        return t.view(b, n, self.num_heads, -1).transpose(1, 2)

    def project(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor],
                position_embeddings: Optional[Tuple[torch.Tensor, torch.Tensor]] = None):
        """Check the input and return (q, k, v, valid): the projections split into heads, q and k
        rotated when ``position_embeddings`` (rotary cos, sin) is given; ``valid`` the (b, n) mask or None."""
        check_hidden_states(hidden_states, self.hidden_dim)
        b, n, _ = hidden_states.shape
        valid = mask_to_valid(attention_mask, b, n)
        x = hidden_states
        q, k, v = self.heads(self.q_proj(x)), self.heads(self.k_proj(x)), self.heads(self.v_proj(x))
        if position_embeddings is not None:
            q, k = apply_rotary(q, *position_embeddings), apply_rotary(k, *position_embeddings)
        return q, k, v, valid

    def output(self, o: torch.Tensor) -> torch.Tensor:  # (b, h, n, dv) -> (b, n, hidden)
        b, h, n, dv = o.shape
        return self.out_proj(self.dropout_layer(o.transpose(1, 2).reshape(b, n, h * dv)))
