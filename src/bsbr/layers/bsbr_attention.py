"""BSBRAttention: the nn.Module around :mod:`bsbr.ops.bsbr` (no HuggingFace dependency).

Member names (``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``, ``meta_r_proj``, ``meta_h_proj``) are
the ones users of the original bsbr package know. The layer adds grouped K/V heads, rotary positions,
biases, feature maps, a chunk-state gate, state compression, exact block retrieval, a padding mask and
a streaming ``step()``.
"""
from __future__ import annotations

import math
import warnings
from typing import Optional, Tuple

import torch
from torch import nn

from ..ops.bsbr import BSBROptions, BSBRState, chunk_bsbr_attention, recurrent_bsbr_attention
from .multihead import MultiHeadBase
from .feature_maps import BSBR_FEATURE_MAPS, FeatureMap, HeadwiseLinear, StateCompression, default_feature_map
from ..ops.checks import check_number, eager, exporting, is_number
from .inputs import check_rotary
from .rotary import apply_rotary, autocast_on


def op_dtype(dtype: torch.dtype, device_type: str, options) -> torch.dtype:
    """The dtype the op, and so its streaming state, runs in for inputs of ``dtype``: float32 under
    mixed precision (autocast; its running sums and shared denominator need the range), for float16
    (the same range: a tiny llama with an open gate gave inf from token 91,680 in float16), and for the
    bounded mode in bfloat16 (it keeps the tokens its state recalls worst, an order bfloat16 rounding
    scrambles: a tiny llama had KL 0.194 to float32 with the op in bfloat16, 0.030 in float32, the
    source's own 0.019; its cache stays small in float32 whatever the context); otherwise ``dtype``."""
    if autocast_on(device_type) or dtype == torch.float16 or (dtype == torch.bfloat16 and options.recall_tokens):
        return torch.float32
    return dtype


def _run_op(op, tensors, **kwargs):
    """Call a BSBR op on (q, k, v, mq, mk, fq, fk, qr, kr) in :func:`op_dtype`,
    with autocast off; its output is cast back to the inputs' dtype, except under autocast."""
    device, dtype = tensors[0].device.type, tensors[0].dtype
    run, autocast = op_dtype(dtype, device, kwargs["options"]), autocast_on(device)
    if run == dtype and not autocast:  # (under autocast the inputs' dtypes may differ)
        q, k, v, mq, mk, fq, fk, qr, kr = tensors
        return op(q, k, v, mq, mk, fq=fq, fk=fk, qr=qr, kr=kr, **kwargs)
    q, k, v, mq, mk, fq, fk, qr, kr = (t.to(run) for t in tensors)
    with torch.autocast(device, enabled=False):
        o, state = op(q, k, v, mq, mk, fq=fq, fk=fk, qr=qr, kr=kr, **kwargs)
    return (o if autocast else o.to(dtype)), state


def refuse_own_position_chunks(owner: str, attention_kwargs: dict) -> None:
    """``own_position_chunks`` reads far keys at positions a converted model's layers pass in; a native
    stack (``owner``) passes none, so there it would change nothing: refused."""
    if attention_kwargs.get("own_position_chunks"):
        raise ValueError(f"own_position_chunks: {owner} gives no far key positions, which this option needs (it "
                         "would change nothing): leave it 0")


class BSBRAttention(MultiHeadBase):
    """Block Sparse attention with Block Retrieval.

    A bare ``BSBRAttention(hidden_dim, num_heads, chunk_size)`` builds the plain BSBR pattern: each
    token attends exactly to its own chunk and reads every earlier chunk through its state
    (``retrieval="additive"``: ``softmax part + q.S``), no sinks, no exact blocks: the form for models
    trained from scratch. The arguments are bsbr 0.1.1's, but that layer was not causal (README, "Coming
    from bsbr 0.1.1"). ``bsbr convert`` builds, for pretrained models, ``local_chunks=2, sink_tokens=4,
    retrieval_blocks=8, retrieval="normalized", gate_init=0.0`` (README, "Retrieval forms").

    Args:
        hidden_dim, num_heads, chunk_size, dropout, compression_factor: ``compression_factor`` shrinks
            each chunk state's feature dim by that factor.
        num_kv_heads: key/value heads (grouped K/V); default ``num_heads``.
        head_dim: default ``hidden_dim // num_heads``.
        bias / out_bias: biases of the q/k/v and output projections.
        retrieval: ``"additive"`` or ``"normalized"`` (one denominator; needs a non-negative feature map).
        feature_map: ``"identity"`` or ``"hedgehog"``; default identity for additive, hedgehog for normalized.
        gate_init: None (no gate) or the initial value of a per-head gate on the chunk-state term
            (``retrieval_gate``). A gate starting at 0 makes the layer exactly softmax attention over its
            exact keys until trained.
        local_chunks, sink_tokens, retrieval_blocks: the exact keys, see :class:`bsbr.ops.BSBROptions`.
        recall_tokens: the bounded recall mode (0: off; exclusive with ``retrieval_blocks``): a cache of
            at most this many exact tokens per K/V head, the rest of the past in one state, so the
            streaming state has constant size (see :class:`bsbr.ops.BSBROptions`).
        own_position_chunks: far keys fewer than this many chunks back are read at their own positions,
            older ones at ``far_position_embeddings`` (see :class:`bsbr.ops.BSBROptions`); 0: all at those.

    The meta projections are per-head d x d maps of the un-rotated q/k (identity-initialised, so a
    chunk's retrieval score starts as its mean query . mean key logit); the op applies them to chunk
    means. The recall mode has none: it weighs no per-chunk states.
    """

    # the pieces a standard attention layer does not have: what a converted model must initialise
    NEW_PARAMETER_PREFIXES = ("meta_r_proj", "meta_h_proj", "feature_q", "feature_k", "compress", "retrieval_gate")

    def __init__(self, hidden_dim: int, num_heads: int, chunk_size: int, dropout: float = 0.1,
                 compression_factor: Optional[int] = None, *, num_kv_heads: Optional[int] = None,
                 head_dim: Optional[int] = None, bias: bool = True, out_bias: Optional[bool] = None,
                 retrieval: str = "additive", feature_map: Optional[str] = None, gate_init: Optional[float] = None,
                 local_chunks: int = 1, sink_tokens: int = 0, retrieval_blocks: int = 0, recall_tokens: int = 0,
                 own_position_chunks: int = 0):
        super().__init__(hidden_dim, num_heads, dropout, head_dim, bias, out_bias, num_kv_heads)
        head_dim, num_kv_heads = self.head_dim, self.num_kv_heads
        self.options = BSBROptions(chunk_size=chunk_size, local_chunks=local_chunks, sink_tokens=sink_tokens,
                                   retrieval_blocks=retrieval_blocks, recall_tokens=recall_tokens,
                                   own_position_chunks=own_position_chunks, retrieval=retrieval)
        if feature_map is None:  # only None means the default ("" or 0 is refused, not read as it)
            feature_map = default_feature_map(retrieval)
        if not isinstance(feature_map, str) or feature_map not in BSBR_FEATURE_MAPS:
            raise ValueError(f"feature_map must be None or one of {BSBR_FEATURE_MAPS}, got {feature_map!r}")
        if retrieval == "normalized" and feature_map == "identity":
            raise ValueError("retrieval normalized needs the non-negative feature_map hedgehog: give feature_map hedgehog, or retrieval additive")
        if gate_init is not None and not is_number(gate_init):
            raise TypeError(f"gate_init must be None or a float, got {type(gate_init).__name__}")
        check_number("gate_init", gate_init, none=True)  # the config's rule: finite in float32 (no nan/inf)
        self.compression_factor = compression_factor
        # the chunk states' meta maps (the recall mode reads no per-chunk states, so has none)
        self.meta_r_proj = None if recall_tokens else HeadwiseLinear(num_heads, head_dim, head_dim)
        self.meta_h_proj = None if recall_tokens else HeadwiseLinear(num_kv_heads, head_dim, head_dim)
        self.feature_q = FeatureMap(feature_map, num_heads, head_dim)
        self.feature_k = FeatureMap(feature_map, num_kv_heads, head_dim)
        self.compress = (None if compression_factor is None
                         else StateCompression(self.feature_q.out_dim, compression_factor, self.feature_q.nonnegative))
        self.retrieval_gate = None if gate_init is None else nn.Parameter(torch.full((num_heads,), float(gate_init)))

    # the options, readable as attributes
    chunk_size = property(lambda self: self.options.chunk_size)
    local_chunks = property(lambda self: self.options.local_chunks)
    sink_tokens = property(lambda self: self.options.sink_tokens)
    retrieval_blocks = property(lambda self: self.options.retrieval_blocks)
    recall_tokens = property(lambda self: self.options.recall_tokens)
    own_position_chunks = property(lambda self: self.options.own_position_chunks)
    retrieval = property(lambda self: self.options.retrieval)

    def extra_repr(self) -> str:
        o = self.options
        far = [f"{name}={getattr(o, name)}" for name in ("retrieval_blocks", "recall_tokens", "own_position_chunks")
               if getattr(o, name)]
        return ", ".join([f"heads={self.num_heads}", f"kv_heads={self.num_kv_heads}", f"head_dim={self.head_dim}",
                          f"chunk_size={o.chunk_size}", f"local_chunks={o.local_chunks}",
                          f"sink_tokens={o.sink_tokens}", *far, f"retrieval={o.retrieval!r}"])

    def gate_value(self) -> Optional[torch.Tensor]:
        """The gate, clamped at 0 with a straight-through gradient (so a closed gate can open)."""
        g = self.retrieval_gate
        if g is None:
            return None
        return g + (g.clamp(min=0.0) - g).detach()

    def _op_gate(self):
        """The gate as the op takes it: ``0`` when it is closed and cannot open in this call (no
        gradient), so the op skips reading the chunk states; else :meth:`gate_value`. Read on every call
        (2 us per layer on CPU), so any write to the parameter, ``.data`` included, takes effect at once."""
        g = self.retrieval_gate
        if g is None:
            return None
        if exporting():  # (an export records no value read)
            return self.gate_value()
        if torch.is_grad_enabled() and g.requires_grad:
            if not torch.compiler.is_compiling():  # (a gate holding nan refused here too: outputs were all nan)
                self._gate_closed()
            return self.gate_value()
        return 0 if self._gate_closed() else self.gate_value()

    @eager  # (a host read of the gate)
    def _gate_closed(self) -> bool:
        """Whether every head's gate is at or below 0 (no chunk state is read); on the meta device, which
        holds no values, an open gate (the shapes of every term). A gate holding nan (a diverged update) is
        refused: it read as open and made every output nan."""
        if self.retrieval_gate.is_meta:
            return False
        top = float(self.retrieval_gate.detach().max())
        if math.isnan(top):
            raise ValueError("retrieval_gate holds nan (a diverged update?): load weights that do not, or set it "
                             "(e.g. layer.retrieval_gate.data.zero_() closes it)")
        return top <= 0

    def _run(self, op, hidden_states, attention_mask, position_embeddings, far_position_embeddings, **kwargs):
        q, k, v, valid = self.project(hidden_states, attention_mask)
        b, _, n, _ = q.shape
        if position_embeddings is not None:
            check_rotary("position_embeddings", position_embeddings, q)
        if far_position_embeddings is not None:
            check_rotary("far_position_embeddings", far_position_embeddings, q, pairs=2)
        gate = self._op_gate()
        read = not isinstance(gate, int)
        state = kwargs.get("initial_state")
        state = state if isinstance(state, BSBRState) else None  # (anything else is refused by the op)
        kept = state is not None and state.feature_size > 0  # a cache continued keeps its chunk states
        if read and state is not None and not kept and self.retrieval_gate is not None and self._gate_closed():
            if self.training and torch.is_grad_enabled() and self.retrieval_gate.requires_grad:  # (once per place)
                warnings.warn("the cache continued here was built without autograd, so it keeps no chunk states: "
                              "the closed retrieval_gate gets no gradient from these tokens (build the cache under "
                              "autograd to train the gate)", stacklevel=2)
            gate, read = 0, False  # a cache built with the gate closed has none to read; closed, it reads nothing
        mq, mk = q, k  # meta inputs un-rotated: a mean of rotated vectors over a chunk would cancel out
        qr = kr = None
        if far_position_embeddings is not None:  # far keys (sinks, blocks) at other positions than their own
            (cq, sq), (ck, sk) = far_position_embeddings[:2]
            qr, kr = apply_rotary(q, cq, sq), apply_rotary(k, ck, sk)
        if position_embeddings is not None:
            q, k = apply_rotary(q, *position_embeddings), apply_rotary(k, *position_embeddings)
        # a closed gate reads no chunk state, so none is kept (nor its features computed), except by the
        # recall mode, which chooses its cache with them, and in a cache that keeps them (built where the
        # gate could open: under autograd), so that it continues whether or not autograd is on
        if read or kept or self.options.recall_tokens:
            fk = self.feature_k(k)
            fk = fk if self.compress is None else self.compress(fk)
        else:  # no chunk states, so features of size 0 (the op keeps empty states)
            fk = k.new_empty(b, self.num_kv_heads, n, 0)
        if read:
            fq = self.feature_q(q)
            fq = fq if self.compress is None else self.compress(fq)
        else:  # a closed gate: the op never reads fq
            fq = fk.new_zeros(()).expand(b, self.num_heads, n, fk.shape[-1])
        tensors = (q, k, v, mq, mk, fq, fk, q if qr is None else qr, k if kr is None else kr)
        # the maps' weights (the op takes weights, not modules), read unless they are not where q is (accelerate's
        # offloading keeps them on the meta device, or another, until their module is called) or the module was
        # wrapped (peft's target_parameters adds its delta when it is called)
        meta_q, meta_k = (None if m is None else m.weight if type(m) is HeadwiseLinear and m.weight.device == q.device
                          else m(None) for m in (self.meta_r_proj, self.meta_h_proj))
        return _run_op(op, tensors, valid=valid, options=self.options, gate=gate, meta_q=meta_q, meta_k=meta_k,
                       **kwargs)

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                position_embeddings: Optional[Tuple[torch.Tensor, torch.Tensor]] = None, output_state: bool = False,
                far_position_embeddings=None, streaming: bool = False, state: Optional[BSBRState] = None):
        """hidden_states (b, n, hidden_dim); attention_mask (b, n) of 1/0; position_embeddings the
        rotary (cos, sin) or None; far_position_embeddings ((cos, sin) of the far queries, (cos, sin) of
        the far keys) or None (far keys keep their own positions). Returns (b, n, hidden_dim), and the
        streaming state if asked. ``streaming``: token by token from ``state`` (None: the start), and the
        state is returned, as :meth:`step` does (which calls this, so that hooks on the module's call run:
        accelerate's offloading places the gate's weights there)."""
        if output_state.__class__ is not bool or streaming.__class__ is not bool:  # (no call: every decode step)
            name, flag = ("output_state", output_state) if output_state.__class__ is not bool else \
                ("streaming", streaming)
            raise TypeError(f"{name} must be True or False, got {flag!r}")
        if streaming:
            o, state = self._run(recurrent_bsbr_attention, hidden_states, attention_mask, position_embeddings,
                                 far_position_embeddings, initial_state=state, output_final_state=True)
            return self.output(o), state
        if state is not None:
            raise ValueError("state: a streaming state is continued with streaming=True (or step)")
        o, state = self._run(chunk_bsbr_attention, hidden_states, attention_mask, position_embeddings,
                             far_position_embeddings, output_final_state=output_state)
        out = self.output(o)
        return (out, state) if output_state else out

    def step(self, hidden_states: torch.Tensor, state: Optional[BSBRState], attention_mask: Optional[torch.Tensor] = None,
             position_embeddings: Optional[Tuple[torch.Tensor, torch.Tensor]] = None, far_position_embeddings=None):
        """Streaming decode: continue from ``state`` with the given tokens (b, T, hidden_dim), token by
        token. Returns ((b, T, hidden_dim), the state): the state passed in, advanced (in place without
        autograd), as a KV cache is; to continue one prefix twice, step a fork: ``state.select(torch.arange(b))``.
        One-token rotary tables are turned into a rotation matrix once per tensor and in-place change: tables
        refilled where autograd cannot see it (through ``.data`` or a NumPy view) keep their old rotation, so
        refill them with ``copy_`` or pass new tensors."""
        return self(hidden_states, attention_mask, position_embeddings, far_position_embeddings=far_position_embeddings,
                    streaming=True, state=state)
