"""Softmax attention over parts of the keys, merged by log-sum-exp: the exact window and the retrieved
blocks are one softmax computed piece by piece."""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def sum_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype sums are kept in, for inputs of ``dtype``: float32 at least. Log-sum-exps and part
    weights (a bfloat16 lse rounds by up to 1/256 of its value, and parts merged by such weights drifted
    ten times further from the float64 reference than one softmax over their keys: 0.115 against 0.009),
    and the chunk states, their weights and read-outs (the gist is the read-out of every chunk less the
    selected ones', renormalised by up to 1/GIST_FLOOR = 100: summed in bfloat16, the chunked and streaming
    forms were 0.07 to 38 times the output's size from the float64 reference, in float32 0.002 to 0.008)."""
    return torch.promote_types(dtype, torch.float32)


def fused_attention(q, k, v) -> bool:
    """Whether :func:`attention_lse` runs PyTorch's fused CPU kernel on these inputs. Not under autograd:
    the kernel's log-sum-exp carries no gradient, and the parts are merged by it."""
    return (_FLASH_CPU is not None and q.device.type == "cpu" and v.shape[-1] == q.shape[-1]
            and q.dtype in (torch.float32, torch.float64, torch.bfloat16)
            and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)))


def attention_lse(q, k, v, allowed: Optional[torch.Tensor], scale: float,
                  bias: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention and its log-sum-exp. q (N, h, M, d), k/v (N, h, W, d); ``allowed`` a bool
    mask broadcastable to (N, h, M, W), or None; or ``bias``, the same mask as 0 / -inf in q's dtype.
    Every row must allow at least one key. Returns o (N, h, M, dv), lse (N, h, M).

    On CPU this is PyTorch's fused flash kernel (it returns the log-sum-exp, SDPA does not);
    elsewhere the plain formula. The lse is in :func:`sum_dtype`."""
    if bias is None and allowed is not None:
        bias = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device).masked_fill_(~allowed, float("-inf"))
    if fused_attention(q, k, v):
        # the kernel reads the last dim as contiguous whatever its stride (a strided x[..., ::2] gives wrong outputs)
        q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
        o, lse = _FLASH_CPU(q, k, v, 0.0, False, attn_mask=bias, scale=scale)
        return o, lse.to(sum_dtype(o.dtype))
    s = (q @ k.transpose(-1, -2)) * scale
    if bias is not None:
        s = s + bias
    s = s.to(sum_dtype(s.dtype))
    return torch.softmax(s, dim=-1).to(v.dtype) @ v, torch.logsumexp(s, dim=-1)


def masked_attention_lse(s: torch.Tensor, allowed: torch.Tensor, v: torch.Tensor):
    """Softmax over scores ``s`` (..., M, W) where ``allowed``; rows with nothing allowed give o = 0 and
    lse = -inf. Returns o (..., M, dv), lse (..., M) in :func:`sum_dtype`."""
    s = s.masked_fill(~allowed, float("-inf")).to(sum_dtype(s.dtype))
    empty = torch.isneginf(s).all(-1, keepdim=True)
    # (an empty row's log-sum-exp taken of zeros, then set: of -infs, its backward is NaN, which anomaly mode raises)
    lse = torch.logsumexp(s.masked_fill(empty, 0.0), dim=-1, keepdim=True)
    p = torch.exp(s - lse)
    return p.to(v.dtype) @ v, lse.masked_fill(empty, float("-inf")).squeeze(-1)


def merge(parts: List[Tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """One softmax from parts (o_i (..., M, dv), lse_i (..., M)) over disjoint keys: weights
    exp(lse_i - max) renormalised. A part with lse = -inf (no key for that row) has weight 0; a row
    no part has a key for (padding) gets 0. Weighted and summed in :func:`sum_dtype`, then cast back."""
    if len(parts) == 1:
        return parts[0][0]
    lses = torch.stack([lse.to(sum_dtype(lse.dtype)) for _, lse in parts])
    top = lses.amax(0)
    w = torch.exp(lses - top.masked_fill(top == float("-inf"), 0.0))
    w = (w / w.sum(0).clamp(min=torch.finfo(w.dtype).tiny)).unsqueeze(-1)
    o = parts[0][0] * w[0]
    for wi, (oi, _) in zip(w[1:], parts[1:]):
        o = o.addcmul_(oi, wi)
    return o.to(parts[0][0].dtype)
