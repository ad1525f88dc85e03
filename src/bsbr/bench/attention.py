"""``bsbr bench attention``: speed and memory of BSBR attention against standard attention.

Three measurements, all forward only (``torch.no_grad``), batch 1, eval mode, dropout 0:

1. **Layer vs layer** (:func:`bench_attention`): :class:`~bsbr.layers.BSBRAttention` and the SDPA
   baseline :class:`~bsbr.layers.standard_attention.StandardAttention` (same projections), plus
   optionally the earlier ``bsbr==0.1.1`` layer loaded from its wheel (``--earlier-wheel``), at each
   sequence length. The models run side by side in every repeat (rotating order) and we report
   medians, so ratios hold even on a shared machine. Baselines are quadratic; a length is skipped,
   with the reason recorded, when ``--max-standard-len`` / ``--max-earlier-len`` exclude it, when
   the time extrapolated from the previous length exceeds ``--max-seconds`` per call, when the memory
   it would need (extrapolated, or for the earlier layer its n x n matrices) exceeds 70% of the
   memory available (Linux kills rather than raises on over-commit, so we must not try), or when torch
   raises out-of-memory.
2. **Core vs matmul FLOPs** (:func:`bench_core`): the op :func:`bsbr.ops.chunk_bsbr_attention`
   alone on random tensors, its matmul FLOPs from the cost model in ``shared/notes/bsbr-math.md``
   (:func:`bsbr_core_flops`), and the achieved GFLOP/s next to a big dense ``torch.matmul`` measured
   in the same run: how close the op is to this machine's limit.
3. **Model scaling** (:func:`bench_model_scaling`, ``--model-scaling``): a 2-layer
   :class:`~bsbr.models.native.BSBRModel` (hidden 256, 4 heads, chunk 128, ff 1024) forward at 8k to
   64k tokens: time, peak RSS, and ``t(64k)/t(8k)`` (linear scaling would give 8).

**Peak memory** is the extra peak resident set size of one call, read from the kernel's high-water
mark after resetting it (``/proc/self/clear_refs``), with the allocator's free cache trimmed first;
see :mod:`bsbr.bench.common`. It counts torch allocations (which ``tracemalloc`` cannot see), all
temporaries and the output. ``peak_mb`` is in MiB. The model-scaling rows also give the whole
process's peak (``process_peak_mb``: Python, torch, weights, input and the call's extra).

The earlier implementation is imported from the wheel's ``bsbr/bsbr.py`` under another module name
(so it cannot clash with this package); its code is neither copied nor kept.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import zipfile
from typing import Callable, Dict, List, Optional, Sequence

import torch

from .common import (
    MiB,
    available_memory_bytes,
    interleaved_times,
    is_oom,
    machine_info,
    matmul_gflops,
    measure_peak,
    median,
    release_free_memory,
    round_sig,
    time_call,
)

log = logging.getLogger(__name__)

DEFAULT_SEQ_LENS = (1024, 2048, 4096, 8192, 16384, 32768, 65536)
DEFAULT_MODEL_SEQ_LENS = (8192, 16384, 32768, 65536)
EARLIER_MODULE_NAME = "bsbr_earlier_0_1_1"
MEMORY_FRACTION = 0.7  # never try a call predicted to need more than this share of MemAvailable

# issue targets, checked and recorded next to the numbers
TARGET_SPEEDUP_16K = 5.0  # BSBR layer >= 5x faster than standard at 16,384 tokens
TARGET_SPEEDUP_1K = 1.0  # ... and not slower at 1,024
TARGET_EARLIER_SPEEDUP = 20.0  # >= 20x faster than the earlier implementation at 4,096 tokens
TARGET_EARLIER_MEMORY = 10.0  # >= 10x less extra memory there
TARGET_MODEL_TIME_RATIO = 10.0  # t(64k) / t(8k) of the 2-layer model
TARGET_MODEL_PEAK_MB = 3 * 1024.0  # process peak RSS at 64k tokens, MiB


# ------------------------------------------------------------------------------- the earlier layer
def load_earlier_bsbr(wheel_path: str):
    """Import ``bsbr/bsbr.py`` of the earlier library's wheel as module ``bsbr_earlier_0_1_1``.

    The wheel is extracted to a temporary directory that is deleted right after the import (the
    module lives on in ``sys.modules``). Importing the file by location, not as ``bsbr``, keeps it
    from shadowing this package; the file needs only torch."""
    if not os.path.isfile(wheel_path):
        raise FileNotFoundError(f"earlier wheel not found: {wheel_path}")
    if EARLIER_MODULE_NAME in sys.modules:
        return sys.modules[EARLIER_MODULE_NAME]
    tmp = tempfile.mkdtemp(prefix="bsbr-earlier-")
    try:
        try:
            with zipfile.ZipFile(wheel_path) as zf:
                zf.extractall(tmp)
        except zipfile.BadZipFile as e:
            raise ValueError(f"{wheel_path} is not a wheel (zip) file: {e}") from e
        src = os.path.join(tmp, "bsbr", "bsbr.py")
        if not os.path.isfile(src):
            raise ValueError(f"{wheel_path} has no bsbr/bsbr.py: not the earlier bsbr wheel")
        spec = importlib.util.spec_from_file_location(EARLIER_MODULE_NAME, src)
        module = importlib.util.module_from_spec(spec)
        sys.modules[EARLIER_MODULE_NAME] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[EARLIER_MODULE_NAME]
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not hasattr(module, "BSBRAttention"):
        del sys.modules[EARLIER_MODULE_NAME]
        raise ValueError(f"{wheel_path}: bsbr/bsbr.py defines no BSBRAttention")
    return module


def earlier_bytes_estimate(n: int, heads: int, chunk_size: int) -> int:
    """Memory the earlier layer needs at ``n`` tokens: it materialises two n x n float masks and,
    per head, the n x n scores, the masked scores, a bool mask and the softmax."""
    n_pad = -(-n // chunk_size) * chunk_size
    return 2 * 4 * n * n + heads * n_pad * n_pad * (3 * 4 + 1)


# ------------------------------------------------------------------------------------ the models
def build_attention_models(hidden: int, heads: int, chunk_size: int, *, retrieval: str = "additive",
                           top_k: Optional[int] = None, earlier_module=None, seed: int = 0,
                           device: str = "cpu") -> Dict[str, torch.nn.Module]:
    """The layers compared, in eval mode with dropout 0 and seeded weights."""
    from ..layers.bsbr_attention import BSBRAttention
    from ..layers.standard_attention import StandardAttention

    torch.manual_seed(seed)
    models = {
        "bsbr": BSBRAttention(hidden, heads, chunk_size, dropout=0.0, retrieval=retrieval, top_k=top_k),
        "standard": StandardAttention(hidden, heads, dropout=0.0),
    }
    if earlier_module is not None:
        models["earlier"] = earlier_module.BSBRAttention(hidden, heads, chunk_size, 0.0, None)
    return {k: m.to(device).eval() for k, m in models.items()}


def _row(model: str, n: int, **extra) -> Dict[str, object]:
    row = {"model": model, "seq_len": n, "status": "ok", "time_ms": None, "peak_mb": None}
    row.update(extra)
    return row


def _skip_reason(name: str, n: int, last: Optional[Dict[str, object]], *, max_len: Optional[int],
                 max_seconds: float, heads: int, chunk_size: int, device: str) -> Optional[str]:
    """Why a quadratic baseline must not be run at ``n`` tokens (None: run it)."""
    if max_len is not None and n > max_len:
        return f"seq_len > --max-{name}-len {max_len}"
    scale = (n / last["seq_len"]) ** 2 if last else None
    if last and last["time_ms"] and last["time_ms"] / 1e3 * scale > max_seconds:
        return (f"predicted {last['time_ms'] / 1e3 * scale:.0f} s per call (quadratic from "
                f"{last['seq_len']} tokens) > --max-seconds {max_seconds:g}")
    if device == "cpu":
        avail = available_memory_bytes()
        need = earlier_bytes_estimate(n, heads, chunk_size) if name == "earlier" else 0
        if last and last["peak_mb"]:
            need = max(need, last["peak_mb"] * MiB * scale)
        if avail is not None and need > MEMORY_FRACTION * avail:
            return (f"would need ~{need / 2**30:.1f} GiB, more than {MEMORY_FRACTION:.0%} of the "
                    f"{avail / 2**30:.1f} GiB available")
    return None


def bench_attention(
    seq_lens: Sequence[int] = DEFAULT_SEQ_LENS,
    hidden: int = 512,
    heads: int = 8,
    chunk_size: int = 128,
    repeats: int = 5,
    warmup: int = 1,
    retrieval: str = "additive",
    top_k: Optional[int] = None,
    max_standard_len: Optional[int] = None,
    earlier_wheel: Optional[str] = None,
    max_earlier_len: Optional[int] = None,
    max_seconds: float = 30.0,
    seed: int = 0,
    device: str = "cpu",
) -> Dict[str, object]:
    """Forward time and extra peak memory of the BSBR layer vs standard (and the earlier) layer.

    Returns ``{"rows": [...], "ratios": [...], "config": ..., "targets": ...}``; each row has
    ``model, seq_len, status ("ok" | "skipped" | "failed"), time_ms (median), peak_mb, times_ms``
    and a ``reason`` when not ok. Ratios are baseline / BSBR at the same length (> 1: BSBR better).
    """
    earlier = load_earlier_bsbr(earlier_wheel) if earlier_wheel else None
    models = build_attention_models(hidden, heads, chunk_size, retrieval=retrieval, top_k=top_k,
                                    earlier_module=earlier, seed=seed, device=device)
    max_len = {"standard": max_standard_len, "earlier": max_earlier_len}
    rows: List[Dict[str, object]] = []
    last_ok: Dict[str, Dict[str, object]] = {}
    for n in seq_lens:
        x = torch.randn(1, n, hidden, device=device)
        fns: Dict[str, Callable[[], object]] = {}
        row_of: Dict[str, Dict[str, object]] = {}
        for name, model in models.items():
            row = _row(name, n)
            rows.append(row)
            reason = None if name == "bsbr" else _skip_reason(
                name, n, last_ok.get(name), max_len=max_len[name], max_seconds=max_seconds,
                heads=heads, chunk_size=chunk_size, device=device)
            if reason:
                row.update(status="skipped", reason=reason)
                log.info("%s @ %d: skipped (%s)", name, n, reason)
                continue
            fn = _forward(model, x)
            try:  # warm-up first (one-time allocations of kernels, thread pools), then memory
                for _ in range(warmup):
                    time_call(fn, device)
                row["peak_mb"] = round_sig(measure_peak(fn, device).extra_mb)
            except Exception as e:  # noqa: BLE001 - recorded, the benchmark goes on
                row.update(status="failed", reason=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}",
                           oom=is_oom(e))
                log.warning("%s @ %d failed: %s", name, n, row["reason"])
                release_free_memory()
                continue
            fns[name] = fn
            row_of[name] = row
        try:
            times = interleaved_times(fns, repeats, warmup=0, device=device)
        except Exception as e:  # noqa: BLE001 - e.g. OOM on a repeat: fall back to one by one
            log.warning("side-by-side timing at %d failed (%s); timing one by one", n, e)
            times = {}
            for name in list(fns):
                try:
                    times.update(interleaved_times({name: fns[name]}, repeats, 0, device))
                except Exception as e2:  # noqa: BLE001
                    row_of[name].update(status="failed", reason=f"{type(e2).__name__}: {e2}"[:200],
                                        oom=is_oom(e2))
        for name, ts in times.items():
            row_of[name]["time_ms"] = round_sig(median(ts) * 1e3)
            row_of[name]["times_ms"] = [round_sig(t * 1e3) for t in ts]
            last_ok[name] = row_of[name]
            log.info("%s @ %d: %.1f ms, +%s MiB", name, n, median(ts) * 1e3, row_of[name]["peak_mb"])
        del x, fns
        release_free_memory()
    config = dict(seq_lens=list(seq_lens), hidden=hidden, heads=heads, chunk_size=chunk_size,
                  repeats=repeats, warmup=warmup, retrieval=retrieval, top_k=top_k, batch=1,
                  dtype="float32", max_standard_len=max_standard_len, max_earlier_len=max_earlier_len,
                  max_seconds=max_seconds, earlier_wheel=os.path.basename(earlier_wheel) if earlier_wheel else None,
                  seed=seed)
    ratios = attention_ratios(rows)
    return {"benchmark": "attention", "config": config, "rows": rows, "ratios": ratios,
            "targets": attention_targets(ratios)}


def _forward(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    def fn():
        with torch.no_grad():
            return model(x)
    return fn


def attention_ratios(rows: Sequence[Dict[str, object]]) -> List[Dict[str, object]]:
    """baseline / BSBR time and extra-memory ratios at each length both ran (> 1: BSBR better)."""
    ok = {(r["model"], r["seq_len"]): r for r in rows if r["status"] == "ok" and r["time_ms"]}
    out = []
    for (model, n), r in sorted(ok.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        b = ok.get(("bsbr", n))
        if model == "bsbr" or b is None:
            continue
        mem = None
        if r["peak_mb"] is not None and b["peak_mb"]:
            mem = round_sig(r["peak_mb"] / b["peak_mb"])
        out.append({"baseline": model, "seq_len": n, "time_ratio": round_sig(r["time_ms"] / b["time_ms"]),
                    "memory_ratio": mem})
    return out


def attention_targets(ratios: Sequence[Dict[str, object]]) -> List[Dict[str, object]]:
    """The issue's targets, each with the measured value and whether it is met (None: not measured)."""
    at = {(r["baseline"], r["seq_len"]): r for r in ratios}

    def check(name, baseline, n, key, goal):
        r = at.get((baseline, n))
        value = None if r is None else r[key]
        return {"target": name, "value": value, "goal": goal, "met": None if value is None else value >= goal}

    return [
        check("standard/bsbr time at 16384 >= 5", "standard", 16384, "time_ratio", TARGET_SPEEDUP_16K),
        check("standard/bsbr time at 1024 >= 1 (not slower)", "standard", 1024, "time_ratio", TARGET_SPEEDUP_1K),
        check("earlier/bsbr time at 4096 >= 20", "earlier", 4096, "time_ratio", TARGET_EARLIER_SPEEDUP),
        check("earlier/bsbr extra memory at 4096 >= 10", "earlier", 4096, "memory_ratio", TARGET_EARLIER_MEMORY),
    ]


# ------------------------------------------------------------------------------- core vs FLOPs
def bsbr_core_flops(n: int, chunk_size: int, heads: int, head_dim: int, batch: int = 1,
                    top_k: Optional[int] = None) -> Dict[str, float]:
    """Matmul FLOPs of :func:`bsbr.ops.chunk_bsbr_attention` (d = dv = df = dm = head_dim), by term.

    A multiply-add counts 2. The within-chunk term counts the causal half of the B x B blocks
    (``q k^T`` and ``p v``: 2 * n*B*d * 2 / 2), the work a causal kernel must do; the op computes
    the retrieval weights and retrieved states as dense C x C products (top-k: C x k)."""
    B, d = chunk_size, head_dim
    n_pad = -(-n // B) * B
    C = n_pad // B
    k_eff = C if top_k is None else min(top_k, C)
    per_head = {
        "within_chunk": 2.0 * n_pad * B * d,
        "chunk_states": 2.0 * n_pad * d * d,
        "retrieval_weights": 2.0 * C * C * d,
        "retrieved_states": 2.0 * C * k_eff * d * d,
        "read_out": 2.0 * n_pad * d * d,
    }
    out = {k: v * heads * batch for k, v in per_head.items()}
    out["total"] = sum(out.values())
    out["standard_causal"] = 2.0 * n * n * d * heads * batch  # full causal softmax attention
    return out


def bench_core(seq_lens: Sequence[int] = DEFAULT_SEQ_LENS, heads: int = 8, head_dim: int = 64,
               chunk_size: int = 128, repeats: int = 5, retrieval: str = "additive",
               top_k: Optional[int] = None, matmul_size: int = 2048, seed: int = 0,
               device: str = "cpu") -> Dict[str, object]:
    """The op alone on random (1, h, n, d) tensors: median time, cost-model FLOPs, achieved GFLOP/s,
    and this machine's dense matmul GFLOP/s measured in the same run (before and after the op runs,
    median of both, because a shared machine's speed drifts)."""
    from ..ops.bsbr import chunk_bsbr_attention

    peak_before = matmul_gflops(matmul_size, repeats, device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    rows = []
    for n in seq_lens:
        q, k, v, mq, mk = (torch.randn(1, heads, n, head_dim, generator=g, device=device) for _ in range(5))
        if retrieval == "normalized":  # needs non-negative features
            fq, fk = torch.nn.functional.elu(q) + 1, torch.nn.functional.elu(k) + 1
        else:
            fq = fk = None

        def fn():
            with torch.no_grad():
                return chunk_bsbr_attention(q, k, v, mq, mk, fq=fq, fk=fk, chunk_size=chunk_size,
                                            variant=retrieval, top_k=top_k)[0]

        t = median(interleaved_times({"op": fn}, repeats, warmup=1, device=device)["op"])
        flops = bsbr_core_flops(n, chunk_size, heads, head_dim, top_k=top_k)
        rows.append({"seq_len": n, "time_ms": round_sig(t * 1e3), "gflop": round_sig(flops["total"] / 1e9),
                     "gflops_per_s": round_sig(flops["total"] / t / 1e9),
                     "flops_by_term": {k: round_sig(v) for k, v in flops.items()}})
        log.info("core @ %d: %.2f ms, %.3f GFLOP, %.1f GFLOP/s", n, t * 1e3, flops["total"] / 1e9,
                 flops["total"] / t / 1e9)
        del q, k, v, mq, mk, fq, fk
    peak_after = matmul_gflops(matmul_size, repeats, device=device)
    peak = median([peak_before, peak_after])
    for r in rows:
        r["fraction_of_matmul"] = round_sig(r["gflops_per_s"] / peak)
    return {"matmul_size": matmul_size, "matmul_gflops_per_s": round_sig(peak),
            "matmul_gflops_per_s_before_after": [round_sig(peak_before), round_sig(peak_after)],
            "heads": heads, "head_dim": head_dim, "chunk_size": chunk_size, "retrieval": retrieval,
            "top_k": top_k, "rows": rows}


# ------------------------------------------------------------------------------- model scaling
def bench_model_scaling(seq_lens: Sequence[int] = DEFAULT_MODEL_SEQ_LENS, hidden: int = 256, heads: int = 4,
                        chunk_size: int = 128, ff_dim: int = 1024, num_layers: int = 2, vocab_size: int = 1000,
                        repeats: int = 3, retrieval: str = "additive", top_k: Optional[int] = None,
                        seed: int = 0, device: str = "cpu") -> Dict[str, object]:
    """A small :class:`BSBRModel` forward at growing lengths: median time, extra peak memory of the
    call and the whole process's peak RSS. Lengths run in turn (one model, nothing to interleave)."""
    from ..models.native import BSBRModel

    torch.manual_seed(seed)
    model = BSBRModel(vocab_size, hidden, num_layers, heads, chunk_size, ff_dim, dropout=0.0,
                      retrieval=retrieval, top_k=top_k).to(device).eval()
    rows = []
    for n in seq_lens:
        ids = torch.randint(0, vocab_size, (1, n), device=device)
        fn = _forward(model, ids)
        row = _row("bsbr_model", n)
        try:
            time_call(fn, device)  # warm-up
            mem = measure_peak(fn, device)
            ts = [time_call(fn, device) for _ in range(repeats)]
        except Exception as e:  # noqa: BLE001 - recorded
            row.update(status="failed", reason=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}", oom=is_oom(e))
            rows.append(row)
            release_free_memory()
            continue
        row.update(time_ms=round_sig(median(ts) * 1e3), times_ms=[round_sig(t * 1e3) for t in ts],
                   peak_mb=round_sig(mem.extra_mb), process_peak_mb=round_sig(mem.peak_mb))
        rows.append(row)
        log.info("model @ %d: %.1f ms, +%s MiB (process peak %s MiB)", n, row["time_ms"], row["peak_mb"],
                 row["process_peak_mb"])
        del ids, fn
        release_free_memory()
    ok = {r["seq_len"]: r for r in rows if r["status"] == "ok"}
    lo, hi = min(seq_lens), max(seq_lens)
    t_ratio = round_sig(ok[hi]["time_ms"] / ok[lo]["time_ms"]) if lo in ok and hi in ok else None
    peak_hi = ok[hi]["process_peak_mb"] if hi in ok else None
    config = dict(seq_lens=list(seq_lens), hidden=hidden, heads=heads, chunk_size=chunk_size, ff_dim=ff_dim,
                  num_layers=num_layers, vocab_size=vocab_size, repeats=repeats, retrieval=retrieval,
                  top_k=top_k, batch=1, dtype="float32", seed=seed)
    targets = [
        {"target": f"t({hi})/t({lo}) <= {TARGET_MODEL_TIME_RATIO:g}", "value": t_ratio,
         "goal": TARGET_MODEL_TIME_RATIO, "met": None if t_ratio is None else t_ratio <= TARGET_MODEL_TIME_RATIO},
        {"target": f"process peak RSS at {hi} < {TARGET_MODEL_PEAK_MB:g} MiB", "value": peak_hi,
         "goal": TARGET_MODEL_PEAK_MB, "met": None if peak_hi is None else peak_hi < TARGET_MODEL_PEAK_MB},
    ]
    return {"benchmark": "model_scaling", "config": config, "rows": rows,
            "ratios": {"time_ratio_longest_shortest": t_ratio, "linear_would_be": hi / lo},
            "targets": targets}


# ------------------------------------------------------------------------------- output
def write_json(result: Dict[str, object], path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")


def plot_rows(rows: Sequence[Dict[str, object]], path: str, title: str) -> None:
    """Log-log time and extra peak memory vs sequence length, one line per model (Agg backend, so
    it works without a display)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    models = list(dict.fromkeys(r["model"] for r in rows))
    for model in models:
        ok = sorted((r for r in rows if r["model"] == model and r["status"] == "ok"), key=lambda r: r["seq_len"])
        for ax, key in zip(axes, ("time_ms", "peak_mb")):
            pts = [(r["seq_len"], r[key]) for r in ok if r[key]]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=model)
    for ax, label in zip(axes, ("forward time (ms, median)", "extra peak memory (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length (tokens)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_table(rows: Sequence[Dict[str, object]]) -> str:
    """Rows as a text table: one line per length, time and memory per model."""
    models = list(dict.fromkeys(r["model"] for r in rows))
    by = {(r["model"], r["seq_len"]): r for r in rows}
    lens = sorted({r["seq_len"] for r in rows})
    head = f"{'tokens':>8} " + " ".join(f"{m + ' ms':>14} {m + ' MiB':>14}" for m in models)
    lines = [head, "-" * len(head)]
    for n in lens:
        cells = []
        for m in models:
            r = by.get((m, n))
            if r is None or r["status"] != "ok":
                tag = "-" if r is None else r["status"]
                cells.append(f"{tag:>14} {'':>14}")
            else:
                cells.append(f"{r['time_ms']:>14.1f} {r['peak_mb'] if r['peak_mb'] is not None else float('nan'):>14.1f}")
        lines.append(f"{n:>8} " + " ".join(cells))
    return "\n".join(lines)


# ------------------------------------------------------------------------------- CLI
def _positive_ints(name: str, values: Sequence[int]) -> List[int]:
    if not values or any(v < 1 for v in values):
        raise ValueError(f"{name} must be positive integers, got {values}")
    return list(values)


def _validate(args: argparse.Namespace) -> None:
    for name in ("hidden", "heads", "chunk_size", "repeats", "layers", "ff_dim", "vocab"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    for name in ("top_k", "max_standard_len", "max_earlier_len"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
    if not args.max_seconds > 0:
        raise ValueError(f"--max-seconds must be > 0, got {args.max_seconds}")
    if args.seq_lens is not None:
        _positive_ints("--seq-lens", args.seq_lens)
    hidden = args.hidden or (256 if args.model_scaling else 512)
    heads = args.heads or (4 if args.model_scaling else 8)
    if hidden % heads:
        raise ValueError(f"--hidden ({hidden}) must be divisible by --heads ({heads})")
    if args.earlier_wheel and not os.path.isfile(args.earlier_wheel):
        raise FileNotFoundError(f"--earlier-wheel: no such file: {args.earlier_wheel}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda but CUDA is not available")


def _print_targets(targets: Sequence[Dict[str, object]]) -> None:
    for t in targets:
        met = {True: "MET", False: "NOT MET", None: "not measured"}[t["met"]]
        print(f"  {t['target']}: {t['value']} -> {met}")


def run_attention(args: argparse.Namespace) -> int:
    """``bsbr bench attention``: run, print tables, write JSON and PNG."""
    _validate(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model_scaling:
        result = bench_model_scaling(
            args.seq_lens or DEFAULT_MODEL_SEQ_LENS, hidden=args.hidden or 256, heads=args.heads or 4,
            chunk_size=args.chunk_size, ff_dim=args.ff_dim, num_layers=args.layers, vocab_size=args.vocab,
            repeats=args.repeats, retrieval=args.retrieval, top_k=args.top_k, seed=args.seed, device=args.device)
        result["machine"] = machine_info(args.device)
        print(format_table(result["rows"]))
        for r in result["rows"]:
            if r["status"] == "ok":
                print(f"  {r['seq_len']:>6} tokens: process peak RSS {r['process_peak_mb']:.0f} MiB")
        print(f"t(longest)/t(shortest) = {result['ratios']['time_ratio_longest_shortest']} "
              f"(linear: {result['ratios']['linear_would_be']:g})")
        _print_targets(result["targets"])
        title = (f"{args.layers}-layer BSBRModel forward (hidden {args.hidden or 256}, chunk {args.chunk_size}, "
                 f"{machine_info(args.device)['torch_threads']} threads)")
    else:
        hidden, heads = args.hidden or 512, args.heads or 8
        seq_lens = args.seq_lens or DEFAULT_SEQ_LENS
        result = bench_attention(
            seq_lens, hidden=hidden, heads=heads, chunk_size=args.chunk_size, repeats=args.repeats,
            warmup=args.warmup, retrieval=args.retrieval, top_k=args.top_k,
            max_standard_len=args.max_standard_len, earlier_wheel=args.earlier_wheel,
            max_earlier_len=args.max_earlier_len, max_seconds=args.max_seconds, seed=args.seed, device=args.device)
        if not args.skip_core:
            result["core"] = bench_core(seq_lens, heads=heads, head_dim=hidden // heads, chunk_size=args.chunk_size,
                                        repeats=args.repeats, retrieval=args.retrieval, top_k=args.top_k,
                                        seed=args.seed, device=args.device)
        result["machine"] = machine_info(args.device)
        print(format_table(result["rows"]))
        for r in result["rows"]:
            if r["status"] != "ok":
                print(f"  {r['model']} @ {r['seq_len']}: {r['status']}: {r.get('reason')}")
        for r in result["ratios"]:
            print(f"  {r['baseline']}/bsbr @ {r['seq_len']:>6}: time x{r['time_ratio']}, extra memory x{r['memory_ratio']}")
        _print_targets(result["targets"])
        if "core" in result:
            core = result["core"]
            print(f"core op vs dense matmul ({core['matmul_gflops_per_s']} GFLOP/s at {core['matmul_size']}^2):")
            print(f"{'tokens':>8} {'ms':>10} {'GFLOP':>10} {'GFLOP/s':>10} {'of matmul':>10}")
            for r in core["rows"]:
                print(f"{r['seq_len']:>8} {r['time_ms']:>10.2f} {r['gflop']:>10.3f} {r['gflops_per_s']:>10.1f} "
                      f"{r['fraction_of_matmul']:>10.1%}")
        title = (f"attention forward, hidden {hidden}, {heads} heads, chunk {args.chunk_size} "
                 f"({result['machine']['torch_threads']} threads, {args.device})")
    if args.json:
        write_json(result, args.json)
        print(f"wrote {args.json}")
    if args.plot:
        plot_rows(result["rows"], args.plot, title)
        print(f"wrote {args.plot}")
    return 0


def register(bench_sub) -> None:
    """Add ``bsbr bench attention`` to the ``bsbr bench`` subparsers."""
    p = bench_sub.add_parser(
        "attention", help="BSBR vs standard (and the earlier) attention: time and peak memory vs length",
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--seq-lens", type=int, nargs="+", default=None,
                   help=f"sequence lengths (default {' '.join(map(str, DEFAULT_SEQ_LENS))}; "
                        f"with --model-scaling {' '.join(map(str, DEFAULT_MODEL_SEQ_LENS))})")
    p.add_argument("--hidden", type=int, default=None, help="hidden size (default 512; model scaling 256)")
    p.add_argument("--heads", type=int, default=None, help="attention heads (default 8; model scaling 4)")
    p.add_argument("--chunk-size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per model and length (median)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per model and length before measuring")
    p.add_argument("--retrieval", choices=("additive", "normalized"), default="additive")
    p.add_argument("--top-k", type=int, default=None, help="retrieve only the k best past chunks")
    p.add_argument("--max-standard-len", type=int, default=None, help="longest length for standard attention")
    p.add_argument("--earlier-wheel", default=None, metavar="WHL",
                   help="the bsbr==0.1.1 wheel: also time its BSBRAttention side by side")
    p.add_argument("--max-earlier-len", type=int, default=None, help="longest length for the earlier layer")
    p.add_argument("--max-seconds", type=float, default=30.0,
                   help="skip a baseline whose call is predicted (quadratically) to take longer")
    p.add_argument("--skip-core", action="store_true", help="skip the op-alone vs matmul FLOPs measurement")
    p.add_argument("--model-scaling", action="store_true",
                   help="instead: a BSBRModel (default 2 layers, hidden 256, 4 heads, ff 1024) at 8k-64k tokens")
    p.add_argument("--layers", type=int, default=2, help="model scaling: layers")
    p.add_argument("--ff-dim", type=int, default=1024, help="model scaling: feed-forward size")
    p.add_argument("--vocab", type=int, default=1000, help="model scaling: vocabulary size")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, metavar="OUT.json", help="write the results here")
    p.add_argument("--plot", default=None, metavar="OUT.png", help="write a log-log plot here")
    p.set_defaults(func=run_attention)
