"""Finite numbers: float32's range, and the argparse type every command uses for its float options
(no torch import: command parsers are built for ``--help``)."""
from __future__ import annotations

import argparse
import math

FLOAT32_MAX = 3.4028234663852886e38  # torch.finfo(torch.float32).max: a larger value is inf in float32


def finite_number(float32: bool = False, positive: bool = False):
    """An argparse type: a finite float; with ``float32`` one float32 holds (no overflow to inf), with
    ``positive`` one > 0. A bad value is argparse's one-line usage error naming the flag."""
    def parse(text: str) -> float:
        try:
            value = float(text)
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
