"""Chunked causal linear attention: the default forward. O(n B d + n d^2), no n x n tensor.

Within a chunk of B tokens the masked quadratic form; across chunks the running state
S = sum_j k_j v_j^T (and the key sum z for the normalizer), one state per chunk from a cumulative sum.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ..checks import check_eps, check_flag, check_int, check_qkv, check_state, in_float32


@in_float32
def chunk_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, chunk_size: int = 64,
                           normalize: bool = True, eps: float = 1e-6,
                           initial_state: Optional[Tuple[torch.Tensor, Optional[torch.Tensor]]] = None,
                           output_final_state: bool = False):
    """Causal linear attention over feature-mapped queries and keys.

    Args:
        q, k: (b, h, n, d) queries/keys *after* the feature map (non-negative for ``normalize``);
            v: (b, h, n, dv).
        chunk_size: tokens per chunk (a speed/memory knob only: the result does not depend on it).
        normalize: divide by ``q_t . sum_{j<=t} k_j + eps`` (Katharopoulos et al., 2020).
        eps: added to the normalizer, so that an all-zero (padded) query outputs 0, not NaN.
        initial_state: ``(S, z)`` from an earlier call, S (b, h, d, dv), z (b, h, d) or None.
        output_final_state: also return ``(S, z)`` after the last token.

    Returns:
        ``(o, state)``: o (b, h, n, dv) in the inputs' dtype; state None unless ``output_final_state``, else in
        float32 at least (half-precision inputs are summed in float32: the key sum passed float16's range within
        a thousand tokens, and bfloat16 rounded single tokens away).
    """
    b, h, n, d, dv = check_qkv(q, k, v)
    check_flag("normalize", normalize)
    check_int("chunk_size", chunk_size)
    check_eps(eps)
    S0, z0 = check_state(initial_state, b, h, d, dv, q, normalize)
    B = max(1, min(chunk_size, n))  # (a chunk longer than the sequence: padding only)
    C = max(1, -(-n // B))
    tail = C * B - n
    # zero padding: a zero key adds nothing to any state, a zero query's row is cut off below
    qb, kb = (F.pad(x, (0, 0, 0, tail)).view(b, h, C, B, d) for x in (q, k))
    vb = F.pad(v, (0, 0, 0, tail)).view(b, h, C, B, dv)

    # 1. per-chunk states and the state each chunk starts from (exclusive prefix sum + initial)
    kv = kb.transpose(-1, -2) @ vb  # (b, h, C, d, dv)
    kv_cum = kv.cumsum(2)
    S_start = S0[:, :, None] + F.pad(kv_cum[:, :, :-1], (0, 0, 0, 0, 1, 0))  # (b, h, C, d, dv)

    # 2. within-chunk masked quadratic part plus the read-out of the start state
    causal = torch.ones(B, B, dtype=torch.bool, device=q.device).tril()
    a = (qb @ kb.transpose(-1, -2)).masked_fill(~causal, 0.0)  # (b, h, C, B, B)
    o = a @ vb + qb @ S_start  # (b, h, C, B, dv)
    z_final = None
    if normalize:
        ks_cum = kb.sum(-2).cumsum(2)  # (b, h, C, d)
        z_start = z0[:, :, None] + F.pad(ks_cum[:, :, :-1], (0, 0, 1, 0))
        den = a.sum(-1) + (qb @ z_start.unsqueeze(-1)).squeeze(-1)  # (b, h, C, B)
        o = o / (den.unsqueeze(-1) + eps)
        z_final = z0 + ks_cum[:, :, -1]
    o = o.reshape(b, h, C * B, dv)[:, :, :n]
    state = (S0 + kv_cum[:, :, -1], z_final) if output_final_state else None
    return o, state
