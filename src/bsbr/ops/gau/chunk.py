"""Causal GAU attention, blocked form: queries in blocks of ``block_size`` against all earlier keys,
so the forward never holds more than (block_size x n) scores. Time stays O(n^2 d): squared-ReLU
attention has no linear-time form (the paper's linear "FLASH" variant is a different layer).
Autograd keeps every block's scores for the backward, so training memory is O(n^2) as for any
non-fused quadratic attention."""
from __future__ import annotations

from typing import Optional

import torch

from ..checks import check_int, check_qkv, check_scale, check_valid, zero_padded


def chunk_gau_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: Optional[float] = None,
                        valid: Optional[torch.Tensor] = None, block_size: int = 512):
    """Squared-ReLU causal attention of the gated attention unit (see :mod:`.naive`).

    Args:
        q, k: (b, h, n, d) (GAU uses one head, h = 1, with q/k from one shared projection);
            v: (b, h, n, dv).
        scale: multiplies q . k inside the ReLU, default ``1/sqrt(d)``.
        valid: (b, n) padding mask (1/True = real): padded keys get no weight and are not counted;
            padded positions output 0.
        block_size: queries per block (memory knob only).

    Returns:
        ``(o, None)`` with o (b, h, n, dv).
    """
    b, h, n, d, dv = check_qkv(q, k, v)
    scale = check_scale(scale, d)
    valid = check_valid(valid, b, n)
    check_int("block_size", block_size)
    # N_t: keys visible to query t (itself included), at least 1 for padded queries
    if valid is None:
        count = torch.arange(1, n + 1, dtype=q.dtype, device=q.device).view(1, 1, n, 1)
    else:
        count = valid[:, None, :, None].to(q.dtype).cumsum(2).clamp(min=1.0)  # (b, 1, n, 1)
    vm = zero_padded(v, valid)  # padded values get no weight (zeroing v is the cheapest mask)
    outs = []
    # an empty sequence still gives one (empty) block, so outs is never empty
    for i, qs in enumerate((q * scale).split(block_size, dim=2)):  # qs: (b, h, L, d)
        s, e = i * block_size, i * block_size + qs.shape[2]
        # keys before the block: no mask needed; the block itself: causal mask
        diag = torch.relu(qs @ k[:, :, s:e].transpose(-1, -2)).square().tril()  # (b, h, L, L)
        o = diag @ vm[:, :, s:e]
        if s > 0:
            o = o + torch.relu(qs @ k[:, :, :s].transpose(-1, -2)).square() @ vm[:, :, :s]
        outs.append(o)
    return zero_padded(torch.cat(outs, dim=2) / count, valid), None
