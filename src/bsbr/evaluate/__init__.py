"""Evaluation of converted models: perplexity past the first chunk against full attention and the
chunk-local baseline, next-token agreement, KL, hidden-state similarity, and pass-key retrieval.

Submodules: :mod:`.evaluate` (the evaluation loop), :mod:`.metrics` (accumulated metrics),
:mod:`.baselines` (the chunk-local and exact-window baselines), :mod:`.passkey` (offline pass-key
prompts), :mod:`.filler` (their filler texts), :mod:`.passkey_plot` (heat maps), :mod:`.passkey_run`
(``--passkey-only``), :mod:`.lm_eval_task` (the pass-key test as an offline lm-eval task),
:mod:`.saved` (``bsbr eval``: a saved model, end to end), :mod:`.report` (the printed table),
:mod:`.plots`. The text comes from :mod:`bsbr.corpus`.
"""
from .baselines import local_baseline
from .evaluate import evaluate, perplexity_past
from .metrics import MetricAccumulator, gap_closed, position_buckets
from .passkey import build_prompt, make_key, passkey_found, run_passkey
from .report import summary_lines
from .saved import evaluate_saved

__all__ = [
    "MetricAccumulator",
    "build_prompt",
    "evaluate",
    "evaluate_saved",
    "gap_closed",
    "local_baseline",
    "make_key",
    "passkey_found",
    "perplexity_past",
    "position_buckets",
    "run_passkey",
    "summary_lines",
]
