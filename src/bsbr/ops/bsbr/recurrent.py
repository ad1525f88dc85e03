"""Streaming BSBR attention: token by token from an explicit state.

Per token: one softmax over the window's keys, the sinks and the tokens of its K selected chunks
(O((L + K) B d)), block scores against every completed chunk's bounds (O(C d)) and one read-out of the
chunk states (O(d^2)). When a chunk completes, its state, bounds and far keys are stored and the next
chunk's state weights are computed once (O(C d^2)).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .inputs import check_inputs
from .masks import exact_window, sink_outside_window
from .options import BSBROptions
from .retrieval import apply_meta, block_bounds, block_scores, combine, gate_per_head, select_blocks
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
    valid = torch.ones(a.batch, dtype=torch.bool, device=q.device) if valid is None else valid.bool()
    return _step(q, k, v, mq, mk, fq, fk, qr, kr, state, gate, meta_q, meta_k, valid), state


def _write(state, name, slot, rows, x, inplace):
    """Write x (b, h, d) into ``state.name`` (b, h, slots, d) at slot (b,) for the sequences in rows (b,)."""
    buf = getattr(state, name)
    if inplace:
        r = rows.nonzero()[:, 0]
        buf[r, :, slot[r]] = x[r]
        return
    at = ((torch.arange(buf.shape[2], device=x.device)[None, :] == slot[:, None]) & rows[:, None])
    setattr(state, name, torch.where(at.view(x.shape[0], 1, -1, 1), x.unsqueeze(2), buf))


def _step(q, k, v, mq, mk, fq, fk, qr, kr, state: BSBRState, gate, meta_q, meta_k, valid):
    """The step on checked inputs."""
    opt = state.options
    b, hq, d = q.shape
    hkv, B, L, S, K = k.shape[1], opt.chunk_size, opt.local_chunks, opt.sink_tokens, opt.retrieval_blocks
    W, g = opt.window, hq // hkv
    scale = 1.0 / math.sqrt(d) if opt.scale is None else opt.scale
    inplace = not torch.is_grad_enabled()  # no copy of the buffers per token when nothing needs gradients
    t = state.n_seen  # index of this token
    j = t % B  # its slot in its chunk
    _write(state, "k_buf", t % W, valid, k, inplace)
    _write(state, "v_buf", t % W, valid, v, inplace)
    if S:
        _write(state, "k_sink", t.clamp(max=S - 1), valid & (t < S), kr, inplace)
        _write(state, "v_sink", t.clamp(max=S - 1), valid & (t < S), v, inplace)
    if K:
        _write(state, "kr_cur", j, valid, kr, inplace)
        _write(state, "v_cur", j, valid, v, inplace)

    # the exact softmax: window (q.k), sinks outside it and selected blocks (qr.kr), one normalisation
    tt = t.view(b, 1)
    ring = tt - torch.remainder(tt - torch.arange(W, device=q.device).view(1, W), W)  # token in each slot
    qg, qrg = q.view(b, hkv, g, 1, d), qr.view(b, hkv, g, 1, d)
    scores = [(qg @ state.k_buf.unsqueeze(2).transpose(-1, -2)).masked_fill(
        ~exact_window(tt, ring, B, L, 0).view(b, 1, 1, 1, W), float("-inf"))]
    values = [state.v_buf.unsqueeze(2).expand(-1, -1, g, -1, -1)]
    if S:
        seen = sink_outside_window(tt, torch.arange(S, device=q.device).view(1, S), B, L)
        scores.append((qrg @ state.k_sink.unsqueeze(2).transpose(-1, -2)).masked_fill(
            ~seen.view(b, 1, 1, 1, S), float("-inf")))
        values.append(state.v_sink.unsqueeze(2).expand(-1, -1, g, -1, -1))
    num = torch.einsum("bhf,bhfv->bhv", fq, state.S_cur)
    den = torch.einsum("bhf,bhf->bh", fq, state.zS_cur) if opt.retrieval == "normalized" else None
    P = state.kmin_past.shape[2]
    if K and P:
        chunks = torch.arange(P, device=q.device)
        # before the window, and holding a token that is not a sink
        candidate = (chunks[None, :] <= (torch.div(t, B, rounding_mode="floor") - L)[:, None]) & ((chunks + 1) * B > S)
        bs = block_scores(qrg, state.kmin_past.unsqueeze(2), state.kmax_past.unsqueeze(2))  # (b, hkv, g, 1, P)
        sel = select_blocks(bs, candidate.view(b, 1, 1, 1, P), K)[:, :, :, 0]  # (b, hkv, g, K')
        Kp = sel.shape[-1]
        at = sel.clamp(min=0)
        kb = state.kr_past.unsqueeze(2).expand(-1, -1, g, -1, -1, -1).gather(
            3, at.view(b, hkv, g, Kp, 1, 1).expand(-1, -1, -1, -1, B, d))  # (b, hkv, g, K', B, d)
        vb = state.v_past.unsqueeze(2).expand(-1, -1, g, -1, -1, -1).gather(
            3, at.view(b, hkv, g, Kp, 1, 1).expand(-1, -1, -1, -1, B, state.v_past.shape[-1]))
        readable = (sel >= 0).unsqueeze(-1) & (at.unsqueeze(-1) * B + torch.arange(B, device=q.device) >= S)
        scores.append((qrg @ kb.reshape(b, hkv, g, Kp * B, d).transpose(-1, -2)).masked_fill(
            ~readable.reshape(b, hkv, g, 1, Kp * B), float("-inf")))
        values.append(vb.reshape(b, hkv, g, Kp * B, -1))
        # the selected chunks leave the chunk-state term
        w_sel = state.w_cur.view(b, hkv, g, -1).gather(-1, at) * (sel >= 0)  # (b, hkv, g, K')
        Fsel = state.F_past.unsqueeze(2).expand(-1, -1, g, -1, -1, -1).gather(
            3, at.view(b, hkv, g, Kp, 1, 1).expand(-1, -1, -1, -1, *state.F_past.shape[-2:]))
        fqg = fq.view(b, hkv, g, 1, -1)
        num = num - torch.einsum("bkgp,bkgf,bkgpfv->bkgv", w_sel, fqg[:, :, :, 0], Fsel).reshape(b, hq, -1)
        if den is not None:
            zsel = state.z_past.unsqueeze(2).expand(-1, -1, g, -1, -1).gather(
                3, at.view(b, hkv, g, Kp, 1).expand(-1, -1, -1, -1, state.z_past.shape[-1]))
            den = den - torch.einsum("bkgp,bkgf,bkgpf->bkg", w_sel, fqg[:, :, :, 0], zsel).reshape(b, hq)
    s = torch.cat(scores, dim=-1) * scale
    o_exact = (torch.softmax(s, dim=-1) @ torch.cat(values, dim=-2)).reshape(b, hq, -1)
    o = combine(o_exact.unsqueeze(2), num.unsqueeze(2), None if den is None else den.unsqueeze(2),
                gate_per_head(gate, hq, q), opt.retrieval).squeeze(2)
    vm = valid.view(b, 1, 1).to(o.dtype)  # padding: output 0, state unchanged
    o = o * vm

    # running sums of the current chunk
    if inplace:
        state.F_cur += (fk * vm).unsqueeze(-1) * v.unsqueeze(-2)
        state.z_cur += fk * vm
        state.mk_sum += mk * vm
        state.mq_sum += mq * vm
    else:
        state.F_cur = state.F_cur + (fk * vm).unsqueeze(-1) * v.unsqueeze(-2)
        state.z_cur = state.z_cur + fk * vm
        state.mk_sum = state.mk_sum + mk * vm
        state.mq_sum = state.mq_sum + mq * vm
    state.n_seen = state.n_seen + valid.long()
    done = valid & (j == B - 1)
    if bool(done.any()):
        _complete_chunk(state, done, meta_q, meta_k)
    return o


def _complete_chunk(state: BSBRState, done: torch.Tensor, meta_q, meta_k) -> None:
    """Store the chunk that just completed (for the sequences in ``done``) and start the next one."""
    opt = state.options
    b, B, S = done.shape[0], opt.chunk_size, opt.sink_tokens
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
        keep = c[:, None] * B + torch.arange(B, device=c.device)[None, :] >= S  # (b, B): not a sink
        kmin, kmax = block_bounds(state.kr_cur, keep.view(b, 1, B))
        put("kr_past", state.kr_cur)
        put("v_past", state.v_cur)
        put("kmin_past", kmin)
        put("kmax_past", kmax)
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
    ones = torch.ones(a.batch, dtype=torch.bool, device=q.device)
    outs = [_step(*(x[:, :, i] for x in (q, k, v, mq, mk, fq, fk, qr, kr)), state, gate, meta_q, meta_k,
                  ones if valid is None else valid[:, i].bool()) for i in range(a.seq_len)]
    o = torch.stack(outs, dim=2) if outs else q.new_zeros(a.batch, a.q_heads, 0, a.value_dim)
    return o, (state if output_final_state else None)
