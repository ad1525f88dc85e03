"""The op alone (:func:`bsbr.ops.chunk_bsbr_attention` on random tensors) against a big dense matmul
measured in the same run: how close the op comes to this machine's limit.
"""
from __future__ import annotations

import functools
import logging
from typing import Dict, Sequence

import torch

from .common import interleaved_times, median, own_rng, round_sig
from .defaults import DEFAULT_SEQ_LENS

log = logging.getLogger(__name__)


def bsbr_core_flops(n: int, chunk_size: int, heads: int, head_dim: int, batch: int = 1,
                    retrieval_blocks: int = 0) -> Dict[str, float]:
    """Matmul FLOPs of :func:`bsbr.ops.chunk_bsbr_attention` as :func:`bench_core` calls it (its own chunk
    as the exact window, no sinks, an open gate, d = dv = df = dm = head_dim), by term, following the op's
    paths.

    A multiply-add counts 2. The exact window counts the causal half of the B x B blocks (``q k^T`` and
    ``p v``: 2 * n*B*d * 2 / 2), the work a causal kernel must do; the op computes the retrieval weights
    and retrieved states as dense C x C products. With ``retrieval_blocks`` K: while K covers every
    chunk before each window (C - 1 <= K) the op is one causal attention over the whole input, padded to
    whole chunks (2 * n_pad*n_pad*d, no blocks, no state read-out); otherwise a token of chunk c scores each of its c earlier chunks by its
    largest ``q.k`` (one ``q.k`` per earlier key) and attends to min(K, c) of them exactly (2 * 2*B*d
    per block)."""
    B, d = min(chunk_size, n), head_dim  # (an input shorter than a chunk runs as one chunk of its own length)
    n_pad = -(-n // B) * B
    C = n_pad // B
    K = retrieval_blocks
    dense = K > 0 and C - 1 <= K
    per_head = {
        "exact_window": 2.0 * n_pad * n_pad * d if dense else 2.0 * n_pad * B * d,
        "chunk_states": 2.0 * n_pad * d * d,
        "retrieval_weights": 2.0 * C * C * d,
        "retrieved_states": 0.0 if dense else 2.0 * C * C * d * d,
        "read_out": 0.0 if dense else 2.0 * n_pad * d * d,
        "block_scores": 0.0 if dense or not K else sum(2.0 * B * c * B * d for c in range(C)),
        "block_attention": 0.0 if dense else sum(4.0 * B * min(K, c) * B * d for c in range(C)),
    }
    out = {k: v * heads * batch for k, v in per_head.items()}
    out["total"] = sum(out.values())
    out["standard_causal"] = 2.0 * n * n * d * heads * batch  # full causal softmax attention
    return out


def matmul_gflops(size: int, repeats: int, device: str, warmup: int = 1) -> float:
    """This machine's dense matmul rate (GFLOP/s, median of ``repeats`` after ``warmup`` untimed calls) on
    ``size``-square matrices: the practical ceiling the attention kernels are compared against."""
    a, b = (torch.randn(size, size, device=device) for _ in range(2))
    t = median(interleaved_times({"matmul": lambda: a @ b}, repeats, warmup=warmup, device=device)["matmul"])
    return 2.0 * size**3 / t / 1e9


@own_rng
def bench_core(seq_lens: Sequence[int] = DEFAULT_SEQ_LENS, heads: int = 8, head_dim: int = 64,
               chunk_size: int = 128, repeats: int = 5, warmup: int = 1, retrieval: str = "additive",
               retrieval_blocks: int = 0, matmul_size: int = 2048, seed: int = 0,
               device: str = "cpu") -> Dict[str, object]:
    """The op alone on random (1, h, n, d) tensors: median time (after ``warmup`` untimed calls), cost-model
    FLOPs, achieved GFLOP/s, and this machine's dense matmul GFLOP/s measured in the same run (before and
    after the op runs, median of both, because a shared machine's speed drifts)."""
    from ..ops.bsbr import BSBROptions, chunk_bsbr_attention

    peak_before = matmul_gflops(matmul_size, repeats, device, warmup)
    g = torch.Generator(device=device).manual_seed(seed)
    options = BSBROptions(chunk_size=chunk_size, retrieval=retrieval, retrieval_blocks=retrieval_blocks)
    rows = []
    for n in seq_lens:
        q, k, v, mq, mk = (torch.randn(1, heads, n, head_dim, generator=g, device=device) for _ in range(5))
        # normalized retrieval needs non-negative features
        fq, fk = [torch.nn.functional.elu(t) + 1 for t in (q, k)] if retrieval == "normalized" else (None, None)
        fn = functools.partial(chunk_bsbr_attention, q, k, v, mq, mk, options, fq=fq, fk=fk)
        with torch.no_grad():
            t = median(interleaved_times({"op": fn}, repeats, warmup=warmup, device=device)["op"])
        flops = bsbr_core_flops(n, chunk_size, heads, head_dim, retrieval_blocks=retrieval_blocks)
        rows.append({"seq_len": n, "time_ms": round_sig(t * 1e3), "gflop": round_sig(flops["total"] / 1e9),
                     "gflops_per_s": round_sig(flops["total"] / t / 1e9),
                     "flops_by_term": {k: round_sig(v) for k, v in flops.items()}})
        log.info("core @ %d: %.2f ms, %.3f GFLOP, %.1f GFLOP/s", n, t * 1e3, flops["total"] / 1e9,
                 flops["total"] / t / 1e9)
        del q, k, v, mq, mk, fq, fk, fn
    peak_after = matmul_gflops(matmul_size, repeats, device, warmup)
    peak = median([peak_before, peak_after])
    for r in rows:
        r["fraction_of_matmul"] = round_sig(r["gflops_per_s"] / peak)
    return {"matmul_size": matmul_size, "matmul_gflops_per_s": round_sig(peak),
            "matmul_gflops_per_s_before_after": [round_sig(peak_before), round_sig(peak_after)],
            "heads": heads, "head_dim": head_dim, "chunk_size": chunk_size, "warmup": warmup, "retrieval": retrieval,
            "retrieval_blocks": retrieval_blocks, "rows": rows}
