"""Usage: python benchmarks/distill_recipe_probe.py kl STEPS LR [BASE_LR] [key=value ...]

A short distillation probe on SmolLM2-135M (chunk 256, 2,048-token windows): end-to-end KL plus
0.1 x LM loss, as these probes ran, on the new pieces; with BASE_LR > 0, on all weights, the source's
own at BASE_LR. (``kl`` names the recipe, as in the recorded commands; attention transfer, the other
mode, is retired.) ``key=value`` pairs are conversion options (e.g. ``compression_factor=4``,
``local_chunks=1``; ``bf16=1`` turns on autocast, ``bf16=0`` leaves it off; ``retrieval_mass``, ``meta`` and
``meta_init``, in the recorded commands, are retired). Prints perplexity on tokens past the first
chunk of 4 windows from 40 files not trained on, for full attention, chunk-local attention and the
distilled BSBR model.
(The probes in docs/findings.md, "Ruled out".)
"""
import argparse

from bsbr.convert.defaults import DEFAULT_OPTIONS
from bsbr.numbers import MAX_COUNT, finite_number, integer

OPTION_KEYS = (*DEFAULT_OPTIONS, "compression_factor", "bf16")


def option(text):
    """An argparse type: ``key=value``, the key a conversion option or bf16 (0 or 1)."""
    if "=" not in text or text.split("=")[0] not in OPTION_KEYS:
        raise argparse.ArgumentTypeError(f"{text!r}: give key=value, the key one of {', '.join(OPTION_KEYS)}")
    if text.startswith("bf16=") and text not in ("bf16=0", "bf16=1"):
        raise argparse.ArgumentTypeError(f"{text!r}: give bf16=0 or bf16=1")
    return text


usage, _, description = __doc__.partition("\n\n")
ap = argparse.ArgumentParser(usage=usage.removeprefix("Usage: "), description=description,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("mode", choices=["kl"], help="the recipe (attention transfer is retired)")
ap.add_argument("steps", type=integer(1, MAX_COUNT))
ap.add_argument("lr", type=finite_number(positive=True))
ap.add_argument("rest", nargs="*", metavar="[BASE_LR] key=value", help="the source's own learning rate (default 0: "
                "new pieces only), then conversion options")
args = ap.parse_args()  # (before a minute of loading)
try:  # BASE_LR, where the first of the rest is no key=value
    head = [] if not args.rest or "=" in args.rest[0] else args.rest[:1]
    args.base_lr = finite_number()(head[0]) if head else 0.0
    args.options = [option(text) for text in args.rest[len(head):]]
except argparse.ArgumentTypeError as e:
    ap.error(str(e))
keys = [text.split("=")[0] for text in args.options]
if len(set(keys)) < len(keys):
    ap.error(f"{next(k for k in keys if keys.count(k) > 1)} is given twice: give each option once")

import pathlib
import random
import sysconfig
import tempfile
import time

import torch

from bsbr.convert import convert_to_bsbr, load_source, load_tokenizer
from bsbr.distill import DistillConfig, distill
from bsbr.evaluate import perplexity_past

mode, steps, lr, base_lr = args.mode, args.steps, args.lr, args.base_lr


def _value(text):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


options = {k: _value(v) for k, v in (a.split("=", 1) for a in args.options) if k != "bf16"}
bf16 = "bf16=1" in args.options
torch.manual_seed(0)
tok, src = load_tokenizer(None), load_source(None).eval()
B, N = 256, 2048
files = sorted(pathlib.Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
random.Random(0).shuffle(files)


def windows(fs, k):
    out = []
    for f in fs:
        ids = tok(f.read_text(errors="ignore")).input_ids
        for i in range(0, len(ids) - N, N):
            out.append(torch.tensor(ids[i:i + N]))
            if len(out) >= k:
                return out
    return out


train, held = windows(files[:150], 200), windows(files[-40:], 4)
# measured before the exact window grew past one chunk and before exact blocks: chunk-local unless the options
# say otherwise
PLAIN = dict(local_chunks=1, sink_tokens=0, retrieval_blocks=0)
student = convert_to_bsbr(src, chunk_size=B, **{**PLAIN, **options})
local = convert_to_bsbr(src, chunk_size=B, **PLAIN)


def ppl(m):
    return perplexity_past(m, held, B)


pf, pl = ppl(src), ppl(local)
print("full", pf, "local", pl, flush=True)
cfg = DistillConfig(steps=steps, lr=lr, checkpoint_every=10**6, bf16=bf16, lm_weight=0.1,
                    **(dict(params="all", base_lr=base_lr) if base_lr > 0 else {}))
t = time.time()
with tempfile.TemporaryDirectory() as scratch:  # (a fresh folder: a rerun is no resume; the saved model goes after)
    distill(src, student, train, f"{scratch}/probe_{mode}", cfg)
pb = ppl(student)
print(f"{mode} base_lr={base_lr} bf16={bf16} {options}: {steps} steps in {time.time() - t:.0f}s; bsbr {pb:.3f}; gap closed {(pl - pb) / (pl - pf):.3f}")
