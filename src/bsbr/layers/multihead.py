"""The q/k/v/out projections every multi-head attention layer has (BSBRAttention, StandardAttention
and the baselines: one set of parameter names, so layers swap one for another)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from ..ops.checks import check_int
from ..ops.checks import check_flag
from .inputs import check_dropout, check_layer_inputs, check_rotary
from .rotary import apply_rotary


class MultiHeadBase(nn.Module):
    """q_proj / k_proj / v_proj / out_proj on the layer itself, grouped K/V heads (``num_kv_heads``,
    default ``num_heads``), plus the head split and merge."""

    def __init__(self, hidden_dim: int, num_heads: int, dropout: float, head_dim: Optional[int], bias: bool,
                 out_bias: Optional[bool], num_kv_heads: Optional[int] = None):
        super().__init__()
        check_int("hidden_dim", hidden_dim)
        check_int("num_heads", num_heads)
        if head_dim is None:
            if hidden_dim % num_heads:
                raise ValueError(f"hidden_dim ({hidden_dim}) must be divisible by num_heads ({num_heads})")
            head_dim = hidden_dim // num_heads
        check_int("head_dim", head_dim)
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        check_int("num_kv_heads", num_kv_heads)
        check_flag("bias", bias)  # a truthy stand-in ("no", 2) would silently mean True
        check_flag("out_bias", out_bias, none=True)
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.hidden_dim, self.num_heads, self.num_kv_heads, self.head_dim = hidden_dim, num_heads, num_kv_heads, head_dim
        self.dropout = check_dropout(dropout)
        self.q_proj = nn.Linear(hidden_dim, num_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden_dim, num_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden_dim, num_kv_heads * head_dim, bias=bias)
        self.out_proj = nn.Linear(num_heads * head_dim, hidden_dim, bias=bias if out_bias is None else out_bias)
        self.dropout_layer = nn.Dropout(self.dropout)

    def heads(self, t: torch.Tensor) -> torch.Tensor:  # (b, n, h*d) -> (b, h, n, d)
        b, n, _ = t.shape
        return t.view(b, n, t.shape[-1] // self.head_dim, self.head_dim).transpose(1, 2)

    def project(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor],
                position_embeddings: Optional[Tuple[torch.Tensor, torch.Tensor]] = None):
        """Check the input and return (q, k, v, valid): the projections split into heads, q and k
        rotated when ``position_embeddings`` (rotary cos, sin) is given; ``valid`` the (b, n) mask or None."""
        valid = check_layer_inputs(hidden_states, self.hidden_dim, attention_mask, self.q_proj.weight)
        q, k, v = (self.heads(proj(hidden_states)) for proj in (self.q_proj, self.k_proj, self.v_proj))
        if position_embeddings is not None:
            check_rotary("position_embeddings", position_embeddings, q)
            q, k = apply_rotary(q, *position_embeddings), apply_rotary(k, *position_embeddings)
            q, k = q.to(v.dtype), k.to(v.dtype)  # (under autocast v is half precision, the tables not)
        return q, k, v, valid

    def output(self, o: torch.Tensor) -> torch.Tensor:  # (b, h, n, dv) -> (b, n, hidden)
        b, h, n, dv = o.shape
        return self.out_proj(self.dropout_layer(o.transpose(1, 2).reshape(b, n, h * dv)))
