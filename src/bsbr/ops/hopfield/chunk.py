"""Causal Hopfield attention, fast form: each update step is one fused causal SDPA call
(flash-style, no n x n tensor without a padding mask). Time O(num_steps n^2 d): it is as quadratic as
standard attention, and num_steps times its cost."""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F

from ..checks import mask_padding, zero_padded
from .naive import check_hopfield_inputs


def chunk_hopfield_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                             beta: Union[None, float, torch.Tensor] = None, num_steps: int = 1,
                             valid: Optional[torch.Tensor] = None):
    """Causal modern-Hopfield retrieval iterated ``num_steps`` times (see :mod:`.naive`).

    Args:
        q, k: (b, h, n, d); v: (b, h, n, dv).
        beta: inverse temperature: None (1/sqrt(d)), a float, or a (h,) tensor (learnable per head).
        num_steps: Hopfield updates; the last one reads out v, the earlier ones retrieve keys.
        valid: (b, n) padding mask (1/True = real); padded keys are never retrieved, padded
            positions output 0 (an explicit n x n mask is built only in this case).

    Returns:
        ``(o, None)`` with o (b, h, n, dv).
    """
    valid, bt = check_hopfield_inputs(q, k, v, beta, num_steps, valid)
    n = q.shape[2]
    mask = None
    if valid is not None:
        mask = mask_padding(torch.ones(1, n, n, dtype=torch.bool, device=q.device).tril(), valid)[:, None]

    def retrieve(xi, targets):  # beta folded into the query, so a per-head beta needs no custom kernel
        if mask is None:
            return F.scaled_dot_product_attention(bt * xi, k, targets, is_causal=True, scale=1.0)
        return F.scaled_dot_product_attention(bt * xi, k, targets, attn_mask=mask, scale=1.0)

    xi = q
    for _ in range(num_steps - 1):
        xi = retrieve(xi, k)  # (b, h, n, d)
    return zero_padded(retrieve(xi, v), valid), None  # (b, h, n, dv)
