"""Does the op select the needle's chunk? One pass-key prompt of ``bsbr eval``'s grid, one prefill of a
saved conversion: for the last prompt tokens, the rank of the needle's chunk among each query head's
candidates under the op's own block scores (the chunked form's, as it selects), per layer.

    OMP_NUM_THREADS=1 python benchmarks/needle_selection_probe.py smol-k8h --length 32768 --depth 0.9 \\
        --trial 2 --json needle_selection.json

Prints, per layer, in how many of the query heads the needle's chunk is among the ``K`` selected at
the last prompt token (the one that answers). The needle's chunks are those holding the key sentence's
first 24 tokens. ``benchmarks/needle_rank_probe.py`` compares block scorers on far keys instead.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

import bsbr.ops.bsbr.chunk as chunk_op
from bsbr.evaluate.baselines import load_eval_tokenizer
from bsbr.evaluate.filler import DEFAULT_FILLERS

from bsbr.models import load_bsbr_model
from bsbr.numbers import MAX_REPEATS, integer
from bsbr.ops.bsbr.retrieval import rank_scores
from bsbr.evaluate.cli import needle_depth
from script_args import check_args, prompts

KEY_TOKENS = 24  # the key sentence's first tokens ("The pass key is 12345. Remember it.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="a converted model directory (exact blocks)")
    ap.add_argument("--length", type=integer(1), required=True)
    ap.add_argument("--depth", type=needle_depth, required=True)
    ap.add_argument("--trial", type=integer(0, MAX_REPEATS - 1), default=0,
                    help="trial index of the cell (filler trial mod 3)")
    ap.add_argument("--rows", type=integer(1), default=8, help="last prompt tokens whose ranks are kept")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    check_args(ap, args, inputs=[("model", args.model)], models=[("model", args.model)])
    model = load_bsbr_model(args.model).eval()
    K, B = model.config.retrieval_blocks, model.config.chunk_size
    if not K:
        ap.error(f"{args.model} retrieves no blocks (retrieval_blocks 0)")
    prompt = [p for p in prompts(ap, load_eval_tokenizer(args.model), [args.length], [args.depth],
                                 max(args.trial + 1, len(DEFAULT_FILLERS)),
                                 args.seed, 8, DEFAULT_FILLERS) if p.meta["trial"] == args.trial][0]
    n = len(prompt.input_ids)
    last = (n - 1) // B  # the chunk of the answering token
    R = min(args.rows, n - last * B)  # rows kept: the last ones, within that chunk
    L = model.config.local_chunks
    key_chunks = sorted({(prompt.key_start + i) // B for i in range(KEY_TOKENS)})
    if key_chunks[-1] > last - L:  # (an IndexError after the forward)
        ap.error(f"--depth {args.depth}: the key lies in chunk {key_chunks[-1]}, within the last token's exact window "
                 f"(chunks {last - L + 1}-{last}), where no block is selected: give a smaller --depth")
    ranks, select = [], chunk_op.select_blocks

    def spy(scores, candidate, k):
        # the op selects one query chunk at a time: scores (b, hkv, g, B, P) for chunk P + L - 1, whose
        # candidates are the P chunks before its window; keep the last chunk's, once per layer
        if scores.shape[-1] + L - 1 == last:
            rows = slice(n - R - last * B, n - last * B)
            cand = candidate.expand(scores.shape)[..., rows, :]
            s = rank_scores(scores[..., rows, :]).masked_fill(~cand, float("-inf"))
            best = s[..., key_chunks].amax(-1, keepdim=True)
            ranks.append((s > best).sum(-1)[0].reshape(-1, R).tolist())  # (heads, rows); 0 = the best
        return select(scores, candidate, k)

    chunk_op.select_blocks = spy
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            model(torch.tensor([prompt.input_ids]), logits_to_keep=1)
    finally:
        chunk_op.select_blocks = select
    if not ranks:
        raise SystemExit(f"no selection at {n} tokens: every chunk before the window is read ({K} blocks cover them)")
    chosen = [sum(r[-1] < K for r in layer) for layer in ranks]
    print(f"key at token {prompt.key_start} (chunks {key_chunks}) of {n}; query heads selecting it at the "
          f"last token, per layer: {chosen}; total {sum(chosen)} of {sum(map(len, ranks))}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(model=args.model, length=args.length, depth=args.depth, trial=args.trial,
                           filler=prompt.meta["filler"], key=prompt.key, key_start=prompt.key_start,
                           key_chunks=key_chunks, K=K, selecting_at_last_token=chosen, ranks=ranks,
                           seconds=round(time.perf_counter() - t0, 1)), f, indent=1)


if __name__ == "__main__":
    main()
