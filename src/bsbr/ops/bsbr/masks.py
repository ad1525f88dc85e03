"""Which keys a query reads exactly: the window (own chunk so far, the ``L - 1`` chunks before it)
and the sink tokens. Indices count a sequence's real tokens from 0; ``t`` (query) and ``j`` (key)
broadcast."""
from __future__ import annotations

import torch


def near(t: torch.Tensor, j: torch.Tensor, chunk_size: int, local_chunks: int) -> torch.Tensor:
    """Key j's chunk is one of t's ``local_chunks`` chunks (t's own or the ``local_chunks - 1`` before)."""
    return torch.div(j, chunk_size, rounding_mode="floor") > torch.div(t, chunk_size, rounding_mode="floor") - local_chunks


def exact_window(t: torch.Tensor, j: torch.Tensor, chunk_size: int, local_chunks: int, sink_tokens: int):
    """Keys j <= t in t's window chunks or among the sequence's first ``sink_tokens`` tokens."""
    return (j <= t) & (j >= 0) & (near(t, j, chunk_size, local_chunks) | (j < sink_tokens))


def sink_outside_window(t: torch.Tensor, j: torch.Tensor, chunk_size: int, local_chunks: int):
    """Sink j (the caller restricts j < sink_tokens) that query t reads through the sink slot: j <= t
    and outside t's window chunks (inside them the window holds it, and a key never counts twice).
    Keys read here use the far-key positions (``qr``/``kr``), as retrieved blocks do."""
    return (j <= t) & ~near(t, j, chunk_size, local_chunks)
