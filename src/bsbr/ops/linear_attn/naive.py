"""Reference causal linear attention: the quadratic masked form (float64-capable).

With feature-mapped queries/keys (the layer applies phi, e.g. elu + 1):
    o_t = sum_{j<=t} (q_t . k_j) v_j / (sum_{j<=t} q_t . k_j + eps)     (normalize=True)
    o_t = sum_{j<=t} (q_t . k_j) v_j                                     (normalize=False)
"""
from __future__ import annotations

import torch

from ..checks import check_eps, check_flag, check_qkv, in_float32


@in_float32
def naive_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, normalize: bool = True,
                           eps: float = 1e-6):
    """Same meaning as :func:`chunk_linear_attention` (no state in or out); returns ``(o, None)``."""
    b, h, n, d, dv = check_qkv(q, k, v)
    check_flag("normalize", normalize)
    check_eps(eps)
    causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    a = (q @ k.transpose(-1, -2)).masked_fill(~causal, 0.0)  # (b, h, n, n)
    o = a @ v
    if normalize:
        o = o / (a.sum(-1, keepdim=True) + eps)
    return o, None
