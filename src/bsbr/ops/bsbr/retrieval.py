"""Retrieval math shared by the three forms: the chunk states' weights, the exact blocks' scores, and
how the exact softmax and the chunk states combine."""
from __future__ import annotations

import math
from typing import Optional

import torch

from .softmax import sum_dtype


def apply_meta(weight: Optional[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """A per-head meta map on chunk means: x (b, h, C, dm_in) @ weight (h, dm_in, dm); identity if None."""
    return x if weight is None else torch.einsum("bhcd,hde->bhce", x, weight.to(x.dtype))


def gate_per_head(gate, q_heads: int, like: torch.Tensor) -> torch.Tensor:
    """The chunk-state gate as a (q_heads,) tensor; ``None`` means an open gate (1), ``0`` a closed one."""
    if gate is None or not isinstance(gate, torch.Tensor):
        return torch.full((q_heads,), 1.0 if gate is None else float(gate), dtype=like.dtype, device=like.device)
    return gate.to(like.dtype).reshape(-1).expand(q_heads)


def gate_closed(gate) -> bool:
    """The gate is the number 0: the chunk-state term contributes nothing, so the forms skip reading it
    (the states are still kept, so a cache stays complete)."""
    return isinstance(gate, (int, float)) and not isinstance(gate, bool) and gate == 0


def state_weights(r: torch.Tensor, h: torch.Tensor, allowed: torch.Tensor, options) -> torch.Tensor:
    """Weights w[c, c'] that chunk c gives to the state of chunk c' (docs/design.md, section 3).

    r: (..., R, dm) meta-queries; h: (..., P, dm) meta-keys (leading dims broadcast); allowed:
    (..., R, P) bool, which pairs may be read (c' before c's window). Rows with nothing allowed are 0.
    w = softmax over the allowed chunks, times their number for ``normalized`` without exact blocks;
    in :func:`sum_dtype`.
    """
    up = sum_dtype(r.dtype)
    scores = (r.to(up) @ h.to(up).transpose(-1, -2)) / math.sqrt(r.shape[-1])
    allowed = allowed.expand_as(scores)
    any_allowed = allowed.any(-1, keepdim=True)
    alpha = torch.softmax(scores.masked_fill(~allowed, float("-inf")).masked_fill(~any_allowed, 0.0), dim=-1) * allowed
    if options.retrieval == "normalized" and not options.retrieval_blocks:
        alpha = alpha * allowed.sum(-1, keepdim=True).to(alpha.dtype)
    return alpha


GIST_FLOOR = 0.01  # the smallest share a token's unselected chunks are renormalised from


def gist_scale(total: torch.Tensor, picked: torch.Tensor, unread: torch.Tensor) -> torch.Tensor:
    """With exact blocks, the factor on a token's chunk-state read-out (num and den) that makes the
    weights of the chunks it does not read exactly sum to one: 1 / (total - picked), where ``total``
    is the sum of its chunk weights and ``picked`` that of its selected chunks; 0 where ``unread``
    (bool) says no allowed chunk is left unselected (so float residue of total - picked reads as
    nothing). The share is floored at ``GIST_FLOOR``.

    Why: the unselected chunks' share grows with the context (about 94% at 32k against at most 43%
    on 4k training windows), so without it a distilled model's gist would grow heavier past its training
    length (docs/findings.md)."""
    return torch.where(unread, 1.0 / (total - picked).clamp(min=GIST_FLOOR), torch.zeros_like(total))


SCORE_TILE = 1 << 18  # scores (floats) computed before they are reduced: a prefill's chunk, a decode step's whole context


def block_scores(qr: torch.Tensor, kr: torch.Tensor, sinks: int, keep: bool = False):
    """A chunk's score: its largest ``qr . k`` over its keys that are not sinks. qr (..., T, d), kr
    (..., P, B, d) the far keys of the sequence's first P chunks (every token real: a candidate chunk
    lies before a real token's window); ``sinks`` the first keys, never read as a block -> (..., T, P),
    -inf for a chunk of sinks alone. The exact maximum, not a bound or a mean: one outstanding key (a
    needle) makes its chunk's score (Quest-style bounds ranked the needle's chunk below others for
    heads that read it, and were at most a tenth cheaper; docs/findings.md).

    Per (sequence, head) the keys of consecutive chunks are consecutive rows, so a few chunks at a
    time are scored by one matmul against a view of them (no copy), and each (T, chunks x B) tile is
    reduced while in cache (3x faster than writing every q.k first). With keys stored transposed per
    chunk (one small matmul per chunk) a layer's decode step at 32k context took 1.4x as long
    (docs/findings.md, Speed).

    ``keep`` (a decode step, whose few queries' q.k are small) also returns every q.k, (..., T, P, B)
    with -inf at the sinks, so the selected blocks' scores are not computed twice."""
    P, B, d = kr.shape[-3:]
    T = qr.shape[-2]
    step = P if keep else max(1, SCORE_TILE // (T * B))  # chunks per tile
    lead = kr.dim() - 3
    qr, kr = qr.detach(), kr.detach()  # scores only choose blocks: no gradient flows through them
    out = qr.new_empty(kr.shape[:-3] + (T, P))
    kept = qr.new_empty(kr.shape[:-3] + (T, P, B)) if keep else None
    # one (sequence, head) at a time: kr is often a slice of a longer capacity, whose (head, chunk)
    # dims a batched matmul would first copy to merge
    outs = _entries(out, lead)
    for q_i, k_i, o_i, r_i in zip(_entries(qr.expand(kr.shape[:-3] + (T, d)), lead), _entries(kr, lead), outs,
                                  _entries(kept, lead) if keep else [None] * len(outs)):
        for p0 in range(0, P, step):
            n = min(step, P - p0)
            k_p = k_i[p0:p0 + n].reshape(n * B, d).t()
            sc = (q_i @ k_p if r_i is None else torch.matmul(q_i, k_p, out=r_i.view(T, P * B))).view(T, n, B)
            for p in range(p0, min(p0 + n, -(-sinks // B))):  # chunks holding sinks
                sc[:, p - p0, :sinks - p * B] = float("-inf")
            o_i[:, p0:p0 + n] = sc.amax(-1)
    return (out, kept) if keep else out


def _entries(x: torch.Tensor, n: int):
    """The views x[i] over x's first n dims."""
    xs = [x]
    for _ in range(n):
        xs = [y for t in xs for y in t.unbind(0)]
    return xs


RANK_BITS = 10  # mantissa bits of a block score that rank chunks: scores equal to about 3 significant digits tie
_MANTISSA = {torch.float64: (torch.int64, 52), torch.float32: (torch.int32, 23), torch.float16: (torch.int16, 10),
             torch.bfloat16: (torch.int16, 7)}


def rank_scores(scores: torch.Tensor) -> torch.Tensor:
    """Block scores as ranked: the mantissa cut to ``RANK_BITS`` bits (toward zero, which keeps their
    order). Keys computed by different calls (a prefill's matmul, one decode step) differ in their
    last bits, so a chunk that ties another exactly in one form could win by an ulp in another; cut,
    both scores read the same and the tie rule decides."""
    ints, bits = _MANTISSA[scores.dtype]
    drop = bits - RANK_BITS
    return scores if drop <= 0 else (scores.view(ints) & -(1 << drop)).view(scores.dtype)


def select_blocks(scores: torch.Tensor, candidate: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` best candidate chunks per query: scores (..., P), candidate (..., P) bool (broadcast).
    Returns (..., min(k, P)) chunk indices, -1 where fewer than k candidates exist.

    Scores are compared as :func:`rank_scores` gives them, and equal scores go to the later chunk.
    ``topk`` alone orders ties by its algorithm, which differs with the tensor's shape, so the three
    forms, or a sequence alone and in a batch, could pick different chunks: a repeated token at the
    same offset in two chunks has the same far key, so their scores tie. Only rows where the k-th
    score is shared by a chunk left out are re-ranked (a stable sort), so the usual cost stays one
    ``topk``."""
    P = scores.shape[-1]
    k = min(k, P)
    if k == 0:
        return scores.new_zeros(scores.shape[:-1] + (0,), dtype=torch.long)
    s = rank_scores(scores).masked_fill(~candidate, float("-inf"))
    val, idx = s.topk(k, dim=-1)
    kth = val[..., -1:]
    ambiguous = ((s == kth).sum(-1) > (val == kth).sum(-1)) & (kth[..., 0] > float("-inf"))
    if bool(ambiguous.any()):
        rows = s[ambiguous].flip(-1).sort(dim=-1, descending=True, stable=True)
        val, idx = val.clone(), idx.clone()
        val[ambiguous], idx[ambiguous] = rows.values[:, :k], P - 1 - rows.indices[:, :k]
    return torch.where(val > float("-inf"), idx, -1)


def combine(o_exact, num, den, gate, variant: str):
    """The exact softmax output and the chunk states' read-out (of the chunks not read exactly).

    o_exact, num: (..., hq, T, dv); den: (..., hq, T) or None; gate: (hq,).
    additive:   o = o_exact + g * q.S
    normalized: o = (o_exact + g * fq.S) / (1 + g * fq.z)   (the softmax has mass one; the states add
                mass g * fq.z)
    """
    g = gate.view(-1, 1, 1)
    if variant == "additive":
        return o_exact + g * num
    return (o_exact + g * num) / (1.0 + g * den.unsqueeze(-1))
