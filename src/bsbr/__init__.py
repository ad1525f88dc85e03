"""bsbr: Block Sparse attention with Block Retrieval, and tools to convert pretrained decoder LMs to it."""
from .layers import BSBRAttention
from .convert import TransformerToBSBRConverter, convert_to_bsbr
from .models import BSBRConfig, BSBRForCausalLM, BSBRLayer, BSBRModel, load_bsbr_model

__version__ = "0.2.0"

__all__ = [
    "BSBRAttention",
    "BSBRConfig",
    "BSBRForCausalLM",
    "BSBRLayer",
    "BSBRModel",
    "TransformerToBSBRConverter",
    "__version__",
    "convert_to_bsbr",
    "load_bsbr_model",
]
