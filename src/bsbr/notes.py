"""Notes said once per occasion. A load builds a model's config several times and a command loads a model
several times, so a note (a warning of an old config, a tokenizer taken from the reference) is said the first
time it applies in one :func:`occasion` (a command, a ``from_pretrained`` call) and again in the next; outside
any, once until the next occasion ends."""
from __future__ import annotations

import contextlib
import threading
from typing import Hashable, Iterator

_SAID: set = set()
_LOCK = threading.Lock()
_DEPTH = threading.local()  # .n: this thread's open occasions (a load inside a command is part of it)


def first_time(key: Hashable) -> bool:
    """True when the note ``key`` was not said yet in this occasion (it counts as said from now on)."""
    with _LOCK:
        if key in _SAID:
            return False
        _SAID.add(key)
        return True


@contextlib.contextmanager
def occasion() -> Iterator[None]:
    """One command or one load: notes said before it are said again in it, and those said in it after it."""
    depth = getattr(_DEPTH, "n", 0)
    if not depth:
        with _LOCK:
            _SAID.clear()
    _DEPTH.n = depth + 1
    try:
        yield
    finally:
        _DEPTH.n = depth
        if not depth:
            with _LOCK:
                _SAID.clear()
