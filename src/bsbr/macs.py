"""Multiply-adds of a decoder's forward pass, counted from its weights and config: bench and distill time one
short run and scale it to a long one by this count."""
from __future__ import annotations

from typing import Optional


def forward_macs(model, n: int, keys: Optional[int] = None, logits: bool = True) -> int:
    """Multiply-adds of a forward over ``n`` tokens: each weight outside the embeddings once per token, the LM
    head's at every position with ``logits`` (without: none, as a forward keeping the last position's logits
    only), and in every layer, for each key a token reads, a product with the key and one with its value across
    the hidden size: ``keys`` per token (None: causal attention, n/2 on average)."""
    cfg = model.config
    head = model.get_output_embeddings()
    untied = head is not None and head.weight is not model.get_input_embeddings().weight
    head_weights = cfg.vocab_size * cfg.hidden_size
    # (num_parameters counts an untied head among the weights outside the embeddings, and a tied one not)
    per_token = model.num_parameters(exclude_embeddings=True) - untied * head_weights + logits * head_weights
    products = n * n if keys is None else 2 * n * keys
    return n * per_token + products * cfg.num_hidden_layers * cfg.hidden_size
