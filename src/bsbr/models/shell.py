"""AttentionLM: one decoder-only language model shell in which only the attention layer differs.

Token embedding -> ``num_layers`` pre-norm blocks (x + attn(ln(x)), then x + mlp(ln(x))) -> final
LayerNorm -> LM head (tied to the embedding). Rotary positions are computed on the fly for any length
(not for layers that use none: linear attention, DeltaNet). This is the shell of ``bsbr bench models`` and
``bsbr bench quality``: same width, depth, MLP and head for every attention, so differences in speed
and loss are the attention's.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..layers.bsbr_attention import BSBRAttention, refuse_own_position_chunks
from ..ops.checks import check_int
from ..layers.deltanet import DeltaNet
from ..layers.gau import GatedAttentionUnit
from ..layers.hopfield_attention import HopfieldAttention
from ..layers.linear_attention import LinearAttention
from ..layers.inputs import check_dropout, check_input_ids, token_positions
from ..layers.rotary import RotaryEmbedding
from ..layers.sliding_window_attention import SlidingWindowAttention
from ..layers.standard_attention import StandardAttention

LAYERS = {"standard": StandardAttention, "bsbr": BSBRAttention, "sliding_window": SlidingWindowAttention,
          "linear": LinearAttention, "deltanet": DeltaNet, "hopfield": HopfieldAttention, "gau": GatedAttentionUnit}
ATTENTIONS = tuple(LAYERS)
REQUIRED = {"bsbr": ("chunk_size", "tokens per chunk"), "sliding_window": ("window_size", "keys each token sees")}


def build_attention(attention: str, hidden_dim: int, num_heads: int, dropout: float, **kwargs) -> nn.Module:
    """One attention layer by name; ``kwargs`` go to its constructor (those in :data:`REQUIRED` must be given)."""
    if attention not in ATTENTIONS:
        raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
    if attention in REQUIRED and REQUIRED[attention][0] not in kwargs:
        name, meaning = REQUIRED[attention]
        raise ValueError(f"attention={attention!r} needs {name}=... ({meaning})")
    if attention == "bsbr":
        refuse_own_position_chunks("AttentionLM", kwargs)
    if attention == "gau":
        return GatedAttentionUnit(hidden_dim, dropout=dropout, **kwargs)  # one head by definition
    return LAYERS[attention](hidden_dim, num_heads, dropout=dropout, **kwargs)


class Block(nn.Module):
    """Pre-LayerNorm decoder block with a GELU MLP."""

    def __init__(self, attention: nn.Module, hidden_dim: int, ff_dim: int, dropout: float):
        super().__init__()
        self.attention = attention
        self.norm1 = nn.LayerNorm(hidden_dim)
        self.norm2 = nn.LayerNorm(hidden_dim)
        self.mlp = nn.Sequential(nn.Linear(hidden_dim, ff_dim), nn.GELU(), nn.Linear(ff_dim, hidden_dim),
                                 nn.Dropout(dropout))

    def forward(self, x, attention_mask=None, position_embeddings=None):
        x = x + self.attention(self.norm1(x), attention_mask, position_embeddings)
        return x + self.mlp(self.norm2(x))


class AttentionLM(nn.Module):
    """Args:
        vocab_size, hidden_dim, num_layers, num_heads, ff_dim: the shell's sizes.
        attention: one of :data:`ATTENTIONS`.
        dropout: in the attention output and the MLP (default 0).
        rope_theta: rotary base.
        **attention_kwargs: passed to the attention layer (e.g. ``chunk_size=128`` for BSBR,
            ``window_size=128`` for sliding window, ``retrieval="normalized"``, ``retrieval_blocks=4``).
    """

    def __init__(self, vocab_size: int, hidden_dim: int, num_layers: int, num_heads: int,
                 attention: str = "standard", ff_dim: Optional[int] = None, dropout: float = 0.0,
                 rope_theta: float = 10000.0, **attention_kwargs):
        super().__init__()
        check_int("vocab_size", vocab_size)
        check_int("hidden_dim", hidden_dim)
        check_int("num_layers", num_layers)
        check_int("num_heads", num_heads)
        ff_dim = 4 * hidden_dim if ff_dim is None else ff_dim
        check_int("ff_dim", ff_dim)
        self.embedding = nn.Embedding(vocab_size, hidden_dim)
        self.layers = nn.ModuleList(
            Block(build_attention(attention, hidden_dim, num_heads, dropout, **attention_kwargs),
                  hidden_dim, ff_dim, check_dropout(dropout))
            for _ in range(num_layers)
        )
        att = self.layers[0].attention
        rotary_dim = att.rotary_dim if hasattr(att, "rotary_dim") else att.head_dim  # 0: the layer uses no positions
        self.rotary = RotaryEmbedding(rotary_dim, theta=rope_theta) if rotary_dim else None
        self.norm = nn.LayerNorm(hidden_dim)
        self.lm_head = nn.Linear(hidden_dim, vocab_size, bias=False)
        self.lm_head.weight = self.embedding.weight  # tied: the head adds no parameters
        nn.init.normal_(self.embedding.weight, std=0.02)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """input_ids (b, n) integers in [0, vocab_size); attention_mask (b, n) of 1/0 or None.
        Returns logits (b, n, vocab_size)."""
        check_input_ids(input_ids, self.embedding.num_embeddings)
        cos_sin = None if self.rotary is None else self.rotary(token_positions(input_ids, attention_mask),
                                                               self.embedding.weight.dtype)
        x = self.embedding(input_ids)
        for layer in self.layers:
            x = layer(x, attention_mask, cos_sin)
        return self.lm_head(self.norm(x))
