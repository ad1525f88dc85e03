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

# baselines beside BSBR (issue 5): same forward signature, swap freely in bsbr.models.AttentionLM
from .deltanet import DeltaNet
from .gau import GatedAttentionUnit
from .hopfield_attention import HopfieldAttention
from .linear_attention import LinearAttention
from .sliding_window_attention import SlidingWindowAttention

__all__ += [
    "DeltaNet",
    "GatedAttentionUnit",
    "HopfieldAttention",
    "LinearAttention",
    "SlidingWindowAttention",
]
