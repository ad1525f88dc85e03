"""Reference delta rule (DeltaNet; Schlag et al., 2021, Yang et al., 2024): the explicit recurrence,
float64-capable. This *is* the recurrent form; the chunked form is tested against it.

    S_t = S_{t-1} + beta_t k_t (v_t - S_{t-1}^T k_t)^T      state (d x dv): write v_t at key k_t,
                                                            replacing what k_t retrieved before
    o_t = S_t^T (scale * q_t)
"""
from __future__ import annotations

from typing import Optional

import torch

from ..checks import check_qkv, check_scale, check_state_matrix, check_tensor


def check_delta_inputs(q, k, v, beta, scale, initial_state):
    """q, k: (b, h, n, d); v: (b, h, n, dv); beta: (b, h, n) write strengths; initial_state (b, h, d, dv)
    or None (zeros). Returns the sizes (b, h, n, d, dv), the scale and the state to start from."""
    b, h, n, d, dv = check_qkv(q, k, v)
    check_tensor("beta", beta, 3)
    if tuple(beta.shape) != (b, h, n):
        raise ValueError(f"beta must have shape {(b, h, n)}, got {tuple(beta.shape)}")
    if beta.dtype != q.dtype:
        raise TypeError(f"beta must have the dtype of q ({q.dtype}), got {beta.dtype}")
    scale = check_scale(scale, d)
    if initial_state is None:
        return (b, h, n, d, dv), scale, q.new_zeros(b, h, d, dv)
    if not isinstance(initial_state, torch.Tensor):
        raise TypeError("initial_state must be None or the state tensor (b, h, d, dv) returned with "
                        f"output_final_state=True, got {type(initial_state).__name__}")
    check_state_matrix("initial_state", initial_state, b, h, d, dv)
    S = initial_state.to(q.dtype)  # (a copy of a state made under inference_mode can be continued under autograd)
    return (b, h, n, d, dv), scale, S.clone() if S.is_inference() and not torch.is_inference_mode_enabled() else S


def naive_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, *,
                     scale: Optional[float] = None, initial_state: Optional[torch.Tensor] = None,
                     output_final_state: bool = False):
    """Same meaning as :func:`chunk_delta_rule`, one token at a time. Returns ``(o, state)``."""
    (b, h, n, d, dv), scale, S = check_delta_inputs(q, k, v, beta, scale, initial_state)
    outs = []
    for t in range(n):
        kt, vt, bt = k[:, :, t], v[:, :, t], beta[:, :, t, None]  # (b, h, d), (b, h, dv), (b, h, 1)
        retrieved = (kt.unsqueeze(-2) @ S).squeeze(-2)  # (b, h, dv): S^T k_t
        S = S + kt.unsqueeze(-1) * (bt * (vt - retrieved)).unsqueeze(-2)
        outs.append(((q[:, :, t] * scale).unsqueeze(-2) @ S).squeeze(-2))
    o = torch.stack(outs, dim=2) if outs else q.new_zeros(b, h, 0, dv)
    return o, (S if output_final_state else None)
