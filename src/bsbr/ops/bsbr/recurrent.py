"""Streaming BSBR attention: token by token from an explicit state.

Per-token cost is O(L B d + d^2) whatever the context length: attention over the exact window's keys
(the current chunk, ``local_chunks - 1`` before it and the sink tokens),
plus one read-out of the state the chunk retrieved when it began. When a chunk completes, its
state is appended to the past and the next chunk's retrieval is computed once (O(C d^2)).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .utils import (
    BSBRState,
    apply_map,
    check_inputs,
    check_options,
    combine,
    ensure_capacity,
    exact_window,
    sink_slot_visible,
    gate_per_head,
    local_log_mass,
    refresh_retrieval,
)


def bsbr_attention_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mq: torch.Tensor,
    mk: torch.Tensor,
    state: Optional[BSBRState],
    *,
    chunk_size: int,
    fq: Optional[torch.Tensor] = None,
    fk: Optional[torch.Tensor] = None,
    variant: str = "additive",
    gate: Optional[torch.Tensor] = None,
    top_k: Optional[int] = None,
    valid: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    meta_q_map=None,
    meta_k_map=None,
    mass_power: Optional[torch.Tensor] = None,
    local_chunks: int = 1,
    sink_tokens: int = 0,
):
    """One token per sequence. q: (b, hq, d), k: (b, hkv, d), ...; valid: (b,) (False = padding:
    the state is left unchanged and the output is 0). Returns ``(o (b, hq, dv), state)``; the state
    is updated in place (and created if None)."""
    fq = q if fq is None else fq
    fk = k if fk is None else fk
    check_options(chunk_size, variant, top_k, local_chunks, sink_tokens)
    a = check_inputs(q, k, v, mq, mk, fq, fk, gate, valid, token_dim=3, meta_q_map=meta_q_map,
                     meta_k_map=meta_k_map, mass_power=mass_power)
    if state is None:
        state = BSBRState.empty(a, chunk_size, q, local_chunks, sink_tokens)
    else:
        state.check_sizes(chunk_size=chunk_size, local_chunks=local_chunks, sink_tokens=sink_tokens)
    o = _step(q, k, v, mq, mk, fq, fk, state, chunk_size, variant, gate, top_k, valid, scale, meta_q_map, meta_k_map,
              mass_power)
    return o, state


def _step(q, k, v, mq, mk, fq, fk, state, chunk_size, variant, gate, top_k, valid, scale, meta_q_map, meta_k_map,
          mass_power=None):
    """The step without argument checks (validated once per sequence by the callers). The exact
    window's sizes come from the state."""
    b, hq, d = q.shape
    hkv, B = k.shape[1], chunk_size
    L, S = state.local_chunks, state.sink_tokens
    W = L * B
    g = hq // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    valid = torch.ones(b, dtype=torch.bool, device=q.device) if valid is None else valid.bool()
    vb1 = valid.view(b, 1, 1)
    # without autograd, update the state in place (no copy of the chunk buffers per token)
    inplace = not torch.is_grad_enabled()

    t = state.n_seen  # index of this token
    j = t % B  # its slot inside its chunk
    _write_slot(state, "k_buf", "v_buf", t % W, valid, k, v, inplace)
    if S:
        _write_slot(state, "k_sink", "v_sink", t.clamp(max=S - 1), valid & (t < S), k, v, inplace)

    # local causal softmax over the exact window: the sinks, then the ring of the last W tokens
    tt = t.view(b, 1)
    ring_idx = tt - torch.remainder(tt - torch.arange(W, device=q.device).view(1, W), W)  # token in each slot
    seen = exact_window(tt, ring_idx, B, L, 0)  # (b, W)
    keys, values = state.k_buf, state.v_buf
    if S:
        seen = torch.cat([sink_slot_visible(tt, torch.arange(S, device=q.device).view(1, S), B, L), seen], dim=1)
        keys, values = torch.cat([state.k_sink, keys], dim=2), torch.cat([state.v_sink, values], dim=2)
    s = torch.einsum("bkgd,bkjd->bkgj", q.view(b, hkv, g, -1), keys) * scale
    s = s.masked_fill(~seen.view(b, 1, 1, -1), float("-inf"))
    o_local = torch.einsum("bkgj,bkjv->bkgv", torch.softmax(s, dim=-1), values).reshape(b, hq, -1)

    # read-out of what this chunk retrieved when it began
    num = torch.einsum("bhf,bhfv->bhv", fq, state.S_cur)
    den = torch.einsum("bhf,bhf->bh", fq, state.zS_cur) if variant == "normalized" else None
    log_mass = None if mass_power is None else local_log_mass(s).reshape(b, hq, 1)
    o = combine(o_local.unsqueeze(2), num.unsqueeze(2), None if den is None else den.unsqueeze(2),
                gate_per_head(gate, hq, q), variant, log_mass, mass_power).squeeze(2)
    vm = vb1.to(o.dtype)  # padding: output 0, state unchanged
    o = o * vm

    # update the running sums of the current chunk
    if inplace:
        state.F_cur += (fk * vm).unsqueeze(-1) * v.unsqueeze(-2)
        state.z_cur += fk * vm
        state.mk_sum += mk * vm
        state.mq_sum += mq * vm
    else:
        state.F_cur = torch.where(vb1.unsqueeze(-1), state.F_cur + fk.unsqueeze(-1) * v.unsqueeze(-2), state.F_cur)
        state.z_cur = torch.where(vb1, state.z_cur + fk, state.z_cur)
        state.mk_sum = torch.where(vb1, state.mk_sum + mk, state.mk_sum)
        state.mq_sum = torch.where(vb1, state.mq_sum + mq, state.mq_sum)
    state.n_seen = state.n_seen + valid.long()

    done = valid & (j == B - 1)  # sequences whose chunk just completed
    if bool(done.any()):
        c = torch.div(state.n_seen - 1, B, rounding_mode="floor")  # index of the completed chunk
        ensure_capacity(state, int(c[done].max()) + 1)
        P = state.F_past.shape[2]
        at = (torch.arange(P, device=q.device)[None, :] == c[:, None]) & done[:, None]  # (b, P)
        at3 = at.view(b, 1, P, 1)
        state.F_past = torch.where(at3.unsqueeze(-1), state.F_cur.unsqueeze(2), state.F_past)
        state.z_past = torch.where(at3, state.z_cur.unsqueeze(2), state.z_past)
        h_new = apply_map(meta_k_map, (state.mk_sum / B).unsqueeze(2))  # (b, hkv, 1, dm)
        state.h_past = torch.where(at3, h_new, state.h_past)
        d1, d2 = done.view(b, 1, 1), done.view(b, 1, 1, 1)
        state.r_cur = torch.where(d1, apply_map(meta_q_map, (state.mq_sum / B).unsqueeze(2)).squeeze(2), state.r_cur)
        state.F_cur = torch.where(d2, torch.zeros_like(state.F_cur), state.F_cur)
        state.z_cur = torch.where(d1, torch.zeros_like(state.z_cur), state.z_cur)
        state.mk_sum = torch.where(d1, torch.zeros_like(state.mk_sum), state.mk_sum)
        state.mq_sum = torch.where(d1, torch.zeros_like(state.mq_sum), state.mq_sum)
        refresh_retrieval(state, done, top_k, variant)
    return o


def _write_slot(state, k_name, v_name, slot, rows, k, v, inplace):
    """Write this token's key/value into buffer slot ``slot`` (b,) for the sequences in ``rows`` (b,)."""
    kb, vb = getattr(state, k_name), getattr(state, v_name)
    if inplace:
        r = rows.nonzero()[:, 0]
        kb[r, :, slot[r]] = k[r]
        vb[r, :, slot[r]] = v[r]
        return
    at = ((torch.arange(kb.shape[2], device=k.device)[None, :] == slot[:, None]) & rows[:, None]).view(k.shape[0], 1, -1, 1)
    setattr(state, k_name, torch.where(at, k.unsqueeze(2), kb))
    setattr(state, v_name, torch.where(at, v.unsqueeze(2), vb))


def recurrent_bsbr_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mq: torch.Tensor,
    mk: torch.Tensor,
    *,
    chunk_size: int,
    fq: Optional[torch.Tensor] = None,
    fk: Optional[torch.Tensor] = None,
    variant: str = "additive",
    gate: Optional[torch.Tensor] = None,
    top_k: Optional[int] = None,
    valid: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    initial_state: Optional[BSBRState] = None,
    output_final_state: bool = False,
    meta_q_map=None,
    meta_k_map=None,
    mass_power: Optional[torch.Tensor] = None,
    local_chunks: int = 1,
    sink_tokens: int = 0,
):
    """Same signature and meaning as :func:`bsbr.ops.chunk_bsbr_attention`, computed token by token
    from ``initial_state`` (or an empty one). Returns ``(o, state)``."""
    fq = q if fq is None else fq
    fk = k if fk is None else fk
    check_options(chunk_size, variant, top_k, local_chunks, sink_tokens)
    a = check_inputs(q, k, v, mq, mk, fq, fk, gate, valid, meta_q_map=meta_q_map, meta_k_map=meta_k_map,
                     mass_power=mass_power)
    state = initial_state
    if state is None:
        state = BSBRState.empty(a, chunk_size, q, local_chunks, sink_tokens)
    else:
        state.check_sizes(chunk_size=chunk_size, local_chunks=local_chunks, sink_tokens=sink_tokens)
    outs = []
    for t in range(a.seq_len):
        outs.append(_step(q[:, :, t], k[:, :, t], v[:, :, t], mq[:, :, t], mk[:, :, t], fq[:, :, t], fk[:, :, t],
                          state, chunk_size, variant, gate, top_k, None if valid is None else valid[:, t], scale,
                          meta_q_map, meta_k_map, mass_power))
    o = torch.stack(outs, dim=2) if outs else q.new_zeros(a.batch, a.q_heads, 0, a.value_dim)
    return o, (state if output_final_state else None)
