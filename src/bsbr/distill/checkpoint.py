"""Training checkpoints without pickles: trainable weights and optimizer moments in safetensors, the
rest in ``manifest.json`` (step, run settings, loss log, each data file's size and SHA-256).

A save writes and fsyncs new data files (names unique to the save), replaces ``manifest.json`` in one
rename, then removes the files it does not name: a kill at any moment leaves the previous checkpoint or
the new one (or, during the first save, no checkpoint: data files the next save removes). A load checks
every file against the manifest and refuses a partial or corrupt checkpoint.
"""
from __future__ import annotations

import contextlib
import json
import math
import uuid
from pathlib import Path
from typing import Dict

import torch
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError
from ..outputs import atomic_write_text, checkpoint_file, earlier_checkpoint, file_record, fsync, shared_modes

MANIFEST = "manifest.json"
FORMAT = 3  # the manifest layout this bsbr writes and reads
START_OVER = "start a new --output, or pass --overwrite to start over in this one"
EARLIER = "progress.json"  # (with trainable.safetensors, optimizer.safetensors, no manifest: before 2026-11-29)


def earlier_layout(directory: Path) -> bool:
    """Whether ``directory`` holds a checkpoint of bsbr distill before 2026-11-29 (no manifest), which this bsbr
    cannot continue: the recipe it trained by was retired."""
    return earlier_checkpoint(Path(directory)) and not (Path(directory) / MANIFEST).exists()


def earlier_layout_error(directory: Path, start_over: str = START_OVER) -> CheckpointError:
    return CheckpointError(f"checkpoint {directory} was written by an earlier bsbr (before 2026-11-29: {EARLIER}, no "
                           f"{MANIFEST}), whose runs this bsbr cannot continue: {start_over}")


def save_checkpoint(directory: Path, params: Dict[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer,
                    progress: dict) -> None:
    """Write a checkpoint of ``params`` and ``optimizer`` into ``directory``; its manifest, written last in
    one rename, is what makes it the checkpoint. A save that fails (a full disk) removes its own files
    and the folders it made, so the previous checkpoint, or none, stays as it was."""
    directory = Path(directory)
    made = [p for p in [directory, *directory.parents] if not p.exists()]
    tag = f"{progress.get('step', 0):07d}-{uuid.uuid4().hex[:8]}"
    names = dict(weights=f"trainable-{tag}.safetensors", optimizer=f"optimizer-{tag}.safetensors")
    try:
        directory.mkdir(parents=True, exist_ok=True)  # (inside: the folders made before one failed are removed)
        _write_checkpoint(directory, names, params, optimizer, progress)
    except BaseException:
        if _names_in_manifest(directory) >= set(names.values()):  # (interrupted after its manifest was renamed
            raise  # into place: the save is complete)
        for name in names.values():
            (directory / name).unlink(missing_ok=True)
        for folder in made:  # (deepest first; only where still empty)
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    keep = set(names.values()) | {MANIFEST}
    for p in directory.iterdir():  # the previous checkpoint's files, and any a killed save left behind
        if p.name not in keep and p.is_file():
            p.unlink(missing_ok=True)


def _names_in_manifest(directory: Path) -> set:
    """The data files the manifest in ``directory`` names (none when it is missing or unreadable)."""
    with contextlib.suppress(OSError, ValueError, AttributeError, TypeError, RecursionError):
        return {f["name"] for f in json.loads((directory / MANIFEST).read_text(encoding="utf-8"))["files"].values()}
    return set()


def _write_checkpoint(directory: Path, names: dict, params, optimizer, progress: dict) -> None:
    save_file({k: p.detach().contiguous() for k, p in params.items()}, directory / names["weights"])
    index = {id(p): k for k, p in params.items()}
    state = {f"{index[id(p)]}::{field}": v for p, st in optimizer.state.items() for field, v in st.items()}
    tensors = {k: v.detach().contiguous() for k, v in state.items() if isinstance(v, torch.Tensor)}
    scalars = {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}
    save_file(tensors, directory / names["optimizer"])
    files = {}
    shared_modes(directory)
    for role, name in names.items():
        fsync(directory / name)
        files[role] = dict(name=name, **file_record(directory / name))
    manifest = dict(format=FORMAT, step=progress.get("step"), files=files,
                    progress={**progress, "optimizer_scalars": scalars})
    atomic_write_text(directory / MANIFEST, json.dumps(manifest, indent=1))


def has_checkpoint(directory: Path) -> bool:
    """Whether ``directory`` holds a checkpoint, complete or not: anything but what a first save killed
    before its manifest leaves (its data files: no checkpoint yet, and the next save removes them)."""
    directory = Path(directory)
    return directory.is_dir() and (earlier_layout(directory) or any(p.name == MANIFEST or not checkpoint_file(p)
                                                                    for p in directory.iterdir()))


def read_manifest(directory: Path) -> dict:
    """The manifest of the checkpoint in ``directory``, with every file checked (exists, size, SHA-256)."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        present = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []
        raise CheckpointError(f"checkpoint {directory} is partial: no {MANIFEST} (found {present[:4]}); {START_OVER}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise CheckpointError(f"checkpoint {path} is unreadable ({e}); {START_OVER}") from e
    if isinstance(manifest, dict) and manifest.get("format") != FORMAT:  # (an older bsbr's layout differs)
        raise CheckpointError(f"checkpoint {directory} has format {manifest.get('format')}, this bsbr reads {FORMAT}: "
                              f"{START_OVER}")
    why = _layout_error(manifest)
    if why:
        raise CheckpointError(f"checkpoint {path} is not one bsbr distill wrote ({why}); {START_OVER}")
    files = manifest["files"]
    for role, f in files.items():
        p = directory / f["name"]
        if not p.is_file():
            raise CheckpointError(f"checkpoint {directory} is partial: {f['name']} is missing; {START_OVER}")
        record = file_record(p)
        if record["size"] != f["size"] or record["sha256"] != f["sha256"]:
            raise CheckpointError(f"checkpoint {directory} is corrupt: {f['name']} is {record['size']} bytes with "
                                  f"another hash than the {f['size']} bytes recorded; {START_OVER}")
    return manifest


def _layout_error(manifest) -> str:
    """What in a manifest's layout is not as :func:`save_checkpoint` writes it (a hand edit), or ''."""
    def number(x, kind=(int, float)):
        return isinstance(x, kind) and not isinstance(x, bool) and math.isfinite(x) and x >= 0

    if not isinstance(manifest, dict):
        return "not a JSON object"
    files, progress = manifest.get("files"), manifest.get("progress")
    if not isinstance(files, dict) or set(files) != {"weights", "optimizer"}:
        return "files must name the weights and the optimizer"
    for role, f in files.items():
        if not (isinstance(f, dict) and isinstance(f.get("name"), str) and Path(f["name"]).name == f["name"]
                and f["name"] not in ("", ".", "..") and number(f.get("size"), int) and isinstance(f.get("sha256"), str)):
            return f"files.{role} must have a file name, a size and a sha256"
    if not isinstance(progress, dict):
        return "progress must be an object"
    if not number(progress.get("step"), int):
        return "progress.step must be a whole number >= 0"
    if not number(progress.get("elapsed")):
        return "progress.elapsed must be seconds >= 0"
    if not isinstance(progress.get("log"), list) or any(not isinstance(e, dict) or not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) for x in e.values()) for e in progress["log"]):
        return "progress.log must be a list of objects of numbers"
    for key, kind in (("config", dict), ("run", dict), ("optimizer_scalars", dict), ("replaces", list)):
        if key in progress and not isinstance(progress[key], kind):
            return f"progress.{key} must be a {'list' if kind is list else 'JSON object'}"
    if any(not isinstance(n, str) or Path(n).name != n or n in ("", ".", "..") for n in progress.get("replaces", [])):
        return "progress.replaces must list file names in --output"
    return ""


def load_checkpoint(directory: Path, params: Dict[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer,
                    manifest: dict) -> dict:
    """Load the checkpoint that ``manifest`` (from :func:`read_manifest`) describes into ``params`` and
    ``optimizer``; returns its progress."""
    try:
        weights = load_file(directory / manifest["files"]["weights"]["name"])
        moments = load_file(directory / manifest["files"]["optimizer"]["name"])
    except Exception as e:  # the hashes matched, so this is a checkpoint written wrongly
        raise CheckpointError(f"checkpoint {directory}: cannot read its tensors ({e})") from e
    if set(weights) != set(params):
        raise CheckpointError(f"checkpoint {directory} holds different parameters than the student trains: "
                              f"missing {sorted(set(params) - set(weights))[:5]}, "
                              f"extra {sorted(set(weights) - set(params))[:5]}")
    for k, p in params.items():
        if weights[k].shape != p.shape:
            raise CheckpointError(f"checkpoint {directory}: {k} has shape {tuple(weights[k].shape)}, "
                                  f"the student's is {tuple(p.shape)}")
    _check_state(directory, weights, moments, manifest["progress"].get("optimizer_scalars", {}), params)
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(weights[k])
    progress = dict(manifest["progress"])
    scalars = progress.pop("optimizer_scalars", {})
    optimizer.state.clear()
    for key, value in {**moments, **scalars}.items():
        name, _, field = key.partition("::")
        if name in params:
            optimizer.state[params[name]][field] = value
    return progress


def _check_state(directory: Path, weights: dict, moments: dict, scalars: dict, params: dict) -> None:
    """A :class:`CheckpointError` for tensors :func:`save_checkpoint` does not write: weights that are not finite
    floats of the student's shapes, and optimizer state that is not each trained tensor's moments (finite floats
    of its shape, the same fields for each) with a step count >= 0 (a hand edit or another program's file)."""
    def bad(why):
        return CheckpointError(f"checkpoint {directory} is not one bsbr distill wrote ({why}); {START_OVER}")

    for k, w in weights.items():
        if not w.is_floating_point() or not bool(torch.isfinite(w).all()):
            raise bad(f"{k} is not finite floating-point numbers")
    fields = {}
    for key, value in {**moments, **scalars}.items():
        name, _, field = key.partition("::")
        if name not in params:
            raise bad(f"optimizer state {key!r} belongs to no trained parameter")
        fields.setdefault(name, set()).add(field)
        if field == "step":
            step = value.item() if isinstance(value, torch.Tensor) and value.numel() == 1 else value
            if isinstance(step, bool) or not isinstance(step, (int, float)) or not math.isfinite(step) or step < 0:
                raise bad(f"{key} is not a step count >= 0")
        elif not (isinstance(value, torch.Tensor) and value.is_floating_point() and value.shape == params[name].shape
                  and bool(torch.isfinite(value).all())):
            raise bad(f"{key} is not finite floating-point numbers of {name}'s shape {tuple(params[name].shape)}")
    if len({frozenset(f) for f in fields.values()}) > 1:  # (a parameter no gradient reached has none)
        raise bad("its optimizer state does not hold the same moments for every trained parameter")
