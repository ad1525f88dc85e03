"""Chunked BSBR attention: the default forward. No n x n tensor exists anywhere.

Cost per head: within-chunk SDPA O(n B d), chunk states O(n d^2), retrieval weights O(C^2 d),
retrieved states O(C^2 d^2) dense or O(C k d^2) with top-k, read-out O(n d^2).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F_

from .utils import (
    BSBRState,
    apply_map,
    check_inputs,
    check_options,
    combine,
    exact_window,
    gate_per_head,
    sink_slot_visible,
    local_log_mass,
    refresh_retrieval,
    retrieval_weights,
)


def _compact(valid: torch.Tensor):
    """Index that moves each sequence's real tokens to the front (stable), and their counts."""
    order = torch.sort((~valid).to(torch.int8), dim=1, stable=True).indices  # (b, n)
    return order, valid.sum(1)


def _gather_tokens(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    # x: (b, h, n, d); order: (b, n)
    return x.gather(2, order[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[3]))


def _batch_merges(x: torch.Tensor) -> bool:
    """True if the leading (b, h, C) dims of x fold into one batch stride, so that ``torch.matmul``
    runs a single bmm on a view instead of first copying x to a contiguous tensor."""
    b_, h_, c_ = x.shape[:3]
    s0, s1, s2 = x.stride()[:3]
    return (b_ == 1 or s0 == h_ * s1) and (h_ == 1 or s1 == c_ * s2)


def _bmm5(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(b, h, C, M, K) @ (b, h, C, K, N) -> (b, h, C, M, N) without copying strided inputs.

    The layer hands over q/k/v as transposed views of (b, n, h, d) projections, whose (h, C) dims
    cannot be merged: ``torch.matmul`` would then copy both operands (a full pass over the tokens
    each, ~20-35 ms at 16k tokens on CPU). One bmm per (batch, head) over the C chunks reads the
    strided matrices in place (BLAS takes the row stride); each matrix product is the same BLAS
    call on the same numbers, so results are bit-identical. Under autograd (``out=`` has no
    gradient) or when nothing would be copied, plain matmul is used."""
    if (_batch_merges(x) and _batch_merges(y)) or x.shape[:3] != y.shape[:3] or (
        torch.is_grad_enabled() and (x.requires_grad or y.requires_grad)
    ):
        return x @ y
    b_, h_, c_, M, _ = x.shape
    out = torch.empty(b_, h_, c_, M, y.shape[-1], dtype=x.dtype, device=x.device)
    for i in range(b_):
        for j in range(h_):
            torch.bmm(x[i, j], y[i, j], out=out[i, j])
    return out


def chunk_bsbr_attention(
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
    output_final_state: bool = False,
    meta_q_map=None,
    meta_k_map=None,
    mass_power: Optional[torch.Tensor] = None,
    local_chunks: int = 1,
    sink_tokens: int = 0,
):
    """Block Sparse attention with Block Retrieval.

    Args:
        q: (b, hq, n, d) queries (positions already applied). k: (b, hkv, n, d), v: (b, hkv, n, dv);
            ``hq`` must be a multiple of ``hkv`` (grouped K/V heads).
        meta_q_map, meta_k_map: optional affine maps applied to the chunk means of mq / mk (then mq
            may have 1 head, e.g. raw hidden states); see :mod:`bsbr.ops.bsbr.utils`.
        mq: (b, hq, n, dm), mk: (b, hkv, n, dm) per-token meta-queries / meta-keys; reduced to one
            per chunk as described in :mod:`bsbr.ops.bsbr.utils`.
        chunk_size: tokens per chunk ``B``.
        fq, fk: (b, hq, n, df), (b, hkv, n, df) features for the chunk states; default ``q``, ``k``.
            ``variant="normalized"`` needs non-negative features (a positive feature map).
        variant: ``"additive"`` (the seed's ``softmax_local + q.S``) or ``"normalized"`` (shared
            denominator; see :func:`bsbr.ops.bsbr.utils.combine`).
        gate: None (open) or a scalar / (hq,) tensor scaling the retrieved term.
        mass_power: None, or a scalar / (hq,) tensor beta making the gate per token,
            ``g * L_t**(-beta)`` with ``L_t`` the local softmax mass (see :func:`~bsbr.ops.bsbr.utils.combine`).
        top_k: None for dense retrieval over all earlier chunks, else keep the k best-scoring ones.
        local_chunks: each token attends exactly (softmax) to its own chunk so far and to the
            ``local_chunks - 1`` chunks before it; retrieval reaches the chunks before those. 1 is the
            plain BSBR pattern.
        sink_tokens: the sequence's first ``sink_tokens`` tokens stay in every token's exact window
            ("attention sinks"; a pretrained model parks attention mass on its first token).
        valid: (b, n) padding mask, 1/True for real tokens. Each sequence is processed on its own
            real tokens (chunk boundaries start at its first real token); padded positions output 0.
        scale: softmax scale, default ``1/sqrt(d)``.
        output_final_state: also return the :class:`BSBRState` to continue with
            :func:`bsbr.ops.recurrent_bsbr_attention`.

    Returns:
        ``(o, state)``: o is (b, hq, n, dv); state is None unless ``output_final_state``.
    """
    fq = q if fq is None else fq
    fk = k if fk is None else fk
    check_options(chunk_size, variant, top_k, local_chunks, sink_tokens)
    a = check_inputs(q, k, v, mq, mk, fq, fk, gate, valid, meta_q_map=meta_q_map, meta_k_map=meta_k_map,
                     mass_power=mass_power)
    b, hq, hkv, n, B = a.batch, a.q_heads, a.kv_heads, a.seq_len, chunk_size
    L = local_chunks
    g = hq // hkv
    scale = 1.0 / math.sqrt(a.head_dim) if scale is None else scale
    gates = gate_per_head(gate, hq, q)

    order = None
    if valid is not None:
        valid = valid.bool()
        if not bool(valid.all()):
            order, lengths = _compact(valid)
            q, k, v, mq, mk, fq, fk = (_gather_tokens(x, order) for x in (q, k, v, mq, mk, fq, fk))
            valid = torch.arange(n, device=q.device)[None, :] < lengths[:, None]
        else:
            valid = None
    if n == 0:
        o = q.new_zeros(b, hq, 0, a.value_dim)
        return o, (BSBRState.empty(a, B, q, L, sink_tokens) if output_final_state else None)

    C = -(-n // B)
    pad = C * B - n
    if pad:
        q, k, v, mq, mk, fq, fk = (F_.pad(x, (0, 0, 0, pad)) for x in (q, k, v, mq, mk, fq, fk))
    tok_valid = torch.ones(b, C * B, dtype=torch.bool, device=q.device)
    tok_valid[:, n:] = False
    if valid is not None:
        tok_valid[:, :n] = valid

    def blocks(x):  # (b, h, C*B, d) -> (b, h, C, B, d)
        return x.view(x.shape[0], x.shape[1], C, B, x.shape[-1])

    # 1. exact (local) causal softmax attention: one SDPA call over all chunks as a batch
    qc = blocks(q).transpose(1, 2).reshape(b * C, hq, B, a.head_dim)
    if L == 1 and sink_tokens == 0:  # the chunk itself: a causal mask
        kc = blocks(k).transpose(1, 2).reshape(b * C, hkv, B, a.head_dim)
        vc = blocks(v).transpose(1, 2).reshape(b * C, hkv, B, a.value_dim)
        allowed_local = torch.ones(B, B, dtype=torch.bool, device=q.device).tril()
    else:  # keys: the sinks, then chunks c-L+1 .. c
        kc, vc, allowed_local = _window_keys(k, v, B, C, L, sink_tokens)
        kc = kc.reshape(b * C, hkv, -1, a.head_dim)
        vc = vc.reshape(b * C, hkv, -1, a.value_dim)
        allowed_local = allowed_local.unsqueeze(0).expand(b, -1, -1, -1).reshape(b * C, 1, B, -1)
    log_mass = None
    if mass_power is None:
        if L == 1 and sink_tokens == 0:
            o_local = F_.scaled_dot_product_attention(qc, kc, vc, is_causal=True, scale=scale, enable_gqa=g > 1)
        else:
            o_local = F_.scaled_dot_product_attention(qc, kc, vc, attn_mask=allowed_local, scale=scale,
                                                      enable_gqa=g > 1)
    else:  # the per-token gate needs the local softmax's mass, which SDPA does not return
        s = (qc.view(b * C, hkv, g, B, -1) @ kc.unsqueeze(2).transpose(-1, -2)) * scale  # (bC, hkv, g, B, keys)
        mask = allowed_local if allowed_local.dim() == 2 else allowed_local.unsqueeze(1)
        s = s.masked_fill(~mask, float("-inf"))
        o_local = (torch.softmax(s, dim=-1) @ vc.unsqueeze(2)).view(b * C, hq, B, a.value_dim)
        log_mass = local_log_mass(s).view(b, C, hq, B).transpose(1, 2).reshape(b, hq, C * B)
    o_local = o_local.view(b, C, hq, B, a.value_dim).transpose(1, 2)  # (b, hq, C, B, dv)

    # 2. chunk states from real tokens only: F_c = fk_c^T v_c (b, hkv, C, df, dv), z_c = sum fk
    m = tok_valid.view(b, 1, C, B, 1).to(q.dtype)
    if valid is None:
        # No padding mask: the only padded tokens are the zeros F_.pad appended, which add exactly 0
        # to every sum, so multiplying by the mask would change nothing but cost a full copy of
        # fk, mk and mq. Same values, same layouts, same reductions: bit-identical results.
        def masked(x):
            return x
    else:
        def masked(x):
            return x * m
    fk_c = masked(blocks(fk))
    F = _bmm5(fk_c.transpose(-1, -2), blocks(v))  # (b, hkv, C, df, dv)
    z = fk_c.sum(-2)

    # 3. meta-keys (mean over the chunk) and meta-queries (mean over the previous chunk)
    counts = m.sum(-2).clamp(min=1.0)  # (b, 1, C, 1)
    h_meta = apply_map(meta_k_map, masked(blocks(mk)).sum(-2) / counts)  # (b, hkv, C, dm)
    mean_q = apply_map(meta_q_map, masked(blocks(mq)).sum(-2) / counts)  # (b, hq, C, dm)
    r_meta = F_.pad(mean_q[:, :, :-1], (0, 0, 1, 0))  # r_c = mean_q[c-1]; r_0 is never used

    # 4. retrieval over the earlier chunks outside the exact window: w (b, hkv, g, C, C)
    c_idx = torch.arange(C, device=q.device)
    allowed = (c_idx[None, :] <= c_idx[:, None] - L).view(1, 1, 1, C, C)
    w = retrieval_weights(r_meta.view(b, hkv, g, C, -1), h_meta, allowed, top_k, variant)
    df, dv = a.feature_dim, a.value_dim
    if top_k is not None and top_k < C - L:
        # sparse: gather the k selected states per chunk, O(C k d^2)
        wk, idx = w.topk(top_k, dim=-1)  # unselected weights are exactly 0
        Fg = F.view(b, hkv, 1, C, df * dv).expand(-1, -1, g, -1, -1)
        S = torch.zeros(b, hkv, g, C, df * dv, dtype=q.dtype, device=q.device)
        zS = torch.zeros(b, hkv, g, C, df, dtype=q.dtype, device=q.device)
        for j in range(top_k):  # k is small; each step is one batched gather
            sel = idx[..., j : j + 1]
            S = S + wk[..., j : j + 1] * Fg.gather(3, sel.expand(-1, -1, -1, -1, df * dv))
            zS = zS + wk[..., j : j + 1] * z.view(b, hkv, 1, C, df).expand(-1, -1, g, -1, -1).gather(
                3, sel.expand(-1, -1, -1, -1, df)
            )
    else:
        S = w @ F.view(b, hkv, 1, C, df * dv)  # (b, hkv, g, C, df*dv)
        zS = w @ z.view(b, hkv, 1, C, df)
    S = S.reshape(b, hq, C, df, dv)
    zS = zS.reshape(b, hq, C, df)

    # 5. read-out with each chunk's retrieved state, then combine with the local output
    fq_c = blocks(fq)  # (b, hq, C, B, df)
    num = _bmm5(fq_c, S)  # (b, hq, C, B, dv)
    needs_grad = torch.is_grad_enabled() and (o_local.requires_grad or num.requires_grad)
    if variant == "additive" and gate is None and mass_power is None and valid is None and not needs_grad:  # out= has no autograd
        # The common case, o = o_local + q.S: one pass, no mask (padded rows are sliced off) and no
        # gate (an open gate multiplies by exactly 1). The sum is written straight into a
        # (b, n, hq, dv) buffer, so the caller's transpose to (b, n, hq*dv) for the output
        # projection is a free view instead of another full copy.
        out = torch.empty(b, C * B, hq, dv, dtype=num.dtype, device=num.device)  # (b, C*B, hq, dv)
        torch.add(o_local, num, out=out.view(b, C, B, hq, dv).permute(0, 3, 1, 2, 4))
        o = out.transpose(1, 2)[:, :, :n]  # (b, hq, n, dv) view
    else:
        den = (fq_c @ zS.unsqueeze(-1)).squeeze(-1) if variant == "normalized" else None
        o = combine(o_local.reshape(b, hq, C * B, dv), num.reshape(b, hq, C * B, dv),
                    None if den is None else den.reshape(b, hq, C * B), gates, variant, log_mass, mass_power)
        o = o * tok_valid.view(b, 1, C * B, 1).to(o.dtype)
        o = o[:, :, :n]

    state = None
    if output_final_state:
        state = _final_state(a, B, L, sink_tokens, k, v, F, z, mk, mq, h_meta, mean_q, m, tok_valid, top_k, variant)
    if order is not None:  # scatter back to the original (padded) positions
        o = torch.zeros_like(o).scatter(2, order[:, None, :, None].expand_as(o), o)
    return o, state


def _window_keys(k: torch.Tensor, v: torch.Tensor, B: int, C: int, L: int, S: int):
    """Keys/values of every chunk's exact window, (b, C, h, S + L*B, d): the sequence's first S tokens,
    then chunks c-L+1 .. c (zeros before the sequence start), and which of them each query of the
    chunk may attend to, (C, B, S + L*B) bool. A sink that already lies in the window is masked in
    the sink columns, so no key is counted twice."""
    def windows(x):  # (b, h, C*B, d) -> (b, C, h, L*B, d)
        xb = F_.pad(x.view(x.shape[0], x.shape[1], C, B, x.shape[-1]), (0, 0, 0, 0, L - 1, 0))
        win = torch.cat([xb[:, :, i:i + C] for i in range(L)], dim=3)
        return win.transpose(1, 2)

    S = min(S, C * B)
    kw, vw = windows(k), windows(v)
    if S:
        def with_sinks(x, w):
            return torch.cat([x[:, :, :S].unsqueeze(1).expand(-1, C, -1, -1, -1), w], dim=3)
        kw, vw = with_sinks(k, kw), with_sinks(v, vw)
    t = torch.arange(C * B, device=k.device).view(C, B, 1)  # query index
    c = torch.arange(C, device=k.device).view(C, 1, 1)
    j_win = (c - L + 1) * B + torch.arange(L * B, device=k.device).view(1, 1, -1)  # (C, 1, L*B)
    j_sink = torch.arange(S, device=k.device).view(1, 1, -1)
    allowed = torch.cat([sink_slot_visible(t, j_sink, B, L), exact_window(t, j_win, B, L, 0)], dim=-1)
    return kw, vw, allowed


def _final_state(a, B, L, S, k, v, F, z, mk, mq, h_meta, mean_q, m, tok_valid, top_k, variant) -> BSBRState:
    """The streaming state after the last real token of each sequence."""
    b, hkv, hq = a.batch, a.kv_heads, a.q_heads
    C = F.shape[2]
    lengths = tok_valid.sum(1)  # (b,)
    full = torch.div(lengths, B, rounding_mode="floor")  # completed chunks per sequence
    st = BSBRState.empty(a, B, k, L, S)
    st.n_seen = lengths.clone()
    cur = full.clamp(max=C - 1)  # index of the current (partial) chunk; ignored if it is empty
    has_partial = (lengths % B) > 0

    def pick(x):  # x: (b, h, C, ...) -> (b, h, ...) at chunk cur[b]
        idx = cur.view(b, 1, 1, *([1] * (x.dim() - 3))).expand(-1, x.shape[1], 1, *x.shape[3:])
        return x.gather(2, idx).squeeze(2)

    def where_partial(x):
        return torch.where(has_partial.view(b, *([1] * (x.dim() - 1))), x, torch.zeros_like(x))

    # the ring of the last W tokens: slot s holds token (last - ((last - s) mod W)); zeros before the start
    W = L * B
    last = (lengths - 1).view(b, 1)
    idx = last - torch.remainder(last - torch.arange(W, device=k.device).view(1, W), W)  # (b, W)

    def ring(x):
        got = x.gather(2, idx.clamp(min=0).view(b, 1, W, 1).expand(-1, x.shape[1], -1, x.shape[-1]))
        return got * (idx >= 0).view(b, 1, W, 1).to(x.dtype)

    st.k_buf, st.v_buf = ring(k), ring(v)
    if S:
        first = (torch.arange(min(S, C * B), device=k.device).view(1, 1, -1, 1) < lengths.view(b, 1, 1, 1)).to(k.dtype)
        st.k_sink[:, :, :C * B] = k[:, :, :S] * first
        st.v_sink[:, :, :C * B] = v[:, :, :S] * first
    st.F_cur = where_partial(pick(F))
    st.z_cur = where_partial(pick(z))
    st.mk_sum = where_partial(pick((mk.view(b, mk.shape[1], C, B, -1) * m).sum(-2)))
    st.mq_sum = where_partial(pick((mq.view(b, mq.shape[1], C, B, -1) * m).sum(-2)))
    prev = (full - 1).clamp(min=0)
    idx = prev.view(b, 1, 1, 1).expand(-1, hq, 1, mean_q.shape[-1])
    st.r_cur = torch.where((full > 0).view(b, 1, 1), mean_q.gather(2, idx).squeeze(2), torch.zeros_like(st.r_cur))
    keep = (torch.arange(C, device=k.device)[None, :] < full[:, None]).view(b, 1, C)
    st.F_past = F * keep[..., None, None].to(F.dtype)
    st.z_past = z * keep[..., None].to(z.dtype)
    st.h_past = h_meta * keep[..., None].to(h_meta.dtype)
    refresh_retrieval(st, full > 0, top_k, variant)
    return st
