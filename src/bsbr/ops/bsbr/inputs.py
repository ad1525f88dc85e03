"""Shape and type checks of one call of a BSBR op, done once per call."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..checks import check_flag, check_tensor, exporting
from .options import BSBROptions
from .retrieval import gate_closed


@dataclass
class BSBRArgs:
    """Validated sizes of one call."""

    batch: int
    q_heads: int
    kv_heads: int
    seq_len: int
    head_dim: int
    value_dim: int
    feature_dim: int
    meta_in: int  # size of mq/mk per head
    meta_dim: int  # after the meta maps


def _check_leading(name, x, want):
    if tuple(x.shape[:-1]) != tuple(want):
        raise ValueError(f"{name} must have leading shape {tuple(want)}, got {tuple(x.shape)}")


_CHECKED: dict = {}  # signature of a call that passed -> its sizes (decode checks 30 layers a token)


def _signature(args, token_dim):
    """What the checks depend on (each tensor's shape, dtype and device; any other value itself), or
    None when something is neither a tensor, None nor a plain number."""
    sig = [token_dim]
    for x in args:
        if isinstance(x, torch.Tensor):
            sig.append((x.shape, x.dtype, x.device))
        elif x is None or (isinstance(x, (int, float)) and not isinstance(x, bool)):
            sig.append(x)
        else:
            return None
    return tuple(sig)


def check_inputs(options, q, k, v, mq, mk, fq, fk, qr, kr, gate, valid, meta_q, meta_k, token_dim: int = 4,
                 streams: bool = False):
    """Check a sequence call (``token_dim=4``: tensors (b, h, n, d)) or a step call (3: (b, h, d)), the
    optional inputs defaulted first (fq, qr: q; fk, kr: k); ``streams``: the call reads or writes a
    streaming state (which the meta device cannot). Returns ``(sizes, (fq, fk, qr, kr))``.
    K/V-side tensors (k, v, mk, fk, kr) have ``hkv`` heads, query-side ones ``hq``, a multiple.
    A signature seen before is not checked again."""
    if not isinstance(options, BSBROptions):
        raise TypeError(f"options must be a bsbr.ops.BSBROptions, got {type(options).__name__}")
    if torch.jit.is_tracing():
        raise RuntimeError("torch.jit.trace cannot record BSBR attention: the chunks a token reads follow the "
                           "input's length, which a trace would freeze (wrong outputs at other lengths); use "
                           "torch.compile, or torch.export at one length")
    if isinstance(q, torch.Tensor) and not all(isinstance(n, int) for n in q.shape):  # (torch.export's symbolic sizes)
        raise NotImplementedError("torch.export records BSBR attention at one batch size and length (no "
                                  "dynamic_shapes): the chunks a token reads follow the input's length")
    check_flag("output_final_state", streams)  # (the chunked form's, which it passes as streams)
    if streams and exporting():
        raise NotImplementedError("torch.export cannot record BSBR attention's streaming state (built and read by "
                                  "value): export without output_state, streaming or a state")
    if options.retrieval == "normalized" and (fq is None or fk is None) and not gate_closed(gate):
        raise ValueError("retrieval 'normalized' divides by 1 + g fq.z, so it needs non-negative features: pass "
                         "fq and fk (e.g. hedgehog feature maps of q and k); their default, q and k, is signed")
    if getattr(q, "is_meta", False) and (options.retrieval_blocks or token_dim == 3 or streams):  # (q is checked below)
        raise NotImplementedError("the meta device holds shapes, not values: exact blocks (chosen by their scores) "
                                  "and the streaming step run on a real device")
    fq, fk, qr, kr = (x if y is None else y for x, y in ((q, fq), (k, fk), (q, qr), (k, kr)))
    key = _signature((q, k, v, mq, mk, fq, fk, qr, kr, gate, valid, meta_q, meta_k), token_dim)
    a = _CHECKED.get(key) if key is not None else None
    if a is None:
        a = _check_inputs(q, k, v, mq, mk, fq, fk, qr, kr, gate, valid, meta_q, meta_k, token_dim)
        if key is not None:
            if len(_CHECKED) >= 1024:
                _CHECKED.clear()
            _CHECKED[key] = a
    return a, (fq, fk, qr, kr)


def _check_inputs(q, k, v, mq, mk, fq, fk, qr, kr, gate, valid, meta_q, meta_k, token_dim) -> BSBRArgs:
    for name, x in (("q", q), ("k", k), ("v", v), ("mq", mq), ("mk", mk), ("fq", fq), ("fk", fk), ("qr", qr),
                    ("kr", kr)):
        check_tensor(name, x, token_dim)
    b, hq, d = q.shape[0], q.shape[1], q.shape[-1]
    if d < 1:
        raise ValueError("q, k, qr and kr need a head dim of at least 1, got 0")
    hkv = k.shape[1]
    if hq < 1:  # (the fused CPU kernel kills the process on zero heads)
        raise ValueError("q needs at least one head, got 0")
    if v.shape[-1] < 1:
        raise ValueError("v needs a value dim of at least 1, got 0")
    if hkv < 1 or hq % hkv != 0:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")
    tokens = tuple(q.shape[2:-1])
    for name, x in (("k", k), ("v", v), ("fk", fk), ("kr", kr), ("mk", mk)):
        _check_leading(name, x, (b, hkv) + tokens)
    for name, x in (("fq", fq), ("qr", qr), ("mq", mq)):
        _check_leading(name, x, (b, hq) + tokens)
    for name, x in (("k", k), ("qr", qr), ("kr", kr)):
        if x.shape[-1] != d:
            raise ValueError(f"{name} head dim ({x.shape[-1]}) must equal q's ({d})")
    if fq.shape[-1] != fk.shape[-1]:
        raise ValueError(f"fq and fk must share their last dim, got {fq.shape[-1]} and {fk.shape[-1]}")
    if mq.shape[-1] != mk.shape[-1]:
        raise ValueError(f"mq and mk must share their last dim, got {mq.shape[-1]} and {mk.shape[-1]}")
    dtypes = {x.dtype for x in (q, k, v, mq, mk, fq, fk, qr, kr)}
    if len(dtypes) != 1:
        raise TypeError(f"q, k, v, mq, mk, fq, fk, qr, kr must share one dtype, got {sorted(map(str, dtypes))}")
    named = dict(k=k, v=v, mq=mq, mk=mk, fq=fq, fk=fk, qr=qr, kr=kr, gate=gate, valid=valid, meta_q=meta_q,
                 meta_k=meta_k)
    away = [f"{name} on {x.device}" for name, x in named.items()
            if isinstance(x, torch.Tensor) and x.device != q.device]
    if away:
        raise ValueError(f"every tensor must be on q's device ({q.device}), got {', '.join(away)}")
    dm_in = mq.shape[-1]
    outs = []
    for name, w, heads in (("meta_q", meta_q, hq), ("meta_k", meta_k, hkv)):
        if w is None:
            outs.append(dm_in)
            continue
        if not isinstance(w, torch.Tensor):
            raise TypeError(f"{name} must be None or a ({heads}, {dm_in}, dm) tensor, got {type(w).__name__}")
        if w.dim() != 3 or w.shape[0] != heads or w.shape[1] != dm_in:
            raise ValueError(f"{name} must have shape ({heads}, {dm_in}, dm), got {tuple(w.shape)}")
        outs.append(w.shape[2])
    if outs[0] != outs[1]:
        raise ValueError(f"meta_q and meta_k must map to one size, got {outs[0]} and {outs[1]}")
    if min(dm_in, outs[0]) < 1:  # (a chunk's retrieval score divides by the square root of the meta size)
        raise ValueError(f"mq, mk and the meta maps' outputs need a size of at least 1, got {dm_in} and {outs[0]}")
    if gate is not None and not gate_closed(gate):
        if not isinstance(gate, torch.Tensor):
            raise TypeError(f"gate must be None, 0 (closed), a 0-dim tensor or a tensor of shape ({hq},), got {gate!r}")
        if gate.dim() > 1 or gate.numel() not in (1, hq):
            raise ValueError(f"gate must be a scalar or have shape ({hq},), got {tuple(gate.shape)}")
    n = q.shape[2] if token_dim == 4 else 1
    if valid is not None:
        want = (b, n) if token_dim == 4 else (b,)
        if not isinstance(valid, torch.Tensor):
            raise TypeError(f"valid must be None or a tensor of shape {want}, got {type(valid).__name__}")
        if tuple(valid.shape) != want:
            raise ValueError(f"valid (the padding mask) must have shape {want}, got {tuple(valid.shape)}")
    return BSBRArgs(b, hq, hkv, n, d, v.shape[-1], fq.shape[-1], dm_in, outs[0])
