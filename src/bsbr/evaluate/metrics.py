"""How much of the source model a converted model keeps, as sums accumulated window by window
(:class:`MetricAccumulator`, fed by the evaluation loop :func:`evaluate`), and the quick single-model
number probes compare (:func:`perplexity_past`).

The models read the same windows of ``n`` tokens:

* ``source`` -- the pretrained model with full causal attention (the upper bound);
* ``local``  -- the source restricted to chunk-local attention (the source converted with a one-chunk
  window, no sinks, no exact blocks and a closed gate: the lower bound);
* ``bsbr``   -- the model under evaluation;
* ``window`` -- (only for a model whose exact window is wider than its chunk: ``local_chunks > 1``
  or ``sink_tokens > 0``) the model's exact window alone: the source converted with the model's options
  and no retrieval (its sinks read where the model reads them: with ``far_positions`` other than
  ``absolute``, just before the window, not at their own positions).

Position ``p`` of a window predicts token ``p + 1`` (so ``p`` runs over ``0 .. n-2``). Inside the
first chunk (``p < B``, ``B`` = chunk size) the models compute the same function exactly, so
every metric is taken over ``p >= B`` only, in total and per position bucket.

With ``T`` the scored positions, ``y_p`` the target token, and ``log q^m_p`` model ``m``'s
log-softmax at ``p``:

* negative log-likelihood ``NLL_m = (1/|T|) sum_p -log q^m_p(y_p)``; perplexity ``PPL_m = exp(NLL_m)``;
* gap closed ``G = (PPL_local - PPL_bsbr) / (PPL_local - PPL_source)``: 0 = no better than chunk-local,
  1 = as good as full attention, < 0 = worse than chunk-local, > 1 = better than full attention (not
  clamped); undefined (None) unless ``PPL_local - PPL_source > 1e-4 * PPL_source`` (the bounds equal up to
  rounding, or in the wrong order, as on a random model);
* gap closed by retrieval ``G_r = (PPL_window - PPL_bsbr) / (PPL_window - PPL_source)``: the same
  measure from the wider exact window (what retrieval adds on top of it), when ``window`` is present;
* top-k agreement ``A_k = (1/|T|) sum_p [argmax q^source_p is among the k largest of q^m_p]``
  (computed from the rank ``r_p = #{v : q^m_p(v) > q^m_p(argmax q^source_p)}``: agreement iff
  ``r_p < k``, so ties count in the candidate's favour);
* ``KL(source || m) = (1/|T|) sum_p sum_v q^source_p(v) (log q^source_p(v) - log q^m_p(v))`` in nats;
* on the final hidden state (the LM head's input) ``h``: mean cosine similarity
  ``cos(h^m_p, h^source_p)`` and mean squared error ``mean_d (h^m_{p,d} - h^source_{p,d})^2``.

Only per-bucket sums (float64) are kept, never the logits (the vocabulary is ~49k): each model's
logits are made from its final hidden states a block of positions at a time, so memory is the models'
forwards and one block's logits, whatever the window's length (all four models' logits of one 8,192-token
window took 13 GB).
"""
from __future__ import annotations

import logging
import math
import time
from typing import List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..errors import check_not_interrupted
from ..models.heads import final_hidden_states, head_rows, output_object, position_blocks, refuse_without_lm_head
from ..ops.checks import check_int, check_number
from .modes import in_eval_mode

logger = logging.getLogger(__name__)

REFERENCE = "source"
DEFAULT_KS = (1, 5, 10)
BUCKET_SCHEMES = ("chunk", "doubling")


def _perplexity(nll: float) -> float:
    """exp(nll), infinite past float's range (a diverged model's mean NLL can pass 709 nats)."""
    return math.exp(nll) if nll < 709.78 else math.inf


def position_buckets(seq_len: int, chunk_size: int, scheme: str = "chunk") -> List[Tuple[int, int]]:
    """Half-open ranges ``[lo, hi)`` of the scored positions ``B <= p <= seq_len - 2``: :func:`bucket_spans`
    from ``B`` to ``seq_len - 1`` (the last position has no target in the window); ``"doubling"`` gives few
    buckets for very long windows."""
    check_int("chunk_size", chunk_size)
    if not isinstance(seq_len, int) or seq_len < chunk_size + 2:
        raise ValueError(f"seq_len must be at least chunk_size + 2 = {chunk_size + 2} so that some token past "
                         f"the first chunk has a target, got {seq_len!r}")
    if scheme not in BUCKET_SCHEMES:
        raise ValueError(f"scheme must be one of {BUCKET_SCHEMES}, got {scheme!r}")
    return bucket_spans(chunk_size, seq_len - 1, scheme)


def bucket_spans(lo: int, end: int, scheme: str = "chunk") -> List[Tuple[int, int]]:
    """``[lo, 2 lo), [2 lo, 3 lo), ...`` (``"chunk"``: one bucket per chunk) or ``[lo, 2 lo), [2 lo, 4 lo), ...``
    (``"doubling"``), the last range cut at ``end``."""
    out, width = [], lo
    while lo < end:
        hi = lo + width if scheme == "chunk" else 2 * lo
        out.append((lo, min(hi, end)))
        lo = hi
    return out


def gap_closed(ppl_local: float, ppl_model: float, ppl_full: float, rel_eps: float = 1e-4) -> Optional[float]:
    """``(ppl_local - ppl_model) / (ppl_local - ppl_full)``: 1 = the full model's perplexity, 0 = the
    local one's, < 0 worse. None when there is no gap to close: the local bound is not above the full
    one by more than ``rel_eps * ppl_full`` (equal up to rounding, or in the wrong order, where the
    ratio would call a model worse than both bounds a success), or an input is not finite."""
    check_number("rel_eps", rel_eps, 0)
    if any(isinstance(x, (bool, str, bytes)) for x in (ppl_local, ppl_model, ppl_full)):
        return None
    try:  # numpy floats and 0-d tensors too
        ppl_local, ppl_model, ppl_full = (float(x) for x in (ppl_local, ppl_model, ppl_full))
    except (TypeError, ValueError, RuntimeError):
        return None
    if not all(math.isfinite(x) for x in (ppl_local, ppl_model, ppl_full)):
        return None
    denom = ppl_local - ppl_full
    if denom <= rel_eps * max(abs(ppl_full), 1e-12):
        return None
    return (ppl_local - ppl_model) / denom


def reference_rank(logits: torch.Tensor, reference_logits: torch.Tensor) -> torch.Tensor:
    """Rank of the reference's argmax under ``logits``: ``#{v : logits[v] > logits[argmax ref]}``.

    ``logits``, ``reference_logits``: (..., V) -> (...) long. Rank 0 = same top-1.
    """
    top = reference_logits.argmax(-1, keepdim=True)                       # (..., 1)
    picked = logits.gather(-1, top)                                       # (..., 1)
    return (logits > picked).sum(-1)                                      # (...)


def kl_divergence(reference_logp: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """``KL(reference || model)`` per position from log-probabilities (..., V) -> (...), in nats (two equal
    distributions' float32 rounding may sum to about -2e-8: :class:`MetricAccumulator` reports a mean below 0 as 0)."""
    return (reference_logp.exp() * (reference_logp - logp)).sum(-1)


def _at_least_0(kl: Optional[float]) -> Optional[float]:
    """A mean KL, which rounding of equal distributions can put a hair below 0 (a report printed -1.7e-8)."""
    return None if kl is None else max(kl, 0.0)


class MetricAccumulator:
    """Per-bucket sums of every metric in this module's docstring, updated one window at a time.

    ``models`` names the perplexity columns (must include ``"source"``); every other name is also
    compared with the source (agreement, KL, hidden states). ``update`` takes each model's logits
    for one window (or a batch of windows); ``result`` turns the sums into means.
    """

    def __init__(self, seq_len: int, chunk_size: int, models: Sequence[str] = ("bsbr", "source", "local"),
                 scheme: str = "chunk", ks: Sequence[int] = DEFAULT_KS):
        if REFERENCE not in models:
            raise ValueError(f"models must include {REFERENCE!r}, got {list(models)}")
        if len(set(models)) != len(models):
            raise ValueError(f"models must be distinct names, got {list(models)}")
        if not ks or any(not isinstance(k, int) or isinstance(k, bool) or k < 1 for k in ks):
            raise ValueError(f"ks must be positive ints, got {ks!r}")
        self.seq_len, self.scheme = seq_len, scheme
        self.buckets = position_buckets(seq_len, chunk_size, scheme)
        self.models = list(models)
        self.candidates = [m for m in self.models if m != REFERENCE]
        self.ks = tuple(sorted(set(ks)))
        # the scored positions (past the first chunk, before the last position) and the bucket of each
        self._pos = torch.arange(self.buckets[0][0], self.buckets[-1][1])
        self._bucket = torch.repeat_interleave(torch.tensor([hi - lo for lo, hi in self.buckets]))
        nb = len(self.buckets)
        zeros = lambda: torch.zeros(nb, dtype=torch.float64)  # noqa: E731
        self.count = zeros()
        self.nll = {m: zeros() for m in self.models}
        self.agree = {m: {k: zeros() for k in self.ks} for m in self.candidates}
        self.kl = {m: zeros() for m in self.candidates}
        self.cos = {m: zeros() for m in self.candidates}
        self.mse = {m: zeros() for m in self.candidates}
        self.hidden_count = zeros()
        self.windows = 0

    def _add(self, acc: torch.Tensor, values: torch.Tensor, idx: torch.Tensor) -> None:
        acc.index_add_(0, idx, values.detach().to(torch.float64).reshape(-1))

    @torch.no_grad()
    def update(self, targets: torch.Tensor, logits: Mapping[str, torch.Tensor],
               hidden: Optional[Mapping[str, torch.Tensor]] = None, start: int = 0) -> None:
        """Add one batch of windows, or one block of their positions.

        ``targets``: (b, n) the window's token ids (position ``p`` predicts ``targets[:, p+1]``);
        ``logits[m]``: (b, L, V) for every model name, positions ``start .. start + L - 1`` (a window is
        counted once its last position is added); ``hidden[m]``: (b, L, D) final hidden states for the
        source and any candidate (optional).
        """
        if targets.dim() != 2 or targets.shape[1] != self.seq_len:
            raise ValueError(f"targets must have shape (batch, {self.seq_len}), got {tuple(targets.shape)}")
        missing = [m for m in self.models if m not in logits]
        if missing:
            raise ValueError(f"logits missing for models {missing}")
        b, n = targets.shape
        span, vocab = logits[REFERENCE].shape[1], logits[REFERENCE].shape[-1]
        if not 0 <= start <= n - span:
            raise ValueError(f"positions {start} .. {start + span - 1} lie outside the window of {n}")
        for m in self.models:
            if tuple(logits[m].shape) != (b, span, vocab):
                raise ValueError(f"logits[{m!r}] must have shape {(b, span, vocab)}, got {tuple(logits[m].shape)}")
        inside = (self._pos >= start) & (self._pos < start + span)
        pos = self._pos[inside]                                            # (t,) scored positions here
        idx = self._bucket[inside].repeat(b)                               # (b*t,) bucket per scored token
        y = targets[:, pos + 1]                                            # (b, t) next tokens
        at = pos - start                                                   # their rows in the logits
        if start + span == n:
            self.windows += b

        logp = {m: F.log_softmax(logits[m][:, at].float(), dim=-1) for m in self.models}  # (b, t, V)
        self.count.index_add_(0, idx, torch.ones(idx.numel(), dtype=torch.float64))
        for m in self.models:
            self._add(self.nll[m], -logp[m].gather(-1, y.unsqueeze(-1)).squeeze(-1), idx)
        ref = logp[REFERENCE]
        for m in self.candidates:
            rank = reference_rank(logp[m], ref)                            # (b, t)
            for k in self.ks:
                self._add(self.agree[m][k], (rank < k).double(), idx)
            self._add(self.kl[m], kl_divergence(ref, logp[m]), idx)
        del logp, ref

        if hidden is not None:
            if REFERENCE not in hidden:
                raise ValueError(f"hidden must include {REFERENCE!r} to compare against")
            hs = hidden[REFERENCE][:, at].float()                          # (b, t, D)
            self.hidden_count.index_add_(0, idx, torch.ones(idx.numel(), dtype=torch.float64))
            for m in self.candidates:
                if m not in hidden:
                    raise ValueError(f"hidden states missing for {m!r}")
                hm = hidden[m][:, at].float()
                if hm.shape != hs.shape:
                    raise ValueError(f"hidden[{m!r}] has shape {tuple(hm.shape)}, the source's {tuple(hs.shape)}")
                self._add(self.cos[m], F.cosine_similarity(hm, hs, dim=-1, eps=1e-12), idx)
                self._add(self.mse[m], (hm - hs).pow(2).mean(-1), idx)

    # ------------------------------------------------------------------ results
    @staticmethod
    def _mean(total: torch.Tensor, count: torch.Tensor) -> Optional[float]:
        c = float(count.sum())
        return float(total.sum()) / c if c > 0 else None

    def _summary(self, sel: slice) -> dict:
        """Means over the buckets ``sel`` (a slice: all of them, or one)."""
        count = self.count[sel]
        nll = {m: self._mean(self.nll[m][sel], count) for m in self.models}
        ppl = {m: (_perplexity(v) if v is not None else None) for m, v in nll.items()}
        out = dict(tokens=int(count.sum()), nll=nll, perplexity=ppl,
                   agreement={m: {f"top{k}": self._mean(self.agree[m][k][sel], count) for k in self.ks}
                              for m in self.candidates},
                   kl={m: _at_least_0(self._mean(self.kl[m][sel], count)) for m in self.candidates})
        for key, lower in (("gap_closed", "local"), ("gap_closed_by_retrieval", "window")):
            if "bsbr" in ppl and lower in ppl and None not in (ppl["bsbr"], ppl[lower], ppl[REFERENCE]):
                out[key] = gap_closed(ppl[lower], ppl["bsbr"], ppl[REFERENCE])
        hc = self.hidden_count[sel]
        if float(hc.sum()) > 0:
            out["hidden_cosine"] = {m: self._mean(self.cos[m][sel], hc) for m in self.candidates}
            out["hidden_mse"] = {m: self._mean(self.mse[m][sel], hc) for m in self.candidates}
        return out

    def result(self) -> dict:
        """Totals over every scored position, and the same per bucket (``start``/``end`` = ``[lo, hi)``)."""
        out = self._summary(slice(None))
        out["windows"] = self.windows
        out["bucket_scheme"] = self.scheme
        out["buckets"] = [dict(start=lo, end=hi, **self._summary(slice(i, i + 1)))
                          for i, (lo, hi) in enumerate(self.buckets)]
        return out


@torch.no_grad()
@in_eval_mode
def evaluate(model, source, tokenizer, windows: torch.Tensor, chunk_size: int, local=None,
             buckets: str = "chunk", ks: Sequence[int] = DEFAULT_KS, passkey: Optional[dict] = None,
             batch_size: int = 1, progress: bool = True, window=None) -> dict:
    """Compare ``model`` (BSBR) with ``source`` (full attention), ``local`` (chunk-local; None skips it
    and the gap closed) and optionally ``window`` (the source in the model's wider exact window, see
    :func:`~bsbr.evaluate.baselines.local_baseline`) on ``windows``, (num_windows, seq_len) token ids,
    with the metrics of this module. ``passkey``: keyword arguments for
    :func:`~bsbr.evaluate.passkey.run_passkey`, or None to skip it; it needs ``tokenizer``.
    Returns ``{"config", "language_modeling", "passkey"?, "seconds"}``.
    """
    if not isinstance(windows, torch.Tensor) or windows.dim() != 2 or windows.is_floating_point():
        raise ValueError(f"windows must be an integer tensor of shape (num_windows, seq_len), got "
                         f"{getattr(windows, 'shape', type(windows).__name__)}")
    if windows.shape[0] < 1:
        raise ValueError("windows is empty")
    check_int("chunk_size", chunk_size)
    model_chunk = getattr(getattr(model, "config", None), "chunk_size", None)
    if model_chunk is not None and model_chunk != chunk_size:
        logger.warning("chunk_size=%d differs from the model's config.chunk_size=%d", chunk_size, model_chunk)
    check_int("batch_size", batch_size)
    models = {n: m for n, m in (("bsbr", model), ("source", source), ("local", local), ("window", window))
              if m is not None}
    for n, m in models.items():
        refuse_without_lm_head(m, f"model {n!r}", "evaluate")
    vocab = {n: head_rows(m) for n, m in models.items()}
    if len(set(vocab.values())) != 1:
        raise ValueError(f"the models' vocabularies differ: {vocab} (give the source the model was converted "
                         "from; a model whose embeddings were resized since needs a source with its vocabulary)")
    v = next(iter(vocab.values()))
    if windows.numel() == 0:
        raise ValueError(f"windows hold no tokens (shape {tuple(windows.shape)}): give windows of chunk_size + 2 "
                         "tokens or more")
    if int(windows.max()) >= v or int(windows.min()) < 0:
        raise ValueError(f"windows hold token ids outside [0, {v}): wrong tokenizer?")

    from ..progress import bar

    t0 = time.perf_counter()
    n_win, seq_len = windows.shape
    check_not_interrupted()  # (a Ctrl-C a library swallowed, here or while a model loaded)
    acc = MetricAccumulator(seq_len, chunk_size, models=list(models), scheme=buckets, ks=ks)
    for start in bar(range(0, n_win, batch_size), desc="eval windows", disable=not progress):
        check_not_interrupted()  # (a Ctrl-C a library swallowed)
        ids = windows[start:start + batch_size]                            # (b, n)
        hidden = {name: final_hidden_states(m, ids) for name, m in models.items()}  # (b, n, D) each
        for lo, hi in position_blocks(0, seq_len):  # the logits a block of positions at a time
            block = {name: h[:, lo:hi] for name, h in hidden.items()}
            logits = {name: models[name].get_output_embeddings()(h) for name, h in block.items()}
            acc.update(ids, logits, block, start=lo)
            del logits
        del hidden
        logger.debug("window %d/%d done", start + ids.shape[0], n_win)
    lm = acc.result()
    gap = lm.get("gap_closed")
    logger.info("perplexity past the first chunk: %s; gap closed %s", ", ".join(
        f"{k} {x:.4g}" for k, x in lm["perplexity"].items()), "undefined" if gap is None else f"{100 * gap:.2f}%")
    result = dict(config=dict(chunk_size=chunk_size, seq_len=seq_len, windows=n_win, scored_tokens=lm["tokens"],
                              bucket_scheme=buckets, ks=list(ks)),
                  language_modeling=lm)
    if window is not None:  # (the report names the window; it printed a default one, not this)
        result["config"].update({k: getattr(window.config, k) for k in ("local_chunks", "sink_tokens")})
    if passkey is not None:
        if tokenizer is None:
            raise ValueError("the pass-key test needs a tokenizer")
        from .passkey import run_passkey

        result["passkey"] = run_passkey(models, tokenizer, chunk_size=chunk_size, progress=progress, **passkey)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result


@in_eval_mode
def perplexity_past(model, windows, start: int, **forward_kwargs) -> float:
    """Perplexity of ``model`` on the tokens at positions ``> start`` of each window, predicted from
    the logits at positions ``>= start`` (no cache, no gradient). ``windows``: a (num_windows,
    seq_len) integer tensor or a sequence of 1-D ones; ``forward_kwargs`` go to every forward call (e.g. an
    ``attention_mask`` of shape (1, seq_len), shared by every window: its padding is not scored). The quick
    number probes and sweeps compare; :func:`evaluate` gives the full set of metrics."""
    if not isinstance(start, int) or isinstance(start, bool) or start < 0:
        raise ValueError(f"start must be an int >= 0, got {start!r}")
    total, count = 0.0, 0
    with torch.no_grad():
        for w in windows:
            if not isinstance(w, torch.Tensor) or w.dim() != 1 or w.is_floating_point():
                raise ValueError(f"each window must be a 1-D integer tensor, got "
                                 f"{getattr(w, 'shape', type(w).__name__)}")
            if w.numel() < start + 2:
                raise ValueError(f"a window of {w.numel()} tokens has no tokens past start={start}")
            logits = model(input_ids=w[None], use_cache=False, **output_object(model),
                           **forward_kwargs).logits[0, start:-1].float()
            targets = w[start + 1:]
            mask = forward_kwargs.get("attention_mask")
            if isinstance(mask, torch.Tensor) and mask.dim() <= 2 and mask.numel() == w.numel():  # a padding mask
                # (padding was scored as targets: 305 -> 419 for one window padded by 8)
                m = mask.reshape(-1).bool()
                keep = m[start + 1:] & m[start:-1]  # (a real token predicted from padding is not scored either)
                logits, targets = logits[keep], targets[keep]
            total += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
            count += targets.numel()
    if count == 0:
        raise ValueError("windows is empty")
    return _perplexity(total / count)
