"""Convert pretrained decoder LMs (GPT-2, Llama, Mistral, Qwen2) to BSBRForCausalLM.

Every trained weight is copied (never shared) through the maps in :mod:`bsbr.convert.families`. Within
one chunk the converted model reproduces the source's logits; past it, each token reads its exact window
and retrieved blocks with the source's attention weights, and the closed chunk-state gate adds nothing
until distillation opens it.
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import re
import time
from pathlib import Path
from typing import Optional, Union

import torch
from transformers import PreTrainedModel

from ..layers.bsbr_attention import BSBRAttention
from ..models.bsbr import BSBRConfig, BSBRForCausalLM
from ..models.bsbr.configuration_bsbr import check_bsbr_options
from ..models.heads import head_replaced
from ..notes import ThreadSwitch, first_time, occasion
from ..progress import gguf_bar_follows
from ..models.bsbr.modeling_bsbr import (hub_folder, refuse_non_float_weights, refuse_pickled_weights,
                                          weights_held)
from .defaults import DEFAULT_CHUNK_SIZE, default_source_path, resolve_options
from .families import FAMILIES, LLAMA_LIKE, SUPPORTED_MODEL_TYPES, source_notes

logger = logging.getLogger(__name__)

class SourceWeightsError(ValueError):
    """A source's weights do not map onto the BSBR model its config gives (a config.json that is not
    this model's, another family's weights)."""


def load_source(source: Union[str, os.PathLike, PreTrainedModel, None], dtype: torch.dtype = torch.float32):
    """A transformers model from an instance (returned as it is), a local directory, a ``.gguf`` file, or a hub
    id (where the network allows), loaded in ``dtype``. ``None`` means the default SmolLM2 model."""
    if isinstance(source, PreTrainedModel):
        return source
    if source is None:
        source = default_source_path()
    if hasattr(source, "merge_and_unload"):  # a peft model (its base model is the transformers one)
        raise TypeError("source is a peft model: merge its adapters (source.merge_and_unload()), then convert the "
                        "model that returns")
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"source must be a transformers model, a path or a hub id, got {type(source).__name__}")
    path = Path(source)
    if path.suffix == ".gguf" and not path.is_dir():  # (a model folder may be named x.gguf)
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        try:
            with gguf_bar_follows():  # (--no-progress, or a log)
                return _load_complete(str(path), str(path.parent), gguf_file=path.name, dtype=dtype)
        except Exception as e:  # a file cut short fails inside transformers on a buffer or a shape: name it
            try:
                from gguf import GGUFReader

                GGUFReader(path)
            except Exception as bad:
                raise ValueError(f"{path}: {unreadable_gguf(bad)}") from e
            raise
    if path.exists():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is a file, not a model directory or a .gguf file" if path.is_file()
                                    else f"{path} is not a model directory (no config.json)")
        refuse_pickled_weights(path)
        _refuse_weights_it_cannot_convert(path)
        try:
            model = _load_complete(str(path), str(path), dtype=dtype, use_safetensors=True)
        except Exception as e:  # a float4 weight fails inside transformers on a shape: name it
            try:
                refuse_non_float_weights(path, scaled_only=True)
            except ValueError as scaled:
                raise scaled from e
            except Exception:  # (a file it cannot read: the load's own error says more)
                pass
            raise
        _refuse_non_float_loaded(model, path)
        _warn_unread_generation_config(path)
        return model
    if str(source).startswith((".", "/", "~")) or os.sep in str(source) and str(source).count("/") > 1:
        raise FileNotFoundError(f"model path not found: {source}")
    folder = hub_folder(str(source))  # a hub id: its files in the hub cache, checked as a folder's
    if folder is not None:
        _refuse_weights_it_cannot_convert(folder)
    model = _load_complete(str(source), str(source), dtype=dtype, use_safetensors=True)
    if folder is not None:
        _refuse_non_float_loaded(model, folder)
    return model


def _refuse_non_float_loaded(model, folder: Path) -> None:
    """:func:`refuse_non_float_weights` for the weights of ``folder`` that ``model`` loaded (cast into its float
    parameters; older files name the base model's weights without its prefix, as GPT-2's ``h.0...``)."""
    loaded = set(model.state_dict())
    prefix = f"{model.base_model_prefix}."
    refuse_non_float_weights(folder, loaded | {n.removeprefix(prefix) for n in loaded})


def unreadable_gguf(error: Exception) -> str:
    """Why a GGUF file the gguf package fails on with ``error`` cannot be read, and what to do."""
    return (f"not a readable GGUF file ({' '.join(str(error).split())[:160]}): cut short (download it again), or of "
            "a GGUF version the installed gguf package does not read (pip install -U gguf)")


def _refuse_weights_it_cannot_convert(path: Path) -> None:
    """A ValueError when a source folder's config.json says its weights are quantized (transformers would
    dequantize some kinds silently, or need a GPU), or gives more layers than its safetensors weights hold (read
    from their headers): transformers would build every layer first (3,000: minutes and gigabytes) and only then
    find their weights missing."""
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        quantized = config.get("quantization_config")
    except Exception:  # (an unreadable config.json is refused, by name, where it is loaded)
        return
    if quantized is not None:  # (an empty one too: transformers then fails without naming the folder)
        kind = quantized.get("quant_method") if isinstance(quantized, dict) else None
        raise ValueError(f"{path}: config.json holds a quantization_config ({kind or 'quantized weights'}): bsbr "
                         "converts float weights: give the model before quantization")
    try:
        key = "num_hidden_layers" if "num_hidden_layers" in config else "n_layer"
        stated = config.get(key)
        held = weights_held(path)  # (None: a shard missing, which transformers names, not the config)
    except Exception:  # (unreadable files are refused, by name, where they are loaded)
        return
    if isinstance(stated, int) and not isinstance(stated, bool) and held and held[0] and stated > held[0]:
        raise ValueError(f"{path}: config.json gives {stated:,} layers ({key}), its weights hold "
                         f"{held[0]}: restore the config.json saved with these weights")


_BASELINE = ThreadSwitch()  # on: this thread converts a command's baselines (bsbr eval's), not the user's model:
as_baseline = _BASELINE.on  # their summary line is logged at DEBUG


_STRAY_BUFFER = re.compile(r"(^|\.)attn\.(masked_)?bias$|(^|\.)rotary_emb\.inv_freq$")


# (class names' ends) models of another task, and a causal LM with a second head (GPT-2's multiple choice)
TASK_HEADS = ("ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering", "DoubleHeadsModel")


def _not_a_causal_lm(kind: str, said: str = "") -> str:
    """Why a model of class ``kind`` (one of :data:`TASK_HEADS`; ``said``: where that was read) is refused as a
    source, and what to give instead."""
    if kind.endswith("DoubleHeadsModel"):
        return (f"a {kind}{said}, a causal LM with a multiple-choice head BSBR does not carry: save its causal LM "
                "alone (AutoModelForCausalLM.from_pretrained, then save_pretrained) and convert that")
    return f"a {kind}{said}, not a causal LM: give the causal LM it was made from"


def _load_complete(name: str, *args, **kwargs) -> PreTrainedModel:
    """``AutoModelForCausalLM.from_pretrained(*args, **kwargs)``, refusing (ValueError) what transformers
    would load with random, dropped or broken weights: a weight missing from the files, one config.json
    has no place for, or of another shape than config.json gives it; a value of config.json it cannot
    look up; a weight that is not finite."""
    from transformers import AutoModelForCausalLM

    from ..models.bsbr.modeling_bsbr import LOADING

    try:
        with LOADING:  # (one load at a time: see LOADING)
            model, info = AutoModelForCausalLM.from_pretrained(*args, ignore_mismatched_sizes=True,
                                                                output_loading_info=True, trust_remote_code=False,
                                                                **kwargs)
    except KeyError as e:  # e.g. hidden_act or rope type: transformers looks the value up in a table
        raise ValueError(f"{name}: config.json names {e} where transformers knows no such value") from e
    except ValueError as e:  # (transformers' advice, trust_remote_code=True, is not taken: bsbr never runs it)
        if "trust_remote_code" not in str(e):
            raise
        raise ValueError(f"{name}: its config.json names a model type of its own (code in an auto_map), which bsbr "
                         f"never runs: bsbr converts {', '.join(SUPPORTED_MODEL_TYPES)} models") from e

    def listed(keys):
        keys = sorted(str(k) for k in keys)
        return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
    # weights config.json has no place for (more layers than it says, another family's modules) would be
    # dropped silently (a bias config.json says the model has none of too); stray buffers of older checkpoints
    # (GPT-2's attn.bias / attn.masked_bias masks, rotary inv_freq) are not weights
    extra = [k for k in info.get("unexpected_keys") or () if not _STRAY_BUFFER.search(str(k))]
    head = next((a for a in getattr(model.config, "architectures", None) or () if str(a).endswith(TASK_HEADS)), None)
    if head is not None and (info.get("missing_keys") or extra):  # (a classifier's folder: its decoder under
        said = " (config.json's architectures)"  # another prefix, or its head where no LM head is)
        raise ValueError(f"{name} holds {_not_a_causal_lm(head, said)}")
    if info.get("missing_keys"):
        raise ValueError(f"{name}: weights missing from its files (they would be random): "
                         f"{listed(info['missing_keys'])}")
    if extra:
        raise ValueError(f"{name}: its files hold weights that config.json has no place for, which would be dropped "
                         f"(is config.json this model's?): {listed(extra)}")
    if info.get("mismatched_keys"):
        key, found, expected = sorted(info["mismatched_keys"], key=str)[0][:3]
        raise ValueError(f"{name}: its weights do not fit its config.json ({key} has shape {tuple(found)}, "
                         f"config.json makes it {tuple(expected)}; {len(info['mismatched_keys'])} such)")
    bad = [n for n, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    if bad:
        raise ValueError(f"{name}: weights hold nan or inf: {listed(bad)}")
    return model


def _warn_unread_generation_config(path: Path) -> None:
    """transformers loads a model whose generation_config.json it cannot read with defaults from its
    config.json, logging nothing: say so, as the conversion carries the source's generation settings over."""
    from transformers import GenerationConfig

    if (path / "generation_config.json").is_file():
        try:
            GenerationConfig.from_pretrained(str(path))
        except Exception as e:  # (any: transformers raises several kinds)
            logger.warning("%s could not be read (%s): its generation settings (stop tokens, sampling) are not "
                           "carried over; the defaults from config.json are", path / "generation_config.json",
                           " ".join(str(e).split())[:160])


def load_tokenizer(source):
    """The tokenizer matching :func:`load_source`'s source (None for a model instance)."""
    from transformers import AutoTokenizer

    if isinstance(source, PreTrainedModel):
        return None
    path = Path(source) if source is not None else default_source_path()
    if path.suffix == ".gguf" and not path.is_dir():
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, trust_remote_code=False)
    return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)  # (a model folder's code never runs)


def is_new_parameter(name: str) -> bool:
    """Whether a parameter or state-dict name is one of the pieces BSBR adds to the source model."""
    return any(f".attn.{p}" in name for p in BSBRAttention.NEW_PARAMETER_PREFIXES)


def count_parameters(model: torch.nn.Module) -> int:
    """Unique parameters (tied weights count once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


class TransformerToBSBRConverter:
    """Converts a pretrained decoder LM to :class:`BSBRForCausalLM` (the earlier library's name).

    ``options``: the keys of :data:`bsbr.convert.DEFAULT_OPTIONS` (see :class:`bsbr.models.BSBRConfig`), defaults
    filled in by :func:`resolve_options`. ``gate_init=None`` means no gate.
    """

    def __init__(self, chunk_size: int = DEFAULT_CHUNK_SIZE, compression_factor: Optional[int] = None, **options):
        self.chunk_size = chunk_size
        self.compression_factor = compression_factor
        self.options = resolve_options(options)
        # bad options are refused here, before a source is loaded, by the checks BSBRConfig makes of them
        check_bsbr_options(chunk_size=chunk_size, compression_factor=compression_factor, **self.options)

    # the earlier converter's methods, which returned a BSBRModel (hidden states) of a GPT-2 model or layer
    EARLIER_METHODS = ("convert_gpt2_model_to_bsbr", "convert_pretrained_model", "convert_gpt2_layer_to_bsbr",
                       "convert_gpt2_attention_to_bsbr")

    def __getattr__(self, name):
        if name in TransformerToBSBRConverter.EARLIER_METHODS:
            raise AttributeError(f"{name} is the earlier converter's method: convert(source) converts a whole model "
                                 "(GPT-2, Llama, Mistral, Qwen2) to a BSBRForCausalLM (logits; .model gives the "
                                 "hidden states); see README, 'Coming from bsbr 0.1.1'")
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def bsbr_config(self, source_config) -> BSBRConfig:
        """The converted model's config for a source's config: the source's architecture with these
        options (so an option that does not fit it is refused before any weight is loaded)."""
        mt = getattr(source_config, "model_type", None)
        if mt == "bsbr":
            raise ValueError("the source is already a BSBR model")
        if mt not in FAMILIES:
            raise ValueError(f"unsupported model type {mt!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        special = {k: getattr(source_config, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        with _named_as_the_source(mt):
            config = BSBRConfig(**FAMILIES[mt].config(source_config), chunk_size=self.chunk_size,
                                compression_factor=self.compression_factor, source_model_type=mt, **self.options,
                                **{k: v for k, v in special.items() if v is not None})
        if (hybrid_as_window := config.hybrid_as_window()) is not None:
            raise ValueError(hybrid_as_window)
        return config

    @occasion()  # (its notes are said for each conversion)
    def convert(self, source) -> BSBRForCausalLM:
        """``source`` (a transformers causal LM instance, a local directory, a ``.gguf`` file, a hub id, or None for
        the default SmolLM2) converted: a float32 :class:`BSBRForCausalLM` in eval mode holding copies of its
        weights (the source is left as it was)."""
        t0 = time.perf_counter()
        src = load_source(source)
        config = self.bsbr_config(src.config)
        mt = config.source_model_type
        family = FAMILIES[mt]
        if type(src).__name__.endswith(TASK_HEADS):  # (another head than the LM's alone: the weights were
            raise SourceWeightsError(f"the source is {_not_a_causal_lm(type(src).__name__)}")  # looked up as missing)
        sd = src.state_dict()
        odd = next((k for k, v in sd.items() if not isinstance(v, torch.Tensor) or v.is_quantized), None)
        if odd is not None:  # (torch's dynamic quantization keeps packed params; a module's extra state, a dict)
            raise SourceWeightsError(f"the source's state holds {odd!r}, which is no float weight (a quantized module "
                                     "or a module's extra state): convert the float model")
        adapter = next((k for k in sd if ".lora_" in k or ".base_layer." in k), None)
        if adapter is not None:
            raise SourceWeightsError(f"the source carries peft adapters ({adapter!r}): merge them into it "
                                     "(merge_and_unload()), then convert the model that returns")
        meta = next((k for k, v in sd.items() if v.is_meta), None)
        if meta is not None:  # (built with init_empty_weights, or offloaded by accelerate: nothing to copy)
            raise SourceWeightsError(f"the source's weight {meta!r} is on the meta device, with no values to copy: "
                                     "load the source with its weights (no device_map offloading, no "
                                     "init_empty_weights)")
        if not any(k.startswith(family.base_prefix + ".") for k in sd):  # a base model (GPT2Model, LlamaModel)
            sd = {f"{family.base_prefix}.{k}": v for k, v in sd.items()}
        for note in source_notes(src.config) if family is LLAMA_LIKE else ():
            if first_time(note):  # (once per conversion, or per command: eval converts its baselines too)
                logger.warning("%s", note)
        if "lm_head.weight" not in sd and not config.tie_word_embeddings:
            raise SourceWeightsError("the source has untied output embeddings but no lm_head: pass the *ForCausalLM model")
        if config.tie_word_embeddings and head_replaced(src):  # (a head replaced after loading)
            untied = ("the source's config ties its word embeddings, but its lm_head differs from them (as "
                      "transformers loads such a model: untied): the BSBR model keeps them untied "
                      "(tie_word_embeddings=False)")
            if first_time(untied):
                logger.warning("%s", untied)
            config.tie_word_embeddings = False
        with _named_as_the_source(mt), torch.random.fork_rng(devices=[]):  # (the random initial weights are all
            model = BSBRForCausalLM(config).float()  # overwritten: the caller's generator is left as it was)
        _check_built_as_configured(src, model)
        embed = src.get_input_embeddings()  # its pad row trained or not as the source's (a pad_token_id set on the
        if isinstance(embed, torch.nn.Embedding):  # source's config since, as recipes do, counts once reloaded, as
            model.get_input_embeddings().padding_idx = embed.padding_idx  # it does for the source)
        if getattr(src, "generation_config", None) is not None:  # stop tokens, sampling defaults
            model.generation_config = copy.deepcopy(src.generation_config)
            model.generation_config._from_model_config = False  # kept as given, not rebuilt from the config
        target = model.state_dict()

        filled, used = {}, set()
        rules = list(family.global_rules) + [
            (f"model.layers.{i}.{t}", family.layer_prefix.format(i=i) + s, fn)
            for i in range(config.num_hidden_layers) for t, s, fn in family.layer_rules
        ]
        tied = config.tie_word_embeddings
        for tkey, skey, fn in rules:
            tied_head = tied and tkey == "lm_head.weight"
            if skey not in sd:
                if tkey in target and not tied_head:
                    raise SourceWeightsError(f"the source has no weight {skey!r} for {tkey!r} (config mismatch?)")
                continue
            used.add(skey)
            if tied_head:
                continue
            if tkey not in target:
                raise SourceWeightsError(f"source weight {skey!r} has no place in the BSBR model ({tkey!r})")
            if sd[skey].dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
                raise SourceWeightsError(f"the source's weight {skey!r} is {sd[skey].dtype}, not a float the converter "
                                         "copies (a quantized or scaled float weight): convert the float model")
            w = sd[skey] if fn is None else fn(sd[skey])
            if tuple(w.shape) != tuple(target[tkey].shape):
                raise SourceWeightsError(f"shape mismatch for {tkey!r}: source {skey!r} gives {tuple(w.shape)}, "
                                 f"BSBR expects {tuple(target[tkey].shape)}")
            if not bool(torch.isfinite(w).all()):  # (a loaded source is checked as it loads; an instance here)
                raise SourceWeightsError(f"the source's weight {skey!r} holds nan or inf: the converted model would "
                                         "too, and its checkpoint would not load")
            filled[tkey] = w.detach().to(torch.float32).clone()
        # a bias like GPT-2's fused c_attn.bias is used by three rules: count by key
        unused = [k for k in sd if k not in used and not k.endswith(family.ignored_suffixes)]
        if unused:
            raise SourceWeightsError(f"source weights with no place in the BSBR model: {unused[:8]}")
        missing = [k for k in target
                   if k not in filled and not is_new_parameter(k) and not (tied and k == "lm_head.weight")]
        if missing:
            raise SourceWeightsError(f"BSBR weights the source did not fill: {missing[:8]}")
        model.load_state_dict(filled, strict=False)  # every key of filled is the model's (checked above)
        if tied:
            model.tie_weights()
        before, after = count_parameters(src), count_parameters(model)
        s = model.conversion_summary = dict(source_model_type=mt, params_source=before, params_bsbr=after,
                                            extra_params_pct=100.0 * (after - before) / before,
                                            seconds=time.perf_counter() - t0)
        logger.log(logging.DEBUG if _BASELINE else logging.INFO,
                   "converted %s (%d layers): %.2fM -> %.2fM parameters (+%.2f%%) in %.1fs", mt,
                    config.num_hidden_layers, before / 1e6, after / 1e6, s["extra_params_pct"], s["seconds"])
        return model.eval()


@contextlib.contextmanager
def _named_as_the_source(model_type: str):
    """A ValueError about BSBRConfig fields the source's config names otherwise says the source's names too."""
    try:
        yield
    except ValueError as e:
        names = FAMILIES[model_type].source_names
        said = [v for k, v in names.items() if re.search(rf"\b{k}\b", str(e))]
        if not said:
            raise
        raise ValueError(f"{e} (the source config's {', '.join(said)})") from e


def _check_built_as_configured(src, model) -> None:
    """A :class:`SourceWeightsError` where the source's modules compute otherwise than its config now says, which
    the BSBR model is built from: its norms' epsilon, each layer's activation (what it computes on a probe, not its
    class: an ``nn.SiLU`` is 'silu'), its attention modules' head count, head size and score scale, its rotary
    frequencies (as its dtype rounds them) and scaling (the config edited after the model was built, e.g.
    ``rope_parameters`` set to extend the context: the source computes as before)."""
    from transformers.activations import ACT2FN

    said = "was its config edited after the model was built? Convert a model built from the config (save it, "
    said += "then convert the folder), or set the config back"
    eps, act_name = model.config.norm_eps, model.config.hidden_act
    probe = torch.linspace(-6.0, 6.0, 257, dtype=torch.float32)
    want = ACT2FN[act_name](probe)
    c = model.config  # each attention module's head count, size and score scale as built (a GPT-2's weights have
    heads = dict(num_heads=c.num_attention_heads, head_dim=c.head_dim,  # one shape for any head count)
                 num_key_value_groups=c.num_attention_heads // c.num_key_value_heads, scaling=c.head_dim ** -0.5)
    for name, m in src.named_modules():
        built = {k: getattr(m, k) for k in heads if isinstance(getattr(m, k, None), (int, float))} \
            if isinstance(getattr(m, "scaling", None), (int, float)) else {}  # (an attention module)
        odd = [f"{k} {v:g} (its config: {heads[k]:g})" for k, v in built.items()
               if not math.isclose(v, heads[k], rel_tol=1e-6)]
        if odd:
            raise SourceWeightsError(f"the source's {name} was built with {', '.join(odd)}: {said}")
        have = getattr(m, "variance_epsilon", getattr(m, "eps", None)) if "norm" in type(m).__name__.lower() else None
        if isinstance(have, float) and not math.isclose(have, eps, rel_tol=1e-6, abs_tol=1e-12):
            raise SourceWeightsError(f"the source's {name} has epsilon {have:g}, its config {eps:g}: {said}")
        act = getattr(m, "act_fn", getattr(m, "act", None)) if name.endswith("mlp") else None
        if isinstance(act, torch.nn.Module) and act.state_dict():
            raise SourceWeightsError(f"the source's activation {act_name!r} has learned weights ({name}: "
                                     f"{', '.join(act.state_dict())}), which BSBR's MLP does not carry: bsbr converts "
                                     "models whose activation has none")
        # (a copy of the probe: an in-place activation writes into it)
        if isinstance(act, torch.nn.Module) and not torch.allclose(
                act(probe.clone()).float(), want, rtol=0, atol=1e-5):
            raise SourceWeightsError(f"the source's {name} computes another activation than its config's "
                                     f"{act_name!r} (edited, or the module replaced, after the model was built?): "
                                     f"{said}")
    rotary, ours = getattr(getattr(src, "model", src), "rotary_emb", None), model.model.rotary
    freqs = getattr(rotary, "original_inv_freq", getattr(rotary, "inv_freq", None))
    if isinstance(freqs, torch.Tensor) and ours is not None and not freqs.is_meta and (
            freqs.shape != ours.inv_freq.shape or not torch.allclose(  # (a half-precision source's are rounded,
                freqs.float().cpu(), ours.inv_freq.to(freqs.dtype).float().cpu(), rtol=1e-5, atol=0)  # subnormal too)
            or not math.isclose(float(getattr(rotary, "attention_scaling", 1.0)), ours.attention_scaling,
                                rel_tol=1e-6)):
        raise SourceWeightsError(f"the source's rotary frequencies or scaling are not the ones its config's "
                                 f"rope_parameters give: {said}")


def convert_to_bsbr(source=None, chunk_size: int = DEFAULT_CHUNK_SIZE, compression_factor: Optional[int] = None,
                    **options) -> BSBRForCausalLM:
    """Convert ``source`` (a transformers model, a local directory, a .gguf file, a hub id, or None
    for the bundled SmolLM2-135M) to a float32 :class:`BSBRForCausalLM`, whatever the source's dtype. See
    :class:`TransformerToBSBRConverter`."""
    return TransformerToBSBRConverter(chunk_size, compression_factor, **options).convert(source)
