"""Reference delta rule (DeltaNet; Schlag et al., 2021, Yang et al., 2024): the explicit recurrence,
float64-capable. This *is* the recurrent form; the chunked form is tested against it.

    S_t = S_{t-1} + beta_t k_t (v_t - S_{t-1}^T k_t)^T      state (d x dv): write v_t at key k_t,
                                                            replacing what k_t retrieved before
    o_t = S_t^T (scale * q_t)
"""
from __future__ import annotations

from typing import Optional

import torch

from ..linear_attn.utils import check_scale
from .utils import check_delta_inputs, initial_delta_state


def naive_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, *,
                     scale: Optional[float] = None, initial_state: Optional[torch.Tensor] = None,
                     output_final_state: bool = False):
    """Same meaning as :func:`chunk_delta_rule`, one token at a time. Returns ``(o, state)``."""
    b, h, n, d, dv = check_delta_inputs(q, k, v, beta)
    scale = check_scale(scale, d)
    S = initial_delta_state(initial_state, b, h, d, dv, q)
    outs = []
    for t in range(n):
        kt, vt, bt = k[:, :, t], v[:, :, t], beta[:, :, t, None]  # (b, h, d), (b, h, dv), (b, h, 1)
        retrieved = (kt.unsqueeze(-2) @ S).squeeze(-2)  # (b, h, dv): S^T k_t
        S = S + kt.unsqueeze(-1) * (bt * (vt - retrieved)).unsqueeze(-2)
        outs.append(((q[:, :, t] * scale).unsqueeze(-2) @ S).squeeze(-2))
    o = torch.stack(outs, dim=2) if outs else q.new_zeros(b, h, 0, dv)
    return o, (S if output_final_state else None)
