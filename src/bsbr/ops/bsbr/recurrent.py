"""Streaming BSBR attention: token by token from an explicit state.

Per token: one softmax over the window's keys, the sinks and the tokens of its K selected chunks
(O((L + K) B d)), block scores against every key before the window (O(t d): one q.k per key, no
softmax, no values) and one read-out of the chunk states (O(d^2)). When a chunk completes, its state
and far keys are stored and the next chunk's state weights are computed once (O(C d^2)).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .inputs import check_inputs
from .masks import exact_window, sink_outside_window
from .options import BSBROptions
from .retrieval import apply_meta, block_scores, combine, gate_closed, gate_per_head, select_blocks
from .recall import cache_scores, recall_update
from .state import BSBRState, ensure_capacity, refresh_retrieval


def bsbr_attention_step(q, k, v, mq, mk, state: Optional[BSBRState], options: BSBROptions, *, fq=None, fk=None,
                        qr=None, kr=None, gate=None, meta_q=None, meta_k=None, valid=None):
    """One token per sequence: q (b, hq, d), k (b, hkv, d), ...; valid (b,) (False = padding: the
    state is left unchanged and the output is 0). Returns ``(o (b, hq, dv), state)``; the state is
    updated in place when autograd is off (and created if None)."""
    fq, fk, qr, kr = (x if y is None else y for x, y in ((q, fq), (k, fk), (q, qr), (k, kr)))
    a = check_inputs(q, k, v, mq, mk, fq, fk, qr, kr, gate, valid, meta_q, meta_k, token_dim=3)
    if state is None:
        state = BSBRState.empty(a, options, q)
    else:
        state.check_options(options)
    valid = None if valid is None else valid.bool()
    return _step(q, k, v, mq, mk, fq, fk, qr, kr, state, gate, meta_q, meta_k, valid), state


def _write(state, slot, rows, named, inplace):
    """Write each x (b, h, d) of ``named`` ((name, x), ...) into ``state.name`` (b, h, slots, d) at
    slot (b,) for the sequences in rows (b,) (None: all)."""
    if inplace and rows is None:
        b = torch.arange(slot.shape[0], device=slot.device)
        for name, x in named:
            getattr(state, name)[b, :, slot] = x
        return
    if rows is None:
        rows = torch.ones_like(slot, dtype=torch.bool)
    if inplace:
        r = rows.nonzero()[:, 0]
        if r.numel() == 0:
            return
        everyone = r.numel() == rows.numel()
        s = slot if everyone else slot[r]
        for name, x in named:
            getattr(state, name)[r, :, s] = x if everyone else x[r]
        return
    for name, x in named:
        buf = getattr(state, name)
        at = ((torch.arange(buf.shape[2], device=x.device)[None, :] == slot[:, None]) & rows[:, None])
        setattr(state, name, torch.where(at.view(x.shape[0], 1, -1, 1), x.unsqueeze(2), buf))


def _step(q, k, v, mq, mk, fq, fk, qr, kr, state: BSBRState, gate, meta_q, meta_k, valid):
    """The step on checked inputs."""
    opt = state.options
    b, hq, d = q.shape
    hkv, B = k.shape[1], opt.chunk_size
    scale = 1.0 / math.sqrt(d) if opt.scale is None else opt.scale
    inplace = not torch.is_grad_enabled()  # no copy of the buffers per token when nothing needs gradients
    t = state.n_seen  # index of this token
    _write_token(state, k, v, kr, fk, valid, inplace)

    # the exact softmax: window (q.k), sinks outside it and selected blocks or the recall cache (qr.kr),
    # one normalisation; a K/V head's g query heads are the rows of one matmul per part
    qg, qrg = q.view(b, hkv, hq // hkv, d), qr.view(b, hkv, hq // hkv, d)
    scores, values = _window_and_sinks(qg, qrg, state)
    read = not gate_closed(gate)  # a closed gate: the states are kept, not read
    num = den = None
    if opt.recall_tokens:
        num, den = _recall_read(qrg, fq, state, scores, values, read)
    else:
        if read:
            num = torch.einsum("bhf,bhfv->bhv", fq, state.S_cur)
            den = torch.einsum("bhf,bhf->bh", fq, state.zS_cur) if opt.retrieval == "normalized" else None
        if opt.retrieval_blocks and state.kr_past.shape[2]:
            num, den = _read_blocks(qrg, fq, state, scores, values, num, den)
    p = torch.softmax(torch.cat(scores, dim=-1) * scale, dim=-1)  # (b, hkv, g, keys)
    o, at = None, 0
    for x in values:  # (b, hkv, X, dv): each part's probabilities times its values
        o_x = p[..., at:at + x.shape[2]] @ x
        o, at = (o_x if o is None else o + o_x), at + x.shape[2]
    o = o.reshape(b, hq, -1)
    if num is not None:
        o = combine(o.unsqueeze(2), num.unsqueeze(2), None if den is None else den.unsqueeze(2),
                    gate_per_head(gate, hq, q), opt.retrieval).squeeze(2)
    if valid is not None:  # padding: output 0, state unchanged
        vm = valid.view(b, 1, 1).to(o.dtype)
        o, fk, mk, mq = o * vm, fk * vm, mk * vm, mq * vm
    if not opt.recall_tokens:
        _add_to_chunk(state, fk, v, mk, mq, inplace)
    state.n_seen = state.n_seen + (1 if valid is None else valid.long())
    done = t % B == B - 1
    done = done if valid is None else valid & done
    if bool(done.any()):
        if opt.recall_tokens:
            _recall_complete_chunk(state, done)
        else:
            _complete_chunk(state, done, meta_q, meta_k)
    return o


def _write_token(state, k, v, kr, fk, valid, inplace):
    """Store this token where later tokens read it: the window ring, the sinks, the current block."""
    opt = state.options
    t, W, S = state.n_seen, opt.window, opt.sink_tokens
    ring = [("k_buf", k), ("v_buf", v)] + ([("kr_ring", kr), ("fk_ring", fk)] if opt.recall_tokens else [])
    _write(state, t % W, valid, ring, inplace)
    if S:
        first = t < S
        _write(state, t.clamp(max=S - 1), first if valid is None else valid & first, [("k_sink", kr), ("v_sink", v)],
               inplace)
    if opt.retrieval_blocks:
        _write(state, t % opt.chunk_size, valid, [("kr_cur", kr), ("v_cur", v)], inplace)


_MASKS: dict = {}  # the last step's masks: every layer of a model steps at the same positions


def _step_masks(state, device):
    """What this step's token may read, a function of the options and positions only (so computed
    once per step for all layers): the window's ring slots (b, 1, 1, W), the sinks outside the window
    (b, 1, 1, S), and with blocks the candidate chunks (b, P), their largest count and the last chunk
    before each window (b,)."""
    opt = state.options
    P = state.kr_past.shape[2]
    key = (opt, P, device, tuple(state.n_seen.tolist()))
    m = _MASKS.get(key)
    if m is not None:
        return m
    B, L, S, W = opt.chunk_size, opt.local_chunks, opt.sink_tokens, opt.window
    b = state.n_seen.shape[0]
    tt = state.n_seen.view(b, 1)
    ring = tt - torch.remainder(tt - torch.arange(W, device=device).view(1, W), W)  # token in each slot
    m = dict(window=exact_window(tt, ring, B, L, 0).view(b, 1, 1, W),
             sinks=sink_outside_window(tt, torch.arange(S, device=device).view(1, S), B, L).view(b, 1, 1, S))
    if opt.retrieval_blocks:
        chunks = torch.arange(P, device=device)
        last = torch.div(state.n_seen, B, rounding_mode="floor") - L  # the last chunk before the window
        candidate = (chunks[None, :] <= last[:, None]) & ((chunks + 1) * B > S)  # and holding a non-sink token
        m.update(candidate=candidate, n_cand=int(candidate.sum(-1).max()) if P else 0,
                 last=int(last.max()) if b else -1)
        if 0 < m["n_cand"] <= opt.retrieval_blocks:  # every candidate is read: its chunks' non-sink tokens
            U = m["last"] + 1
            tok = torch.arange(U * B, device=device)
            m["dense"] = (candidate[:, :U].repeat_interleave(B, dim=1) & (tok >= S)).view(b, 1, 1, U * B)
    _MASKS.clear()
    _MASKS[key] = m
    return m


def _window_and_sinks(qg, qrg, state):
    """Unscaled scores (b, hkv, g, keys) and values (b, hkv, keys, dv) of the window and of the sinks
    outside it."""
    m = _step_masks(state, qg.device)
    scores = [(qg @ state.k_buf.transpose(-1, -2)).masked_fill(~m["window"], float("-inf"))]
    values = [state.v_buf]
    if state.options.sink_tokens:
        scores.append((qrg @ state.k_sink.transpose(-1, -2)).masked_fill(~m["sinks"], float("-inf")))
        values.append(state.v_sink)
    return scores, values


def _read_blocks(qrg, fq, state, scores, values, num, den):
    """Append the selected blocks' scores and values; return num/den without their chunk states.

    The blocks some query head of a K/V head selected (their union, at most g K) are read once for
    all g heads, each head's scores masked to its own selection. When K covers every candidate, or the
    union is at least half of the chunks before the window, those chunks are read where they lie;
    otherwise the union is gathered, B keys per block."""
    opt = state.options
    b, hkv, g, d = qrg.shape
    B, S, K, P = opt.chunk_size, opt.sink_tokens, opt.retrieval_blocks, state.kr_past.shape[2]
    m = _step_masks(state, qrg.device)
    candidate, n_cand = m["candidate"], m["n_cand"]
    if n_cand == 0:
        return num, den
    if n_cand <= K:  # every candidate is selected: read chunks 0 .. U - 1 where they lie
        U = m["last"] + 1
        idx = torch.arange(U, device=qrg.device).expand(b, hkv, U)
        mine = candidate[:, :U].view(b, 1, 1, U).expand(b, hkv, g, U)  # (b, hkv, g, U) each head's blocks

        def blocks(x):  # (b, hkv, P, ...) -> (b, hkv, U, ...), a view
            return x[:, :, :U]
        readable = m["dense"]  # (b, 1, 1, U * B)
        s_b = (qrg.unsqueeze(2) @ blocks(state.kr_past)).transpose(2, 3).reshape(b, hkv, g, U * B)
    else:
        span = m["last"] + 1  # chunks 0 .. last hold every candidate
        # without autograd the score pass keeps every q.k (b, hkv, span, g, B), and the selected blocks'
        # scores are taken from it instead of reading their keys again (block scores carry no gradient)
        reuse = not torch.is_grad_enabled()
        bs, qk = block_scores(qrg, state.kr_past[:, :, :span], S, keep=True) if reuse else \
            (block_scores(qrg, state.kr_past[:, :, :span], S), None)  # (b, hkv, g, span)
        sel = select_blocks(bs, candidate[:, :span].view(b, 1, 1, span), K)  # (b, hkv, g, K)
        picked = torch.zeros(b, hkv, g, P, dtype=torch.bool, device=qrg.device).scatter_(-1, sel.clamp(min=0), sel >= 0)
        union = picked.any(2)  # (b, hkv, P)
        U = int(union.sum(-1).max())
        if 2 * U >= span:  # the heads chose most candidates: read chunks 0 .. span - 1 where they lie
            U = span
            idx = torch.arange(U, device=qrg.device).expand(b, hkv, U)

            def blocks(x):  # a view
                return x[:, :, :U]
        else:
            idx = torch.sort(union.to(torch.int8), dim=-1, descending=True, stable=True).indices[..., :U]
            rows = (idx + P * torch.arange(b * hkv, device=idx.device).view(b, hkv, 1)).reshape(-1)

            def blocks(x):  # (b, hkv, P, ...) -> (b, hkv, U, ...) at idx: one copy per block
                return x.reshape(b * hkv * P, -1).index_select(0, rows).view(b, hkv, U, *x.shape[3:])
            if reuse:
                qk = qk.reshape(b * hkv * span, -1).index_select(0, (rows // P) * span + rows % P)
        if reuse:
            s_b = qk.view(b, hkv, U, g, B).transpose(2, 3).reshape(b, hkv, g, U * B)
        else:
            s_b = (qrg.unsqueeze(2) @ blocks(state.kr_past)).transpose(2, 3).reshape(b, hkv, g, U * B)
        mine = picked.gather(-1, idx.unsqueeze(2).expand(b, hkv, g, U))
        readable = mine.unsqueeze(-1) & (idx * B).unsqueeze(2).unsqueeze(-1).ge(S - torch.arange(B, device=idx.device))
        readable = readable.reshape(b, hkv, g, U * B)
    scores.append(s_b.masked_fill(~readable, float("-inf")))
    vb = blocks(state.v_past).reshape(b, hkv, U * B, -1)
    values.append(vb)
    if num is None:
        return num, den
    # the selected chunks leave the chunk-state term
    w = state.w_cur.view(b, hkv, g, -1).gather(-1, idx.unsqueeze(2).expand(b, hkv, g, U)) * mine
    fqg = fq.view(b, hkv, g, -1)
    num = num - torch.einsum("bkgu,bkgf,bkufv->bkgv", w, fqg, blocks(state.F_past)).reshape(num.shape)
    if den is not None:
        den = den - torch.einsum("bkgu,bkgf,bkuf->bkg", w, fqg, blocks(state.z_past)).reshape(den.shape)
    return num, den


def _recall_read(qrg, fq, state, scores, values, read):
    """Append the recall cache's scores and values; return the read-out of the state of the other
    left-window tokens (num (b, hq, dv), den (b, hq) or None; both None unless ``read``)."""
    b, hkv, g = qrg.shape[:3]
    cache = state.recall()
    scores.append(cache_scores(qrg, cache.kr, cache.on, 1.0))
    values.append(cache.v)
    if not read:
        return None, None
    fqg = fq.view(b, hkv, g, -1)
    num = (fqg @ cache.F).reshape(b, hkv * g, -1)
    den = (fqg @ cache.z.unsqueeze(-1)).reshape(b, hkv * g) if state.options.retrieval == "normalized" else None
    return num, den


def _add_to_chunk(state, fk, v, mk, mq, inplace):
    """Running sums of the current chunk (inputs already zero for padding)."""
    if inplace:
        state.F_cur += fk.unsqueeze(-1) * v.unsqueeze(-2)
        state.z_cur += fk
        state.mk_sum += mk
        state.mq_sum += mq
    else:
        state.F_cur = state.F_cur + fk.unsqueeze(-1) * v.unsqueeze(-2)
        state.z_cur = state.z_cur + fk
        state.mk_sum = state.mk_sum + mk
        state.mq_sum = state.mq_sum + mq


def _recall_complete_chunk(state: BSBRState, done: torch.Tensor) -> None:
    """A chunk completed: the chunk L chunks back (the ring's oldest) leaves the window and the recall
    cache is updated from it, for the sequences in ``done`` that have one."""
    opt = state.options
    B, L, W = opt.chunk_size, opt.local_chunks, opt.window
    e = torch.div(state.n_seen, B, rounding_mode="floor") - L  # the chunk leaving (n_seen: next token)
    pos = e[:, None] * B + torch.arange(B, device=e.device)[None, :]  # (b, B)
    slot = pos.clamp(min=0) % W

    def tokens(x):  # (b, hkv, W, d) -> (b, hkv, B, d) at the leaving chunk's slots
        return x.gather(2, slot[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[-1]))

    real = pos >= 0
    state.set_recall(recall_update(state.recall(), tokens(state.kr_ring), tokens(state.v_buf), tokens(state.fk_ring),
                                   pos, real, real & (pos >= opt.sink_tokens), done & (e >= 0), opt.retrieval))


def _complete_chunk(state: BSBRState, done: torch.Tensor, meta_q, meta_k) -> None:
    """Store the chunk that just completed (for the sequences in ``done``) and start the next one."""
    opt = state.options
    b, B = done.shape[0], opt.chunk_size
    c = torch.div(state.n_seen - 1, B, rounding_mode="floor")  # index of the completed chunk
    ensure_capacity(state, int(c[done].max()) + 1)
    P = state.F_past.shape[2]
    at = ((torch.arange(P, device=c.device)[None, :] == c[:, None]) & done[:, None]).view(b, 1, P)

    def put(name, x):  # x (b, h, ...) into state.name (b, h, P, ...) at chunk c for done sequences
        past = getattr(state, name)
        setattr(state, name, torch.where(at.view(b, 1, P, *([1] * (past.dim() - 3))), x.unsqueeze(2), past))

    put("F_past", state.F_cur)
    put("z_past", state.z_cur)
    put("h_past", apply_meta(meta_k, (state.mk_sum / B).unsqueeze(2)).squeeze(2))
    if opt.retrieval_blocks:
        put("kr_past", state.kr_cur.transpose(-1, -2))
        put("v_past", state.v_cur)
    d1 = done.view(b, 1, 1)
    state.r_cur = torch.where(d1, apply_meta(meta_q, (state.mq_sum / B).unsqueeze(2)).squeeze(2), state.r_cur)
    state.F_cur = torch.where(d1.unsqueeze(-1), torch.zeros_like(state.F_cur), state.F_cur)
    for name in ("z_cur", "mk_sum", "mq_sum"):
        setattr(state, name, torch.where(d1, torch.zeros_like(getattr(state, name)), getattr(state, name)))
    refresh_retrieval(state, done)


def recurrent_bsbr_attention(q, k, v, mq, mk, options: BSBROptions, *, fq=None, fk=None, qr=None, kr=None,
                             gate=None, meta_q=None, meta_k=None, valid=None, initial_state: Optional[BSBRState] = None,
                             output_final_state: bool = False):
    """Same arguments and meaning as :func:`bsbr.ops.chunk_bsbr_attention`, computed token by token
    from ``initial_state`` (or an empty one). Returns ``(o, state)``."""
    fq, fk, qr, kr = (x if y is None else y for x, y in ((q, fq), (k, fk), (q, qr), (k, kr)))
    a = check_inputs(q, k, v, mq, mk, fq, fk, qr, kr, gate, valid, meta_q, meta_k)
    state = initial_state
    if state is None:
        state = BSBRState.empty(a, options, q)
    else:
        state.check_options(options)
    outs = [_step(*(x[:, :, i] for x in (q, k, v, mq, mk, fq, fk, qr, kr)), state, gate, meta_q, meta_k,
                  None if valid is None else valid[:, i].bool()) for i in range(a.seq_len)]
    o = torch.stack(outs, dim=2) if outs else q.new_zeros(a.batch, a.q_heads, 0, a.value_dim)
    return o, (state if output_final_state else None)
