"""Argument checks shared by every op and layer: a clear ValueError/TypeError naming the argument. The
baseline ops (sliding window, linear attention, DeltaNet, Hopfield, GAU) all take per-head tensors laid
out (batch, heads, seq_len, dim)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch


def check_tensor(name: str, x, ndim: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating point tensor, got {x.dtype}")


def check_int(name: str, value, minimum: int = 1, maximum: Optional[int] = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be at most {maximum:,}, got {value:,}")


def check_valid(valid, b: int, n: int, name: str = "valid (the padding mask)") -> Optional[torch.Tensor]:
    """A (b, n) padding mask (1/True = real token) as bool; None stays None. ``name``: the argument's
    name in the error messages."""
    if valid is None:
        return None
    if not isinstance(valid, torch.Tensor):
        raise TypeError(f"{name} must be None or a tensor of shape ({b}, {n}), got {type(valid).__name__}")
    if tuple(valid.shape) != (b, n):
        raise ValueError(f"{name} must have shape ({b}, {n}), got {tuple(valid.shape)}")
    return valid.bool()


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


def mask_padding(allowed: torch.Tensor, valid: Optional[torch.Tensor]) -> torch.Tensor:
    """An (1, n, n) attention mask restricted to real keys (``valid`` (b, n); None: unchanged), every
    query still seeing itself so that no row is empty (outputs at padded positions are zeroed)."""
    if valid is None:
        return allowed
    eye = torch.eye(allowed.shape[-1], dtype=torch.bool, device=allowed.device)
    return (allowed & valid[:, None, :]) | eye[None]


def zero_padded(o: torch.Tensor, valid: Optional[torch.Tensor]) -> torch.Tensor:
    """``o`` (b, h, n, dv) with the outputs at padded positions (``valid`` (b, n) False) set to 0."""
    return o if valid is None else o * valid[:, None, :, None].to(o.dtype)
