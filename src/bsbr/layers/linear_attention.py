"""LinearAttention: causal linear attention (Katharopoulos et al., 2020), phi(q) . sum phi(k) v^T
normalised by phi(q) . sum phi(k), with phi = elu + 1 by default. Constant state per head (d x d):
O(n d^2) time, O(d^2) per decoded token.

Positions: rotary embeddings are *not* applied. Rotating q and k before a positive feature map does not
give relative positions (phi breaks the rotation's dot-product identity), and the causal recurrence
already knows the order; ``position_embeddings`` is accepted so that layers swap freely.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..ops.linear_attn import chunk_linear_attention, recurrent_linear_attention
from .multihead import MultiHeadBase
from ..ops.checks import check_flag, check_int, zero_padded
from .feature_maps import FeatureMap


class LinearAttention(MultiHeadBase):
    """Args:
        hidden_dim, num_heads, dropout, head_dim, bias, out_bias: as in SlidingWindowAttention.
        feature_map: ``"elu"`` (elu + 1, default) or ``"hedgehog"`` (trainable); ``"identity"`` only
            with ``normalize=False`` (a signed normalizer can be zero).
        normalize: divide by the feature-space attention mass (the usual definition).
        chunk_size: tokens per chunk of the chunked form (speed knob; results do not depend on it).
    """

    rotary_dim = 0  # no rotary positions (AttentionLM builds none for it)

    def __init__(self, hidden_dim: int, num_heads: int, dropout: float = 0.0, *, head_dim: Optional[int] = None,
                 bias: bool = True, out_bias: Optional[bool] = None, feature_map: str = "elu",
                 normalize: bool = True, chunk_size: int = 64):
        super().__init__(hidden_dim, num_heads, dropout, head_dim, bias, out_bias)
        check_flag("normalize", normalize)
        if normalize and feature_map == "identity":
            raise ValueError("normalize=True needs a non-negative feature_map ('elu' or 'hedgehog')")
        check_int("chunk_size", chunk_size)
        self.normalize, self.chunk_size = normalize, chunk_size
        self.feature_q = FeatureMap(feature_map, num_heads, self.head_dim)
        self.feature_k = FeatureMap(feature_map, num_heads, self.head_dim)

    def _features(self, hidden_states, attention_mask):
        q, k, v, valid = self.project(hidden_states, attention_mask)
        # padded tokens get zero features: a zero feature adds nothing to the state and reads out 0 (eps > 0)
        return zero_padded(self.feature_q(q), valid), zero_padded(self.feature_k(k), valid), v

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                position_embeddings: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        fq, fk, v = self._features(hidden_states, attention_mask)
        o, _ = chunk_linear_attention(fq, fk, v, chunk_size=self.chunk_size, normalize=self.normalize)
        return self.output(o)

    def step(self, hidden_states: torch.Tensor, state=None, attention_mask: Optional[torch.Tensor] = None,
             position_embeddings=None):
        """Decode: continue from ``state`` ((S, z) or None) token by token. Returns (output, state)."""
        fq, fk, v = self._features(hidden_states, attention_mask)
        o, state = recurrent_linear_attention(fq, fk, v, normalize=self.normalize, initial_state=state,
                                              output_final_state=True)
        return self.output(o), state
