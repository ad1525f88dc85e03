"""Feature maps phi for the chunk states, and the optional state compression.

The chunk-state term reads ``phi(q) . sum_j phi(k_j) v_j^T``. ``identity`` is the plain q/k (additive
variant); ``hedgehog`` is non-negative, as the normalized variant's shared denominator needs (``elu``,
elu + 1, is :class:`~bsbr.layers.LinearAttention`'s map, not taken by BSBR); ``hedgehog`` is trainable: phi(x) = [softmax(x W),
softmax(-x W)] per head with W initialised to the identity (Zhang et al., 2024).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.checks import check_int

FEATURE_MAPS = ("identity", "elu", "hedgehog")
BSBR_FEATURE_MAPS = ("identity", "hedgehog")  # elu + 1 measured worse for BSBR in both regimes; linear attention keeps it


def default_feature_map(retrieval: str) -> str:
    """BSBR's feature map when none is given: ``identity`` for the additive form, ``hedgehog`` for the
    normalized one (its shared denominator needs non-negative features). The layer, the config and
    ``bsbr convert`` apply it (``bsbr.convert.defaults`` holds a copy, torch-free; a test holds them equal)."""
    return "identity" if retrieval == "additive" else "hedgehog"


class HeadwiseLinear(nn.Module):
    """A separate (d_in x d_out) matrix per head, applied to (b, h, n, d_in); identity-initialised
    when square."""

    def __init__(self, heads: int, d_in: int, d_out: int):
        super().__init__()
        self.weight = nn.Parameter(self.initial_weight(heads, d_in, d_out))

    def extra_repr(self) -> str:
        heads, d_in, d_out = self.weight.shape
        return f"heads={heads}, in_features={d_in}, out_features={d_out}"

    @staticmethod
    def initial_weight(heads: int, d_in: int, d_out: int) -> torch.Tensor:
        return torch.eye(d_in, d_out).repeat(heads, 1, 1)

    def forward(self, x: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x (b, h, n, d_in) -> (b, h, n, d_out); with no x, the weight itself, as hooks on the call place it
        (accelerate's offloading)."""
        return self.weight if x is None else torch.einsum("bhnd,hde->bhne", x, self.weight)


class FeatureMap(nn.Module):
    def __init__(self, kind: str, heads: int, head_dim: int):
        super().__init__()
        if not isinstance(kind, str) or kind not in FEATURE_MAPS:
            raise ValueError(f"feature_map must be one of {FEATURE_MAPS}, got {kind!r}")
        self.kind = kind
        self.proj = HeadwiseLinear(heads, head_dim, head_dim) if kind == "hedgehog" else None
        self.out_dim = 2 * head_dim if kind == "hedgehog" else head_dim

    def extra_repr(self) -> str:
        return repr(self.kind)

    @property
    def nonnegative(self) -> bool:
        return self.kind != "identity"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "identity":
            return x
        if self.kind == "elu":
            return F.elu(x) + 1.0
        y = self.proj(x)
        return torch.cat([torch.softmax(y, dim=-1), torch.softmax(-y, dim=-1)], dim=-1)


class StateCompression(nn.Module):
    """Shrinks every chunk state from (df x dv) to (df/factor x dv) with one projection P of the
    feature dim, applied to both sides: F = (fk P)^T v and read-out (fq P) F.

    P starts as average pooling of ``factor`` consecutive features (non-negative, so positive
    features stay positive) and is trainable; with ``nonnegative=True`` it is clamped at zero in the
    forward pass so the normalized variant's denominator can never go negative.
    """

    def __init__(self, feature_dim: int, factor: int, nonnegative: bool = False):
        super().__init__()
        check_int("compression_factor", factor)
        if feature_dim % factor:
            raise ValueError(f"compression_factor ({factor}) must divide the state feature dim ({feature_dim})")
        self.factor = factor
        self.nonnegative = nonnegative
        self.proj = nn.Parameter(self.initial_weight(feature_dim, factor))

    @staticmethod
    def initial_weight(feature_dim: int, factor: int) -> torch.Tensor:  # feature i -> column i // factor
        return torch.eye(feature_dim // factor).repeat_interleave(factor, dim=0) * (1.0 / factor)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return f @ (self.proj.clamp(min=0.0) if self.nonnegative else self.proj)
