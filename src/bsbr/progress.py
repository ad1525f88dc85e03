"""Progress bars for long work (tqdm's), unless the command line turned them off for the command it runs:
``--no-progress``, or a stderr that is not a terminal (no bars in a log)."""
from __future__ import annotations

import contextlib
import os
import threading
from typing import Iterator

_OFF = threading.local()  # .off: in this thread (a command's --no-progress silences no other thread's bars)


@contextlib.contextmanager
def bars_off(off: bool = True) -> Iterator[None]:
    """While the block runs, :func:`bar` shows nothing in this thread (if ``off``)."""
    saved = getattr(_OFF, "off", False)
    _OFF.off = saved or off
    try:
        yield
    finally:
        _OFF.off = saved


def bar(*args, disable: bool = False, **kwargs):
    """``tqdm.auto.tqdm(*args, **kwargs)``, disabled also inside :func:`bars_off` (in this thread)."""
    from tqdm.auto import tqdm

    return tqdm(*args, disable=disable or getattr(_OFF, "off", False), **kwargs)


@contextlib.contextmanager
def library_bars_off(off: bool = True) -> Iterator[None]:
    """transformers' and huggingface_hub's progress bars off while the block runs (if ``off``; not against a set
    ``HF_HUB_DISABLE_PROGRESS_BARS``, which rules the hub), then exactly as they were, the hub's switches per
    group included (its own functions can only clear them)."""
    if not off or os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS") is not None:
        yield
        return
    from transformers.utils import logging as hf_logging

    states, bars = dict(hub_bar_states()), hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()
        hub_bar_states().clear()
        hub_bar_states().update(states)


@contextlib.contextmanager
def gguf_bar_follows() -> Iterator[None]:
    """transformers' GGUF loader draws its bar with tqdm whatever transformers' switch says: inside
    :func:`bars_off` (this thread) it draws none either."""
    if not getattr(_OFF, "off", False):
        yield
        return
    import functools

    from transformers import modeling_gguf_pytorch_utils as gguf

    drawn = gguf.tqdm
    gguf.tqdm = functools.partial(drawn, disable=True)
    try:
        yield
    finally:
        gguf.tqdm = drawn


def hub_bar_states() -> dict:
    """huggingface_hub's progress-bar switches (global and per group), which its functions can only clear."""
    from huggingface_hub.utils import _tqdm

    return _tqdm.progress_bar_states
