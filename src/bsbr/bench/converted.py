"""``bsbr bench converted``: a converted BSBR model against its source, side by side in one run.

Forward (prefill) time and extra peak memory (``*_peak_mb``: MiB, as every bench reports it) at several
lengths, keeping the last position's logits only, as ``generate``'s prefill does (``prefill_logits`` in the
JSON's config says which logits were kept), and greedy decode time per token (after
an untimed first step where the context has a token to spare) at several context lengths (source: its HF KV cache; BSBR: its BSBRCache). Ratios
are source time / BSBR time (> 1 means BSBR is faster), medians of interleaved repeats.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Dict, List, Optional, Sequence

import torch

from ..arguments import (check_default_model, check_model_arg, check_positions, load_model_arg, source_label,
                         source_name)
from ..convert.cli import (check_conversion_options, check_local_source,
                           check_position_options, conversion_options, convert_source)
from ..errors import UserError, check_not_interrupted
from .common import (check_outputs, check_unique, interleaved_times, machine_info, median,
                     own_rng, set_threads, write_outputs)
from ..models.heads import output_object
from .defaults import CALIBRATION_LEN
from ..macs import forward_macs
from ..memory import MiB, measure_peak, memory_refusal
from ..numbers import duration
from .plots import plot_converted

logger = logging.getLogger(__name__)


@own_rng
def gpt2_small_random(n_positions: int = 8192):
    """A GPT-2-small-shaped model with random weights (no download), with a position table long
    enough to run the source itself at every benchmarked length."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_positions=n_positions)).eval()


def cache_bytes(cache) -> int:
    """Bytes held by the tensors a cache object reaches (attributes, lists, dicts), each counted once."""
    seen, total, todo = set(), 0, [cache]
    while todo:
        obj = todo.pop()
        if isinstance(obj, torch.Tensor):
            if obj.untyped_storage().data_ptr() not in seen:
                seen.add(obj.untyped_storage().data_ptr())
                total += obj.untyped_storage().nbytes()
        elif isinstance(obj, (list, tuple)):
            todo.extend(obj)
        elif isinstance(obj, dict):
            todo.extend(obj.values())
        elif hasattr(obj, "__dict__") and id(obj) not in seen:
            seen.add(id(obj))
            todo.extend(vars(obj).values())
    return total


def _decode(models: Dict, ids: torch.Tensor, steps: int):
    """Greedy decode after prefilling ``ids`` with the cache on, the models' steps alternating (their
    order flipped every step, so load on a shared machine falls on both alike). The prefill keeps the
    last position's logits only, as ``generate`` does (a 32k prompt's full logits are 6.4 GB per
    SmolLM2 model). The context's last token is fed as an untimed first decode step (the one-token path's
    first call is slower than the next ones), so the timed steps start from the whole context, at the positions
    they would have without it (a one-token context has no token to spare: no warm-up step). Returns per model
    (median ms per generated token, the cache's bytes per context token, the whole context in the cache: at a
    context one past a chunk boundary a prefill of all of it would hold up to one chunk's arrays more)."""
    out, mask, times, per_token = {}, {}, {name: [] for name in models}, {}
    n = ids.shape[1]
    prefill, warm = (ids[:, :-1], ids[:, -1:]) if n > 1 else (ids, None)
    with torch.no_grad():
        for name, model in models.items():
            out[name] = model(prefill, use_cache=True, logits_to_keep=1, **output_object(model))
            mask[name] = torch.ones(1, n, dtype=torch.long)
            if warm is not None:  # the untimed warm-up step
                out[name] = model(warm, cache=out[name].cache, attention_mask=mask[name], use_cache=True,
                                  **output_object(model))
            per_token[name] = cache_bytes(out[name].cache) / n
        names = list(models)
        for i in range(steps):
            check_not_interrupted()  # (a Ctrl-C a library swallowed)
            for name in (names if i % 2 == 0 else names[::-1]):
                tok = out[name].logits[:, -1:].argmax(-1)
                mask[name] = torch.cat([mask[name], mask[name][:, :1]], 1)
                t0 = time.perf_counter()
                out[name] = models[name](tok, cache=out[name].cache, attention_mask=mask[name], use_cache=True,
                                         **output_object(models[name]))
                times[name].append(time.perf_counter() - t0)
    return {name: (1000.0 * median(times[name]), per_token[name]) for name in models}


def refuse_long_runs(source, prefill_lens: Sequence[int], decode_contexts: Sequence[int], max_seconds: float, *,
                     prefill_flag: str = "--seq-lens", budget_flag: Optional[str] = "--max-seconds") -> None:
    """Refuse, before any timed call, a length whose source prefill is predicted to pass ``max_seconds`` (one
    prefill of :data:`~bsbr.bench.layers.CALIBRATION_LEN` tokens, scaled by :func:`~bsbr.macs.forward_macs`) or
    not to fit in memory (that prefill's peak without a cache after a warm-up call, linear in the length; at a
    decode context both models' caches too, BSBR's taken as the source's: 1.0-1.6x it, docs/findings.md): a
    typo's context must not start hours of the source's attention or an out-of-memory kill. Lengths up to the
    calibration's run unchecked. The flags name the lengths (``prefill_flag``, ``--decode-contexts``) and the
    limit (``budget_flag``; None: a fixed limit) in a refusal."""
    asked = [(prefill_flag, n) for n in prefill_lens] + [("--decode-contexts", n) for n in decode_contexts]
    if max((n for _, n in asked), default=0) <= CALIBRATION_LEN:
        return
    ids = torch.zeros(1, CALIBRATION_LEN, dtype=torch.long)
    timed = {}

    def prefill(use_cache):
        t0 = time.perf_counter()
        out = source(ids, use_cache=use_cache, logits_to_keep=1, **output_object(source))
        timed["seconds"] = time.perf_counter() - t0
        return out

    with torch.no_grad():  # the first call warms up (its one-time allocations, scaled by n, doubled the need)
        cache_per_token = cache_bytes(prefill(True).cache) / CALIBRATION_LEN
        peak = (measure_peak(lambda: prefill(False)).extra_mb or 0.0) * MiB  # (as the timed prefills run)
    seconds = timed["seconds"]
    for flag, n in asked:
        if n <= CALIBRATION_LEN:
            continue
        predicted = seconds * forward_macs(source, n, logits=False) / forward_macs(source, CALIBRATION_LEN,
                                                                                   logits=False)
        if predicted > max_seconds:
            limit = f"{budget_flag} {max_seconds:,.10g}" if budget_flag else f"{max_seconds:,.10g} s"
            raise UserError(f"{flag} {n}: the source's prefill is predicted to take {duration(predicted)} "
                            f"(one of {CALIBRATION_LEN} tokens took {duration(seconds)}) > {limit}: give a shorter "
                            "length"
                            + (f", or a larger {budget_flag}" if budget_flag else ""))
        need = peak * n / CALIBRATION_LEN + (2 * cache_per_token * n if flag == "--decode-contexts" else 0)
        reason = memory_refusal(need)
        if reason:
            raise UserError(f"{flag} {n}: the two models {reason}: give a shorter length")


PREFILL_LOGITS = "last position only (logits_to_keep=1, as generate's prefill)"


def bench_converted(source, converted, seq_lens: Sequence[int], repeats: int = 3,
                    decode_contexts: Sequence[int] = (), decode_steps: int = 8, seed: int = 0) -> Dict:
    vocab = converted.config.vocab_size
    g = torch.Generator().manual_seed(seed)
    rows: List[Dict] = []
    models = {"source": source, "bsbr": converted}
    for n in seq_lens:
        ids = torch.randint(0, vocab, (1, n), generator=g)
        # the last position's logits only, as generate's prefill computes them
        fns = {name: (lambda m=m: m(ids, use_cache=False, logits_to_keep=1)) for name, m in models.items()}
        with torch.no_grad():
            times = interleaved_times(fns, repeats=repeats, warmup=1)
            mem = {name: measure_peak(fn) for name, fn in fns.items()}
        row = dict(seq_len=n)
        for name in models:
            row[f"{name}_ms"] = 1000.0 * median(times[name])
            row[f"{name}_peak_mb"] = mem[name].extra_mb
        row["speedup"] = row["source_ms"] / row["bsbr_ms"]
        rows.append(row)
        logger.info("prefill %6d tokens: source %.0f ms, bsbr %.0f ms, speed-up %.2fx", n, row["source_ms"],
                    row["bsbr_ms"], row["speedup"])
    decode = []
    for n in decode_contexts:
        ids = torch.randint(0, vocab, (1, n), generator=g)
        row = dict(context=n, warmup_steps=1 if n > 1 else 0)  # (a one-token context has no token to spare)
        for name, (ms, per_token) in _decode(models, ids, decode_steps).items():
            row[f"{name}_ms_per_token"], row[f"{name}_cache_bytes_per_token"] = ms, per_token
        decode.append(row)
        logger.info("decode at %6d context: source %.1f ms/token, bsbr %.1f ms/token; cache %.0f / %.0f bytes per "
                    "token", n, row["source_ms_per_token"], row["bsbr_ms_per_token"],
                    row["source_cache_bytes_per_token"], row["bsbr_cache_bytes_per_token"])
    config = dict(seq_lens=list(seq_lens), decode_contexts=list(decode_contexts),
                  decode_steps=decode_steps if decode_contexts else None,
                  repeats=repeats, chunk_size=converted.config.chunk_size, seed=seed, prefill_logits=PREFILL_LOGITS)
    return dict(benchmark="converted", config=config, prefill=rows, decode=decode, machine=machine_info())


def speed_lines(result: Dict) -> List[str]:
    """The text table of a result: the thread count (ratios differ with it: docs/findings.md, Speed),
    prefill time and extra memory per length, decode time per token."""
    def mib(x):  # unknown (no way to read memory here): "-", not a measured 0
        return "-" if x is None else f"{x:.0f}"

    logits = result.get("config", {}).get("prefill_logits", "every position (a run before they were recorded)")
    lines = [f"side by side on {result['machine']['torch_threads']} torch thread(s); prefill logits: {logits}",
             f"{'tokens':>8} {'source ms':>10} {'bsbr ms':>10} {'speed-up':>9} {'src MiB':>8} {'bsbr MiB':>8}"]
    lines += [f"{r['seq_len']:>8} {r['source_ms']:>10.0f} {r['bsbr_ms']:>10.0f} {r['speedup']:>8.2f}x "
              f"{mib(r['source_peak_mb']):>8} {mib(r['bsbr_peak_mb']):>8}" for r in result["prefill"]]
    lines += [f"decode at {r['context']:>6} context: source {r['source_ms_per_token']:.1f} ms/token, "
              f"bsbr {r['bsbr_ms_per_token']:.1f} ms/token; cache bytes per context token: source "
              f"{r['source_cache_bytes_per_token']:.0f}, bsbr {r['bsbr_cache_bytes_per_token']:.0f}"
              for r in result["decode"]]
    return lines


def cmd(args) -> int:
    check_unique(args, ("seq_lens", "decode_contexts"))
    if not args.decode_contexts and args.decode_steps is not None:
        raise UserError("--decode-steps applies to --decode-contexts, given none: give --decode-contexts N ..., "
                        "or drop --decode-steps")
    decode_steps = args.decode_steps or 8
    options = conversion_options(args)
    check_conversion_options(options)
    if args.gpt2_small_random and args.source is not None:
        raise UserError(f"SOURCE {args.source} and --gpt2-small-random both name the source: give one of them")
    check_model_arg(args.source, "SOURCE")
    if not args.gpt2_small_random:
        check_default_model(args.source, "SOURCE")
    local = args.source is not None and os.path.exists(os.path.expanduser(args.source))  # not a hub id
    check_outputs(args, inputs=[("SOURCE", args.source)] if local else ())
    if args.gpt2_small_random:
        # positions for every prefill and every decode: the context and --decode-steps
        check_position_options(args, "the --gpt2-small-random source", "learned")  # (before building it)
        source = gpt2_small_random(max([*args.seq_lens, *(n + decode_steps for n in args.decode_contexts)]))
        title = "GPT-2-small shape (random weights)"
    else:
        check_local_source(args, args.source, options)  # (as bsbr convert, before loading)
        source = load_model_arg(args.source, "SOURCE")
        title = source_label(args.source)  # (the bundled model by the name convert records)
        check_positions(source, "SOURCE", [("--seq-lens", n) for n in args.seq_lens] +
                        [("--decode-contexts (plus --decode-steps)", n + decode_steps,
                          lambda table: f"give --decode-contexts at most {table - decode_steps:,}")
                         for n in args.decode_contexts])
    name = ("the --gpt2-small-random source" if args.gpt2_small_random
            else f"SOURCE {args.source or 'the bundled SmolLM2'}")
    set_threads(args)
    refuse_long_runs(source, args.seq_lens, args.decode_contexts, args.max_seconds)  # (before converting)
    converted = convert_source(source, options, name).eval()
    check_position_options(args, name, converted.config.position_type)
    result = bench_converted(source, converted, args.seq_lens, args.repeats, args.decode_contexts, decode_steps)
    result["config"].update(model=source_name(args.source) if local else title, conversion=options)
    print("\n".join(speed_lines(result)))
    write_outputs(result, args, lambda r, path: plot_converted(r, path, title))
    return 0
