"""A causal LM's logits a block of positions at a time, made from its final hidden states (the LM
head's input), for the commands that score long windows (``bsbr eval``, ``bsbr distill``): one window's
logits over SmolLM2's 49,152 tokens take 0.8 GB at 4,096 positions and grow with the window; a block's
take 0.2 GB whatever its length."""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

POSITION_BLOCK = 1024  # positions whose logits exist at once


def output_object(model) -> dict:
    """``return_dict=True`` for an HF model whose config asks for tuples (an edited config.json), else nothing
    (a model of one's own need not take the argument)."""
    config = getattr(getattr(model, "module", model), "config", None)  # (DistributedDataParallel: its module's)
    return dict(return_dict=True) if getattr(config, "return_dict", True) is False else {}


def head_rows(model) -> Optional[int]:
    """The rows (the vocabulary) of ``model``'s LM head: its weight's, or a quantized linear's ``out_features`` (its
    weight is a method there); None for a model without one."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    return weight.shape[0] if isinstance(weight, torch.Tensor) else getattr(head, "out_features", None)


def head_replaced(model) -> bool:
    """Whether ``model`` holds an LM head that differs from its input embeddings (a tied config's head replaced:
    transformers runs such a model untied). The meta device holds no values to compare: no."""
    head, embed = (getattr(getattr(model, name, lambda: None)(), "weight", None)
                   for name in ("get_output_embeddings", "get_input_embeddings"))
    if not (isinstance(head, torch.Tensor) and isinstance(embed, torch.Tensor)) or head is embed or \
            head.is_meta or embed.is_meta:
        return False
    return head.shape != embed.shape or not torch.equal(head, embed)


def refuse_without_lm_head(model, role: str, use: str) -> None:
    """A TypeError naming ``role`` when ``model`` has no LM head (a task head's or a base model's class), which
    ``use`` (what needs next-token predictions) cannot run: else a None head failed deep inside."""
    if hasattr(model, "get_output_embeddings") and model.get_output_embeddings() is not None:
        return
    if getattr(model, "module", None) is not None:  # (DistributedDataParallel)
        raise TypeError(f"{role} is a {type(model).__name__} wrapper: give the model it wraps (.module)")
    name = type(model).__name__
    raise TypeError(f"{role} is a {name}, with no LM head, and {use} compares next-token predictions: give the "
                    "causal LM (AutoModelForCausalLM; a task head's model: the causal LM it was made from)")


def final_hidden_states(model, input_ids: torch.Tensor) -> torch.Tensor:
    """(b, n, D): the input of ``model``'s LM head (after the final norm; HF models and BSBR alike) for
    ``input_ids`` (b, n), no cache; the model's own logits are made for the last position only."""
    out = model(input_ids=input_ids, use_cache=False, output_hidden_states=True, logits_to_keep=1,
                **output_object(model))
    if out.hidden_states is None:
        raise ValueError(f"{type(model).__name__} returned no hidden states with output_hidden_states=True")
    return out.hidden_states[-1]


def position_blocks(start: int, end: int) -> List[Tuple[int, int]]:
    """Positions start .. end - 1 as (lo, hi) blocks of at most :data:`POSITION_BLOCK`."""
    return [(lo, min(lo + POSITION_BLOCK, end)) for lo in range(start, end, POSITION_BLOCK)]
