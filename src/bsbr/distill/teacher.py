"""What the teacher (the source model, full attention) shows the student: every layer's attention
input and output, captured with forward hooks on the source's own attention modules."""
from __future__ import annotations

from contextlib import contextmanager
from typing import List, Tuple

import torch

from ..convert.families import FAMILIES


def attention_modules(teacher) -> List[torch.nn.Module]:
    mt = getattr(teacher.config, "model_type", None)
    if mt not in FAMILIES:
        raise ValueError(f"unsupported teacher model type {mt!r}; supported: {sorted(FAMILIES)}")
    fam = FAMILIES[mt]
    root = teacher
    if not any(n.startswith(fam.base_prefix + ".") for n, _ in teacher.named_modules()):
        raise ValueError("the teacher must be a *ForCausalLM / *LMHeadModel (it has to produce logits)")
    n_layers = teacher.config.num_hidden_layers if mt != "gpt2" else teacher.config.n_layer
    return [root.get_submodule(fam.attention_module.format(i=i)) for i in range(n_layers)]


@contextmanager
def capture_attention(teacher):
    """Yields a list that, after a teacher forward, holds (input, output) of every attention layer:
    input = the normalised hidden states the attention reads, output = what it adds to the residual."""
    records: List[Tuple[torch.Tensor, torch.Tensor]] = []
    pending = {}
    handles = []
    for i, mod in enumerate(attention_modules(teacher)):
        def pre(module, args, kwargs, i=i):
            pending[i] = args[0] if args else kwargs["hidden_states"]

        def post(module, args, kwargs, output, i=i):
            out = output[0] if isinstance(output, tuple) else output
            records.append((pending.pop(i).detach(), out.detach()))

        handles.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(mod.register_forward_hook(post, with_kwargs=True))
    try:
        yield records
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def teacher_targets(teacher, input_ids: torch.Tensor, logits: bool = False, attention: bool = True):
    """Run the teacher once: returns (per-layer [(attn_in, attn_out)] or [], logits or None)."""
    if not attention:
        return [], teacher(input_ids).logits
    with capture_attention(teacher) as records:
        out = teacher(input_ids)
    return list(records), (out.logits if logits else None)
