"""Usage: python benchmarks/exact_window_cost.py

Forward + backward time of one chunked BSBR attention op at SmolLM2-135M's shapes (9 query / 3 K/V
heads, head dim 64, 2,048 tokens, chunk 256, normalized retrieval with an open gate; features of size
64, where SmolLM2's Hedgehog map gives 128), 1 thread,
median of 3, for the one-chunk exact window and the wider ones (docs/findings.md, "The exact window,
and distillation"). Times are for comparing the rows of one run, not across machines."""
import sys

if {"-h", "--help"} & set(sys.argv[1:]):  # (it takes no arguments: no parser)
    sys.exit(print(__doc__))
if sys.argv[1:]:  # (an option it does not have, e.g. --json, was ignored after the whole run)
    sys.exit(__doc__)

import time

import torch

from bsbr.ops import BSBROptions, chunk_bsbr_attention

torch.set_num_threads(1)
b, hq, hkv, n, d, B = 1, 9, 3, 2048, 64, 256


def inputs():
    g = torch.Generator().manual_seed(0)
    x = [torch.randn(b, h, n, d, generator=g, requires_grad=True) for h in (hq, hkv, hkv, hq, hkv)]
    fq = torch.randn(b, hq, n, d, generator=g).exp().requires_grad_()
    fk = torch.randn(b, hkv, n, d, generator=g).exp().requires_grad_()
    return x, fq, fk


for L, S in ((1, 0), (2, 0), (2, 4)):
    times = []
    for _ in range(3):
        x, fq, fk = inputs()
        t0 = time.perf_counter()
        options = BSBROptions(chunk_size=B, retrieval="normalized", local_chunks=L, sink_tokens=S)
        o, _ = chunk_bsbr_attention(*x, options, fq=fq, fk=fk, gate=torch.tensor(0.5))
        o.sum().backward()
        times.append(time.perf_counter() - t0)
    print(f"local_chunks={L} sink_tokens={S}: forward + backward {1e3 * sorted(times)[1]:.0f} ms")
