"""``bsbr bench models``: every attention in the same :class:`~bsbr.models.shell.AttentionLM` shell
(default 2 layers, hidden 256, 4 heads, ff 1024, byte vocabulary, chunk/window 128), from 1k to 64k
tokens: forward time, forward+backward ("train") time, extra peak memory of each, parameter count,
and the fitted scaling exponent (slope of log time vs log n).

Measured with :mod:`bsbr.bench.common` and :mod:`bsbr.memory`: batch 1, float32, eval mode,
dropout 0, forward under ``torch.no_grad``; the train step is the forward, a next-token cross-entropy and ``backward()``. At
each length a model's first call measures its extra peak RSS and is its warm-up, then ``--repeats``
interleaved rounds give the medians. A model stops growing when its next call is predicted (from its
own slope, at least linear, quadratic until two points exist; a first length past
:data:`~bsbr.bench.layers.CALIBRATION_LEN` from calls at half that length and at it: its own slope) to pass ``--max-seconds`` or 70% of the
available memory. Train steps are capped the same way on their own and also stop once the model's
measuring time passes ``--model-budget``, so a row may have a forward time but no train time; the
reason is recorded in the row.
"""
from __future__ import annotations

import logging
import math
import statistics
import time
import argparse
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..errors import UserError
from .common import (VOCAB, check_head_size, check_measured, check_outputs,
                     check_unique, failure, forward_fn, interleaved_times, machine_info, median, own_rng, round_sig,
                     set_threads, write_outputs)
from .defaults import CALIBRATION_LEN, DEFAULT_SEQ_LENS, DEFAULT_SHELL_MODELS as DEFAULT_MODELS
from .layers import calibrate
from ..memory import MiB, is_oom, measure_peak, memory_refusal, release_free_memory
from .plots import plot_models

log = logging.getLogger(__name__)


def model_specs(chunk_size: int = 128) -> Dict[str, Tuple[str, dict]]:
    """Benchmarked models: name -> (attention of the shell, its kwargs). ``chunk_size`` is BSBR's chunk and
    the sliding window (equal, so the window baseline is BSBR without retrieval)."""
    return {
        "standard": ("standard", {}),
        "bsbr": ("bsbr", {"chunk_size": chunk_size}),
        "bsbr_normalized": ("bsbr", {"chunk_size": chunk_size, "retrieval": "normalized", "feature_map": "hedgehog"}),
        "bsbr_blocks4": ("bsbr", {"chunk_size": chunk_size, "retrieval_blocks": 4}),
        "sliding_window": ("sliding_window", {"window_size": chunk_size}),
        "linear": ("linear", {"chunk_size": chunk_size}),
        "deltanet": ("deltanet", {"chunk_size": 64}),
        "hopfield": ("hopfield", {"num_steps": 2}),
        "gau": ("gau", {"query_key_dim": 128}),
    }


def _train_fn(model, ids) -> Callable[[], None]:
    @torch.enable_grad()  # (whatever the caller's grad mode)
    def fn():
        logits = model(ids)
        loss = F.cross_entropy(logits[0, :-1], ids[0, 1:])
        loss.backward()
        model.zero_grad(set_to_none=True)
    return fn


def fit_exponent(points: Sequence[Tuple[int, float]], min_len: int = 4096) -> Optional[Dict[str, object]]:
    """Least-squares slope of log(time) vs log(n): over lengths >= ``min_len`` when at least two
    exist there (short lengths are dominated by fixed overheads), else over all points."""
    pts = sorted((n, t) for n, t in points if t and t > 0)
    use = [p for p in pts if p[0] >= min_len]
    if len(use) < 2:
        use = pts
    if len(use) < 2:
        return None
    slope = statistics.linear_regression([math.log(n) for n, _ in use], [math.log(t) for _, t in use]).slope
    return {"exponent": round(slope, 3), "from": use[0][0], "to": use[-1][0], "points": len(use)}


def _predict(history: List[Tuple[int, float]], n: int) -> Optional[float]:
    """Extrapolated value at n from the last points of a history (n_i, value_i)."""
    if not history:
        return None
    n1, v1 = history[-1]
    slope = 2.0
    if len(history) >= 2:
        n0, v0 = history[-2]
        if v0 > 0 and v1 > 0 and n1 > n0:
            slope = min(2.2, max(1.0, math.log(v1 / v0) / math.log(n1 / n0)))
    return v1 * (n / n1) ** slope


def _calibrate(history: Dict[str, list], kind: str, fns: Dict[int, Callable[[], object]]) -> None:
    """Start a model's empty ``kind`` ("fwd" or "train") time and memory histories with a call of each
    ``fns[n]`` (a call at n tokens: half :data:`~bsbr.bench.layers.CALIBRATION_LEN` and all of it, so that the
    prediction follows the model's own slope, not the quadratic one a single point assumes;
    :func:`~bsbr.bench.layers.calibrate`; a failed call adds nothing)."""
    for n, fn in sorted(fns.items()):
        row = calibrate(fn)
        if row is not None:
            history[kind].append((n, row["time_ms"] / 1e3))
            history[kind + "_mem"].append((n, row["peak_mb"] or 0.0))


def _skip(kind: str, n: int, times: List[Tuple[int, float]], peaks: List[Tuple[int, float]],
          spent: float, max_seconds: float, budget: Optional[float]) -> Optional[str]:
    """Why a call must not run (None: run it). ``budget`` (train steps only) caps a model's total time."""
    if budget is not None and spent > budget:
        return f"{kind}: model's measuring time {spent:.0f} s passed --model-budget {budget:g} s"
    t = _predict(times, n)
    if t is not None and t > max_seconds:
        return f"{kind} predicted {t:.3g} s per call > --max-seconds {max_seconds:g}"
    m = _predict(peaks, n)
    reason = memory_refusal(None if m is None else m * MiB)
    return reason and f"{kind} {reason}"


@own_rng
@torch.inference_mode(False)  # (its models train: built as normal tensors whatever the caller's mode)
def bench_models(seq_lens: Sequence[int] = DEFAULT_SEQ_LENS, models: Sequence[str] = DEFAULT_MODELS, *,
                 hidden: int = 256, layers: int = 2, heads: int = 4, ff_dim: int = 1024, chunk_size: int = 128,
                 repeats: int = 3, max_seconds: float = 15.0, model_budget: float = 90.0, train: bool = True,
                 seed: int = 0) -> Dict[str, object]:
    """Measure every model at every length it fits (see the module docstring). Returns
    ``{"benchmark": "models", "config", "machine", "rows", "exponents", "ratios", "targets"}``."""
    from ..models.shell import AttentionLM

    specs = model_specs(chunk_size)
    unknown = [m for m in models if m not in specs]
    if unknown:
        raise ValueError(f"--models: unknown {unknown}; choose from {sorted(specs)}")
    built = {}
    for m in models:
        attention, kw = specs[m]
        torch.manual_seed(seed)
        built[m] = AttentionLM(VOCAB, hidden, layers, heads, attention=attention, ff_dim=ff_dim, **kw).eval()
    params = {m: mod.num_parameters() for m, mod in built.items()}
    hist = {m: {"fwd": [], "train": [], "fwd_mem": [], "train_mem": []} for m in models}
    spent = {m: 0.0 for m in models}
    stopped: Dict[str, str] = {}
    rows: List[Dict[str, object]] = []
    # one untimed call each first (and a train step, when measured): the process's one-time allocations (thread
    # pools, kernel set-up, autograd's) would be charged to whichever model is measured first; at most
    # CALIBRATION_LEN tokens, a length no prediction guards
    warm = torch.randint(0, VOCAB, (1, min([*seq_lens, CALIBRATION_LEN])), generator=torch.Generator().manual_seed(seed))
    for m in models:
        forward_fn(built[m], warm)()
        if train:
            _train_fn(built[m], warm)()
    calibration_ids = {n: torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))
                       for n in (CALIBRATION_LEN // 2, CALIBRATION_LEN)}
    for n in seq_lens:
        ids = torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed + n))
        fns_of: Dict[str, Dict[str, Callable]] = {"fwd": {}, "train": {}}  # kind -> model -> call
        row_of: Dict[str, Dict[str, object]] = {}
        for m in models:
            row = {"model": m, "seq_len": n, "time_ms": None, "train_time_ms": None, "peak_mb": None,
                   "train_peak_mb": None, "params": params[m], "status": "ok", "reason": None}
            rows.append(row)
            h = hist[m]
            first = not h["fwd"]  # a first length past CALIBRATION_LEN: predicted from calls there
            if first and m not in stopped and n > CALIBRATION_LEN:
                _calibrate(h, "fwd", {c: forward_fn(built[m], x) for c, x in calibration_ids.items()})
            reason = stopped.get(m) or _skip("forward", n, h["fwd"], h["fwd_mem"], spent[m], max_seconds, None)
            if reason:
                stopped[m] = reason
                row.update(status="skipped", reason=reason)
                log.info("%s @ %d: skipped (%s)", m, n, reason)
                continue
            row_of[m] = row
            kinds = [("fwd", forward_fn(built[m], ids), "peak_mb")]
            if train:
                if first and n > CALIBRATION_LEN:
                    _calibrate(h, "train", {c: _train_fn(built[m], x) for c, x in calibration_ids.items()})
                tr = _skip("train", n, h["train"], h["train_mem"], spent[m], max_seconds, model_budget)
                if tr:
                    row["reason"] = tr
                else:
                    kinds.append(("train", _train_fn(built[m], ids), "train_peak_mb"))
            for kind, fn, key in kinds:
                t0 = time.perf_counter()
                try:  # the first call: extra peak memory, and the warm-up
                    row[key] = round_sig(measure_peak(fn).extra_mb)
                except Exception as e:  # noqa: BLE001 - recorded, the benchmark goes on
                    row.update(status="failed" if kind == "fwd" else row["status"],
                               reason=f"{kind}: {failure(e)['reason']}", oom=is_oom(e))
                    if kind == "fwd" or not is_oom(e):
                        stopped[m] = row["reason"]
                    release_free_memory()
                    break
                spent[m] += time.perf_counter() - t0
                h[kind + "_mem"].append((n, row[key] or 0.0))
                fns_of[kind][m] = fn
        for kind, fns in fns_of.items():
            if not fns:
                continue
            t0 = time.perf_counter()
            times = interleaved_times(fns, repeats, warmup=0)
            per_model = (time.perf_counter() - t0) / len(fns)  # roughly: the models ran in rotation
            for m, ts in times.items():
                ms = median(ts) * 1e3
                row_of[m]["time_ms" if kind == "fwd" else "train_time_ms"] = round_sig(ms)
                hist[m][kind].append((n, ms / 1e3))
                spent[m] += sum(ts) if sum(ts) > 0 else per_model
        for m, row in row_of.items():
            said = [f"{kind} {row[t]} ms (+{row[p]} MiB)" if row[t] is not None else row["reason"] if (
                        row["reason"] or "").startswith(kind) else f"{kind} not run"
                    for kind, t, p in (("fwd", "time_ms", "peak_mb"), ("train", "train_time_ms", "train_peak_mb"))]
            log.info("%s @ %d: %s", m, n, ", ".join(said))
        del ids, fns_of
        release_free_memory()

    exponents = {m: {kind: fit_exponent([(r["seq_len"], r[key]) for r in rows if r["model"] == m])
                     for kind, key in (("forward", "time_ms"), ("train", "train_time_ms"))} for m in models}
    ratios = speed_ratios(rows)
    config = dict(seq_lens=list(seq_lens), models=list(models), hidden=hidden, layers=layers, heads=heads,
                  ff_dim=ff_dim, chunk_size=chunk_size, vocab=VOCAB, repeats=repeats, max_seconds=max_seconds,
                  train=train, model_budget=model_budget if train else None, batch=1, dtype="float32", seed=seed,
                  specs={m: specs[m] for m in models})
    return {"benchmark": "models", "config": config, "machine": machine_info(), "rows": rows,
            "exponents": exponents, "ratios": ratios, "targets": check_targets(ratios, config)}


def speed_ratios(rows: Sequence[Dict[str, object]]) -> List[Dict[str, object]]:
    """Forward and train time of standard attention divided by each other model's, per length (> 1: faster)."""
    by = {(r["model"], r["seq_len"]): r for r in rows}
    out = []
    for r in rows:
        b = by.get(("standard", r["seq_len"]))
        if r["model"] == "standard" or b is None:
            continue
        out.append({"model": r["model"], "seq_len": r["seq_len"], "forward_speedup": _ratio(b["time_ms"], r["time_ms"]),
                    "train_speedup": _ratio(b["train_time_ms"], r["train_time_ms"])})
    return out


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return round_sig(a / b) if a and b else None


TARGET_SHAPE = dict(hidden=256, layers=2, heads=4, ff_dim=1024, chunk_size=128)  # the shell the targets were set for


def check_targets(ratios: Sequence[Dict[str, object]], config: Dict[str, object]) -> List[Dict[str, object]]:
    """The speed targets: BSBR forward faster than standard from 4k tokens on, >= 5x at 16k; each with what
    was measured and whether it is met (None: not measured, or measured with a shell other than
    :data:`TARGET_SHAPE`, the one they were set for)."""
    bs = {r["seq_len"]: r["forward_speedup"] for r in ratios if r["model"] == "bsbr"}
    from_4k = {n: s for n, s in bs.items() if n >= 4096 and s is not None}
    judged = all(config[k] == v for k, v in TARGET_SHAPE.items())
    return [
        {"target": "bsbr forward faster than standard at every length >= 4096", "measured": from_4k,
         "met": all(s > 1.0 for s in from_4k.values()) if from_4k and judged else None},
        {"target": "bsbr forward >= 5x faster than standard at 16384", "measured": bs.get(16384),
         "met": None if bs.get(16384) is None or not judged else bs[16384] >= 5.0},
    ]


# ------------------------------------------------------------------------------- output
def _f(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.1f}"


def format_table(result: Dict[str, object]) -> str:
    lines = [f"{'model':<16}{'tokens':>8}{'fwd ms':>11}{'train ms':>11}{'fwd MiB':>10}{'train MiB':>11}{'params':>10}  note"]
    for r in result["rows"]:
        lines.append(f"{r['model']:<16}{r['seq_len']:>8}{_f(r['time_ms']):>11}{_f(r['train_time_ms']):>11}"
                     f"{_f(r['peak_mb']):>10}{_f(r['train_peak_mb']):>11}{r['params']:>10}  {r['reason'] or ''}")
    lines += ["", "scaling exponents (slope of log time vs log n): " + ", ".join(
        f"{m} fwd {e['forward']['exponent'] if e['forward'] else '-'} / train {e['train']['exponent'] if e['train'] else '-'}"
        for m, e in result["exponents"].items())]
    shape = ", ".join(f"{k} {v}" for k, v in TARGET_SHAPE.items())
    for t in result["targets"]:
        measured = t["measured"]
        if isinstance(measured, dict):  # (a ratio per length)
            measured = ", ".join(f"{n}: {x}" for n, x in measured.items())
        said = "not measured" if t["measured"] in (None, {}) else f"measured {measured} -> " + (
            f"met={t['met']}" if t["met"] is not None else f"not judged (set for {shape})")
        lines.append(f"target: {t['target']}: {said}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------- CLI
def run_models(args: argparse.Namespace) -> int:
    check_unique(args, ("seq_lens", "models"))
    if args.no_train and args.model_budget is not None:
        raise UserError("--model-budget caps the train steps, which --no-train skips: drop one of them")
    seq_lens = args.seq_lens or list(DEFAULT_SEQ_LENS)
    check_head_size(args.hidden, args.heads)  # (before the models are built, with the flags' names)
    check_outputs(args)
    set_threads(args)
    result = bench_models(seq_lens, args.models or DEFAULT_MODELS, hidden=args.hidden, layers=args.layers,
                          heads=args.heads, ff_dim=args.ff_dim, chunk_size=args.chunk_size, repeats=args.repeats,
                          max_seconds=args.max_seconds, model_budget=args.model_budget or 90.0,
                          train=not args.no_train, seed=args.seed)
    print(format_table(result))
    check_measured(result["rows"])
    write_outputs(result, args, plot_models)
    return 0
