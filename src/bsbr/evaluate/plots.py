"""Figures for an evaluation result (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

import logging
import os
from pathlib import Path

from ..results import pyplot, save_figure
from .passkey import MODEL_ORDER, accuracy_grid, model_order

logger = logging.getLogger(__name__)

COLOURS = {"source": "tab:green", "local": "tab:red", "window": "tab:orange", "bsbr": "tab:blue"}
LABELS = {"source": "source (full attention)", "local": "chunk-local baseline",
          "window": "source in BSBR's exact window", "bsbr": "BSBR"}


def grouped_bars(ax, names, groups, value) -> None:
    """Bars of ``value(name, group)``: one group of bars per group, one bar per model name, side by side."""
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        ax.bar([j + (i - (len(names) - 1) / 2) * width for j in range(len(groups))],
               [value(name, g) for g in groups], width, color=COLOURS.get(name), label=LABELS.get(name, name))
    ax.set_xticks(range(len(groups)))


def plot_results(result: dict, path: os.PathLike) -> Path:
    """Left: perplexity per position bucket for each model (where retrieval should pay off: the
    later buckets). Right (if the result has a pass-key section): accuracy per (length, depth) cell
    as grouped bars. Returns the written path."""
    passkey = result.get("passkey")
    ncols = 2 if passkey else 1
    fig, axes = pyplot().subplots(1, ncols, figsize=(6.5 * ncols, 4.5), squeeze=False)
    ax = axes[0, 0]
    lm = result["language_modeling"]
    buckets = lm["buckets"]
    x = [(b["start"] + b["end"]) / 2 for b in buckets]
    for name in MODEL_ORDER:
        if name not in lm["perplexity"]:
            continue
        y = [b["perplexity"][name] for b in buckets]
        ax.plot(x, y, marker="o", color=COLOURS[name], label=f"{LABELS[name]}: {lm['perplexity'][name]:.3g}",
                linestyle="--" if name in ("local", "window") else "-")
    ax.set_xlabel("token position in window (bucket centre)")
    ax.set_ylabel("perplexity")
    gap = lm.get("gap_closed")
    gap_text = "n/a" if gap is None else f"{100 * gap:.1f}%"
    ax.set_title(f"perplexity past the first chunk (B={result['config']['chunk_size']}), gap closed {gap_text}")
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)

    if passkey:
        ax = axes[0, 1]
        names = model_order(passkey)
        grids = {n: accuracy_grid(passkey, n) for n in names}
        cells = [(i, j) for i in range(len(passkey["lengths"])) for j in range(len(passkey["depths"]))]
        grouped_bars(ax, names, cells, lambda name, c: grids[name][c[0]][c[1]] or 0.0)
        ax.set_xticklabels([f"{L}\n{d:g}" for L in passkey["lengths"] for d in passkey["depths"]], fontsize=8)
        ax.set_xlabel("prompt length / key depth")
        ax.set_ylabel("accuracy")
        ax.set_ylim(0, 1.05)
        ax.set_title(f"pass-key retrieval ({passkey['trials']} trials per cell)", fontsize=9)
        ax.legend(fontsize=8)
    path = save_figure(fig, path)
    logger.info("wrote %s", path)
    return path
