"""Does the block router find the needle? On pass-key prompts, rank the needle's chunk among the
chunks before the window under several block scorers, for the (layer, head, query) triples that
attend to it, in the default SmolLM2-135M conversion.

    OMP_NUM_THREADS=1 python benchmarks/needle_rank_probe.py --length 16384 --depths 0.5 \
        --fillers random prose --json needle_ranks_16k.json

The model is run once per prompt (prefill only); the far queries of the last ``--rows`` tokens (the
question) and every far key are kept per layer. For each query head, the "far mass" of a chunk is its
share of the softmax over all keys before the window (what reading every chunk would give it). The
triples whose far mass on the needle's chunk(s) is at least ``--min-mass`` are the ones retrieval must
serve; for each, the needle's rank (0 = best) under:

* ``max``: the chunk's largest exact ``q.k`` (the op's block score; one ``q.k`` per key);
* ``mean``: ``q . mean(k)`` over the chunk (MoBA's score);
* ``bound<p>``: the largest key bound (Quest) over pieces of ``p`` tokens (the op's score before the
  exact maximum replaced it).

Prints and writes the share of triples whose needle is in the top 8 and top 16, and the median rank.
"""
from __future__ import annotations

import argparse
import statistics

import torch

import bsbr.layers.bsbr_attention as attention_layer
from bsbr.convert import convert_to_bsbr, load_source, load_tokenizer

from bsbr.numbers import MAX_REPEATS, integer
from bsbr.ops.bsbr.retrieval import block_scores
from bsbr.results import write_json
from bsbr.evaluate.cli import needle_depth
from script_args import check_args, filler_spec, prompts

PIECES = (4, 8, 16, 32, 256)


def capture(model, input_ids, rows):
    """Per layer: the far queries of the last ``rows`` tokens (hq, rows, d) and the far keys (hkv, n, d)."""
    got, op = [], attention_layer.chunk_bsbr_attention

    def spy(q, k, v, mq, mk, options, *, qr=None, kr=None, **kw):
        got.append((qr[0, :, -rows:].double(), kr[0].double()))
        return op(q, k, v, mq, mk, options, qr=qr, kr=kr, **kw)

    attention_layer.chunk_bsbr_attention = spy
    try:
        with torch.inference_mode():
            model(torch.tensor([input_ids]))
    finally:
        attention_layer.chunk_bsbr_attention = op
    return got


def scorers(q, keys, sinks, B):
    """Scores (R, P) of each candidate chunk for queries q (R, d) against keys (P * B, d), and each
    chunk's share of the softmax over all of them (R, P)."""
    P = keys.shape[0] // B
    logit = q @ keys.T  # (R, P * B)
    logit[:, :sinks] = float("-inf")
    out = {"max": block_scores(q, keys.view(P, B, -1), sinks)}
    keep = (torch.arange(P * B) >= sinks).view(P, B)
    out["mean"] = q @ ((keys.view(P, B, -1) * keep[..., None]).sum(1) / keep.sum(1, keepdim=True).clamp(min=1)).T
    for p in PIECES:
        out[f"bound{p}"] = bound_scores(q, keys.view(P, B, -1), keep, p)
    return out, torch.softmax(logit / q.shape[-1] ** 0.5, -1).view(-1, P, B).sum(-1)


def bound_scores(q, keys, keep, p):
    """Quest's score: the largest ``q.k`` that the per-dimension min/max of the kept keys of one of a
    chunk's ``p``-token pieces allow. q (R, d), keys (P, B, d), keep (P, B) -> (R, P)."""
    P, B, d = keys.shape
    k, m = keys.view(P, B // p, p, d), keep.view(P, B // p, p, 1)
    kmin, kmax = k.masked_fill(~m, float("inf")).amin(2), k.masked_fill(~m, float("-inf")).amax(2)
    sc = q.clamp(min=0) @ kmax.flatten(0, 1).T + q.clamp(max=0) @ kmin.flatten(0, 1).T  # (R, P * pieces)
    sc = sc.masked_fill(~m.any(2).flatten(), float("-inf"))  # empty pieces never count
    return sc.view(-1, P, B // p).amax(-1)


def ranks(prompt, got, B, L, sinks, min_mass):
    n = len(prompt.input_ids)
    P = (n - 1) // B - L + 1  # chunks before the last token's window
    needle = sorted({prompt.key_start // B, (prompt.key_end - 1) // B})
    out = {}
    if needle[-1] >= P:  # the needle lies in the last token's window: nothing to retrieve
        return out
    for qr, kr in got:
        g = qr.shape[0] // kr.shape[0]
        for h in range(qr.shape[0]):
            sc, mass = scorers(qr[h], kr[h // g, :P * B], sinks, B)
            for r in (mass[:, needle].sum(-1) >= min_mass).nonzero()[:, 0].tolist():
                for name, s in sc.items():
                    out.setdefault(name, []).append(int(min((s[r] > s[r, c]).sum() for c in needle)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--length", type=integer(1), default=16384)
    ap.add_argument("--depths", type=needle_depth, nargs="+", default=[0.5, 0.9])
    ap.add_argument("--fillers", type=filler_spec, nargs="+", default=["prose", "random"])
    ap.add_argument("--trials", type=integer(1, MAX_REPEATS), default=1, help="prompts per (depth, filler)")
    ap.add_argument("--rows", type=integer(1), default=24, help="query tokens at the end of the prompt")
    ap.add_argument("--min-mass", type=float, default=0.1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    check_args(ap, args, unique=["depths", "fillers"])
    torch.set_num_threads(1)
    source, tok = load_source(None).eval(), load_tokenizer(None)
    model = convert_to_bsbr(source).eval()
    cfg = model.config
    all_ranks = {}
    for filler in args.fillers:
        for prompt in prompts(ap, tok, [args.length], args.depths, args.trials, 0, 8, [filler]):
            r = ranks(prompt, capture(model, prompt.input_ids, args.rows), cfg.chunk_size, cfg.local_chunks,
                      cfg.sink_tokens, args.min_mass)
            print(filler, prompt.depth, "triples", len(r.get("max", [])),
                  "" if r else "(needle in the window: skipped)", flush=True)
            for name, v in r.items():
                all_ranks.setdefault(name, []).extend(v)
    if not all_ranks:
        raise SystemExit("needle_rank_probe.py: no needle lay before the window: "
                         "use a longer --length or smaller --depths")
    summary = {name: dict(top8=sum(x < 8 for x in v) / len(v), top16=sum(x < 16 for x in v) / len(v),
                          median_rank=statistics.median(v), triples=len(v)) for name, v in all_ranks.items()}
    for name, s in summary.items():
        print(f"{name:9s} top-8 {s['top8']:.2f}  top-16 {s['top16']:.2f}  median rank {s['median_rank']:.0f}")
    if args.json:
        write_json(dict(args=vars(args), summary=summary), args.json)


if __name__ == "__main__":
    main()
