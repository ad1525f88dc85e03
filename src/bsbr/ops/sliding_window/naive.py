"""Reference sliding-window causal attention: the plain masked quadratic form (float64-capable).

Token t attends to keys j with t - window_size < j <= t (itself and the window_size - 1 tokens
before it). The window counts positions: padding tokens inside the window are invisible but still
occupy their slot.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..checks import check_int, check_qkv, check_scale, check_valid, mask_padding, zero_padded


def naive_sliding_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, window_size: int,
                                   valid: Optional[torch.Tensor] = None, scale: Optional[float] = None):
    """Same signature and meaning as :func:`chunk_sliding_window_attention`; builds the n x n mask."""
    b, h, n, d, dv = check_qkv(q, k, v)
    check_int("window_size", window_size)
    valid = check_valid(valid, b, n)
    scale = check_scale(scale, d)
    t = torch.arange(n, device=q.device)
    rel = t[:, None] - t[None, :]  # (n, n): query position minus key position
    allowed = mask_padding(((rel >= 0) & (rel < window_size))[None], valid)  # (b or 1, n, n)
    s = (q @ k.transpose(-1, -2)) * scale  # (b, h, n, n)
    p = torch.softmax(s.masked_fill(~allowed[:, None], float("-inf")), dim=-1)
    return zero_padded(p @ v, valid), None
