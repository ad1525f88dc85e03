"""The text report of an evaluation result (what ``bsbr eval`` and ``bsbr demo`` print)."""
from __future__ import annotations

from typing import Iterable, Optional

from .passkey import MODEL_ORDER, passkey_summary_lines


def percent(x: Optional[float], digits: int, none: str) -> str:
    return none if x is None else f"{100 * x:.{digits}f}%"


def summary_lines(result: dict) -> Iterable[str]:
    """A compact text table of a result (what ``bsbr eval`` prints)."""
    cfg, lm = result["config"], result["language_modeling"]
    yield (f"{cfg['windows']} windows x {cfg['seq_len']} tokens, chunk {cfg['chunk_size']}: "
           f"{lm['tokens']} tokens scored (positions >= chunk size)")
    names = [n for n in MODEL_ORDER if n in lm["perplexity"]]
    fmt = lambda x, spec=".4g": "-" if x is None else format(x, spec)  # noqa: E731
    yield f"{'model':<8} {'ppl':>9} {'top1':>7} {'top5':>7} {'top10':>7} {'KL':>9} {'cos(h)':>8} {'mse(h)':>9}"
    for n in names:
        ag = lm["agreement"].get(n, {})
        hc = lm.get("hidden_cosine", {}).get(n)
        hm = lm.get("hidden_mse", {}).get(n)
        yield (f"{n:<8} {fmt(lm['perplexity'][n]):>9} {fmt(ag.get('top1'), '.3f'):>7} {fmt(ag.get('top5'), '.3f'):>7} "
               f"{fmt(ag.get('top10'), '.3f'):>7} {fmt(lm['kl'].get(n)):>9} {fmt(hc, '.4f'):>8} {fmt(hm):>9}")
    gap = percent(lm.get("gap_closed"), 2, "undefined")
    yield f"gap closed (ppl_local - ppl_bsbr) / (ppl_local - ppl_source): {gap}"
    if "gap_closed_by_retrieval" in lm:
        yield (f"  retrieval, of the gap the window alone leaves (ppl_window - ppl_bsbr) / (ppl_window - ppl_source): "
               f"{percent(lm['gap_closed_by_retrieval'], 2, 'undefined')} (window = the source's weights in the "
               f"model's exact window alone, no retrieval: {cfg.get('local_chunks', 1)} chunk(s) + "
               f"{cfg.get('sink_tokens', 0)} sink tokens)")
    yield "perplexity per position bucket:"
    yield f"  {'positions':<13} " + " ".join(f"{n:>9}" for n in names) + f" {'gap':>8}"
    for b in lm["buckets"]:
        yield (f"  {b['start']:>5}-{b['end'] - 1:<7} " + " ".join(f"{fmt(b['perplexity'][n]):>9}" for n in names)
               + f" {percent(b.get('gap_closed'), 1, '-'):>8}")
    if result.get("passkey"):
        yield from passkey_summary_lines(result["passkey"])
