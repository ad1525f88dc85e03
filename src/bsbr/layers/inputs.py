"""Input checks shared by every attention layer: a clear error naming the argument."""
from __future__ import annotations

import numbers
import weakref
from typing import Optional

import torch

from ..ops.checks import check_valid, eager, exporting, unreadable


def check_layer_inputs(hidden_states, hidden_dim: int, attention_mask,
                       weight: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """Check a layer's input (batch, seq_len, hidden_dim), of ``weight``'s dtype unless autocast is on;
    return its padding mask as in :func:`mask_to_valid`."""
    if not isinstance(hidden_states, torch.Tensor):
        raise TypeError(f"hidden_states must be a torch.Tensor, got {type(hidden_states).__name__}")
    if hidden_states.dim() != 3 or hidden_states.shape[-1] != hidden_dim:
        raise ValueError(
            f"hidden_states must have shape (batch, seq_len, {hidden_dim}), got {tuple(hidden_states.shape)}"
        )
    if not hidden_states.is_floating_point():
        raise TypeError(f"hidden_states must be floating point, got {hidden_states.dtype}")
    # (a quantized layer's weight is a method or an integer tensor: its own kernels take the input)
    if isinstance(weight, torch.Tensor) and weight.is_floating_point() and hidden_states.dtype != weight.dtype and \
            not torch.is_autocast_enabled(hidden_states.device.type):
        raise TypeError(f"hidden_states are {hidden_states.dtype}, the layer's weights {weight.dtype}: cast the input "
                        f"or the layer (layer.to({hidden_states.dtype})), or run under torch.autocast")
    return mask_to_valid(attention_mask, hidden_states.shape[0], hidden_states.shape[1])


_ROTARY_CHECKED: dict = {}  # name -> (id of the last tables that passed, weak references to their tensors, key)


def _immutable(tables, many: bool) -> bool:
    """Whether ``tables`` is tuples all the way to its tensors."""
    return type(tables) is tuple and (not many or all(type(pair) is tuple for pair in tables))


def check_rotary(name: str, tables, like: torch.Tensor, pairs: int = 1) -> None:
    """``tables``: one rotary ``(cos, sin)`` pair (``pairs == 1``), or a tuple of so many pairs, each
    tensor of shape (seq_len, head_dim) or (batch or 1, seq_len, head_dim) of the dtype of ``like``, the
    queries (batch, heads, seq_len, head_dim), unless autocast is on."""
    autocast = not like.is_meta and torch.is_autocast_enabled(like.device.type)  # (then any dtype; none on meta)
    key = (like.shape, like.dtype, pairs, autocast)
    compiling = torch.compiler.is_compiling()  # (traced once per graph: no memory of earlier calls there)
    last = None if compiling else _ROTARY_CHECKED.get(name)
    if last is not None and last[0] == id(tables) and last[2] == key and _immutable(tables, pairs != 1) and \
            _same(last[1], _tensors(tables, pairs != 1)):
        return  # a model's layers share a step's tables (a list refilled in place is checked again)
    batch, _, seq_len, head_dim = like.shape
    if head_dim % 2:
        raise ValueError(f"{name}: rotary positions rotate pairs of dimensions, and the head dim {head_dim} is odd: "
                         "give an even head_dim, or no rotary tables")
    def shape():  # (formatted only to raise: a compiled model's sizes stay symbolic)
        lead = "1" if batch == 1 else f"{batch} or 1"
        return f"(cos, sin) tensors of shape ({seq_len}, {head_dim}) or ({lead}, {seq_len}, {head_dim})"
    many = pairs != 1
    if many and not (isinstance(tables, (tuple, list)) and len(tables) == pairs):
        raise TypeError(f"{name} must be a tuple of {pairs} pairs of {shape()}, got "
                        f"{type(tables).__name__}{f' of {len(tables)}' if isinstance(tables, (tuple, list)) else ''}")
    for i, pair in enumerate(tables if many else [tables]):
        what = f"{name}[{i}]" if many else name
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(isinstance(t, torch.Tensor) for t in pair)):
            raise TypeError(f"{what} must be a pair of {shape()}, got {type(pair).__name__}")
        for t in pair:
            if t.dim() not in (2, 3) or tuple(t.shape[-2:]) != (seq_len, head_dim) or \
                    (t.dim() == 3 and t.shape[0] not in (1, batch)) or not t.is_floating_point():
                raise ValueError(f"{what} must be {shape()}, got {tuple(t.shape)} {t.dtype}")
            if t.dtype != like.dtype and not autocast:
                raise TypeError(f"{what} are {t.dtype}, the layer's queries {like.dtype}: give the tables in "
                                f"{like.dtype}")
    if not compiling:  # (weakly: a stack of bare layers does not keep its last tables alive)
        _ROTARY_CHECKED[name] = (id(tables), [weakref.ref(t) for t in _tensors(tables, many)], key)


def _same(refs, tensors) -> bool:
    return len(refs) == len(tensors) and all(r() is t for r, t in zip(refs, tensors))


def _tensors(tables, many: bool) -> list:
    return [t for pair in (tables if many else [tables]) for t in pair]


def check_dropout(dropout) -> float:
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be a float in [0, 1), got {dropout!r}")
    return float(dropout)


def check_input_ids(input_ids, vocab_size: Optional[int] = None) -> None:
    """A language model's input: an integer tensor (batch, seq_len), of ids in [0, vocab_size) if given."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int32, torch.int64) \
            or input_ids.dim() != 2:
        raise ValueError(f"input_ids must be an int64 (or int32) tensor of shape (batch, seq_len), got "
                         f"{getattr(input_ids, 'dtype', '')} {getattr(input_ids, 'shape', type(input_ids).__name__)}")
    if vocab_size is not None and input_ids.numel() and not input_ids.is_meta and not unreadable(input_ids) and (
            int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab_size):
        raise ValueError(f"input_ids must lie in [0, {vocab_size})")


def check_labels(labels, batch: int, seq_len: int, vocab_size: int, ignore_index: int = -100) -> None:
    """A causal LM's targets: an int64 tensor (batch, seq_len) of the scored positions, ids in
    [0, vocab_size) or ``ignore_index`` (the loss's argument, -100 by default: not scored); the loss
    shifts them itself."""
    if not isinstance(labels, torch.Tensor) or labels.dtype != torch.int64 or tuple(labels.shape) != (batch, seq_len):
        raise ValueError(f"labels must be an int64 tensor of shape ({batch}, {seq_len}) like the logits, got "
                         f"{getattr(labels, 'dtype', '')} {getattr(labels, 'shape', type(labels).__name__)}")
    if unreadable(labels):
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab_size))
    if bool(bad.any()):
        raise ValueError(f"labels must lie in [0, {vocab_size}) or be {ignore_index} (ignore_index: not scored), "
                         f"got {int(labels[bad][0])}")


def check_position_ids(position_ids, batch: int, seq_len: int) -> torch.Tensor:
    """Explicit positions: an integer tensor of shape (batch, seq_len), (1, seq_len) or (seq_len,);
    returned with two dims, as int64 (a learned position table's lookup takes no narrower ints)."""
    ok = isinstance(position_ids, torch.Tensor) and not position_ids.is_floating_point() and not \
        position_ids.is_complex() and position_ids.dtype != torch.bool and (
        position_ids.shape == (seq_len,) or (position_ids.dim() == 2 and position_ids.shape[1] == seq_len
                                             and position_ids.shape[0] in (1, batch)))
    if not ok:
        shapes = " or ".join(dict.fromkeys([f"({batch}, {seq_len})", f"(1, {seq_len})", f"({seq_len},)"]))
        raise ValueError(f"position_ids must be an integer tensor of shape {shapes}, got "
                         f"{getattr(position_ids, 'dtype', '')} {getattr(position_ids, 'shape', type(position_ids).__name__)}")
    return position_ids.view(-1, seq_len).long()


def token_positions(input_ids: torch.Tensor, attention_mask=None) -> torch.Tensor:
    """(batch, seq_len) rotary positions: 0, 1, 2, ..., or with a (batch, seq_len) mask of 1/0 the count
    of real tokens before each one, so a padded sequence sees the positions it has alone."""
    b, n = input_ids.shape
    if isinstance(attention_mask, torch.Tensor) and attention_mask.shape == (b, n):
        return (attention_mask.long().cumsum(1) - 1).clamp(min=0)
    return torch.arange(n, device=input_ids.device)[None].expand(b, -1)


@eager  # (a host read of the mask's values)
def mask_to_valid(attention_mask, batch: int, seq_len: int) -> Optional[torch.Tensor]:
    """A (batch, seq_len) mask of 1 (real) / 0 (padding) as a bool tensor; None stays None."""
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be a padding mask of shape ({batch}, {seq_len}) (1 real token, 0 "
                         f"padding), got {tuple(attention_mask.shape)}: bsbr's attention layers decide by their own "
                         "rule which keys a token reads (a BSBR model by its window and retrieved blocks), so they "
                         "take no other mask (no 3-D or 4-D attention mask)")
    if attention_mask is not None and exporting():
        raise NotImplementedError("torch.export cannot record an attention_mask of a BSBR model: its padding is "
                                  "removed by value (the real tokens renumbered); export without one")
    valid = check_valid(attention_mask, batch, seq_len, name="attention_mask")
    if valid is not None and attention_mask.dtype != torch.bool and not attention_mask.is_meta and not bool(
            ((attention_mask == 0) | (attention_mask == 1)).all()):  # (the meta device holds no values to check)
        raise ValueError("attention_mask must hold only 1 (real token) and 0 (padding)")
    return valid

