"""Which tokens would a bounded recall cache keep? On 16k prose pass-key prompts, count the
(layer, K/V head) pairs of a bounded conversion whose M = 256 highest-scoring tokens (of those that
have left the window, sinks excluded) hold all / any of the key's digit tokens, per criterion: the
recall error the mode uses (LoLA), that error over |v|, the far key's norm, and the attention the
token received from the queries whose window held it (sum and max). Each score is computed against
the state of every token, a one-shot approximation of the cache built chunk by chunk.

    bsbr convert smol-r256 --retrieval-blocks 0 --recall-tokens 256
    OMP_NUM_THREADS=1 python benchmarks/recall_selection_probe.py smol-r256 0.5,0.9 out.json
"""
import argparse

from bsbr.evaluate.cli import needle_depth
from script_args import check_args, prompts


def depth_list(text):
    return [needle_depth(x) for x in text.split(",")]


ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("model", metavar="MODEL_DIR")
ap.add_argument("depths", type=depth_list, metavar="DEPTHS", help="pass-key depths, comma-separated")
ap.add_argument("out", metavar="OUT.json")
args = ap.parse_args()
# (checked first: the output path was read after all the prompts had run)
check_args(ap, args, outputs=[("OUT.json", args.out)], inputs=[("MODEL_DIR", args.model)],
           models=[("MODEL_DIR", args.model)])

import json, math, torch
import bsbr.layers.bsbr_attention as ba
from bsbr import load_bsbr_model
from bsbr.evaluate.baselines import load_eval_tokenizer
from bsbr.results import write_json
torch.set_num_threads(1)
M, B, S = 256, 256, 4
model = load_bsbr_model(args.model).eval()
tok = load_eval_tokenizer(args.model)
grid = prompts(ap, tok, [16384], args.depths, 1, 0, 8, ["prose"])
caught = []
orig = ba._run_op
def grab(op, tensors, **kw):
    q, k, v, mq, mk, fq, fk, qr, kr = tensors
    caught.append(dict(q=q[0].detach(), k=k[0].detach(), v=v[0].detach(), fk=fk[0].detach(), kr=kr[0].detach()))
    return orig(op, tensors, **kw)
ba._run_op = grab
out = {}
for p in grid:
    caught.clear()
    ids = torch.tensor([p.input_ids])
    with torch.inference_mode():
        model(ids, use_cache=False)
    n = ids.shape[1]
    digits = [j for j in range(p.key_start, p.key_end) if tok.decode([p.input_ids[j]]).strip().isdigit()]
    W = 2 * B
    left = torch.arange(S, n - W)  # tokens that have left the window by the end (not sinks)
    res = {c: [0, 0] for c in ("recall", "recall_over_v", "key_norm", "recv_sum", "recv_max")}
    for layer, t in enumerate(caught):
        q, k, v, fk, kr = t["q"], t["k"], t["v"], t["fk"], t["kr"]
        hkv, g = k.shape[0], q.shape[0] // k.shape[0]
        for h in range(hkv):
            F, z = fk[h].T @ v[h], fk[h].sum(0)
            pred = (fk[h] @ F) / (fk[h] @ z)[:, None]
            err = (pred - v[h]).norm(dim=-1)
            crit = dict(recall=err, recall_over_v=err / v[h].norm(dim=-1), key_norm=kr[h].norm(dim=-1))
            # attention received from queries whose window holds the key (own and next chunk)
            rs, rm = torch.zeros(n), torch.zeros(n)
            C = -(-n // B)
            for c in range(C):
                qi = q[h * g:(h + 1) * g, c * B:(c + 1) * B]  # (g, T, d)
                lo = max(0, (c - 1) * B)
                kk = k[h, lo:(c + 1) * B]
                s = qi @ kk.T / math.sqrt(q.shape[-1])
                ti = torch.arange(c * B, c * B + qi.shape[1])[:, None]
                tj = torch.arange(lo, lo + kk.shape[0])[None, :]
                s = s.masked_fill(tj > ti, float("-inf"))
                pr = torch.softmax(s, -1)  # (g, T, keys)
                rs[lo:lo + kk.shape[0]] += pr.sum((0, 1))
                rm[lo:lo + kk.shape[0]] = torch.maximum(rm[lo:lo + kk.shape[0]], pr.amax((0, 1)))
            crit.update(recv_sum=rs, recv_max=rm)
            for name, sc in crit.items():
                top = set(left[sc[left].topk(M).indices].tolist())
                hit = [d in top for d in digits]
                res[name][0] += all(hit)
                res[name][1] += any(hit)
    pairs = len(caught) * caught[0]["k"].shape[0]
    out[f"{p.depth}"] = dict(digits=len(digits), pairs=pairs, all_digits_kept=({c: r[0] for c, r in res.items()}),
                             any_digit_kept={c: r[1] for c, r in res.items()})
    print(p.depth, json.dumps(out[f"{p.depth}"]), flush=True)
write_json(out, args.out)
