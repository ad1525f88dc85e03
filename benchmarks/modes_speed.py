"""What each retrieval mode costs in time and memory: the source, the default conversion (exact
blocks, K = 8) and the bounded mode (256 recall tokens, no blocks), side by side in one process on
SmolLM2-135M: prefill time (the last position's logits, as ``generate``'s prefill; results written before
2026-12-04, without ``prefill_logits``, computed every position's), decode ms per token with the models'
steps alternating, and the cache's bytes per context token.

    OMP_NUM_THREADS=1 python benchmarks/modes_speed.py --contexts 1024 8192 --decode-steps 16 \
        --json docs/benchmarks/modes_speed_1k_8k.json

``--models exact bounded --decode-only`` times the conversions' decode alone (a 32k prefill of the
three models takes most of an hour on one thread).
"""
from __future__ import annotations

import argparse
import json

import torch

from bsbr.bench.common import interleaved_times, median
from bsbr.bench.converted import _decode
from bsbr.convert import convert_to_bsbr, load_source
from bsbr.numbers import MAX_RECALL_TOKENS, integer
from bsbr.results import write_json
from script_args import check_args


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--contexts", type=integer(1), nargs="+", default=[1024, 8192])
    ap.add_argument("--decode-steps", type=integer(1), default=16)
    ap.add_argument("--recall-tokens", type=integer(1, MAX_RECALL_TOKENS), default=256)
    ap.add_argument("--models", nargs="+", choices=["source", "exact", "bounded"],
                    default=["source", "exact", "bounded"])
    ap.add_argument("--decode-only", action="store_true", help="no timed prefill (the decode's own prefill is untimed)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    check_args(ap, args, unique=["models"])  # (a context given twice brackets a long run: its drift shows)
    torch.set_num_threads(1)
    source = load_source(None).eval()
    build = {"source": lambda: source, "exact": lambda: convert_to_bsbr(source).eval(),
             "bounded": lambda: convert_to_bsbr(source, retrieval_blocks=0, recall_tokens=args.recall_tokens).eval()}
    models = {name: build[name]() for name in args.models}
    g = torch.Generator().manual_seed(0)
    rows = []
    for n in args.contexts:
        ids = torch.randint(0, source.config.vocab_size, (1, n), generator=g)
        prefill = {}
        if not args.decode_only:
            fns = {name: (lambda m=m: m(ids, use_cache=False, logits_to_keep=1)) for name, m in models.items()}
            with torch.no_grad():
                prefill = {name: median(t) for name, t in interleaved_times(fns, repeats=1, warmup=0).items()}
        decode = _decode(models, ids, args.decode_steps)
        row = dict(context=n, prefill_s={k: round(v, 2) for k, v in prefill.items()},
                   decode_ms={k: round(v[0], 1) for k, v in decode.items()},
                   cache_bytes_per_token={k: round(v[1]) for k, v in decode.items()})
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        write_json(dict(threads=1, torch=torch.__version__, models=args.models, decode_steps=args.decode_steps,
                        recall_tokens=args.recall_tokens, prefill_logits="last", rows=rows), args.json)


if __name__ == "__main__":
    main()
