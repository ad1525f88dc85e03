"""Distillation of converted models from their sources (end-to-end KL to the source's logits)."""
from .trainer import DistillConfig, distill, end_to_end_loss, new_parameters

__all__ = ["DistillConfig", "distill", "end_to_end_loss", "new_parameters"]
