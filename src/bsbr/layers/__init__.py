"""nn.Modules with explicit keyword arguments and no HuggingFace dependency: BSBRAttention, its pieces,
and the baselines beside it. All share ``forward(hidden_states (b, n, hidden_dim), attention_mask (b, n) of
1/0 or None, position_embeddings (rotary cos, sin) or None) -> (b, n, hidden_dim)`` (the linear-attention
layers and DeltaNet ignore the positions), so they swap freely in bsbr.models.AttentionLM."""
from .bsbr_attention import BSBRAttention
from .deltanet import DeltaNet
from .feature_maps import FEATURE_MAPS, FeatureMap, HeadwiseLinear, StateCompression
from .gau import GatedAttentionUnit
from .hopfield_attention import HopfieldAttention
from .linear_attention import LinearAttention
from .rotary import RotaryEmbedding, apply_rotary
from .sliding_window_attention import SlidingWindowAttention
from .standard_attention import StandardAttention

__all__ = [
    "BSBRAttention",
    "DeltaNet",
    "FEATURE_MAPS",
    "FeatureMap",
    "GatedAttentionUnit",
    "HeadwiseLinear",
    "HopfieldAttention",
    "LinearAttention",
    "RotaryEmbedding",
    "SlidingWindowAttention",
    "StandardAttention",
    "StateCompression",
    "apply_rotary",
]
