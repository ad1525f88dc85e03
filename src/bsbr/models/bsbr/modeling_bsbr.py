"""HuggingFace BSBR models: norms -> MLP -> (attention: bsbr.layers.BSBRAttention) -> decoder layer ->
PreTrainedModel -> base model -> ForCausalLM.

One implementation hosts every supported family; the config says which positions, norm, MLP and
biases to use. Generation keeps a :class:`BSBRCache` of per-layer streaming states (docs/design.md,
section 8): with exact blocks every key and value, like a KV cache, and per-chunk states only with an open
gate or none; with ``recall_tokens`` a cache of fixed size (the window, the kept tokens and one state).
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import math
import re
import threading
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_layers import (GenericForQuestionAnswering, GenericForSequenceClassification,
                                          GenericForTokenClassification, GradientCheckpointingLayer)

from ...errors import command_path
from ...notes import occasion
from ...layers.bsbr_attention import BSBRAttention, op_dtype
from ...layers.inputs import check_input_ids, check_labels, check_position_ids, mask_to_valid, token_positions
from ...layers.feature_maps import HeadwiseLinear, StateCompression
from ...layers.rotary import RotaryEmbedding, autocast_on
from ...ops.bsbr import BSBRState
from ...ops.checks import eager, exporting, transformed
from .configuration_bsbr import (_AUTO_CLASSES, POSITION_SCHEMES, BSBRConfig, note_unread_head_dropout, notes_off,
                                 saved_before_versions, write_auto_code)


class BSBRRMSNorm(nn.Module):
    """RMSNorm computed in float32, as the Llama family does."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def make_norm(config: BSBRConfig) -> nn.Module:
    if config.norm_type == "rmsnorm":
        return BSBRRMSNorm(config.hidden_size, config.norm_eps)
    return nn.LayerNorm(config.hidden_size, eps=config.norm_eps)


def make_rotary(config: BSBRConfig) -> RotaryEmbedding:
    """Rotary embedding with the source's rope settings (any HF rope type via its init functions)."""
    params = dict(config.rope_parameters)
    if params.get("rope_type", "default") == "default":
        return RotaryEmbedding(config.head_dim, theta=float(params.get("rope_theta", 10000.0)))
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope_type = params["rope_type"]
    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"rope_parameters['rope_type'] must be 'default' or one of {sorted(ROPE_INIT_FUNCTIONS)}, "
                         f"got {rope_type!r}")
    with torch.device("cpu"):  # values even when the model is built on the meta device (load_state_dict restores
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config)  # them after to_empty)
    return RotaryEmbedding(config.head_dim, inv_freq=inv_freq, attention_scaling=scaling)


class BSBRMLP(nn.Module):
    """``standard``: fc_out(act(fc_in(x))) (GPT-2); ``gated``: down(act(gate(x)) * up(x)) (Llama family)."""

    def __init__(self, config: BSBRConfig):
        super().__init__()
        h, i, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gated = config.mlp_type == "gated"
        if config.hidden_act not in ACT2FN:
            raise ValueError(f"hidden_act must be one of {sorted(ACT2FN)}, got {config.hidden_act!r}")
        self.act = ACT2FN[config.hidden_act]
        if self.gated:
            self.gate_proj = nn.Linear(h, i, bias=bias)
            self.up_proj = nn.Linear(h, i, bias=bias)
            self.down_proj = nn.Linear(i, h, bias=bias)
        else:
            self.fc_in = nn.Linear(h, i, bias=bias)
            self.fc_out = nn.Linear(i, h, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        return self.fc_out(self.act(self.fc_in(x)))


class BSBRDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm block: x + attn(norm(x)); x + mlp(norm(x)). Under ``activation_checkpointing_enable()`` a
    training forward keeps only the block's input and recomputes the rest in the backward pass."""

    def __init__(self, config: BSBRConfig):
        super().__init__()
        self.attn_norm = make_norm(config)
        self.attn = BSBRAttention(config.hidden_size, config.num_attention_heads, config.chunk_size, dropout=0.0,
                                  compression_factor=config.compression_factor, **config.attention_kwargs())
        self.mlp_norm = make_norm(config)
        self.mlp = BSBRMLP(config)

    def forward(self, x, valid, position_embeddings, far_position_embeddings=None, state: Optional[BSBRState] = None,
                streaming: bool = False, output_state: bool = False):
        h = self.attn_norm(x)
        if streaming or output_state:
            a, state = self.attn(h, valid, position_embeddings, output_state=output_state,
                                 far_position_embeddings=far_position_embeddings, streaming=streaming, state=state)
        else:
            a = self.attn(h, valid, position_embeddings, far_position_embeddings=far_position_embeddings)
        x = x + a
        return x + self.mlp(self.mlp_norm(x)), state


# held around every from_pretrained bsbr makes: transformers swaps PreTrainedModel.tie_weights for a no-op while
# it loads and puts back what it found, so two loads in threads left tying off for the process (every later
# tied model then lacked its lm_head)
LOADING = threading.RLock()


def _read_from_an_earlier_bsbr(config, given, asked_for, local: Optional[Path]) -> bool:
    """Whether the checkpoint a load read its ``config`` from was saved by a bsbr that recorded no version: the
    config read from it (none ``given``; a folder or a hub id), or the one the Auto classes ``given`` read from the
    same folder (its ``name_or_path``). A config of the caller's (another folder's, a copy, from memory) is not."""
    if given is None:  # (a config read from a file records transformers' version; one built in memory does not)
        return getattr(config, "transformers_version", None) is not None and getattr(config, "bsbr_version",
                                                                                     None) is None
    named = getattr(given, "name_or_path", None)
    if local is None or not named or not isinstance(asked_for, (str, os.PathLike)) or \
            Path(named).resolve() != Path(asked_for).resolve():
        return False
    try:
        saved = json.loads((local / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(saved, dict) and saved_before_versions(saved)


class _HeldReport(logging.Filter):
    """Holds back transformers' load report (its table of weights missing, "newly initialized"), which a strict
    load that refuses them must not print first."""

    def __init__(self):
        super().__init__()
        self.records, self.thread = [], threading.get_ident()  # (another thread's load reports its own)

    def filter(self, record) -> bool:  # (run in the thread that logs: logging.logThreads may be off)
        if threading.get_ident() == self.thread and "LOAD REPORT" in str(record.msg):
            self.records.append(record)
            return False
        return True


_DIGEST_MOD, _DIGEST_BASE = 2_147_483_647, 1_000_003  # a polynomial hash of token ids (products fit int64)
_RETOKENIZED_MIN = 3  # a text repeating a cache of more ids than this but its last is warned of (fewer: by chance)
# a text whose every row begins with a cache's first 16, 32, 64, ... real tokens (fewer: new tokens may open so,
# with a template's header or the text's first words) but not with all of them is warned of: the hashes of those
# prefixes (up to 2^20 tokens) are kept beside the whole text's
_PREFIX_LENGTHS = tuple(16 << j for j in range(17))
_ASCENDING: dict = {}  # device -> _DIGEST_BASE ** j % _DIGEST_MOD for j = 0 .. N - 1, grown by doubling
_LENGTHS: dict = {}  # device -> _PREFIX_LENGTHS as a tensor


def _ascending_powers(k: int, device) -> torch.Tensor:
    """base ** 0 .. base ** (k - 1) (mod), on ``device``. Kept as a tensor: ``generate`` hashes the whole text
    at each step, and building the powers from a Python list took 10 ms at 128k tokens (0.7 ms from the
    tensor)."""
    have = _ASCENDING.get(device)
    if have is None or have.shape[0] < k:
        n = max(k, 2 * (0 if have is None else have.shape[0]), 1024)
        p = [1] * n
        for j in range(1, n):
            p[j] = p[j - 1] * _DIGEST_BASE % _DIGEST_MOD
        _ASCENDING[device] = have = torch.tensor(p, dtype=torch.long, device=device)
    return have[:k]


def _prefix_lengths(device) -> torch.Tensor:
    """:data:`_PREFIX_LENGTHS` as a tensor on ``device`` (made once)."""
    if device not in _LENGTHS:
        _LENGTHS[device] = torch.tensor(_PREFIX_LENGTHS, device=device)
    return _LENGTHS[device]


def prefix_digests(ids: torch.Tensor, real: Optional[torch.Tensor] = None, before: Optional[torch.Tensor] = None,
                   prev: Optional[torch.Tensor] = None, seen: int = 0) -> torch.Tensor:
    """(b, len(_PREFIX_LENGTHS)) hashes of each row's first L real tokens, for each L of :data:`_PREFIX_LENGTHS`
    (the sum of token i's id times base ** i, over its real tokens i < L; fewer than L so far: those so far):
    after ``ids`` (b, k), whose real tokens are ``real`` (b, k) bool (None: all), follow ``before`` (b,) real
    tokens whose hashes are ``prev`` (None: none); ``seen`` >= every ``before`` (positions read: no host sync).
    Padding counts nowhere: a text padded otherwise hashes alike."""
    b, k = ids.shape
    real = torch.ones_like(ids, dtype=torch.bool) if real is None else real.bool()
    before = torch.zeros(b, dtype=torch.long, device=ids.device) if before is None else before.to(ids.device)
    top = _PREFIX_LENGTHS[-1]
    index = before[:, None] + real.long().cumsum(1) - 1  # each real token's index among its row's real tokens
    powers = _ascending_powers(max(1, min(top, seen + k)), ids.device)
    terms = (ids.long() % _DIGEST_MOD) * powers[index.clamp(0, powers.shape[0] - 1)] % _DIGEST_MOD
    terms = terms * (real & (index < top))
    lengths = _prefix_lengths(ids.device)
    new = (terms[:, :, None] * (index[:, :, None] < lengths)).sum(1)  # (b, J): the terms of each prefix (< 2^51)
    return new % _DIGEST_MOD if prev is None else (prev.to(ids.device) + new) % _DIGEST_MOD


def text_digest(ids: torch.Tensor, prev: Optional[torch.Tensor] = None, real: Optional[torch.Tensor] = None
                ) -> torch.Tensor:
    """(b,) hash of each row of ``ids`` (b, k), appended to texts whose hashes are ``prev`` (b,). ``real`` (b, k)
    bool, or None when all are: a padded position hashes as one id whatever id lies under it (the text is the
    same with another pad id)."""
    k = ids.shape[1]
    if real is not None:
        ids = torch.where(real, ids, -1)
    h = ((ids.long() % _DIGEST_MOD) * _ascending_powers(k, ids.device).flip(0) % _DIGEST_MOD).sum(-1) % _DIGEST_MOD
    return h if prev is None else (prev.to(ids.device) * pow(_DIGEST_BASE, k, _DIGEST_MOD) + h) % _DIGEST_MOD


class BSBRCache:
    """Per-layer streaming states for generation, one :class:`bsbr.ops.BSBRState` per layer (what it
    holds: docs/design.md, section 8). A forward with ``cache=`` advances it and returns it, as
    transformers' caches are; to continue one prefix twice, continue a copy: ``cache.select(torch.arange(b))``.
    ``digest``: (b, 4 + len(_PREFIX_LENGTHS)) hashes of each row's input ids so far, as given, with padded
    positions alike, and as given but the last, its count of real tokens, and the :func:`prefix_digests` of its
    real tokens (None: not known, some came as inputs_embeds), by which ``generate`` tells the whole text from
    the new tokens alone.
    ``built_with``: the :func:`built_with` options of the model that made it (None: not known), so that a model
    built otherwise refuses it."""

    is_compileable = False
    is_croppable = False

    def __init__(self, states: List[BSBRState], n_positions: int = 0, digest: Optional[torch.Tensor] = None,
                 built_with: Optional[dict] = None):
        self.states = states
        self.n_positions = n_positions  # input positions consumed, padding included
        self.digest = digest
        self.built_with = built_with
        self.beams = False  # a beam search left it: its rows follow its last beams, not the sequences
        self.unfinished = False  # a forward is advancing it, layer by layer (left True: that call stopped midway)

    def select(self, index: torch.Tensor) -> "BSBRCache":
        """A new cache of the rows ``index`` (b',) of this one (repeated, reordered or a subset); this one is
        left as it is."""
        index = self.states[0].row_index(index) if self.states else torch.as_tensor(index)  # (rows, as the states')
        fork = BSBRCache([s.select(index) for s in self.states], self.n_positions,
                         None if self.digest is None else self.digest[index.to(self.digest.device)], self.built_with)
        fork.beams = getattr(self, "beams", False)
        fork.unfinished = getattr(self, "unfinished", False)
        return fork

    def __repr__(self) -> str:
        tokens = self.states[0].n_seen.tolist() if self.states else []
        return (f"BSBRCache(layers={len(self.states)}, positions={self.n_positions}, tokens per row={tokens}"
                f"{', unfinished' if getattr(self, 'unfinished', False) else ''})")

    @eager
    def begin(self) -> None:
        """Mark the cache as being advanced by a forward, layer by layer, until :meth:`consumed`; refuse one a
        call left midway (a Ctrl-C, an error): its layers have read different numbers of tokens."""
        if getattr(self, "unfinished", False):
            raise ValueError("cache: a call that continued it stopped before it finished (interrupted, or it "
                             "failed), so its layers may hold part of that call's tokens and it cannot be continued: "
                             "build a new one (to continue a prefix more than once, continue copies: "
                             "cache.select(rows))")
        self.unfinished = True

    @eager  # bookkeeping on a Python int: traced, it recompiled at every new length
    def consumed(self, input_ids: Optional[torch.Tensor], n: int, real: Optional[torch.Tensor] = None) -> None:
        """Count ``n`` more input positions, whose ids are ``input_ids`` (None: inputs_embeds, not known) and
        whose real tokens are ``real`` (b, n) bool (None: all)."""
        if input_ids is None or (self.n_positions and self.digest is None):
            self.digest = None
        else:
            prev = [None] * 4 if self.digest is None else list(self.digest[:, :4].unbind(-1))
            count = input_ids.new_full((input_ids.shape[0],), input_ids.shape[1], dtype=torch.long) if real is None \
                else real.sum(1).long()
            prefixes = prefix_digests(input_ids, real, prev[3], None if self.digest is None else self.digest[:, 4:],
                                      self.n_positions)
            whole = [text_digest(input_ids, prev[0]), text_digest(input_ids, prev[1], real),
                     text_digest(input_ids[:, :-1], prev[0]),
                     count if prev[3] is None else prev[3].to(count.device) + count]
            self.digest = torch.cat([torch.stack(whole, -1), prefixes], -1)
        self.n_positions += n
        self.unfinished = False

    def new_tokens_only(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                        first: bool = True) -> bool:
        """Whether ``input_ids``, longer than what the cache consumed, holds only new tokens (True) rather than
        the cache's text and new tokens (False, transformers' convention): the whole text begins, in every
        row, with the ids the cache read (ids under padding in ``attention_mask``, a mask over the whole
        text, may differ). An input of new tokens that begins so is read as the whole text (no rule can tell
        them apart). False when those ids are not known or the input is no longer; an input that is exactly the
        text the cache read is refused (nothing new to read), one that begins with its first tokens but not all
        warned of (:meth:`_warn_of_a_shared_beginning`; one no longer only when ``first``: generate's prefill, not
        a decode step, whose running text of new tokens is shorter than the cache)."""
        n = self.n_positions
        if self.digest is None and first and n and input_ids.shape[1] > n:  # (ids unknown: the cache read embeddings)
            warn_caller(f"this cache read inputs_embeds, whose ids it cannot compare, so input_ids are read as the "
                        f"whole text: its first {n} tokens stand for what the cache read and are skipped; to read "
                        "new tokens alone, read all but their last with model(input_ids=..., cache=cache), then "
                        "generate from the last")
        if self.digest is None or input_ids.shape[0] != self.digest.shape[0]:
            return False  # (another batch: forward refuses the cache)
        masked = isinstance(attention_mask, torch.Tensor) and attention_mask.shape == input_ids.shape
        real = attention_mask != 0 if masked else None
        if input_ids.shape[1] < n:  # new tokens, unless an earlier text edited or retried (the cache read past it)
            if first:
                self._warn_of_a_shared_beginning(input_ids, real)
            return False
        if input_ids.shape[1] == n:
            digest = self.digest.to(input_ids.device)
            same = text_digest(input_ids) == digest[:, 0]
            if masked:
                same |= text_digest(input_ids, real=real) == digest[:, 1]  # (other ids under padding)
            if bool(same.all()):
                raise ValueError("input_ids are the text the cache has read, nothing after it (a cache keeps no "
                                 "logits to continue from; new tokens that repeat the cached text cannot be told from "
                                 "it): build the cache on all but the text's last token, or read all but the last of "
                                 "such new tokens with a forward call (model(input_ids=new[:, :-1], cache=cache)), "
                                 "then generate from the whole text")
            if first:
                self._warn_of_a_shared_beginning(input_ids, real)
            return False
        digest, head = self.digest.to(input_ids.device), input_ids[:, :n]
        same = text_digest(head) == digest[:, 0]  # the ids as the cache read them
        if masked and not bool(same.all()):
            same |= text_digest(head, real=real[:, :n]) == digest[:, 1]  # other ids under padding
        if not bool(same.all()) and n > _RETOKENIZED_MIN:
            retokenized = (text_digest(head[:, :-1]) == digest[:, 2]) & ~same
            if bool(retokenized.any()) and bool(same.any()) and bool((same | retokenized).all()):
                raise ValueError("input_ids: some rows begin with the text the cache read, others with it but for its "
                                 "last token (the whole text tokenized again, the cached text's end merged with what "
                                 "follows?): pass the new tokens alone, or the cache's own ids followed by them")
            if bool(retokenized.all()):  # (new tokens may begin so too: warned of)
                warn_caller("input_ids begin with the text the cache read but for its last token, so they are read "
                            "as new tokens; if they are the whole text tokenized again (the cached text's end merged "
                            "with what follows, e.g. a trailing space), the cached text is read twice: pass the new "
                            "tokens alone, or the cache's own ids followed by them")
            elif not bool(same.any()):  # a token inside the text split or merged otherwise (a chat template's reply)
                self._warn_of_a_shared_beginning(input_ids, real)
        if bool(same.any()) and not bool(same.all()):
            warn_caller(f"input_ids: rows {same.nonzero().flatten().tolist()} begin with the text the cache read, rows "
                        f"{(~same).nonzero().flatten().tolist()} do not, so every row is read as new tokens; if they "
                        "are whole texts, the cache's rows do not follow them (a row edited?) and each row reads its "
                        "text twice: pass the new tokens alone, or generate without cache=")
        return not bool(same.all())

    def _warn_of_a_shared_beginning(self, input_ids: torch.Tensor, real: Optional[torch.Tensor]) -> None:
        """Warn when every row of ``input_ids`` (real tokens ``real``, None: all), which do not go on with all the
        cache read, begins with at least its first ``_PREFIX_LENGTHS[0]`` real tokens (padded otherwise or not):
        more likely the whole text tokenized again, or an earlier text edited or retried, than new tokens (a row
        that does not begin so is new tokens, and so are the others)."""
        digest = self.digest.to(input_ids.device)
        lengths = _prefix_lengths(input_ids.device)
        count = torch.full_like(digest[:, 3], input_ids.shape[1]) if real is None else real.sum(1)
        same = (prefix_digests(input_ids, real) == digest[:, 4:]) & (lengths[None] <= digest[:, 3:4]) & \
            (lengths[None] <= count[:, None])  # (b, J)
        shared = same.long().cumprod(1).sum(1)  # per row: how many of the lengths it shares, from the shortest
        if bool((shared > 0).all()):
            longest = _PREFIX_LENGTHS[int(shared.min()) - 1]
            warn_caller(f"input_ids begin with the first {longest} real tokens the cache read, yet not as the text it "
                        "read (its ids at its positions), so they are read as new tokens; if they are the whole text "
                        "tokenized again (a reply's tokens split or merged by a chat template), padded otherwise or "
                        "edited, or an earlier text retried, the cache has read other text (a next turn rendered "
                        "alone by a template that opens every text with the same system turn reads it again): pass "
                        "the new tokens alone or the cache's own ids followed by them, continue a copy of the cache "
                        "made before (cache.select(range(batch))), or generate without cache=")

    @property
    def n_seen(self) -> torch.Tensor:
        """(b,) real tokens consumed per sequence."""
        return self.states[0].n_seen

    @property
    def is_linear(self) -> List[bool]:
        # not linear for transformers' generate: restarted with a cache and the whole sequence, it drops the
        # first get_seq_length() positions of the input (those the cache has consumed)
        return [False] * len(self.states)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Input positions consumed (padding included), as transformers counts a cache's length."""
        return self.n_positions

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        fork = self.select(beam_idx)
        self.states, self.digest = fork.states, fork.digest

    def nbytes(self) -> int:
        return sum(s.nbytes() for s in self.states)


def warn_caller(message: str, category=UserWarning) -> None:
    """``warnings.warn`` attributed to the first caller outside bsbr, torch, transformers and peft (the user's line,
    not ``nn.Module``'s call machinery, so a filter on the user's module matches)."""
    import sys

    import transformers

    wrappers = [sys.modules[m] for m in ("peft", "accelerate") if m in sys.modules]  # (a PeftModel's generate)
    skip = tuple(os.path.dirname(m.__file__) + os.sep for m in (torch, transformers, sys.modules["bsbr"], *wrappers))
    level, frame = 2, sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(skip):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


def refuse_output_attentions(output_attentions, config) -> None:
    """``output_attentions`` (the argument, or the config's when it is None) is refused in one line."""
    if output_attentions is None and config.output_attentions:
        raise ValueError("output_attentions is true in the model's config (set in config.json, given to "
                         "from_pretrained or set on model.config): BSBR never forms the attention matrix; set it to "
                         "false")
    if output_attentions:
        raise ValueError("output_attentions=True is not supported: BSBR never forms the attention matrix")


def refuse_token_type_ids(kwargs, config) -> None:
    """``token_type_ids``: dropped, as the Llama, Mistral and Qwen2 sources ignore them; refused in one line
    for a model with learned positions (converted from GPT-2), whose source adds their token embeddings
    to its inputs (dropping them would give other logits than the source's)."""
    if kwargs.pop("token_type_ids", None) is not None and config.position_type == "learned":
        raise ValueError("token_type_ids is not supported: a BSBR model has no token-type embeddings (a GPT-2 "
                         "source adds them to its inputs); add them to inputs_embeds yourself or leave them out")


def packed_segments(position_ids: torch.Tensor) -> Optional[torch.Tensor]:
    """(b, n) the index of each token's sequence within its row, where a row packs several (a position that does
    not follow the one before by 1 starts a sequence, as transformers reads rows without a mask, e.g. from its
    ``DataCollatorWithFlattening``); None when every row holds one."""
    segment = (torch.diff(position_ids, dim=-1) != 1).long().cumsum(-1)
    if not bool(segment[:, -1:].any()):
        return None
    return torch.cat([segment.new_zeros(segment.shape[0], 1), segment], -1)


def quantized_module(model: nn.Module) -> Optional[str]:
    """The name of ``model``'s first module of torch's quantized kinds (``quantize_dynamic``'s linears: their
    weights packed, not parameters), or None."""
    for name, module in model.named_modules():
        if type(module).__module__.startswith(("torch.ao.nn.quantized", "torch.nn.quantized",
                                               "torch.ao.nn.intrinsic.quantized")):
            return name or type(module).__name__
    return None


def built_with(config) -> dict:
    """What a model takes from its config when it is built, besides its weights' shapes: the attention
    options its layers keep, the position rules its forward reads with them, and the activation and norm
    epsilon its MLPs and norms keep (``position_scheme``, read at every forward, and ``gate_init``, an
    initial value, may change)."""
    kwargs = config.attention_kwargs()
    kwargs.pop("gate_init")
    return dict(kwargs, num_attention_heads=config.num_attention_heads, compression_factor=config.compression_factor,
                chunk_size=config.chunk_size, far_positions=config.far_positions,
                max_position_embeddings=config.max_position_embeddings, position_type=config.position_type,
                rope_parameters=config.rope_parameters, hidden_act=config.hidden_act, norm_eps=config.norm_eps)


INDEX_MAX = 1 << 28  # bytes: a safetensors index names each weight once (a few MB for the largest models)


def _not_an_index(index: Path) -> Optional[str]:
    """Why ``index`` cannot be a safetensors index to read (a FIFO would block, a device never end), or None."""
    if not index.is_file():
        return "not a regular file"
    return f"over {INDEX_MAX >> 20} MB" if index.stat().st_size > INDEX_MAX else None


class PickledWeightsError(OSError):
    """Weights a model would load with torch.load (pickles), refused."""


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")  # (the names PyTorch checkpoints go by)


def _trainer_state(name: str) -> bool:
    """Whether ``name`` is a file of transformers' Trainer checkpoints that holds no weights."""
    return name in ("training_args.bin", "optimizer.pt", "scheduler.pt", "scaler.pt") or name.startswith("rng_state")


def refuse_pickled_weights(path: Path) -> None:
    """Raise OSError when the model directory ``path`` holds its weights (or its peft adapter's) only as pickles
    (:data:`PICKLE_SUFFIXES`), or has a safetensors index naming files of another kind
    (:class:`PickledWeightsError`): bsbr never loads pickles (even with torch's restricted unpickler); or an index
    that is none; or when ``path`` is a file (transformers loads a file named as the model with torch.load,
    whatever its kind)."""
    if path.exists() and not path.is_dir():
        raise OSError(f"{path} is a file, not a model folder: give the folder save_pretrained wrote (its config.json "
                      "and model.safetensors); bsbr never loads weights by a file's path (a .bin is a pickle)")
    if path.is_dir() and (path / "adapter_config.json").is_file() and (path / "adapter_model.bin").is_file() \
            and not (path / "adapter_model.safetensors").is_file():
        raise PickledWeightsError(f"{path} holds its adapter only as adapter_model.bin (a pickle, which bsbr never "
                                  "loads): save the adapter as safetensors (peft's save_pretrained does by default), "
                                  "or merge it into the model (merge_and_unload) and save that")
    pickled = sorted(f.name for f in path.glob("*") if f.suffix in PICKLE_SUFFIXES and not _trainer_state(f.name)) \
        if path.is_dir() and not any(path.glob("*.safetensors")) else ()
    if pickled:
        raise PickledWeightsError(f"{path} holds its weights only as pickles ({', '.join(pickled[:3])}), which bsbr "
                                  "never loads: save them as safetensors (model.save_pretrained(DIR) does by default)")
    for index in sorted(path.glob("*.safetensors.index*.json")) if path.is_dir() else ():
        refuse_pickled_index(index, read=not (path / "model.safetensors").is_file())


def refuse_pickled_index(index: Path, read: bool = True) -> None:
    """Raise :class:`PickledWeightsError` when ``index`` names weight files other than safetensors (transformers
    loads those with torch.load: a pickle); and OSError when it is no regular file, or is not a safetensors index
    transformers can read where it is ``read`` (beside a model.safetensors, transformers reads that file and leaves
    the index alone)."""
    why = irregular = _not_an_index(index)
    if why is None:
        try:
            table = json.loads(index.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as e:
            table, why = None, " ".join(str(e).split())[:120]
    shards = table.get("weight_map") if why is None and isinstance(table, dict) else None
    names = isinstance(shards, dict) and all(isinstance(f, str) for f in shards.values())
    if why is None and not (names and isinstance(table.get("metadata"), dict)):
        why = "no metadata" if names else "no weight_map" if shards is None else \
            "its weight_map is no table of weight names to file names"
    if why and (read or irregular):
        raise OSError(f"{index} is not a safetensors index ({why}): remove it, or put back the one save_pretrained "
                      "wrote")
    if not names:
        return
    other = sorted({f for f in shards.values() if not f.endswith(".safetensors")})
    if other:
        raise PickledWeightsError(f"{index} names weight files that are not safetensors ({', '.join(other[:3])}: "
                                  "pickles, which bsbr never loads): save the weights as safetensors "
                                  "(model.save_pretrained(DIR) does by default)")


def hub_folder(repo_id: str, **hub_options) -> Optional[Path]:
    """The folder of the local hub cache that holds a hub model's ``config.json`` and safetensors weights, fetched
    as transformers would fetch them (it then reads them from the cache), so that the checks of a model folder run
    on it; None where they cannot be had (the hub not asked, or no such model: the load then names what is
    missing). A hub that cannot be reached for a model not in the cache is an OSError here, once (transformers
    would retry on every file); weights only as ``pytorch_model.bin`` (a pickle) or a shard index naming such
    files are :class:`PickledWeightsError`. ``hub_options``: ``revision``, ``subfolder``, ``token``, ... as
    ``from_pretrained`` takes them."""
    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError, HFValidationError, HfHubHTTPError, LocalEntryNotFoundError

    options = {k: hub_options[k] for k in ("revision", "subfolder", "token", "cache_dir", "local_files_only")
               if hub_options.get(k) is not None}
    absent = (EntryNotFoundError, LocalEntryNotFoundError)

    def fetch(name: str) -> Path:
        return Path(hf_hub_download(repo_id, name, **options))

    try:
        config = fetch("config.json")
    except LocalEntryNotFoundError as e:  # (not cached, and the hub not asked or not reached)
        if constants.HF_HUB_OFFLINE or options.get("local_files_only"):
            return None  # (the load names what the cache lacks)
        raise OSError(f"{repo_id}: the hub cannot be reached, and no copy of it is in the local cache "
                      f"({' '.join(str(e).split())[:160]}): check the network, or give a local model folder") from e
    except (EntryNotFoundError, HFValidationError, HfHubHTTPError, ValueError):
        return None  # (a name or repository the load then names)
    if hub_options.get("variant"):
        return None  # (a variant's files: transformers finds and names them)
    try:
        fetch("model.safetensors")
    except absent:
        try:
            index = fetch("model.safetensors.index.json")
        except absent:
            cached = try_to_load_from_cache(repo_id, "pytorch_model.bin", cache_dir=options.get("cache_dir"),
                                            revision=options.get("revision")) if not options.get("subfolder") else None
            if isinstance(cached, str) or _on_the_hub(repo_id, "pytorch_model.bin", options):
                raise PickledWeightsError(f"{repo_id} holds its weights only as pytorch_model.bin (a pickle, which "
                                          "bsbr never loads): save them as safetensors (model.save_pretrained(DIR) "
                                          "does by default)") from None
            return None  # (the load names what is missing)
        refuse_pickled_index(index)
        for shard in weight_files(index.parent):
            with contextlib.suppress(*absent):  # (a shard missing: the load names it)
                fetch(shard.name)
    return config.parent


def _on_the_hub(repo_id: str, name: str, options: dict) -> bool:
    """Whether the hub holds the file ``name`` of ``repo_id`` (False where it is not asked or cannot say)."""
    from huggingface_hub import constants, file_exists

    if constants.HF_HUB_OFFLINE or options.get("local_files_only"):
        return False
    try:
        return file_exists(repo_id, name, revision=options.get("revision"), token=options.get("token"))
    except Exception:  # (the hub cannot be reached, or refuses: the load says what is missing)
        return False


def _cache_argument(cache, kwargs: dict):
    """``cache``, or the cache passed as ``past_key_values`` (its name before transformers 5.24, in much user
    code; unread, it made a step a fresh forward of the new tokens alone), which is deprecated."""
    if "past_key_value" in kwargs:  # (a layer's argument in transformers: here ignored, the step was a fresh forward)
        raise ValueError("past_key_value= is not an argument of this model: pass the cache as cache=")
    old = kwargs.pop("past_key_values", None)
    if old is None:
        return cache
    if cache is not None:
        raise ValueError("the cache is given twice, as cache= and as past_key_values= (its name before transformers "
                         "5.24): pass cache= only")
    warn_caller("past_key_values= is deprecated: pass the cache as cache=", FutureWarning)
    return old


def _generate_input(args, kwargs):
    """The text ``generate`` was given: ``inputs_embeds``, else the ids (first argument, ``inputs`` or
    ``input_ids``)."""
    for x in (kwargs.get("inputs_embeds"), args[0] if args else None, kwargs.get("inputs"), kwargs.get("input_ids")):
        if isinstance(x, torch.Tensor):
            return x
    return None


def _check_mask_length(mask, text, cached: int) -> None:
    """A 2-D ``attention_mask`` given with a cache covers the input (the whole text, or new tokens alone) or the
    cache's positions and the input: another length cannot say which tokens the cache has read (transformers
    then reads the whole input as new, so a whole text's cached part was read twice)."""
    if not (isinstance(mask, torch.Tensor) and mask.dim() == 2 and isinstance(text, torch.Tensor) and text.dim() >= 2
            and cached):
        return
    n = text.shape[1]
    if mask.shape[-1] not in (n, cached + n):
        raise ValueError(f"attention_mask has {mask.shape[-1]:,} columns, the input {n:,} tokens and the cache "
                         f"{cached:,} positions: give a mask over the input ({n:,}) or over the cache's positions "
                         f"and the input ({cached + n:,})")


def refuse_other_model_type(path: Path) -> None:
    """Raise ValueError when the model directory ``path`` holds a source model (its config.json's
    ``model_type`` is not "bsbr"): it is converted first, not loaded."""
    try:
        model_type = json.loads((path / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError, RecursionError) as e:
        raise ValueError(f"{path}/config.json is not a JSON object: {e}") from e
    if model_type != "bsbr":
        raise ValueError(f"{path} holds a {model_type!r} model, not a BSBR one: convert it first if bsbr converts "
                         f"its family (bsbr convert {command_path(path)} OUT, or bsbr.convert_to_bsbr)")


def _layouts(path: Path, variant: Optional[str] = None) -> Tuple[Path, Path]:
    """The single weight file and the shard index save_pretrained writes in ``path`` (of a ``variant``)."""
    return (path / (f"model.{variant}.safetensors" if variant else "model.safetensors"),
            path / (f"model.safetensors.index.{variant}.json" if variant else "model.safetensors.index.json"))


def missing_weights(path: Path) -> Optional[str]:
    """Why the model directory ``path`` holds no weights bsbr loads (``model.safetensors`` or a shard index), said
    with what to do; None when it holds them."""
    if any(p.exists() for p in _layouts(path)):
        return None
    if broken := [p.name for p in _layouts(path) if p.is_symlink()]:  # (a link to nothing: exists() is False)
        return (f"has {broken[0]} as a link to a file that no longer exists (a hub cache's file removed?): download "
                "or save the model again")
    variants = sorted(p.name for pattern in ("model.*.safetensors", "model.safetensors.index.*.json")
                      for p in path.glob(pattern))
    others = sorted(p.name for p in path.glob("*.safetensors"))
    if variants:
        return (f"holds the weights of a save_pretrained variant ({variants[0]}), not model.safetensors: save it "
                "without variant= (from Python, from_pretrained(DIR, variant=...) loads it)")
    return (f"has no model.safetensors ({', '.join(others[:3])} {'is' if len(others) == 1 else 'are'} not the model's)"
            if others else "has no .safetensors weights (pickled checkpoints are never loaded)") + \
        ": save it with save_pretrained, or convert it again"


def weight_files(path: Path, variant: Optional[str] = None) -> List[Path]:
    """The safetensors files of the model directory ``path`` that transformers loads: ``model.safetensors``, else
    the shards ``model.safetensors.index.json`` names (some may be missing; ``variant``:
    ``model.VARIANT.safetensors`` and ``model.safetensors.index.VARIANT.json``). Other ``.safetensors`` files beside
    them are not the model's."""
    single, index = _layouts(path, variant)
    if single.is_file():
        return [single]
    if _not_an_index(index):  # (refuse_pickled_weights names it)
        return []
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        # (some may be missing: transformers names them)
        return sorted({path / f for f in json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()})
    return []


def refuse_non_float_weights(path: Path, names=None, scaled_only: bool = False, variant: Optional[str] = None
                             ) -> None:
    """Raise ValueError when the model directory ``path``'s weight files (:func:`weight_files`) hold a weight
    that is not float16/32/64 or bfloat16 (an integer, bool or scaled float8/float4 tensor would be cast silently
    into a float parameter). ``names``: only these weights (those a model loaded); ``scaled_only``: only scaled
    float weights (float4 fails to load at all)."""
    from safetensors import safe_open

    for f in weight_files(path, variant) if path.is_dir() else ():
        if not f.is_file():
            continue
        with safe_open(str(f), "pt") as st:
            for name in st.keys() if names is None else set(st.keys()) & set(names):
                dtype = st.get_slice(name).get_dtype()
                if dtype not in ("F16", "F32", "F64", "BF16") and (dtype.startswith("F") or not scaled_only):
                    kind = "a scaled float format" if dtype.startswith("F") else "not floating point"
                    raise ValueError(f"{f}: weight {name} is {dtype}, {kind} (a quantized or edited checkpoint?): "
                                     "bsbr loads the float32/float16/bfloat16 weights save_pretrained writes")


# sizes refuse_sizes_past_the_weights reads from from_pretrained's keyword arguments (with the config.json's fields)
_SIZES = ("num_hidden_layers", "vocab_size", "hidden_size", "intermediate_size", "head_dim")


def offloaded_nonfinite(model) -> List[str]:
    """The parameters accelerate offloaded (on the meta device, their values in its hooks' weights maps) that
    hold nan or inf, read one at a time."""
    bad, seen = [], set()
    for name, module in model.named_modules():
        weights = getattr(getattr(module, "_hf_hook", None), "weights_map", None)
        if weights is None:
            continue
        for pname, p in module.named_parameters():
            if p.is_meta and id(p) not in seen:
                with contextlib.suppress(KeyError, OSError, ValueError):
                    value = weights[pname]
                    seen.add(id(p))
                    if not bool(torch.isfinite(torch.as_tensor(value)).all()):
                        bad.append(f"{name}.{pname}" if name else pname)
    return sorted(bad)


def _identity(path: Path):
    """(inode, size, mtime) of a file, or None: a file rewritten since has another."""
    with contextlib.suppress(OSError):
        st = path.stat()
        return st.st_ino, st.st_size, st.st_mtime_ns
    return None


_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|h)\.(\d+)\.")  # a decoder layer's: model.layers.N., transformer.h.N.


def weight_shapes(path: Path, variant: Optional[str] = None) -> Optional[Dict[str, tuple]]:
    """The shape of each weight the model directory ``path``'s weight files (:func:`weight_files`) hold, read from
    their headers; None when one of the files is missing."""
    from safetensors import safe_open

    files = weight_files(path, variant)
    if not all(f.is_file() for f in files):
        return None
    shapes = {}
    for f in files:
        with safe_open(str(f), "pt") as st:
            shapes.update((name, tuple(st.get_slice(name).get_shape())) for name in st.keys())
    return shapes


def weights_held(path: Path, variant: Optional[str] = None) -> Optional[Tuple[int, Optional[tuple]]]:
    """The number of decoder layers the model directory ``path``'s weights hold (0 if no weight names one) and the
    shape of ``embed_tokens.weight`` (None if absent); None when one of the files is missing."""
    return None if (shapes := weight_shapes(path, variant)) is None else _held(shapes)


def _held(shapes: Dict[str, tuple]) -> Tuple[int, Optional[tuple]]:
    """:func:`weights_held` of the weights' ``shapes``."""
    layers = max((int(found.group(1)) + 1 for name in shapes if (found := _LAYER_INDEX.search(name))), default=0)
    return layers, next((shape for name, shape in shapes.items() if name.endswith("embed_tokens.weight")), None)


def _first_unfit_shape(config: dict, shapes: Dict[str, tuple]) -> Optional[str]:
    """The first weight the model ``config`` builds (on the meta device: nothing allocated) whose shape is not the
    one ``shapes`` holds, said as such, when the config builds over twice the weights' elements (and 2^24 more):
    a smaller misfit is named by the load's own check, which tells an earlier bsbr's weights apart. None when
    none is, or when the config builds no model (its own checks name the value when it is built)."""
    sizes = {k: v for k, v in config.items() if k not in ("dtype", "torch_dtype")}  # (any dtype: the same shapes)
    try:
        with torch.device("meta"), notes_off():
            built = BSBRForCausalLM(BSBRConfig(**sizes))
    except (ValueError, TypeError, KeyError, AttributeError):
        return None
    held = sum(math.prod(shape) for shape in shapes.values())
    if sum(p.numel() for p in built.parameters()) <= 2 * held + (1 << 24):
        return None
    for name, p in built.named_parameters():
        have = shapes.get(name, shapes.get(name.removeprefix("model.")))
        if have is not None and have != tuple(p.shape):
            return f"it builds {name} of shape {tuple(p.shape)}, the weights hold {have}"
    return None


def refuse_sizes_past_the_weights(path: Path, given=None, overrides: Optional[dict] = None,
                                  variant: Optional[str] = None) -> None:
    """Raise ValueError, before a model is built, when the config it is built from (``given``, a config object,
    else ``path``'s config.json, with ``overrides``: from_pretrained's keyword arguments) asks for more layers
    than ``path``'s ``.safetensors`` weights hold, an embedding of another shape, or any weight of another shape
    (a hand edit of 30 layers to 300 built 300 layers, 4.3 GB and 11 s, before the strict check named the missing
    weights; a vocabulary of 10^9 asked for 192 GB; an intermediate_size of 2,000,000 took 2.7 GB for a tiny
    model)."""
    try:
        saved = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        saved = None  # (transformers names an unreadable config)
    saved = saved if isinstance(saved, dict) else {}
    overrides = {k: v for k, v in (overrides or {}).items() if k in saved or k in _SIZES}  # (the config's fields)
    config = {**(given.to_dict() if given is not None else saved), **overrides}

    def where(field):  # the config.json, unless the value came from from_pretrained's arguments
        return f"from_pretrained's {field}" if field in (overrides or {}) else \
            f"{path / 'config.json'}" if saved.get(field) == config[field] else \
            "the config from_pretrained was given (or built from its keyword arguments)"

    if (shapes := weight_shapes(path, variant)) is None:  # (a shard missing: transformers names it, not the config)
        return
    layers, embedding = _held(shapes)
    wanted = config.get("num_hidden_layers")
    if layers and isinstance(wanted, int) and wanted > layers:
        raise ValueError(f"{where('num_hidden_layers')}: num_hidden_layers is {wanted}, the weights hold {layers} "
                         "layers: give the config the model was saved with")
    if embedding is not None and len(embedding) == 2:
        for field, size in (("vocab_size", embedding[0]), ("hidden_size", embedding[1])):
            if isinstance(config.get(field), int) and config[field] != size:
                raise ValueError(f"{where(field)}: {field} is {config[field]}, the weights' embedding "
                                 f"{tuple(embedding)}: give the config the model was saved with")
    if unfit := _first_unfit_shape(config, shapes):  # (another size edited: intermediate_size, head_dim, ...)
        named = f"{path / 'config.json'}" if saved and _first_unfit_shape(saved, shapes) else \
            "the config from_pretrained was given (or built from its keyword arguments)"
        raise ValueError(f"{named}: {unfit}: give the config the model was saved with")


def _empty(cache) -> bool:
    """Whether a transformers cache holds no token (as DynamicCache() does, which manual loops begin with)."""
    try:
        return not cache.get_seq_length()
    except Exception:  # (a cache class of its own: not known to be empty)
        return False


_NO_CONTINUOUS_BATCHING = ("continuous batching (cache_implementation='paged', generate_batch) runs transformers' "
                           "paged attention and cache, which BSBR attention (the window and the retrieved blocks in "
                           "one softmax, a BSBRCache) cannot use: generate without cache_implementation")


class BSBRPreTrainedModel(PreTrainedModel):
    config_class = BSBRConfig
    config: BSBRConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["BSBRDecoderLayer"]
    # generation keeps its own BSBRCache; it can neither be rolled back nor replaced by a DynamicCache
    _is_stateful = True

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False

    def _check_and_adjust_attn_implementation(self, attn_implementation, is_init_check: bool = False,
                                              allow_all_kernels: bool = False) -> str:
        """BSBR attention is one op of its own, whatever ``attn_implementation`` says (on CPU it runs PyTorch's
        fused SDPA kernel where it can): "eager" and "sdpa", which scripts pass for any model, load it; another
        kernel is refused in one line (transformers asked to request support for it on the model's hub page)."""
        if attn_implementation in (None, "eager", "sdpa"):
            return attn_implementation or "eager"
        if str(attn_implementation).startswith("paged"):  # continuous batching asks for it (from eager)
            raise ValueError(_NO_CONTINUOUS_BATCHING)
        raise ValueError(f"attn_implementation={attn_implementation!r}: a BSBR model takes 'eager' or 'sdpa' (both "
                         "run BSBR attention, its own op: the exact window and the retrieved blocks in one softmax; "
                         "no other kernel can): give one of those, or leave attn_implementation out")

    @classmethod
    @occasion()  # (its config's notes are said for each load)
    def from_pretrained(cls, *args, strict: bool = True, **kwargs):
        """transformers' ``from_pretrained`` (also what ``AutoModelForCausalLM`` calls), strict: a weight the
        checkpoint lacks, one it has in excess, one of another shape or one holding nan/inf is an error,
        where transformers would initialise it randomly with a warning (or load it). ``strict=False``:
        transformers' behaviour, weights of another shape included (initialised randomly, with its warning).

        Weights load from safetensors only, as with :func:`bsbr.load_bsbr_model` (a ``.bin`` checkpoint is a
        pickle, never loaded, even through torch's restricted unpickler): ``use_safetensors=False`` is refused."""
        where = args[0] if args else kwargs.get("pretrained_model_name_or_path", "")
        asked_for = where  # (the folder or hub id, before a subfolder joins it)
        local = Path(where, kwargs.get("subfolder") or "") if isinstance(where, (str, os.PathLike)) else None
        if local is not None and local.is_dir() and kwargs.get("config") is None:
            if not (local / "config.json").is_file():  # (transformers built a default config, then failed on meta
                # tensors after a table of mismatched weights)
                raise FileNotFoundError(f"{local} is not a saved BSBR model directory (no config.json)")
            refuse_other_model_type(local)
        if kwargs.get("use_safetensors") is False:
            raise ValueError("use_safetensors=False: a BSBR model loads from safetensors only (a .bin checkpoint is "
                             "a pickle); save it with save_pretrained, which writes safetensors")
        kwargs["use_safetensors"] = True
        checked = local if local is not None and local.exists() else None  # the folder the weights' checks read
        if checked is not None:
            refuse_pickled_weights(local)
        elif local is not None and Path(where).is_dir():  # (a subfolder's typo: read as a hub id, 23 s of retries)
            raise FileNotFoundError(f"{local} does not exist (subfolder {kwargs.get('subfolder')!r} of the folder "
                                    f"{where})")
        elif isinstance(where, str) and where:  # a hub id: checked as a folder, its files in the hub cache
            checked = hub_folder(where, **kwargs)
        if not strict:  # (transformers refuses a weight of another shape unless told to ignore it)
            kwargs.setdefault("ignore_mismatched_sizes", True)
            with LOADING:
                loaded = super().from_pretrained(*args, **kwargs)
            note_unread_head_dropout((loaded[0] if isinstance(loaded, tuple) else loaded).config, cls.__name__)
            return loaded
        variant = kwargs.get("variant")
        if checked is not None:
            refuse_non_float_weights(checked, variant=variant)
            given = kwargs.get("config")
            if given is None or isinstance(given, PretrainedConfig):  # (a config named by a path: not read here)
                refuse_sizes_past_the_weights(checked, given, kwargs, variant)
        want_info = kwargs.pop("output_loading_info", False)
        reinit_mismatched = kwargs.get("ignore_mismatched_sizes", False)  # (the caller's: a new head of other
        # labels on a classifier's folder, as transformers does it)
        kwargs["ignore_mismatched_sizes"] = True  # reported below, by name, with the others
        where = local if local is not None else where or "given as state_dict"  # (what the messages below name)
        report = logging.getLogger("transformers.modeling_utils")
        held = _HeldReport()  # transformers' report of weights "newly initialized", said once the load is accepted
        report.addFilter(held)
        try:
            with LOADING:
                model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        finally:
            report.removeFilter(held)
        new_head = getattr(model, "_new_head", None)
        # what is refused below: not a head a base model or task head drops from another's checkpoint, nor a task
        # head new on another model's folder (transformers' load report names it: MISSING, newly initialized);
        # info, returned, stays transformers' own
        saved_as = getattr(model.config, "architectures", None) or ()
        left = dict(unexpected_keys=[k for k in info.get("unexpected_keys", ()) if hasattr(model, "lm_head")
                                     or not str(k).startswith(_HEADS)],
                    missing_keys=[k for k in info.get("missing_keys", ()) if new_head is None or type(model).__name__
                                  in saved_as or not str(k).startswith(new_head)])
        head_mismatched = [k for k in info.get("mismatched_keys", ()) if str(
            k[0] if isinstance(k, tuple) else k).startswith(_TASK_HEADS)]  # (a head of other labels: made anew
        asked = head_mismatched if reinit_mismatched else []  # where the caller asked; a decoder weight never)
        def named(entry):  # a mismatched key comes as (name, checkpoint's shape, config's shape)
            if isinstance(entry, tuple) and len(entry) == 3:
                return f"{entry[0]} (checkpoint {tuple(entry[1])}, config {tuple(entry[2])})"
            return str(entry)

        left = {k: [e for e in left.get(k, info.get(k, ())) if e not in asked] for k in (
            "missing_keys", "unexpected_keys", "mismatched_keys")}
        problems = {k: sorted(map(named, v))[:8] for k, v in left.items() if v}
        if problems and _read_from_an_earlier_bsbr(model.config, kwargs.get("config"), asked_for, local):
            raise ValueError(f"the BSBR checkpoint {where} does not match its config: {problems}: saved by an "
                             "earlier bsbr (config.json records no bsbr_version), with weights this bsbr does not "
                             "build: convert the source again with bsbr convert")
        other = next((a for a in saved_as if a.startswith("BSBR") and a != "BSBRForCausalLM"), None)
        # (a tied model's folder lacks no lm_head: its task head is extra; a tied base model's is a whole causal LM)
        if other and hasattr(model, "lm_head") and problems and set(problems.get("missing_keys", ())) <= {
                "lm_head.weight"} and not problems.get("mismatched_keys") and all(
                    k.startswith(_HEADS) for k in problems.get("unexpected_keys", ())):
            auto = {name: auto for auto, name in _AUTO_CLASSES.items()}.get(other, other)
            raise ValueError(f"{where} holds a {other} (saved from it), not a causal LM: load it with {auto}; "
                             "a causal LM's folder (bsbr convert's output) generates, evaluates and distills")
        if problems:
            labels = problems.keys() == {"mismatched_keys"} and len(head_mismatched) == len(left["mismatched_keys"])
            raise ValueError(f"the BSBR checkpoint {where} does not match its config: {problems} (refused: missing "
                             f"or mismatched weights would be random, unexpected ones dropped; from Python, "
                             f"from_pretrained(..., strict=False) loads it anyway" + (
                                 "; ignore_mismatched_sizes=True makes a head of these labels anew" if labels else "")
                             + ")")
        bad = sorted(n for n, p in model.named_parameters() if not p.is_meta and not bool(torch.isfinite(p).all()))
        bad += offloaded_nonfinite(model)  # (device_map's disk or cpu offload: none of them in memory)
        if bad:  # (a diverged run's weights generate blanks or fail to sample)
            raise ValueError(f"the BSBR checkpoint {where}: weights hold nan or inf: {', '.join(bad[:3])}"
                             f"{f' and {len(bad) - 3} more' if len(bad) > 3 else ''} (refused; from Python, from_pretrained(..., strict=False) loads them)")
        for record in held.records:
            report.handle(record)
        note_unread_head_dropout(model.config, cls.__name__)
        return (model, info) if want_info else model

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoModel"):
        """Nothing, as :meth:`BSBRConfig.register_for_auto_class`: ``auto_map`` names ``bsbr_auto.py``."""

    def save_pretrained(self, save_directory, is_main_process: bool = True, *args, **kwargs):
        """transformers' ``save_pretrained``, plus ``bsbr_auto.py``, which config.json's ``auto_map`` names: a
        process that has not imported bsbr loads the model with ``trust_remote_code=True`` (that file imports
        the installed bsbr; nothing else is executed). A save that fails (a full disk) before any old weight file
        changed puts the folder back as it was (transformers writes the configs before the weights: the new config
        beside the old weights loaded silently); one that had replaced some old shards removes config.json, so
        that the mix does not load."""
        from ... import __version__

        base = getattr(self, "model", self)
        given = kwargs.get("state_dict", args[0] if args else None)  # (a caller's own weights: DeepSpeed's, a subset)
        quantized = quantized_module(self) if given is None else None
        if isinstance(given, dict):  # (a quantized module's entries: packed params, a dtype, quantized tensors)
            key = next((k for k, v in given.items() if not isinstance(v, torch.Tensor) or v.is_quantized), None)
            quantized = None if key is None else key.split("._packed_params")[0] if "._packed_params" in key else \
                key.rsplit(".", 1)[0]
        if quantized is not None:  # (its packed weights read as missing ones)
            raise ValueError(f"{quantized} is a quantized module, and a BSBR folder holds float weights: save the "
                             "float model, and quantize it again after loading")
        if isinstance(base, BSBRBaseModel) and given is None:  # a config edited so that it builds other weights:
            base._check_config_unchanged(weights_only=True)  # a save that never loads
        self.config.refuse_retired()  # (before transformers makes the folder)
        self.config.bsbr_version = __version__  # (config.json says which bsbr wrote it)
        layouts = _layouts(Path(save_directory), kwargs.get("variant"))
        before = [_identity(f) for f in layouts]
        configs = [Path(save_directory, name) for name in ("config.json", "generation_config.json", "bsbr_auto.py")]
        kept = {f: f.read_bytes() for f in configs if is_main_process and f.is_file()}  # (through a link, as written)
        existed = {f for f in configs if os.path.lexists(f)}  # (a link to nothing: kept, and what is written
        # through it removed)
        weights = {f: _identity(f) for f in Path(save_directory).glob("*.safetensors*")}
        try:
            super().save_pretrained(save_directory, is_main_process, *args, **kwargs)
        except BaseException as e:
            now = {f: _identity(f) for f in Path(save_directory).glob("*.safetensors*")}
            if not is_main_process:  # (the main process writes the configs, and puts them back)
                raise
            if all(now.get(f) == ident for f, ident in weights.items()):  # the old weights as they were: their
                for f, data in kept.items():  # configs back, and the new files written so far gone
                    with contextlib.suppress(OSError):
                        f.write_bytes(data)
                made = [*(now.keys() - weights.keys()), *(f for f in configs if f not in existed),
                        *(Path(os.path.realpath(f)) for f in existed - kept.keys())]
                for f in made:
                    with contextlib.suppress(OSError):
                        f.unlink()
            elif kept:  # some old shards replaced, some not: no config, so that the mix never loads
                with contextlib.suppress(OSError):
                    configs[0].unlink()
                e.add_note(f"{save_directory} holds a part of the new weights and a part of the old: its config.json "
                           "was removed so that it does not load; save again")
            raise
        if is_main_process and os.path.isdir(save_directory):  # (a file: transformers logged why it saved nothing)
            write_auto_code(save_directory)
            after = [_identity(f) for f in layouts]
            if all(after) and after != before:  # the other layout's file, left from an earlier save (transformers
                # leaves it, and loads model.safetensors first: the old weights, silently)
                for f, b, a in zip(layouts, before, after):
                    if a == b:  # (unchanged by this save: at most one, as after != before)
                        f.unlink()

    def _upload_modified_files(self, working_dir, *args, **kwargs):
        """``push_to_hub`` (and ``save_pretrained(push_to_hub=True)``) uploads the files changed since the save
        began: ``bsbr_auto.py`` is written just before, so that it goes too."""
        write_auto_code(working_dir)
        return super()._upload_modified_files(working_dir, *args, **kwargs)

    def _returned(self, out, return_dict: Optional[bool]):
        """``out``, or its tuple when ``return_dict`` (default: the config's) is False, as transformers' models do."""
        return out if (self.config.return_dict if return_dict is None else return_dict) else out.to_tuple()

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, HeadwiseLinear):
            init.copy_(module.weight, HeadwiseLinear.initial_weight(*module.weight.shape))
        elif isinstance(module, StateCompression):
            init.copy_(module.proj, StateCompression.initial_weight(module.proj.shape[0], module.factor))
        elif isinstance(module, BSBRAttention):
            if module.retrieval_gate is not None:
                init.constant_(module.retrieval_gate, float(self.config.gate_init))
        elif isinstance(module, BSBRRMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, RotaryEmbedding):
            # a non-persistent buffer: from_pretrained builds the model on the meta device, so refill it from the
            # values make_rotary computed on the CPU
            init.copy_(module.inv_freq, module.inv_freq_values)


def _map_learned_positions(pos: torch.Tensor, config: BSBRConfig) -> torch.Tensor:
    n_pos = config.max_position_embeddings
    if config.position_scheme == "absolute":
        if pos.numel() and int(pos.max()) >= n_pos:
            raise ValueError(f"input reaches position {int(pos.max())} but max_position_embeddings is {n_pos}; "
                             f"use position_scheme 'wrap' or 'clamp' for longer inputs")
        return pos
    if config.position_scheme == "clamp":
        return pos.clamp(max=n_pos - 1)
    if config.position_scheme != "wrap":  # (set by hand after the config was built: read here at every forward)
        raise ValueError(f"config.position_scheme must be one of {POSITION_SCHEMES}, got {config.position_scheme!r}")
    # wrap: past the table, a position repeats the one a whole number of chunks earlier (the period is the
    # table rounded down to whole chunks; when chunk_size divides the table, no chunk straddles the wrap
    # point, otherwise the chunk holding position n_pos jumps back within itself)
    period = (n_pos // config.chunk_size) * config.chunk_size or n_pos
    return torch.where(pos < n_pos, pos, pos % period)


def _refuse_forgotten_tokens(cached_mask: torch.Tensor, cache: BSBRCache) -> None:
    """A mask over the tokens a cache has read must count as real the tokens it read as real: it may not
    mark as padding tokens it read (pads that ``generate`` fed after a row's end of text, masked in the next
    turn): a cache cannot forget them, and its chunks, positions and states would silently still count them;
    nor mark as real the pads it skipped, which it can no longer read."""
    short = cache.n_seen - (cached_mask != 0).sum(-1).to(cache.n_seen.device)
    if bool((short != 0).any()):
        row = int((short != 0).nonzero()[0, 0])
        told = (f"padding {int(short[row])} token(s) that the cache read as real (row {row}; e.g. pads generated "
                "after a row's end of text): a cache cannot forget tokens" if short[row] > 0 else
                f"real {-int(short[row])} token(s) that the cache read as padding (row {row}): a cache cannot read "
                "tokens it skipped")
        raise ValueError(f"attention_mask marks as {told}; generate from the whole text without cache=, or keep "
                         "the mask the cache was built with")


# the config fields whose None a new config resolves from the others (a default that depends on them)
_RESOLVED = ("retrieval_blocks", "feature_map", "head_dim", "num_key_value_heads", "attention_out_bias")

# the source families whose own code builds the token embedding with the pad token's row left untrained
# (``nn.Embedding``'s ``padding_idx``); GPT-2's, and a model trained from scratch here, train every row
_PADDING_ROW_FAMILIES = ("llama", "mistral", "qwen2")


def padding_row(config) -> Optional[int]:
    """The token embedding's ``padding_idx`` (its row gets no gradient from the lookup): ``pad_token_id`` where
    the source's family builds it so (a negative id counts from the end, as PyTorch reads it), else None."""
    pad = config.pad_token_id
    if config.source_model_type in _PADDING_ROW_FAMILIES and isinstance(pad, int) and not isinstance(pad, bool) \
            and -config.vocab_size <= pad < config.vocab_size:
        return pad
    return None


_NO_CACHE_CHECKPOINTED = ("use_cache=True does not go with activation checkpointing (each layer runs again in the "
                          "backward pass): no cache is returned")


class BSBRBaseModel(BSBRPreTrainedModel):
    def __init__(self, config: BSBRConfig):
        # its values checked as a new config's are: from_pretrained(DIR, chunk_size=0) and attributes set on
        # a config after it was built bypass BSBRConfig.__init__'s checks
        rope = config.rope_parameters  # (transformers fills in rope_theta None for a rope_scaling given later)
        if config.position_type == "rope" and (rope is None or isinstance(rope, dict) and rope.get("rope_theta") is
                                               None):
            raise ValueError(f"config.rope_parameters {'is None' if rope is None else 'has no rope_theta'} on a "
                             "rotary model (set after the config was built: from_pretrained(..., rope_parameters=... "
                             "or rope_scaling=None), or position_type changed to 'rope'): a saved model's rotary "
                             "frequencies (rope_theta) would be lost; leave it as saved, or give the whole dict "
                             "(rope_type, rope_theta)")
        with notes_off():  # (its notes were said when it was read)
            checked = type(config)(**config.to_dict())
        for name in _RESOLVED:  # a None set since (update, from_pretrained's overrides): what a new config makes of it
            if getattr(config, name, None) is None:
                setattr(config, name, getattr(checked, name))
        config.warn_unread_position_option()  # (here, once: from_pretrained sets its overrides after construction)
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=padding_row(config))
        self.embed_positions = (
            nn.Embedding(config.max_position_embeddings, config.hidden_size)
            if config.position_type == "learned" else None
        )
        self.rotary = make_rotary(config) if config.position_type == "rope" else None
        self.layers = nn.ModuleList(BSBRDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = make_norm(config)
        self._built_with = copy.deepcopy(built_with(config))  # (a copy: an edit of rope_parameters in place shows)
        self.post_init()

    def _check_config_unchanged(self, weights_only: bool = False) -> None:
        """A value :func:`built_with` names, changed on ``self.config`` after the model was built, is refused in
        one line: the layers keep the old one while the forward and ``save_pretrained`` would read the new; and
        weights the config as it is now would not build (names and shapes: ``gate_init`` None against a value,
        the bounded mode against blocks, heads), which a saved model could not load. ``weights_only``: only
        those."""
        now = built_with(self.config)
        changed = [k for k in now if now[k] != self._built_with[k]]
        if changed and any(getattr(self.config, name, None) is None for name in _RESOLVED):
            with contextlib.suppress(ValueError, TypeError), notes_off():  # (None: what a new config makes of it,
                resolved = type(self.config)(**self.config.to_dict())  # set on the config, as __init__ does)
                now = built_with(resolved)
                changed = [k for k in now if now[k] != self._built_with[k]]
                if not changed:
                    for name in (n for n in _RESOLVED if getattr(self.config, n, None) is None):
                        setattr(self.config, name, getattr(resolved, name))
        fields = {"num_kv_heads": "num_key_value_heads", "bias": "attention_bias", "out_bias": "attention_out_bias",
                  "own_position_chunks": "far_positions or max_position_embeddings"}  # (config names of built_with's)
        unfit = self._unfit_weight() if weights_only or changed else None
        if unfit and changed:
            names = [fields.get(k, k) for k in changed]  # ("far_positions or ...": not beside far_positions itself)
            edited = ", ".join(n for n in names if not (" or " in n and set(n.split(" or ")) & set(names)))
            raise ValueError(f"this model holds weights its config does not build ({unfit}; changed since it was "
                             f"built: {edited}): set the config back" + (
                                 "" if unfit.startswith("it builds no model") else
                                 ", or build a new, untrained model from the edited config (BSBRForCausalLM(config))"))
        if unfit:  # (a config field the layers do not keep was edited, or modules were replaced: quantized, pruned)
            raise ValueError(f"this model's weights are not the ones its config builds ({unfit}): its config was "
                             "edited or its modules replaced (quantized, pruned) since it was built, and a folder "
                             "saved so would not load: set the config back or build a new model from it "
                             "(BSBRForCausalLM(config)); after pruning layers, set config.num_hidden_layers to match, "
                             "after swapping the embeddings config.vocab_size (or use resize_token_embeddings)")
        if changed and not weights_only:
            name = changed[0]
            raise ValueError(f"config.{fields.get(name, name)} was changed after this model was built ({name} "
                             f"{self._built_with[name]!r} -> {now[name]!r}), which its layers keep: set it back, or "
                             "build a model from the edited config (model.save_pretrained(DIR), then "
                             "from_pretrained(DIR))")

    def _unfit_weight(self) -> Optional[str]:
        """The first parameter this model holds that its config, as it is now, would not build (missing,
        unexpected or of another shape; a DeepSpeed ZeRO-3 parameter by its ``ds_shape``), said as such; None
        when every one fits (or peft adapters are injected: their names are not the model's)."""
        have = {k: tuple(getattr(p, "ds_shape", p.shape)) for k, p in self.named_parameters()}
        if any(".base_layer." in k or "lora_" in k for k in have):
            return None
        with torch.device("meta"), notes_off():  # (the config's notes were logged when this model was built)
            try:
                want = {k: tuple(p.shape) for k, p in BSBRBaseModel(self.config).named_parameters()}
            except (ValueError, TypeError) as e:  # (an edit the config's own checks refuse)
                return f"it builds no model: {' '.join(str(e).split())[:200]}"
        for k in sorted(set(have) | set(want)):
            if have.get(k) != want.get(k):
                return (f"{k} {'is not built' if k not in want else 'is missing' if k not in have else 'has shape'}"
                        f"{f' {have[k]}, the config builds {want[k]}' if k in have and k in want else ''}")
        return None

    def forward(self, input_ids: Optional[torch.LongTensor] = None, attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.LongTensor] = None, cache: Optional[BSBRCache] = None,
                inputs_embeds: Optional[torch.Tensor] = None, use_cache: Optional[bool] = None,
                output_hidden_states: Optional[bool] = None, return_dict: Optional[bool] = None,
                output_attentions: Optional[bool] = None, **kwargs):
        refuse_output_attentions(output_attentions, self.config)
        refuse_token_type_ids(kwargs, self.config)
        self._check_config_unchanged()
        cache = _cache_argument(cache, kwargs)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if input_ids is not None:
            check_input_ids(input_ids)
            try:  # an out-of-range id fails here (checking the range first would sync with the device)
                inputs_embeds = self.embed_tokens(input_ids)
            except IndexError:
                raise ValueError(f"input_ids must lie in [0, {self.config.vocab_size})") from None
        elif not isinstance(inputs_embeds, torch.Tensor) or not inputs_embeds.is_floating_point() \
                or inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.config.hidden_size:
            raise ValueError(f"inputs_embeds must be a float tensor of shape (batch, seq_len, {self.config.hidden_size}), "
                             f"got {getattr(inputs_embeds, 'dtype', '')} "
                             f"{getattr(inputs_embeds, 'shape', type(inputs_embeds).__name__)}")
        elif inputs_embeds.dtype != self.embed_tokens.weight.dtype and not autocast_on(inputs_embeds.device.type):
            weights = self.embed_tokens.weight.dtype
            if torch.finfo(inputs_embeds.dtype).bits >= torch.finfo(weights).bits:  # (a narrowing cast is the user's)
                raise ValueError(f"inputs_embeds are {inputs_embeds.dtype}, the model's weights {weights}: cast them "
                                 f"to {weights}")
            inputs_embeds = inputs_embeds.to(weights)  # half-precision embeddings of a float32 model, as the sources
        b, n = inputs_embeds.shape[:2]
        if exporting():  # (torch.export: tensors in, tensors out, no branch on values)
            if position_ids is not None:
                raise NotImplementedError("torch.export cannot record position_ids of a BSBR model (read by value, "
                                          "as packed sequences): export without them")
            if use_cache or cache is not None:
                raise NotImplementedError("torch.export cannot record a BSBR model's cache (built and read by "
                                          "value): export with use_cache=False and no cache")
            use_cache = False
        if cache is not None:  # (before a 4-D mask is measured against it: a StaticCache's is not)
            self._check_cache(cache, b, inputs_embeds)
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() != 2:  # (refused before it is sliced)
            mask_to_valid(attention_mask, b, n + (cache.n_positions if cache is not None else 0))
        if cache is None and attention_mask is None and position_ids is not None:
            position_ids = check_position_ids(position_ids, b, n).expand(b, n)
            segment = packed_segments(position_ids)
            if segment is not None:
                return self._packed_forward(inputs_embeds, position_ids, segment, use_cache, output_hidden_states,
                                            return_dict)
        read = n + (cache.n_positions if cache is not None else 0)  # the positions a mask covers
        mask = attention_mask if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2 else None
        if mask is not None and mask.shape[-1] > read and (cache is not None or (
                self.config.use_cache if use_cache is None else use_cache)):  # (a manual loop's, of its final length)
            attention_mask = mask[:, :read]  # its first positions, as transformers reads it where a cache is kept
        if cache is not None and attention_mask is not None and attention_mask.shape[-1] > n:
            # a mask over every position the cache read (not one begun with a later call's new tokens)
            cached = attention_mask.shape[-1] - n  # (slices by length: [:, -0:] is the whole mask)
            if attention_mask.dim() == 2 and attention_mask.shape == (b, cache.n_positions + n) and cache.states:
                _refuse_forgotten_tokens(attention_mask[:, :cached], cache)
            attention_mask = attention_mask[:, cached:]  # generate passes the whole mask; keep the new tokens'
        valid = mask_to_valid(attention_mask, b, n)
        if valid is not None and bool(valid.all()):
            valid = None
        # each token's index among its sequence's real tokens: padding never shifts a sequence
        index = token_positions(inputs_embeds[:, :, 0], valid)
        if cache is not None:
            index = index + cache.n_seen[:, None]
        if position_ids is None:
            position_ids = index
        else:
            position_ids = check_position_ids(position_ids, b, n)
        x = inputs_embeds
        if self.embed_positions is not None:
            try:  # a negative position fails here (checking first would sync with the device)
                x = x + self.embed_positions(_map_learned_positions(position_ids, self.config))
            except IndexError:
                raise ValueError("position_ids must be >= 0 (the model's positions are a learned table)") from None
        cos_sin = self.rotary(position_ids, x.dtype) if self.rotary is not None else None
        far = None
        if self.rotary is not None and self.config.far_positions != "absolute":
            # far keys at their offset in their chunk; far queries at their offset + a shift of whole chunks:
            # 'window': the window's length, so a far key reads as if it lay in the chunk just before the
            # window; 'hybrid': R - 1 chunks, so a key past the R chunks read at own positions reads as if it
            # lay in the oldest of them (the order of distances kept). Chunks count from the sequence's first
            # real token, so the offset comes from the token's index, not from position_ids
            offset = index % self.config.chunk_size
            far = (self.rotary(offset + self.config.far_shift_chunks() * self.config.chunk_size, x.dtype),
                   self.rotary(offset, x.dtype))

        if self.training and torch.is_grad_enabled() and self.layers and self.layers[0].gradient_checkpointing:
            if cache is not None:  # (the replay would start from the state the first run advanced in place)
                raise ValueError("cache: a training forward under activation checkpointing runs each layer again in "
                                 "the backward pass, which cannot continue a cache: continue it in eval mode or under "
                                 "torch.no_grad(), or call activation_checkpointing_disable() first")
            if use_cache:
                warn_caller(_NO_CACHE_CHECKPOINTED)
            use_cache = False  # as transformers' models do: a training forward builds no cache (without
            # gradients, e.g. generate in train mode, nothing is replayed and the cache is kept)
        if use_cache is None and transformed(x):  # (vmap: the cache's buffers are written in place; not asked for)
            use_cache = False
        use_cache = self.config.use_cache if use_cache is None else use_cache
        streaming = cache is not None
        states = []
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        hidden = [x] if output_hidden_states else None
        if streaming:
            cache.begin()
        for i, layer in enumerate(self.layers):
            x, st = layer(x, valid, cos_sin, far, cache.states[i] if streaming else None, streaming=streaming,
                          output_state=use_cache)
            states.append(st)
            if output_hidden_states:
                hidden.append(x)
        x = self.norm(x)
        if output_hidden_states:
            hidden[-1] = x
        new_cache = None
        if streaming:  # the cache passed in is advanced and returned, as transformers' caches are
            cache.states, new_cache = states, cache
            cache.consumed(input_ids, n, valid)
        elif use_cache:
            new_cache = BSBRCache(states, built_with=self._built_with)
            new_cache.consumed(input_ids, n, valid)
        out = BaseModelOutputWithPast(last_hidden_state=x, cache=new_cache,
                                      hidden_states=tuple(hidden) if hidden else None)
        return self._returned(out, return_dict)

    def _packed_forward(self, inputs_embeds, position_ids, segment, use_cache, output_hidden_states, return_dict):
        """Rows that pack several sequences (``segment``, :func:`packed_segments`) run as a right-padded batch of
        those sequences, each alone, and are packed back: as transformers' models read such rows without a cache
        (a BSBR row is one sequence: its chunks count from the row's first token). No cache is built."""
        checkpointed = self.training and torch.is_grad_enabled() and self.layers and \
            self.layers[0].gradient_checkpointing
        if use_cache and checkpointed:  # (no cache is built anyway)
            warn_caller(_NO_CACHE_CHECKPOINTED)
        elif use_cache:
            raise ValueError("use_cache=True: these rows pack several sequences (position_ids restart within a row, "
                             "with no attention_mask), and a cache continues one sequence per row: pass "
                             "use_cache=False, or one sequence per row")
        b, n = position_ids.shape
        first = torch.ones_like(segment, dtype=torch.bool)
        first[:, 1:] = segment[:, 1:] != segment[:, :-1]
        seq = (first.flatten().long().cumsum(0) - 1).view(b, n)  # each token's sequence, over all rows
        start = torch.arange(n, device=segment.device).expand(b, n).masked_fill(~first, 0).cummax(1).values
        offset = torch.arange(n, device=segment.device) - start  # each token's index in its sequence
        rows, cols = seq.flatten(), offset.flatten()
        shape = (int(seq.max()) + 1, int(offset.max()) + 1)
        embeds = inputs_embeds.new_zeros(shape + inputs_embeds.shape[2:])
        embeds[rows, cols] = inputs_embeds.flatten(0, 1)
        positions = position_ids.new_zeros(shape)
        positions[rows, cols] = position_ids.flatten()
        mask = torch.zeros(shape, dtype=torch.long, device=segment.device)
        mask[rows, cols] = 1
        out = self(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False,
                   output_hidden_states=output_hidden_states, return_dict=True)
        hidden = out.hidden_states and tuple(h[rows, cols].view(b, n, -1) for h in out.hidden_states)
        packed = BaseModelOutputWithPast(last_hidden_state=out.last_hidden_state[rows, cols].view(b, n, -1),
                                         hidden_states=hidden)
        return self._returned(packed, return_dict)

    def _check_cache(self, cache, batch: int, inputs_embeds: torch.Tensor) -> None:
        """A cache continues only a model built with the same options, for the batch and dtype it was built with."""
        if not isinstance(cache, BSBRCache):
            from transformers.cache_utils import Cache

            hint = "" if not isinstance(cache, Cache) else \
                ": to start one, leave cache= out and pass use_cache=True (the output's .cache continues)" \
                if _empty(cache) else \
                (": a cache of keys and values made elsewhere (e.g. peft's prefix tuning) cannot be read by BSBR "
                 "layers (LoRA can, and prompt tuning generating with use_cache=False: README)")
            raise TypeError(f"cache must be a BSBRCache (as returned with use_cache=True), got "
                            f"{type(cache).__name__}{hint}")
        if cache.built_with is not None and cache.built_with is not self._built_with and (
                cache.built_with != self._built_with):  # (options the states do not show, e.g. far positions)
            name = next((k for k in self._built_with if cache.built_with.get(k) != self._built_with[k]), "options")
            raise ValueError(f"cache was made by a model with {name} {cache.built_with.get(name)!r}, this model has "
                             f"{self._built_with.get(name)!r}: pass the cache this model returned, or start a new one "
                             "(use_cache=True without cache=)")
        n_layers = len(self.layers)
        dtype = op_dtype(inputs_embeds.dtype, inputs_embeds.device.type, self.layers[0].attn.options)  # the states'
        got = (len(cache.states), int(cache.n_seen.shape[0]) if cache.states else None,
               cache.states[0].k_buf.dtype if cache.states else None)
        if got != (n_layers, batch, dtype):
            amp = ""  # why the dtypes differ
            if got[2] is not None and got[2] != dtype and autocast_on(inputs_embeds.device.type):
                amp = (" (under torch.autocast the op and its cache run in float32: build and continue a cache on the "
                       "same side of autocast)")
            elif got[2] is not None and got[2] != dtype:
                built_under_autocast = got[2] == torch.float32 and dtype in (torch.float16, torch.bfloat16)
                amp = (" (a cache continues in the dtype it was built in: cast the model before the prefill" +
                       ("; one built under torch.autocast, where the op and its cache run in float32, continues under "
                        "it)" if built_under_autocast else ")"))
            raise ValueError(f"cache holds (layers, batch, dtype) = {got}, this call has {(n_layers, batch, dtype)}"
                             f"{amp}: "
                             "pass the cache this model returned for this batch, or start a new one (use_cache=True "
                             "without cache=); generate with num_beams or num_return_sequences > 1 cannot continue a "
                             "given cache (pass the whole text as input_ids; in a loop of your own, "
                             "BSBRCache.reorder_cache follows the beams)")


class BSBRForCausalLM(BSBRPreTrainedModel, GenerationMixin):
    """A BSBR decoder with a language-modelling head: a HuggingFace causal LM (``generate``, the Auto
    classes, ``save_pretrained``) whose generation cache is a :class:`BSBRCache`."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: BSBRConfig):
        super().__init__(config)
        self.model = BSBRBaseModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids: Optional[torch.LongTensor] = None, attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.LongTensor] = None, cache: Optional[BSBRCache] = None,
                inputs_embeds: Optional[torch.Tensor] = None, labels: Optional[torch.LongTensor] = None,
                use_cache: Optional[bool] = None, output_hidden_states: Optional[bool] = None,
                return_dict: Optional[bool] = None, logits_to_keep=0, output_attentions: Optional[bool] = None,
                **kwargs):
        """As a transformers causal LM's forward: logits (and the loss with ``labels``); ``cache`` (or
        the deprecated ``past_key_values``) a :class:`BSBRCache` to continue, returned as ``.cache`` with ``use_cache``.
        ``output_attentions`` is refused (no attention matrix is built), as is ``token_type_ids`` for a
        model converted from GPT-2 (which adds their embeddings to its inputs; the other sources ignore them).
        ``attention_mask`` is a (batch, seq_len) padding mask; padding anywhere in a row is removed.
        ``position_ids`` (default: each token's index among its sequence's real tokens, as the sources'
        ``generate`` places them; their forward keeps ``0 .. n-1`` under padding) place the rotary
        or learned positions; the chunks, and so which keys are exact, count from a sequence's first real
        token. Unlike rotary attention alone, a model that reads its chunk states (a distilled one) or a
        recall cache is not invariant to adding a constant to every position: their features are taken of
        rotated keys and queries."""
        refuse_output_attentions(output_attentions, self.config)
        refuse_token_type_ids(kwargs, self.config)
        cache = _cache_argument(cache, kwargs)
        text = input_ids if input_ids is not None else inputs_embeds
        labels_checked = labels is not None and isinstance(text, torch.Tensor) and text.dim() >= 2
        if labels_checked:  # before the model runs: a refusal after it would leave a cache it continued advanced
            n = text.shape[1]  # (the logits kept: h[:, -k:] for an int k, as below; an index on its device)
            kept = (len(range(n)[-logits_to_keep:]) if logits_to_keep else n) if isinstance(logits_to_keep, int) \
                else torch.arange(n, device=getattr(logits_to_keep, "device", None))[logits_to_keep].shape[0]
            check_labels(labels, text.shape[0], kept, self.config.vocab_size, kwargs.get("ignore_index", -100))
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                         inputs_embeds=inputs_embeds, use_cache=use_cache, output_hidden_states=output_hidden_states,
                         return_dict=True, output_attentions=False)
        h = out.last_hidden_state
        if not isinstance(logits_to_keep, int):  # the positions to keep, as transformers' models take them
            h = h[:, logits_to_keep]
        elif logits_to_keep:
            h = h[:, -logits_to_keep:]
        logits = self.lm_head(h)
        loss = None
        if labels is not None:
            if not labels_checked:
                check_labels(labels, *logits.shape[:2], self.config.vocab_size, kwargs.get("ignore_index", -100))
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        out = CausalLMOutputWithPast(loss=loss, logits=logits, cache=out.cache, hidden_states=out.hidden_states)
        return self._returned(out, return_dict)

    def _positions_unbounded(self) -> bool:
        """Whether positions go on past ``max_position_embeddings`` (rope, or learned positions that wrap
        or clamp): only learned ``absolute`` positions end there."""
        return self.config.position_type == "rope" or self.config.position_scheme != "absolute"

    def generate(self, *args, **kwargs):
        """transformers' ``generate``; ``position_ids`` are refused: a BSBR cache places each new token by its
        sequence's own counter (a forward with ``position_ids=`` and ``cache=`` takes any positions). The cache
        passed as the deprecated ``past_key_values`` is warned of at the caller's line."""
        drafting = getattr(kwargs.get("generation_config"), "is_assistant", False)  # refused in words below
        if kwargs.get("position_ids") is not None and not drafting:
            raise ValueError("position_ids: generate places each token by the cache's per-sequence counter and "
                             "cannot follow given positions; call the model with position_ids= and cache= step by "
                             "step instead")
        if "past_key_values" in kwargs:  # (renamed here: transformers' warning named bsbr's line; None is unset)
            kwargs["cache"] = _cache_argument(kwargs.get("cache"), kwargs)
        cache = kwargs.get("cache")
        if getattr(cache, "beams", False):
            raise ValueError("cache: a beam search left this cache following its last beams, not the sequences it "
                             "returned (sorted by score; finished ones left the beams): generate without cache=, or "
                             "continue the cache of a greedy or sampled generation")
        if isinstance(cache, BSBRCache):
            _check_mask_length(kwargs.get("attention_mask"), _generate_input(args, kwargs), cache.n_positions)
        return super().generate(*args, **kwargs)

    def _beam_search(self, *args, **model_kwargs):
        """transformers' beam search (and beam sampling); the cache it leaves, given or handed back, is marked
        (``BSBRCache.beams``): its rows follow the last beams, not the sequences returned."""
        out = super()._beam_search(*args, **model_kwargs)
        for cache in (model_kwargs.get("cache"), model_kwargs.get("past_key_values"), getattr(out, "cache", None)):
            if isinstance(cache, BSBRCache):
                cache.beams = True
        return out

    def init_continuous_batching(self, *args, **kwargs):
        """Refused in one line: continuous batching (``generate_batch``, ``generate(cache_implementation="paged")``,
        which both come here) pages a KV cache that a BSBR model cannot use. Loaded with "sdpa", which transformers
        keeps for it, every request failed with the reason in a log line only, and ``generate`` returned the prompt."""
        raise ValueError(_NO_CONTINUOUS_BATCHING)

    def _validate_generation_mode(self, generation_mode, generation_config, generation_mode_kwargs):
        """transformers' check of the mode; assisted generation (``assistant_model``, ``prompt_lookup_num_tokens``,
        ``assistant_early_exit``), and this model as another model's draft, is refused in words: it rolls the cache
        back to drop rejected tokens, which a BSBR cache, like every stateful model's, cannot do (transformers said
        "Assisted decoding requires a cache"; as a draft, the first rejected token raised an AttributeError)."""
        if getattr(generation_config, "is_assistant", False):  # this model drafts for another's assisted generation
            raise ValueError("assistant_model: a BSBR model cannot be the draft model of assisted generation: the "
                             "main model rolls the draft's cache back to drop rejected tokens, which a BSBR cache "
                             "cannot do; generate without it")
        if "ASSISTED" in getattr(generation_mode, "name", str(generation_mode)).upper():
            asked = next((name for name in ("assistant_model", "prompt_lookup_num_tokens", "assistant_early_exit")
                          if generation_mode_kwargs.get(name) is not None
                          or getattr(generation_config, name, None) is not None), "assisted generation")
            raise ValueError(f"{asked}: assisted generation is not supported by BSBR models: it drops rejected "
                             "tokens by rolling the cache back, which a BSBR cache (chunk states, a recall cache) "
                             "cannot do; generate without it")
        return super()._validate_generation_mode(generation_mode, generation_config, generation_mode_kwargs)

    def _prepare_generated_length(self, generation_config, has_default_max_length, *args, **kwargs):
        """transformers caps a generation of default length (20 new tokens) at ``max_position_embeddings``
        and refuses a longer prompt; only a model whose positions end there keeps that cap."""
        if self._positions_unbounded() and has_default_max_length and generation_config.max_new_tokens is None:
            generation_config.max_new_tokens = generation_config.max_length
        return super()._prepare_generated_length(generation_config, has_default_max_length, *args, **kwargs)

    def _get_stopping_criteria(self, *args, **kwargs):
        """transformers' length criterion warns once a generation passes ``max_position_embeddings``
        ("you may observe exceptions, performance degradation"): not for positions that go on past it."""
        from transformers.generation.stopping_criteria import MaxLengthCriteria

        criteria = super()._get_stopping_criteria(*args, **kwargs)
        for c in criteria if self._positions_unbounded() else ():
            if isinstance(c, MaxLengthCriteria):
                c.max_position_embeddings = None
        return criteria

    def _prefill(self, input_ids, generation_config, model_kwargs, *args, **kwargs):
        """transformers' ``prefill_chunk_size`` splits a prompt into pieces read through the cache, to bound the
        n x n scores, which BSBR never forms (its chunked form reads a prompt chunk by chunk): the prompt is read
        in one pass, with the same result, where the pieces would have been stepped through token by token."""
        if generation_config.prefill_chunk_size is not None:
            generation_config = copy.copy(generation_config)
            generation_config.prefill_chunk_size = None
        return super()._prefill(input_ids, generation_config, model_kwargs, *args, **kwargs)

    def prepare_inputs_for_generation(self, input_ids, next_sequence_length=None, cache=None, attention_mask=None,
                                      inputs_embeds=None, **kwargs):
        kwargs.pop("position_ids", None)  # positions come from the cache's per-sequence counters
        if cache is not None and kwargs.get("use_cache") is False:  # (a forward of one's own may pass both)
            raise ValueError("generate(cache=..., use_cache=False): without a cache generate passes the whole text at "
                             "every step, and a given cache is always read and advanced: leave out one of them")
        if next_sequence_length is not None and (isinstance(cache, BSBRCache) and input_ids is not None and
                                                 cache.new_tokens_only(input_ids, attention_mask,
                                                                       bool(kwargs.get("is_first_iteration")))
                                                 or next_sequence_length <= 0):
            # transformers' prefill drops the cache's length from the input: right for the whole text, but an
            # input no longer than the cache, or one that does not begin with the ids the cache read, holds only
            # the new tokens (passed without the whole mask), so none is dropped
            next_sequence_length = None
        return super().prepare_inputs_for_generation(input_ids, next_sequence_length=next_sequence_length, cache=cache,
                                                     attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                                                     **kwargs)


_TASK_HEADS = ("score.", "qa_outputs.")  # the task heads' own weights, beside the decoder's
_HEADS = ("lm_head.", *_TASK_HEADS)


class BSBRForSequenceClassification(GenericForSequenceClassification, BSBRPreTrainedModel):
    """A BSBR decoder with a classification head on its last real token (the last one that is not
    ``config.pad_token_id``, as transformers' Llama pools). Loaded from a causal LM's folder, the head is new."""

    _new_head = "score."


class BSBRForTokenClassification(GenericForTokenClassification, BSBRPreTrainedModel):
    """A BSBR decoder with a classification head on every token. Loaded from a causal LM's folder, the head is new."""

    _new_head = "score."


class BSBRForQuestionAnswering(GenericForQuestionAnswering, BSBRPreTrainedModel):
    """A BSBR decoder with span start/end logits on every token. Loaded from a causal LM's folder, the head is new."""

    _new_head = "qa_outputs."
