"""BSBRAttention: the nn.Module around :mod:`bsbr.ops.bsbr` (no HuggingFace dependency).

Member names follow the earlier bsbr library (``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``,
``meta_r_proj``, ``meta_h_proj``) so its users can switch. Beyond the earlier layer it supports
grouped K/V heads, rotary positions, biases, the normalized retrieval variant with feature maps,
a retrieval gate, top-k retrieval, state compression, a padding mask and a streaming ``step()``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from ..ops.checks import check_int
from ..ops.bsbr import VARIANTS, BSBRState, chunk_bsbr_attention, recurrent_bsbr_attention
from .inputs import check_hidden_states, mask_to_valid, resolve_head_dim, resolve_kv_heads
from .feature_maps import FEATURE_MAPS, FeatureMap, HeadwiseLinear, StateCompression
from .rotary import apply_rotary

META_MODES = ("linear", "shared")


def _run_op(op, tensors, **kwargs):
    """Call a BSBR op on (q, k, v, mq, mk, fq, fk). Under mixed precision (autocast) the projections
    come out in a low-precision dtype and the feature maps in float32; the op then runs in float32
    with autocast off (its running sums, the shared denominator and the local-mass exponent need the
    range). Otherwise the tensors pass unchanged."""
    device = tensors[0].device.type
    if torch.is_autocast_enabled(device):
        tensors = tuple(t.float() for t in tensors)
    q, k, v, mq, mk, fq, fk = tensors
    with torch.autocast(device, enabled=False):
        return op(q, k, v, mq, mk, fq=fq, fk=fk, **kwargs)


class BSBRAttention(nn.Module):
    """Block Sparse attention with Block Retrieval.

    Args:
        hidden_dim, num_heads, chunk_size, dropout, compression_factor: as in the earlier library.
            ``compression_factor`` shrinks each chunk state's feature dim by that factor.
        num_kv_heads: key/value heads (grouped K/V); default ``num_heads``.
        head_dim: default ``hidden_dim // num_heads``.
        bias / out_bias: biases of the q/k/v and output projections.
        retrieval: ``"additive"`` (the seed: local softmax + q.S) or ``"normalized"`` (shared
            denominator; needs a non-negative feature map).
        feature_map: ``"identity"``, ``"elu"`` or ``"hedgehog"``; default identity for additive,
            hedgehog for normalized.
        gate: None (no gate) or the initial value of a per-head gate on the retrieved term. A gate
            starting at 0 makes the layer exactly chunk-local attention until it is trained.
        mass_power: None, or the initial value of a per-head exponent beta that makes the gate per
            token, ``g * L_t**(-beta)`` with ``L_t`` the local softmax's mass after subtracting its max
            (beta = 1: one softmax over the local keys and the retrieved mass). Trained with the gate.
        top_k: None (dense) or the number of past chunks each chunk retrieves.
        local_chunks: how many chunks each token attends to exactly: its own (causally) and the
            ``local_chunks - 1`` before it; retrieval reaches only the chunks before those. 1 (default)
            is plain BSBR; 2 doubles the local work and the decoding cache's keys.
        sink_tokens: the sequence's first tokens kept in every token's exact window (attention
            sinks); default 0.
        meta: ``"linear"`` (own projections of the hidden state, the earlier library's) or
            ``"shared"`` (per-head d x d maps of the un-rotated q/k, identity-initialised: the meta
            projections start as W_Q and W_K and add only d^2 parameters per head).
        meta_dim: size of meta-queries/keys per head for ``meta="linear"`` (default head_dim).
    """

    # the pieces a standard attention layer does not have: what a converted model must initialise
    # and what attention-transfer distillation trains
    NEW_PARAMETER_PREFIXES = ("meta_r_proj", "meta_h_proj", "feature_q", "feature_k", "compress", "retrieval_gate",
                              "retrieval_mass")

    def __init__(
        self,
        hidden_dim: int,
        num_heads: int,
        chunk_size: int,
        dropout: float = 0.1,
        compression_factor: Optional[int] = None,
        *,
        num_kv_heads: Optional[int] = None,
        head_dim: Optional[int] = None,
        bias: bool = True,
        out_bias: Optional[bool] = None,
        retrieval: str = "additive",
        feature_map: Optional[str] = None,
        gate: Optional[float] = None,
        top_k: Optional[int] = None,
        meta: str = "linear",
        meta_dim: Optional[int] = None,
        mass_power: Optional[float] = None,
        local_chunks: int = 1,
        sink_tokens: int = 0,
    ):
        super().__init__()
        head_dim = resolve_head_dim(hidden_dim, num_heads, head_dim)
        num_kv_heads = resolve_kv_heads(num_heads, num_kv_heads)
        check_int("chunk_size", chunk_size)
        if not (isinstance(dropout, (int, float)) and 0.0 <= dropout < 1.0):
            raise ValueError(f"dropout must be a float in [0, 1), got {dropout!r}")
        if retrieval not in VARIANTS:
            raise ValueError(f"retrieval must be one of {VARIANTS}, got {retrieval!r}")
        feature_map = feature_map or ("identity" if retrieval == "additive" else "hedgehog")
        if feature_map not in FEATURE_MAPS:
            raise ValueError(f"feature_map must be one of {FEATURE_MAPS}, got {feature_map!r}")
        if retrieval == "normalized" and feature_map == "identity":
            raise ValueError("retrieval='normalized' needs a non-negative feature_map ('elu' or 'hedgehog')")
        if top_k is not None:
            check_int("top_k", top_k)
        if meta not in META_MODES:
            raise ValueError(f"meta must be one of {META_MODES}, got {meta!r}")
        if meta == "shared" and meta_dim not in (None, head_dim):
            raise ValueError("meta='shared' uses meta_dim = head_dim")
        meta_dim = head_dim if meta_dim is None else meta_dim
        check_int("meta_dim", meta_dim)
        check_int("local_chunks", local_chunks)
        if isinstance(sink_tokens, bool) or not isinstance(sink_tokens, int) or sink_tokens < 0:
            raise ValueError(f"sink_tokens must be an int >= 0, got {sink_tokens!r}")
        if gate is not None and not isinstance(gate, (int, float)):
            raise TypeError(f"gate must be None or a float (its initial value), got {type(gate).__name__}")

        self.hidden_dim, self.num_heads, self.num_kv_heads = hidden_dim, num_heads, num_kv_heads
        self.head_dim, self.chunk_size, self.dropout = head_dim, chunk_size, float(dropout)
        self.retrieval, self.top_k, self.meta, self.meta_dim = retrieval, top_k, meta, meta_dim
        self.compression_factor = compression_factor
        self.local_chunks, self.sink_tokens = local_chunks, sink_tokens

        self.q_proj = nn.Linear(hidden_dim, num_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden_dim, num_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden_dim, num_kv_heads * head_dim, bias=bias)
        self.out_proj = nn.Linear(num_heads * head_dim, hidden_dim, bias=bias if out_bias is None else out_bias)
        if meta == "linear":
            self.meta_r_proj = nn.Linear(hidden_dim, num_heads * meta_dim, bias=bias)
            self.meta_h_proj = nn.Linear(hidden_dim, num_kv_heads * meta_dim, bias=bias)
        else:
            self.meta_r_proj = HeadwiseLinear(num_heads, head_dim, head_dim)
            self.meta_h_proj = HeadwiseLinear(num_kv_heads, head_dim, head_dim)
        self.feature_q = FeatureMap(feature_map, num_heads, head_dim)
        self.feature_k = FeatureMap(feature_map, num_kv_heads, head_dim)
        self.compress = (
            None if compression_factor is None
            else StateCompression(self.feature_q.out_dim, compression_factor, self.feature_q.nonnegative)
        )
        self.retrieval_gate = None if gate is None else nn.Parameter(torch.full((num_heads,), float(gate)))
        if mass_power is not None and (isinstance(mass_power, bool) or not isinstance(mass_power, (int, float))):
            raise TypeError(f"mass_power must be None or a float, got {mass_power!r}")
        self.retrieval_mass = (None if mass_power is None
                               else nn.Parameter(torch.full((num_heads,), float(mass_power))))
        self.dropout_layer = nn.Dropout(dropout)

    def gate_value(self) -> Optional[torch.Tensor]:
        """The gate, clamped at 0 with a straight-through gradient (so a closed gate can open)."""
        g = self.retrieval_gate
        if g is None:
            return None
        return g + (g.clamp(min=0.0) - g).detach()

    def _project(self, x: torch.Tensor, position_embeddings):
        b, n, _ = x.shape

        def heads(t, h):  # (b, n, h*d) -> (b, h, n, d)
            return t.view(b, n, h, t.shape[-1] // h).transpose(1, 2)

        q = heads(self.q_proj(x), self.num_heads)
        k = heads(self.k_proj(x), self.num_kv_heads)
        v = heads(self.v_proj(x), self.num_kv_heads)
        # meta projections are affine, so the op applies them to chunk means (one per chunk, not per token)
        if self.meta == "linear":
            mq = mk = x.unsqueeze(1)  # (b, 1, n, hidden)
        else:  # from un-rotated q/k: a mean of rotated vectors over a chunk would cancel out
            mq, mk = q, k
        if position_embeddings is not None:
            cos, sin = position_embeddings
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        fq, fk = self.feature_q(q), self.feature_k(k)
        if self.compress is not None:
            fq, fk = self.compress(fq), self.compress(fk)
        return q, k, v, mq, mk, fq, fk

    def _meta_map(self, proj, heads: int):
        if self.meta == "shared":
            return proj  # HeadwiseLinear on (b, h, C, d)

        def project(means):  # (b, 1, C, hidden) -> (b, heads, C, meta_dim)
            b, _, C, _ = means.shape
            return proj(means[:, 0]).view(b, C, heads, self.meta_dim).transpose(1, 2)

        return project

    def _options(self):
        return dict(chunk_size=self.chunk_size, variant=self.retrieval, gate=self.gate_value(), top_k=self.top_k,
                    mass_power=self.retrieval_mass, local_chunks=self.local_chunks, sink_tokens=self.sink_tokens,
                    meta_q_map=self._meta_map(self.meta_r_proj, self.num_heads),
                    meta_k_map=self._meta_map(self.meta_h_proj, self.num_kv_heads))

    def _output(self, o: torch.Tensor) -> torch.Tensor:
        b, h, n, dv = o.shape
        return self.out_proj(self.dropout_layer(o.transpose(1, 2).reshape(b, n, h * dv)))

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        position_embeddings: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
        output_state: bool = False,
    ):
        """hidden_states (b, n, hidden_dim); attention_mask (b, n) of 1/0; position_embeddings the
        rotary (cos, sin) or None. Returns (b, n, hidden_dim), and the streaming state if asked."""
        check_hidden_states(hidden_states, self.hidden_dim)
        b, n, _ = hidden_states.shape
        valid = mask_to_valid(attention_mask, b, n)
        o, state = _run_op(chunk_bsbr_attention, self._project(hidden_states, position_embeddings), valid=valid,
                           output_final_state=output_state, **self._options())
        out = self._output(o)
        return (out, state) if output_state else out

    def step(
        self,
        hidden_states: torch.Tensor,
        state: Optional[BSBRState],
        attention_mask: Optional[torch.Tensor] = None,
        position_embeddings: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    ):
        """Streaming decode: continue from ``state`` with the given tokens (b, T, hidden_dim),
        token by token. Returns ((b, T, hidden_dim), new state)."""
        check_hidden_states(hidden_states, self.hidden_dim)
        b, n, _ = hidden_states.shape
        valid = mask_to_valid(attention_mask, b, n)
        o, state = _run_op(recurrent_bsbr_attention, self._project(hidden_states, position_embeddings),
                           valid=valid, initial_state=state, output_final_state=True, **self._options())
        return self._output(o), state
