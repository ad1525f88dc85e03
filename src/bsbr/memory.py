"""Peak memory and memory limits of the benchmarks.

On CPU the peak of a call is its extra peak RSS. ``tracemalloc`` does not see torch's allocations and
``ru_maxrss`` cannot be reset, so we use the kernel's high-water mark: after ``gc`` and
``malloc_trim(0)`` (so the call cannot reuse pages an earlier call freed and look free), writing ``5``
to ``/proc/self/clear_refs`` resets ``VmHWM`` to ``VmRSS``; ``VmHWM - VmRSS_before`` then counts every
page the call held at its peak, output included, exactly. Where ``clear_refs`` cannot be written,
``/proc/self/statm`` is sampled every millisecond (shorter peaks can be missed); without ``/proc`` the
peak is unknown. On CUDA the allocator's peak counter is used.
"""
from __future__ import annotations

import ctypes
import gc
import os
import threading
from dataclasses import dataclass
from typing import Callable, Optional

import torch

MiB = float(2**20)
MEMORY_FRACTION = 0.7  # never try a call predicted to need more than this share of MemAvailable
_PAGE = os.sysconf("SC_PAGE_SIZE")
_STATUS = "/proc/self/status"


def proc_field(path: str, key: str) -> Optional[str]:
    """The value of field ``key`` of a /proc file ("VmRSS" of /proc/self/status, "model name" of
    /proc/cpuinfo, ...), or None where there is no such file or field."""
    try:
        with open(path) as f:
            for line in f:
                name, _, value = line.partition(":")
                if name.strip() == key:
                    return value.strip()
    except OSError:
        pass
    return None


def _proc_bytes(path: str, key: str) -> Optional[int]:
    """A ``kB`` field of a /proc file (VmRSS, VmHWM; MemAvailable of /proc/meminfo) in bytes, or None."""
    value = proc_field(path, key)
    return None if value is None else int(value.split()[0]) * 1024


def _statm_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def _reset_hwm() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0). False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


try:
    _LIBC = ctypes.CDLL("libc.so.6")
except OSError:  # not glibc: no malloc_trim
    _LIBC = None


def release_free_memory() -> None:
    """Collect garbage and return the C allocator's cached free pages to the OS, so the next
    measurement starts from memory actually in use."""
    gc.collect()
    if _LIBC:
        _LIBC.malloc_trim(0)


def memory_method(device: str = "cpu") -> str:
    """Which way :func:`measure_peak` measures on this machine (recorded in the JSON)."""
    if device.startswith("cuda"):
        return "cuda-max-memory-allocated"
    if _reset_hwm():
        return "linux-vmhwm-reset"
    if _proc_bytes(_STATUS, "VmRSS") is not None:
        return "statm-sampling-1ms"
    return "unavailable"


def memory_refusal(need_bytes: Optional[float]) -> Optional[str]:
    """Why a call predicted to need ``need_bytes`` must not run (None: it fits, or nothing is known).
    Linux over-commits and kills rather than raises, so a call that may not fit in ``MemAvailable``
    (what this process may still allocate without swapping) must not be tried."""
    avail = _proc_bytes("/proc/meminfo", "MemAvailable")
    if need_bytes is None or avail is None or need_bytes <= MEMORY_FRACTION * avail:
        return None
    return (f"would need ~{need_bytes / 2**30:.1f} GiB, more than {MEMORY_FRACTION:.0%} of the "
            f"{avail / 2**30:.1f} GiB available")


class _Sampler(threading.Thread):
    """Fallback: samples RSS every millisecond and keeps the maximum."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.done = _statm_rss(), threading.Event()  # not self._stop: threading.Thread's own method

    def run(self):
        while not self.done.wait(1e-3):
            self.peak = max(self.peak, _statm_rss())

    def stop(self) -> int:
        self.done.set()
        self.join()
        self.peak = max(self.peak, _statm_rss())
        return self.peak


def _mb(n: Optional[int]) -> Optional[float]:
    return None if n is None else n / MiB


@dataclass
class PeakMemory:
    """Result of :func:`measure_peak`: extra bytes over the start, and the absolute peak."""

    extra_bytes: Optional[int]
    peak_bytes: Optional[int]
    method: str

    extra_mb = property(lambda self: _mb(self.extra_bytes))
    peak_mb = property(lambda self: _mb(self.peak_bytes))


def measure_peak(fn: Callable[[], object], device: str = "cpu") -> PeakMemory:
    """Run ``fn()`` once and return its extra peak memory (see the module docstring for how).
    The result of ``fn`` is dropped only after the peak is read, so the output counts."""
    if device.startswith("cuda"):  # the counters of the benchmarked device (cuda:N), not the current one
        torch.cuda.synchronize(device)
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        out = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        del out
        return PeakMemory(peak - before, peak, "cuda-max-memory-allocated")
    release_free_memory()
    method = memory_method(device)  # "linux-vmhwm-reset": VmHWM was just reset to VmRSS
    if method == "unavailable":
        fn()
        return PeakMemory(None, None, method)
    if method == "linux-vmhwm-reset":
        before = _proc_bytes(_STATUS, "VmRSS")
        out = fn()
        peak = _proc_bytes(_STATUS, "VmHWM")
    else:
        sampler = _Sampler()
        before = _statm_rss()
        sampler.start()
        try:
            out = fn()
        finally:
            peak = sampler.stop()
    del out
    return PeakMemory(max(0, peak - before), peak, method)


def is_oom(exc: BaseException) -> bool:
    """True for an allocation failure torch raised (CPU or CUDA), as opposed to a bug."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    msg = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(s in msg for s in ("out of memory", "can't allocate memory",
                                                                    "not enough memory"))
