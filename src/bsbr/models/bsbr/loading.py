"""Loading a saved BSBR model strictly: a missing or mismatched weight is an error, never a silent
random initialisation (which is what a plain ``from_pretrained`` does with a warning)."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import SafetensorError

from .modeling_bsbr import BSBRForCausalLM, refuse_other_model_type


def load_bsbr_model(path: os.PathLike, dtype: torch.dtype = torch.float32) -> BSBRForCausalLM:
    """A saved BSBR model (a ``bsbr convert`` / ``save_pretrained`` directory) in eval mode, from its
    safetensors weights only, strictly (a missing, unexpected or mismatched weight is refused)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a saved BSBR model directory (no config.json)")
    refuse_other_model_type(path)
    if not any(path.glob("*.safetensors")):
        raise FileNotFoundError(f"{path} has no .safetensors weights (pickled checkpoints are not loaded)")
    try:  # strict: BSBRPreTrainedModel.from_pretrained refuses missing, unexpected or mismatched weights
        model = BSBRForCausalLM.from_pretrained(str(path), dtype=dtype, use_safetensors=True)
    except (OSError, RuntimeError, ValueError, SafetensorError) as e:
        raise ValueError(f"could not load the BSBR checkpoint in {path}: {e}") from e
    return model.eval()
