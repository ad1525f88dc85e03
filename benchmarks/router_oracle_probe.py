"""Would a trained router pay? The default router (a chunk's largest ``q.k`` at far positions) against
an oracle that picks each token's top-K chunks by the attention mass full attention gives them (the
log-sum-exp of ``q.k`` at the tokens' own positions, computed in place from the converted model's own
queries and keys), on SmolLM2-135M at 8,192 tokens (inside the source's positions).

    OMP_NUM_THREADS=1 python benchmarks/router_oracle_probe.py --select oracle --json oracle.json
    OMP_NUM_THREADS=1 python benchmarks/router_oracle_probe.py --select router --json router.json

A router trained by KL to the teacher's mass per block (DSA, SeerAttention) can at best choose what
the oracle chooses, so ``ppl(router) - ppl(oracle)`` bounds what training it could buy. Besides
perplexity past the first chunk (code = held-out stdlib, prose = licence texts, the windows of
``benchmarks/retrieval_probe.py``), both runs report per layer, over tokens with more candidate
chunks than K: the share of full attention's mass on the chunks before the window (``far``), and the
share of that far mass on the K chunks each score selects (``recall_router``, ``recall_oracle``).
Selection only: the selected blocks are read at far positions (the conversion's rule) either way.
"""
from __future__ import annotations

import argparse
import math
import time
from collections import defaultdict

import torch

import bsbr.layers.bsbr_attention as layer_mod
import bsbr.ops.bsbr.chunk as chunk_mod
from bsbr.convert import convert_to_bsbr, load_source, load_tokenizer
from bsbr.convert.defaults import DEFAULT_CHUNK_SIZE, DEFAULT_OPTIONS
from bsbr.corpus import token_windows
from bsbr.evaluate import perplexity_past
from bsbr.numbers import integer
from bsbr.results import write_json
from retrieval_probe import SOURCES, texts_of
from script_args import check_args

STASH: dict = {}
STATS = defaultdict(lambda: defaultdict(list))  # layer -> name -> per-chunk means


def stash_true_qk(op):
    """Wrap the chunked op: remember this call's queries and keys at their own positions."""
    def wrapped(q, k, *args, **kwargs):
        STASH.update(q=q, k=k, layer=STASH.get("calls", 0) % STASH["layers"], calls=STASH.get("calls", 0) + 1)
        return op(q, k, *args, **kwargs)
    return wrapped


def scoring(router_scores, options, select: str):
    """block_scores as _block_terms calls it (chunk c's queries against chunks 0 .. c - L), plus the
    oracle's scores and the recall statistics; returns the scores of ``select``."""
    B, L, S, K = options.chunk_size, options.local_chunks, options.sink_tokens, options.retrieval_blocks

    def scores(q_c, kr, sinks, keep=False):
        router = router_scores(q_c, kr, sinks)
        P = kr.shape[-3]
        c = P + L - 1
        q, k = STASH["q"], STASH["k"]
        b, hkv, N, d = k.shape
        g = q.shape[1] // hkv
        qt = q.view(b, hkv, g, N // B, B, d)[:, :, :, c].reshape(b, hkv, g * B, d)
        s = (qt @ k[:, :, :(c + 1) * B].transpose(-1, -2)) / math.sqrt(d)  # (b, hkv, gB, (c+1)B)
        t = c * B + torch.arange(B).repeat(g)  # each row's token
        key = torch.arange((c + 1) * B)
        s = s.masked_fill(key[None, :] > t[:, None], float("-inf"))
        lse_all = s.logsumexp(-1)
        far = s[..., :P * B].view(b, hkv, g * B, P, B).clone()
        far[..., 0, :S] = float("-inf")  # sinks are read in the window part, never as a block
        lse = far.logsumexp(-1)  # (b, hkv, gB, P): log mass per chunk before the window
        lse_far = lse.logsumexp(-1)
        if P > K:
            m = (lse - lse_far.unsqueeze(-1)).exp()  # far mass shares
            st = STATS[STASH["layer"]]
            st["far"].append((lse_far - lse_all).exp().mean().item())
            st["recall_router"].append(m.gather(-1, router.topk(K, -1).indices).sum(-1).mean().item())
            st["recall_oracle"].append(m.topk(K, -1).values.sum(-1).mean().item())
        return lse if select == "oracle" else router
    return scores


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--select", choices=["router", "oracle"], required=True)
    ap.add_argument("--seq-len", type=integer(1), default=8192)
    ap.add_argument("--windows", type=integer(1), default=2)
    ap.add_argument("--sources", nargs="+", choices=SOURCES, default=list(SOURCES))
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    check_args(ap, args, unique=["sources"])
    B, opt = DEFAULT_CHUNK_SIZE, DEFAULT_OPTIONS  # (the conversion below: checked before loading it)
    shortest = (opt["local_chunks"] + opt["retrieval_blocks"] + 1) * B  # a chunk with more candidates than blocks
    if args.seq_len % B or args.seq_len < shortest:  # (the oracle views the queries chunk by chunk)
        ap.error(f"--seq-len must be a multiple of the default conversion's chunk size, {B}, from {shortest:,} (a "
                 "chunk with more candidates than blocks)")
    source = load_source(None).eval()
    if args.seq_len > source.config.max_position_embeddings:
        raise SystemExit("--seq-len must lie inside the source's positions (the oracle reads them)")
    model = convert_to_bsbr(source).eval()  # the default conversion
    del source
    options = model.model.layers[0].attn.options
    STASH["layers"] = len(model.model.layers)
    layer_mod.chunk_bsbr_attention = stash_true_qk(layer_mod.chunk_bsbr_attention)
    chunk_mod.block_scores = scoring(chunk_mod.block_scores, options, args.select)
    tok = load_tokenizer(None)
    result = dict(select=args.select, seq_len=args.seq_len, options=repr(options), ppl={}, per_layer={}, seconds={})
    for kind in args.sources:
        STATS.clear()
        windows = token_windows(tok, texts_of(kind), args.seq_len, args.windows)
        t0 = time.perf_counter()
        with torch.inference_mode():
            result["ppl"][kind] = perplexity_past(model, windows, options.chunk_size)
        result["seconds"][kind] = round(time.perf_counter() - t0, 1)
        result["per_layer"][kind] = {l: {n: sum(v) / len(v) for n, v in st.items()} for l, st in sorted(STATS.items())}
        mean = {n: sum(r[n] for r in result["per_layer"][kind].values()) / len(STATS) for n in next(iter(STATS.values()))}
        result.setdefault("mean", {})[kind] = mean
        print(f"{kind:>6} select={args.select}: ppl {result['ppl'][kind]:.3f}; far mass {mean['far']:.3f}, "
              f"recall router {mean['recall_router']:.3f}, oracle {mean['recall_oracle']:.3f} "
              f"({result['seconds'][kind]:.0f} s)", flush=True)
    if args.json:
        write_json(result, args.json)


if __name__ == "__main__":
    main()
