"""``bsbr bench quality``: which attention uses long context per unit of compute.

Every model is the same :class:`~bsbr.models.shell.AttentionLM` (default 2 layers, hidden 128,
4 heads, ff 512, byte vocabulary) with only the attention swapped, trained for the same steps on the
same batches (same tokens, same order, same seed) with AdamW, then evaluated on held-out text:
mean next-token loss (nats/byte) in position buckets 0-63, 64-127, 128-255, 256-511, ... of each
evaluation window. A model that uses context beyond its local chunk should lose less in the late
buckets than the sliding window whose window equals BSBR's chunk size.

Default corpus: the Python standard library's own ``.py`` sources, read as bytes (nothing is
downloaded and no tokenizer is needed), split into train and held-out files by
:mod:`bsbr.corpus` -- the same split ``bsbr distill`` trains on and ``bsbr eval`` evaluates on.
"""
from __future__ import annotations

import inspect
import json
import logging
import math
import os
import re
import time
from pathlib import Path
import argparse
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..corpus import stdlib_files, stdlib_root
from ..evaluate.metrics import bucket_spans
from ..errors import UserError, absent, check_not_interrupted
from ..ops.checks import is_number
from .common import (VOCAB, check_head_size, check_outputs, check_unique, given,
                     machine_info, own_rng, set_threads, write_outputs)
from .defaults import DEFAULT_QUALITY_MODELS as DEFAULT_MODELS
from .plots import plot_quality

log = logging.getLogger(__name__)


def quality_specs(chunk_size: int = 64) -> Dict[str, Tuple[str, dict]]:
    """Trained models: name -> (attention, kwargs). ``chunk_size`` is BSBR's chunk = the sliding window."""
    return {
        "standard": ("standard", {}),
        "sliding_window": ("sliding_window", {"window_size": chunk_size}),
        "bsbr": ("bsbr", {"chunk_size": chunk_size}),
        "bsbr_normalized": ("bsbr", {"chunk_size": chunk_size, "retrieval": "normalized", "feature_map": "hedgehog"}),
        "bsbr_blocks2": ("bsbr", {"chunk_size": chunk_size, "retrieval_blocks": 2}),
        "bsbr_compressed4": ("bsbr", {"chunk_size": chunk_size, "compression_factor": 4}),
        # retrieval gate per head starting closed: the model starts as chunk-local attention
        "bsbr_gated": ("bsbr", {"chunk_size": chunk_size, "gate_init": 0.0}),
        "bsbr_normalized_gated": ("bsbr", {"chunk_size": chunk_size, "retrieval": "normalized",
                                           "feature_map": "hedgehog", "gate_init": 0.0}),
        "linear": ("linear", {"chunk_size": chunk_size}),
        "deltanet": ("deltanet", {"chunk_size": chunk_size}),
        "hopfield": ("hopfield", {"num_steps": 2}),
        "gau": ("gau", {"query_key_dim": 64}),
        "bsbr_chunk32": ("bsbr", {"chunk_size": 32}),
        "sliding_window_32": ("sliding_window", {"window_size": 32}),
        "bsbr_chunk128": ("bsbr", {"chunk_size": 128}),
        "sliding_window_128": ("sliding_window", {"window_size": 128}),
    }


# ------------------------------------------------------------------------------- data
def load_corpus(root: Optional[str] = None):
    """(train bytes, held-out bytes, file count): the corpus's train and held-out files, each split's
    files joined with a blank line, as long tensors of byte values. A ``root`` (``--corpus``) that is no
    directory, or lacks either split, is a one-line :class:`UserError`."""
    fix = "give a directory of .py files (or leave out --corpus: the standard library)"
    if root is not None and not os.path.isdir(root):
        what = (absent(root) if not os.path.exists(root) else "is a file, not a directory" if os.path.isfile(root)
                else "is not a directory")
        raise UserError(f"--corpus {root} {what}: {fix}")
    split = {s: stdlib_files(s, root=root) for s in ("train", "heldout")}
    if not all(split.values()):
        where = f"--corpus {root}" if root is not None else f"the standard library {stdlib_root()}"
        more = "add .py files to it (each goes to one split by a hash of its path)" if root is not None else fix
        raise UserError(f"{where} has {len(split['train'])} train and {len(split['heldout'])} held-out .py files "
                        f"(split by a hash of each path; test_*.py skipped), need at least one of each: {more}")
    train, heldout = (torch.frombuffer(bytearray(b"".join(p.read_bytes() + b"\n\n" for p in files)),
                                       dtype=torch.uint8).long() for files in split.values())
    return train, heldout, sum(map(len, split.values()))


def windows(data: torch.Tensor, count: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """``count`` random windows of ``length + 1`` bytes (inputs and next-token targets)."""
    starts = torch.randint(0, data.numel() - length - 1, (count,), generator=gen)
    return torch.stack([data[s : s + length + 1] for s in starts.tolist()])


def buckets_for(seq_len: int, first: int = 64) -> List[Tuple[int, int]]:
    """Position buckets [0, first), [first, 2 first), [2 first, 4 first), ... up to seq_len."""
    return [(0, min(first, seq_len))] + bucket_spans(first, seq_len, "doubling")


# ------------------------------------------------------------------------------- train / eval
def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then half a cosine down to 10% of ``lr``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    f = min((step - warmup) / max(1, steps - warmup), 1.0)
    return lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * f)))


@torch.inference_mode(False)  # (it trains whatever the caller's grad mode; its eval runs under no_grad)
@torch.enable_grad()
def train_and_eval(name: str, attention: str, kwargs: dict, train_data: torch.Tensor, eval_batch: torch.Tensor, *,
                   hidden: int, layers: int, heads: int, ff_dim: int, seq_len: int, batch: int, steps: int,
                   lr: float, seed: int, progress: bool = True, past: Sequence[int] = ()) -> Dict[str, object]:
    """Train one model from scratch and return its eval loss per position bucket, and over the positions
    from each of ``past`` on (``loss_past``, what :func:`compare_to_window` compares), and timing."""
    from ..models.shell import AttentionLM
    from ..progress import bar as progress_bar

    torch.manual_seed(seed)
    model = AttentionLM(VOCAB, hidden, layers, heads, attention=attention, ff_dim=ff_dim, **kwargs)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(seed)  # the same batches for every model
    warmup = max(1, steps // 20)
    model.train()
    t0 = time.perf_counter()
    losses = []
    bar = progress_bar(range(steps), desc=f"train {name}", leave=False, disable=not progress)
    for step in bar:
        check_not_interrupted()  # (a Ctrl-C a library swallowed: in a finalizer, Python only prints it)
        xy = windows(train_data, batch, seq_len, gen)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, warmup)
        logits = model(xy[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), xy[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    train_s = time.perf_counter() - t0
    model.eval()
    t0 = time.perf_counter()
    per_pos = torch.zeros(seq_len, dtype=torch.float64)
    with torch.no_grad():
        for xy in eval_batch.split(8):
            logits = model(xy[:, :-1])
            ce = F.cross_entropy(logits.reshape(-1, VOCAB), xy[:, 1:].reshape(-1), reduction="none")
            per_pos += ce.view(xy.shape[0], seq_len).sum(0).double()
    per_pos /= eval_batch.shape[0]
    eval_s = time.perf_counter() - t0
    buckets = {f"{lo}-{hi - 1}": round(per_pos[lo:hi].mean().item(), 4) for lo, hi in buckets_for(seq_len)}
    return {"model": name, "attention": attention, "kwargs": kwargs, "params": model.num_parameters(),
            "train_seconds": round(train_s, 1), "eval_seconds": round(eval_s, 1),
            "final_train_loss": round(sum(losses[-20:]) / len(losses[-20:]), 4),
            "eval_loss": round(per_pos.mean().item(), 4), "buckets": buckets,
            "loss_past": {str(c): round(per_pos[c:].mean().item(), 4) for c in sorted(set(past)) if c < seq_len}}


@own_rng
def run_quality(models: Sequence[str] = DEFAULT_MODELS, *, chunk_size: int = 64, hidden: int = 128, layers: int = 2,
                heads: int = 4, ff_dim: int = 512, seq_len: int = 512, batch: int = 8, steps: int = 300,
                lr: float = 2e-3, eval_windows: int = 64, seed: int = 0, corpus: Optional[str] = None,
                progress: bool = True) -> Dict[str, object]:
    specs = quality_specs(chunk_size)
    unknown = [m for m in models if m not in specs]
    if unknown:
        raise ValueError(f"--models: unknown {unknown}; choose from {sorted(specs)}")
    from ..models.shell import AttentionLM

    for m in models:  # each built once without weights, so that a setting one cannot take stops before any trains
        attention, kw = specs[m]
        try:
            with torch.device("meta"):
                AttentionLM(VOCAB, hidden, layers, heads, attention=attention, ff_dim=ff_dim, **kw)
        except ValueError as e:
            raise UserError(f"--models {m} cannot be built with --hidden {hidden} and --heads {heads} ({e}): give "
                            f"another --hidden or --heads, or drop {m}") from None
    train_data, eval_data, n_files = load_corpus(corpus)
    log.info("corpus: %d files (test suites and site-packages left out), %.1f MB train, %.1f MB held out",
             n_files, train_data.numel() / 1e6, eval_data.numel() / 1e6)
    shortest = min(train_data.numel(), eval_data.numel())
    if seq_len + 1 >= shortest:  # a window is seq_len + 1 bytes, drawn from inside each split
        where = f"--corpus {corpus}" if corpus is not None else "the standard library"
        raise UserError(f"--seq-len {seq_len:,} does not fit {where}: its train and held-out splits hold "
                        f"{train_data.numel():,} and {eval_data.numel():,} bytes; give a --seq-len below "
                        f"{shortest - 1:,} or a larger --corpus")
    eval_batch = windows(eval_data, eval_windows, seq_len, torch.Generator().manual_seed(seed + 1))
    results = []
    for m in models:
        attention, kw = specs[m]
        r = train_and_eval(m, attention, kw, train_data, eval_batch, hidden=hidden, layers=layers, heads=heads,
                           ff_dim=ff_dim, seq_len=seq_len, batch=batch, steps=steps, lr=lr, seed=seed,
                           progress=progress, past=[chunk for _, _, chunk in window_pairs(chunk_size)])
        log.info("%s: eval %.4f nats/byte, buckets %s (%.0f s)", m, r["eval_loss"], r["buckets"], r["train_seconds"])
        if not math.isfinite(r["eval_loss"]):  # a diverged run measures nothing
            raise UserError(f"{m} diverged (held-out loss {r['eval_loss']}): give a smaller --lr")
        results.append(r)
    config = dict(models=list(models), chunk_size=chunk_size, hidden=hidden, layers=layers, heads=heads, ff_dim=ff_dim,
                  seq_len=seq_len, batch=batch, steps=steps, lr=lr, optimizer="AdamW(0.9, 0.95), wd 0.1, clip 1.0, "
                  "warmup 5% + cosine to 10%", tokens_per_model=steps * batch * seq_len, eval_windows=eval_windows,
                  seed=seed, corpus=os.path.realpath(corpus) if corpus else str(stdlib_root()), corpus_files=n_files,
                  train_bytes=train_data.numel(), eval_bytes=eval_data.numel())
    return {"benchmark": "quality", "config": config, "machine": machine_info(), "results": results,
            "comparison": compare_to_window(results, chunk_size, seq_len)}


def window_pairs(chunk_size: int, models: Sequence[str] = ()) -> List[Tuple[str, str, int]]:
    """(BSBR model, sliding-window model, chunk = window) pairs :func:`compare_to_window` compares; ``models``: the
    names of a result's models, whose other BSBR models (a retired one an older result holds, ``bsbr_topk2``)
    read chunks of ``chunk_size`` too."""
    own = {"bsbr_chunk32": 32, "bsbr_chunk128": 128}
    same_block = ["bsbr", "bsbr_normalized", "bsbr_gated", "bsbr_normalized_gated", "bsbr_blocks2", "bsbr_compressed4"]
    same_block += [m for m in models if m.startswith("bsbr") and m not in same_block and m not in own]
    return [(m, "sliding_window", chunk_size) for m in same_block] + [
        (m, f"sliding_window_{chunk}", chunk) for m, chunk in own.items()]


def compare_to_window(results: Sequence[Dict[str, object]], chunk_size: int,
                      seq_len: Optional[int] = None) -> List[Dict[str, object]]:
    """BSBR's loss on positions past the first chunk vs the sliding window with window = chunk size
    (negative difference: BSBR better; ``bsbr_better`` None where a loss is NaN). ``positions_from``: the
    first position compared, the chunk size (for results without ``loss_past``: the
    first bucket starting at or after it). A pair whose chunk is at least ``seq_len`` is left out: both
    models are full attention there, with no position past the chunk to compare."""
    by = {r["model"]: r for r in results}
    out = []
    for a, b, chunk in window_pairs(chunk_size, list(by)):
        if a in by and b in by and (seq_len is None or chunk < seq_len):
            exact = all(str(chunk) in (by[m].get("loss_past") or {}) for m in (a, b))
            (late_a, start), (late_b, _) = (_late_loss(by[m], chunk, exact) for m in (a, b))
            out.append({"bsbr_model": a, "window_model": b, "chunk": chunk, "positions_from": start,
                        "bsbr_loss_past_chunk": late_a, "window_loss_past_chunk": late_b,
                        "difference": round(late_a - late_b, 4),
                        "bsbr_better": None if math.isnan(late_a - late_b) else late_a < late_b})
    return out


def _late_loss(result: Dict[str, object], chunk: int, exact: bool) -> Tuple[float, int]:
    """Mean loss over the positions from ``chunk`` on, and the first position it covers: recorded exactly
    (``loss_past``), or else over the buckets starting at or after ``chunk``, weighted by their width. A
    loss JSON could not hold (None: NaN, the training diverged) gives NaN."""
    if exact:
        v = result["loss_past"][str(chunk)]
        return (float("nan") if v is None else v), chunk
    tot, w, start = 0.0, 0, None
    for key, v in result["buckets"].items():
        lo, hi = (int(x) for x in key.split("-"))
        if lo >= chunk:
            if v is None:
                return float("nan"), lo
            tot, w, start = tot + v * (hi - lo + 1), w + hi - lo + 1, lo if start is None else start
    return (round(tot / w, 4) if w else float("nan")), (chunk if start is None else start)


def format_table(result: Dict[str, object]) -> str:
    keys = list(result["results"][0]["buckets"]) if result["results"] else []
    width = max([20] + [len(r["model"]) + 1 for r in result["results"]])
    cols = {k: max(10, len(k) + 1) for k in keys}  # (16384-32767 and its neighbours ran together at width 10)
    head = f"{'model':<{width}}{'params':>9}{'train s':>9}{'eval':>8}" + "".join(f"{k:>{cols[k]}}" for k in keys)
    lines = [head, "-" * len(head)]
    for r in result["results"]:
        lines.append(f"{r['model']:<{width}}" + _num(r.get("params"), ">9") + _num(r.get("train_seconds"), ">9.0f")
                     + _num(r.get("eval_loss"), ">8.3f")
                     + "".join(_num(r["buckets"].get(k), f">{cols[k]}.3f") for k in keys))
    for c in result["comparison"]:
        lines.append(f"{c['bsbr_model']} vs {c['window_model']} on positions >= {c.get('positions_from', c['chunk'])}: "
                     f"{_num(c['bsbr_loss_past_chunk'], '.4f')} vs {_num(c['window_loss_past_chunk'], '.4f')} "
                     f"({({True: 'BSBR better', False: 'BSBR NOT better'}).get(c['bsbr_better'], 'n/a')}, "
                     f"diff {_num(c['difference'], '+.4f')})")
    return "\n".join(lines)


def _num(x, fmt: str) -> str:
    """``x`` formatted with ``fmt``; None (JSON's null: a NaN loss, or a value the file lacks) and NaN as
    ``n/a``, in ``fmt``'s width."""
    if x is None or x != x:
        return format("n/a", re.match(r"[<>^]?\d*", fmt).group())
    return format(x, fmt)


def _read_result(path: str) -> Dict[str, object]:
    """A ``bsbr bench quality --json`` result, or a :class:`UserError` naming ``path`` and what is wrong."""
    what = "give a file written by `bsbr bench quality --json`"
    if os.path.exists(path) and not os.path.isfile(path):  # a directory, or a FIFO, whose read would block
        raise UserError(f"--merge {path} is not a regular file: {what}")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise UserError(f"--merge {path}: cannot read it ({why}): {what}") from e
    if not text.strip():
        raise UserError(f"--merge {path} is empty: {what}")
    try:
        part = json.loads(text)
    except ValueError as e:
        raise UserError(f"--merge {path} is not valid JSON ({e}): {what}") from e
    if not isinstance(part, dict) or part.get("benchmark") != "quality":
        raise UserError(f"--merge {path} is not a 'bsbr bench quality' result: {what}")
    config, results = part.get("config"), part.get("results")
    if isinstance(config, dict) and "block" in config and "chunk_size" not in config:
        config["chunk_size"] = config.pop("block")  # bsbr 0.2.0 wrote the chunk size as "block"
    ok = isinstance(config, dict) and all(isinstance(config.get(k), int) and not isinstance(config[k], bool) for k in (
        "chunk_size", "steps", "batch", "seq_len", "layers", "hidden")) and isinstance(results, list) and all(
        isinstance(r, dict) and isinstance(r.get("model"), str) and isinstance(r.get("buckets"), dict)
        and all(re.fullmatch(r"\d+-\d+", k) and (v is None or is_number(v)) for k, v in r["buckets"].items())
        and all(r.get(k) is None or is_number(r[k]) for k in ("params", "train_seconds", "eval_loss"))
        and (r.get("loss_past") is None or isinstance(r["loss_past"], dict) and all(
            re.fullmatch(r"\d+", k) and (v is None or is_number(v)) for k, v in r["loss_past"].items()))
        for r in results)
    if not ok:
        raise UserError(f"--merge {path} is a damaged 'bsbr bench quality' result (its config or results are "
                        f"missing or malformed): {what}")
    if not results:  # nothing to merge or to plot
        raise UserError(f"--merge {path} holds no model results: {what} that trained at least one model")
    return part


def merge_results(paths: Sequence[str]) -> Dict[str, object]:
    """One result from several runs of the same configuration (e.g. models split over processes):
    results concatenated, comparisons recomputed. Runs that differ in anything but the models are
    refused, since their losses would not be comparable; so is a file given twice, or a model found
    twice (its rows would count double)."""
    if not paths:  # (the CLI's --merge needs one; the function is public)
        raise UserError("--merge needs at least one JSON file")
    seen = {}
    for path in paths:
        real = os.path.realpath(os.path.expanduser(path))
        if real in seen:
            raise UserError(f"--merge {path} is given twice (also as {seen[real]}): give each result once")
        seen[real] = path
    parts = [_read_result(path) for path in paths]

    def same(c):  # (a corpus by real path: bsbr 0.2.0 recorded it as given, maybe relative to where it ran)
        return {k: os.path.realpath(v) if k == "corpus" and isinstance(v, str) else v for k, v in c.items()
                if k not in ("models", "merged_from")}
    for path, part in zip(paths, parts):
        a, b = same(part["config"]), same(parts[0]["config"])
        if a != b:
            diff = ", ".join(f"{k} {b.get(k)!r} / {a.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))
            raise UserError(f"--merge {path} was run with a different configuration than {paths[0]} ({diff}): "
                            f"merge only runs of the same configuration")
    where: Dict[str, str] = {}
    for path, part in zip(paths, parts):
        for r in part["results"]:
            if r["model"] in where:
                also = "in it twice" if where[r["model"]] == path else f"also in {where[r['model']]}"
                raise UserError(f"--merge {path}: model {r['model']!r} is {also}: its rows would count twice; "
                                f"merge each model's result once")
            where[r["model"]] = path
    results = [r for part in parts for r in part["results"]]
    config = dict(parts[0]["config"], models=[r["model"] for r in results], merged_from=list(paths))
    machines = [part.get("machine") for part in parts]  # one per part, in --merge's order; None: not recorded
    machine = machines[0] if all(m == machines[0] for m in machines) else machines
    return {"benchmark": "quality", "config": config, "machine": machine, "results": results,
            "comparison": compare_to_window(results, config["chunk_size"], config.get("seq_len"))}


# run_quality's options and their defaults: on the command line None is not given (its default), so that
# --merge can refuse them
TRAINING = {name: param.default for name, param in inspect.signature(run_quality).parameters.items()
            if name != "progress"}


def run_quality_cli(args: argparse.Namespace) -> int:
    if args.merge and (flag := given(args, (*TRAINING, "threads"))):
        raise UserError(f"{flag} is not used with --merge (it joins results trained earlier, with their settings): "
                        f"drop {flag}")
    check_unique(args, ("models",))
    if not args.merge:  # (before the models are built, with the flags' names)
        check_head_size(args.hidden or TRAINING["hidden"], args.heads or TRAINING["heads"])
        chunk_size, seq_len = args.chunk_size or TRAINING["chunk_size"], args.seq_len or TRAINING["seq_len"]
        models = args.models or TRAINING["models"]
        for a, b, chunk in window_pairs(chunk_size):  # a compared pair as long as the window is two full attentions
            if a in models and b in models and chunk >= seq_len:
                fix = ("a smaller --chunk-size or a longer --seq-len" if chunk == chunk_size and b == "sliding_window"
                       else f"a --seq-len above {chunk}")
                raise UserError(f"{a} and {b} read chunks of {chunk} tokens, at least --seq-len {seq_len}: both are "
                                f"full attention there, nothing to compare: give {fix}")
    check_outputs(args, inputs=[("--merge input", path) for path in args.merge or ()] +
                  ([("--corpus", args.corpus)] if args.corpus is not None else []))
    if args.merge:
        result = merge_results(args.merge)
    else:
        set_threads(args)
        result = run_quality(**{name: getattr(args, name) for name in TRAINING if getattr(args, name) is not None})
    print(format_table(result))
    write_outputs(result, args, plot_quality)
    return 0
