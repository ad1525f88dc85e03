"""Layer against layer, forward only at each length: :class:`~bsbr.layers.BSBRAttention`, the SDPA
baseline :class:`~bsbr.layers.standard_attention.StandardAttention` (same projections) and optionally
the ``bsbr==0.1.1`` layer (:mod:`bsbr.bench.earlier`), timed side by side. A quadratic baseline skips,
with the reason recorded, a length that ``max_standard_len`` / ``max_earlier_len`` exclude or where
its time or memory extrapolated from the previous length (or, for a first length past
:data:`CALIBRATION_LEN`, from one call at that length) would pass ``max_seconds`` or 70% of the available
memory (Linux kills rather than raises on over-commit); an out-of-memory error is recorded.
"""
from __future__ import annotations

import logging
import os
from typing import Callable, Dict, List, Optional, Sequence

import torch

from .common import failure, forward_fn, interleaved_times, median, new_row, own_rng, round_sig, time_call
from .defaults import CALIBRATION_LEN, DEFAULT_SEQ_LENS
from ..memory import MiB, measure_peak, memory_refusal, release_free_memory
from .earlier import earlier_bytes_estimate, load_earlier_bsbr

log = logging.getLogger(__name__)


def _skip_reason(name: str, n: int, last: Optional[Dict[str, object]], *, max_len: Optional[int],
                 max_seconds: float, heads: int, chunk_size: int, device: str) -> Optional[str]:
    """Why a quadratic baseline must not be run at ``n`` tokens (None: run it)."""
    if max_len is not None and n > max_len:
        return f"seq_len > --max-{name}-len {max_len}"
    scale = (n / last["seq_len"]) ** 2 if last else None
    if last and last["time_ms"] and last["time_ms"] / 1e3 * scale > max_seconds:
        return (f"predicted {last['time_ms'] / 1e3 * scale:.3g} s per call (quadratic from "
                f"{last['seq_len']} tokens) > --max-seconds {max_seconds:g}")
    if device != "cpu":
        return None
    need = earlier_bytes_estimate(n, heads, chunk_size) if name == "earlier" else 0
    if last and last["peak_mb"]:
        need = max(need, last["peak_mb"] * MiB * scale)
    return memory_refusal(need)


def calibrate(fn: Callable[[], object], device: str = "cpu") -> Optional[Dict[str, object]]:
    """Time and extra memory of one call of ``fn`` (a call at :data:`CALIBRATION_LEN` tokens; after a
    warm-up call), as a row a prediction starts from; None if it fails (the length is then tried as given)."""
    try:
        time_call(fn, device)
        return dict(seq_len=CALIBRATION_LEN, time_ms=time_call(fn, device) * 1e3,
                    peak_mb=measure_peak(fn, device).extra_mb)
    except Exception:  # noqa: BLE001 - no prediction: the benchmark records what the real call does
        return None


def _calibration(model, hidden: int, device: str) -> Optional[Dict[str, object]]:
    """:func:`calibrate` a layer's forward at :data:`CALIBRATION_LEN` tokens, as a row :func:`_skip_reason`
    predicts from."""
    return calibrate(forward_fn(model, torch.randn(1, CALIBRATION_LEN, hidden, device=device)), device)


@own_rng
def bench_attention(seq_lens: Sequence[int] = DEFAULT_SEQ_LENS, hidden: int = 512, heads: int = 8,
                    chunk_size: int = 128, repeats: int = 5, warmup: int = 1, retrieval: str = "additive",
                    retrieval_blocks: int = 0, max_standard_len: Optional[int] = None,
                    earlier_wheel: Optional[str] = None, max_earlier_len: Optional[int] = None,
                    max_seconds: float = 30.0, seed: int = 0, device: str = "cpu") -> Dict[str, object]:
    """Forward time and extra peak memory of the BSBR layer vs standard (and the bsbr 0.1.1) layer.

    Returns ``{"rows": [...], "ratios": [...], "config": ..., "targets": ...}``; each row has
    ``model, seq_len, status ("ok" | "skipped" | "failed"), time_ms (median), peak_mb, times_ms``
    and a ``reason`` when not ok. Ratios are baseline / BSBR at the same length (> 1: BSBR better).
    """
    from ..layers.bsbr_attention import BSBRAttention
    from ..layers.standard_attention import StandardAttention

    earlier = load_earlier_bsbr(earlier_wheel) if earlier_wheel else None
    torch.manual_seed(seed)  # the layers compared: seeded weights, dropout 0, eval mode
    models = {"bsbr": BSBRAttention(hidden, heads, chunk_size, dropout=0.0, retrieval=retrieval,
                                    retrieval_blocks=retrieval_blocks),
              "standard": StandardAttention(hidden, heads, dropout=0.0)}
    if earlier:
        models["earlier"] = earlier.BSBRAttention(hidden, heads, chunk_size, 0.0, None)
    models = {k: m.to(device).eval() for k, m in models.items()}
    max_len = {"standard": max_standard_len, "earlier": max_earlier_len}
    rows: List[Dict[str, object]] = []
    last_ok: Dict[str, Dict[str, object]] = {}
    warmed = set()  # models called once already: a model's first call is untimed, whatever --warmup
    for n in seq_lens:
        x = torch.randn(1, n, hidden, device=device)
        fns: Dict[str, Callable[[], object]] = {}
        row_of: Dict[str, Dict[str, object]] = {}
        for name, model in models.items():
            row = new_row(name, n)
            rows.append(row)
            if name != "bsbr" and name not in last_ok and CALIBRATION_LEN < n <= (max_len[name] or n):
                # a first length past it, within the model's --max-*-len: predicted from a call at CALIBRATION_LEN
                last_ok[name] = _calibration(model, hidden, device)
            reason = None if name == "bsbr" else _skip_reason(
                name, n, last_ok.get(name), max_len=max_len[name], max_seconds=max_seconds,
                heads=heads, chunk_size=chunk_size, device=device)
            if reason:
                row.update(status="skipped", reason=reason)
                log.info("%s @ %d: skipped (%s)", name, n, reason)
                continue
            fn = forward_fn(model, x)
            try:  # warm-up first (one-time allocations of kernels, thread pools), then memory; at a model's
                for _ in range(warmup or int(name not in warmed)):  # first length at least one call, so that
                    time_call(fn, device)  # the process's one-time allocations are not charged to its memory
                warmed.add(name)
                row["peak_mb"] = round_sig(measure_peak(fn, device).extra_mb)
            except Exception as e:  # noqa: BLE001 - recorded, the benchmark goes on
                row.update(failure(e))
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
            for name, fn in fns.items():
                try:
                    times.update(interleaved_times({name: fn}, repeats, 0, device))
                except Exception as e2:  # noqa: BLE001
                    row_of[name].update(failure(e2))
        for name, ts in times.items():
            row_of[name].update(time_ms=round_sig(median(ts) * 1e3), times_ms=[round_sig(t * 1e3) for t in ts])
            last_ok[name] = row_of[name]
            log.info("%s @ %d: %.1f ms, +%s MiB", name, n, median(ts) * 1e3, row_of[name]["peak_mb"])
        del x, fns
        release_free_memory()
    config = dict(seq_lens=list(seq_lens), hidden=hidden, heads=heads, chunk_size=chunk_size,
                  repeats=repeats, warmup=warmup, retrieval=retrieval, retrieval_blocks=retrieval_blocks, batch=1,
                  dtype="float32", max_standard_len=max_standard_len, max_earlier_len=max_earlier_len,
                  max_seconds=max_seconds, earlier_wheel=os.path.basename(earlier_wheel) if earlier_wheel else None,
                  seed=seed)
    ratios = attention_ratios(rows)
    return {"benchmark": "attention", "config": config, "rows": rows, "ratios": ratios,
            "targets": attention_targets(ratios, config)}


def attention_ratios(rows: Sequence[Dict[str, object]]) -> List[Dict[str, object]]:
    """baseline / BSBR time and extra-memory ratios at each length both ran (> 1: BSBR better)."""
    ok = {(r["model"], r["seq_len"]): r for r in rows if r["status"] == "ok" and r["time_ms"]}
    out = []
    for (model, n), r in sorted(ok.items()):
        b = ok.get(("bsbr", n))
        if model == "bsbr" or b is None:
            continue
        mem = round_sig(r["peak_mb"] / b["peak_mb"]) if r["peak_mb"] is not None and b["peak_mb"] else None
        out.append({"baseline": model, "seq_len": n, "time_ratio": round_sig(r["time_ms"] / b["time_ms"]),
                    "memory_ratio": mem})
    return out


TARGET_SHAPE = dict(hidden=512, heads=8, chunk_size=128, retrieval="additive", retrieval_blocks=0)


def attention_targets(ratios: Sequence[Dict[str, object]], config: Dict[str, object]) -> List[Dict[str, object]]:
    """The speed and memory targets, each with the measured value and whether it is met (None: not
    measured, or measured at a shape other than :data:`TARGET_SHAPE`, the one they were set for)."""
    at = {(r["baseline"], r["seq_len"]): r for r in ratios}
    judged = all(config[k] == v for k, v in TARGET_SHAPE.items())

    def check(name, baseline, n, key, goal):
        r = at.get((baseline, n))
        value = None if r is None else r[key]
        return {"target": name, "value": value, "goal": goal,
                "met": None if value is None or not judged else value >= goal}

    return [
        check("standard/bsbr time at 16384 >= 5", "standard", 16384, "time_ratio", 5.0),
        check("standard/bsbr time at 1024 >= 1 (not slower)", "standard", 1024, "time_ratio", 1.0),
        check("earlier/bsbr time at 4096 >= 20", "earlier", 4096, "time_ratio", 20.0),
        check("earlier/bsbr extra memory at 4096 >= 10", "earlier", 4096, "memory_ratio", 10.0),
    ]
