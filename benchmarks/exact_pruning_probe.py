"""Could an exact top-K skip keys? The default router scores a chunk by its largest ``q.k`` and so
reads every far key once per decode step (the cost that keeps a 32k step at ~2x a 1k step). A cheap
upper bound per piece of keys would let it compute exact scores only where the bound reaches the K-th
best chunk's score, and select the same chunks. This probe counts how many keys such a pruning would
still read, on the default SmolLM2-135M conversion:

    OMP_NUM_THREADS=1 python benchmarks/exact_pruning_probe.py --seq-len 8192 --source code prose \
        --json exact_pruning_8k.json

For the last ``--queries`` tokens of one window per source, each layer and query head: tau = the K-th
largest chunk score over the candidate chunks (entirely before the window). Bounds:

* ``minmax<p>``: Quest's bound over pieces of ``p`` keys, ``q+ . max(k) + q- . min(k)`` (reads 2/p of
  the keys' floats); a piece must be read exactly if its bound >= tau for any query head sharing it.
* ``rank<r>``: each key split on a rank-r basis of the layer's far keys (the top right-singular vectors
  of this window's keys, an optimistic basis): ``q_r . k_r + |q_perp| |k_perp|`` (reads (r + 1)/d);
  a key must be read exactly if its bound >= tau.

``read`` = bound floats + refined keys, as a share of reading every key once (1.0 = no saving).
"""
from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch

import bsbr.layers.bsbr_attention as attention_layer
from bsbr.convert import convert_to_bsbr, load_source, load_tokenizer
from bsbr.convert.defaults import DEFAULT_CHUNK_SIZE, DEFAULT_OPTIONS
from bsbr.corpus import token_windows
from bsbr.numbers import integer
from bsbr.results import write_json
from retrieval_probe import SOURCES, texts_of
from script_args import check_args

PIECES = (8, 16, 32, 64)
RANKS = (8, 16, 32)


def probe_call(op, stats, queries):
    """Wrap the chunked op: add this layer's refined shares to ``stats``."""
    def wrapped(q, k, v, mq, mk, options, **kw):
        qr, kr = kw["qr"][0], kw["kr"][0]  # (h, n, d): batch of one
        B, L, S, K = options.chunk_size, options.local_chunks, options.sink_tokens, options.retrieval_blocks
        hkv, n, d = kr.shape
        g = qr.shape[0] // hkv
        basis = {r: torch.linalg.svd(kr[:, S:], full_matrices=False)[2][:, :r] for r in RANKS}  # (hkv, r, d)
        for t in range(n - queries, n):
            C = t // B - L + 1  # candidate chunks 0 .. C - 1
            if C <= K:
                continue
            keys = kr[:, :C * B]
            qq = qr[:, t].view(hkv, g, d)
            s = (qq @ keys.transpose(-1, -2)).view(hkv, g, C, B)
            s[..., 0, :S] = float("-inf")  # sinks are not read as a block
            tau = s.amax(-1).topk(K, -1).values[..., -1:]  # (hkv, g, 1)
            for p in PIECES:
                kp = keys.view(hkv, C * B // p, p, d).clone()
                kp[:, 0, :S] = kp[:, 0, S:S + 1]  # a piece's bound over its non-sink keys
                bound = qq.clamp(min=0) @ kp.amax(2).transpose(-1, -2) + qq.clamp(max=0) @ kp.amin(2).transpose(-1, -2)
                stats[f"minmax{p}"].append(2 / p + (bound >= tau).any(1).float().mean().item())
            for r, U in basis.items():
                kk = keys[:, S:]
                k_r, q_r = kk @ U.transpose(-1, -2), qq @ U.transpose(-1, -2)
                bound = q_r @ k_r.transpose(-1, -2) + \
                    (qq - q_r @ U).norm(dim=-1, keepdim=True) * (kk - k_r @ U).norm(dim=-1)[:, None, :]
                stats[f"rank{r}"].append((r + 1) / d + (bound >= tau).any(1).float().mean().item())
        return op(q, k, v, mq, mk, options, **kw)
    return wrapped


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq-len", type=integer(1), default=8192)
    ap.add_argument("--source", nargs="+", choices=SOURCES, default=list(SOURCES))
    ap.add_argument("--queries", type=integer(1), default=8, help="last tokens of the window probed")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    check_args(ap, args, unique=["source"])
    opt = DEFAULT_OPTIONS  # (the conversion below: checked before loading it)
    shortest = (opt["local_chunks"] + opt["retrieval_blocks"]) * DEFAULT_CHUNK_SIZE + 1  # more candidates than blocks
    if args.seq_len < shortest:
        ap.error(f"--seq-len must be at least {shortest:,}: below it every chunk is read, so nothing is pruned")
    torch.set_num_threads(1)
    source, tokenizer = load_source(None), load_tokenizer(None)
    model = convert_to_bsbr(source).eval()
    op = attention_layer.chunk_bsbr_attention
    out = {"seq_len": args.seq_len, "queries": args.queries, "read": {}}
    for kind in args.source:
        stats = defaultdict(list)
        attention_layer.chunk_bsbr_attention = probe_call(op, stats, args.queries)
        ids = token_windows(tokenizer, texts_of(kind), args.seq_len, 1)
        t0 = time.time()
        with torch.inference_mode():
            model(ids)
        out["read"][kind] = {name: sum(v) / len(v) for name, v in stats.items()}
        print(kind, f"({time.time() - t0:.0f} s):",
              ", ".join(f"{name} {share:.3f}" for name, share in out["read"][kind].items()), flush=True)
    if args.json:
        write_json(out, args.json)


if __name__ == "__main__":
    main()
