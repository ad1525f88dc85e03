"""The cost of the block router: prefill seconds and decode ms/token of the default SmolLM2-135M
conversion with each router in turn (``bounds<p>``: key bounds over routers of ``p`` tokens, setting
:data:`bsbr.ops.bsbr.retrieval.BOUND_TOKENS`; ``exact``: the largest exact ``q.k``), alternating in one
run (1 thread), so the routers share the machine's load.

    python benchmarks/router_speed.py 8192 bounds16,bounds4,exact     # context length, routers
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

import bsbr.ops.bsbr.retrieval as retrieval
from bsbr.convert import convert_to_bsbr, load_source
from bsbr.layers import BSBRAttention


def use_router(model, name: str) -> None:
    """Switch every attention layer of ``model`` to the router ``name`` (bounds<p> or exact)."""
    router = "exact" if name == "exact" else "bounds"
    if router == "bounds":
        retrieval.BOUND_TOKENS = int(name[len("bounds"):])
    for m in model.modules():
        if isinstance(m, BSBRAttention):
            m.options = dataclasses.replace(m.options, block_router=router)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("length", type=int, help="prompt tokens (the decode context)")
    ap.add_argument("routers", help="comma-separated routers, e.g. bounds16,bounds4,exact")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4, help="timed decode steps per round")
    args = ap.parse_args()
    routers = args.routers.split(",")
    torch.set_num_threads(1)
    model = convert_to_bsbr(load_source(None).eval()).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, args.length), generator=torch.Generator().manual_seed(0))
    prefill, decode = {p: [] for p in routers}, {p: [] for p in routers}
    with torch.inference_mode():
        for _ in range(args.rounds):
            for p in routers:
                use_router(model, p)
                t0 = time.perf_counter()
                out = model(ids, use_cache=True)
                prefill[p].append(time.perf_counter() - t0)
                tok = out.logits[:, -1:].argmax(-1)
                out = model(tok, cache=out.cache, use_cache=True)  # warm-up step
                for _ in range(args.steps):
                    t0 = time.perf_counter()
                    out = model(tok, cache=out.cache, use_cache=True)
                    decode[p].append(time.perf_counter() - t0)
    for p in routers:
        print(f"{args.length} tokens, {p}: prefill median {statistics.median(prefill[p]):.1f} s, "
              f"decode median {statistics.median(decode[p]) * 1000:.1f} ms/token")


if __name__ == "__main__":
    main()
