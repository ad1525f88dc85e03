"""Which tokens the bounded mode's recall caches hold at the end of a long window: the most frequent
kept tokens per layer and over all (layer, K/V head) slots, beside the text's own most frequent tokens.

    OMP_NUM_THREADS=1 python benchmarks/recall_contents_probe.py --seq-len 16384 --source prose
"""
from __future__ import annotations

import argparse
import collections

import torch

from bsbr.convert import convert_to_bsbr, load_source, load_tokenizer
from bsbr.corpus import token_windows
from bsbr.numbers import MAX_RECALL_TOKENS, integer
from retrieval_probe import SOURCES, texts_of


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq-len", type=integer(1), default=16384)
    ap.add_argument("--source", choices=SOURCES, default="prose")
    ap.add_argument("--recall-tokens", type=integer(1, MAX_RECALL_TOKENS), default=256)
    ap.add_argument("--top", type=integer(1), default=8)
    args = ap.parse_args()
    torch.set_num_threads(1)
    tok = load_tokenizer(None)
    ids = token_windows(tok, texts_of(args.source), args.seq_len, 1)[:1]
    model = convert_to_bsbr(load_source(None).eval(), retrieval_blocks=0, recall_tokens=args.recall_tokens).eval()
    with torch.no_grad():
        cache = model(ids, use_cache=True, logits_to_keep=1).cache
    text = ids[0].tolist()
    total, slots = collections.Counter(), 0
    for layer, state in enumerate(cache.states):
        kept = collections.Counter(tok.decode([text[p]]) for p in state.recall_pos[0].flatten().tolist() if p >= 0)
        slots += state.recall_pos[0].numel()
        total.update(kept)
        print(f"layer {layer:2d}: {[(k, n) for k, n in kept.most_common(args.top)]}")
    print(f"all {slots} slots: {[(k, n) for k, n in total.most_common(2 * args.top)]}")
    print(f"the text: {[(k, n) for k, n in collections.Counter(tok.decode([t]) for t in text).most_common(args.top)]}")


if __name__ == "__main__":
    main()
