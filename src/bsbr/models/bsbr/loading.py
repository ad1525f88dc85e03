"""Loading a saved BSBR model strictly: a missing or mismatched weight is an error, never a silent
random initialisation (which is what a plain ``from_pretrained`` does with a warning)."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from safetensors import SafetensorError

from ...errors import reads_as_hub_id
from .modeling_bsbr import BSBRForCausalLM, missing_weights, refuse_other_model_type


def folder_identity(path: os.PathLike) -> tuple:
    """What changes when a saved model's folder is replaced (``--overwrite`` renames a new folder into place)
    or published into (``distill`` renames a new config.json in last): the folder's and its config.json's
    inodes (None where missing)."""
    def inode(p):
        try:
            st = os.stat(p)
        except OSError:
            return None
        return st.st_dev, st.st_ino

    return inode(path), inode(Path(path) / "config.json")


def check_unchanged(path: os.PathLike, before: tuple) -> None:
    """Refuse a model folder replaced since :func:`folder_identity` gave ``before``: its files were read from
    two models."""
    if folder_identity(path) != before:
        raise ValueError(f"{path} was replaced while it was read (a bsbr convert --overwrite or distill writing "
                         "there?): run again once that has finished")


def load_bsbr_model(path: os.PathLike, dtype: torch.dtype = torch.float32) -> BSBRForCausalLM:
    """A saved BSBR model (a ``bsbr convert`` / ``save_pretrained`` directory) in eval mode, from its
    safetensors weights only, strictly (a missing, unexpected or mismatched weight is refused); a folder
    replaced while it was read is refused too. ``dtype``: the weights' dtype once loaded."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a model directory's path, got {type(path).__name__}")
    typed, path = os.fspath(path), Path(path)
    before = folder_identity(path)
    if path.is_file():
        raise FileNotFoundError(f"{path} is a file, not a saved BSBR model directory: give the folder holding it")
    if not (path / "config.json").is_file():
        hub = f" (a hub model? load it with AutoModelForCausalLM.from_pretrained({typed!r}) after import bsbr)" \
            if reads_as_hub_id(typed) else ""
        raise FileNotFoundError(f"{path} is not a saved BSBR model directory (no config.json){hub}")
    refuse_other_model_type(path)
    if (missing := missing_weights(path)) is not None:
        raise FileNotFoundError(f"{path} {missing}")
    try:  # strict: BSBRPreTrainedModel.from_pretrained refuses missing, unexpected or mismatched weights
        model = BSBRForCausalLM.from_pretrained(str(path), dtype=dtype, use_safetensors=True)
    except (OSError, RuntimeError, ValueError, SafetensorError) as e:
        check_unchanged(path, before)  # (a config and weights of two models disagree: that is the error to name)
        if isinstance(e, SafetensorError):  # (a file cut short, empty, or not safetensors at all)
            raise ValueError(f"{path}: its .safetensors weights are unreadable, truncated or empty (safetensors: "
                             f"{' '.join(str(e).split())[:120]}): convert it again, or save it with save_pretrained"
                             ) from e
        said = str(e)  # (from_pretrained's own refusals name the folder already)
        raise ValueError(said if said.startswith("the BSBR checkpoint ") else
                         f"could not load the BSBR checkpoint in {path}: {said}") from e
    check_unchanged(path, before)
    if getattr(model, "_hf_peft_config_loaded", False):  # (transformers applies one it finds beside the weights)
        logging.getLogger(__name__).warning("%s holds a peft adapter (adapter_config.json), which transformers "
                                            "applied: the model read is the adapted one", path)
    return model.eval()
