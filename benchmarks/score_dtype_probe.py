"""Would smaller keys make the score pass cheap? A decode step of the default conversion scores every
far key (``q.k`` against each earlier key, the chunk's score its largest); at 32k that pass is about
a third of the step. This times one layer's pass with SmolLM2-135M's shapes (3 K/V heads of 3 query
heads each, d = 64), the keys of ``--layers`` layers kept apart so they are read from memory, not
cache, for keys as stored (float32), in bfloat16, and in int8 with one scale per key (PyTorch's
``_weight_int8pack_mm``, the kernel of int8 weight-only linears; bfloat16 queries):

    OMP_NUM_THREADS=1 python benchmarks/score_dtype_probe.py --contexts 16384 32768 --json out.json

Random keys: only the times mean anything (an int8 score is not the float score, so it would change
which chunks a token picks).
"""
from __future__ import annotations

import argparse
import time
from statistics import median

import torch

from bsbr.numbers import MAX_REPEATS, integer
from bsbr.results import write_json
from script_args import check_args


def per_layer_ms(score, keys, rounds: int) -> float:
    """Median over ``rounds`` of one pass over every layer's keys, per layer, in ms."""
    times = []
    for _ in range(rounds + 1):
        t0 = time.perf_counter()
        for k in keys:
            score(k)
        times.append((time.perf_counter() - t0) / len(keys) * 1e3)
    return median(times[1:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--contexts", type=integer(1), nargs="+", default=[16384, 32768])
    p.add_argument("--layers", type=integer(1), default=30)
    p.add_argument("--rounds", type=integer(1, MAX_REPEATS), default=15)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    check_args(p, args, unique=["contexts"])
    torch.set_num_threads(1)
    hkv, g, d = 3, 3, 64
    q = torch.randn(hkv, g, d)
    rows = []
    for n in args.contexts:
        f32 = [torch.randn(hkv, n, d) for _ in range(args.layers)]
        bf16 = [k.to(torch.bfloat16) for k in f32]
        int8 = []
        for k in f32:
            scale = k.abs().amax(-1) / 127
            int8.append([(torch.round(k[h] / scale[h, :, None]).to(torch.int8), scale[h].to(torch.bfloat16))
                         for h in range(hkv)])
        qb = q.to(torch.bfloat16)
        row = dict(context=n,
                   float32=per_layer_ms(lambda k: torch.matmul(q, k.transpose(1, 2)), f32, args.rounds),
                   bfloat16=per_layer_ms(lambda k: torch.matmul(qb, k.transpose(1, 2)), bf16, args.rounds),
                   int8=per_layer_ms(lambda k: [torch.ops.aten._weight_int8pack_mm(qb[h], w, s)
                                                for h, (w, s) in enumerate(k)], int8, args.rounds))
        print(f"{n:>6} keys: float32 {row['float32']:.2f} ms, bfloat16 {row['bfloat16']:.2f} ms, "
              f"int8 {row['int8']:.2f} ms per layer ({row['float32'] / row['int8']:.2f}x)")
        rows.append(row)
        del f32, bf16, int8
    if args.json:
        write_json(dict(config=vars(args), rows=rows), args.json)


if __name__ == "__main__":
    main()
