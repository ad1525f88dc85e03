"""The options of one BSBR attention: defined and validated once, passed unchanged from the model's
config through the layer to the op's three forms."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ...numbers import MAX_RECALL_TOKENS, MAX_TOKENS
from ..checks import check_int, check_number

VARIANTS = ("additive", "normalized")


@dataclass(frozen=True)
class BSBROptions:
    """Which keys a query token reads, and how.

    * ``chunk_size`` ``B``: tokens per chunk; chunk ``c(t) = t // B`` counts the sequence's real tokens.
    * ``local_chunks`` ``L`` and ``sink_tokens`` ``S``: the exact window. Token ``t`` attends by
      softmax to the keys ``j <= t`` of chunks ``c(t) - L + 1 .. c(t)`` and to the sequence's first
      ``S`` tokens. ``L = 1, S = 0`` is plain BSBR (own chunk only).
    * ``retrieval_blocks`` ``K``: each token also attends exactly, in the same softmax, to the tokens
      of the ``K`` chunks before its window that score highest against its query (per head; the score
      is the chunk's largest ``q . k`` over its keys that are not sinks). 0: none.
    * ``retrieval``: how the chunk states of the earlier chunks it did not select join the exact
      softmax: ``"additive"`` (``o = softmax part + g fq.S``) or ``"normalized"`` (one denominator:
      ``o = (softmax part + g fq.S) / (1 + g fq.z)``; needs non-negative features).
    * ``recall_tokens`` ``M``: the bounded recall mode (LoLA-style; 0: off; exclusive with
      ``retrieval_blocks``): per K/V head a cache of at most ``M`` exact tokens that have left the
      window, kept by how badly the linear state of the others recalls their values, and that state.
      Memory is constant.
    * ``own_position_chunks`` ``R``: far keys (sinks outside the window, retrieved blocks) of the chunks
      fewer than ``R`` chunks before the query's are scored and read as ``q . k`` (their own positions),
      older ones as ``qr . kr`` (the positions the caller gives far keys). 0: every far key as ``qr . kr``;
      else more than ``L`` (a far key lies at least ``L`` chunks back). The bounded mode needs 0.
    * ``scale``: softmax scale, default ``1/sqrt(head_dim)``.

    See ``docs/design.md`` for the whole definition (sections 3-5b).
    """

    chunk_size: int
    local_chunks: int = 1
    sink_tokens: int = 0
    retrieval_blocks: int = 0
    retrieval: str = "additive"
    recall_tokens: int = 0
    own_position_chunks: int = 0
    scale: Optional[float] = None

    def __post_init__(self):
        check_int("chunk_size", self.chunk_size, 1, MAX_TOKENS)
        check_int("local_chunks", self.local_chunks, 1)
        if self.local_chunks * self.chunk_size > MAX_TOKENS:
            raise ValueError(f"local_chunks must be at most {MAX_TOKENS // self.chunk_size:,} with chunk_size "
                             f"{self.chunk_size:,} (a window holds at most {MAX_TOKENS:,} tokens), got {self.local_chunks:,}")
        check_int("sink_tokens", self.sink_tokens, 0, MAX_TOKENS)
        check_int("retrieval_blocks", self.retrieval_blocks, 0, MAX_TOKENS)  # (a sequence holds fewer chunks)
        check_int("recall_tokens", self.recall_tokens, 0, MAX_RECALL_TOKENS)
        if self.recall_tokens and self.retrieval_blocks:
            raise ValueError("recall_tokens and retrieval_blocks are exclusive: set one of them to 0")
        check_int("own_position_chunks", self.own_position_chunks, 0, MAX_TOKENS)
        if 0 < self.own_position_chunks <= self.local_chunks:
            raise ValueError(f"own_position_chunks must be 0 or more than local_chunks ({self.local_chunks}): far "
                             f"keys lie at least local_chunks chunks back, got {self.own_position_chunks}")
        if self.recall_tokens and self.own_position_chunks:
            raise ValueError("own_position_chunks needs recall_tokens 0: the bounded mode reads every far key "
                             "at the far positions (qr, kr)")
        if self.retrieval not in VARIANTS:
            raise ValueError(f"retrieval must be one of {VARIANTS}, got {self.retrieval!r}")
        check_number("scale", self.scale, 0, above=True, none=True)  # inf, nan or 1e39 would poison every softmax

    @property
    def window(self) -> int:
        """Tokens of the exact window's chunk part (the last chunks of the streaming cache's window buffer)."""
        return self.local_chunks * self.chunk_size
