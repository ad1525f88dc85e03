"""BSBRConfig: one configuration for every family a BSBR model can host (GPT-2, Llama, Mistral,
Qwen2): positions, norms, MLP, biases and embeddings are fields, not separate model classes."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

from transformers import PretrainedConfig

from ...layers.feature_maps import BSBR_FEATURE_MAPS, default_feature_map
from ...ops.bsbr import BSBROptions
from ...notes import ThreadSwitch, first_time, occasion
from ...numbers import MAX_TOKENS
from ...ops.checks import check_flag, check_int, check_number, shown

logger = logging.getLogger(__name__)
_NOTES_OFF = ThreadSwitch()  # on: this thread builds a config only to compare weights (a model built on the meta
# device to compare its weights' names and shapes): its configs log no notes
logger.addFilter(lambda record: not _NOTES_OFF)
notes_off = _NOTES_OFF.on


# the largest intermediate_size, head count or head_dim a config may give (10^19 failed in torch's allocator with a
# C++ frame dump; a head_dim of 2^31 made its rotary frequencies on the CPU: 13 GB), far above any model's; the
# other sizes are compared with the weights before a model is built (refuse_sizes_past_the_weights), and a rotary
# model's max_position_embeddings allocates nothing (10^8 is a source's "no limit")
MAX_SIZE = 1 << 24
# rope_parameters' numbers past rope_theta (linear, dynamic, yarn, llama3, longrope scaling): > 0, yarn's mscales >= 0
_ROPE_NUMBERS = {"factor", "attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "low_freq_factor",
                 "high_freq_factor", "partial_rotary_factor", "original_max_position_embeddings"}


def _warn_once(message: str, *args) -> None:
    """Log a warning once per load or command (:mod:`bsbr.notes`: a load builds its config more than once)."""
    text = message % args
    if not _NOTES_OFF and first_time(text):  # (a note kept back is not said yet)
        logger.warning(text)


def _warn_if_newer(saved: Optional[str]) -> None:
    """Warn of a config saved by a newer bsbr than this one (its new options are not read)."""
    from packaging.version import InvalidVersion, Version

    from ... import __version__

    try:
        newer = saved is not None and Version(str(saved)) > Version(__version__)
    except InvalidVersion:
        newer = False
    if newer:
        _warn_once("this config was saved by bsbr %s, and this is bsbr %s: options added since are not read "
                   "(upgrade bsbr: pip install -U bsbr)", saved, __version__)


# A config.json that save_pretrained wrote (it records transformers_version) without "bsbr_version" was saved
# before bsbr recorded it (2026-12-05). Its keys tell its era: a window option it lacks was not yet there (bsbr
# 0.2.0 had none: chunk-local attention + chunk states; retrieval_blocks came on 2026-11-29) and takes the value
# that computes what it computed then; the options earlier bsbrs had and this one does not compute are refused
# by name.
SAVED_WITHOUT_WINDOW = dict(local_chunks=1, sink_tokens=0, retrieval_blocks=0)
SAVED_FAR_POSITIONS = "absolute"  # rotary keys read outside the window before far_positions (2026-11-29)


def _saved_without(values: dict) -> dict:
    """What an earlier bsbr computed for each window option a config.json it saved lacks."""
    lacking = {k: v for k, v in SAVED_WITHOUT_WINDOW.items() if k not in values}
    if "far_positions" not in values and values.get("position_type") == "rope":  # (unread with learned positions)
        lacking["far_positions"] = SAVED_FAR_POSITIONS
    return lacking
# options this bsbr no longer has: the values that compute what it computes (None: any value, an initialisation
# the saved weights replace, or a choice warned of below); feature_map 'elu' is refused alike
_RETIRED = {"retrieval_top_k": (None,), "meta": ("shared",), "meta_dim": (None,), "meta_init": None,
            "block_router": None, "retrieval_mass": (None,)}


def saved_before_versions(config_dict: dict) -> bool:
    """Whether ``config_dict`` is a config.json an earlier bsbr saved without recording its version."""
    return "bsbr_version" not in config_dict and "transformers_version" in config_dict


def _retired(values: dict, given: str, fix: str = "") -> dict:
    """The retired options ``values`` holds, or a ValueError where one is set to what this bsbr does not
    compute (``given``, formatted with them, and ``fix`` frame the message)."""
    retired = {k: values[k] for k in _RETIRED if k in values}
    wrong = {k: v for k, v in retired.items() if _RETIRED[k] is not None and v not in _RETIRED[k]}
    if values.get("feature_map") == "elu":
        wrong["feature_map"] = "elu"
    if wrong:
        said = ", ".join(f"{k}={v!r}" for k, v in wrong.items())
        raise ValueError(f"{given.format(said)}: an option of an earlier bsbr that this bsbr does not compute "
                         f"(retired: docs/findings.md, 'Ruled out'){fix}")
    return retired


def _saved_config(config_dict: dict) -> dict:
    """``config_dict`` (a config.json's) as this bsbr reads it: the retired options taken out (a ValueError
    where one was set to what this bsbr does not compute); for a config saved before bsbr recorded its
    version, each window option it lacks as it computed then, and a warning where its retrieval blocks were
    scored otherwise then (the op's changes up to 2026-12-01, CHANGELOG)."""
    retired = _retired(config_dict, "config.json sets {}", ": convert the source again with bsbr convert")
    router = config_dict.get("block_router")
    config_dict = {k: v for k, v in config_dict.items() if k not in retired}
    if not saved_before_versions(config_dict) or config_dict.get("model_type", "bsbr") != "bsbr":
        return config_dict
    lacking = _saved_without(config_dict)
    if lacking:
        logger.info("config.json: saved by an earlier bsbr without %s: read as it computed then (%s)",
                    ", ".join(lacking), ", ".join(f"{k}={v}" for k, v in lacking.items()))
        config_dict = {**config_dict, **lacking}
    blocks = {**config_dict, **missing_defaults(config_dict)}["retrieval_blocks"]
    if blocks and "auto_map" not in config_dict:  # (auto_map: saved since 2026-12-03)
        if "recall_tokens" not in config_dict or router == "bounds":  # (blocks scored by bounds of their keys)
            _warn_once("config.json: saved by a bsbr of 2026-11-29 or 11-30, which scored retrieval blocks by "
                       "bounds of their keys (retired): this model's outputs differ from the ones it gave then; "
                       "convert the source again with bsbr convert (and distill again if it was distilled)")
        else:
            _warn_once("config.json records no bsbr_version (saved before 2026-12-05): a model with retrieval "
                       "blocks saved before 2026-11-30 scored them by bounds of their keys (its outputs now differ "
                       "by whole logits), one saved before 2026-12-02 picks near-tied blocks otherwise (0.01-0.6); "
                       "convert the source again to be sure")
    return config_dict


POSITION_TYPES = ("learned", "rope")
# how learned (GPT-2-style) positions continue past max_position_embeddings:
#   absolute: refuse longer inputs; clamp: every later token gets the last position;
#   wrap: every position inside the table is its own; past it, position p takes p mod the table rounded down
#   to whole chunks (chunk-aligned when chunk_size divides the table, as 256 divides GPT-2's 1,024)
POSITION_SCHEMES = ("absolute", "clamp", "wrap")
NORM_TYPES = ("layernorm", "rmsnorm")
MLP_TYPES = ("standard", "gated")
# the rotary positions of far keys (sinks outside the window, retrieved blocks):
#   absolute: every key at its own position (a retrieved block covering all chunks is full attention);
#   window: read as if they lay in the chunk just before the window, at their offset in their own chunk,
#           so every query-key distance stays below (local_chunks + 1) * chunk_size at any length
#   hybrid: absolute while the key's chunk lies fewer than R = max_position_embeddings / 2 // chunk_size
#           chunks back (every distance inside half the source's range); an older key reads as if it lay
#           in the oldest of those chunks, R - 1 back, at its offset in its own chunk
FAR_POSITIONS = ("absolute", "window", "hybrid")
# per position_type, the position option it never reads: (name, default, what the option does)
UNREAD_POSITION_OPTION = {"learned": ("far_positions", "window", "it places rotary positions"),
                          "rope": ("position_scheme", "wrap", "it applies to learned positions (GPT-2)")}


def _choice(name, value, allowed):
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def default_retrieval_blocks(recall_tokens) -> int:
    """``retrieval_blocks`` when none is given: 8, or 0 with ``recall_tokens`` (the bounded mode replaces the
    exact blocks); ``bsbr.convert.defaults.resolve_options`` applies the same rule (a test holds them equal)."""
    return 0 if recall_tokens else 8


def check_bsbr_options(*, chunk_size, compression_factor, retrieval, feature_map, gate_init, local_chunks,
                       sink_tokens, retrieval_blocks, recall_tokens, far_positions, position_scheme) -> None:
    """The checks :class:`BSBRConfig` makes of its BSBR attention options (no architecture needed): the
    converter runs them before it loads a source."""
    if compression_factor is not None:
        check_int("compression_factor", compression_factor)
    BSBROptions(chunk_size=chunk_size, local_chunks=local_chunks, sink_tokens=sink_tokens,
                retrieval_blocks=retrieval_blocks, recall_tokens=recall_tokens, retrieval=retrieval)  # validates them
    _choice("feature_map", feature_map, BSBR_FEATURE_MAPS)
    if retrieval == "normalized" and feature_map == "identity":  # BSBRAttention's rule, checked up front
        raise ValueError("retrieval normalized needs the non-negative feature_map hedgehog: give feature_map hedgehog, or retrieval additive")
    check_number("gate_init", gate_init, none=True)
    _choice("far_positions", far_positions, FAR_POSITIONS)
    if far_positions == "hybrid" and recall_tokens:
        raise ValueError("far_positions hybrid needs recall_tokens 0: the bounded mode reads every far key at "
                         "window positions (use far_positions window, or absolute within the source's positions)")
    _choice("position_scheme", position_scheme, POSITION_SCHEMES)


# the module a saved model ships beside its weights (written by BSBRPreTrainedModel.save_pretrained): it imports
# the installed bsbr, so that a process that never imports bsbr (the lm_eval command line, a pipeline script)
# loads the model with transformers' Auto classes and trust_remote_code=True
AUTO_MODULE = "bsbr_auto"
# BSBRModel's argument names, which transformers would keep as unread attributes (a model of the defaults' size)
_NATIVE_NAMES = {"hidden_dim": "hidden_size", "num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
                 "ff_dim": "intermediate_size", "num_kv_heads": "num_key_value_heads"}


def _refuse_methods(cls, names) -> None:
    """Refuse (ValueError) option ``names`` that name a method of ``cls``: transformers keeps an option as an
    attribute, which would hide the method the model calls."""
    methods = [name for name in names if callable(getattr(cls, name, None))]
    if methods:
        raise ValueError(f"{', '.join(methods)}: {'a method' if len(methods) == 1 else 'methods'} of BSBRConfig (the "
                         "model reads what it returns from the config's fields), not an option: drop it")


def _refuse_native_names(config, kwargs: dict) -> None:
    """Refuse (ValueError) the name of a method of ``config`` in ``kwargs``; take out what transformers would keep
    as attributes nothing reads: :class:`BSBRModel`'s
    argument names (a ValueError where one disagrees with the field ``config`` has, a config built from them
    alone; dropped, as a config saved with them holds them) and dropout options (:func:`_drop_dropout`)."""
    _refuse_methods(type(config), kwargs)
    given = {name: kwargs.pop(name) for name in _NATIVE_NAMES if name in kwargs}
    wrong = [name for name, value in given.items() if value != getattr(config, _NATIVE_NAMES[name])]
    if wrong:
        raise ValueError(", ".join(f"{n} {given[n]!r}" for n in wrong) + ": BSBRModel's "
                         + ("name, not a BSBRConfig field" if len(wrong) == 1 else "names, not BSBRConfig fields")
                         + f": give {', '.join(_NATIVE_NAMES[n] for n in wrong)} (the config has "
                         + ", ".join(f"{_NATIVE_NAMES[n]} {getattr(config, _NATIVE_NAMES[n])!r}" for n in wrong) + ")")
    _drop_dropout(kwargs)


HEAD_DROPOUT = ("classifier_dropout", "hidden_dropout")  # read by the token-classification head alone
# (transformers' generic head: the first given, else 0.1)


def note_unread_head_dropout(config, loaded_as: str) -> None:
    """Say which of :data:`HEAD_DROPOUT` a model loaded as ``loaded_as`` (a class name) does not read: all of
    them but on the token-classification head, which reads the first given."""
    given = [n for n in HEAD_DROPOUT if getattr(config, n, None) is not None]
    unread = given[1:] if loaded_as == "BSBRForTokenClassification" else given
    for name in unread:
        if getattr(config, name):
            _warn_once("%s=%s is not read: bsbr's decoder has no dropout, and a token-classification head reads "
                       "classifier_dropout (else hidden_dropout)", name, getattr(config, name))


def _drop_dropout(kwargs: dict) -> None:
    """Take the dropout options (Llama's ``attention_dropout``, GPT-2's ``resid_pdrop``: scripts pass them for
    any model) out of ``kwargs``, warned of once where non-zero: the decoder has no dropout. Those of
    :data:`HEAD_DROPOUT` are kept, and checked: the token-classification head's."""
    for name in HEAD_DROPOUT:
        check_number(name, kwargs.get(name), 0, none=True)
        if kwargs.get(name) is not None and kwargs[name] >= 1:
            raise ValueError(f"{name} must be in [0, 1), got {kwargs[name]}")
    dropout = {k: kwargs.pop(k) for k in [k for k in kwargs if ("dropout" in k or k.endswith("pdrop")) and
                                          k not in HEAD_DROPOUT]}
    said = ", ".join(f"{k}={v}" for k, v in dropout.items() if v)
    if said:
        _warn_once("BSBRConfig: %s: bsbr's decoder has no dropout, so this is not read (a token-classification "
                   "head's is classifier_dropout)", said)


_AUTO_CLASSES = {"AutoConfig": "BSBRConfig", "AutoModel": "BSBRBaseModel", "AutoModelForCausalLM": "BSBRForCausalLM",
                 "AutoModelForSequenceClassification": "BSBRForSequenceClassification",
                 "AutoModelForTokenClassification": "BSBRForTokenClassification",
                 "AutoModelForQuestionAnswering": "BSBRForQuestionAnswering"}
AUTO_MAP = {auto: f"{AUTO_MODULE}.{name}" for auto, name in _AUTO_CLASSES.items()}
_AUTO_DOC = ('"""BSBR model classes from the installed bsbr package, for transformers\' Auto classes: '
             'config.json\'s auto_map names this file."""\n')
AUTO_CODE = (_AUTO_DOC + "try:\n    from bsbr.models.bsbr import (  # noqa: F401\n        "
             + ",\n        ".join(sorted(_AUTO_CLASSES.values())) + ")\n"
             "except ImportError as e:  # (PyPI's bsbr 0.1.1 is an earlier library, without bsbr.models)\n"
             "    raise ImportError(\"this model needs the bsbr package that wrote it (config.json's \"\n"
             "                      f\"bsbr_version), which this Python cannot import ({e})\") from e\n")
EARLIER_AUTO_CODES = tuple(  # (until 2026-12-07: still bsbr's own file for --overwrite)
    _AUTO_DOC + f"from bsbr.models.bsbr import {', '.join(names)}  # noqa: F401\n"
    for names in (("BSBRBaseModel", "BSBRConfig", "BSBRForCausalLM"), sorted(_AUTO_CLASSES.values())))


def write_auto_code(directory) -> None:
    """``bsbr_auto.py`` in ``directory``, beside the config.json whose ``auto_map`` names it."""
    (Path(directory) / f"{AUTO_MODULE}.py").write_text(AUTO_CODE, encoding="utf-8")


class BSBRConfig(PretrainedConfig):
    """A decoder LM with BSBR attention: the architecture of the converted source (the first group of
    arguments) and the BSBR attention options (from ``chunk_size`` on; their meaning:
    :class:`bsbr.ops.BSBROptions` and ``bsbr convert --help``). ``far_positions``: where retrieved keys
    and sinks outside the window are read (``FAR_POSITIONS`` above). A bare config has GPT-2-small's
    shape and ``bsbr convert``'s attention options (``bsbr.convert.defaults``; ``retrieval_blocks=None``
    is 8, or 0 with ``recall_tokens``; ``feature_map=None`` is hedgehog, or identity with the additive
    form); converters fill in the source's architecture."""

    model_type = "bsbr"

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoConfig"):
        """Nothing: a saved model's ``auto_map`` already names ``bsbr_auto.py``. (transformers calls this when it
        loads the classes through that file, so that a later save copies their source; bsbr's modules import
        their package by relative imports, which that copy cannot follow.)"""

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        """transformers' ``save_pretrained``, plus the ``bsbr_auto.py`` that ``auto_map`` names: a process that
        has not imported bsbr reads the folder with ``trust_remote_code=True``. A retired option set on it since
        it was built (``update``) is refused by name, as is a value its checks refuse (set by ``update``, an
        attribute or ``from_pretrained``'s keyword arguments): the folder saved would not load."""
        self.refuse_retired()
        try:
            with notes_off():
                type(self)(**self.to_dict())
        except (ValueError, TypeError) as e:
            raise ValueError(f"this config would not load once saved ({' '.join(str(e).split())}): set it right "
                             "before saving") from None
        super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)
        if os.path.isdir(save_directory):
            write_auto_code(save_directory)

    def refuse_retired(self) -> None:
        """A ValueError naming a retired option set on this config since it was built (``update``, an attribute):
        a folder saved with it would not load."""
        _retired(self.__dict__, "this config sets {}", ": set it back before saving (feature_map: hedgehog or "
                 "identity; another option: delattr)")

    def _upload_modified_files(self, working_dir, *args, **kwargs):
        """``push_to_hub`` uploads the files changed since the save began: ``bsbr_auto.py`` goes too."""
        write_auto_code(working_dir)
        return super()._upload_modified_files(working_dir, *args, **kwargs)

    def __init__(
        self,
        vocab_size: int = 50257,
        hidden_size: int = 768,
        intermediate_size: int = 3072,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        num_key_value_heads: Optional[int] = None,
        head_dim: Optional[int] = None,
        hidden_act: str = "gelu_new",
        mlp_type: str = "standard",
        norm_type: str = "layernorm",
        norm_eps: float = 1e-5,
        position_type: str = "learned",
        max_position_embeddings: int = 1024,
        position_scheme: str = "wrap",
        rope_parameters: Optional[dict] = None,
        attention_bias: bool = True,
        attention_out_bias: Optional[bool] = None,
        mlp_bias: bool = True,
        # BSBR attention
        chunk_size: int = 256,
        compression_factor: Optional[int] = None,
        retrieval: str = "normalized",
        feature_map: Optional[str] = None,
        gate_init: Optional[float] = 0.0,
        local_chunks: int = 2,
        sink_tokens: int = 4,
        retrieval_blocks: Optional[int] = None,
        recall_tokens: int = 0,
        far_positions: str = "window",
        initializer_range: float = 0.02,
        source_model_type: Optional[str] = None,
        tie_word_embeddings: bool = True,
        use_cache: bool = True,
        pad_token_id: Optional[int] = None,
        bos_token_id: Optional[int] = None,
        eos_token_id: Optional[int] = None,
        **kwargs,
    ):
        for name, value in (("vocab_size", vocab_size), ("hidden_size", hidden_size),
                            ("intermediate_size", intermediate_size), ("num_hidden_layers", num_hidden_layers),
                            ("num_attention_heads", num_attention_heads),
                            ("max_position_embeddings", max_position_embeddings)):
            check_int(name, value, maximum=MAX_SIZE if name in ("intermediate_size", "num_attention_heads") else None)
        for name, value in (("num_key_value_heads", num_key_value_heads), ("head_dim", head_dim)):  # None allowed
            if value is not None:
                check_int(name, value, maximum=MAX_SIZE)
        if retrieval_blocks is None:
            retrieval_blocks = default_retrieval_blocks(recall_tokens)
        if feature_map is None:
            feature_map = default_feature_map(retrieval)
        check_bsbr_options(chunk_size=chunk_size, compression_factor=compression_factor, retrieval=retrieval,
                           feature_map=feature_map, gate_init=gate_init, local_chunks=local_chunks,
                           sink_tokens=sink_tokens, retrieval_blocks=retrieval_blocks, recall_tokens=recall_tokens,
                           far_positions=far_positions, position_scheme=position_scheme)
        from transformers.activations import ACT2FN

        _choice("hidden_act", hidden_act, sorted(ACT2FN))  # (a misspelt one was saved, and failed the model's build)
        _choice("mlp_type", mlp_type, MLP_TYPES)
        _choice("norm_type", norm_type, NORM_TYPES)
        _choice("position_type", position_type, POSITION_TYPES)
        check_number("norm_eps", norm_eps, 0)  # (0 as a source may have it: norms without an epsilon)
        check_number("initializer_range", initializer_range, 0)
        for name, value in (("attention_bias", attention_bias), ("mlp_bias", mlp_bias),
                            ("tie_word_embeddings", tie_word_embeddings), ("use_cache", use_cache)):
            check_flag(name, value)
        check_flag("attention_out_bias", attention_out_bias, none=True)
        if rope_parameters is not None and not isinstance(rope_parameters, dict):
            raise ValueError(f"rope_parameters must be None or a dict (rope_type, rope_theta, ...), "
                             f"got {type(rope_parameters).__name__}")
        num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        if num_attention_heads % num_key_value_heads:
            raise ValueError(f"num_attention_heads ({num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({num_key_value_heads})")
        if head_dim is None:
            if hidden_size % num_attention_heads:
                raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_attention_heads "
                                 f"({num_attention_heads}) when head_dim is not given")
            head_dim = hidden_size // num_attention_heads
        if position_type == "rope" and head_dim % 2:
            raise ValueError(f"rotary positions turn pairs of a head's dims: head_dim must be even, got {head_dim}")
        features = 2 * head_dim if feature_map == "hedgehog" else head_dim  # a chunk state's feature dim
        if compression_factor is not None and features % compression_factor:
            raise ValueError(f"compression_factor ({compression_factor}) must divide the chunk states' feature dim "
                             f"({features}: head_dim {head_dim}{' x 2 for hedgehog' if features > head_dim else ''})")
        # the legacy keys (a config.json or code written for older transformers): rope_parameters's parts
        theta, scaling = kwargs.pop("rope_theta", None), kwargs.pop("rope_scaling", None)
        if position_type == "rope" and rope_parameters is None:
            rope_parameters = dict(scaling or {})
            rope_parameters["rope_type"] = rope_parameters.pop("type", rope_parameters.get("rope_type", "default"))
            rope_parameters.setdefault("rope_theta", 10000.0 if theta is None else theta)
        elif theta is not None or scaling is not None:
            logger.warning("rope_theta / rope_scaling are ignored: %s", "rope_parameters is given"
                           if rope_parameters is not None else f"position_type is {position_type!r}")
        if position_type == "rope" and isinstance(rope_parameters, dict) and "rope_theta" not in rope_parameters:
            rope_parameters = {**rope_parameters, "rope_theta": 10000.0}  # (transformers' default)
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.hidden_act = hidden_act
        self.mlp_type = mlp_type
        self.norm_type = norm_type
        self.norm_eps = float(norm_eps)
        self.position_type = position_type
        self.max_position_embeddings = max_position_embeddings
        self.position_scheme = position_scheme
        self.rope_parameters = rope_parameters
        self.attention_bias = attention_bias
        self.attention_out_bias = attention_bias if attention_out_bias is None else attention_out_bias
        self.mlp_bias = mlp_bias
        self.chunk_size = chunk_size
        self.compression_factor = compression_factor
        self.retrieval = retrieval
        self.feature_map = feature_map
        self.gate_init = gate_init
        # the exact keys: own chunk + local_chunks - 1 before it + the first sink_tokens tokens + the
        # retrieval_blocks best-scoring earlier chunks (see bsbr.ops.BSBROptions)
        self.local_chunks = local_chunks
        self.sink_tokens = sink_tokens
        self.retrieval_blocks = retrieval_blocks
        # the bounded recall mode: at most recall_tokens exact past tokens per layer and K/V head, the
        # rest in one state (constant memory; exclusive with retrieval_blocks)
        self.recall_tokens = recall_tokens
        self.far_positions = far_positions
        self.initializer_range = initializer_range
        self.source_model_type = source_model_type
        self.use_cache = use_cache
        # declared, as the sources' configs declare them (code reads config.pad_token_id and tests for None)
        for name, value in (("pad_token_id", pad_token_id), ("bos_token_id", bos_token_id),
                            ("eos_token_id", eos_token_id)):  # (a "2" failed inside generate, naming nothing)
            if value is not None and not all(isinstance(t, int) and not isinstance(t, bool) for t in (
                    value if isinstance(value, list) else [value])):
                raise ValueError(f"{name} must be a token id (an int), a list of them or null, got {shown(value)}")
        self.pad_token_id, self.bos_token_id, self.eos_token_id = pad_token_id, bos_token_id, eos_token_id
        # the bsbr that saved the config (BSBRPreTrainedModel.save_pretrained sets it): a newer one's options
        # may be ones this bsbr does not read
        self.bsbr_version = kwargs.pop("bsbr_version", None)
        _warn_if_newer(self.bsbr_version)
        if kwargs.pop("window_scored_blocks", 0):  # a retired option some saved configs hold
            _warn_once("this config sets window_scored_blocks, a retired option (a second block score for some "
                       "of the retrieval blocks): the model chooses all %s blocks by their own scores",
                       retrieval_blocks)
        _refuse_native_names(self, kwargs)
        for name in _retired(kwargs, "BSBRConfig({})"):  # (from_dict takes them out of a saved config first)
            kwargs.pop(name)
        kwargs.setdefault("auto_map", dict(AUTO_MAP))
        try:
            super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
        except KeyError as e:  # (transformers' check of rope_parameters: a key its rope_type needs is missing)
            raise ValueError(f"{e.args[0] if e.args else e}: give the source's rope_parameters") from None
        rope = self.rope_parameters
        if rope is not None and not isinstance(rope, dict):
            raise ValueError(f"rope_parameters must be None or a dict, got {type(rope).__name__}")
        if rope and "rope_theta" in rope:
            check_number("rope_parameters['rope_theta']", rope["rope_theta"], 0, above=True)
        # transformers only logs a factor of another type ("4" and 0 failed later, naming nothing); null is the
        # rope type's default
        for key in _ROPE_NUMBERS & set(rope or ()):
            check_number(f"rope_parameters[{key!r}]", rope[key], 0, above="mscale" not in key, none=True)

    @classmethod
    @occasion()  # (its notes are said for each config read: AutoConfig reads one before a model loads)
    def from_dict(cls, config_dict: dict, **kwargs):
        """transformers' ``from_dict``, except that BSBRModel's argument names a saved config holds (an earlier
        bsbr kept them, unread, beside the fields the weights were built with) are dropped with a warning, as
        are dropout overrides (``from_pretrained(..., attention_dropout=0.1)``: the models have none), and
        a config an earlier bsbr saved is read as that bsbr computed it, or refused or warned of where this
        bsbr cannot (:func:`_saved_config`)."""
        _refuse_methods(cls, kwargs)  # (from_pretrained's overrides, set on the config once it is built)
        config_dict = _saved_config(config_dict)
        stray = [name for name in _NATIVE_NAMES if name in config_dict and _NATIVE_NAMES[name] in config_dict]
        if stray:
            logger.warning("config: %s: BSBRModel's names, which an earlier bsbr saved unread: dropped (the model "
                           "has %s)", ", ".join(f"{n}={config_dict[n]!r}" for n in stray),
                           ", ".join(f"{_NATIVE_NAMES[n]}={config_dict.get(_NATIVE_NAMES[n])!r}" for n in stray))
            config_dict = {k: v for k, v in config_dict.items() if k not in _NATIVE_NAMES}
        _drop_dropout(kwargs)  # (from_pretrained's overrides: transformers gives the model those a config lacks)
        config_dict = {**config_dict, **{k: kwargs.pop(k) for k in HEAD_DROPOUT if k in kwargs}}  # (kept, as
        # fields the config has)
        return super().from_dict(config_dict, **kwargs)

    def convert_rope_params_to_dict(self, **kwargs) -> dict:
        """transformers' rotary parameters filled in with defaults, for rotary positions only: learned ones
        read none, and transformers' check of a default it would fill in refuses an odd head size."""
        return super().convert_rope_params_to_dict(**kwargs) if self.position_type == "rope" else kwargs

    def warn_unread_position_option(self) -> None:
        """Log the position option this kind of positions never reads, when it is set off its default: recorded,
        it does nothing (the command line refuses it; in Python a sweep of options over families, or a
        ``from_pretrained`` override, is not stopped, but told). The model calls it once when it is built."""
        unread, default, why = UNREAD_POSITION_OPTION[self.position_type]
        value = getattr(self, unread)
        if value != default:
            logger.warning("%s=%r does nothing for a model with %s positions: %s", unread, value, self.position_type,
                           why)
        if (hybrid_as_window := self.hybrid_as_window()) is not None:
            logger.warning("%s", hybrid_as_window)

    def hybrid_as_window(self) -> Optional[str]:
        """Why ``far_positions='hybrid'`` computes as ``'window'`` with this config (None: it does not)."""
        if self.far_positions != "hybrid" or self.position_type != "rope" or self.own_position_chunks():
            return None
        half, window = self.max_position_embeddings // 2, self.local_chunks * self.chunk_size
        return (f"far_positions 'hybrid' reads far keys at their own positions within half the source's positions "
                f"({half:,} tokens), whole chunks of {self.chunk_size:,} of which reach no further than the window "
                f"({window:,} tokens): it would be 'window' here: give a smaller chunk_size"
                + (" or fewer local_chunks" if self.local_chunks > 1 else "") + ", or far_positions 'window'")

    def attention_kwargs(self) -> dict:
        """Keyword arguments of :class:`bsbr.layers.BSBRAttention` for this config."""
        return dict(
            num_kv_heads=self.num_key_value_heads, head_dim=self.head_dim, bias=self.attention_bias,
            out_bias=self.attention_out_bias, retrieval=self.retrieval, feature_map=self.feature_map,
            gate_init=self.gate_init, local_chunks=self.local_chunks, sink_tokens=self.sink_tokens,
            retrieval_blocks=self.retrieval_blocks, recall_tokens=self.recall_tokens,
            own_position_chunks=self.own_position_chunks(),
        )

    def own_position_chunks(self) -> int:
        """The op's ``own_position_chunks``: with ``far_positions='hybrid'`` on rotary positions, the chunks
        whose every key lies within half of ``max_position_embeddings`` of a query (0 when that is no
        more than the window); else 0. Half: SmolLM2 (8,192 positions) finds a pass-key at 4,096 tokens
        9/9 and at 8,192 6/9; with the whole range, keys read about 8,000 tokens back were missed
        (docs/findings.md). At most the op's limit, ``MAX_TOKENS`` chunks: more than a sequence of its
        ``MAX_TOKENS`` tokens holds, so a larger range changes nothing."""
        if self.far_positions != "hybrid" or self.position_type != "rope":
            return 0
        reach = min(self.max_position_embeddings // 2 // self.chunk_size, MAX_TOKENS)
        return reach if reach > self.local_chunks else 0

    def far_shift_chunks(self) -> int:
        """How many chunks back a far key read at far positions seems to lie (besides its offset): the
        window's length for 'window', the oldest chunk read at own positions for 'hybrid' (the window's
        length when no chunk is)."""
        reach = self.own_position_chunks()
        return reach - 1 if reach else self.local_chunks


def missing_defaults(values: dict) -> dict:
    """What a config built from ``values`` (a config.json's dict, keys possibly lost) takes for each
    argument ``values`` lacks, or holds as null where null means "the default" (``retrieval_blocks``,
    ``feature_map``: their rules read ``values``)."""
    import inspect

    defaults = {k: p.default for k, p in inspect.signature(BSBRConfig.__init__).parameters.items()
                if p.default is not p.empty}
    derived = dict(retrieval_blocks=default_retrieval_blocks(values.get("recall_tokens")),
                   feature_map=default_feature_map(values.get("retrieval", defaults["retrieval"])))
    if saved_before_versions(values):  # (a window option an earlier bsbr's config.json lacks: _saved_config)
        derived.update(_saved_without(values))
    return {k: derived[k] if k in derived else v for k, v in defaults.items()
            if k not in values or (k in derived and values[k] is None)}
