"""Argument checks shared by the baseline ops (sliding window, linear attention, DeltaNet, Hopfield,
GAU). They all take per-head tensors laid out (batch, heads, seq_len, dim)."""
from __future__ import annotations

from typing import Tuple

import torch

from ..checks import check_int, check_tensor, check_valid, mask_padding, zero_padded  # noqa: F401  (re-exported for the baseline ops)


def check_qkv(q, k, v) -> Tuple[int, int, int, int, int]:
    """q, k: (b, h, n, d); v: (b, h, n, dv), one dtype. Returns (b, h, n, d, dv)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, x, 4)
    if k.shape != q.shape:
        raise ValueError(f"k must have the shape of q {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must have leading shape {tuple(q.shape[:3])}, got {tuple(v.shape)}")
    if len({q.dtype, k.dtype, v.dtype}) != 1:
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    b, h, n, d = q.shape
    return b, h, n, d, v.shape[-1]


def check_scale(scale, d: int) -> float:
    if scale is None:
        return d ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be None or a float, got {type(scale).__name__}")
    return float(scale)


def check_eps(eps) -> None:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or eps < 0:
        raise ValueError(f"eps must be a float >= 0, got {eps!r}")


def check_state(state, b: int, h: int, d: int, dv: int, like: torch.Tensor, with_norm: bool):
    """An initial state (S, z): S (b, h, d, dv), z (b, h, d) (z only for normalized linear attention).
    None becomes zeros."""
    if state is None:
        S = like.new_zeros(b, h, d, dv)
        return S, (like.new_zeros(b, h, d) if with_norm else None)
    if not isinstance(state, (tuple, list)) or len(state) != 2:
        raise TypeError("initial_state must be None or a tuple (S, z) as returned with output_final_state=True")
    S, z = state
    check_tensor("initial_state[0]", S, 4)
    if tuple(S.shape) != (b, h, d, dv):
        raise ValueError(f"initial_state[0] must have shape {(b, h, d, dv)}, got {tuple(S.shape)}")
    if with_norm:
        if z is None:
            raise ValueError("initial_state[1] (the key sum z) is needed when normalize=True")
        check_tensor("initial_state[1]", z, 3)
        if tuple(z.shape) != (b, h, d):
            raise ValueError(f"initial_state[1] must have shape {(b, h, d)}, got {tuple(z.shape)}")
    return S.to(like.dtype), (None if not with_norm else z.to(like.dtype))
