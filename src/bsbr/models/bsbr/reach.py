"""Where a BSBR model's chunk states can change its output: what distillation can train, and what an
evaluation must read to see it."""
from __future__ import annotations


def exact_reach(config) -> int:
    """Tokens up to which the pieces ``params="new"`` trains (chunk states, gates, maps) cannot change a
    BSBR model's output: every token that has left a token's window is still read exactly, so the states
    hold nothing (a chunk's state holds its sinks too). With blocks, while every chunk before the window is
    one of the ``retrieval_blocks`` (and none of them is sinks alone): ``(local_chunks + retrieval_blocks) x
    chunk_size``, or ``local_chunks x chunk_size`` when ``sink_tokens >= chunk_size``; in the bounded mode,
    without sinks, while the tokens before the window fit in the ``recall_tokens`` slots: ``(local_chunks +
    recall_tokens // chunk_size) x chunk_size``, and with sinks ``local_chunks x chunk_size`` (the sinks join
    the state). A window of ``n`` tokens trains on the logits of its first ``n - 1`` (the last token is only
    a target), so it needs ``n >= reach + 2``."""
    B, S, L = config.chunk_size, config.sink_tokens, config.local_chunks
    recall = getattr(config, "recall_tokens", 0)
    if recall:
        return L * B if S else (L + recall // B) * B
    return L * B if S >= B else (L + getattr(config, "retrieval_blocks", 0)) * B


def gate_open(student) -> bool:
    """Whether any layer of ``student`` reads its chunk states: a gate above 0, or no gate at all
    (``gate_init=None``: the states are always read)."""
    gates = [p for n, p in student.named_parameters() if n.endswith("retrieval_gate")]
    return not gates or any(float(p.detach().max()) > 0 for p in gates)
