"""How much of the default conversion's decode step is the op's bookkeeping: the source, the BSBR model,
and the BSBR model with its op replaced by nothing but its two fused attention calls on the cache's
buffers (the window at own positions, the earlier chunks at far positions; no writes, checks or masks,
so its outputs are wrong), decode steps alternating in one process, following the source's tokens.
Prints the median ms per token of each and their ratios to the source.

    OMP_NUM_THREADS=1 python benchmarks/decode_overhead_probe.py --context 1024 --steps 80

The context and its steps must lie where every earlier chunk is read (from L to L + K chunks).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import bsbr.layers.bsbr_attention as layer
from bsbr.convert import convert_to_bsbr, load_source
from bsbr.convert.defaults import DEFAULT_CHUNK_SIZE, DEFAULT_OPTIONS
from bsbr.numbers import integer
from bsbr.results import write_json
from bsbr.ops.bsbr.softmax import attention_lse
from script_args import check_args


def attention_calls_only(q, k, v, mq, mk, options, *, qr=None, initial_state=None, **_):
    """The step's two fused calls on the state as it stands (the token itself is not written)."""
    s, B, L = initial_state, options.chunk_size, options.local_chunks
    n = int(s.n_seen[0])
    b, hq, _, d = q.shape
    hkv = s.k_buf.shape[1]
    W, c = s.k_buf.shape[2], n // B
    lo, hi = W - L * B, W - B + n % B + 1  # the window's slots
    o0, l0 = attention_lse(q.view(b, hkv, hq // hkv, d), s.k_buf[:, :, lo:hi], s.v_buf[:, :, lo:hi], None, d ** -0.5)
    far = (c - L + 1) * B  # chunks 0 .. c - L
    o1, l1 = attention_lse(qr.view(b, hkv, hq // hkv, d), s.kr_past[:, :, :c - L + 1].reshape(b, hkv, far, d),
                           s.v_past[:, :, :c - L + 1].reshape(b, hkv, far, -1), None, d ** -0.5)
    return torch.lerp(o1, o0, torch.sigmoid(l0 - l1).unsqueeze(-1)).reshape(b, hq, 1, -1), s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--context", type=integer(1), default=1024)
    ap.add_argument("--steps", type=integer(1), default=80)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    check_args(ap, args)
    B, opt = DEFAULT_CHUNK_SIZE, DEFAULT_OPTIONS  # (the conversion below: checked before a minute of loading)
    lo, hi = opt["local_chunks"] * B, (opt["local_chunks"] + opt["retrieval_blocks"]) * B
    if not lo <= args.context <= hi - args.steps:  # every step reads every earlier chunk
        ap.error(f"--context must leave every earlier chunk read through its --steps: {lo} to {hi - args.steps} tokens")
    source = load_source(None).eval()
    model = convert_to_bsbr(source).eval()
    op = layer.recurrent_bsbr_attention
    ids = torch.randint(0, source.config.vocab_size, (1, args.context), generator=torch.Generator().manual_seed(0))
    times = {"source": [], "bsbr": [], "attention calls only": []}
    with torch.no_grad():
        out = {name: (source if name == "source" else model)(ids, use_cache=True, logits_to_keep=1) for name in times}
        for _ in range(args.steps):
            tok = out["source"].logits[:, -1:].argmax(-1)
            for name in times:
                layer.recurrent_bsbr_attention = attention_calls_only if name == "attention calls only" else op
                t0 = time.perf_counter()
                out[name] = (source if name == "source" else model)(tok, cache=out[name].cache, use_cache=True)
                times[name].append(1000.0 * (time.perf_counter() - t0))
    layer.recurrent_bsbr_attention = op
    med = {name: statistics.median(t) for name, t in times.items()}
    result = dict(context=args.context, steps=args.steps, threads=torch.get_num_threads(), median_ms=med,
                  ratio_to_source={name: m / med["source"] for name, m in med.items()})
    print(", ".join(f"{name} {m:.1f} ms ({m / med['source']:.3f}x)" for name, m in med.items()))
    if args.json:
        write_json(result, args.json)


if __name__ == "__main__":
    main()
