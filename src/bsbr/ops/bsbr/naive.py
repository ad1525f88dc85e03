"""Reference BSBR attention: the plain masked quadratic form. Slow, obviously correct, float64-capable.

This is the ground truth the chunked and recurrent forms are tested against. It builds the
n x n within-chunk mask and the C x C chunk mask explicitly and loops over the batch, treating every
sequence on its own real (unpadded) tokens, which is what "padding never changes the result" means.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .utils import apply_map, check_inputs, check_options, exact_window, gate_per_head, local_log_mass


def naive_bsbr_attention(
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
    meta_q_map=None,
    meta_k_map=None,
    mass_power: Optional[torch.Tensor] = None,
    local_chunks: int = 1,
    sink_tokens: int = 0,
):
    """Same signature and meaning as :func:`bsbr.ops.chunk_bsbr_attention`; returns ``(o, None)``."""
    fq = q if fq is None else fq
    fk = k if fk is None else fk
    check_options(chunk_size, variant, top_k, local_chunks, sink_tokens)
    a = check_inputs(q, k, v, mq, mk, fq, fk, gate, valid, meta_q_map=meta_q_map, meta_k_map=meta_k_map,
                     mass_power=mass_power)
    B, g = chunk_size, a.q_heads // a.kv_heads
    scale = 1.0 / math.sqrt(a.head_dim) if scale is None else scale
    gates = gate_per_head(gate, a.q_heads, q)
    out = q.new_zeros(a.batch, a.q_heads, a.seq_len, a.value_dim)
    for b in range(a.batch):
        keep = torch.arange(a.seq_len, device=q.device) if valid is None else valid[b].bool().nonzero()[:, 0]
        L = keep.numel()
        if L == 0:
            continue
        # one sequence, real tokens only; K/V-side tensors repeated to the query heads (grouped K/V)
        qb, fqb = q[b][:, keep], fq[b][:, keep]
        kb, vb, fkb = (x[b][:, keep].repeat_interleave(g, dim=0) for x in (k, v, fk))
        t = torch.arange(L, device=q.device)
        chunk = t // B
        C = int(chunk[-1]) + 1
        # 1. exact attention: M_in[t, j] = j <= t and j in t's chunk (or one of the local_chunks - 1
        #    chunks before it, or a sink token)
        m_in = exact_window(t[:, None], t[None, :], B, local_chunks, sink_tokens)
        s = (qb @ kb.transpose(-1, -2)) * scale
        s = s.masked_fill(~m_in, float("-inf"))
        A = torch.softmax(s, dim=-1) @ vb  # (h, L, dv)
        # 2. chunk states F_c = sum_{j in c} fk_j v_j^T, feature sums z_c = sum_{j in c} fk_j
        onehot = (chunk[None, :] == torch.arange(C, device=q.device)[:, None]).to(q.dtype)  # (C, L)
        F = torch.einsum("cj,hjf,hjv->hcfv", onehot, fkb, vb)
        z = torch.einsum("cj,hjf->hcf", onehot, fkb)
        # 3. meta-keys h_c = mean of mk over chunk c; meta-queries r_c = mean of mq over chunk c-1
        #    (the optional affine maps act on the means)
        counts = onehot.sum(1)[:, None]
        h_meta = apply_map(meta_k_map, (onehot @ mk[b][:, keep] / counts)[None])[0].repeat_interleave(g, dim=0)
        means_q = apply_map(meta_q_map, (onehot @ mq[b][:, keep] / counts)[None])[0]  # (hq, C, dm)
        r_meta = torch.cat([torch.zeros_like(means_q[:, :1]), means_q[:, :-1]], dim=1)
        # 4. retrieval: M_out[c, c'] = c' < c - (local_chunks - 1), the chunks before the exact window;
        #    alpha = softmax over allowed chunks
        w = torch.zeros(a.q_heads, C, C, dtype=q.dtype, device=q.device)
        for c in range(local_chunks, C):
            P = c - local_chunks + 1  # chunks 0 .. P-1 are retrieved
            sc = torch.einsum("hd,hpd->hp", r_meta[:, c], h_meta[:, :P]) / math.sqrt(a.meta_dim)
            if top_k is not None and top_k < P:
                chosen = sc.topk(top_k, dim=-1).indices
                sc = torch.full_like(sc, float("-inf")).scatter(-1, chosen, sc.gather(-1, chosen))
            alpha = torch.softmax(sc, dim=-1)
            if variant == "normalized":
                alpha = alpha * min(P, top_k or P)
            w[:, c, :P] = alpha
        S = torch.einsum("hcp,hpfv->hcfv", w, F)
        zS = torch.einsum("hcp,hpf->hcf", w, z)
        # 5. read-out at each token with its own chunk's retrieved state, then the combination
        num = torch.einsum("htf,htfv->htv", fqb, S[:, chunk])
        gh = gates.view(-1, 1, 1)
        if mass_power is not None:  # per-token gate g * L_t^-beta, L_t = sum_local exp(s - max s)
            gh = gh * torch.exp(-mass_power.to(q.dtype).reshape(-1, 1) * local_log_mass(s)).unsqueeze(-1)
        if variant == "additive":
            o = A + gh * num
        else:
            den = torch.einsum("htf,htf->ht", fqb, zS[:, chunk])
            o = (A + gh * num) / (1.0 + gh * den[..., None])
        out[b][:, keep] = o
    return out, None
