"""Rotary position embeddings (the Llama-family convention: rotate the two halves of each head)."""
from __future__ import annotations

import torch
from torch import nn


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (b, h, n, d); cos/sin: (b, n, d) or (n, d)."""
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


class RotaryEmbedding(nn.Module):
    """cos/sin tables computed on the fly for any position: no table caps the length.

    ``inv_freq`` may be given (e.g. from a source model's rope scaling); otherwise the default
    ``theta ** (-2i/d)``. ``attention_scaling`` multiplies cos/sin (used by some rope types).
    """

    def __init__(self, dim: int, theta: float = 10000.0, inv_freq: torch.Tensor | None = None,
                 attention_scaling: float = 1.0):
        super().__init__()
        if dim % 2:
            raise ValueError(f"rotary dim must be even, got {dim}")
        if inv_freq is None:
            inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)
        self.attention_scaling = attention_scaling

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype = torch.float32):
        """position_ids: (b, n) or (n,) -> cos, sin of shape (b, n, dim) / (n, dim)."""
        # float32 like the HuggingFace Llama-family rotary, so converted models reproduce it exactly
        freqs = position_ids.float()[..., None] * self.inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.attention_scaling).to(dtype), (emb.sin() * self.attention_scaling).to(dtype)
