"""A converted model in bfloat16 against its own float32 self, beside the source's: mean KL and top-1
agreement of the next-token distributions past the first chunk, on standard-library code. For each
conversion, also with its op forced to the other dtype (the rule is ``bsbr.layers.bsbr_attention.op_dtype``:
float32 for the bounded mode, the model's dtype for the exact modes), so the rule can be checked.

    OMP_NUM_THREADS=2 python benchmarks/half_precision_probe.py --seq-len 8192 --variants default bounded \
        --json docs/eval/half_precision_8k.json
"""
from __future__ import annotations

import argparse
import copy
import inspect
import json
import json.decoder
import os
import typing

import torch

import bsbr.layers.bsbr_attention as layer_module
from bsbr.convert.converter import convert_to_bsbr, load_source, load_tokenizer
from bsbr.convert.defaults import DEFAULT_CHUNK_SIZE
from bsbr.numbers import integer
from bsbr.results import write_json
from script_args import check_args

VARIANTS = {"default": {}, "bounded": dict(recall_tokens=256)}


def text_ids(tokenizer, n: int) -> torch.Tensor:
    text = "".join(open(inspect.getsourcefile(m)).read() for m in (json.decoder, os, argparse, typing))
    ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :n]
    if ids.shape[1] < n:
        raise SystemExit(f"the texts hold {ids.shape[1]} tokens, fewer than --seq-len {n}")
    return ids


def agreement(ref: torch.Tensor, got: torch.Tensor, skip: int) -> dict:
    lr, lg = torch.log_softmax(ref.float(), -1)[0, skip:], torch.log_softmax(got.float(), -1)[0, skip:]
    kl = torch.nn.functional.kl_div(lg, lr, log_target=True, reduction="none").sum(-1)
    return dict(kl=round(kl.mean().item(), 5), top1=round((lr.argmax(-1) == lg.argmax(-1)).float().mean().item(), 4))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq-len", type=integer(DEFAULT_CHUNK_SIZE + 1), default=8192,
                    help="tokens (past the first chunk, which is not compared)")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    check_args(ap, args, unique=["variants"])
    src = load_source(None).eval()
    ids = text_ids(load_tokenizer(None), args.seq_len)
    rule = layer_module.op_dtype
    out = dict(seq_len=args.seq_len)
    with torch.no_grad():
        out["source"] = agreement(src(ids).logits, copy.deepcopy(src).to(torch.bfloat16)(ids).logits, 256)
        print("source", out["source"], flush=True)
        for name in args.variants:
            model = convert_to_bsbr(src, **VARIANTS[name]).eval()
            skip = model.config.chunk_size
            ref = model(ids).logits
            half = copy.deepcopy(model).to(torch.bfloat16)
            row = {"rule": agreement(ref, half(ids).logits, skip)}
            bounded = model.config.recall_tokens > 0
            other = torch.bfloat16 if bounded else torch.float32  # the op in the dtype the rule does not choose
            layer_module.op_dtype = lambda dtype, device, options: other
            try:
                row[f"op in {str(other).split('.')[-1]}"] = agreement(ref, half(ids).logits, skip)
            finally:
                layer_module.op_dtype = rule
            out[name] = row
            print(name, row, flush=True)
    if args.json:
        write_json(out, args.json)


if __name__ == "__main__":
    main()
