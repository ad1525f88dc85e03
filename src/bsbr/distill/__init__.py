"""Distillation of converted models from their sources (attention transfer, then end to end)."""
from .trainer import DistillConfig, attention_transfer_loss, distill, end_to_end_loss, new_parameters

__all__ = ["DistillConfig", "attention_transfer_loss", "distill", "end_to_end_loss", "new_parameters"]
