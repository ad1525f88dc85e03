"""nn.Modules with explicit keyword arguments and no HuggingFace dependency."""
from .bsbr_attention import BSBRAttention
from .feature_maps import FEATURE_MAPS, FeatureMap, HeadwiseLinear, StateCompression
from .rotary import RotaryEmbedding, apply_rotary
from .standard_attention import StandardAttention

__all__ = [
    "BSBRAttention",
    "FEATURE_MAPS",
    "FeatureMap",
    "HeadwiseLinear",
    "RotaryEmbedding",
    "StandardAttention",
    "StateCompression",
    "apply_rotary",
]
