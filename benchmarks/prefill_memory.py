"""Peak memory and time of one chunked BSBR op call (the prefill form) at a long length, SmolLM2's shapes (9 query
heads, 3 K/V heads, head size 64), the default's options (chunk 256, window 2 chunks + 4 sinks, 8 blocks), one
thread, gate closed or open; features of size 16 (SmolLM2's Hedgehog map gives 128, so the open gate's
chunk states here are an eighth of a converted SmolLM2's); run each case in its own process, since the peak is
the process's:

    OMP_NUM_THREADS=1 python benchmarks/prefill_memory.py 65536 [open]
"""
import sys, time, resource, torch
from bsbr.ops import chunk_bsbr_attention, BSBROptions
torch.set_num_threads(1)
if len(sys.argv) > 1 and sys.argv[1] in ("-h", "--help"):
    sys.exit(print(__doc__))
if len(sys.argv) not in (2, 3) or not (sys.argv[1].isascii() and sys.argv[1].isdigit() and int(sys.argv[1]) > 0) \
        or sys.argv[2:] not in ([], ["open"]):  # (a mistyped "open" ran the closed gate)
    sys.exit(__doc__)
N = int(sys.argv[1]); gate_open = len(sys.argv) > 2 and sys.argv[2] == "open"
g = torch.Generator().manual_seed(0)
b, hq, hkv, d = 1, 9, 3, 64
q = torch.randn(b, hq, N, d, generator=g); k = torch.randn(b, hkv, N, d, generator=g); v = torch.randn(b, hkv, N, d, generator=g)
opt = BSBROptions(chunk_size=256, local_chunks=2, sink_tokens=4, retrieval_blocks=8, retrieval="normalized")
fq = torch.rand(b, hq, N, 16, generator=g); fk = torch.rand(b, hkv, N, 16, generator=g)
gate = torch.full((hq,), 0.5) if gate_open else 0
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with torch.no_grad():
    t = time.perf_counter()
    o, _ = chunk_bsbr_attention(q, k, v, q, k, opt, fq=fq, fk=fk, gate=gate)
    dt = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(f"N={N} gate={'open' if gate_open else 'closed'} time {dt:.2f}s peak RSS +{(peak - base) / 1024:.0f} MB checksum {o.double().sum().item():.6f}")
