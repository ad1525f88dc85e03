"""Recurrent causal linear attention: token by token from the state (S, z). O(d^2) per token:
the decoding form, and a second check of the chunked one."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..checks import check_eps, check_flag, check_qkv, check_state, in_float32


@in_float32
def recurrent_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, normalize: bool = True,
                               eps: float = 1e-6,
                               initial_state: Optional[Tuple[torch.Tensor, Optional[torch.Tensor]]] = None,
                               output_final_state: bool = False):
    """Same meaning as :func:`chunk_linear_attention`, computed one token at a time."""
    b, h, n, d, dv = check_qkv(q, k, v)
    check_flag("normalize", normalize)
    check_eps(eps)
    S, z = check_state(initial_state, b, h, d, dv, q, normalize)
    outs = []
    for t in range(n):
        qt, kt, vt = q[:, :, t], k[:, :, t], v[:, :, t]  # (b, h, d), (b, h, d), (b, h, dv)
        S = S + kt.unsqueeze(-1) * vt.unsqueeze(-2)  # (b, h, d, dv)
        o = (qt.unsqueeze(-2) @ S).squeeze(-2)  # (b, h, dv)
        if normalize:
            z = z + kt
            o = o / ((qt * z).sum(-1, keepdim=True) + eps)
        outs.append(o)
    o = torch.stack(outs, dim=2) if outs else q.new_zeros(b, h, 0, dv)
    return o, ((S, z) if output_final_state else None)
