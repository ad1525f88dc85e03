"""Reference BSBR attention: the plain masked quadratic form. Slow, obviously correct, float64-capable.

The ground truth the chunked and streaming forms are tested against. It builds every mask as an
n x n (or n x chunks) tensor and loops over the batch, treating each sequence on its own real
(unpadded) tokens, which is what "padding never changes the result" means.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .inputs import check_inputs
from .masks import exact_window, near
from .options import BSBROptions
from .recall import DUPLICATE_COSINE
from .retrieval import GIST_FLOOR, apply_meta, combine, gate_per_head, select_blocks, state_weights
from .softmax import sum_dtype


def naive_bsbr_attention(q, k, v, mq, mk, options: BSBROptions, *, fq=None, fk=None, qr=None, kr=None,
                         gate: Optional[torch.Tensor] = None, meta_q=None, meta_k=None, valid=None):
    """Same arguments and meaning as :func:`bsbr.ops.chunk_bsbr_attention`; returns ``(o, None)``."""
    a, (fq, fk, qr, kr) = check_inputs(options, q, k, v, mq, mk, fq, fk, qr, kr, gate, valid, meta_q, meta_k)
    B, L, S, K = options.chunk_size, options.local_chunks, options.sink_tokens, options.retrieval_blocks
    g = a.q_heads // a.kv_heads
    scale = 1.0 / math.sqrt(a.head_dim) if options.scale is None else options.scale
    gates = gate_per_head(gate, a.q_heads, q)
    out = q.new_zeros(a.batch, a.q_heads, a.seq_len, a.value_dim)
    for b in range(a.batch):
        keep = torch.arange(a.seq_len, device=q.device) if valid is None else valid[b].bool().nonzero()[:, 0]
        n = keep.numel()
        if n == 0:
            continue
        # one sequence, real tokens only; K/V-side tensors repeated to the query heads
        qb, fqb, qrb = (x[b][:, keep] for x in (q, fq, qr))
        kb, vb, fkb, krb = (x[b][:, keep].repeat_interleave(g, dim=0) for x in (k, v, fk, kr))
        t = torch.arange(n, device=q.device)
        chunk = t // B
        C = int(chunk[-1]) + 1
        onehot = (chunk[None, :] == torch.arange(C, device=q.device)[:, None]).to(q.dtype)  # (C, n)
        # 1. which keys each token reads exactly: its window (scored q.k), the sinks outside its window
        #    and the tokens of its selected chunks (scored with the far-key positions, qr.kr)
        win = near(t[:, None], t[None, :], B, L) & (t[None, :] <= t[:, None])  # (n, n)
        # far keys of the chunks fewer than R before the token's are read at their own positions (q.k)
        own = win | (near(t[:, None], t[None, :], B, options.own_position_chunks) & (t[None, :] <= t[:, None]))
        sink = exact_window(t[:, None], t[None, :], B, L, S) & ~win
        candidate = torch.arange(C, device=q.device)[None, :] <= chunk[:, None] - L  # (n, C): before the window
        retrievable = t >= S  # a sink is read through the sink slot, never as part of a block
        candidate = candidate & (onehot.bool() & retrievable[None]).any(1)[None, :]
        if options.recall_tokens:  # the bounded mode: a cache of M tokens and the state of the rest
            cached = _recall_sets(fkb, vb, n, options)[:, chunk]  # (h, n, n): the cache each token reads
            far = sink | cached
            outside = (chunk[None, :] <= chunk[:, None] - L) & ~cached  # left the window, not cached
            kernel = (fqb @ fkb.transpose(-1, -2)) * outside
            num, den = kernel @ vb, kernel.sum(-1) if options.retrieval == "normalized" else None
            A = _exact_softmax(qb, kb, qrb, krb, vb, win, far, scale)
            out[b][:, keep] = combine(A, num, den, gates, options.retrieval)
            continue
        s_far = torch.where(own, qb @ kb.transpose(-1, -2), qrb @ krb.transpose(-1, -2))  # (h, n, n)
        selected = torch.zeros(a.q_heads, n, C + 1, dtype=torch.bool, device=q.device)  # column C: "none"
        blocks = onehot.bool() & retrievable[None]  # (C, n): each chunk's keys that are not sinks
        if K:  # each chunk's score: its largest q'.k' over those keys; the K best
            idx = select_blocks(_chunk_max(s_far, blocks), candidate, K)
            selected.scatter_(-1, torch.where(idx >= 0, idx, C), True)
        selected = selected[..., :C]
        far = sink | (selected[:, :, chunk] & retrievable[None, None, :] & ~win)  # (h, n, n)
        A = _exact_softmax(qb, kb, qrb, krb, vb, win, far, scale, own)
        # 2. chunk states F_c = sum_{j in c} fk_j v_j^T, z_c = sum_{j in c} fk_j, in sum_dtype (as their weights)
        up = sum_dtype(q.dtype)
        one_up, fk_up = onehot.to(up), fkb.to(up)
        F = torch.einsum("cj,hjf,hjv->hcfv", one_up, fk_up, vb.to(up))
        z = torch.einsum("cj,hjf->hcf", one_up, fk_up)
        # 3. meta-keys h_c = mean of mk over chunk c; meta-queries r_c = mean of mq over chunk c-1
        counts = onehot.sum(1)[:, None]
        h_meta = apply_meta(meta_k, (onehot @ mk[b][:, keep] / counts)[None])[0].repeat_interleave(g, dim=0)
        means_q = apply_meta(meta_q, (onehot @ mq[b][:, keep] / counts)[None])[0]
        r_meta = torch.cat([torch.zeros_like(means_q[:, :1]), means_q[:, :-1]], dim=1)
        # 4. state weights w[c, c'] over the chunks before c's window; each token drops the chunks it
        #    reads exactly (and with blocks renormalises the rest)
        c_idx = torch.arange(C, device=q.device)
        w = state_weights(r_meta, h_meta, c_idx[None, :] <= c_idx[:, None] - L, options)  # (h, C, C)
        w_tok = w[:, chunk] * ~selected  # (h, n, C)
        if K:  # the gist: renormalised over the chunks a token does not read exactly
            w_tok = w_tok / w_tok.sum(-1, keepdim=True).clamp(min=GIST_FLOOR)
        fqu = fqb.to(up)  # (cast once: the gradients of num and den, which cancel, are then summed in sum_dtype)
        num = torch.einsum("htf,htc,hcfv->htv", fqu, w_tok, F)
        den = torch.einsum("htf,htc,hcf->ht", fqu, w_tok, z) if options.retrieval == "normalized" else None
        out[b][:, keep] = combine(A, num, den, gates.to(up), options.retrieval).to(q.dtype)
    return out, None


def _chunk_max(s, blocks):
    """s (h, n, n) token scores -> (h, n, C): each chunk's largest over its keys in ``blocks`` (C, n)."""
    return s.unsqueeze(-2).masked_fill(~blocks, float("-inf")).amax(-1)


def _exact_softmax(q, k, qr, kr, v, win, far, scale, own=None):
    """One softmax over the window and the far keys, scored q.k where ``own`` (default: the window;
    else it holds the far keys read at their own positions too) and qr.kr elsewhere; masks (h, n, n)
    or (n, n)."""
    s = torch.where(win if own is None else own, q @ k.transpose(-1, -2), qr @ kr.transpose(-1, -2)) * scale
    return torch.softmax(s.masked_fill(~(win | far), float("-inf")), dim=-1) @ v


def _recall_sets(fk, v, n, options: BSBROptions) -> torch.Tensor:
    """The recall cache by its definition (docs/design.md, section 5b): (h, C, n) bool, the tokens in
    head h's cache at the start of chunk c."""
    B, L, S, M = options.chunk_size, options.local_chunks, options.sink_tokens, options.recall_tokens
    C = -(-n // B)
    t = torch.arange(n, device=fk.device)
    out = torch.zeros(fk.shape[0], C, n, dtype=torch.bool, device=fk.device)
    for h in range(fk.shape[0]):
        cache = []
        for c in range(L, C):
            e = c - L
            left = t[t // B <= e]
            F, z = fk[h, left].T @ v[h, left], fk[h, left].sum(0)
            err = {}
            for j in cache + [j for j in range(e * B, (e + 1) * B) if j >= S]:
                pred = fk[h, j] @ F
                if options.retrieval == "normalized":
                    pred = pred / (fk[h, j] @ z)
                err[j] = float((pred - v[h, j]).norm().detach())
                err[j] = float("inf") if math.isnan(err[j]) else err[j]
            ranked = sorted(err, key=lambda j: (-err[j], -j))  # the first M not duplicating one ranked before,
            dup = [any(float((v[h, i] @ v[h, j] / (v[h, i].norm() * v[h, j].norm())).detach()) > DUPLICATE_COSINE  # then
                       for i in ranked[:a]) for a, j in enumerate(ranked)]  # the duplicates
            cache = ([j for j, d in zip(ranked, dup) if not d] + [j for j, d in zip(ranked, dup) if d])[:M]
            out[h, c, cache] = True
    return out
