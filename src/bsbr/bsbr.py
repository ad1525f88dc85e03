"""The earlier library's module path (bsbr 0.1.1 defined its classes in ``bsbr/bsbr.py``):
``from bsbr.bsbr import BSBRModel`` keeps working. What changed in them: README, "Coming from bsbr 0.1.1"."""
from .layers.bsbr_attention import BSBRAttention
from .models.native import BSBRLayer, BSBRModel

__all__ = ["BSBRAttention", "BSBRLayer", "BSBRModel"]
