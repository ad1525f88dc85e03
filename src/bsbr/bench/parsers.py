"""The command lines of ``bsbr bench attention/models/converted/quality``. Light on purpose: ``--help``
imports no torch; the chosen benchmark's module is imported when it runs."""
from __future__ import annotations

import argparse
import ast
import functools
import importlib
import importlib.util
from pathlib import Path

from ..convert.cli import add_conversion_arguments
from ..numbers import MAX_COUNT, MAX_LAYERS, MAX_REPEATS, MAX_WIDTH, SEED_RANGE, finite_number, integer
from .defaults import (CALIBRATION_LEN, DEFAULT_MODEL_SEQ_LENS, DEFAULT_QUALITY_MODELS, DEFAULT_SEQ_LENS,
                       DEFAULT_SHELL_MODELS, DEFAULT_THREADS, MAX_SECONDS, MAX_THREADS, QUALITY_MODELS,
                       QUALITY_TRAINING, SHELL_MODELS)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's help ends with its default, unless that is None or the help already names it (then the
    help says it, see :func:`bsbr.bench.common.given`)."""

    def _get_help_string(self, action):
        if action.default is None or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _bench_parser(bench_sub, name: str, run: str, formatter_class=_HelpFormatter):
    """The parser of ``bsbr bench NAME``, described by the first paragraph of the docstring of the module
    ``bsbr.bench.NAME`` (read, not imported), which runs it with its function ``run``."""
    module = f"bsbr.bench.{name}"
    doc = ast.get_docstring(ast.parse(Path(importlib.util.find_spec(module).origin).read_text(encoding="utf-8")))
    p = bench_sub.add_parser(name, description=doc.split("\n\n")[0] if doc else None, formatter_class=formatter_class)
    p.set_defaults(func=functools.partial(_run, module, run))
    return p


def _run(module: str, run: str, args: argparse.Namespace) -> int:
    return getattr(importlib.import_module(module), run)(args)


def _add_output_arguments(p, plot: str) -> None:
    p.add_argument("--threads", type=integer(1, MAX_THREADS), default=None,
                   help=f"torch threads (default {DEFAULT_THREADS}: on a shared 2-core machine two threads made "
                        "both models 4-5x slower whenever another job held a core, and the ratio swung from 0.6x to "
                        "1.0x)")
    p.add_argument("--json", default=None, metavar="OUT.json", help="write the results here")
    p.add_argument("--plot", default=None, metavar="OUT.png", help=f"write {plot} here")


def _lengths(lengths) -> str:
    return " ".join(map(str, lengths))


def _models_help(default, every) -> str:
    return f"default {' '.join(default)}; also {' '.join(sorted(set(every) - set(default)))}"


def register(bench_sub) -> None:
    _attention(_bench_parser(bench_sub, "attention", "run_attention"))
    _models(_bench_parser(bench_sub, "models", "run_models"))
    # (bsbr convert's flags spell out their defaults)
    _converted(_bench_parser(bench_sub, "converted", "cmd", argparse.HelpFormatter))
    _quality(_bench_parser(bench_sub, "quality", "run_quality_cli"))


def _attention(p) -> None:
    p.add_argument("--seq-lens", type=integer(), nargs="+", default=None,
                   help=f"sequence lengths (default {_lengths(DEFAULT_SEQ_LENS)}; "
                        f"with --model-scaling {_lengths(DEFAULT_MODEL_SEQ_LENS)})")
    p.add_argument("--hidden", type=integer(1, MAX_WIDTH), default=None,
                   help="hidden size (default 512; model scaling 256)")
    p.add_argument("--heads", type=integer(1, MAX_WIDTH), default=None,
                   help="attention heads (default 8; model scaling 4)")
    p.add_argument("--chunk-size", type=integer(), default=128, help="BSBR chunk size (default %(default)s)")
    p.add_argument("--repeats", type=integer(1, MAX_REPEATS), default=5,
                   help="timed repeats per model and length (median)")
    p.add_argument("--warmup", type=integer(0, MAX_REPEATS), default=None,
                   help="untimed calls per model and length before measuring (default 1; a model's first length "
                        "gets at least one, so that the process's one-time allocations are not measured)")
    p.add_argument("--retrieval", choices=("additive", "normalized"), default="additive",
                   help="how BSBR's chunk states join the softmax (default %(default)s, the original BSBR's)")
    p.add_argument("--retrieval-blocks", type=integer(0), default=0,
                   help="earlier chunks each token attends to exactly, chosen by their largest q.k")
    p.add_argument("--max-standard-len", type=integer(), default=None, help="longest length for standard attention")
    p.add_argument("--earlier-wheel", default=None, metavar="WHL",
                   help="the bsbr==0.1.1 wheel: also time its BSBRAttention side by side")
    p.add_argument("--max-earlier-len", type=integer(), default=None, help="longest length for the bsbr 0.1.1 layer")
    p.add_argument("--max-seconds", type=finite_number(positive=True), default=None,
                   help="skip a baseline whose call is predicted (quadratically) to take longer (default 30)")
    p.add_argument("--skip-core", action="store_true", help="skip the op-alone vs matmul FLOPs measurement")
    p.add_argument("--model-scaling", action="store_true",
                   help="instead: a BSBRModel (default 2 layers, hidden 256, 4 heads, ff 1024) at 8k-64k tokens")
    p.add_argument("--layers", type=integer(1, MAX_LAYERS), default=None, help="model scaling: layers (default 2)")
    p.add_argument("--ff-dim", type=integer(1, MAX_WIDTH), default=None,
                   help="model scaling: feed-forward size (default 1024)")
    p.add_argument("--vocab", type=integer(), default=None, help="model scaling: vocabulary size (default 1000)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--seed", type=integer(*SEED_RANGE), default=0, help="random inputs and weights (default 0)")
    _add_output_arguments(p, "a log-log plot")


def _models(p) -> None:
    p.add_argument("--seq-lens", type=integer(2), nargs="+", default=None,
                   help=f"sequence lengths (default {_lengths(DEFAULT_SEQ_LENS)})")
    p.add_argument("--models", nargs="+", default=None,
                   help=f"models ({_models_help(DEFAULT_SHELL_MODELS, SHELL_MODELS)})")
    for flag, default, what in (("--hidden", 256, "hidden size"), ("--layers", 2, "layers"),
                                ("--heads", 4, "attention heads"), ("--ff-dim", 1024, "feed-forward size")):
        p.add_argument(flag, type=integer(1, MAX_LAYERS if flag == "--layers" else MAX_WIDTH), default=default,
                       help=f"each model's {what} (default %(default)s)")
    p.add_argument("--chunk-size", type=integer(), default=128, help="BSBR chunk size = sliding window = linear chunk")
    p.add_argument("--repeats", type=integer(1, MAX_REPEATS), default=3,
                   help="interleaved timed rounds per length (median)")
    p.add_argument("--max-seconds", type=finite_number(positive=True), default=15.0,
                   help="skip calls predicted to take longer")
    p.add_argument("--model-budget", type=finite_number(positive=True), default=None,
                   help="no more train steps for a model after this much measuring time (default 90)")
    p.add_argument("--no-train", action="store_true", help="forward only")
    p.add_argument("--seed", type=integer(*SEED_RANGE), default=0, help="random data and weights (default 0)")
    _add_output_arguments(p, "a log-log plot")


def _converted(p) -> None:
    p.add_argument("source", nargs="?", default=None, help="source model (default: the bundled SmolLM2)")
    p.add_argument("--gpt2-small-random", action="store_true", help="use a random GPT-2-small-shaped source")
    add_conversion_arguments(p)  # the conversion timed: bsbr convert's flags and defaults
    p.add_argument("--seq-lens", type=integer(), nargs="+", default=[1024, 4096, 16384],
                   help="prefill lengths (default 1024 4096 16384)")
    p.add_argument("--decode-contexts", type=integer(), nargs="*", default=[1024, 32768],
                   help="contexts to decode from (default 1024 32768; the flag with no values: no decode)")
    p.add_argument("--decode-steps", type=integer(), default=None,
                   help="tokens generated per decode context, each step timed (default 8)")
    p.add_argument("--repeats", type=integer(1, MAX_REPEATS), default=3, help="timed runs per prefill (default 3)")
    p.add_argument("--max-seconds", type=finite_number(positive=True), default=MAX_SECONDS,
                   help=f"refuse lengths whose source prefill is predicted (from one of {CALIBRATION_LEN:,} tokens) "
                        f"to take longer (default {MAX_SECONDS:g})")
    _add_output_arguments(p, "the prefill and decode plot")


def _quality(p) -> None:
    p.add_argument("--models", nargs="+", default=None,
                   help=_models_help(DEFAULT_QUALITY_MODELS, QUALITY_MODELS))
    p.add_argument("--chunk-size", type=integer(), default=None,
                   help=f"BSBR chunk size = sliding window (default {QUALITY_TRAINING['chunk_size']})")
    for name in ("hidden", "layers", "heads", "ff_dim", "seq_len", "batch", "steps", "eval_windows", "seed"):
        p.add_argument(f"--{name.replace('_', '-')}", type=integer(*SEED_RANGE) if name == "seed" else
                       integer(1, MAX_COUNT) if name == "steps" else integer(1, MAX_LAYERS) if name == "layers" else
                       integer(1, MAX_WIDTH) if name in ("hidden", "heads", "ff_dim") else integer(),
                       default=None, help=f"default {QUALITY_TRAINING[name]}")
    p.add_argument("--lr", type=finite_number(positive=True), default=None, help=f"default {QUALITY_TRAINING['lr']}")
    p.add_argument("--corpus", default=None, help="directory of .py files (default: the stdlib); as in the stdlib, "
                                                  "test suites (test/, tests/ and idle_test/ folders, test_*.py "
                                                  "files), site-packages and dist-packages are left out")
    _add_output_arguments(p, "the loss-by-position plot")
    p.add_argument("--merge", nargs="+", default=None, metavar="IN.json",
                   help="instead of training: merge results of runs with the same configuration")
