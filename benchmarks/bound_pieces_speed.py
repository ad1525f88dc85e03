"""The cost of the key bounds' piece size: prefill seconds and decode ms/token of the default SmolLM2-135M
conversion with :data:`bsbr.ops.bsbr.retrieval.BOUND_TOKENS` set to each size in turn, alternating in
one run (1 thread), so the sizes share the machine's load.

    python benchmarks/bound_pieces_speed.py 8192 16,4     # context length, piece sizes
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import bsbr.ops.bsbr.retrieval as retrieval
from bsbr.convert import convert_to_bsbr, load_source


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("length", type=int, help="prompt tokens (the decode context)")
    ap.add_argument("pieces", help="comma-separated piece sizes, e.g. 16,4")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4, help="timed decode steps per round")
    args = ap.parse_args()
    pieces = [int(x) for x in args.pieces.split(",")]
    torch.set_num_threads(1)
    model = convert_to_bsbr(load_source(None).eval()).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, args.length), generator=torch.Generator().manual_seed(0))
    prefill, decode = {p: [] for p in pieces}, {p: [] for p in pieces}
    with torch.inference_mode():
        for _ in range(args.rounds):
            for p in pieces:
                retrieval.BOUND_TOKENS = p
                t0 = time.perf_counter()
                out = model(ids, use_cache=True)
                prefill[p].append(time.perf_counter() - t0)
                tok = out.logits[:, -1:].argmax(-1)
                out = model(tok, cache=out.cache, use_cache=True)  # warm-up step
                for _ in range(args.steps):
                    t0 = time.perf_counter()
                    out = model(tok, cache=out.cache, use_cache=True)
                    decode[p].append(time.perf_counter() - t0)
    for p in pieces:
        print(f"{args.length} tokens, {p}-token pieces: prefill median {statistics.median(prefill[p]):.1f} s, "
              f"decode median {statistics.median(decode[p]) * 1000:.1f} ms/token")


if __name__ == "__main__":
    main()
