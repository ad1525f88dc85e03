"""Reference causal Hopfield attention (Ramsauer et al., 2021): masked quadratic form, float64-capable.

The stored patterns are the keys k_j, j <= t (causal). The state pattern starts at the query and is
updated with the modern-Hopfield rule a fixed number of times, then reads out the values:

    xi^(0) = q_t
    xi^(s+1) = sum_{j<=t} softmax_j(beta xi^(s) . k_j) k_j        for s < num_steps - 1
    o_t = sum_{j<=t} softmax_j(beta xi^(S) . k_j) v_j              (S = num_steps - 1)

num_steps = 1 with beta = 1/sqrt(d) is standard causal attention.
"""
from __future__ import annotations

import math

from typing import Optional, Union

import torch

from ..checks import check_int, check_qkv, check_valid, mask_padding, zero_padded


def check_hopfield_inputs(q, k, v, beta, num_steps, valid):
    """Check the arguments; return the padding mask (bool or None) and the inverse temperature as a
    (1, h, 1, 1) tensor: None means 1/sqrt(d) (standard attention)."""
    b, h, n, d, dv = check_qkv(q, k, v)
    check_int("num_steps", num_steps)
    valid = check_valid(valid, b, n)
    beta = d ** -0.5 if beta is None else beta
    if isinstance(beta, bool) or not isinstance(beta, (int, float, torch.Tensor)):
        raise TypeError(f"beta must be None, a float or a ({h},) tensor, got {type(beta).__name__}")
    if isinstance(beta, torch.Tensor):
        if beta.dim() > 1 or beta.numel() not in (1, h):
            raise ValueError(f"beta must be a scalar or have shape ({h},), got {tuple(beta.shape)}")
        return valid, beta.to(q.dtype).reshape(-1).expand(h).view(1, h, 1, 1)
    if not math.isfinite(beta):  # (nan gave zeros in one form, nan in the other)
        raise ValueError(f"beta must be a finite number, got {beta!r}")
    return valid, torch.full((1, h, 1, 1), float(beta), dtype=q.dtype, device=q.device)


def naive_hopfield_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                             beta: Union[None, float, torch.Tensor] = None, num_steps: int = 1,
                             valid: Optional[torch.Tensor] = None):
    """Same signature and meaning as :func:`chunk_hopfield_attention`; builds the n x n scores."""
    valid, bt = check_hopfield_inputs(q, k, v, beta, num_steps, valid)
    n = q.shape[2]
    causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()[None]
    allowed = mask_padding(causal, valid)[:, None]  # (b or 1, 1, n, n)

    def retrieve(xi, targets):
        s = (bt * xi) @ k.transpose(-1, -2)  # (b, h, n, n)
        return torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1) @ targets

    xi = q
    for _ in range(num_steps - 1):
        xi = retrieve(xi, k)
    return zero_padded(retrieve(xi, v), valid), None
