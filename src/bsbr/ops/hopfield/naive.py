"""Reference causal Hopfield attention (Ramsauer et al., 2021): masked quadratic form, float64-capable.

The stored patterns are the keys k_j, j <= t (causal). The state pattern starts at the query and is
updated with the modern-Hopfield rule a fixed number of times, then reads out the values:

    xi^(0) = q_t
    xi^(s+1) = sum_{j<=t} softmax_j(beta xi^(s) . k_j) k_j        for s < num_steps - 1
    o_t = sum_{j<=t} softmax_j(beta xi^(S) . k_j) v_j              (S = num_steps - 1)

num_steps = 1 with beta = 1/sqrt(d) is standard causal attention.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from ..linear_attn.utils import check_int, check_qkv, check_valid, mask_padding, zero_padded
from .utils import beta_per_head


def naive_hopfield_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                             beta: Union[None, float, torch.Tensor] = None, num_steps: int = 1,
                             valid: Optional[torch.Tensor] = None):
    """Same signature and meaning as :func:`chunk_hopfield_attention`; builds the n x n scores."""
    b, h, n, d, dv = check_qkv(q, k, v)
    check_int("num_steps", num_steps)
    valid = check_valid(valid, b, n)
    bt = beta_per_head(beta, h, d, q)
    causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()[None]
    allowed = mask_padding(causal, valid)[:, None]  # (b or 1, 1, n, n)

    def retrieve(xi, targets):
        s = (bt * xi) @ k.transpose(-1, -2)  # (b, h, n, n)
        return torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1) @ targets

    xi = q
    for _ in range(num_steps - 1):
        xi = retrieve(xi, k)
    return zero_padded(retrieve(xi, v), valid), None
