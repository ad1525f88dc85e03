"""The bounded recall mode (``recall_tokens = M > 0``, docs/design.md section 5b), shared by the
chunked and streaming forms (the reference, ``naive.py``, has its own plain version)."""
from __future__ import annotations

from typing import NamedTuple

import torch


class RecallCache(NamedTuple):
    """M slots per (sequence, K/V head), and the linear state of the left-window tokens outside them."""

    kr: torch.Tensor  # (b, hkv, M, d) far keys
    v: torch.Tensor  # (b, hkv, M, dv)
    fk: torch.Tensor  # (b, hkv, M, df) features (for their errors and their return to the state)
    pos: torch.Tensor  # (b, hkv, M) long, the token's index in its sequence (-1: empty)
    on: torch.Tensor  # (b, hkv, M) bool, filled slots
    F: torch.Tensor  # (b, hkv, df, dv) sum fk v^T over left-window tokens outside the cache
    z: torch.Tensor  # (b, hkv, df) sum fk over them

    @classmethod
    def empty(cls, b, hkv, M, d, dv, df, like: torch.Tensor) -> "RecallCache":
        def zeros(*s):
            return torch.zeros(*s, dtype=like.dtype, device=like.device)

        return cls(zeros(b, hkv, M, d), zeros(b, hkv, M, dv), zeros(b, hkv, M, df),
                   torch.full((b, hkv, M), -1, dtype=torch.long, device=like.device),
                   torch.zeros(b, hkv, M, dtype=torch.bool, device=like.device), zeros(b, hkv, df, dv),
                   zeros(b, hkv, df))


def recall_errors(fk, v, F, z, variant: str) -> torch.Tensor:
    """How badly the state (F, z) recalls each value: ``|fk.F / fk.z - v|`` (normalized) or ``|fk.F - v|``
    (additive). fk (..., J, df), v (..., J, dv), F (..., df, dv), z (..., df) -> (..., J); NaN -> inf."""
    pred = fk @ F
    if variant == "normalized":
        pred = pred / (fk @ z.unsqueeze(-1))
    e = (pred - v).norm(dim=-1)
    return torch.where(torch.isnan(e), torch.full_like(e, float("inf")), e)


DUPLICATE_COSINE = 0.95  # a candidate this close (cosine of values) to a worse-recalled one is kept last


def keep_largest(err, pos, cand, v, M: int):
    """Which candidates the cache keeps: in order of decreasing error (ties to the later position), the
    first ``M`` whose value is not a near-duplicate (cosine above ``DUPLICATE_COSINE``) of a candidate
    ranked before it, then, while slots are left, the near-duplicates in the same order. err, pos,
    cand: (..., J), v (..., J, dv), J >= M. Returns indices (..., M) and whether each holds a
    candidate (..., M) (False: an empty slot).

    Why the duplicates go: by error alone the cache fills with copies of frequent tokens (at 16k tokens
    of licence prose, 739 of the 23,040 slots held " License"), which read as one key many times over
    and draw the window's mass: 32k prose perplexity 16.04 with them, 15.47 without (the window alone
    15.60). A lower threshold gains more perplexity (15.29 at 0.8) but merges the digits of a number
    and loses prose pass-keys (1/6 at 4k-8k against 3/6; docs/findings.md, The bounded mode)."""
    err = err.masked_fill(~cand, float("-inf"))
    by_pos = pos.masked_fill(~cand, -1).sort(dim=-1, descending=True, stable=True).indices
    order = by_pos.gather(-1, err.gather(-1, by_pos).sort(dim=-1, descending=True, stable=True).indices)
    ok = cand.gather(-1, order)  # in rank order from here
    x = torch.nn.functional.normalize(v.gather(-2, order.unsqueeze(-1).expand_as(v)), dim=-1)
    J = ok.shape[-1]
    earlier = torch.ones(J, J, dtype=torch.bool, device=ok.device).tril(-1) & ok.unsqueeze(-2)  # [j, i]: i before j
    dup = ((x @ x.transpose(-1, -2) > DUPLICATE_COSINE) & earlier).any(-1)
    tier = ok.to(torch.int8) * (2 - dup.to(torch.int8))  # 2: kept first, 1: a near-duplicate
    pick = order.gather(-1, tier.sort(dim=-1, descending=True, stable=True).indices[..., :M])
    return pick, cand.gather(-1, pick)


def _outer_sum(fk, v, w):
    """sum_j w_j fk_j v_j^T and sum_j w_j fk_j: fk (..., J, df), v (..., J, dv), w (..., J)."""
    fw = fk * w.unsqueeze(-1)
    return fw.transpose(-1, -2) @ v, fw.sum(-2)


def recall_update(cache: RecallCache, kr, v, fk, pos, real, cand, active, variant: str) -> RecallCache:
    """One chunk leaves the window: kr (b, hkv, B, d), v, fk its tokens, pos (b, B) their positions,
    real (b, B) its real tokens (they join the state unless kept), cand (b, B) those that may enter
    the cache (real, not sinks); only sequences with ``active`` (b,) change."""
    b, hkv, M = cache.on.shape
    B = kr.shape[2]
    kr_a, v_a, fk_a = (torch.cat([c, x], dim=2) for c, x in ((cache.kr, kr), (cache.v, v), (cache.fk, fk)))
    pos_a = torch.cat([cache.pos, pos[:, None].expand(b, hkv, B)], dim=2)
    member = torch.cat([cache.on, real[:, None].expand(b, hkv, B)], dim=2)  # (b, hkv, M + B)
    cand_a = torch.cat([cache.on, cand[:, None].expand(b, hkv, B)], dim=2)
    w = member.to(fk.dtype)
    dF, dz = _outer_sum(fk_a, v_a, w)
    err = recall_errors(fk_a, v_a, cache.F + dF, cache.z + dz, variant)
    idx, on = keep_largest(err, pos_a, cand_a, v_a, M)  # (b, hkv, M)
    kept = torch.zeros_like(member).scatter(-1, idx, on)
    F_out, z_out = _outer_sum(fk_a, v_a, (member & ~kept).to(fk.dtype))
    onf = on.unsqueeze(-1).to(kr.dtype)

    def slots(x):
        return x.gather(2, idx.unsqueeze(-1).expand(-1, -1, -1, x.shape[-1])) * onf

    new = RecallCache(slots(kr_a), slots(v_a), slots(fk_a), pos_a.gather(-1, idx).masked_fill(~on, -1), on,
                      cache.F + F_out, cache.z + z_out)
    return RecallCache(*(torch.where(active.view(b, *([1] * (x.dim() - 1))), x, old) for x, old in zip(new, cache)))


def cache_scores(qr, cache_kr, cache_on, scale: float):
    """Scores of grouped queries against the cache: qr (b, hkv, ..., T, d), cache_kr (b, hkv, ..., M, d)
    (broadcast over the middle dims) -> (b, hkv, ..., T, M), -inf at empty slots."""
    s = (qr @ cache_kr.transpose(-1, -2)) * scale
    return s.masked_fill(~cache_on.unsqueeze(-2), float("-inf"))
