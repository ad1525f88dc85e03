"""Model scaling: a 2-layer :class:`~bsbr.models.native.BSBRModel` (hidden 256, 4 heads, chunk 128,
ff 1024) forward at 8k to 64k tokens: time, extra and whole-process peak RSS, and ``t(64k)/t(8k)``
(linear scaling would give 8).
"""
from __future__ import annotations

import logging
from typing import Dict, Sequence

import torch

from .common import failure, forward_fn, median, new_row, own_rng, round_sig, time_call
from .defaults import DEFAULT_MODEL_SEQ_LENS
from ..memory import measure_peak, release_free_memory

log = logging.getLogger(__name__)

TARGET_MODEL_TIME_RATIO = 10.0  # t(64k) / t(8k) of the 2-layer model
TARGET_MODEL_PEAK_MB = 3 * 1024.0  # process peak RSS at 64k tokens, MiB
# the lengths and model the targets were set for: elsewhere they are reported, not judged
TARGET_MODEL_SHAPE = dict(shortest=8192, longest=65536, hidden=256, heads=4, chunk_size=128, ff_dim=1024,
                          num_layers=2, vocab_size=1000, retrieval="additive", retrieval_blocks=0)


@own_rng
def bench_model_scaling(seq_lens: Sequence[int] = DEFAULT_MODEL_SEQ_LENS, hidden: int = 256, heads: int = 4,
                        chunk_size: int = 128, ff_dim: int = 1024, num_layers: int = 2, vocab_size: int = 1000,
                        repeats: int = 3, retrieval: str = "additive", retrieval_blocks: int = 0,
                        seed: int = 0, device: str = "cpu") -> Dict[str, object]:
    """Lengths run in turn, not interleaved: there is only one model (the rest: see the module docstring)."""
    from ..models.native import BSBRModel

    torch.manual_seed(seed)
    model = BSBRModel(vocab_size, hidden, num_layers, heads, chunk_size, ff_dim, dropout=0.0,
                      retrieval=retrieval, retrieval_blocks=retrieval_blocks).to(device).eval()
    rows = []
    for n in seq_lens:
        ids = torch.randint(0, vocab_size, (1, n), device=device)
        fn = forward_fn(model, ids)
        row = new_row("bsbr_model", n)
        try:
            time_call(fn, device)  # warm-up
            mem = measure_peak(fn, device)
            ts = [time_call(fn, device) for _ in range(repeats)]
        except Exception as e:  # noqa: BLE001 - recorded
            row.update(failure(e))
        else:
            row.update(time_ms=round_sig(median(ts) * 1e3), times_ms=[round_sig(t * 1e3) for t in ts],
                       peak_mb=round_sig(mem.extra_mb), process_peak_mb=round_sig(mem.peak_mb))
            log.info("model @ %d: %.1f ms, +%s MiB (process peak %s MiB)", n, row["time_ms"], row["peak_mb"],
                     row["process_peak_mb"])
        rows.append(row)
        del ids, fn
        release_free_memory()
    ok = {r["seq_len"]: r for r in rows if r["status"] == "ok"}
    lo, hi = min(seq_lens), max(seq_lens)
    t_ratio = round_sig(ok[hi]["time_ms"] / ok[lo]["time_ms"]) if lo in ok and hi in ok else None
    peak_hi = ok[hi]["process_peak_mb"] if hi in ok else None
    config = dict(seq_lens=list(seq_lens), hidden=hidden, heads=heads, chunk_size=chunk_size, ff_dim=ff_dim,
                  num_layers=num_layers, vocab_size=vocab_size, repeats=repeats, retrieval=retrieval,
                  retrieval_blocks=retrieval_blocks, batch=1, dtype="float32", seed=seed)
    judged = all(dict(config, shortest=lo, longest=hi)[k] == v for k, v in TARGET_MODEL_SHAPE.items())
    targets = [
        {"target": f"t({hi})/t({lo}) <= {TARGET_MODEL_TIME_RATIO:g}", "value": t_ratio, "goal": TARGET_MODEL_TIME_RATIO,
         "met": None if t_ratio is None or not judged else t_ratio <= TARGET_MODEL_TIME_RATIO},
        {"target": f"process peak RSS at {hi} < {TARGET_MODEL_PEAK_MB:g} MiB", "value": peak_hi,
         "goal": TARGET_MODEL_PEAK_MB, "met": None if peak_hi is None or not judged else peak_hi < TARGET_MODEL_PEAK_MB},
    ]
    return {"benchmark": "model_scaling", "config": config, "rows": rows,
            "ratios": {"time_ratio_longest_shortest": t_ratio, "linear_would_be": hi / lo},
            "targets": targets}
