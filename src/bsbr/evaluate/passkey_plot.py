"""The pass-key result as a heat map (matplotlib, Agg backend), with its JSON beside it.

One panel per model (source, chunk-local, window, BSBR: whichever the result has), rows = prompt
length, columns = key depth, colour and number = accuracy over the cell's trials; a last panel gives
each model's accuracy per filler source.
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Tuple

from ..results import pyplot, save_figure, write_json
from .passkey import accuracy_grid, model_order
from .plots import LABELS, grouped_bars

logger = logging.getLogger(__name__)


def plot_passkey_heatmap(passkey: dict, path: os.PathLike) -> Path:
    """Write the heat maps (and the per-filler panel) of a :func:`~bsbr.evaluate.passkey.run_passkey`
    result to ``path``; returns it."""
    import numpy as np

    plt = pyplot()

    names = model_order(passkey)
    fillers = [f["name"] for f in passkey.get("fillers", [])]
    n_panels = len(names) + (1 if fillers else 0)
    lengths, depths = passkey["lengths"], passkey["depths"]
    size = (n_panels * (0.7 * len(depths) + 2.2) + 0.6, 0.45 * len(lengths) + 2.0)
    fig, axes = plt.subplots(1, n_panels, figsize=size, squeeze=False, layout="constrained")
    image = None
    for ax, name in zip(axes[0], names):
        grid = np.array([[math.nan if a is None else a for a in row] for row in accuracy_grid(passkey, name)])
        image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
        for i in range(len(lengths)):
            for j in range(len(depths)):
                if not math.isnan(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=8,
                            color="black" if 0.25 < grid[i, j] < 0.85 else "white")
        ax.set_xticks(range(len(depths)))
        ax.set_xticklabels([f"{d:g}" for d in depths], fontsize=8)
        ax.set_yticks(range(len(lengths)))
        ax.set_yticklabels([str(L) for L in lengths], fontsize=8)
        ax.set_xlabel("key depth")
        ax.set_ylabel("prompt tokens")
        overall = passkey["models"][name]["accuracy"]
        ax.set_title(f"{LABELS.get(name, name)}\naccuracy {overall:.2f}", fontsize=9)
    if image is not None:
        fig.colorbar(image, ax=list(axes[0][:len(names)]), fraction=0.02, pad=0.02)
    if fillers:
        ax = axes[0][-1]
        grouped_bars(ax, names, fillers,
                     lambda name, f: passkey["models"][name].get("by_filler", {}).get(f, {}).get("accuracy") or 0.0)
        ax.set_xticklabels(fillers, fontsize=7, rotation=20)
        ax.set_ylim(0, 1.05)
        ax.set_title("accuracy per filler", fontsize=9)
        ax.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=2, frameon=False)
    fig.suptitle(f"pass-key retrieval: {passkey['trials']} trials per cell, seed {passkey['seed']}", fontsize=10)
    path = save_figure(fig, path, dpi=110, bbox_inches="tight")
    logger.info("wrote %s", path)
    return path


def write_passkey_report(passkey: dict, png_path: os.PathLike) -> Tuple[Path, Path]:
    """The heat map at ``png_path`` and the pass-key result as JSON beside it (same name, ``.json``);
    returns both paths."""
    png = plot_passkey_heatmap(passkey, png_path)
    js = png.with_suffix(".json")
    write_json(passkey, js)
    return png, js
