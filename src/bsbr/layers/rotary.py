"""Rotary position embeddings (the Llama-family convention: rotate the two halves of each head)."""
from __future__ import annotations

import torch
from torch import nn

from ..ops.checks import check_int, check_number


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


_MATRICES: list = []  # [(cos, sin, versions, M)]: the last one-token tables as matrices, shared by every
_KEEP = 4  # layer of a decode step (a step uses up to three tables: positions, far queries, far keys)


def _rotation_matrix(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """(b', d, d) M with ``x @ M = x * cos + rotate_half(x) * sin`` for one position per sequence
    (cos/sin with one row per sequence), built once per table object (held, so its identity stays
    unique) and in-place version."""
    versions = (cos._version, sin._version)
    for c_, s_, v_, M in _MATRICES:
        if c_ is cos and s_ is sin and v_ == versions:
            return M
    d = cos.shape[-1]
    c, s = cos.reshape(-1, d), sin.reshape(-1, d)
    h = torch.arange(d // 2, device=cos.device)
    J = cos.new_zeros(d, d)  # x @ J = rotate_half(x)
    J[h + d // 2, h] = -1.0
    J[h, h + d // 2] = 1.0
    M = torch.diag_embed(c) + J * s[:, None, :]
    _MATRICES[:] = _MATRICES[-(_KEEP - 1):] + [(cos, sin, versions, M)]
    return M


def autocast_on(device_type: str) -> bool:
    """Whether autocast is on for the device type (never on ``meta``, which has no autocast to ask)."""
    return device_type != "meta" and torch.is_autocast_enabled(device_type)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (b, h, n, d); cos/sin: (b, n, d) or (n, d). One token per sequence (a decode step) is one
    matmul with the table's rotation matrix, shared by every layer, instead of five elementwise ops (not
    for inference tensors: they have no version counter to tell a table refilled in place, and comparing
    values would wait on the device each call; nor under ``torch.compile``, which fuses the elementwise ops and
    would trace the matrix lookup once, then reuse a matrix of old positions; nor under autocast, where the
    matmul would round to half precision what the elementwise ops keep in the tables' float32)."""
    b, heads, n, d = x.shape
    if (n == 1 and not torch.is_grad_enabled() and not (cos.is_inference() or sin.is_inference())
            and not torch.compiler.is_compiling() and not autocast_on(x.device.type)):
        M = _rotation_matrix(cos, sin)
        if M.shape[0] == 1:
            return (x.reshape(b * heads, d) @ M[0]).view(b, heads, 1, d)
        return torch.bmm(x.reshape(b, heads, d), M).view(b, heads, 1, d)
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


def _restore_inv_freq(module, *args, **kwargs) -> None:
    if module.inv_freq_values is not None:
        with torch.no_grad():
            module.inv_freq.copy_(module.inv_freq_values)


class RotaryEmbedding(nn.Module):
    """cos/sin tables computed on the fly for any position: no table caps the length.

    ``inv_freq`` may be given (e.g. from a source model's rope scaling); otherwise the default
    ``theta ** (-2i/d)``. It is a buffer in no checkpoint: ``load_state_dict`` sets it back to these values (a
    model built on the meta device holds garbage there after ``to_empty()``), so frequencies are changed by
    building the module with them, not by writing into the buffer. ``attention_scaling`` multiplies cos/sin
    (used by some rope types).
    """

    def __init__(self, dim: int, theta: float = 10000.0, inv_freq: torch.Tensor | None = None,
                 attention_scaling: float = 1.0):
        super().__init__()
        check_int("dim", dim)
        if dim % 2:
            raise ValueError(f"rotary dim must be even, got {dim}")
        # theta is the base of the default frequencies: 0, negative, nan, inf or True give nan/constant tables
        check_number("theta (the rotary base, rope_theta)", theta, 0, above=True)
        check_number("attention_scaling", attention_scaling, 0, above=True)
        if inv_freq is not None:
            if not isinstance(inv_freq, torch.Tensor) or not inv_freq.is_floating_point():
                raise TypeError(f"inv_freq must be None or a floating point tensor of shape ({dim // 2},), got "
                                f"{getattr(inv_freq, 'dtype', type(inv_freq).__name__)}")
            if tuple(inv_freq.shape) != (dim // 2,):
                raise ValueError(f"inv_freq must have shape ({dim // 2},) (half the rotary dim {dim}), "
                                 f"got {tuple(inv_freq.shape)}")
            if not inv_freq.is_meta and not bool(torch.isfinite(inv_freq).all()):  # meta: built before loading
                raise ValueError("inv_freq must hold only finite values")
        if inv_freq is None:  # in float32, as the HuggingFace Llama family computes it: in float64 a third
            # of the frequencies differed by an ulp, and a converted model's logits drifted with the position
            # (on the CPU even under a meta device context: the values are what load_state_dict restores)
            inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim))
        here = torch.empty(0).device  # the device context's (torch.device(...), set_default_device), as for
        # parameters; on the meta device the values stay on the CPU: load_state_dict restores them
        self.register_buffer("inv_freq", inv_freq.float() if inv_freq.is_meta or here.type == "meta"
                             else inv_freq.float().to(here), persistent=False)
        # not in any checkpoint (non-persistent), so a model built on the meta device and given real memory by
        # to_empty() holds garbage here: load_state_dict restores it from this copy
        self.inv_freq_values = None if inv_freq.is_meta else inv_freq.detach().float().cpu().clone()
        self.register_load_state_dict_pre_hook(_restore_inv_freq)
        self.attention_scaling = float(attention_scaling)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype = torch.float32):
        """position_ids: (b, n) or (n,) -> cos, sin of shape (b, n, dim) / (n, dim)."""
        # float32 like the HuggingFace Llama-family rotary, so converted models reproduce it exactly
        freqs = position_ids.float()[..., None] * self.inv_freq.to(position_ids.device).float()
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.attention_scaling).to(dtype), (emb.sin() * self.attention_scaling).to(dtype)
