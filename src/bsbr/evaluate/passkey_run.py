"""The pass-key test on saved models without the perplexity windows (``bsbr eval --passkey-only``).

:func:`passkey_saved` loads a converted model, its source, the chunk-local baseline and (for a model
whose exact window reaches past its own chunk) the source restricted to that window, exactly as
``bsbr eval`` does, and runs :func:`~bsbr.evaluate.passkey.run_passkey` on all of them.
"""
from __future__ import annotations

import os
import time
from typing import Optional


def passkey_saved(model_dir: os.PathLike, reference=None, *, passkey: Optional[dict] = None,
                  progress: bool = True, check_reference=None) -> dict:
    """Pass-key accuracy of the model in ``model_dir`` beside its source, the chunk-local baseline
    and the window baseline. ``passkey``: keyword arguments for
    :func:`~bsbr.evaluate.passkey.run_passkey`. Returns ``{"config", "passkey", "seconds"}``."""
    from .baselines import load_saved_models
    from .passkey import run_passkey

    t0 = time.perf_counter()
    models, tokenizer, config = load_saved_models(model_dir, reference, check_reference)
    result = run_passkey(models, tokenizer, chunk_size=config["chunk_size"], progress=progress, **(passkey or {}))
    return dict(config=config, passkey=result, seconds=round(time.perf_counter() - t0, 1))
