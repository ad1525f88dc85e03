"""Argument checks of the Hopfield ops."""
from __future__ import annotations

import torch


def beta_per_head(beta, h: int, d: int, like: torch.Tensor) -> torch.Tensor:
    """The inverse temperature as a (1, h, 1, 1) tensor: None means 1/sqrt(d) (standard attention)."""
    beta = d ** -0.5 if beta is None else beta
    if isinstance(beta, bool) or not isinstance(beta, (int, float, torch.Tensor)):
        raise TypeError(f"beta must be None, a float or a ({h},) tensor, got {type(beta).__name__}")
    if isinstance(beta, torch.Tensor):
        if beta.dim() > 1 or beta.numel() not in (1, h):
            raise ValueError(f"beta must be a scalar or have shape ({h},), got {tuple(beta.shape)}")
        return beta.to(like.dtype).reshape(-1).expand(h).view(1, h, 1, 1)
    return torch.full((1, h, 1, 1), float(beta), dtype=like.dtype, device=like.device)
