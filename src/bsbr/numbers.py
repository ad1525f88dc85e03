"""Finite numbers: float32's range, the argparse types every command uses for its number options, and
durations as messages give them (no torch import: command parsers are built for ``--help``)."""
from __future__ import annotations

import argparse
import math

FLOAT32_MAX = 3.4028234663852886e38  # torch.finfo(torch.float32).max: a larger value is inf in float32


def counted(n: int, word: str) -> str:
    """``n`` (with thousands separators) and ``word``, plural unless ``n`` is 1: "1 token", "2,048 bytes"."""
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def _plain(text: str) -> str:
    """``text`` if it is written with ASCII characters and no ``_`` (Python's int() and float() also read
    "1_6" as 16 and other scripts' digits, which a mistyped flag should not become); else ValueError."""
    if not text.isascii() or "_" in text:
        raise ValueError(text)
    return text


def finite_number(float32: bool = False, positive: bool = False):
    """An argparse type: a finite float; with ``float32`` one float32 holds (no overflow to inf), with
    ``positive`` one > 0. A bad value is argparse's one-line usage error naming the flag."""
    def parse(text: str) -> float:
        try:
            value = float(_plain(text))
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
        if not math.isfinite(value) or (float32 and abs(value) > FLOAT32_MAX):
            raise argparse.ArgumentTypeError(f"{text!r}: give a finite number" +
                                             (f" float32 holds (at most {FLOAT32_MAX:.3g})" if float32 else ""))
        if positive and not value > 0:
            raise argparse.ArgumentTypeError(f"{text!r}: give a number > 0")
        return value
    parse.__name__ = "number"
    return parse


MAX_TOKENS = 1 << 20  # the most tokens of one sequence, exact window, sink set or recall cache (each allocated whole)
# the bounded mode's budget: choosing its tokens compares every pair of candidates (about M^2 numbers per K/V
# head per chunk), so a budget of a million tried to allocate a terabyte at its first token; the default is 256
MAX_RECALL_TOKENS = 4096
# the benchmarks' model sizes: at a width of 16,384 one square float32 projection is 1 GB (a width of 40,000,
# accepted as a token count, took 6.7 GB and 14 s to fail, naming no flag)
MAX_WIDTH = 1 << 14
MAX_LAYERS = 256
MAX_COUNT = 10 ** 9  # optimizer steps, windows: more would run for years
MAX_REPEATS = 1000  # timed repeats, pass-key trials: a median of more measures nothing new
SEED_RANGE = (0, 2 ** 32 - 1)  # torch's CPU generator keeps a seed's low 32 bits: others would repeat a run


def integer(low: int = 1, high: int = MAX_TOKENS):
    """An argparse type: an int in [low, high]. A bad value is argparse's one-line usage error naming the
    flag, at parse time, before any model is loaded (a huge count would otherwise overflow a tensor
    size or run until killed)."""
    def parse(text: str) -> int:
        try:
            value = int(_plain(text))
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be an integer from {low:,} to {high:,}, got {text}")
        return value
    parse.__name__ = "integer"
    return parse


def duration(seconds: float) -> str:
    """``seconds`` for a message, rounded up (a prediction just past a limit never reads as the limit): "5.1 s",
    or past 2 minutes "150 s (2.5 minutes)"."""
    up = math.ceil(seconds * 10) / 10
    return f"{up:,.1f} s" if up < 120 else f"{math.ceil(seconds):,} s ({seconds / 60:,.1f} minutes)"
