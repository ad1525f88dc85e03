"""Chunked BSBR attention: the default forward. No n x n tensor exists anywhere.

The exact softmax is computed in parts merged by log-sum-exp: each chunk against itself (causal),
against each of the ``L - 1`` chunks before it, against the sinks, and against its tokens' selected
blocks. Cost per head: window O(n L B d), block scores O(n^2 d / 2) (one q.k per earlier key: no
softmax, no values), selected blocks O(n K B d), chunk states O(n d^2 + C^2 d^2).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
import torch.nn.functional as F_

from ..checks import eager, exporting
from .inputs import check_inputs
from .masks import near, sink_outside_window
from .options import BSBROptions
from .retrieval import (GIST_FLOOR, apply_meta, block_scores, combine, gate_closed, gate_per_head, gist_scale,
                        select_blocks, state_weights)
from .softmax import attention_lse, fused_attention, masked_attention_lse, merge, sum_dtype
from .recall import RecallCache, recall_update
from .state import BSBRState, buffer_chunks, own_ring_chunks, refresh_retrieval, tracked, window_tokens

NEG_INF = float("-inf")
TILE = 16


@eager  # Python branches and loops on the chunk count: traced, it recompiled at every new count
def chunk_bsbr_attention(q, k, v, mq, mk, options: BSBROptions, *, fq=None, fk=None, qr=None, kr=None,
                         gate: Optional[torch.Tensor] = None, meta_q=None, meta_k=None, valid=None,
                         output_final_state: bool = False):
    """Block Sparse attention with Block Retrieval (see :class:`bsbr.ops.BSBROptions` for what it computes).

    Args:
        q: (b, hq, n, d) queries; k: (b, hkv, n, d) keys, v: (b, hkv, n, dv) values; positions already
            applied; ``hq`` a multiple of ``hkv`` (grouped K/V heads).
        mq: (b, hq, n, dm), mk: (b, hkv, n, dm) per-token meta-queries / meta-keys; the op reduces them to one
            per chunk: ``h_c = meta_k(mean mk over chunk c)``, ``r_c = meta_q(mean mq over chunk c - 1)`` (a
            chunk's meta-query comes from the chunk before, which all its tokens have seen). ``meta_q`` (hq, dm,
            dm'), ``meta_k`` (hkv, dm, dm'): per-head maps; None = identity.
        options: :class:`bsbr.ops.BSBROptions`.
        fq, fk: (b, hq, n, df), (b, hkv, n, df) features of the chunk states; default q, k (signed: with
            ``retrieval="normalized"`` and an open gate, pass non-negative ones).
        qr, kr: queries / keys as read outside the window (sinks and selected blocks), e.g. rotated
            at other positions; default q, k.
        gate: None (open), 0 (closed: the states are not read) or a 0-dim / (hq,) tensor scaling the
            chunk-state term.
        valid: (b, n) padding mask, True for real tokens. Each sequence is processed on its own real tokens
            (chunk boundaries start at its first real token); padded positions output 0.
        output_final_state: also return the :class:`BSBRState` to continue with the streaming form.

    Returns ``(o, state)``: o (b, hq, n, dv); state None unless ``output_final_state``."""
    a, (fq, fk, qr, kr) = check_inputs(options, q, k, v, mq, mk, fq, fk, qr, kr, gate, valid, meta_q, meta_k,
                                       streams=output_final_state)
    same_far = qr is q and kr is k  # far keys read at their own positions
    b, hq, hkv, n = a.batch, a.q_heads, a.kv_heads, a.seq_len
    B, L, R = options.chunk_size, options.local_chunks, options.own_position_chunks
    scale = 1.0 / math.sqrt(a.head_dim) if options.scale is None else options.scale
    if n == 0 or b == 0:
        return q.new_zeros(b, hq, n, a.value_dim), (BSBRState.empty(a, options, q) if output_final_state else None)
    if n < B and not output_final_state:  # one chunk, partial: every token reads the others in its window alone,
        # so a chunk of n tokens gives the same outputs without padding n to B (which cost O(B) time and memory)
        options, B = dataclasses.replace(options, chunk_size=n), n
    x, order, lengths = _chunked_tokens((q, k, v, mq, mk, fq, fk, qr, kr), valid, B)
    q, k, v, mq, mk, fq, fk, qr, kr = x
    C = q.shape[2] // B
    state_options, state_kr = options, kr  # the state keeps the far keys as given, for later tokens
    if C <= R:  # every far key lies within reach: read at its own position, i.e. as the keys themselves
        qr, kr, options, same_far = q, k, dataclasses.replace(options, own_position_chunks=0), True
    tok_valid = torch.arange(C * B, device=q.device)[None, :] < lengths[:, None]  # (b, N)
    closed = gate_closed(gate)
    dense = bool(options.retrieval_blocks) and C - L <= options.retrieval_blocks
    causal = dense and same_far  # every earlier chunk read, far keys the keys: causal attention, one fused call
    # the exact softmax, in parts: the window, the sinks, and the blocks or the recall cache
    parts = [] if causal else _window_parts(q, k, v, b, hkv, hq // hkv, C, B, L, scale, n)
    if options.sink_tokens and not dense:  # (the dense far part holds the sinks)
        parts.append(_sink_part(q, k, qr, kr, v, tok_valid, options, scale))
    num = den = None
    if options.recall_tokens:
        part, num, den, saved = _recall_terms(qr, kr, v, fq, fk, tok_valid, lengths, options, scale, closed)
        parts.append(part)
    else:
        # the chunk states: read unless the gate is closed, kept for the streaming state
        fq = fq if closed else fq.to(sum_dtype(fq.dtype))  # (once: the gist's read-outs, and gradients, cancel)
        saved = _chunk_states(mq, mk, fk, v, tok_valid, options, meta_q, meta_k, weights=not closed) \
            if not closed or output_final_state else {}
        if dense:
            if not causal:
                parts.append(_all_earlier_blocks(q, k, qr, kr, v, None if valid is None else tok_valid, options, scale))
            if B <= options.sink_tokens and not closed:  # only chunks of sinks alone keep their states
                num, den = _sink_chunks_gist(fq, saved, tok_valid, options)
        else:
            if not closed:
                num, den = _read_states(fq, saved["F"], saved["z"], saved["w"], options.retrieval)
            if options.retrieval_blocks:
                o_r, lse_r, num, den = _block_terms(q, k, qr, fq, kr, v, num, den, saved, tok_valid, options, scale)
                parts.append((o_r, lse_r))

    o = F_.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=hq != hkv) if causal \
        else merge(parts)
    if num is not None:
        o = combine(o, num, den, gate_per_head(gate, hq, num), options.retrieval).to(q.dtype)  # (num: sum_dtype)
    o = (o if valid is None else o * tok_valid.view(b, 1, -1, 1).to(o.dtype))[:, :, :n]  # padding outputs 0
    state = _final_state(a, state_options, k, v, state_kr, fk, mk, mq, lengths, saved, tracked(
        (q, k, v, mq, mk, fq, fk, qr, kr, gate, meta_q, meta_k))) if output_final_state else None
    if order is not None:  # back to the original (padded) positions
        o = torch.zeros_like(o).scatter(2, order[:, None, :, None].expand_as(o), o)
    return o, state


def _chunked_tokens(tensors, valid, B):
    """Each sequence's real tokens moved to the front (with ``valid``), padding zeroed, then zero-padded to
    whole chunks.
    Returns (tensors, order or None, lengths (b,))."""
    b, n = tensors[0].shape[0], tensors[0].shape[2]
    order = None
    if valid is not None:
        valid = valid.bool()
        order = torch.sort((~valid).to(torch.int8), dim=1, stable=True).indices  # (b, n), stable
        lengths = valid.sum(1)
        real = (torch.arange(n, device=valid.device)[None, :] < lengths[:, None]).view(b, 1, n, 1)
        # padding's values zeroed (not only masked): large ones would overflow q.k into NaN, and NaN times 0 is NaN
        tensors = tuple(torch.where(real, x.gather(2, order[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[3])),
                                    0) for x in tensors)
    else:
        lengths = torch.full((b,), n, dtype=torch.long, device=tensors[0].device)
    pad = -n % B
    if pad:
        tensors = tuple(F_.pad(x, (0, 0, 0, pad)) for x in tensors)
    return tensors, order, lengths


def _blocks(x, B):
    """(b, h, N, d) -> (b, h, C, B, d)."""
    return x.view(x.shape[0], x.shape[1], x.shape[2] // B, B, x.shape[-1])


def _far_scores(q, k, qr, kr, own):
    """Scores of far keys: q.k where ``own`` (bool, broadcast; None: nowhere), else qr.kr. q/qr (b, hkv,
    g, M, d), k/kr (b, hkv, 1, W, d) -> (b, hkv, g, M, W)."""
    s = qr @ kr.transpose(-1, -2)
    return s if own is None else torch.where(own, q @ k.transpose(-1, -2), s)


def _sink_part(q, k, qr, kr, v, tok_valid, options, scale):
    """The sinks outside each token's window as an LSE part (o (b, hq, N, dv), lse (b, hq, N))."""
    b, hkv, N = kr.shape[0], kr.shape[1], kr.shape[2]
    hq, B, R = qr.shape[1], options.chunk_size, options.own_position_chunks
    t = torch.arange(N, device=qr.device)
    j = torch.arange(min(options.sink_tokens, N), device=qr.device)
    ok = sink_outside_window(t[:, None], j[None, :], B, options.local_chunks)
    ok = ok & tok_valid[:, None, j]  # (b, N, S)
    own = near(t[:, None], j[None, :], B, R) if R else None  # (N, S): sinks at their own positions
    g_, up = (b, hkv, hq // hkv, N, -1), sum_dtype(q.dtype)  # scores in float32 at least, as the fused kernel's
    s = _far_scores(q.view(g_).to(up), k[:, :, : j.numel()].unsqueeze(2).to(up), qr.view(g_).to(up),
                    kr[:, :, : j.numel()].unsqueeze(2).to(up), own) * scale
    o_s, lse_s = masked_attention_lse(s, ok.view(b, 1, 1, N, -1), v[:, :, : j.numel()].unsqueeze(2))
    return o_s.reshape(b, hq, N, -1), lse_s.reshape(b, hq, N)


def _chunk_states(mq, mk, fk, v, tok_valid, options, meta_q, meta_k, weights: bool = True):
    """The chunk states and what reading them needs: F (b, hkv, C, df, dv), z, meta-keys/queries and, with
    ``weights`` (only an open gate reads them: a C x C table, 384 MiB a layer at 64k tokens of chunk 16), the
    state weights w (b, hkv, g, C, C)."""
    b, hkv, N = fk.shape[0], fk.shape[1], fk.shape[2]
    hq, B, L = mq.shape[1], options.chunk_size, options.local_chunks
    g, C = hq // hkv, N // B
    # chunk states from real tokens: F_c = fk_c^T v_c (b, hkv, C, df, dv), z_c = sum fk; in sum_dtype, as the
    # meta means
    up = sum_dtype(fk.dtype)
    m = tok_valid.view(b, 1, C, B, 1).to(up)
    fk_c = _blocks(fk, B) * m
    F = fk_c.transpose(-1, -2) @ _blocks(v, B).to(up)
    z = fk_c.sum(-2)
    # meta-keys (mean over the chunk) and meta-queries (mean over the previous chunk)
    counts = m.sum(-2).clamp(min=1.0)  # (b, 1, C, 1)
    h_meta = apply_meta(meta_k, (_blocks(mk, B) * m).sum(-2) / counts)  # (b, hkv, C, dm)
    mean_q = apply_meta(meta_q, (_blocks(mq, B) * m).sum(-2) / counts)  # (b, hq, C, dm)
    r_meta = F_.pad(mean_q[:, :, :-1], (0, 0, 1, 0))  # r_c = mean_q[c-1]
    saved = dict(F=F, z=z, h_meta=h_meta, mean_q=mean_q, m=m)
    if weights:  # state weights over the chunks before each chunk's window: w (b, hkv, g, C, C)
        c_idx = torch.arange(C, device=fk.device)
        saved["w"] = state_weights(r_meta.view(b, hkv, g, C, -1), h_meta.unsqueeze(2),
                                   c_idx[None, :] <= c_idx[:, None] - L, options)
    return saved


def _keep(tok_valid, options):
    """(b, 1, C, B): the tokens a retrieved block may read (real, not a sink)."""
    b, N = tok_valid.shape
    B = options.chunk_size
    t = torch.arange(N, device=tok_valid.device)
    return (tok_valid & (t >= options.sink_tokens)[None, :]).view(b, 1, N // B, B)


def _sink_chunks_gist(fq, saved, tok_valid, options):
    """With every candidate chunk read exactly, the gist of the chunks that hold sinks alone (never read
    as blocks), renormalised: num (b, hq, N, dv), den or None."""
    b, C = tok_valid.shape[0], saved["w"].shape[-1]
    rest = saved["w"] * (~_keep(tok_valid, options).any(-1)).view(b, 1, 1, 1, C).to(saved["w"].dtype)
    rest = rest / rest.sum(-1, keepdim=True).clamp(min=GIST_FLOOR)
    return _read_states(fq, saved["F"], saved["z"], rest, options.retrieval)


def _read_states(fq, F, z, w, retrieval):
    """Every token's read-out of the chunk states with its chunk's weights: fq (b, hq, N, df), F (b, hkv,
    C, df, dv), z (b, hkv, C, df), w (b, hkv, g, C, C), all in sum_dtype -> num (b, hq, N, dv), den (b, hq, N)
    or None."""
    b, hkv, C, df, dv = F.shape
    hq, N = fq.shape[1], fq.shape[2]
    g = hq // hkv
    S_ = (w @ F.view(b, hkv, 1, C, df * dv)).view(b, hkv, g, C, df, dv)
    zS = w @ z.view(b, hkv, 1, C, df)  # (b, hkv, g, C, df)
    fq_c = fq.view(b, hkv, g, C, N // C, df)
    num = (fq_c @ S_).view(b, hq, N, dv)
    den = (fq_c @ zS.unsqueeze(-1)).view(b, hq, N) if retrieval == "normalized" else None
    return num, den


def _block_terms(q, k, qr, fq, kr, v, num, den, saved, tok_valid, options, scale):
    """Exact blocks when K selects among the chunks before a window: each token's top-K chunks, read in
    the same softmax; their states leave the chunk-state term (when it is read: ``num`` not None).
    Returns the LSE part and the corrected num/den."""
    b, hkv, N = kr.shape[0], kr.shape[1], kr.shape[2]
    hq, B, L, R = qr.shape[1], options.chunk_size, options.local_chunks, options.own_position_chunks
    K = options.retrieval_blocks
    g, C, dv = hq // hkv, N // B, v.shape[-1]
    t = torch.arange(N, device=qr.device)
    holds = _keep(tok_valid, options).any(-1).view(b, 1, 1, 1, C)  # chunks with a token that is not a sink
    real = tok_valid.view(b, 1, 1, N, 1)
    # each query chunk's K best among the chunks before its window, chosen as soon as its scores exist, so
    # that no (N, C) table is held (at 1M tokens that table alone would be 150 GB); the scores carry no gradient
    if exporting():  # (a graph of fixed shapes; which blocks are read is known only from values)
        raise NotImplementedError("torch.export cannot record exact block retrieval past the window: which chunks "
                                  "a token reads follows the scores; export the bounded mode (recall_tokens), or "
                                  "inputs of at most local_chunks + retrieval_blocks chunks")
    sel = torch.full((b, hkv, g, N, K), -1, dtype=torch.long, device=qr.device)  # -1: none
    k_b, kr_b = (_blocks(x.detach().contiguous(), B) for x in (k, kr))  # (b, hkv, C, B, d): the cache's layout
    S = options.sink_tokens
    for c in range(L, C):
        P, rows = c - L + 1, slice(c * B, (c + 1) * B)
        split = min(max(c - R + 1, 0), P) if R else P  # chunks before it scored qr.kr, from it q.k
        scores = qr.new_empty(b, hkv, g, B, P)
        _score_chunk(scores, qr, kr_b, c, 0, split, S)
        _score_chunk(scores, q, k_b, c, split, P, S)
        got = select_blocks(scores, holds[..., :P] & real[:, :, :, rows], K)
        sel[:, :, :, rows, :got.shape[-1]] = got
    w_sel = None
    if num is not None:  # each token's weights of its selected chunks: its chunk's row of w
        at = sel.clamp(min=0).view(b, hkv, g, C, B * K)
        w_sel = saved["w"].gather(-1, at).view(b, hkv, g, N, K) * (sel >= 0)
    own = None
    if R:  # the selected chunks fewer than R before the token's: read at their own positions
        own = ((t // B).view(1, 1, 1, N, 1) - sel < R) & (sel >= 0)
    o_r, lse_r, sub_num, sub_den = _selected_blocks((qr, q), fq, (_blocks(kr, B), _blocks(k, B)), _blocks(v, B),
                                                    saved.get("F"), saved.get("z"), sel, own, w_sel, S, scale)
    if num is not None:  # the gist: the other chunks, renormalised
        total = saved["w"].sum(-1).repeat_interleave(B, dim=-1)  # (b, hkv, g, N)
        unread = (t // B - L + 1).clamp(min=0) > (sel >= 0).sum(-1)
        s = gist_scale(total, w_sel.sum(-1), unread).reshape(b, hq, N)
        num = (num - sub_num.reshape(b, hq, N, dv)) * s.unsqueeze(-1)
        if den is not None:
            den = (den - sub_den.reshape(b, hq, N)) * s
    return o_r.reshape(b, hq, N, dv), lse_r.reshape(b, hq, N), num, den


def _score_chunk(scores, q, k_b, c, p0, p1, sinks):
    """Write the block scores of query chunk c's tokens against chunks p0 .. p1 - 1 into ``scores``
    (b, hkv, g, B, P) at columns p0 .. p1 - 1. q (b, hq, N, d), k_b (b, hkv, C, B, d) detached. A K/V
    head's g query heads are the rows of one matmul: no key is copied per head."""
    if p1 <= p0:
        return
    b, hkv, g, B = scores.shape[:4]
    C = k_b.shape[2]
    q_c = q.detach().view(b, hkv, g, C, B, -1)[:, :, :, c].reshape(b, hkv, g * B, -1)
    s_c = block_scores(q_c, k_b[:, :, p0:p1], max(sinks - p0 * B, 0))
    scores[..., p0:p1] = s_c.view(b, hkv, g, B, p1 - p0)


def _all_earlier_blocks(q, k, qr, kr, v, readable, options, scale):
    """The far part when K covers every chunk before each window (contexts up to L + K chunks): chunk
    c's queries against every key of chunks 0 .. c - L, sinks included: as qr.kr up to chunk c - R,
    as q.k after it (R = ``own_position_chunks``). ``readable`` (b, N) the real tokens, or None when
    all are. Returns (o (b, hq, N, dv), lse (b, hq, N)); rows of the first L chunks have lse -inf."""
    b, hkv, N, d = kr.shape
    B, L, R = options.chunk_size, options.local_chunks, options.own_position_chunks
    hq, dv, C = qr.shape[1], v.shape[-1], N // B
    g = hq // hkv
    o = qr.new_zeros(b, hkv, g, N, dv)
    lse = qr.new_full((b, hkv, g, N), NEG_INF, dtype=sum_dtype(qr.dtype))
    for c in range(L, C):
        W, rows = (c - L + 1) * B, slice(c * B, (c + 1) * B)
        split = min(max(c - R + 1, 0), c - L + 1) * B if R else W  # keys before it: qr.kr; from it: q.k
        pieces = []
        for qx, kx, keys in ((qr, kr, slice(0, split)), (q, k, slice(split, W))):
            if keys.stop <= keys.start:
                continue
            q_c = qx.view(b, hkv, g, N, d)[:, :, :, rows].reshape(b, hkv, g * B, d)
            if readable is None:
                pieces.append(attention_lse(q_c, kx[:, :, keys], v[:, :, keys], None, scale))
            else:
                s = (q_c @ kx[:, :, keys].transpose(-1, -2)) * scale
                pieces.append(masked_attention_lse(s, readable[:, None, None, keys], v[:, :, keys]))
        o_c, lse_c = pieces[0] if len(pieces) == 1 else (merge(pieces), torch.logaddexp(*(x[1] for x in pieces)))
        o[:, :, :, rows], lse[:, :, :, rows] = o_c.view(b, hkv, g, B, dv), lse_c.view(b, hkv, g, B)
    return o.reshape(b, hq, N, dv), lse.reshape(b, hq, N)


def _recall_terms(qr, kr, v, fq, fk, tok_valid, lengths, options, scale, closed):
    """The bounded recall mode: the cache built chunk by chunk (chunk e leaves the window at the start
    of chunk e + L), each chunk's queries against the cache as it stands at its start (an LSE part), and
    their read-out of the state of the other left-window tokens. Each chunk reads its cache as soon as it
    is built, so without autograd one cache is alive at a time, not a copy per chunk (C·M·(d + dv + df)).
    Returns ((o, lse), num, den, {"cache": the final cache})."""
    b, hkv, N, d = kr.shape
    hq, B, L, S, M = qr.shape[1], options.chunk_size, options.local_chunks, options.sink_tokens, options.recall_tokens
    g, C, dv, df = hq // hkv, N // B, v.shape[-1], fk.shape[-1]
    # chunk by chunk, as views unbound once: an index per chunk would have each one's backward fill a zero
    # gradient of the whole input (quadratic: a 16k backward at chunk 16 took 28 s against 3.5 s)
    kr_c, v_c, fk_c = _blocks(kr, B).unbind(2), _blocks(v, B).unbind(2), _blocks(fk, B).unbind(2)
    qr_c = qr.view(b, hkv, g, C, B, d).transpose(2, 3).reshape(b * hkv, C, g * B, d).unbind(1)
    fq_c = None if closed else fq.view(b, hkv, g, C, B, df).transpose(2, 3).reshape(b, hkv, C, g * B, df).unbind(2)
    full = torch.div(lengths, B, rounding_mode="floor")  # completed chunks per sequence
    cache = RecallCache.empty(b, hkv, M, d, dv, df, kr)
    parts = []  # per chunk: o (b, hkv, g*B, dv), lse (b, hkv, g*B) and, with an open gate, num and den

    def read(c):  # chunk c's queries against the cache as it stands; an empty cache gets no weight (its
        # zero keys are read only to keep the kernel's rows finite)
        filled = cache.on.any(-1)  # (b, hkv)
        allowed = (cache.on | ~filled.unsqueeze(-1)).view(b * hkv, 1, 1, M)
        o, lse = attention_lse(qr_c[c].unsqueeze(1), cache.kr.reshape(-1, 1, M, d), cache.v.reshape(-1, 1, M, dv),
                               allowed, scale)
        part = [o.view(b, hkv, g * B, dv) * filled.view(b, hkv, 1, 1).to(o.dtype),
                lse.view(b, hkv, g * B).masked_fill(~filled.unsqueeze(-1), NEG_INF)]
        if not closed:  # (a closed gate: the state is kept in the cache but not read)
            part.append(fq_c[c] @ cache.F)
            part.append((fq_c[c] @ cache.z.unsqueeze(-1))[..., 0] if options.retrieval == "normalized" else None)
        parts.append(part)

    for c in range(min(L, C)):  # the first chunks: nothing has left the window yet
        read(c)
    for e in range(max(C - L + 1, 0)):
        pos = e * B + torch.arange(B, device=kr.device)
        real = tok_valid[:, e * B:(e + 1) * B]
        cache = recall_update(cache, kr_c[e], v_c[e], fk_c[e], pos.expand(b, B), real,
                              real & (pos >= S), e <= full - L, options.retrieval)
        if e + L < C:
            read(e + L)

    def unfold(i):  # the chunks' i-th parts, (b, hkv, g*B, ...) each -> (b, hq, N, ...)
        x = torch.stack([p[i] for p in parts], dim=2)
        x = x.view(b, hkv, C, g, B, *x.shape[4:]).transpose(2, 3)
        return x.reshape(b, hq, N, *x.shape[5:])

    num = None if closed else unfold(2)
    den = None if closed or options.retrieval != "normalized" else unfold(3)
    return (unfold(0), unfold(1)), num, den, dict(cache=cache)


def _window_parts(q, k, v, b, hkv, g, C, B, L, scale, n):
    """The window as LSE parts, each (o (b, hq, N, dv), lse (b, hq, N)): chunk c against itself
    (causal), then against chunk c - i for i = 1 .. L-1 (every key; rows of chunks c < i get lse
    -inf). Query heads of one K/V head are folded into the query length, so keys are never copied
    per query head. ``n``: the input's length (tokens past it are padding)."""
    d, dv = q.shape[-1], v.shape[-1]
    qc = q.view(b, hkv, g, C, B, d).permute(0, 3, 1, 2, 4, 5).reshape(b, C, hkv, g * B, d)
    kc = k.view(b, hkv, C, B, d).transpose(1, 2)  # (b, C, hkv, B, d)
    vc = v.view(b, hkv, C, B, dv).transpose(1, 2)

    def unfold(o, lse, first):  # (b*(C-first), hkv, g*B, ...) -> (b, hq, C*B, ...), chunks < first empty
        o = o.view(b, C - first, hkv, g, B, dv).permute(0, 2, 3, 1, 4, 5)
        lse = lse.view(b, C - first, hkv, g, B).permute(0, 2, 3, 1, 4)
        if first:
            o = F_.pad(o, (0, 0, 0, 0, first, 0))
            lse = F_.pad(lse, (0, 0, first, 0), value=NEG_INF)
        return o.reshape(b, hkv * g, C * B, dv), lse.reshape(b, hkv * g, C * B)

    m = min(n, B)  # one chunk of n < B tokens: its padding is not computed (a B x B mask per query head)
    causal = torch.ones(m, m, dtype=torch.bool, device=q.device).tril().repeat(g, 1)  # (g*m, m)
    if m < B:
        o, lse = attention_lse(qc.view(b, hkv, g, B, d)[..., :m, :].reshape(b, hkv, g * m, d), kc[:, 0, :, :m],
                               vc[:, 0, :, :m], causal, scale)  # padding rows: o 0, lse 0 (finite, unread)
        o = F_.pad(o.view(b, hkv, g, m, dv), (0, 0, 0, B - m)).reshape(b, hkv, g * B, dv)
        lse = F_.pad(lse.view(b, hkv, g, m), (0, B - m)).reshape(b, hkv, g * B)
    else:
        o, lse = attention_lse(qc.reshape(b * C, hkv, g * B, d), kc.reshape(b * C, hkv, B, d),
                               vc.reshape(b * C, hkv, B, dv), causal, scale)
    parts = [unfold(o, lse, 0)]
    for i in range(1, min(L, C)):
        o, lse = attention_lse(qc[:, i:].reshape(-1, hkv, g * B, d), kc[:, : C - i].reshape(-1, hkv, B, d),
                               vc[:, : C - i].reshape(-1, hkv, B, dv), None, scale)
        parts.append(unfold(o, lse, i))
    return parts


def _selected_blocks(queries, fq, keys, v_c, F, z, sel, own, w_sel, sinks, scale):
    """Softmax parts of the selected blocks and the chunk-state terms they replace.

    queries (qr, q), each (b, hq, N, d), fq (b, hq, N, df); keys (kr_c, k_c), each (b, hkv, C, B, d),
    v_c (b, hkv, C, B, dv); F (b, hkv, C, df, dv), z (b, hkv, C, df); sel (b, hkv, g, N, K') selected
    chunks (-1: none); own (like sel, bool) the pairs read as q.k (at own positions), or None (every
    pair qr.kr); w_sel their state weights or None (the chunk-state term is not read); ``sinks``: the sequence's first tokens, which a
    block never holds (a selected chunk lies before a real token's window, so all its tokens are real).
    Returns o (b, hkv, g, N, dv) and lse (b, hkv, g, N) over all of a token's selected blocks, and the
    sums over them of w fq.F_c (b, hkv, g, N, dv) and w fq.z_c (b, hkv, g, N) (None without w_sel).

    Work is grouped by (sequence, K/V head, chunk): the queries that selected a chunk are gathered
    and read its keys in one fused softmax call, so the cost is O(selections x B x d) with no padding."""
    qr, q = queries
    b, hkv, g, N, Kp = sel.shape
    C, B, d = keys[0].shape[2], keys[0].shape[3], keys[0].shape[-1]
    dv = v_c.shape[-1]
    n_ids = b * hkv * C
    v_f = v_c.reshape(b * hkv, C, B, dv)
    pairs, ids, th, q_row, uniq, counts, at = _pair_groups(sel, own, C)
    # each group's pieces as views made once (split/unbind): slicing a tensor per group would make its
    # backward write a zero tensor of the whole input per group
    sizes = ((counts + TILE - 1) // TILE * TILE).tolist()
    k_g = keys[0].reshape(n_ids, B, d).unbind(0)  # (B, d) per id
    if own is None:
        q_g = qr.reshape(-1, d).index_select(0, q_row[at])
    else:  # the queries of pairs at own positions are rows of q, after qr's
        q_all = torch.cat([qr.reshape(-1, d), q.reshape(-1, d)])
        q_g = q_all.index_select(0, q_row[at] + (ids[at] >= n_ids) * (q_all.shape[0] // 2))
        k_g = k_g + keys[1].reshape(n_ids, B, d).unbind(0)
    q_g = q_g.split(sizes)
    v_g = v_f.flatten(0, 1).unbind(0)  # (B, dv) per (sequence x head, chunk)
    state = w_sel is not None
    if state:
        fq_g = fq.flatten(0, -2).index_select(0, q_row[at]).split(sizes)  # (flatten: a feature size 0 too)
        F_g, z_g = F.flatten(0, 2).unbind(0), z.flatten(0, 2).unbind(0)
        w_p = w_sel.permute(0, 1, 3, 2, 4).reshape(-1)[pairs]
    groups, lses = [], []
    start = 0
    for i, (gid, cnt) in enumerate(zip(uniq.tolist(), counts.tolist())):
        first = min(max(sinks - (gid % C) * B, 0), B)  # the sinks at the chunk's start
        q_i, k_i, v_i = q_g[i][None, None], k_g[gid][first:][None, None], v_g[gid % n_ids][first:][None, None]
        if not fused_attention(q_i, k_i, v_i):  # plain matmuls: TILE rows per product, whatever the group's size
            q_i = q_i.view(-1, 1, TILE, d)
            k_i, v_i = k_i.expand(q_i.shape[0], -1, -1, -1), v_i.expand(q_i.shape[0], -1, -1, -1)
        o_g, lse_g = attention_lse(q_i, k_i, v_i, None, scale)
        groups.append((i, gid, start, cnt, o_g.reshape(-1, dv)[:cnt]))
        lses.append(lse_g.reshape(-1)[:cnt])
        start += cnt

    # one softmax over a token's blocks: lse per (token, head), then each pair's output added with its
    # weight exp(lse_pair - lse) into its row (in group order: a row's sum depends on its own pairs only)
    rows_out = b * hkv * N * g
    # (in sum_dtype: with half-precision lses the pair weights exp(lse_pair - lse) summed to e^(+-1), not 1)
    lse = qr.new_full((rows_out,), NEG_INF, dtype=sum_dtype(qr.dtype))
    o = qr.new_zeros(rows_out, dv)
    num = F.new_zeros(rows_out, dv) if state else None  # (F in sum_dtype)
    den = F.new_zeros(rows_out) if state else None
    if lses:
        lse_pairs = torch.cat(lses).to(lse.dtype)
        m = lse.detach().scatter_reduce(0, th, lse_pairs.detach(), "amax", include_self=False)  # largest part per row
        # (a row with no pair sums to 0: its log taken at the smallest normal, still -inf, keeps backward finite)
        total = lse.new_zeros(rows_out).index_add_(0, th, torch.exp(lse_pairs - m[th]))
        lse = m + torch.log(total.clamp(min=torch.finfo(total.dtype).tiny))
        w_pairs = torch.exp(lse_pairs - lse[th]).to(o.dtype)
        w_pairs = w_pairs.split(counts.tolist())
        w_p = w_p.split(counts.tolist()) if state else None
        for i, gid, start, cnt, o_g in groups:
            rows_g = th[start:start + cnt]
            o.index_add_(0, rows_g, o_g * w_pairs[i][:, None])
            if state:
                num.index_add_(0, rows_g, w_p[i][:, None] * (fq_g[i] @ F_g[gid % n_ids])[:cnt])
                den.index_add_(0, rows_g, w_p[i] * (fq_g[i] @ z_g[gid % n_ids])[:cnt])
    o, lse = o.view(b, hkv, N, g, dv), lse.view(b, hkv, N, g)
    if state:
        num, den = num.view(b, hkv, N, g, dv).transpose(2, 3), den.view(b, hkv, N, g).transpose(2, 3)
    return o.transpose(2, 3), lse.transpose(2, 3), num, den


def _pair_groups(sel, own, C):
    """The (token, head, selected chunk) pairs of :func:`_selected_blocks`, grouped by the keys they read:
    (sequence, K/V head, chunk), and whether at own positions (ids ``n_ids`` .. ``2 n_ids - 1``).
    Returns each pair's index into sel's (b, hkv, N, g, K') order, its group id, its output row in
    (b, hkv, N, g) order, its query's row in (b, hq, N) order, the group ids and sizes, and ``at``:
    the pair each row of the gathered queries holds, every group padded to a multiple of TILE rows."""
    b, hkv, g, N, Kp = sel.shape
    rows, n_ids = g * N * Kp, b * hkv * C
    # pairs in (token, head, slot) order: a token's pairs never move when a later token's choice changes
    sel_f = sel.permute(0, 1, 3, 2, 4).reshape(b * hkv, rows)
    flat = sel_f + (torch.arange(b * hkv, device=sel.device) * C)[:, None]  # (row, chunk) as one id
    if own is not None:  # a pair read at own positions: ids n_ids .. 2 n_ids - 1 (keys k, queries q)
        flat = flat + own.permute(0, 1, 3, 2, 4).reshape(b * hkv, rows) * n_ids
    flat = flat.masked_fill(sel_f < 0, -1).reshape(-1)
    pairs = (flat >= 0).nonzero()[:, 0]
    ids, order = flat[pairs].sort(stable=True)
    pairs = pairs[order]
    th = pairs // Kp  # each pair's (sequence, K/V head, token, head): a row of the (b, hkv, N, g) outputs
    q_row = th // (N * g) * (g * N) + (th % g) * N + (th // g) % N  # and its query: a row of qr.reshape(-1, d)
    uniq, counts = torch.unique_consecutive(ids, return_counts=True)
    # one gather of every pair's query, each group's rows padded to a multiple of TILE: a BLAS kernel's
    # result for one row can depend on the row count, and a token's output must not depend on which
    # other tokens chose the same chunk
    padded = (counts + TILE - 1) // TILE * TILE
    first_p = torch.cumsum(padded, 0) - padded  # each group's first padded row
    first_u = torch.cumsum(counts, 0) - counts  # and its first pair
    grp = torch.repeat_interleave(torch.arange(counts.numel(), device=sel.device), padded)
    at = (torch.arange(grp.numel(), device=sel.device) - first_p[grp]).minimum(counts[grp] - 1) + first_u[grp]
    return pairs, ids, th, q_row, uniq, counts, at


def _final_state(a, options, k, v, kr, fk, mk, mq, lengths, saved, graph: bool) -> BSBRState:
    """The streaming state after the last real token of each sequence."""
    b, S = a.batch, options.sink_tokens
    st = BSBRState.empty(a, options, k)
    st.n_seen = lengths.clone()
    # the window's buffer: the chunks up to the next token's, in order; empty slots are zeros
    N = buffer_chunks(options, int(lengths.max()) // options.chunk_size if b else 0)
    W = N * options.chunk_size
    idx = window_tokens(lengths.view(b, 1), options.chunk_size, N)  # (b, W)
    held = ((idx >= 0) & (idx < lengths.view(b, 1))).view(b, 1, W, 1)

    def window(x):
        got = x.gather(2, idx.clamp(0, max(x.shape[2] - 1, 0)).view(b, 1, W, 1).expand(-1, x.shape[1], -1, x.shape[-1]))
        return got * held.to(x.dtype)

    st.k_buf, st.v_buf = window(k), window(v)
    if S:
        s_ = min(S, k.shape[2])
        first = (torch.arange(s_, device=k.device).view(1, 1, -1, 1) < lengths.view(b, 1, 1, 1)).to(k.dtype)
        st.k_sink[:, :, :s_] = kr[:, :, :s_] * first
        st.v_sink[:, :, :s_] = v[:, :, :s_] * first
        if options.own_position_chunks:
            st.k_sink_own[:, :, :s_] = k[:, :, :s_] * first
    if options.recall_tokens:
        st.kr_ring, st.fk_ring = window(kr), window(fk)
        st.set_recall(saved["cache"])
    else:
        _chunk_state_final(st, a, options, k, kr, v, mk, mq, lengths, saved)
    for name, t in st.tensors().items():  # decoding reshapes these arrays every step: no copies then
        setattr(st, name, t.contiguous())
    st.grad_history = graph  # (a call that recorded a graph may have saved these tensors for its backward)
    return st


def _chunk_state_final(st, a, options, k, kr, v, mk, mq, lengths, saved) -> None:
    """The per-chunk part of the final state: the current chunk's running sums, every completed chunk's
    state and meta-key (and blocks), and what the current chunk reads."""
    b, hkv, hq, B = a.batch, a.kv_heads, a.q_heads, options.chunk_size
    F, z, m, mean_q = saved["F"], saved["z"], saved["m"], saved["mean_q"]
    C = F.shape[2]
    full = torch.div(lengths, B, rounding_mode="floor")  # completed chunks per sequence
    cur = full.clamp(max=C - 1)  # the current (partial) chunk; ignored if empty
    has_partial = (lengths % B) > 0

    def pick(x):  # (b, h, C, ...) -> (b, h, ...) at chunk cur[b], zero where no partial chunk
        idx = cur.view(b, 1, 1, *([1] * (x.dim() - 3))).expand(-1, x.shape[1], 1, *x.shape[3:])
        got = x.gather(2, idx).squeeze(2)
        return torch.where(has_partial.view(b, *([1] * (got.dim() - 1))), got, torch.zeros_like(got))

    st.F_cur, st.z_cur = pick(F), pick(z)
    st.mk_sum = pick((mk.view(b, hkv, C, B, -1) * m).sum(-2))
    st.mq_sum = pick((mq.view(b, hq, C, B, -1) * m).sum(-2))
    prev = (full - 1).clamp(min=0).view(b, 1, 1, 1).expand(-1, hq, 1, mean_q.shape[-1])
    st.r_cur = torch.where((full > 0).view(b, 1, 1), mean_q.gather(2, prev).squeeze(2), torch.zeros_like(st.r_cur))
    done = (torch.arange(C, device=F.device)[None, :] < full[:, None]).view(b, 1, C)
    st.F_past = F * done[..., None, None].to(F.dtype)
    st.z_past = z * done[..., None].to(z.dtype)
    st.h_past = saved["h_meta"] * done[..., None].to(F.dtype)
    st.w_cur = st.w_cur.new_zeros(b, hq, C)
    if options.retrieval_blocks:
        krb, vb = kr.view(b, hkv, C, B, -1), v.view(b, hkv, C, B, -1)
        st.kr_cur = pick(krb)
        st.kr_past = krb * done[..., None, None].to(kr.dtype)
        st.v_past = vb * done[..., None, None].to(v.dtype)
        ring = own_ring_chunks(options)
        if ring:  # the own-position ring: slot j holds the last completed chunk c with c mod ring = j
            kb = k.view(b, hkv, C, B, -1)
            j = torch.arange(min(C, ring), device=k.device)[None, :]
            c_j = j + ring * torch.div(full[:, None] - 1 - j, ring, rounding_mode="floor")  # (b, slots)
            got = kb.gather(2, c_j.clamp(min=0).view(b, 1, -1, 1, 1).expand(-1, hkv, -1, B, kb.shape[-1]))
            st.k_past = got * (c_j >= 0).view(b, 1, -1, 1, 1).to(k.dtype)
    else:
        for name in ("kr_past", "v_past"):
            t = getattr(st, name)
            setattr(st, name, t.new_zeros(t.shape[:2] + (C,) + t.shape[3:]))
    refresh_retrieval(st, full > 0)
