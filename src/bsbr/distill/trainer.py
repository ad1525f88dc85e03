"""Distillation of a converted BSBR model from its source.

Stage 1, attention transfer: everything frozen except the pieces BSBR added (meta projections,
feature maps, retrieval gates, state compression). Each layer's BSBR attention, fed the teacher's
own attention input, is trained to reproduce the teacher's attention output (relative MSE on the
tokens past the first chunk, where the two differ). Layers are independent, so each layer's loss
is back-propagated on its own (memory of one layer at a time).

Stage 2 (optional), end to end: KL(teacher || student) on next-token distributions past the first
chunk, optionally plus an LM loss; trains the new pieces, or every weight, or the new pieces plus LoRA
adapters (peft), merged into the weights when the model is saved.

Data parallel with torch.distributed: under ``torchrun`` every rank takes its own windows and the
gradients are averaged with all_reduce (gloo on CPU) before each optimizer step — the same update
DistributedDataParallel makes, without wrapping a model whose stage-1 forward is not ``forward``.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..layers.bsbr_attention import BSBRAttention
from ..schedule import SCHEDULES, lr_scale
from .checkpoint import has_checkpoint, load_checkpoint, read_manifest, save_checkpoint
from .teacher import teacher_targets

logger = logging.getLogger(__name__)

STAGE2_PARAMS = ("new", "all", "lora")


@dataclass
class DistillConfig:
    steps: Optional[int] = None  # stage-1 optimizer steps (per rank); None = until the time budget
    minutes: Optional[float] = None  # wall-clock budget for both stages
    stage2_steps: int = 0  # end-to-end steps after stage 1
    stage2_share: float = 0.0  # with --minutes and no stage2_steps: fraction of the budget for stage 2
    lr: float = 1e-2
    stage2_lr: float = 1e-3
    stage2_params: str = "new"
    stage2_base_lr: Optional[float] = None  # "all": lr of the source's own weights; "lora": of the adapters
    lm_weight: float = 0.0  # weight of the LM loss beside the KL
    schedule: str = "constant"  # learning-rate schedule within each stage (SCHEDULES)
    bf16: bool = False  # run teacher and student matmuls in bfloat16 (CPU autocast); weights stay float32
    seed: int = 0
    checkpoint_every: int = 25
    log_every: int = 1

    def validate(self) -> None:
        if self.steps is None and self.minutes is None:
            raise ValueError("give --steps or --minutes (the stopping rule)")
        if self.steps is not None and (not isinstance(self.steps, int) or self.steps < 0):
            raise ValueError(f"steps must be an int >= 0, got {self.steps!r}")
        if not isinstance(self.stage2_steps, int) or self.stage2_steps < 0:
            raise ValueError(f"stage2_steps must be an int >= 0, got {self.stage2_steps!r}")
        for name in ("checkpoint_every", "log_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an int >= 1, got {getattr(self, name)!r}")
        if self.minutes is not None and not self.minutes > 0:
            raise ValueError(f"minutes must be > 0, got {self.minutes!r}")
        if not 0.0 <= self.stage2_share < 1.0:
            raise ValueError(f"stage2_share must be in [0, 1), got {self.stage2_share!r}")
        if self.stage2_params not in STAGE2_PARAMS:
            raise ValueError(f"stage2_params must be one of {STAGE2_PARAMS}, got {self.stage2_params!r}")
        if self.lr <= 0 or self.stage2_lr <= 0 or (self.stage2_base_lr is not None and self.stage2_base_lr <= 0):
            raise ValueError("learning rates must be > 0")
        if self.stage2_base_lr is not None and self.stage2_params == "new":
            raise ValueError("stage2_base_lr applies only to stage2_params='all' or 'lora'")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        stage1 = self.steps is None or self.steps > 0  # None: stage 1 runs until its share of the minutes
        stage2 = self.stage2_steps > 0 or (self.stage2_share > 0 and self.minutes is not None)
        if not (stage1 or stage2):
            raise ValueError("nothing to train: stage 1 has 0 steps and stage 2 neither steps (stage2_steps) nor "
                             "a share of the minutes (stage2_share > 0 with minutes)")


# settings a resumed run may change: how long it runs and how often it saves; any other difference refuses
RESUMABLE_CHANGES = ("steps", "minutes", "stage2_steps", "stage2_share", "checkpoint_every", "log_every")


class DistillInterrupted(KeyboardInterrupt):
    """A stop request (Ctrl-C, SIGTERM) honoured after a step: the checkpoint at ``directory`` holds it."""

    def __init__(self, directory: Path, stage: int, step: int):
        super().__init__(f"interrupted at stage {stage} step {step}; checkpoint written to {directory}")
        self.directory, self.stage, self.step = directory, stage, step


def _windows_fingerprint(windows) -> str:
    import hashlib

    h = hashlib.sha256()
    for w in windows:
        h.update(str(tuple(w.shape)).encode())
        h.update(w.detach().cpu().to(torch.int64).contiguous().numpy().tobytes())
    return "sha256:" + h.hexdigest()


def _check_same_run(saved: dict, cfg: "DistillConfig", run: dict, directory: Path) -> None:
    """Refuse to resume a checkpoint written with other settings than this run's."""
    from ..outputs import CheckpointError

    now_cfg = asdict(cfg)
    diffs = [(k, (saved.get("run") or {}).get(k), v) for k, v in run.items() if (saved.get("run") or {}).get(k) != v]
    diffs += [(k, (saved.get("config") or {}).get(k), v) for k, v in now_cfg.items()
              if k not in RESUMABLE_CHANGES and (saved.get("config") or {}).get(k) != v]
    if diffs:
        short = lambda v: v[:19] + "..." if isinstance(v, str) and v.startswith("sha256:") else v  # noqa: E731
        names = dict(windows="the training windows' tokens", teacher="the teacher's weights",
                     student="the student's initial weights")
        shown = "; ".join(f"{names.get(k, k)}: checkpoint {short(a)!r}, now {short(b)!r}" for k, a, b in diffs[:4])
        raise CheckpointError(f"checkpoint {directory} was written by a run with other settings ({shown}): resume "
                              f"with the same settings, or start a new --output")


def new_parameters(student) -> Dict[str, torch.nn.Parameter]:
    """The parameters BSBR added to the source model (what attention transfer trains)."""
    keys = tuple(f".attn.{p}" for p in BSBRAttention.NEW_PARAMETER_PREFIXES)
    return {n: p for n, p in student.named_parameters() if any(k in n for k in keys)}


def _world():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _average_gradients(params) -> None:
    rank, world = _world()
    if world == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
        p.grad.div_(world)


def _set_trainable(student, params: Dict[str, torch.nn.Parameter]) -> None:
    keep = {id(p) for p in params.values()}
    for p in student.parameters():
        p.requires_grad_(id(p) in keep)


def attention_transfer_loss(student, records, input_ids: torch.Tensor, backward: bool = True) -> float:
    """Sum over layers of ||attn_bsbr(x) - attn_teacher(x)||^2 / ||attn_teacher(x)||^2 on the tokens
    past the first chunk; back-propagated layer by layer when ``backward``."""
    cfg = student.config
    n = input_ids.shape[1]
    start = cfg.chunk_size if n > cfg.chunk_size else 0
    cos_sin = None
    if student.model.rotary is not None:
        cos_sin = student.model.rotary(torch.arange(n, device=input_ids.device)[None], torch.float32)
    total = 0.0
    for layer, (x, y) in zip(student.model.layers, records):
        out = layer.attn(x, None, cos_sin)
        err = (out[:, start:] - y[:, start:]).pow(2).mean() / y[:, start:].pow(2).mean().clamp_min(1e-12)
        if backward:
            err.backward()
        total += float(err.detach())
    return total / len(records)


def end_to_end_loss(student, teacher_logits: torch.Tensor, input_ids: torch.Tensor, lm_weight: float):
    """KL(teacher || student) of next-token distributions past the first chunk, plus lm_weight * CE."""
    start = student.config.chunk_size if input_ids.shape[1] > student.config.chunk_size else 0
    logits = student(input_ids).logits[:, start:-1].float()
    t = F.log_softmax(teacher_logits[:, start:-1].float(), -1)
    s = F.log_softmax(logits, -1)
    kl = (t.exp() * (t - s)).sum(-1).mean()
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), input_ids[:, start + 1:].reshape(-1))
    return kl + lm_weight * ce, float(kl.detach()), float(ce.detach())


def _train_step(stage: int, teacher, student, ids: torch.Tensor, cfg: DistillConfig) -> dict:
    """One step's forward and backward (gradients left in ``.grad``); returns the log entry."""
    if stage == 1:
        records, _ = teacher_targets(teacher, ids)
        return dict(stage=1, attn_mse=attention_transfer_loss(student, records, ids))
    _, tlogits = teacher_targets(teacher, ids, logits=True, attention=False)
    total, kl, ce = end_to_end_loss(student, tlogits, ids, cfg.lm_weight)
    total.backward()
    return dict(stage=2, kl=kl, ce=ce)


def _lora_parameters(student) -> Dict[str, torch.nn.Parameter]:
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as e:
        raise ValueError("stage2_params='lora' needs peft: pip install 'bsbr[lora]' (or pip install peft)") from e
    targets = ["q_proj", "k_proj", "v_proj", "out_proj"]
    inject_adapter_in_model(LoraConfig(r=8, lora_alpha=16, target_modules=targets), student)
    return {n: p for n, p in student.named_parameters() if "lora_" in n}


def _merge_lora(student) -> None:
    """Fold LoRA adapters into their base linear layers and put the plain layers back, so the
    saved model is an ordinary BSBR checkpoint."""
    for name, module in list(student.named_modules()):
        if hasattr(module, "base_layer") and hasattr(module, "merge"):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(student.get_submodule(parent_name), child, module.base_layer)


def distill(teacher, student, windows: Sequence[torch.Tensor], output_dir, cfg: DistillConfig,
            resume: bool = False, settings: Optional[dict] = None, should_stop: Optional[Callable[[], bool]] = None,
            extra_files: Optional[Callable[[Path], None]] = None) -> dict:
    """Train ``student`` (a converted BSBRForCausalLM) to imitate ``teacher`` (its source) on token
    ``windows`` (1-D LongTensors). Checkpoints go to ``output_dir/checkpoint`` (see
    :mod:`bsbr.distill.checkpoint`); the final model (``save_pretrained``, ``distill.json``, ``distill.png``
    and what ``extra_files(dir)`` writes) is written by rank 0 beside it and moved into ``output_dir``,
    ``config.json`` last. Returns the progress log.

    An existing checkpoint is continued with ``resume`` (refused, :class:`~bsbr.outputs.CheckpointError`,
    when partial or written with other settings: the teacher's and student's weights, the windows,
    ``settings`` and the config except :data:`RESUMABLE_CHANGES`) and refused without it.
    ``should_stop``: asked after every step; when it answers True, a checkpoint is written and
    :class:`DistillInterrupted` raised."""
    from ..outputs import CheckpointError, weights_fingerprint

    cfg.validate()
    if len(windows) == 0:
        raise ValueError("no training windows")
    rank, world = _world()
    output_dir = Path(output_dir)
    ckpt_dir = output_dir / "checkpoint"
    run = dict(**(settings or {}), windows=_windows_fingerprint(windows), teacher=weights_fingerprint(teacher),
               student=weights_fingerprint(student), world_size=world)
    teacher.eval()
    student.eval()  # no dropout anywhere: deterministic, resumable
    for p in teacher.parameters():
        p.requires_grad_(False)

    order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(cfg.seed))
    progress = dict(stage=1, step=0, elapsed=0.0, log=[], config=asdict(cfg), world_size=world, run=run)

    def build(stage):
        if stage == 1 or cfg.stage2_params == "new":
            params = new_parameters(student)
        elif cfg.stage2_params == "all":
            params = dict(student.named_parameters())
        else:  # the new pieces start from scratch, so they train beside the adapters
            params = {**new_parameters(student), **_lora_parameters(student)}
        _set_trainable(student, params)
        lr = cfg.lr if stage == 1 else cfg.stage2_lr
        groups = [dict(params=list(params.values()), lr=lr, base_lr=lr)]
        if stage == 2 and cfg.stage2_params != "new" and cfg.stage2_base_lr is not None:
            # the new pieces start from scratch and need a large step; changes to the pretrained
            # weights (themselves, or their adapters) a small one
            new = set(new_parameters(student))
            groups = [dict(params=[p for n, p in params.items() if n in new], lr=lr, base_lr=lr),
                      dict(params=[p for n, p in params.items() if n not in new], lr=cfg.stage2_base_lr,
                           base_lr=cfg.stage2_base_lr)]
        return params, torch.optim.AdamW(groups, lr=lr, weight_decay=0.0)

    params, opt = build(1)
    if has_checkpoint(ckpt_dir):
        if not resume:
            raise CheckpointError(f"{ckpt_dir} holds a checkpoint: pass --resume to continue it, --overwrite to "
                                  f"start over, or choose another --output")
        manifest = read_manifest(ckpt_dir)
        _check_same_run(manifest["progress"], cfg, run, ckpt_dir)
        if manifest["progress"]["stage"] == 2:
            params, opt = build(2)
        progress = load_checkpoint(ckpt_dir, params, opt, manifest)
        progress["config"] = asdict(cfg)  # the stopping rule and save interval of this run
        logger.info("resumed from %s at stage %d step %d", ckpt_dir, progress["stage"], progress["step"])
    elif resume:
        logger.info("--resume: no checkpoint in %s yet, starting fresh", ckpt_dir)

    budget = None if cfg.minutes is None else cfg.minutes * 60.0
    stage1_budget = None if budget is None else budget * (1.0 - (cfg.stage2_share if not cfg.stage2_steps else 0.0))
    t0 = time.monotonic() - progress["elapsed"]

    def stage_done(stage) -> bool:
        elapsed = time.monotonic() - t0
        if stage == 1:
            return (cfg.steps is not None and progress["step"] >= cfg.steps) or (
                stage1_budget is not None and elapsed >= stage1_budget)
        limit = cfg.stage2_steps or (math.inf if cfg.stage2_share > 0 and budget is not None else 0)
        return progress["step"] >= limit or (budget is not None and elapsed >= budget)

    def stage_fraction(stage) -> float:
        """How far through its stage the run is: by steps, by time, whichever is further."""
        start = progress.get("stage_start", 0.0)  # seconds into the run when this stage began
        elapsed = time.monotonic() - t0 - start
        if stage == 1:
            steps, seconds = cfg.steps, stage1_budget
        else:
            steps, seconds = cfg.stage2_steps, None if budget is None else budget - start
        fractions = [progress["step"] / steps if steps else 0.0,
                     elapsed / seconds if seconds else 0.0]
        return max(fractions)

    bar = tqdm(disable=rank != 0, desc="distill", unit="step")
    while progress["stage"] <= 2:
        stage = progress["stage"]
        if stage_done(stage):
            if rank == 0:
                save_checkpoint(ckpt_dir, params, opt, {**progress, "elapsed": time.monotonic() - t0})
            if stage == 1:
                progress.update(stage=2, step=0, stage_start=time.monotonic() - t0)
                if not stage_done(2):
                    params, opt = build(2)
                    continue
            progress["stage"] = 3
            break
        ids = windows[int(order[(progress["step"] * world + rank) % len(windows)])][None]
        scale = lr_scale(cfg.schedule, stage_fraction(stage))
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * scale
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            entry = _train_step(stage, teacher, student, ids, cfg)
        entry["step"] = progress["step"]
        entry["lr_scale"] = round(scale, 6)
        _average_gradients(params.values())
        opt.step()
        progress["step"] += 1
        entry["seconds"] = round(time.monotonic() - t0, 2)
        progress["log"].append(entry)
        bar.update(1)
        bar.set_postfix({k: round(v, 4) for k, v in entry.items() if k in ("attn_mse", "kl", "ce")})
        stop = _stop_requested(should_stop)
        if rank == 0 and (stop or progress["step"] % cfg.checkpoint_every == 0):
            save_checkpoint(ckpt_dir, params, opt, {**progress, "elapsed": time.monotonic() - t0})
        if stop:
            bar.close()
            if dist.is_available() and dist.is_initialized():
                dist.barrier()
            raise DistillInterrupted(ckpt_dir, stage, progress["step"])
    bar.close()
    progress["elapsed"] = time.monotonic() - t0
    if rank == 0:
        import shutil
        import tempfile

        from ..outputs import publish_files
        from .plots import plot_progress

        for p in student.parameters():
            p.requires_grad_(True)
        _merge_lora(student)
        for stale in output_dir.glob(".final.tmp-*"):  # what a killed run left
            shutil.rmtree(stale, ignore_errors=True)
        final = Path(tempfile.mkdtemp(prefix=".final.tmp-", dir=output_dir))
        try:
            student.save_pretrained(final)
            (final / "distill.json").write_text(json.dumps(progress, indent=1))
            plot_progress(progress, final / "distill.png")
            if extra_files is not None:
                extra_files(final)
            publish_files(final, output_dir)
        except BaseException:
            shutil.rmtree(final, ignore_errors=True)
            raise
    return progress


def _stop_requested(should_stop) -> bool:
    """``should_stop()``, agreed by all ranks (any rank asked: all stop after this step)."""
    stop = bool(should_stop()) if should_stop is not None else False
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        flag = torch.tensor([1.0 if stop else 0.0])
        dist.all_reduce(flag)
        stop = bool(flag.item() > 0)
    return stop
