"""Input checks shared by every attention layer: a clear error naming the argument."""
from __future__ import annotations

from typing import Optional

import torch


def check_hidden_states(hidden_states, hidden_dim: int) -> None:
    if not isinstance(hidden_states, torch.Tensor):
        raise TypeError(f"hidden_states must be a torch.Tensor, got {type(hidden_states).__name__}")
    if hidden_states.dim() != 3 or hidden_states.shape[-1] != hidden_dim:
        raise ValueError(
            f"hidden_states must have shape (batch, seq_len, {hidden_dim}), got {tuple(hidden_states.shape)}"
        )
    if not hidden_states.is_floating_point():
        raise TypeError(f"hidden_states must be floating point, got {hidden_states.dtype}")


def mask_to_valid(attention_mask, batch: int, seq_len: int) -> Optional[torch.Tensor]:
    """A (batch, seq_len) mask of 1 (real) / 0 (padding) as a bool tensor; None stays None."""
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a tensor of shape ({batch}, {seq_len}), got {type(attention_mask).__name__}")
    if tuple(attention_mask.shape) != (batch, seq_len):
        raise ValueError(f"attention_mask must have shape ({batch}, {seq_len}), got {tuple(attention_mask.shape)}")
    if attention_mask.dtype != torch.bool and not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
        raise ValueError("attention_mask must hold only 1 (real token) and 0 (padding)")
    return attention_mask.bool()
