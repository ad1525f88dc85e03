"""``bsbr eval``: how much of its source a converted model keeps, with numbers."""
from __future__ import annotations

import argparse
import logging
import sys

logger = logging.getLogger(__name__)


def _depth(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"depth must lie in [0, 1], got {text}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _check_result_path(path, option: str) -> None:
    """A results file: not a directory, in a directory that exists or can be made and written."""
    import os
    from pathlib import Path

    from ..outputs import UserError

    if path is None:
        return
    p = Path(path)
    if p.is_dir():
        raise UserError(f"{option} {path} is a directory: give a file name (e.g. {p / 'eval'}{'.json' if option == '--json' else '.png'})")
    parent = p.parent if str(p.parent) else Path(".")
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{option} {path}: cannot write in {parent}")


def cmd_eval(args) -> int:
    from ..outputs import check_bsbr_dir, check_model_arg, check_source, check_text_files
    from . import evaluate_saved, summary_lines
    from .passkey import DEFAULT_DEPTHS, DEFAULT_LENGTHS

    check_bsbr_dir(args.model, "MODEL")
    check_model_arg(args.reference, "--reference")
    check_text_files(args.text_file)
    _check_result_path(args.json, "--json")
    _check_result_path(args.plot, "--plot")

    def check_reference(source_model):
        note = check_source(args.model, args.reference, source_model, option="--reference", force=args.force)
        if note:
            logger.warning(note)

    passkey = None
    if not args.no_passkey:
        passkey = dict(lengths=args.passkey_lengths or list(DEFAULT_LENGTHS),
                       depths=args.passkey_depths or list(DEFAULT_DEPTHS), trials=args.passkey_trials,
                       seed=args.seed, max_new_tokens=args.passkey_new_tokens)
    try:
        result = evaluate_saved(args.model, args.reference, text_files=args.text_file, dataset=args.dataset,
                                dataset_config=args.dataset_config, dataset_split=args.dataset_split,
                                text_column=args.text_column, split=args.split, seq_len=args.seq_len,
                                max_windows=args.max_windows, stride=args.stride, buckets=args.buckets,
                                passkey=passkey, seed=args.seed, json_path=args.json, plot_path=args.plot,
                                progress=not args.no_progress, check_reference=check_reference)
    except ImportError as e:  # an optional dependency (datasets): one line, not a traceback
        if args.verbose:
            raise
        print(f"bsbr eval: error: {e}", file=sys.stderr)
        return 2
    for line in summary_lines(result):
        print(line)
    if args.json:
        print(f"results: {args.json}")
    if args.plot:
        print(f"plot: {args.plot}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a converted model against its source and the chunk-local baseline",
                       description="Perplexity past the first chunk (BSBR vs the source with full attention vs the "
                                   "source restricted to chunk-local attention), gap closed, next-token agreement, "
                                   "KL, hidden-state similarity, and pass-key retrieval.")
    p.add_argument("model", help="a converted model directory (from `bsbr convert` or distillation)")
    p.add_argument("--reference", default=None,
                   help="the source it was converted from: directory, .gguf file or hub id "
                        "(default: the bundled SmolLM2-135M-Instruct)")
    data = p.add_mutually_exclusive_group()
    data.add_argument("--text-file", nargs="+", metavar="F", help="evaluate on these local text files")
    data.add_argument("--dataset", metavar="NAME", help="a HuggingFace dataset (needs `pip install datasets` "
                                                       "and network)")
    p.add_argument("--dataset-config", default=None)
    p.add_argument("--dataset-split", default="test")
    p.add_argument("--text-column", default="text")
    p.add_argument("--split", choices=["heldout", "train"], default="heldout",
                   help="default corpus split (the standard library's .py files; default heldout)")
    p.add_argument("--seq-len", type=_positive, default=2048, help="tokens per window (default 2048)")
    p.add_argument("--max-windows", type=_positive, default=16, help="windows to evaluate (default 16)")
    p.add_argument("--stride", type=_positive, default=None, help="tokens between window starts (default: seq-len)")
    p.add_argument("--buckets", choices=["chunk", "doubling"], default="chunk",
                   help="position buckets: one per chunk, or doubling ranges [B,2B),[2B,4B),...")
    p.add_argument("--passkey-lengths", type=_positive, nargs="+", default=None, metavar="N",
                   help="pass-key prompt lengths in tokens (default 512 1024 2048)")
    p.add_argument("--passkey-depths", type=_depth, nargs="+", default=None, metavar="D",
                   help="relative depths of the key (default 0.1 0.5 0.9)")
    p.add_argument("--passkey-trials", type=_positive, default=3, help="keys per (length, depth) cell (default 3)")
    p.add_argument("--passkey-new-tokens", type=_positive, default=8, help="greedy tokens generated (default 8)")
    p.add_argument("--no-passkey", action="store_true", help="skip the pass-key test")
    p.add_argument("--seed", type=int, default=0, help="pass-key keys and default corpus order")
    p.add_argument("--force", action="store_true",
                   help="use a --reference whose weights are not those the model was converted from")
    p.add_argument("--json", metavar="OUT", default=None, help="write all results here")
    p.add_argument("--plot", metavar="OUT.png", default=None, help="write the plots here")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_eval)
