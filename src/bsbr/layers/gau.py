"""GatedAttentionUnit (GAU; Hua et al., 2022), causal. One head:

    u = silu(W_u x), v = silu(W_v x)                   (b, n, e), e = expansion_factor * hidden_dim
    z = silu(W_z x)                                    (b, n, s), s = query_key_dim
    q = gamma_q * z + beta_q,  k = gamma_k * z + beta_k (shared projection, per-dim scale and offset)
    o = W_o (u * A v),  A = causal squared-ReLU attention (see :mod:`bsbr.ops.gau`)

In the paper a GAU replaces both attention and the MLP; here it replaces attention only, so that the
shell's blocks differ in nothing else (its parameter count is reported beside the others).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.checks import check_int
from ..ops.gau import chunk_gau_attention
from ..ops.checks import check_flag
from .inputs import check_dropout, check_layer_inputs, check_rotary
from .rotary import apply_rotary


class GatedAttentionUnit(nn.Module):
    """Args:
        hidden_dim: model width.
        expansion_factor: width of u and v is ``expansion_factor * hidden_dim`` (paper: 2).
        query_key_dim: s, the shared q/k width (paper: 128). Rotary positions, when given, must have
            this dim (the shell builds them from the layer's ``rotary_dim``).
        dropout: on the gated output before ``out_proj``. bias: projection biases.
        block_size: query block of the attention op (memory knob only).
    """

    def __init__(self, hidden_dim: int, expansion_factor: int = 2, query_key_dim: int = 128,
                 dropout: float = 0.0, *, bias: bool = True, block_size: int = 512):
        super().__init__()
        check_int("hidden_dim", hidden_dim)
        check_int("expansion_factor", expansion_factor)
        check_int("query_key_dim", query_key_dim)
        check_flag("bias", bias)
        check_int("block_size", block_size)
        if query_key_dim % 2:
            raise ValueError(f"query_key_dim must be even (rotary positions), got {query_key_dim}")
        self.hidden_dim, self.query_key_dim, self.block_size = hidden_dim, query_key_dim, block_size
        self.expanded_dim = expansion_factor * hidden_dim
        self.dropout = check_dropout(dropout)
        self.uv_proj = nn.Linear(hidden_dim, 2 * self.expanded_dim, bias=bias)
        self.z_proj = nn.Linear(hidden_dim, query_key_dim, bias=bias)
        # per-dim scale and offset that turn the shared z into q and k
        self.qk_scale = nn.Parameter(torch.ones(2, query_key_dim))
        self.qk_offset = nn.Parameter(torch.zeros(2, query_key_dim))
        self.out_proj = nn.Linear(self.expanded_dim, hidden_dim, bias=bias)
        self.dropout_layer = nn.Dropout(self.dropout)

    @property
    def rotary_dim(self) -> int:
        return self.query_key_dim

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                position_embeddings: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        valid = check_layer_inputs(hidden_states, self.hidden_dim, attention_mask, self.uv_proj.weight)
        u, v = F.silu(self.uv_proj(hidden_states)).chunk(2, dim=-1)  # (b, n, e) each
        z = F.silu(self.z_proj(hidden_states))  # (b, n, s)
        q = (z * self.qk_scale[0] + self.qk_offset[0]).unsqueeze(1)  # (b, 1, n, s)
        k = (z * self.qk_scale[1] + self.qk_offset[1]).unsqueeze(1)
        if position_embeddings is not None:
            check_rotary("position_embeddings", position_embeddings, q)
            q, k = apply_rotary(q, *position_embeddings), apply_rotary(k, *position_embeddings)
        q, k = q.to(v.dtype), k.to(v.dtype)  # (under autocast v is half precision; the scale, offset and tables not)
        o, _ = chunk_gau_attention(q, k, v.unsqueeze(1), valid=valid, block_size=self.block_size)  # (b, 1, n, e)
        return self.out_proj(self.dropout_layer(u * o.squeeze(1)))
