"""The evaluation loop: a converted model against its source and the chunk-local baseline
(:func:`evaluate`), and the quick single-model number probes compare (:func:`perplexity_past`)."""
from __future__ import annotations

import logging
import math
import time
from typing import Optional, Sequence

import torch

from .metrics import DEFAULT_KS, MetricAccumulator

logger = logging.getLogger(__name__)


@torch.no_grad()
def evaluate(model, source, tokenizer, windows: torch.Tensor, chunk_size: int, local=None,
             buckets: str = "chunk", ks: Sequence[int] = DEFAULT_KS, passkey: Optional[dict] = None,
             batch_size: int = 1, progress: bool = True, window=None) -> dict:
    """Compare ``model`` (BSBR) with ``source`` (full attention), ``local`` (chunk-local; None skips it
    and the gap closed) and optionally ``window`` (the source in the model's wider exact window, see
    :func:`~bsbr.evaluate.baselines.local_baseline`) on ``windows``, (num_windows, seq_len) token ids,
    with the metrics of :mod:`bsbr.evaluate.metrics`. ``passkey``: keyword arguments for
    :func:`~bsbr.evaluate.passkey.run_passkey`, or None to skip it; it needs ``tokenizer``.
    Returns ``{"config", "language_modeling", "passkey"?, "seconds"}``.
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
    models = {n: m for n, m in (("bsbr", model), ("source", source), ("local", local), ("window", window))
              if m is not None}
    vocab = {n: m.get_output_embeddings().weight.shape[0] for n, m in models.items()}
    if len(set(vocab.values())) != 1:
        raise ValueError(f"the models' vocabularies differ: {vocab} (is --reference the model this was converted from?)")
    v = next(iter(vocab.values()))
    if int(windows.max()) >= v or int(windows.min()) < 0:
        raise ValueError(f"windows hold token ids outside [0, {v}): wrong tokenizer?")

    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    for m in models.values():
        m.eval()
    n_win, seq_len = windows.shape
    acc = MetricAccumulator(seq_len, chunk_size, models=list(models), scheme=buckets, ks=ks)
    for start in tqdm(range(0, n_win, batch_size), desc="eval windows", disable=not progress):
        ids = windows[start:start + batch_size]                            # (b, n)
        logits, hidden = {}, {}
        for name, m in models.items():
            out = m(input_ids=ids, use_cache=False, output_hidden_states=True)
            if out.hidden_states is None:
                raise ValueError(f"{type(m).__name__} returned no hidden states with output_hidden_states=True")
            # hidden_states[-1] is the LM head's input (after the final norm) for HF models and BSBR alike
            logits[name], hidden[name] = out.logits, out.hidden_states[-1]  # (b, n, V), (b, n, D)
            del out  # frees the other layers' hidden states
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
