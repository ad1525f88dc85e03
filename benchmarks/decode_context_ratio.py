"""Decode cost per token at a short and a long context, side by side: the default SmolLM2 conversion
prefills both contexts, then decode steps alternate between the two caches, so both see the same
machine load. Prints the median ms per token at each context and their ratio.

    OMP_NUM_THREADS=1 python benchmarks/decode_context_ratio.py --contexts 1024 32768 --rounds 20 \
        --json docs/benchmarks/decode_1k_32k.json
"""
from __future__ import annotations

import argparse
import time
from statistics import median

import torch

from bsbr.convert import convert_to_bsbr, load_source
from bsbr.numbers import MAX_COUNT, integer
from bsbr.results import write_json
from script_args import check_args


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--contexts", type=integer(1), nargs=2, default=[1024, 32768], metavar=("SHORT", "LONG"))
    ap.add_argument("--rounds", type=integer(1, MAX_COUNT), default=20, help="decode steps per context")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    check_args(ap, args, unique=["contexts"])
    model = convert_to_bsbr(load_source(None)).eval()
    g = torch.Generator().manual_seed(0)
    out, times, prefill = {}, {n: [] for n in args.contexts}, {}
    with torch.no_grad():
        for n in sorted(args.contexts, reverse=True):
            ids = torch.randint(0, model.config.vocab_size, (1, n), generator=g)
            t0 = time.perf_counter()
            out[n] = model(ids, use_cache=True, logits_to_keep=1)  # (the last position's logits: every one is 6.4 GB at 32k)
            prefill[n] = round(time.perf_counter() - t0, 1)
            print(f"prefill {n}: {prefill[n]} s", flush=True)
        for _ in range(args.rounds):
            for n in args.contexts:
                tok = out[n].logits[:, -1:].argmax(-1)
                t0 = time.perf_counter()
                out[n] = model(tok, cache=out[n].cache, use_cache=True)
                times[n].append(1000.0 * (time.perf_counter() - t0))
    med = {n: median(v) for n, v in times.items()}
    short, long_ = args.contexts
    result = dict(threads=torch.get_num_threads(), torch=torch.__version__, prefill_s=prefill, ms_per_token=times,
                  median_ms=med, ratio=med[long_] / med[short])
    print(f"median ms/token: {short}: {med[short]:.1f}, {long_}: {med[long_]:.1f}; ratio {result['ratio']:.2f}")
    if args.json:
        write_json(result, args.json)


if __name__ == "__main__":
    main()
