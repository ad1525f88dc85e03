"""Distillation of converted models from their sources (end-to-end KL to the source's logits). The trainer
(torch) loads on first use of its names, so the command line's parser imports this package without it."""
from ..lazy import lazy_names

_EXPORTS = dict.fromkeys(("DistillConfig", "distill", "end_to_end_loss", "new_parameters"), "trainer")
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_names(__name__, _EXPORTS, ("checkpoint", "cli", "plots", "trainer"))
