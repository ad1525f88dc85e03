"""Evaluation of converted models against their source, the chunk-local baseline and their exact window alone: perplexity past
the first chunk, next-token agreement, KL, hidden-state similarity, and pass-key retrieval. The names
load on first use (torch with them), so the command line's parser imports this package without torch."""
from ..lazy import lazy_names

_EXPORTS = {"local_baseline": "baselines", "summary_lines": "report", "evaluate_saved": "saved",
            **dict.fromkeys(("MetricAccumulator", "evaluate", "gap_closed", "perplexity_past", "position_buckets"),
                            "metrics"),
            **dict.fromkeys(("build_prompt", "make_key", "passkey_found", "run_passkey"), "passkey")}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_names(__name__, _EXPORTS, ("baselines", "cli", "filler", "lm_eval_task", "metrics",
                                                       "passkey", "plots", "report", "saved"))
