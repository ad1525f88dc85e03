"""Training checkpoints without pickles: tensors (trainable weights, optimizer moments) in
safetensors, everything else (step, stage, hyper-parameters, loss log) in JSON."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict

import torch
from safetensors.torch import load_file, save_file

WEIGHTS = "trainable.safetensors"
OPTIM = "optimizer.safetensors"
STATE = "progress.json"


def save_checkpoint(directory: Path, params: Dict[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer,
                    progress: dict) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / ".tmp"
    tmp.mkdir(exist_ok=True)
    save_file({k: p.detach().contiguous() for k, p in params.items()}, tmp / WEIGHTS)
    index = {id(p): k for k, p in params.items()}
    tensors, scalars = {}, {}
    for p, st in optimizer.state.items():
        for field, value in st.items():
            key = f"{index[id(p)]}::{field}"
            if isinstance(value, torch.Tensor):
                tensors[key] = value.detach().contiguous()
            else:
                scalars[key] = value
    save_file(tensors, tmp / OPTIM)
    (tmp / STATE).write_text(json.dumps({**progress, "optimizer_scalars": scalars}, indent=1))
    for name in (WEIGHTS, OPTIM, STATE):  # replace the previous checkpoint only once the new one is complete
        os.replace(tmp / name, directory / name)
    tmp.rmdir()


def has_checkpoint(directory: Path) -> bool:
    return all((Path(directory) / n).is_file() for n in (WEIGHTS, OPTIM, STATE))


def load_checkpoint(directory: Path, params: Dict[str, torch.nn.Parameter],
                    optimizer: torch.optim.Optimizer) -> dict:
    directory = Path(directory)
    if not has_checkpoint(directory):
        raise FileNotFoundError(f"no complete checkpoint in {directory} (need {WEIGHTS}, {OPTIM}, {STATE})")
    weights = load_file(directory / WEIGHTS)
    if set(weights) != set(params):
        raise ValueError(f"checkpoint in {directory} holds different parameters than the student trains: "
                         f"missing {sorted(set(params) - set(weights))[:5]}, extra {sorted(set(weights) - set(params))[:5]}")
    with torch.no_grad():
        for k, p in params.items():
            if weights[k].shape != p.shape:
                raise ValueError(f"checkpoint shape mismatch for {k}: {tuple(weights[k].shape)} vs {tuple(p.shape)}")
            p.copy_(weights[k])
    progress = json.loads((directory / STATE).read_text())
    moments = load_file(directory / OPTIM)
    scalars = progress.pop("optimizer_scalars", {})
    optimizer.state.clear()
    for k, p in params.items():
        st = {}
        for key, value in list(moments.items()) + list(scalars.items()):
            name, _, field = key.partition("::")
            if name == k:
                st[field] = value
        if st:
            optimizer.state[p] = st
    return progress
