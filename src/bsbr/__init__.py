"""bsbr: Block Sparse attention with Block Retrieval, and tools to convert pretrained decoder LMs to it."""
from .layers import BSBRAttention
from .models import BSBRLayer, BSBRModel

__version__ = "0.2.0"

__all__ = ["BSBRAttention", "BSBRLayer", "BSBRModel", "__version__"]
