"""Timing and command-line helpers shared by the benchmarks.

**Medians of interleaved repeats.** The machines are shared, so a slow spell would bias whichever
model ran during it; running the models side by side in every repeat, in a rotating order, keeps the
*ratios* robust when absolute times drift. Peak memory: :mod:`bsbr.memory`.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import math
import os
import platform
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

from .. import __version__, arguments
from ..errors import UserError, check_not_interrupted
from ..outputs import check_output_files
from .defaults import DEFAULT_THREADS
from ..memory import is_oom, memory_method, proc_field

VOCAB = 256  # the LM shells of bench models and bench quality read bytes


# ----------------------------------------------------------------------------------------- timing
def time_call(fn: Callable[[], object], device: str = "cpu") -> float:
    """Wall time of one call in seconds (synchronising the GPU around it; the output is freed after)."""
    check_not_interrupted()  # (a Ctrl-C a library swallowed: every benchmark's timings pass here)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize(device)  # the benchmarked device (cuda:N), not the current one
    t0 = time.perf_counter()
    out = fn()  # noqa: F841 - kept until the clock stops: freeing it is not part of the call
    if cuda:
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def own_rng(fn):
    """``fn``, which seeds torch's generators (its weights and inputs repeat from its ``seed``), with the
    caller's generators given back after it: a program calling a benchmark keeps its own random stream."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        # every GPU's generator too (torch.manual_seed seeds them all), named: fork_rng() warns with several
        with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if torch.cuda.is_available() else []):
            return fn(*args, **kwargs)
    return wrapper


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))  # no values: statistics.StatisticsError, a ValueError


def interleaved_times(fns: Dict[str, Callable[[], object]], repeats: int, warmup: int = 1,
                      device: str = "cpu") -> Dict[str, List[float]]:
    """Time several callables side by side: ``warmup`` untimed calls each, then ``repeats`` rounds,
    each round calling every callable once in a rotating order. Returns name -> seconds per round.

    Rotation means no model always runs first (after the allocator was just trimmed) or last."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    names = list(fns)
    if not names:  # (nothing could be timed at this length)
        return {}
    for name in names:
        for _ in range(warmup):
            time_call(fns[name], device)
    times: Dict[str, List[float]] = {name: [] for name in names}
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            times[name].append(time_call(fns[name], device))
    return times


def _version_of(package: str) -> Optional[str]:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info(device: str = "cpu") -> Dict[str, object]:
    """What the numbers were measured on (recorded next to them)."""
    info = {
        "device": device,
        "cpu": proc_field("/proc/cpuinfo", "model name") or platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "bsbr": __version__,
        "torch": torch.__version__,
        "transformers": _version_of("transformers"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "memory_method": memory_method(device),
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def check_unique(args, names: Sequence[str]) -> None:
    """Refuse a list option among ``names`` that names one value twice (:func:`bsbr.arguments.check_unique`)."""
    for name in names:
        arguments.check_unique(f"--{name.replace('_', '-')}", getattr(args, name))


def given(args, names: Sequence[str]) -> Optional[str]:
    """The first of the options ``names`` given on the command line, as ``--flag`` (such options default
    to None, a flag to False, and get their default only after the checks), or None when none is."""
    for name in names:
        v = getattr(args, name)
        if v is not None and v is not False:
            return f"--{name.replace('_', '-')}"
    return None


def set_threads(args) -> None:
    """Run the benchmark on ``--threads`` torch threads (default :data:`DEFAULT_THREADS`)."""
    torch.set_num_threads(args.threads or DEFAULT_THREADS)


@contextlib.contextmanager
def torch_threads(n: int):
    """Run the block on ``n`` torch threads, then put the count back."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def check_device(device: str) -> None:
    """Refuse a ``--device`` the benchmarks cannot run on: ``cpu``, or ``cuda``/``cuda:N`` where CUDA has it."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda") or (dev.type == "cpu" and dev.index not in (None, 0)):
        raise UserError(f"--device {device}: not a device the benchmark runs on; give cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {device} but CUDA is not available here: give --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                            f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")


def check_head_size(hidden: int, heads: int) -> None:
    """Refuse, before the models are built, a ``--hidden``/``--heads`` pair whose head size is not a whole
    even number (the shells' rotary positions rotate pairs of a head's dimensions)."""
    if hidden % heads:
        raise UserError(f"--hidden ({hidden}) must be divisible by --heads ({heads})")
    if (hidden // heads) % 2:
        raise UserError(f"--hidden ({hidden}) / --heads ({heads}) gives a head size of {hidden // heads}, which must "
                        f"be even (rotary positions): give another --hidden or --heads")


def check_outputs(args, inputs: Sequence = ()) -> None:
    """Refuse, before the benchmark runs, a ``--json``/``--plot`` that may not be written
    (:func:`bsbr.outputs.check_output_files`); ``inputs``: ``(label, path)`` pairs the command reads."""
    check_output_files([("--json", args.json), ("--plot", args.plot)], inputs=inputs, plots=("--plot",))


def write_outputs(result: Dict[str, object], args, plot: Callable) -> None:
    """Write ``result`` to ``args.json`` and ``plot(result, args.plot)`` where given, as one set
    (:func:`bsbr.outputs.write_together`: a plot that fails leaves no new JSON either), saying so."""
    from ..outputs import write_together
    from ..results import write_json

    files = [(args.json, lambda p: write_json(result, p))] if args.json else []
    files += [(args.plot, lambda p: plot(result, p))] if args.plot else []
    write_together(files, figures=[args.plot])
    for path, _ in files:
        print(f"wrote {path}")


def check_measured(rows: Sequence[Dict[str, object]]) -> None:
    """Refuse (:class:`UserError`: exit 2, nothing written) a run none of whose ``rows`` was measured: every
    model ran out of memory or was skipped at every length; a row that failed otherwise is a RuntimeError."""
    if rows and not any(r.get("status") == "ok" for r in rows):
        first = next((r for r in rows if r.get("status") == "failed" and not r.get("oom")), None)
        first = first or next((r for r in rows if r.get("reason")), rows[0])
        where = f"{first['model']} @ {first['seq_len']}" if "model" in first else f"@ {first['seq_len']}"
        said = f"nothing was measured: every row failed or was skipped ({where}: {first.get('reason')})"
        if first.get("status") == "failed" and not first.get("oom"):  # (not the lengths: a fault, exit 1)
            raise RuntimeError(said)
        raise UserError(f"{said}: give shorter --seq-lens")


def forward_fn(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    def fn():
        with torch.no_grad():
            return model(x)
    return fn


# ------------------------------------------------------------------------------------------- rows
def new_row(model: str, n: int) -> Dict[str, object]:
    return {"model": model, "seq_len": n, "status": "ok", "time_ms": None, "peak_mb": None}


def failure(exc: BaseException) -> Dict[str, object]:
    """What a row records for a call that raised: its first line, and whether it ran out of memory."""
    lines = str(exc).splitlines()
    return {"status": "failed", "reason": f"{type(exc).__name__}: {lines[0] if lines else ''}"[:200],
            "oom": is_oom(exc)}


def round_sig(x: Optional[float], digits: int = 4) -> Optional[float]:
    """Round to significant digits for readable JSON (None and 0 pass through)."""
    if x is None or x == 0 or not math.isfinite(x):
        return x
    return round(x, digits - 1 - int(math.floor(math.log10(abs(x)))))
