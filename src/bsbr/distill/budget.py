"""A training step's time and memory on the run's longest window, predicted before training from one step on
that window's first :data:`CALIBRATION_TOKENS` tokens (or more, :func:`check_step_fits`): a run whose first step
would outlast its time budget or not fit in memory is refused before it starts (one step on an 8,192-token
window of SmolLM2-135M took 12 minutes and 9.1 GB; the teacher's attention grows with the square of the length).
Shorter windows are not predicted. Measured on SmolLM2 (one thread, beside other jobs): 107 s predicted for a
2,048-token step that took 76 s, 6.3 minutes for a 4,096-token one that took 7.2 (/tmp script timing
check_step_fits, then a step); 118 s for a 2,048-token step of every weight that took 124 s (a review's
`bsbr distill --params all`)."""
from __future__ import annotations

import logging
import math
import os
import time
from typing import Callable, Dict, Optional

import torch
import torch.distributed as dist

from ..macs import forward_macs
from ..memory import measure_peak, memory_refusal
from ..numbers import duration

logger = logging.getLogger(__name__)

CALIBRATION_TOKENS = 1024  # windows longer than this are predicted from one step on this many tokens


def step_macs(teacher, student, n: int, recompute: bool) -> int:
    """Multiply-adds of one training step on an ``n``-token window (:func:`~bsbr.macs.forward_macs`, logits at
    every position): the teacher's forward, causal over the whole window, and the student's forward and
    backward, 3 forwards' worth (4 with ``recompute``, activation checkpointing), each token reading the keys
    within its window, blocks, recall slots and sinks."""
    c = student.config
    keys = min(n, c.chunk_size * (c.local_chunks + getattr(c, "retrieval_blocks", 0)) + c.sink_tokens
               + getattr(c, "recall_tokens", 0))
    return forward_macs(teacher, n) + (3 + recompute) * forward_macs(student, n, keys)


def check_step_fits(teacher, student, trained: Dict[str, torch.nn.Parameter], optimizer, window: torch.Tensor, cfg,
                    seconds_left: Optional[float], world: int, step: Callable[[torch.Tensor], object],
                    shortest: int) -> None:
    """Time one ``step`` (forward and backward of the loss) on the first :data:`CALIBRATION_TOKENS` tokens of
    ``window``, or ``shortest`` (the fewest a step learns anything from: with ``params="new"`` a window must
    reach the new pieces, 2,562 tokens on the default conversion, or its loss has no gradient), and scale it to
    the whole window by :func:`step_macs` (its memory linearly, plus the optimizer's moments not allocated yet);
    raise ValueError if the step is predicted to take longer than the ``seconds_left`` of ``cfg.minutes``
    (None: no budget) or to need more memory than this machine has for the processes on it. ``cfg``: the
    :class:`~bsbr.distill.trainer.DistillConfig`. Gradients are left unset and the random state as it was;
    every process of a run (``world``) gets the same answer (the largest prediction)."""
    n, c, recompute = len(window), max(CALIBRATION_TOKENS, shortest), cfg.activation_checkpointing
    if n <= c:
        return
    timed = []

    def calibrate():
        with torch.random.fork_rng(devices=[]), torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            t0 = time.perf_counter()
            step(window[None, :c])
            timed.append(time.perf_counter() - t0)

    peak = measure_peak(calibrate).extra_bytes
    grads = sum(p.grad.numel() * p.grad.element_size() for p in trained.values() if p.grad is not None)
    for p in trained.values():
        p.grad = None
    moments = 0 if optimizer.state else 2 * sum(p.numel() * p.element_size() for p in trained.values())
    seconds = timed[0] * step_macs(teacher, student, n, recompute) / step_macs(teacher, student, c, recompute)
    need = -1.0 if peak is None else max(0, peak - grads) * n / c + grads + moments
    if world > 1:  # (the largest prediction: every process refuses alike)
        both = torch.tensor([seconds, need], dtype=torch.float64)
        dist.all_reduce(both, op=dist.ReduceOp.MAX)
        seconds, need = float(both[0]), float(both[1])
    took = f"one on {c:,} tokens took {duration(timed[0])}"
    logger.info("one training step on %s tokens is predicted to take %s (%s)%s", f"{n:,}", duration(seconds), took,
                "" if need < 0 else f" and to need ~{need / 2**30:.1f} GiB")
    local = os.environ.get("LOCAL_WORLD_SIZE", "")  # (the processes sharing this machine's memory: torchrun's)
    local = int(local) if local.isdigit() and int(local) > 0 else world
    reason = memory_refusal(need * local) if need >= 0 else None
    if reason:
        ways = ([] if recompute else ["drop --no-activation-checkpointing"]) + (
            [f"run fewer than {local} processes on this machine"] if local > 1 else [])
        each = f", in {local} processes," if local > 1 else ""
        raise ValueError(f"one training step on {n:,}-token windows (seq_len){each} {reason}: give shorter windows "
                         "(--seq-len)" + "".join(f", or {w}" for w in ways))
    if seconds_left is not None and seconds > seconds_left:
        used = "" if math.isclose(seconds_left, cfg.minutes * 60) else f" ({duration(seconds_left)} of it left)"
        raise ValueError(f"one training step on {n:,}-token windows (seq_len) is predicted to take "
                         f"{duration(seconds)} ({took}), longer than minutes={cfg.minutes:g}{used}: give more "
                         "--minutes, or shorter windows (--seq-len)")
