"""Chosen trials of ``bsbr eval``'s pass-key grid, one at a time: the same prompts (trial ``t`` of a
cell uses the filler ``t mod 3`` and the key of (seed, length, depth, t)), for a spot check where the
whole grid would take hours on a CPU (a 32,768-token trial takes about 16 minutes here).

    OMP_NUM_THREADS=1 python benchmarks/passkey_spots.py smol-k8h --length 16384 --depth 0.5 --trials 1 \\
        --json spots.json
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bsbr.evaluate.baselines import load_eval_tokenizer
from bsbr.evaluate.filler import DEFAULT_FILLERS
from bsbr.evaluate.passkey import greedy_continuation, passkey_found
from bsbr.models import load_bsbr_model
from bsbr.numbers import MAX_REPEATS, integer
from bsbr.results import write_json
from bsbr.evaluate.cli import needle_depth
from script_args import check_args, prompts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="a converted model directory")
    ap.add_argument("--length", type=integer(1), required=True)
    ap.add_argument("--depth", type=needle_depth, required=True)
    ap.add_argument("--trials", type=integer(0, MAX_REPEATS - 1), nargs="+", default=[0],
                    help="trial indices of the cell (default 0)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="append the results to this JSON list")
    args = ap.parse_args()
    check_args(ap, args, inputs=[("model", args.model)], models=[("model", args.model)])
    path = Path(args.json) if args.json else None
    old = json.loads(path.read_text()) if path is not None and path.exists() else []
    if not isinstance(old, list):  # (read before the run: the results are appended to it)
        ap.error(f"--json {args.json} holds no JSON list to append to: choose another file")
    model = load_bsbr_model(args.model).eval()
    tok = load_eval_tokenizer(args.model)  # the model's own (a tokenizer saved beside it), else SmolLM2's
    rows = []
    trials = max(max(args.trials) + 1, len(DEFAULT_FILLERS))  # (the grid reads every filler; trial t is the same)
    for p in prompts(ap, tok, [args.length], [args.depth], trials, args.seed, 8, DEFAULT_FILLERS):
        if p.meta["trial"] not in args.trials:
            continue
        t0 = time.perf_counter()
        with torch.no_grad():
            text = tok.decode(greedy_continuation(model, p.input_ids, 8, tok.eos_token_id), skip_special_tokens=True)
        row = dict(model=args.model, length=args.length, depth=args.depth, trial=p.meta["trial"],
                   filler=p.meta["filler"], key=p.key, key_start=p.key_start, output=text,
                   found=passkey_found(text, p.key), seconds=round(time.perf_counter() - t0, 1))
        print(json.dumps(row), flush=True)
        rows.append(row)
    if path is not None:
        write_json(old + rows, path)


if __name__ == "__main__":
    main()
