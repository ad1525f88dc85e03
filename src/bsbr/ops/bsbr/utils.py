"""Pieces shared by the three forms of the BSBR op: argument checks, the retrieval weights and the
streaming state.

Notation (one head; see ``shared/notes/bsbr-math.md``): chunk size ``B``, chunk ``c(t) = t // B``.

* exact window     token ``t`` attends by softmax to the keys ``j <= t`` of chunks ``c(t) - L + 1 ..
                   c(t)`` (``L = local_chunks``, default 1: its own chunk) and of the sequence's first
                   ``S = sink_tokens`` tokens (:func:`exact_window`); retrieval reads the chunk states
                   of chunks ``< c(t) - L + 1``. (The sinks' chunk 0 is retrieved like any other.)

* ``q, k, v``      per-token queries, keys, values (keys/values may have fewer heads: grouped K/V).
* ``fq, fk``       the *feature* side of queries/keys used by the chunk states. They default to
                   ``q``/``k``; a layer passes a feature map and/or a state compression here
                   (compression = a projection of the feature dim ``d -> d / factor``, so each
                   chunk state ``F_c = sum_j fk_j v_j^T`` shrinks from ``d x d`` to ``d/factor x d``).
* ``mq, mk``       per-token meta-queries / meta-keys. The op reduces them to one per chunk:
                   ``h_c = mean(mk_j, j in chunk c)`` (a chunk's key may summarise the whole chunk,
                   because only *later* chunks read it) and ``r_c = mean(mq_j, j in chunk c-1)``.
                   The meta-query of chunk ``c`` is built from the previous chunk, which every token
                   of chunk ``c`` has already seen; the earlier library used the last token of chunk
                   ``c`` itself, which leaks the future into the rest of that chunk.
* ``meta_q_map, meta_k_map``  optional *affine* maps applied to those chunk means. Because an affine
                   map commutes with a mean, ``map(mean(x)) == mean(map(x))``: a layer passes its raw
                   inputs (e.g. hidden states with a single "head") and its meta projections here, and
                   pays for one projection per chunk instead of one per token. The maps take
                   (b, h_in, C, d_in) and return (b, hq, C, dm) / (b, hkv, C, dm).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Optional

import torch

from ..checks import check_tensor

VARIANTS = ("additive", "normalized")


@dataclass
class BSBRArgs:
    """Validated sizes of one call."""

    batch: int
    q_heads: int
    kv_heads: int
    seq_len: int
    head_dim: int
    value_dim: int
    feature_dim: int
    meta_dim: int  # after the meta maps
    meta_q_in: tuple = ()  # (heads, dim) of mq before its map
    meta_k_in: tuple = ()


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_options(chunk_size, variant: str, top_k, local_chunks=1, sink_tokens=0) -> None:
    if not _is_int(chunk_size) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if top_k is not None and (not _is_int(top_k) or top_k < 1):
        raise ValueError(f"top_k must be None (dense retrieval) or an int >= 1, got {top_k!r}")
    if not _is_int(local_chunks) or local_chunks < 1:
        raise ValueError(f"local_chunks must be an int >= 1 (1: own chunk only), got {local_chunks!r}")
    if not _is_int(sink_tokens) or sink_tokens < 0:
        raise ValueError(f"sink_tokens must be an int >= 0, got {sink_tokens!r}")


def exact_window(t: torch.Tensor, j: torch.Tensor, chunk_size: int, local_chunks: int, sink_tokens: int):
    """Which keys a query attends to exactly (the local softmax): key index j <= query index t, and j
    lies in t's own chunk or one of the ``local_chunks - 1`` chunks before it, or j is one of the
    sequence's first ``sink_tokens`` tokens ("attention sinks"). Indices count real tokens from 0;
    t and j broadcast. Every earlier chunk outside the window is reached by retrieval only."""
    return (j <= t) & (j >= 0) & (_near(t, j, chunk_size, local_chunks) | (j < sink_tokens))


def _near(t, j, chunk_size, local_chunks):
    return torch.div(j, chunk_size, rounding_mode="floor") > torch.div(t, chunk_size, rounding_mode="floor") - local_chunks


def sink_slot_visible(t: torch.Tensor, j: torch.Tensor, chunk_size: int, local_chunks: int):
    """The chunked and streaming forms hold the sinks in slots of their own, beside the window's
    chunks: query t reads sink j through its slot only when j <= t lies outside t's chunks (inside
    them, the chunk's own slot holds it, and a key must not count twice)."""
    return (j <= t) & ~_near(t, j, chunk_size, local_chunks)


def check_inputs(q, k, v, mq, mk, fq, fk, gate, valid, token_dim: int = 4, meta_q_map=None,
                 meta_k_map=None, mass_power=None) -> BSBRArgs:
    """Check shapes of a sequence call (``token_dim=4``: (b, h, n, d)) or a step call (3: (b, h, d))."""
    for name, x in (("q", q), ("k", k), ("v", v), ("mq", mq), ("mk", mk), ("fq", fq), ("fk", fk)):
        check_tensor(name, x, token_dim)
    b, hq = q.shape[:2]
    d = q.shape[-1]
    hkv = k.shape[1]
    lead = q.shape[:-1]
    if hkv < 1 or hq % hkv != 0:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")
    kv_lead = (b, hkv) + tuple(lead[2:])
    for name, x in (("k", k), ("v", v), ("fk", fk)):
        if tuple(x.shape[:-1]) != kv_lead:
            raise ValueError(f"{name} must have leading shape {kv_lead}, got {tuple(x.shape)}")
    if tuple(fq.shape[:-1]) != tuple(lead):
        raise ValueError(f"fq must have leading shape {tuple(lead)}, got {tuple(fq.shape)}")
    if k.shape[-1] != d:
        raise ValueError(f"k head dim ({k.shape[-1]}) must equal q head dim ({d})")
    for name, x, heads, fn in (("mq", mq, hq, meta_q_map), ("mk", mk, hkv, meta_k_map)):
        if fn is not None and not callable(fn):
            raise TypeError(f"{name}'s map must be callable or None, got {type(fn).__name__}")
        allowed = (heads,) if fn is None else (1, heads)
        if x.shape[0] != b or x.shape[1] not in allowed or tuple(x.shape[2:-1]) != tuple(lead[2:]):
            want = " or ".join(str((b, h) + tuple(lead[2:])) for h in allowed)
            raise ValueError(f"{name} must have leading shape {want}, got {tuple(x.shape)}")
    meta_dim = mq.shape[-1]
    if meta_q_map is not None or meta_k_map is not None:
        # the mapped sizes: probe the maps on one zero "chunk"
        with torch.no_grad():
            outs = [(fn(x.new_zeros(b, x.shape[1], 1, x.shape[-1])) if fn is not None else x.new_zeros(b, h, 1, x.shape[-1]))
                    for x, h, fn in ((mq, hq, meta_q_map), (mk, hkv, meta_k_map))]
        for name, o, h in (("meta_q_map", outs[0], hq), ("meta_k_map", outs[1], hkv)):
            if o.dim() != 4 or tuple(o.shape[:3]) != (b, h, 1):
                raise ValueError(f"{name} must return (b, {h}, C, dm), got {tuple(o.shape)} for one chunk")
        meta_dim = outs[0].shape[-1]
        if outs[1].shape[-1] != meta_dim:
            raise ValueError(f"meta-queries and meta-keys must share their size after the maps, got "
                             f"{meta_dim} and {outs[1].shape[-1]}")
    elif mq.shape[-1] != mk.shape[-1]:
        raise ValueError(f"mq and mk must share their last dim, got {mq.shape[-1]} and {mk.shape[-1]}")
    if fq.shape[-1] != fk.shape[-1]:
        raise ValueError(f"fq and fk must share their last dim, got {fq.shape[-1]} and {fk.shape[-1]}")
    dtypes = {x.dtype for x in (q, k, v, mq, mk, fq, fk)}
    if len(dtypes) != 1:
        raise TypeError(f"q, k, v, mq, mk, fq, fk must share one dtype, got {sorted(map(str, dtypes))}")
    for name, x in (("gate", gate), ("mass_power", mass_power)):
        if x is None:
            continue
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be None or a tensor of shape ({hq},), got {type(x).__name__}")
        if x.dim() > 1 or x.numel() not in (1, hq):
            raise ValueError(f"{name} must be a scalar or have shape ({hq},), got {tuple(x.shape)}")
    n = q.shape[2] if token_dim == 4 else 1
    if valid is not None:
        want = (b, n) if token_dim == 4 else (b,)
        if not isinstance(valid, torch.Tensor):
            raise TypeError(f"valid must be None or a tensor of shape {want}, got {type(valid).__name__}")
        if tuple(valid.shape) != want:
            raise ValueError(f"valid (the padding mask) must have shape {want}, got {tuple(valid.shape)}")
    return BSBRArgs(b, hq, hkv, n, d, v.shape[-1], fq.shape[-1], meta_dim, (mq.shape[1], mq.shape[-1]),
                    (mk.shape[1], mk.shape[-1]))


def apply_map(fn, x: torch.Tensor) -> torch.Tensor:
    """A meta map on chunk means (b, h, C, d) -> (b, h', C, dm); identity when ``fn`` is None."""
    return x if fn is None else fn(x)


def gate_per_head(gate: Optional[torch.Tensor], q_heads: int, like: torch.Tensor) -> torch.Tensor:
    """The retrieval gate as a (q_heads,) tensor; ``None`` means an open gate (1)."""
    if gate is None:
        return torch.ones(q_heads, dtype=like.dtype, device=like.device)
    return gate.to(like.dtype).reshape(-1).expand(q_heads)


def retrieval_weights(
    r: torch.Tensor, h: torch.Tensor, allowed: torch.Tensor, top_k: Optional[int], variant: str
) -> torch.Tensor:
    """Weights w[c, c'] that chunk c gives to the state of chunk c'.

    r: (b, hkv, g, R, dm) meta-queries; h: (b, hkv, P, dm) meta-keys of candidate chunks;
    allowed: (b or 1, 1, 1, R, P) bool, which (c, c') pairs may be retrieved (c' < c).
    Returns (b, hkv, g, R, P). Rows with nothing allowed are all zero.

    ``additive`` uses the seed's alpha = softmax over allowed chunks (the weights sum to one).
    ``normalized`` multiplies alpha by the number of selected chunks, so that uniform scores give
    every past chunk a full weight of one: then the read-out is plain linear attention over the past,
    sharing its denominator with the local softmax.
    """
    scores = torch.einsum("bkgrd,bkpd->bkgrp", r, h) / math.sqrt(r.shape[-1])
    allowed = allowed.expand_as(scores)
    if top_k is not None and top_k < scores.shape[-1]:
        masked = scores.masked_fill(~allowed, float("-inf"))
        idx = masked.topk(top_k, dim=-1).indices
        keep = torch.zeros_like(allowed).scatter(-1, idx, True)
        allowed = allowed & keep
    scores = scores.masked_fill(~allowed, float("-inf"))
    # rows with no allowed chunk (chunk 0) would be softmax of all -inf: give them zero weight
    any_allowed = allowed.any(-1, keepdim=True)
    alpha = torch.softmax(scores.masked_fill(~any_allowed, 0.0), dim=-1) * allowed
    if variant == "normalized":
        alpha = alpha * allowed.sum(-1, keepdim=True).to(alpha.dtype)
    return alpha


def local_log_mass(scores: torch.Tensor) -> torch.Tensor:
    """log sum_j exp(s_j - max_j s_j) over the last dim of masked (-inf) local scores: the log of the
    local softmax's mass once its running max is subtracted, in [0, log n_local]."""
    return torch.logsumexp(scores, dim=-1) - scores.amax(dim=-1)


def combine(o_local, num, den, gate, variant: str, log_mass=None, mass_power=None):
    """Mix the local softmax output with the retrieved read-out.

    o_local, num: (..., hq, T, dv); den: (..., hq, T) or None; gate: (hq,).
    additive:   o = o_local + g * q.S                        (the seed's formula)
    normalized: o = (o_local + g * fq.S) / (1 + g * fq.z)    (shared denominator: the local
                softmax is a distribution of mass one, the retrieved chunks add mass g * fq.z)

    With ``mass_power`` beta (hq,) and ``log_mass`` (..., hq, T) = log L_t, where
    L_t = sum_local exp(s - max s), the gate becomes per token: g_t = g * L_t^(-beta). With beta = 1
    this is one softmax over the local scores and the retrieved mass with the running max subtracted
    from the softmax part only: o = (L o_local + g fq.S) / (L + g fq.z). A token whose local context
    holds one dominant key (L near 1, e.g. early in its chunk) leans on retrieval; a token with many
    strong local matches leans on them.
    """
    g = gate.view(-1, 1, 1)
    if mass_power is not None:
        g = g * torch.exp(-mass_power.to(o_local.dtype).reshape(-1, 1) * log_mass).unsqueeze(-1)
    if variant == "additive":
        return o_local + g * num
    return (o_local + g * num) / (1.0 + g * den.unsqueeze(-1))


@dataclass
class BSBRState:
    """Streaming state of one BSBR attention for a batch; each sequence has its own position.

    Memory is bounded by the exact window's keys/values (``local_chunks`` chunks plus ``sink_tokens``
    tokens) plus one (feature x value) state, one meta-key and one feature sum per *completed* chunk:
    it never holds the keys of earlier chunks.
    """

    chunk_size: int
    n_seen: torch.Tensor  # (b,) real tokens consumed per sequence
    k_buf: torch.Tensor  # (b, hkv, W, d) ring of the last W = local_chunks * B keys (token t in slot t % W)
    v_buf: torch.Tensor  # (b, hkv, W, dv)
    k_sink: torch.Tensor  # (b, hkv, sink_tokens, d) keys of the sequence's first tokens
    v_sink: torch.Tensor  # (b, hkv, sink_tokens, dv)
    F_cur: torch.Tensor  # (b, hkv, df, dv) state of the current (incomplete) chunk
    z_cur: torch.Tensor  # (b, hkv, df)
    mk_sum: torch.Tensor  # (b, hkv or 1, dm_in) running sum of (unmapped) meta-keys of the current chunk
    mq_sum: torch.Tensor  # (b, hq or 1, dm_in) running sum of (unmapped) meta-queries of the current chunk
    r_cur: torch.Tensor  # (b, hq, dm) meta-query of the current chunk (mean over the previous one)
    F_past: torch.Tensor  # (b, hkv, P, df, dv) states of completed chunks (P >= completed)
    z_past: torch.Tensor  # (b, hkv, P, df)
    h_past: torch.Tensor  # (b, hkv, P, dm) meta-keys of completed chunks
    S_cur: torch.Tensor  # (b, hq, df, dv) what the current chunk retrieved (cached)
    zS_cur: torch.Tensor  # (b, hq, df)
    local_chunks: int = 1
    sink_tokens: int = 0

    SIZES = ("chunk_size", "local_chunks", "sink_tokens")

    @property
    def completed(self) -> torch.Tensor:
        return torch.div(self.n_seen, self.chunk_size, rounding_mode="floor")

    @classmethod
    def empty(cls, a: BSBRArgs, chunk_size: int, like: torch.Tensor, local_chunks: int = 1,
              sink_tokens: int = 0) -> "BSBRState":
        z = lambda *s: torch.zeros(*s, dtype=like.dtype, device=like.device)  # noqa: E731
        b, hq, hkv = a.batch, a.q_heads, a.kv_heads
        W = local_chunks * chunk_size
        return cls(
            chunk_size=chunk_size,
            local_chunks=local_chunks,
            sink_tokens=sink_tokens,
            n_seen=torch.zeros(b, dtype=torch.long, device=like.device),
            k_buf=z(b, hkv, W, a.head_dim),
            v_buf=z(b, hkv, W, a.value_dim),
            k_sink=z(b, hkv, sink_tokens, a.head_dim),
            v_sink=z(b, hkv, sink_tokens, a.value_dim),
            F_cur=z(b, hkv, a.feature_dim, a.value_dim),
            z_cur=z(b, hkv, a.feature_dim),
            mk_sum=z(b, *(a.meta_k_in or (hkv, a.meta_dim))),
            mq_sum=z(b, *(a.meta_q_in or (hq, a.meta_dim))),
            r_cur=z(b, hq, a.meta_dim),
            F_past=z(b, hkv, 0, a.feature_dim, a.value_dim),
            z_past=z(b, hkv, 0, a.feature_dim),
            h_past=z(b, hkv, 0, a.meta_dim),
            S_cur=z(b, hq, a.feature_dim, a.value_dim),
            zS_cur=z(b, hq, a.feature_dim),
        )

    def tensors(self):
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in self.SIZES}

    def sizes(self) -> dict:
        return {name: getattr(self, name) for name in self.SIZES}

    def check_sizes(self, **sizes) -> None:
        """A state continues only a call with the sizes it was built with."""
        for name, want in sizes.items():
            if getattr(self, name) != want:
                raise ValueError(f"state was built with {name}={getattr(self, name)}, got {name}={want}")

    def select(self, index: torch.Tensor) -> "BSBRState":
        """Reorder/select batch entries (beam search)."""
        return BSBRState(**self.sizes(), **{n: t.index_select(0, index) for n, t in self.tensors().items()})

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


def refresh_retrieval(state: BSBRState, which: torch.Tensor, top_k, variant: str) -> None:
    """Recompute what the current chunk retrieves (S_cur, zS_cur) for the sequences in ``which``."""
    b, hkv, P = state.h_past.shape[:3]
    hq = state.r_cur.shape[1]
    g = hq // hkv
    if P == 0:
        return
    r = state.r_cur.view(b, hkv, g, 1, -1)
    # the current chunk retrieves the completed chunks outside its exact window
    reachable = state.completed - (state.local_chunks - 1)
    allowed = (torch.arange(P, device=r.device)[None, :] < reachable[:, None]).view(b, 1, 1, 1, P)
    w = retrieval_weights(r, state.h_past, allowed, top_k, variant)  # (b, hkv, g, 1, P)
    S = torch.einsum("bkgp,bkpfv->bkgfv", w[:, :, :, 0], state.F_past).reshape(b, hq, *state.F_past.shape[-2:])
    zS = torch.einsum("bkgp,bkpf->bkgf", w[:, :, :, 0], state.z_past).reshape(b, hq, -1)
    sel = which.view(b, 1, 1, 1)
    state.S_cur = torch.where(sel, S, state.S_cur)
    state.zS_cur = torch.where(sel.view(b, 1, 1), zS, state.zS_cur)


def ensure_capacity(state: BSBRState, need: int) -> None:
    """Grow the per-chunk arrays so that they hold ``need`` completed chunks (amortised doubling)."""
    P = state.F_past.shape[2]
    if need <= P:
        return
    grow = max(need, 2 * P) - P

    def pad(t):
        extra = torch.zeros(t.shape[:2] + (grow,) + t.shape[3:], dtype=t.dtype, device=t.device)
        return torch.cat([t, extra], dim=2)

    state.F_past, state.z_past, state.h_past = pad(state.F_past), pad(state.z_past), pad(state.h_past)
