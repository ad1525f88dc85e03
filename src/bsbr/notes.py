"""Notes said once per occasion. A load builds a model's config several times and a command loads a model
several times, so a note (a warning of an old config, a tokenizer taken from the reference) is said the first
time it applies in one :func:`occasion` (a command, a ``from_pretrained`` call, a config read) and again in the
next; outside any, once per thread. Each thread keeps its own (two loads at once say a note each). And
:class:`ThreadSwitch`, what keeps notes (or a summary line) back in one thread while a block runs."""
from __future__ import annotations

import contextlib
import threading
from typing import Hashable, Iterator

_STATE = threading.local()  # .said: the notes said in this thread's occasion (or outside any); .depth: occasions


def _said() -> set:
    if not hasattr(_STATE, "said"):
        _STATE.said, _STATE.depth = set(), 0
    return _STATE.said


def first_time(key: Hashable) -> bool:
    """True when the note ``key`` was not said yet in this occasion (it counts as said from now on)."""
    said = _said()
    if key in said:
        return False
    said.add(key)
    return True


class ThreadSwitch:
    """On in a thread while a ``with switch.on():`` block runs there (other threads keep theirs); ``bool()``
    reads this thread's."""

    def __init__(self):
        self._state = threading.local()

    def __bool__(self) -> bool:
        return getattr(self._state, "on", False)

    @contextlib.contextmanager
    def on(self) -> Iterator[None]:
        saved = bool(self)
        self._state.on = True
        try:
            yield
        finally:
            self._state.on = saved


@contextlib.contextmanager
def occasion() -> Iterator[None]:
    """One command, load or config read: its notes are said in it, whatever was said before or around it (an
    occasion inside another is part of it)."""
    said = _said()
    outer = said if not _STATE.depth else None
    if outer is not None:
        _STATE.said = set()
    _STATE.depth += 1
    try:
        yield
    finally:
        _STATE.depth -= 1
        if outer is not None:
            _STATE.said = outer
