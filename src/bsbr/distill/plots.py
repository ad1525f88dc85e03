"""The training curve of a distillation run (matplotlib without pyplot: no display needed, the program's backend
untouched)."""
from __future__ import annotations

import os
from pathlib import Path

from ..results import save_figure, subplots


def plot_progress(progress: dict, path: os.PathLike, smooth: int = 10) -> Path:
    """KL to the teacher and LM loss per step, raw and as a running mean over ``smooth`` steps,
    against wall-clock minutes. Returns the path."""
    log = progress.get("log", [])
    t = [e["seconds"] / 60 for e in log]
    fig, axes = subplots(1, 2, figsize=(11, 4))
    for ax, (key, label) in zip(axes, (("kl", "KL(teacher || student)"), ("ce", "LM loss"))):
        y = [e[key] for e in log]
        last = [y[max(0, i - smooth + 1): i + 1] for i in range(len(y))]
        ax.plot(t, y, color="0.75", lw=0.8, label="per step")
        ax.plot(t, [sum(w) / len(w) for w in last], color="tab:blue", lw=2, label=f"mean of last {smooth}")
        ax.set(xlabel="minutes", title=label)
        ax.legend()
    return save_figure(fig, path, dpi=110)
