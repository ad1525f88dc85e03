"""``bsbr bench attention``: speed and memory of BSBR attention against standard attention.

Three measurements, all forward only (``torch.no_grad``), batch 1, eval mode, dropout 0:

1. **Layer vs layer** (:mod:`bsbr.bench.layers`): the BSBR layer against the SDPA baseline with the
   same projections, and optionally the ``bsbr==0.1.1`` layer from its wheel (``--earlier-wheel``).
2. **Core vs matmul FLOPs** (:mod:`bsbr.bench.core`, unless ``--skip-core``): the op alone, its
   achieved GFLOP/s next to a dense matmul measured in the same run.
3. **Model scaling** (:mod:`bsbr.bench.scaling`, ``--model-scaling``): a 2-layer ``BSBRModel`` at
   8k to 64k tokens; its rows also give the whole process's peak RSS (``process_peak_mb``).

``peak_mb`` is the extra peak RSS of one call in MiB (see :mod:`bsbr.memory`).
"""
from __future__ import annotations

import argparse
from typing import Dict, Sequence


from ..errors import UserError
from .common import (check_device, check_head_size, check_measured, check_outputs, check_unique, given,
                     machine_info, set_threads, write_outputs)
from .core import bench_core
from .earlier import check_wheel
from .defaults import DEFAULT_MODEL_SEQ_LENS, DEFAULT_SEQ_LENS
from .layers import TARGET_SHAPE, bench_attention
from .plots import plot_rows
from .scaling import TARGET_MODEL_SHAPE, bench_model_scaling


def format_table(rows: Sequence[Dict[str, object]]) -> str:
    """Rows as a text table: one line per length, time and memory per model."""
    models = list(dict.fromkeys(r["model"] for r in rows))
    by = {(r["model"], r["seq_len"]): r for r in rows}
    head = f"{'tokens':>8} " + " ".join(f"{m + ' ms':>14} {m + ' MiB':>14}" for m in models)
    lines = [head, "-" * len(head)]
    for n in sorted({r["seq_len"] for r in rows}):
        cells = []
        for m in models:
            r = by.get((m, n))
            if r is None or r["status"] != "ok":
                cells.append(f"{'-' if r is None else r['status']:>14} {'':>14}")
            else:
                peak = float("nan") if r["peak_mb"] is None else r["peak_mb"]
                cells.append(f"{r['time_ms']:>14.1f} {peak:>14.1f}")
        lines.append(f"{n:>8} " + " ".join(cells))
    return "\n".join(lines)


def _validate(args: argparse.Namespace, hidden: int, heads: int) -> None:
    check_unique(args, ("seq_lens",))
    if args.model_scaling and (flag := given(args, ("warmup", "max_standard_len", "earlier_wheel", "max_earlier_len",
                                                    "max_seconds", "skip_core"))):
        raise UserError(f"{flag} is not used with --model-scaling (it times one BSBRModel, no baseline): "
                        f"drop {flag}, or --model-scaling")
    if not args.model_scaling and (flag := given(args, ("layers", "ff_dim", "vocab"))):
        raise UserError(f"{flag} applies to --model-scaling only: give --model-scaling, or drop {flag}")
    if args.max_earlier_len is not None and not args.earlier_wheel:
        raise UserError("--max-earlier-len applies to --earlier-wheel only: give --earlier-wheel WHL, "
                        "or drop --max-earlier-len")
    if args.model_scaling:  # a BSBRModel: rotary positions, so an even head size
        check_head_size(hidden, heads)
    elif hidden % heads:
        raise ValueError(f"--hidden ({hidden}) must be divisible by --heads ({heads})")
    if args.earlier_wheel is not None:
        check_wheel(args.earlier_wheel)
    check_device(args.device)
    check_outputs(args, inputs=[("--earlier-wheel", args.earlier_wheel)])


def run_attention(args: argparse.Namespace) -> int:
    # --hidden, --heads and --seq-lens default by mode
    hidden = args.hidden or (256 if args.model_scaling else 512)
    heads = args.heads or (4 if args.model_scaling else 8)
    seq_lens = args.seq_lens or (DEFAULT_MODEL_SEQ_LENS if args.model_scaling else DEFAULT_SEQ_LENS)
    _validate(args, hidden, heads)
    set_threads(args)
    shared = dict(chunk_size=args.chunk_size, repeats=args.repeats, retrieval=args.retrieval,
                  retrieval_blocks=args.retrieval_blocks, seed=args.seed, device=args.device)
    layers = args.layers or 2  # the defaults of the options of one mode (None: not given, see _validate)
    warmup = 1 if args.warmup is None else args.warmup
    if args.model_scaling:
        result = bench_model_scaling(seq_lens, hidden=hidden, heads=heads, ff_dim=args.ff_dim or 1024,
                                     num_layers=layers, vocab_size=args.vocab or 1000, **shared)
    else:
        result = bench_attention(seq_lens, hidden=hidden, heads=heads, warmup=warmup,
                                 max_standard_len=args.max_standard_len, earlier_wheel=args.earlier_wheel,
                                 max_earlier_len=args.max_earlier_len, max_seconds=args.max_seconds or 30.0, **shared)
        if not args.skip_core:
            result["core"] = bench_core(seq_lens, heads=heads, head_dim=hidden // heads, warmup=warmup, **shared)
    result["machine"] = machine_info(args.device)
    threads = result["machine"]["torch_threads"]
    print(format_table(result["rows"]))
    if args.model_scaling:
        for r in result["rows"]:
            if r["status"] == "ok":
                print(f"  {r['seq_len']:>6} tokens: process peak RSS {r['process_peak_mb']:.0f} MiB")
            else:
                print(f"  {r['seq_len']:>6} tokens: {r['status']}: {r.get('reason')}")
        print(f"t(longest)/t(shortest) = {result['ratios']['time_ratio_longest_shortest']} "
              f"(linear: {result['ratios']['linear_would_be']:g})")
        title = f"{layers}-layer BSBRModel forward (hidden {hidden}, chunk {args.chunk_size}, {threads} threads)"
    else:
        for r in result["rows"]:
            if r["status"] != "ok":
                print(f"  {r['model']} @ {r['seq_len']}: {r['status']}: {r.get('reason')}")
        for r in result["ratios"]:
            print(f"  {r['baseline']}/bsbr @ {r['seq_len']:>6}: time x{r['time_ratio']}, extra memory x{r['memory_ratio']}")
        title = (f"attention forward, hidden {hidden}, {heads} heads, chunk {args.chunk_size} "
                 f"({threads} threads, {args.device})")
    shape = ", ".join(f"{k} {v}" for k, v in (TARGET_MODEL_SHAPE if args.model_scaling else TARGET_SHAPE).items())
    for t in result["targets"]:
        unjudged = "not measured" if t["value"] is None else f"not judged (set for {shape})"
        met = {True: "MET", False: "NOT MET", None: unjudged}[t["met"]]
        print(f"  {t['target']}: " + (met if t["value"] is None else f"{t['value']} -> {met}"))
    if "core" in result:
        core = result["core"]
        print(f"core op vs dense matmul ({core['matmul_gflops_per_s']} GFLOP/s at {core['matmul_size']}^2):")
        print(f"{'tokens':>8} {'ms':>10} {'GFLOP':>10} {'GFLOP/s':>10} {'of matmul':>10}")
        for r in core["rows"]:
            print(f"{r['seq_len']:>8} {r['time_ms']:>10.2f} {r['gflop']:>10.3f} {r['gflops_per_s']:>10.1f} "
                  f"{r['fraction_of_matmul']:>10.1%}")
    if not result.get("core", {}).get("rows"):  # (the core op's rows, where timed, are a measurement)
        check_measured(result["rows"])
    write_outputs(result, args, lambda r, path: plot_rows(r["rows"], path, title))
    return 0
