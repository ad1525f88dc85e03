"""The native BSBR stack (the earlier library's BSBRLayer / BSBRModel API), with rotary positions
computed on the fly so that no position table caps the sequence length."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..layers.bsbr_attention import BSBRAttention, refuse_own_position_chunks
from ..ops.checks import check_int
from ..layers.inputs import check_input_ids, token_positions
from ..ops.checks import check_number
from ..layers.rotary import RotaryEmbedding


class BSBRLayer(nn.Module):
    """Pre-LayerNorm block: x + attn(ln(x)), then x + ff(ln(x)). Extra keyword arguments go to
    :class:`BSBRAttention`."""

    def __init__(self, hidden_dim: int, num_heads: int, chunk_size: int, ff_dim: int, dropout: float = 0.1,
                 compression_factor: Optional[int] = None, **attention_kwargs):
        super().__init__()
        check_int("ff_dim", ff_dim)
        refuse_own_position_chunks("a BSBRLayer", attention_kwargs)
        self.attention = BSBRAttention(hidden_dim, num_heads, chunk_size, dropout, compression_factor,
                                       **attention_kwargs)
        self.layer_norm1 = nn.LayerNorm(hidden_dim)
        self.layer_norm2 = nn.LayerNorm(hidden_dim)
        dropout = self.attention.dropout  # (checked there, as a float)
        self.ff = nn.Sequential(nn.Linear(hidden_dim, ff_dim), nn.GELU(), nn.Dropout(dropout),
                                nn.Linear(ff_dim, hidden_dim), nn.Dropout(dropout))

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                position_embeddings=None) -> torch.Tensor:
        """hidden_states (batch, seq_len, hidden_dim); attention_mask (batch, seq_len) of 1/0 or None;
        position_embeddings the rotary (cos, sin) or None. Returns (batch, seq_len, hidden_dim)."""
        x = hidden_states
        x = x + self.attention(self.layer_norm1(x), attention_mask, position_embeddings)
        return x + self.ff(self.layer_norm2(x))


class BSBRModel(nn.Module):
    """Token embedding, ``num_layers`` BSBR layers and a final LayerNorm; returns hidden states
    (batch, seq_len, hidden_dim) for any sequence length. bsbr 0.1.1's arguments, with rotary positions
    and causal layers (README, "Coming from bsbr 0.1.1")."""

    def __init__(self, vocab_size: int, hidden_dim: int, num_layers: int, num_heads: int, chunk_size: int,
                 ff_dim: int, dropout: float = 0.1, compression_factor: Optional[int] = None,
                 rope_theta: float = 10000.0, **attention_kwargs):
        super().__init__()
        check_int("vocab_size", vocab_size)
        check_int("hidden_dim", hidden_dim)  # (before the embedding is built with it)
        check_int("num_layers", num_layers)
        check_number("rope_theta", rope_theta, 0, above=True)  # before any layer is built
        self.embedding = nn.Embedding(vocab_size, hidden_dim)
        self.layers = nn.ModuleList(
            BSBRLayer(hidden_dim, num_heads, chunk_size, ff_dim, dropout, compression_factor, **attention_kwargs)
            for _ in range(num_layers)
        )
        head_dim = self.layers[0].attention.head_dim
        if head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary positions, got {head_dim} (hidden_dim // num_heads "
                             "unless head_dim is given)")
        self.rotary = RotaryEmbedding(head_dim, theta=rope_theta)
        self.layer_norm = nn.LayerNorm(hidden_dim)
        self.dropout = nn.Dropout(self.layers[0].attention.dropout)  # (checked there, as a float)

    def load_state_dict(self, state_dict, *args, **kwargs):
        """As :meth:`torch.nn.Module.load_state_dict`; a checkpoint of the earlier library's ``BSBRModel``
        (bsbr 0.1.1: sinusoidal ``pos_encoding``, whole-width meta maps) is refused by name: its layers
        compute something else (see README, "Coming from bsbr 0.1.1")."""
        if any(str(k).startswith("pos_encoding.") for k in state_dict):
            raise ValueError("this is a checkpoint of the earlier library's BSBRModel (bsbr 0.1.1: sinusoidal "
                             "positions, whole-width meta maps, a non-causal chunk mask): its weights do not fit "
                             "this BSBRModel (causal, rotary positions, per-head maps); train the model anew")
        return super().load_state_dict(state_dict, *args, **kwargs)

    def forward(self, input_ids: torch.LongTensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """input_ids (batch, seq_len); attention_mask (batch, seq_len) of 1/0 or None (padding: each
        sequence is read on its own real tokens). Returns hidden states (batch, seq_len, hidden_dim)."""
        check_input_ids(input_ids, self.embedding.num_embeddings)
        cos_sin = self.rotary(token_positions(input_ids, attention_mask), self.embedding.weight.dtype)
        x = self.dropout(self.embedding(input_ids))
        for layer in self.layers:
            x = layer(x, attention_mask, cos_sin)
        return self.layer_norm(x)
