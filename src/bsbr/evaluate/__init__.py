"""Evaluation of converted models: perplexity past the first chunk against full attention and the
chunk-local baseline, next-token agreement, KL, hidden-state similarity, and pass-key retrieval.

Submodules: :mod:`.corpus` (default corpus: the standard library's sources, split train/held-out),
:mod:`.metrics` (accumulated metrics), :mod:`.passkey` (offline pass-key prompts), :mod:`.filler`
(their filler texts), :mod:`.passkey_plot` (heat maps), :mod:`.passkey_run` (``--passkey-only``),
:mod:`.lm_eval_task` (the pass-key test as an offline lm-eval task),
:mod:`.evaluate` (the evaluation loop and ``bsbr eval``'s orchestration), :mod:`.plots`.
"""
from .corpus import dataset_texts, read_texts, split_of, stdlib_files, stdlib_texts, token_windows
from .evaluate import evaluate, evaluate_saved, local_baseline, perplexity_past, summary_lines
from .metrics import MetricAccumulator, gap_closed, position_buckets
from .passkey import build_prompt, make_key, passkey_found, run_passkey

__all__ = [
    "MetricAccumulator",
    "build_prompt",
    "dataset_texts",
    "evaluate",
    "evaluate_saved",
    "gap_closed",
    "local_baseline",
    "make_key",
    "passkey_found",
    "perplexity_past",
    "position_buckets",
    "read_texts",
    "run_passkey",
    "split_of",
    "stdlib_files",
    "stdlib_texts",
    "summary_lines",
    "token_windows",
]
