"""Which tokens must the bounded mode keep to find a pass-key? An oracle forces chosen tokens of the key
sentence into the recall cache of chosen layers (every K/V head), on the bounded SmolLM2-135M
conversion (``recall_tokens=256``), and the model answers the pass-key question greedily.

    OMP_NUM_THREADS=1 python benchmarks/recall_oracle_probe.py --length 8192 --filler prose \
        --depths 0.5 --force none digits digits+space sentence
    OMP_NUM_THREADS=1 python benchmarks/recall_oracle_probe.py --length 8192 --filler prose \
        --depths 0.5 --force digits+space --layers 0-14 15-29

``--force``: ``none`` (the recall error alone), ``digits`` (the key's digit tokens, both occurrences),
``digits+space`` (and the token before each digit: the space before the number), ``space`` (that
token alone, the digits left to the recall error), ``sentence`` (the whole key sentence). Forcing means the token's recall error counts as infinite, so it is kept while
the cache has room. Also prints, with ``none``, how many digit tokens each layer's heads hold at the
end of the prompt.
"""
from __future__ import annotations

import argparse
import re

import torch

import bsbr.ops.bsbr.recall as recall
from bsbr.convert import convert_to_bsbr, load_source, load_tokenizer
from bsbr.evaluate.passkey import greedy_continuation, passkey_found
from bsbr.numbers import MAX_RECALL_TOKENS, integer
from bsbr.evaluate.cli import needle_depth
from script_args import check_args, filler_spec, prompts

FORCES = ("none", "digits", "digits+space", "space", "sentence")


def layer_set(text: str, n: int):
    if text == "all":
        return set(range(n))
    lo, _, hi = text.partition("-")
    return set(range(int(lo), int(hi or lo) + 1))


def layer_range(text: str) -> str:
    """An argparse type: ``all``, a layer or a range of layers such as 0-14."""
    m = re.fullmatch(r"(\d+)(?:-(\d+))?", text, re.ASCII)
    if text != "all" and not (m and int(m[1]) <= int(m[2] or m[1])):
        raise argparse.ArgumentTypeError(f"{text!r}: give all, a layer (3) or a range of layers (0-14)")
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--length", type=integer(1), default=8192)
    ap.add_argument("--filler", type=filler_spec, default="prose")
    ap.add_argument("--depths", type=needle_depth, nargs="+", default=[0.5])
    ap.add_argument("--force", nargs="+", choices=FORCES, default=["none", "digits", "digits+space", "sentence"])
    ap.add_argument("--layers", type=layer_range, nargs="+", default=["all"],
                    help="layer ranges such as 0-14 (default all)")
    ap.add_argument("--recall-tokens", type=integer(1, MAX_RECALL_TOKENS), default=256)
    args = ap.parse_args()
    check_args(ap, args, unique=["depths", "force", "layers"], outputs=[])
    torch.set_num_threads(1)
    tok = load_tokenizer(None)
    model = convert_to_bsbr(load_source(None).eval(), retrieval_blocks=0, recall_tokens=args.recall_tokens).eval()
    n_layers = len(model.model.layers)
    past = [text for text in args.layers if text != "all" and max(layer_set(text, n_layers)) >= n_layers]
    if past:  # (forced nothing, reported as if it had)
        ap.error(f"--layers {past[0]}: the model has layers 0-{n_layers - 1}")
    now = dict(layer=0, forced=None, layers=set(), held={})
    keep_largest = recall.keep_largest

    def forcing(err, pos, cand, v, M):  # the cache's choice, with the forced tokens first
        if now["forced"] is not None and now["layer"] in now["layers"]:
            err = torch.where(torch.isin(pos, now["forced"]) & cand, torch.full_like(err, float("inf")), err)
        idx, on = keep_largest(err, pos, cand, v, M)
        now["held"][now["layer"]] = idx, pos
        return idx, on

    recall.keep_largest = forcing
    for i, layer in enumerate(model.model.layers):
        layer.register_forward_pre_hook(lambda mod, a, i=i: now.__setitem__("layer", i))
    for p in prompts(ap, tok, [args.length], args.depths, 1, 0, 8, [args.filler]):
        span = list(range(p.key_start, p.key_end))
        digits = [i for i in span if tok.decode([p.input_ids[i]]).strip().isdigit()]
        chosen = dict(none=[], digits=digits, sentence=span, space=sorted(set(i - 1 for i in digits) - set(digits)),
                      **{"digits+space": sorted({j for i in digits for j in (i - 1, i)})})
        for force in args.force:
            for layers in args.layers:
                now.update(forced=torch.tensor(chosen[force]) if chosen[force] else None,
                           layers=layer_set(layers, n_layers), held={})
                text = tok.decode(greedy_continuation(model, p.input_ids, 8, tok.eos_token_id))
                print(f"{args.filler} {args.length} depth {p.depth}: force {force!r} in layers {layers}: key {p.key} "
                      f"-> {text!r} {'FOUND' if passkey_found(text, p.key) else 'missed'}", flush=True)
                if force == "none":
                    d = torch.tensor(digits)
                    held = {li: torch.isin(pos.gather(-1, idx), d).sum(-1)[0].tolist()
                            for li, (idx, pos) in sorted(now["held"].items())}
                    print("  digit tokens held per K/V head at the last update, by layer:", held)


if __name__ == "__main__":
    main()
