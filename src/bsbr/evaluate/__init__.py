"""Evaluation of converted models against their source and the chunk-local baseline: perplexity past
the first chunk, next-token agreement, KL, hidden-state similarity, and pass-key retrieval."""
from .baselines import local_baseline
from .evaluate import evaluate, perplexity_past
from .metrics import MetricAccumulator, gap_closed, position_buckets
from .passkey import build_prompt, make_key, passkey_found, run_passkey
from .report import summary_lines
from .saved import evaluate_saved

__all__ = ["MetricAccumulator", "build_prompt", "evaluate", "evaluate_saved", "gap_closed", "local_baseline",
           "make_key", "passkey_found", "perplexity_past", "position_buckets", "run_passkey", "summary_lines"]
