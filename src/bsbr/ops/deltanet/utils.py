"""Argument checks of the delta-rule ops."""
from __future__ import annotations

import torch

from ..linear_attn.utils import check_qkv, check_state, check_tensor


def check_delta_inputs(q, k, v, beta):
    """q, k: (b, h, n, d); v: (b, h, n, dv); beta: (b, h, n) write strengths. Returns (b, h, n, d, dv)."""
    b, h, n, d, dv = check_qkv(q, k, v)
    check_tensor("beta", beta, 3)
    if tuple(beta.shape) != (b, h, n):
        raise ValueError(f"beta must have shape {(b, h, n)}, got {tuple(beta.shape)}")
    if beta.dtype != q.dtype:
        raise TypeError(f"beta must have the dtype of q ({q.dtype}), got {beta.dtype}")
    return b, h, n, d, dv


def initial_delta_state(initial_state, b, h, d, dv, like: torch.Tensor) -> torch.Tensor:
    """The (b, h, d, dv) state to start from; None means zeros."""
    state = (initial_state, None) if isinstance(initial_state, torch.Tensor) else initial_state
    return check_state(state, b, h, d, dv, like, with_norm=False)[0]
