"""The benchmarks' figures: time and memory against length (log-log), loss by position."""
from __future__ import annotations

from typing import Dict, Sequence

from ..results import save_figure, subplots


def _loglog(axes, rows: Sequence[Dict[str, object]], panels, label=None, legend_fontsize=None) -> None:
    """One log-log panel over sequence length per ``(row key, y label)`` of ``panels``: a line per model
    through its ok rows' values, named ``label(model, key)`` (default: the model)."""
    for model in dict.fromkeys(r["model"] for r in rows):
        ok = sorted((r for r in rows if r["model"] == model and r["status"] == "ok"), key=lambda r: r["seq_len"])
        for ax, (key, _) in zip(axes, panels):
            pts = [(r["seq_len"], r[key]) for r in ok if r[key]]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=label(model, key) if label else model)
    for ax, (_, ylabel) in zip(axes, panels):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length (tokens)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=legend_fontsize)


def plot_rows(rows: Sequence[Dict[str, object]], path: str, title: str) -> None:
    """Log-log time and extra peak memory vs sequence length, one line per model."""
    fig, axes = subplots(1, 2, figsize=(11, 4.2))
    _loglog(axes, rows, (("time_ms", "forward time (ms, median)"), ("peak_mb", "extra peak memory (MiB)")))
    fig.suptitle(title)
    save_figure(fig, path)


def plot_models(result: Dict[str, object], path: str) -> None:
    """Log-log forward time, train time and extra peak memory vs length, one line per model, the
    fitted exponent in the legend."""
    fits = {"time_ms": "forward", "train_time_ms": "train"}

    def label(model, key):
        e = result["exponents"].get(model, {}).get(fits.get(key))
        return f"{model} (n^{e['exponent']:.2f})" if e else model

    panels = [("time_ms", "forward time (ms, median)"), ("train_time_ms", "forward+backward time (ms, median)"),
              ("peak_mb", "forward extra peak memory (MiB)")]
    if not any(r.get("train_time_ms") for r in result["rows"]):  # (--no-train: no panel of nothing)
        del panels[1]
    fig, axes = subplots(1, len(panels), figsize=(16 * len(panels) / 3, 4.8))
    _loglog(axes, result["rows"], panels, label, legend_fontsize=7)
    c = result["config"]
    fig.suptitle(f"AttentionLM shell: {c['layers']} layers, hidden {c['hidden']}, {c['heads']} heads, "
                 f"chunk/window {c['chunk_size']}, batch 1, CPU float32")
    save_figure(fig, path, dpi=110)


def plot_quality(result: Dict[str, object], path: str) -> None:
    """Held-out loss per position bucket, one line per trained model (BSBR variants dashed)."""
    import matplotlib

    fig, ax = subplots(figsize=(9, 5))
    colors = matplotlib.colormaps["tab20"].colors  # 20 distinct colours: the default cycle repeats after 10 models
    for i, r in enumerate(result["results"]):
        keys = list(r["buckets"])
        style = "--" if r["model"].startswith("bsbr") else "-"  # BSBR variants dashed
        ax.plot(range(len(keys)), [r["buckets"][k] for k in keys], marker="o", linestyle=style,
                color=colors[i % len(colors)], label=r["model"])
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels(keys)
    ax.set_xlabel("position in the window (bucket)")
    ax.set_ylabel("held-out loss (nats/byte)")
    c = result["config"]
    ax.set_title(f"equal training ({c['steps']} steps x {c['batch']} x {c['seq_len']} bytes), "
                 f"{c['layers']} layers, hidden {c['hidden']}, chunk/window {c['chunk_size']}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    save_figure(fig, path, dpi=110)


def plot_converted(result: Dict, path, title: str) -> None:
    """Prefill time against length and decode time per token against context, source beside BSBR."""
    fig, axes = subplots(1, 2, figsize=(10, 4))
    rows = sorted(result["prefill"], key=lambda r: r["seq_len"])  # (lines drawn in length order, as given or not)
    for name in ("source", "bsbr"):
        axes[0].loglog([r["seq_len"] for r in rows], [r[f"{name}_ms"] for r in rows], "o-", label=name)
    axes[0].set(xlabel="tokens", ylabel="forward ms (median)", title=f"prefill: {title}")
    axes[0].legend()
    dec = sorted(result["decode"], key=lambda r: r["context"])
    if dec:
        for name in ("source", "bsbr"):
            axes[1].plot([r["context"] for r in dec], [r[f"{name}_ms_per_token"] for r in dec], "o-", label=name)
        axes[1].set(xlabel="context tokens", ylabel="ms per generated token", title="decode")
        axes[1].legend()
    save_figure(fig, path)
