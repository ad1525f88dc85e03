"""Learning-rate schedules: the multiplier of a base rate at a fraction of a run (or of one stage)."""
from __future__ import annotations

import math

SCHEDULES = ("constant", "linear", "cosine")


def lr_scale(schedule: str, fraction: float, floor: float = 0.0) -> float:
    """Learning-rate multiplier at ``fraction`` (0 = start, 1 = end): ``constant`` 1, ``linear`` a
    straight line down to ``floor`` at the end, ``cosine`` half a cosine down to ``floor``."""
    f = min(max(fraction, 0.0), 1.0)
    if schedule == "constant":
        return 1.0
    if schedule == "linear":
        return floor + (1.0 - floor) * (1.0 - f)
    if schedule == "cosine":
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * f))
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
