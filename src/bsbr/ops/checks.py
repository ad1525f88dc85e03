"""Argument checks shared by every op and layer: a clear ValueError/TypeError naming the argument."""
from __future__ import annotations

from typing import Optional

import torch


def check_tensor(name: str, x, ndim: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating point tensor, got {x.dtype}")


def check_int(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


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
