"""Models built from the layers: the native BSBR stack and the HuggingFace BSBR models."""
from .native import BSBRLayer, BSBRModel

__all__ = ["BSBRLayer", "BSBRModel"]
