"""``bsbr eval``'s jobs on a saved model: the full evaluation (JSON and a plot), or the pass-key test
alone (``--passkey-only``), both against the models :func:`~.baselines.load_saved_models` loads."""
from __future__ import annotations

import logging
import os
import time
from typing import Optional

from ..models.bsbr.reach import exact_reach, gate_open
from ..notes import occasion
from .baselines import load_eval_tokenizer, load_saved_models
from .metrics import evaluate

logger = logging.getLogger(__name__)


@occasion()  # (its loads and baseline conversions say each note once, as bsbr eval)
def evaluate_saved(model_dir: os.PathLike, reference=None, *, text_files=None, dataset=None, dataset_config=None,
                   dataset_split: str = "test", text_column: str = "text", split: str = "heldout",
                   seq_len: int = 2048, max_windows: int = 16, stride: Optional[int] = None,
                   buckets: str = "chunk", passkey: Optional[dict] = None, seed: int = 0,
                   progress: bool = True, check_reference=None, windows: Optional[tuple] = None) -> dict:
    """``bsbr eval``: load and evaluate.

    ``reference`` (what the model was converted from) and ``check_reference``: as in
    :func:`~bsbr.evaluate.baselines.load_saved_models`; ``windows``: what :func:`eval_windows` gave for
    these options, when already built.
    """
    # the windows before any model is loaded: a corpus too small for one is refused at once
    windows, corpus_info = windows or eval_windows(
        load_eval_tokenizer(model_dir, reference), text_files=text_files, dataset=dataset,
        dataset_config=dataset_config, dataset_split=dataset_split, text_column=text_column, split=split,
        seq_len=seq_len, max_windows=max_windows, stride=stride, seed=seed)
    models, tokenizer, config = load_saved_models(model_dir, reference, check_reference)
    logger.info("%d windows of %d tokens, chunk size %d", windows.shape[0], seq_len, config["chunk_size"])
    read = passkey if passkey is not None and "bsbr" in passkey.get("only", ["bsbr"]) else None
    _warn_unread_states(models["bsbr"], model_dir, seq_len, read)
    result = evaluate(models["bsbr"], models["source"], tokenizer, windows, config["chunk_size"], local=models["local"],
                      buckets=buckets, passkey=passkey, progress=progress, window=models.get("window"))
    result["config"].update(config, corpus=corpus_info, stride=stride or seq_len)
    return result


def eval_windows(tokenizer, *, text_files=None, dataset=None, dataset_config=None, dataset_split: str = "test",
                 text_column: str = "text", split: str = "heldout", seq_len: int = 2048, max_windows: int = 16,
                 stride: Optional[int] = None, seed: int = 0) -> tuple:
    """The evaluation's windows of token ids (:func:`~bsbr.corpus.token_windows`) and the record of their corpus."""
    from ..corpus import corpus_texts, windows_read

    texts, corpus_info = corpus_texts(text_files, dataset, dataset_config, dataset_split, text_column, split, seed)
    windows, corpus_info, _ = windows_read(tokenizer, texts, corpus_info, seq_len, max_windows, stride)
    if max_windows is not None and windows.shape[0] < max_windows:  # (distill's --max-windows is a cap: it
        # says how many it trains on)
        logger.warning("the corpus gave %d windows of %d tokens (of the %d asked for): the figures rest on fewer",
                       windows.shape[0], seq_len, max_windows)
    return windows, corpus_info


@occasion()
def passkey_saved(model_dir: os.PathLike, reference=None, *, passkey: Optional[dict] = None,
                  progress: bool = True, check_reference=None) -> dict:
    """``bsbr eval --passkey-only``: pass-key accuracy of every loaded model, no perplexity windows.
    ``passkey``: keyword arguments for :func:`~bsbr.evaluate.passkey.run_passkey`. Returns
    ``{"config", "passkey", "seconds"}``."""
    from .passkey import run_passkey

    t0 = time.perf_counter()
    models, tokenizer, config = load_saved_models(model_dir, reference, check_reference, (passkey or {}).get("only"))
    if "bsbr" in models:
        _warn_unread_states(models["bsbr"], model_dir, None, passkey)
    result = run_passkey(models, tokenizer, chunk_size=config["chunk_size"], progress=progress, **(passkey or {}))
    return dict(config=config, passkey=result, seconds=round(time.perf_counter() - t0, 1))


def _warn_unread_states(model, model_dir, seq_len: Optional[int], passkey: Optional[dict]) -> None:
    """Warn when a model that reads its chunk states (an open gate) reads them only past every perplexity
    window (``seq_len``; its last position's logits predict nothing) or past pass-key prompts: what they add is
    not measured there."""
    if not gate_open(model):
        return
    reach = exact_reach(model.config)
    if seq_len is not None and seq_len < reach + 2:
        logger.warning("%s reads its chunk states (its gate is open, or it has none) only from token %d on, past "
                       "every window of %d tokens here: its perplexity figures are those of its exact window and "
                       "blocks alone; give windows of %d tokens or more (--seq-len) to measure what they add",
                       model_dir, reach, seq_len, reach + 2)
    short = sorted(n for n in (passkey or {}).get("lengths", ()) if n <= reach)
    if short:
        logger.warning("%s reads its chunk states (its gate is open, or it has none) only from token %d on: its "
                       "pass-key prompts of %s tokens end before that", model_dir, reach,
                       ", ".join(f"{n:,}" for n in short))
