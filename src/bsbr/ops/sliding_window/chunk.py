"""Blocked sliding-window causal attention: the default forward. No n x n tensor exists.

The sequence is cut into blocks of ``window_size`` queries. Every key a query of block c may see
lies in block c or block c - 1, so one batched SDPA call over (block, 2 * window_size keys) pairs
with a fixed (w, 2w) band mask computes the whole layer: O(n w d) time, O(n w) memory.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..checks import check_int, check_qkv, check_scale, check_valid, zero_padded


def chunk_sliding_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, window_size: int,
                                   valid: Optional[torch.Tensor] = None, scale: Optional[float] = None):
    """Causal attention of each token over itself and the ``window_size - 1`` tokens before it.

    Args:
        q, k: (b, h, n, d); v: (b, h, n, dv).
        window_size: keys visible to each query, itself included (``w``).
        valid: (b, n) padding mask, 1/True for real tokens; padded keys are never attended and padded
            positions output 0. The window counts positions, padded ones included.
        scale: softmax scale, default ``1/sqrt(d)``.

    Returns:
        ``(o, None)`` with o (b, h, n, dv); the second item keeps the ops' common signature.
    """
    b, h, n, d, dv = check_qkv(q, k, v)
    check_int("window_size", window_size)
    valid = check_valid(valid, b, n)
    scale = check_scale(scale, d)
    if n == 0:
        return q.new_zeros(b, h, 0, dv), None
    w = min(window_size, n)  # (a window of n reaches every earlier position already: blocks of n, not of window_size)
    C = -(-n // w)
    tail = C * w - n

    # 1. queries in blocks; keys/values with one block of zeros in front (the "block -1" of block 0)
    qb = F.pad(q, (0, 0, 0, tail)).view(b, h, C, w, d)
    kp = F.pad(k, (0, 0, w, tail)).view(b, h, C + 1, w, d)
    vp = F.pad(v, (0, 0, w, tail)).view(b, h, C + 1, w, dv)
    kk = torch.cat([kp[:, :, :-1], kp[:, :, 1:]], dim=3)  # (b, h, C, 2w, d): previous + own block
    vv = torch.cat([vp[:, :, :-1], vp[:, :, 1:]], dim=3)  # (b, h, C, 2w, dv)

    # 2. the band mask: query r of a block sits at slot w + r of its key pair; it sees slots
    #    (r, w + r], and only keys at real positions 0 <= pos < n
    r = torch.arange(w, device=q.device)
    j = torch.arange(2 * w, device=q.device)
    rel = (w + r)[:, None] - j[None, :]  # (w, 2w)
    band = (rel >= 0) & (rel < w)
    key_pos = (torch.arange(C, device=q.device)[:, None] - 1) * w + j[None, :]  # (C, 2w)
    key_ok = ((key_pos >= 0) & (key_pos < n))[None]
    if valid is not None:
        vpad = F.pad(valid, (w, tail)).view(b, C + 1, w)
        key_ok = key_ok & torch.cat([vpad[:, :-1], vpad[:, 1:]], dim=2)  # (b, C, 2w)
    allowed = band[None, None] & key_ok[:, :, None, :]  # (b or 1, C, w, 2w)
    # a padded query may have no visible key: let it see itself (its output is zeroed below)
    allowed = allowed | (rel == 0)[None, None]

    # 3. one SDPA call over all (batch, head, block) triples
    o = F.scaled_dot_product_attention(qb, kk, vv, attn_mask=allowed[:, None], scale=scale)  # (b, h, C, w, dv)
    return zero_padded(o.reshape(b, h, C * w, dv)[:, :, :n], valid), None
