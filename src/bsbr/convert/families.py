"""Declarative weight maps from each supported source family to BSBRForCausalLM: lists of
``(target, source, transform)`` rules. Transforms are explicit: GPT-2's Conv1D stores weights as
(in, out), so they are transposed, and its fused ``c_attn`` is split into q, k, v.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

Transform = Optional[Callable[[torch.Tensor], torch.Tensor]]


def split_qkv(part: int, transposed: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """Take q (0), k (1) or v (2) out of a fused projection (GPT-2 ``c_attn``; a Conv1D weight is (in, 3*out))."""
    return lambda w: (w.t() if transposed else w).chunk(3, dim=0)[part]


@dataclass(frozen=True)
class Family:
    model_types: Tuple[str, ...]
    # rules: (target key, source key, transform); layer rules use {i}
    global_rules: List[Tuple[str, str, Transform]]
    layer_rules: List[Tuple[str, str, Transform]]
    config: Callable  # source config -> BSBRConfig architecture kwargs
    base_prefix: str  # prefix of the base model inside the *ForCausalLM state dict
    layer_prefix: str  # source key prefix of layer {i}
    # source keys that are not weights (buffers) and are knowingly not carried over
    ignored_suffixes: Tuple[str, ...] = ()
    # the source config's names of BSBRConfig fields that it names otherwise (an error about one names both)
    source_names: Dict[str, str] = field(default_factory=dict)


def _gpt2_config(c) -> dict:
    for flag, bad in (("scale_attn_by_inverse_layer_idx", True), ("scale_attn_weights", False),
                      ("add_cross_attention", True)):
        if getattr(c, flag, not bad) == bad:
            raise ValueError(f"GPT-2 sources with {flag}={bad} are not supported (it changes the attention math)")
    return dict(
        vocab_size=c.vocab_size, hidden_size=c.n_embd, intermediate_size=c.n_inner or 4 * c.n_embd,
        num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, hidden_act=c.activation_function,
        mlp_type="standard", norm_type="layernorm", norm_eps=c.layer_norm_epsilon, position_type="learned",
        max_position_embeddings=c.n_positions, attention_bias=True, attention_out_bias=True, mlp_bias=True,
        tie_word_embeddings=getattr(c, "tie_word_embeddings", True),
    )


def _given(c, name: str, default):
    """The config's ``name``, or ``default()`` where it has none (None): a 0 is given, and refused by the BSBR
    config's checks (``or`` read it as none, and the model was built with the other value)."""
    value = getattr(c, name, None)
    return default() if value is None else value


def _llama_like_config(c) -> dict:
    rope = getattr(c, "rope_parameters", None) or {"rope_type": "default", "rope_theta": getattr(c, "rope_theta", 10000.0)}
    # (transformers' Llama, Mistral and Qwen2 rotate whole heads; the scaled rope types' tables honour a partial factor,
    # so they cover part of each head and the source's own forward fails on them)
    partial = rope.get("partial_rotary_factor", 1.0)
    if partial not in (None, 1.0) and rope.get("rope_type", "default") != "default":
        raise ValueError(f"rope_parameters' partial_rotary_factor {partial} with rope_type {rope.get('rope_type')!r} "
                         "is not supported (its rotary tables cover part of each head; this family's code rotates all "
                         "of it)")
    # biases as each family's model code builds them: Llama's from its config, Qwen2's q/k/v always, Mistral
    # none (its config may carry attention_bias / mlp_bias, which its code never reads)
    llama = c.model_type == "llama"
    qkv_bias = llama and bool(getattr(c, "attention_bias", False)) or c.model_type == "qwen2"
    out_bias = llama and bool(getattr(c, "attention_bias", False))
    return dict(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=_given(c, "num_key_value_heads", lambda: c.num_attention_heads),
        head_dim=_given(c, "head_dim", lambda: c.hidden_size // c.num_attention_heads),
        hidden_act=c.hidden_act, mlp_type="gated", norm_type="rmsnorm", norm_eps=c.rms_norm_eps,
        position_type="rope", max_position_embeddings=c.max_position_embeddings, rope_parameters=dict(rope),
        attention_bias=qkv_bias, attention_out_bias=out_bias, mlp_bias=llama and bool(getattr(c, "mlp_bias", False)),
        tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
    )


def sliding_window(c) -> Tuple[Optional[int], List[int]]:
    """The sliding window a source's model code applies and the layers it applies in, ``(None, [])`` for
    none: Mistral slides in every layer, Qwen2 in the layers its layer_types name (from max_window_layers
    on), Llama and GPT-2 never (a config may carry the fields all the same)."""
    window = getattr(c, "sliding_window", None)
    if not window or c.model_type not in ("mistral", "qwen2"):
        return None, []
    n = c.num_hidden_layers
    if c.model_type == "mistral":
        return window, list(range(n))
    layer_types = getattr(c, "layer_types", None)
    if layer_types:
        layers = [i for i, kind in enumerate(layer_types) if kind == "sliding_attention"]
    else:
        layers = list(range(n)) if getattr(c, "use_sliding_window", False) else []
    return (window, layers) if layers else (None, [])


def source_notes(c) -> List[str]:
    """What of a llama-like source's attention a conversion cannot keep, one line each (logged as
    warnings): a sliding window (BSBR reads its own window and retrieved blocks instead, so it equals
    the source only on inputs within the source's window) and rotary scaling that changes with the
    input's length (BSBR rotates by the frequencies the source uses up to ``max_position_embeddings``)."""
    notes = []
    window, _ = sliding_window(c)
    if window:
        notes.append(f"the source attends within a sliding window of {window} tokens (sliding_window); the "
                     "BSBR model reads its own window and retrieved blocks instead: it can match the source only "
                     f"on inputs of up to {window} tokens, and only where it reads every earlier token exactly "
                     "at its own position (--far-positions absolute, enough --retrieval-blocks or --recall-tokens)")
    rope = getattr(c, "rope_parameters", None) or {}
    kind = rope.get("rope_type")
    if kind == "dynamic":
        notes.append(f"rope_type 'dynamic' rescales the rotary frequencies with the input's length past "
                     f"{c.max_position_embeddings} tokens; the BSBR model keeps the unscaled ones (the source's "
                     "up to that length)")
    if kind == "longrope":
        notes.append("rope_type 'longrope' switches to long_factor once the input exceeds "
                     f"{rope.get('original_max_position_embeddings', c.max_position_embeddings)} tokens; the "
                     "BSBR model keeps short_factor (the source's up to that length)")
    return notes


GPT2 = Family(
    model_types=("gpt2",),
    global_rules=[
        ("model.embed_tokens.weight", "transformer.wte.weight", None),
        ("model.embed_positions.weight", "transformer.wpe.weight", None),
        ("model.norm.weight", "transformer.ln_f.weight", None),
        ("model.norm.bias", "transformer.ln_f.bias", None),
        ("lm_head.weight", "lm_head.weight", None),
    ],
    layer_rules=[
        ("attn_norm.weight", "ln_1.weight", None),
        ("attn_norm.bias", "ln_1.bias", None),
        *[(f"attn.{t}_proj.{kind}", f"attn.c_attn.{kind}", split_qkv(part, transposed=kind == "weight"))
          for kind in ("weight", "bias") for part, t in enumerate("qkv")],
        ("attn.out_proj.weight", "attn.c_proj.weight", torch.t),
        ("attn.out_proj.bias", "attn.c_proj.bias", None),
        ("mlp_norm.weight", "ln_2.weight", None),
        ("mlp_norm.bias", "ln_2.bias", None),
        ("mlp.fc_in.weight", "mlp.c_fc.weight", torch.t),
        ("mlp.fc_in.bias", "mlp.c_fc.bias", None),
        ("mlp.fc_out.weight", "mlp.c_proj.weight", torch.t),
        ("mlp.fc_out.bias", "mlp.c_proj.bias", None),
    ],
    config=_gpt2_config,
    base_prefix="transformer",
    layer_prefix="transformer.h.{i}.",
    ignored_suffixes=("attn.bias", "attn.masked_bias"),
    source_names=dict(hidden_size="n_embd", intermediate_size="n_inner", num_hidden_layers="n_layer",
                      num_attention_heads="n_head", hidden_act="activation_function", norm_eps="layer_norm_epsilon",
                      max_position_embeddings="n_positions"),
)

LLAMA_LIKE = Family(
    model_types=("llama", "mistral", "qwen2"),
    global_rules=[
        ("model.embed_tokens.weight", "model.embed_tokens.weight", None),
        ("model.norm.weight", "model.norm.weight", None),
        ("lm_head.weight", "lm_head.weight", None),
    ],
    layer_rules=[
        ("attn_norm.weight", "input_layernorm.weight", None),
        *[(f"attn.{t}_proj.{kind}", f"self_attn.{s}_proj.{kind}", None)
          for kind in ("weight", "bias") for t, s in (("q", "q"), ("k", "k"), ("v", "v"), ("out", "o"))],
        ("mlp_norm.weight", "post_attention_layernorm.weight", None),
        *[(f"mlp.{p}.{kind}", f"mlp.{p}.{kind}", None) for kind in ("weight", "bias")
          for p in ("gate_proj", "up_proj", "down_proj")],
    ],
    config=_llama_like_config,
    base_prefix="model",
    layer_prefix="model.layers.{i}.",
    ignored_suffixes=("rotary_emb.inv_freq",),
    source_names=dict(norm_eps="rms_norm_eps"),
)

FAMILIES: Dict[str, Family] = {t: f for f in (GPT2, LLAMA_LIKE) for t in f.model_types}
SUPPORTED_MODEL_TYPES = tuple(sorted(FAMILIES))
