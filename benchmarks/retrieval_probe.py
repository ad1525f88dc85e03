"""Zero-shot block retrieval on SmolLM2-135M: perplexity past the first chunk on long windows, for
the source (full attention), the window alone (exact window, no retrieval) and conversions with
``retrieval_blocks`` K and a ``far_positions`` rule, side by side in one run, on several text
sources (held-out standard-library code and licence prose).

    OMP_NUM_THREADS=2 python benchmarks/retrieval_probe.py --seq-len 8192 --windows 2 \
        --variants source window K2w K4w K8w K4a --json retrieval_8k.json

Variant names: ``source``; ``window`` (K = 0); ``K<k><w|a|h>``: k exact blocks, far positions ``window``
(w), ``absolute`` (a) or ``hybrid`` (h); ``R<m>``: the bounded mode, m recall tokens per layer and K/V head. Past the source's 8,192 positions only the BSBR variants run.
Prints perplexity per source and the share of the window -> full gap each variant closes
(``(ppl_window - ppl_variant) / (ppl_window - ppl_source)``) and the retrieved share of the context
(K * chunk / seq_len).
"""
from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

import torch

from bsbr.convert import convert_to_bsbr, load_source, load_tokenizer
from bsbr.corpus import stdlib_texts, token_windows
from bsbr.evaluate import perplexity_past
from bsbr.evaluate.filler import LICENSES_DIR
from bsbr.numbers import integer
from bsbr.results import write_json
from script_args import check_args

SOURCES = ("code", "prose")  # the texts of texts_of


def texts_of(kind: str):
    if kind == "code":
        return stdlib_texts("heldout", seed=0)
    if kind == "prose":
        return (p.read_text(errors="replace") for p in sorted(Path(LICENSES_DIR).iterdir()) if p.is_file())
    raise ValueError(kind)


def build(source, name: str, chunk: int):
    if name == "source":
        return source
    if name == "window":
        # sinks at window positions, as every "window alone" figure in docs/findings.md was measured
        return convert_to_bsbr(source, chunk_size=chunk, retrieval_blocks=0, far_positions="window").eval()
    m = re.fullmatch(r"R(\d+)", name)
    if m:
        return convert_to_bsbr(source, chunk_size=chunk, retrieval_blocks=0, recall_tokens=int(m.group(1))).eval()
    m = re.fullmatch(r"K(\d+)([wah])", name)
    if not m:
        raise SystemExit(f"unknown variant {name!r}")
    far = {"w": "window", "a": "absolute", "h": "hybrid"}[m.group(2)]
    return convert_to_bsbr(source, chunk_size=chunk, retrieval_blocks=int(m.group(1)), far_positions=far).eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq-len", type=integer(1), default=8192)
    ap.add_argument("--windows", type=integer(1), default=2, help="windows per text source")
    ap.add_argument("--chunk-size", type=integer(1), default=256)
    ap.add_argument("--sources", nargs="+", choices=SOURCES, default=list(SOURCES))
    ap.add_argument("--variants", nargs="+", default=["source", "window", "K2w", "K4w", "K8w", "K4a"])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    check_args(ap, args, unique=["sources", "variants"])
    bad = [v for v in args.variants if v not in ("source", "window") and not re.fullmatch(r"R\d+|K\d+[wah]", v)]
    if bad:  # (refused before hours of the earlier variants, not when its turn comes)
        ap.error(f"unknown variants {bad}: source, window, R<m> or K<k>{{w,a,h}}")
    source = load_source(None).eval()
    tok = load_tokenizer(None)
    too_long = args.seq_len > source.config.max_position_embeddings
    names = [v for v in args.variants if not (too_long and v == "source")]
    result = dict(seq_len=args.seq_len, chunk_size=args.chunk_size, threads=torch.get_num_threads(),
                  torch=torch.__version__, ppl={}, seconds={})
    for kind in args.sources:
        windows = token_windows(tok, texts_of(kind), args.seq_len, args.windows)
        result["ppl"][kind], result["seconds"][kind] = {}, {}
        for name in names:
            model = build(source, name, args.chunk_size)
            t0 = time.perf_counter()
            ppl = perplexity_past(model, windows, args.chunk_size)
            result["ppl"][kind][name] = ppl
            result["seconds"][kind][name] = round(time.perf_counter() - t0, 1)
            print(f"{kind:>6} {name:>7}: ppl {ppl:8.3f} ({result['seconds'][kind][name]:.0f} s, "
                  f"{windows.shape[0]} x {args.seq_len} tokens)", flush=True)
            if model is not source:
                del model
    print(f"\nretrieved share of the context: K * {args.chunk_size} / {args.seq_len}")
    for kind, ppl in result["ppl"].items():
        for name, value in ppl.items():
            if name in ("source", "window") or "window" not in ppl:
                continue
            line = f"{kind:>6} {name:>7}: {ppl['window'] - value:+.3f} vs window"
            if "source" in ppl:
                line += f", gap closed {100 * (ppl['window'] - value) / (ppl['window'] - ppl['source']):.1f}%"
            k = re.match(r"K(\d+)", name)  # exact blocks: K chunks of the context; recall: a fixed budget
            # (at most the chunks before the last token's window of 2 chunks: all of them past that)
            read = min(int(k.group(1)), max(args.seq_len // args.chunk_size - 2, 0)) * args.chunk_size if k else 0
            print(line + (f", retrieved {100 * read / args.seq_len:.1f}%" if k else ""))
    if args.json:
        write_json(result, args.json)


if __name__ == "__main__":
    main()
