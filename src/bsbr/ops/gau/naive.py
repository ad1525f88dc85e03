"""Reference causal GAU attention (Hua et al., 2022, "Transformer Quality in Linear Time"): the
squared-ReLU attention of the gated attention unit, masked quadratic form, float64-capable.

    A_tj = relu(scale * q_t . k_j)^2 / N_t      for j <= t (and j a real token)
    o_t  = sum_j A_tj v_j

The paper divides by the sequence length n; a causal layer cannot know n, so each row divides by
N_t, the number of keys it sees (itself included). The gate (u * o) and projections are the layer's.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..checks import check_qkv, check_scale, check_valid, zero_padded


def naive_gau_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: Optional[float] = None,
                        valid: Optional[torch.Tensor] = None):
    """Same meaning as :func:`chunk_gau_attention`; builds the n x n matrix."""
    b, h, n, d, dv = check_qkv(q, k, v)
    scale = check_scale(scale, d)
    valid = check_valid(valid, b, n)
    allowed = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()[None]  # (1, n, n)
    if valid is not None:
        allowed = allowed & valid[:, None, :]
    allowed = allowed[:, None].to(q.dtype)  # (b or 1, 1, n, n)
    a = torch.relu((q @ k.transpose(-1, -2)) * scale).square() * allowed  # (b, h, n, n)
    count = allowed.sum(-1, keepdim=True).clamp(min=1.0)  # N_t
    return zero_padded((a @ v) / count, valid), None
