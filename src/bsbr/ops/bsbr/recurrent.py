"""Streaming BSBR attention: token by token from an explicit state.

Per-token cost is O(B d + d^2) whatever the context length: attention over the current chunk's keys,
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
):
    """One token per sequence. q: (b, hq, d), k: (b, hkv, d), ...; valid: (b,) (False = padding:
    the state is left unchanged and the output is 0). Returns ``(o (b, hq, dv), state)``; the state
    is updated in place (and created if None)."""
    fq = q if fq is None else fq
    fk = k if fk is None else fk
    check_options(chunk_size, variant, top_k)
    a = check_inputs(q, k, v, mq, mk, fq, fk, gate, valid, token_dim=3, meta_q_map=meta_q_map,
                     meta_k_map=meta_k_map, mass_power=mass_power)
    if state is None:
        state = BSBRState.empty(a, chunk_size, q)
    elif state.chunk_size != chunk_size:
        raise ValueError(f"state was built with chunk_size={state.chunk_size}, got chunk_size={chunk_size}")
    o = _step(q, k, v, mq, mk, fq, fk, state, chunk_size, variant, gate, top_k, valid, scale, meta_q_map, meta_k_map,
              mass_power)
    return o, state


def _step(q, k, v, mq, mk, fq, fk, state, chunk_size, variant, gate, top_k, valid, scale, meta_q_map, meta_k_map,
          mass_power=None):
    """The step without argument checks (validated once per sequence by the callers)."""
    b, hq, d = q.shape
    hkv, B = k.shape[1], chunk_size
    g = hq // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    valid = torch.ones(b, dtype=torch.bool, device=q.device) if valid is None else valid.bool()
    vb1 = valid.view(b, 1, 1)
    # without autograd, update the state in place (no copy of the chunk buffers per token)
    inplace = not torch.is_grad_enabled()

    j = state.n_seen % B  # slot of this token inside its chunk
    if inplace:
        rows = valid.nonzero()[:, 0]
        state.k_buf[rows, :, j[rows]] = k[rows]
        state.v_buf[rows, :, j[rows]] = v[rows]
    else:
        slot = (torch.arange(B, device=q.device)[None, :] == j[:, None]) & valid[:, None]  # (b, B)
        s4 = slot.view(b, 1, B, 1)
        state.k_buf = torch.where(s4, k.unsqueeze(2), state.k_buf)
        state.v_buf = torch.where(s4, v.unsqueeze(2), state.v_buf)

    # local causal softmax over the chunk so far (slots 0..j)
    seen = torch.arange(B, device=q.device)[None, :] <= j[:, None]  # (b, B)
    s = torch.einsum("bkgd,bkjd->bkgj", q.view(b, hkv, g, -1), state.k_buf) * scale
    s = s.masked_fill(~seen.view(b, 1, 1, B), float("-inf"))
    o_local = torch.einsum("bkgj,bkjv->bkgv", torch.softmax(s, dim=-1), state.v_buf).reshape(b, hq, -1)

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
):
    """Same signature and meaning as :func:`bsbr.ops.chunk_bsbr_attention`, computed token by token
    from ``initial_state`` (or an empty one). Returns ``(o, state)``."""
    fq = q if fq is None else fq
    fk = k if fk is None else fk
    check_options(chunk_size, variant, top_k)
    a = check_inputs(q, k, v, mq, mk, fq, fk, gate, valid, meta_q_map=meta_q_map, meta_k_map=meta_k_map,
                     mass_power=mass_power)
    state = initial_state
    if state is None:
        state = BSBRState.empty(a, chunk_size, q)
    elif state.chunk_size != chunk_size:
        raise ValueError(f"state was built with chunk_size={state.chunk_size}, got chunk_size={chunk_size}")
    outs = []
    for t in range(a.seq_len):
        outs.append(_step(q[:, :, t], k[:, :, t], v[:, :, t], mq[:, :, t], mk[:, :, t], fq[:, :, t], fk[:, :, t],
                          state, chunk_size, variant, gate, top_k, None if valid is None else valid[:, t], scale,
                          meta_q_map, meta_k_map, mass_power))
    o = torch.stack(outs, dim=2) if outs else q.new_zeros(a.batch, a.q_heads, 0, a.value_dim)
    return o, (state if output_final_state else None)
