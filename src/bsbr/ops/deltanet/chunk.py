"""Chunkwise delta rule (the WY / UT-transform algorithm of Yang et al., 2024): the default forward.

Within a chunk of B tokens with start state S, write u_t = beta_t (v_t - S_{t-1}^T k_t) for what
token t adds (S_t = S + sum_{i<=t} k_i u_i^T). Substituting S_{t-1} gives a unit lower-triangular
system for all u of the chunk at once:

    (I + tril(diag(beta) K K^T, -1)) U = diag(beta) (V - K S)

so with T = (I + tril(diag(beta) K K^T, -1))^{-1} diag(beta), W = T K and U0 = T V (independent of S,
computed for every chunk in one batched triangular solve):

    1. U  = U0 - W S                       (the chunk's effective writes)
    2. O  = Q S + tril(Q K^T) U            (diagonal included: o_t reads S_t)
    3. S' = S + K^T U

Only steps 1-3 run chunk after chunk. Cost O(n B d + n d^2), no n x n tensor.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..checks import check_int
from .naive import check_delta_inputs


def chunk_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, *, chunk_size: int = 64,
                     scale: Optional[float] = None, initial_state: Optional[torch.Tensor] = None,
                     output_final_state: bool = False):
    """The delta rule over a whole sequence.

    Args:
        q, k: (b, h, n, d) (the layer L2-normalises k, so each write is a projection update);
            v: (b, h, n, dv); beta: (b, h, n) write strengths (a sigmoid in the layer).
        chunk_size: tokens per chunk (speed/memory knob only: the result does not depend on it).
        scale: multiplies q, default ``1/sqrt(d)``.
        initial_state: (b, h, d, dv) state to continue from, or None (zeros).
        output_final_state: also return the state after the last token.

    Returns:
        ``(o, state)``: o (b, h, n, dv); state (b, h, d, dv) or None.
    """
    (b, h, n, d, dv), scale, S = check_delta_inputs(q, k, v, beta, scale, initial_state)
    check_int("chunk_size", chunk_size)
    B = max(1, min(chunk_size, n))  # (a chunk longer than the sequence: padding only, O(B^2) of it)
    C = max(1, -(-n // B))
    tail = C * B - n
    # padded tokens have k = 0 and beta = 0: they write nothing; their outputs are cut off
    qb = F.pad(q * scale, (0, 0, 0, tail)).view(b, h, C, B, d)
    kb = F.pad(k, (0, 0, 0, tail)).view(b, h, C, B, d)
    vb = F.pad(v, (0, 0, 0, tail)).view(b, h, C, B, dv)
    bb = F.pad(beta, (0, tail)).view(b, h, C, B, 1)

    # UT transform for all chunks at once: solve (I + tril(diag(beta) K K^T, -1)) [W U0] = diag(beta) [K V]
    strict = torch.ones(B, B, dtype=torch.bool, device=q.device).tril(-1)
    A = (bb * (kb @ kb.transpose(-1, -2))).masked_fill(~strict, 0.0)  # (b, h, C, B, B)
    A = A + torch.eye(B, dtype=q.dtype, device=q.device)
    rhs = torch.cat([bb * kb, bb * vb], dim=-1)  # (b, h, C, B, d + dv)
    # (in float32 at least: CPU has no half-precision triangular solve)
    solve = torch.promote_types(A.dtype, torch.float32)
    WU = torch.linalg.solve_triangular(A.to(solve), rhs.to(solve), upper=False, unitriangular=True).to(rhs.dtype)
    W, U0 = WU[..., :d], WU[..., d:]
    causal = torch.ones(B, B, dtype=torch.bool, device=q.device).tril()
    QK = (qb @ kb.transpose(-1, -2)).masked_fill(~causal, 0.0)  # (b, h, C, B, B)

    # unbind once: indexing x[:, :, c] inside the loop would make the backward add C full-size
    # zero tensors (quadratic in n); unbind's backward is a single stack
    outs = []
    for Qc, Kc, Wc, U0c, QKc in zip(*(x.unbind(2) for x in (qb, kb, W, U0, QK))):
        U = U0c - Wc @ S  # (b, h, B, dv)
        outs.append(Qc @ S + QKc @ U)
        S = S + Kc.transpose(-1, -2) @ U  # (b, h, d, dv)
    o = torch.stack(outs, dim=2).reshape(b, h, C * B, dv)[:, :, :n]
    return o, (S if output_final_state else None)
