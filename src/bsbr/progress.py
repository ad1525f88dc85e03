"""Progress bars for long work (tqdm's), unless the command line turned them off for the command it runs:
``--no-progress``, or a stderr that is not a terminal (no bars in a log)."""
from __future__ import annotations

import contextlib
from typing import Iterator

_OFF = [False]


@contextlib.contextmanager
def bars_off(off: bool = True) -> Iterator[None]:
    """While the block runs, :func:`bar` shows nothing (if ``off``)."""
    saved = _OFF[0]
    _OFF[0] = saved or off
    try:
        yield
    finally:
        _OFF[0] = saved


def bar(*args, disable: bool = False, **kwargs):
    """``tqdm.auto.tqdm(*args, **kwargs)``, disabled also inside :func:`bars_off`."""
    from tqdm.auto import tqdm

    return tqdm(*args, disable=disable or _OFF[0], **kwargs)
