"""Argument checks shared by every op and layer: a clear ValueError/TypeError naming the argument. The
baseline ops (sliding window, linear attention, DeltaNet, Hopfield, GAU) all take per-head tensors laid
out (batch, heads, seq_len, dim)."""
from __future__ import annotations

import contextlib
import functools
import inspect
import math
import numbers
import sys
from typing import Optional, Tuple

import torch

from ..numbers import FLOAT32_MAX


EAGER = ("a BSBR model compiles with graph breaks: its chunked op, block selection and cache bookkeeping run "
         "eagerly, so compile it without fullgraph=True (and torch.export it with strict=False, its default)")


def eager(fn):
    """``fn`` run eagerly inside a compiled model (a graph break), saying why where ``fullgraph=True`` refuses it
    (on a torch that takes a reason: 2.8 on)."""
    if "reason" in inspect.signature(torch.compiler.disable).parameters:
        return torch.compiler.disable(fn, reason=EAGER)
    return torch.compiler.disable(fn)


def exporting() -> bool:
    """Whether ``torch.export`` is recording the call (False on a torch without ``torch.compiler.is_exporting``,
    which came after 2.5)."""
    is_exporting = getattr(torch.compiler, "is_exporting", None)
    return is_exporting is not None and is_exporting()


def in_float32(op):
    """The op ``op(q, k, v, **options)`` run with half-precision ``q, k, v`` in float32 and autocast off (its sums
    over many tokens overflow float16 and round single tokens away in bfloat16); its output in ``q``'s dtype,
    its state as computed (float32)."""
    @functools.wraps(op)
    def run(q, k, v, **options):
        check_qkv(q, k, v)  # (the dtypes given, one for all three, before any is cast)
        dtype = q.dtype
        q, k, v = (t.float() if t.dtype in (torch.float16, torch.bfloat16) else t for t in (q, k, v))
        try:
            autocast = torch.is_autocast_enabled(q.device.type)
        except (RuntimeError, TypeError):  # (a device autocast does not know, as meta)
            autocast = False
        with torch.autocast(q.device.type, enabled=False) if autocast else contextlib.nullcontext():
            o, state = op(q, k, v, **options)
        return o.to(dtype), state

    return run


def transformed(t: torch.Tensor) -> bool:
    """Whether a ``torch.func`` transform (``vmap``, ``grad``) wraps ``t``."""
    level = getattr(getattr(torch._C, "_functorch", None), "maybe_get_level", None)
    return level is not None and level(t) != -1


def unreadable(t: torch.Tensor) -> bool:
    """Whether ``t``'s values cannot be read on the host now: ``torch.export`` recording the call, or a
    ``torch.func`` transform wrapping ``t``; a check by value is then skipped, as transformers' models check
    nothing by value."""
    return exporting() or transformed(t)


def shown(value) -> str:
    """``repr(value)``, cut short (a huge int has thousands of digits, or cannot be printed at all)."""
    try:
        text = repr(value)
    except ValueError:
        return f"an int of more than {sys.get_int_max_str_digits()} digits"
    return text if len(text) <= 40 else text[:37] + "..."


def is_number(value) -> bool:
    """A float or int (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_number(name, value, minimum: Optional[float] = None, *, above: bool = False, none: bool = False) -> None:
    """``value``: a float or int (not a bool) finite in float32, ``>= minimum`` (``> minimum`` when ``above``);
    ``none``: None is allowed too. Else a ValueError naming ``name``."""
    if none and value is None:
        return
    ok = is_number(value)
    try:  # held as float32: inf or beyond its range is refused
        ok = ok and math.isfinite(float(value)) and abs(float(value)) <= FLOAT32_MAX
    except OverflowError:  # an int beyond float range
        ok = False
    if ok and minimum is not None:
        ok = value > minimum if above else value >= minimum
    if not ok:
        bound = "" if minimum is None else f" {'>' if above else '>='} {minimum}"
        raise ValueError(f"{name} must be {'None or ' if none else ''}a finite number{bound} (within float32 range), "
                         f"got {shown(value)}"
                         f"{_python_type_hint(value, float, lambda x: check_number(name, x, minimum, above=above))}")


def check_flag(name, value, none: bool = False) -> None:
    """``value``: True or False (or None with ``none``); a truthy stand-in (1, "no") is refused."""
    if not (isinstance(value, bool) or (none and value is None)):
        raise ValueError(f"{name} must be True or False{' (or None)' if none else ''}, got {shown(value)}")


def check_tensor(name: str, x, ndim: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating point tensor, got {x.dtype}")


def _python_type_hint(value, kind: type, check) -> str:
    """' (a numpy.int64: pass int(x))' for a number of another library's type that ``check`` accepts as
    ``kind(value)``, else ''."""
    if not isinstance(value, numbers.Number) or isinstance(value, (bool, int, float)):
        return ""
    try:
        check(kind(value))
    except (TypeError, ValueError, OverflowError):  # (not one once converted either)
        return ""
    return f" (a {type(value).__module__}.{type(value).__name__}: pass {kind.__name__}(x))"


def check_int(name: str, value, minimum: int = 1, maximum: Optional[int] = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {shown(value)}"
                         f"{_python_type_hint(value, int, lambda x: check_int(name, x, minimum, maximum))}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be at most {maximum:,}, got {value:,}")


def check_valid(valid, b: int, n: int, name: str = "valid (the padding mask)") -> Optional[torch.Tensor]:
    """A (b, n) padding mask (1/True = real token) as bool; None stays None. ``name``: the argument's
    name in the error messages."""
    if valid is None:
        return None
    if not isinstance(valid, torch.Tensor):
        raise TypeError(f"{name} must be None or a tensor of shape ({b}, {n}), got {type(valid).__name__}")
    if tuple(valid.shape) != (b, n):
        raise ValueError(f"{name} must have shape ({b}, {n}), got {tuple(valid.shape)}")
    return valid.bool()


def check_qkv(q, k, v) -> Tuple[int, int, int, int, int]:
    """q, k: (b, h, n, d); v: (b, h, n, dv), one dtype. Returns (b, h, n, d, dv)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, x, 4)
    if k.shape != q.shape:
        raise ValueError(f"k must have the shape of q {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must have leading shape {tuple(q.shape[:3])}, got {tuple(v.shape)}")
    if len({q.dtype, k.dtype, v.dtype}) != 1:
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    b, h, n, d = q.shape
    return b, h, n, d, v.shape[-1]


def check_scale(scale, d: int) -> float:
    if scale is None:
        return d ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be None or a float, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    return float(scale)


def check_eps(eps) -> None:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps < math.inf:
        raise ValueError(f"eps must be a finite float >= 0, got {eps!r}")


def check_state_matrix(name: str, S, b: int, h: int, d: int, dv: int) -> None:
    """A recurrent state's matrix S: a (b, h, d, dv) tensor."""
    check_tensor(name, S, 4)
    if tuple(S.shape) != (b, h, d, dv):
        raise ValueError(f"{name} must have shape {(b, h, d, dv)}, got {tuple(S.shape)}")


def check_state(state, b: int, h: int, d: int, dv: int, like: torch.Tensor, with_norm: bool):
    """An initial state (S, z): S (b, h, d, dv), z (b, h, d) (z only for normalized linear attention).
    None becomes zeros."""
    if state is None:
        S = like.new_zeros(b, h, d, dv)
        return S, (like.new_zeros(b, h, d) if with_norm else None)
    if not isinstance(state, (tuple, list)) or len(state) != 2:
        raise TypeError("initial_state must be None or a tuple (S, z) as returned with output_final_state=True")
    S, z = state
    check_state_matrix("initial_state[0]", S, b, h, d, dv)
    if with_norm:
        if z is None:
            raise ValueError("initial_state[1] (the key sum z) is needed when normalize=True")
        check_tensor("initial_state[1]", z, 3)
        if tuple(z.shape) != (b, h, d):
            raise ValueError(f"initial_state[1] must have shape {(b, h, d)}, got {tuple(z.shape)}")
    return S.to(like.dtype), (None if not with_norm else z.to(like.dtype))


def mask_padding(allowed: torch.Tensor, valid: Optional[torch.Tensor]) -> torch.Tensor:
    """An (1, n, n) attention mask restricted to real keys (``valid`` (b, n); None: unchanged), every
    query still seeing itself so that no row is empty (outputs at padded positions are zeroed)."""
    if valid is None:
        return allowed
    eye = torch.eye(allowed.shape[-1], dtype=torch.bool, device=allowed.device)
    return (allowed & valid[:, None, :]) | eye[None]


def zero_padded(o: torch.Tensor, valid: Optional[torch.Tensor]) -> torch.Tensor:
    """``o`` (b, h, n, dv) with the outputs at padded positions (``valid`` (b, n) False) set to 0."""
    return o if valid is None else o * valid[:, None, :, None].to(o.dtype)
