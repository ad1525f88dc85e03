"""Per-head budgets for the bounded mode: do the heads that copy need more slots? Each K/V head of
SmolLM2-135M gets an induction score from the source model (random tokens repeated once: the attention
a token of the second copy pays to the token after its earlier occurrence, the largest of the head's
query heads); heads scoring at least T get BIG slots, the others SMALL; within a head the cache
chooses as always (recall error, near-duplicates last). The model answers pass-key prompts greedily.

    OMP_NUM_THREADS=1 python benchmarks/recall_head_budget_probe.py --length 8192 \
        --variants 256 0.1:2048:256 0.1:1024:170 --json docs/eval/retrieval/recall_head_budget_8k_prose.json

A variant is a uniform budget M, or T:BIG:SMALL. The budget is applied by capping each head's filled
slots inside a cache of max(BIG, SMALL) slots (so memory is not what a built mode would take).
"""
from __future__ import annotations

import argparse
import time

import torch

import bsbr.ops.bsbr.recall as recall
from bsbr.convert import convert_to_bsbr, load_source, load_tokenizer
from bsbr.evaluate.passkey import greedy_continuation, passkey_found
from bsbr.numbers import MAX_RECALL_TOKENS, finite_number, integer
from bsbr.results import write_json
from bsbr.evaluate.cli import needle_depth
from script_args import check_args, filler_spec, prompts


def induction_scores(model, n: int = 200, repeats: int = 4) -> torch.Tensor:
    """(layers, K/V heads): mean attention from the second copy of n random tokens to the token after
    each one's first occurrence; the largest over a K/V head's query heads."""
    model.config._attn_implementation = "eager"
    g = torch.Generator().manual_seed(0)
    total = 0
    for _ in range(repeats):
        x = torch.randint(1000, model.config.vocab_size - 1000, (1, n), generator=g)
        with torch.no_grad():
            att = model(torch.cat([x, x], 1), output_attentions=True).attentions
        i = torch.arange(n + 1, 2 * n)
        total = total + torch.stack([a[0][:, i, i - n + 1].mean(-1) for a in att])
    hq, hkv = model.config.num_attention_heads, model.config.num_key_value_heads
    return (total / repeats).view(-1, hkv, hq // hkv).amax(-1)


def variant(text: str) -> str:
    """An argparse type: a uniform budget M, or T:BIG:SMALL (each budget a count of recall tokens)."""
    parts = text.split(":")
    if len(parts) not in (1, 3):
        raise argparse.ArgumentTypeError(f"{text!r}: give a budget M or T:BIG:SMALL")
    if len(parts) == 3:
        finite_number()(parts[0])
    for m in parts[1:] or parts:
        integer(1, MAX_RECALL_TOKENS)(m)
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--length", type=integer(1), default=8192)
    ap.add_argument("--fillers", type=filler_spec, nargs="+", default=["prose"])
    ap.add_argument("--depths", type=needle_depth, nargs="+", default=[0.1, 0.5, 0.9])
    ap.add_argument("--variants", type=variant, nargs="+", default=["256", "0.1:2048:256", "0.1:1024:170"])
    ap.add_argument("--json")
    args = ap.parse_args()
    check_args(ap, args, unique=["fillers", "depths", "variants"])
    torch.set_num_threads(1)
    tok = load_tokenizer(None)
    source = load_source(None).eval()
    scores = induction_scores(source)
    source.config._attn_implementation = "sdpa"
    now = dict(layer=0, budget=None)
    keep_largest = recall.keep_largest

    def capped(err, pos, cand, v, M):  # the cache's choice, each head's filled slots capped at its budget
        idx, on = keep_largest(err, pos, cand, v, M)
        if now["budget"] is not None:
            on = on & (torch.arange(M).view(1, 1, M) < now["budget"][now["layer"]].view(1, -1, 1))
        return idx, on

    recall.keep_largest = capped
    grid = [p for f in args.fillers for p in prompts(ap, tok, [args.length], args.depths, 1, 0, 8, [f])]
    result = dict(length=args.length, induction_scores=scores.tolist(), variants={})
    for var in args.variants:
        if ":" in var:
            t, big, small = var.split(":")
            budget = torch.where(scores >= float(t), int(big), int(small))
            now["budget"], M = budget, int(budget.max())
        else:
            budget, now["budget"], M = None, None, int(var)
        model = convert_to_bsbr(source, retrieval_blocks=0, recall_tokens=M).eval()
        for i, layer in enumerate(model.model.layers):
            layer.register_forward_pre_hook(lambda mod, a, i=i: now.__setitem__("layer", i))
        rows = []
        for p in grid:
            t0 = time.time()
            text = tok.decode(greedy_continuation(model, p.input_ids, 8, tok.eos_token_id))
            rows.append(dict(filler=p.meta.get("filler"), depth=p.depth, key=p.key, answer=text,
                             found=passkey_found(text, p.key), seconds=round(time.time() - t0, 1)))
            print(var, rows[-1], flush=True)
        result["variants"][var] = dict(
            big_heads=None if budget is None else int((budget > budget.min()).sum()),
            total_slots=M * scores.numel() if budget is None else int(budget.sum()),
            found=sum(r["found"] for r in rows), prompts=rows)
        print(f"{var}: {result['variants'][var]['found']}/{len(rows)}", flush=True)
    if args.json:
        write_json(result, args.json)


if __name__ == "__main__":
    main()
