"""Figures for an evaluation result (matplotlib without pyplot: no display needed, the program's backend
untouched): perplexity per position bucket with pass-key bars (``--plot``), and the pass-key heat map."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

from ..results import save_figure, subplots
from .passkey import MODEL_ORDER, accuracy_grid, model_order
from .report import percent

logger = logging.getLogger(__name__)

COLOURS = {"source": "tab:green", "local": "tab:red", "window": "tab:orange", "bsbr": "tab:blue"}
LABELS = {"source": "source (full attention)", "local": "chunk-local baseline",
          "window": "BSBR's exact window alone", "bsbr": "BSBR"}


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
    fig, axes = subplots(1, ncols, figsize=(6.5 * ncols, 4.5), squeeze=False)
    ax = axes[0, 0]
    lm = result["language_modeling"]
    x = [(b["start"] + b["end"]) / 2 for b in lm["buckets"]]
    for name in (n for n in MODEL_ORDER if n in lm["perplexity"]):
        ax.plot(x, [b["perplexity"][name] for b in lm["buckets"]], marker="o", color=COLOURS[name],
                label=f"{LABELS[name]}: {lm['perplexity'][name]:.3g}",
                linestyle="--" if name in ("local", "window") else "-")
    ax.set(xlabel="token position in window (bucket centre)", ylabel="perplexity")
    ax.set_title(f"perplexity past the first chunk (B={result['config']['chunk_size']}), gap closed "
                 f"{percent(lm.get('gap_closed'), 1, 'n/a')}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)

    if passkey:
        ax = axes[0, 1]
        names = model_order(passkey)
        grids = {n: accuracy_grid(passkey, n) for n in names}
        cells = [(i, j) for i in range(len(passkey["lengths"])) for j in range(len(passkey["depths"]))]
        grouped_bars(ax, names, cells, lambda name, c: grids[name][c[0]][c[1]] or 0.0)
        ax.set_xticklabels([f"{L}\n{d:g}" for L in passkey["lengths"] for d in passkey["depths"]], fontsize=8)
        ax.set(xlabel="prompt length / key depth", ylabel="accuracy", ylim=(0, 1.05))
        ax.set_title(f"pass-key retrieval ({passkey['trials']} trials per cell)", fontsize=9)
        ax.legend(fontsize=8)
    path = save_figure(fig, path)
    logger.debug("wrote %s", path)
    return path


# the title a heat map written as PNG carries in its metadata: how a rerun knows the file beside --plot or
# --json is one it may replace (a PNG of the user's is refused, not replaced)
HEATMAP_TITLE = "bsbr eval: pass-key heat map"


def png_title(path: Path) -> Optional[str]:
    """The title the PNG at ``path`` carries ("" for none; :func:`plot_passkey_heatmap` writes
    ``HEATMAP_TITLE``), or None when it is no PNG."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.text.get("Title", "") if image.format == "PNG" else None
    except (OSError, UnidentifiedImageError, ValueError):
        return None


def plot_passkey_heatmap(passkey: dict, path: os.PathLike) -> Path:
    """Write the heat maps of a :func:`~bsbr.evaluate.passkey.run_passkey` result to ``path``: one panel
    per model (rows = prompt length, columns = key depth, colour and number = accuracy), and a last one
    with each model's accuracy per filler. Returns the path."""
    import numpy as np

    names = model_order(passkey)
    fillers = [f["name"] for f in passkey.get("fillers", [])]
    n_panels = len(names) + (1 if fillers else 0)
    lengths, depths = passkey["lengths"], passkey["depths"]
    size = (n_panels * (0.7 * len(depths) + 2.2) + 0.6, 0.45 * len(lengths) + 2.0)
    fig, axes = subplots(1, n_panels, figsize=size, squeeze=False, layout="constrained")
    image = None
    for ax, name in zip(axes[0], names):
        grid = np.array(accuracy_grid(passkey, name), dtype=float)  # None (no trials) becomes NaN
        image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
        for (i, j), a in np.ndenumerate(grid):
            if not np.isnan(a):
                ax.text(j, i, f"{a:.2f}", ha="center", va="center", fontsize=8,
                        color="black" if 0.25 < a < 0.85 else "white")
        ax.set_xticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=8)
        ax.set_yticks(range(len(lengths)), [str(L) for L in lengths], fontsize=8)
        ax.set(xlabel="key depth", ylabel="length (tokens)")
        ax.set_title(f"{LABELS.get(name, name)}\naccuracy {passkey['models'][name]['accuracy']:.2f}", fontsize=9)
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
    png = Path(path).suffix.lower() == ".png"
    path = save_figure(fig, path, dpi=110, bbox_inches="tight", metadata={"Title": HEATMAP_TITLE} if png else None)
    logger.debug("wrote %s", path)
    return path

