"""The training curve of a distillation run (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

import os
from pathlib import Path

from ..results import pyplot, save_figure


def plot_progress(progress: dict, path: os.PathLike, smooth: int = 10) -> Path:
    """Loss per step (stage 1: attention-transfer MSE; stage 2: KL to the teacher and LM loss), raw
    and as a running mean over ``smooth`` steps, against wall-clock minutes. Returns the path."""
    log = progress.get("log", [])
    series = [(1, "attn_mse", "stage 1: attention-transfer MSE"), (2, "kl", "stage 2: KL(teacher || student)"),
              (2, "ce", "stage 2: LM loss")]
    series = [(s, k, label) for s, k, label in series if any(e.get("stage") == s and k in e for e in log)]
    fig, axes = pyplot().subplots(1, max(len(series), 1), figsize=(5.5 * max(len(series), 1), 4), squeeze=False)
    for ax, (stage, key, label) in zip(axes[0], series):
        rows = [e for e in log if e.get("stage") == stage and key in e]
        t = [e["seconds"] / 60 for e in rows]
        y = [e[key] for e in rows]
        mean = [sum(y[max(0, i - smooth + 1): i + 1]) / len(y[max(0, i - smooth + 1): i + 1]) for i in range(len(y))]
        ax.plot(t, y, color="0.75", lw=0.8, label="per step")
        ax.plot(t, mean, color="tab:blue", lw=2, label=f"mean of last {smooth}")
        ax.set_xlabel("minutes")
        ax.set_title(label)
        ax.legend()
    if not series:
        axes[0, 0].text(0.5, 0.5, "no steps logged", ha="center")
    return save_figure(fig, path, dpi=110)
