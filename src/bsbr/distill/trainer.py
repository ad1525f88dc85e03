"""Distillation of a converted BSBR model from its source: KL(teacher || student) of next-token
distributions past the first chunk, optionally plus an LM loss, over the pieces BSBR added, every weight,
or the new pieces plus LoRA adapters (merged when saved). Under ``torchrun`` every rank takes its own
windows and :class:`~torch.nn.parallel.DistributedDataParallel` (gloo on CPU) averages the gradients.
"""
from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Dict, Iterable, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..convert.converter import is_new_parameter
from ..arguments import weights_fingerprint
from ..errors import CheckpointError
from ..models.bsbr.reach import exact_reach, gate_open
from ..models.bsbr.modeling_bsbr import quantized_module
from ..models.heads import final_hidden_states, head_rows, position_blocks, refuse_without_lm_head
from ..outputs import checkpoint_strays, is_bsbr_output, publish_files, resume_strays, temp_dir
from ..progress import bar as progress_bar
from ..results import software, write_json
from ..ops.checks import check_int, check_number, is_number, shown
from .budget import check_step_fits
from .checkpoint import (earlier_layout, earlier_layout_error, has_checkpoint, load_checkpoint, read_manifest,
                         save_checkpoint)

logger = logging.getLogger(__name__)

PARAMS = ("new", "all", "lora")
LOWER_LR = ("lower the learning rate (--lr, or --base-lr) and start over (--overwrite): nothing past the last "
            "checkpoint was saved, and it may hold weights of the diverging steps")


@dataclass
class DistillConfig:
    """How :func:`distill` trains. ``steps`` or ``minutes`` is required (the stopping rule; with both, whichever
    ends first). ``params``: "new" (the pieces conversion added: gates, meta maps, feature maps), "all" (every
    weight) or "lora" (the new pieces plus LoRA adapters, folded in when published); ``lr`` is the new pieces'
    learning rate and ``base_lr`` (params "all" or "lora" only) that of the source's weights or their adapters.
    ``lm_weight`` weighs a next-token loss beside the KL to the teacher; ``bf16`` runs the matmuls under bfloat16
    autocast (the weights stay float32); ``checkpoint_every`` steps a checkpoint is written;
    ``activation_checkpointing`` recomputes each layer in the backward pass (less memory, one more forward)."""

    steps: Optional[int] = None  # optimizer steps (per rank); None = until the time budget
    minutes: Optional[float] = None  # wall-clock budget; with steps, whichever ends first
    lr: float = 3e-3  # learning rate of the new pieces
    params: str = "new"  # what trains: the new pieces, all weights, or the new pieces plus LoRA adapters
    base_lr: Optional[float] = None  # "all": lr of the source's own weights (None: BASE_LR); "lora": of the
    # adapters (None: lr)
    lm_weight: float = 0.0  # weight of the LM loss beside the KL
    bf16: bool = False  # run teacher and student matmuls in bfloat16 (CPU autocast); weights stay float32
    seed: int = 0
    checkpoint_every: int = 25
    # recompute each decoder layer in the backward pass: a 4,096-token window of the default conversion peaks
    # at 5.3 GB with it (without it, killed at 24 GB), for one more forward pass per step (docs/findings.md)
    activation_checkpointing: bool = True

    def resolved(self) -> "DistillConfig":
        """This config, validated, with the defaults that depend on ``params`` filled in (a copy)."""
        self.validate()
        return replace(self, base_lr=BASE_LR) if self.params == "all" and self.base_lr is None else self

    def validate(self) -> None:
        if self.steps is None and self.minutes is None:
            raise ValueError("give steps or minutes (the stopping rule)")
        if self.base_lr is not None and self.params == "new":
            raise ValueError("base_lr applies only to params all or lora")
        if self.steps is not None:
            check_int("steps", self.steps)
        check_int("checkpoint_every", self.checkpoint_every)
        if self.minutes is not None and not (is_number(self.minutes) and 0 < self.minutes < math.inf):
            raise ValueError(f"minutes must be a finite number > 0, got {shown(self.minutes)}")
        if self.params not in PARAMS:
            raise ValueError(f"params must be one of {PARAMS}, got {self.params!r}")
        check_number("lr", self.lr, 0, above=True)
        if self.base_lr is not None:
            check_number("base_lr", self.base_lr, 0, above=True)
        check_number("lm_weight", self.lm_weight, 0)
        for name in ("bf16", "activation_checkpointing"):  # ("no" is truthy)
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise TypeError(f"seed must be an int, got {self.seed!r}")
        if not -2 ** 63 <= self.seed < 2 ** 64:  # (what torch's generators take)
            raise ValueError(f"seed must be an int in [-2**63, 2**64), got {self.seed}")


# settings a resumed run may change: how long it runs and how often it saves; any other difference refuses
BASE_LR = 6e-5  # params "all": the source's own weights' learning rate unless given (they move little; the new
# pieces start from scratch at lr)
STEP_LOG_SECONDS = 60.0  # without a progress bar (a log file, --no-progress) a step's losses are logged this often
RESUMABLE_CHANGES = ("steps", "minutes", "checkpoint_every", "activation_checkpointing")


class DistillInterrupted(KeyboardInterrupt):
    """A stop request (Ctrl-C, SIGTERM) honoured after a step, once its checkpoint is written."""


def windows_fingerprint(windows) -> str:
    h = hashlib.sha256()
    for w in windows:
        h.update(str(tuple(w.shape)).encode())
        h.update(w.detach().cpu().to(torch.int64).contiguous().numpy().tobytes())
    return "sha256:" + h.hexdigest()


def student_record(config) -> dict:
    """What a checkpoint records of the student's config: every option of its config class (sizes, chunk
    size, sink tokens, local chunks, retrieval, ...) but ``use_cache``, as JSON would give it back."""
    names = [n for n, p in inspect.signature(type(config).__init__).parameters.items()
             if n not in ("self", "use_cache") and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    return json.loads(json.dumps({n: getattr(config, n, None) for n in names}, default=str))


def check_same_run(saved: dict, cfg: DistillConfig, run: dict, directory: Path, flags: bool = False) -> None:
    """Refuse to resume a checkpoint written with other settings than this run's: those in ``run`` (the
    run's settings, fingerprints and student config; any subset of them) and the config (but
    :data:`RESUMABLE_CHANGES`), naming every one that differs (as ``bsbr distill``'s flag with ``flags``).
    ``saved``: the checkpoint's progress."""
    old_run, old_cfg = saved.get("run") or {}, saved.get("config") or {}
    if old_cfg.get("params") == "all" and old_cfg.get("base_lr") is None:  # (written from Python before BASE_LR:
        old_cfg = {**old_cfg, "base_lr": old_cfg.get("lr")}  # the source's weights trained at lr)
    was, now = old_run.get("world_size"), run.get("world_size")
    if was is not None and now is not None and was != now:  # the data order follows the number of processes
        how = "in one process, without torchrun" if was == 1 else f"under torchrun --nproc_per_node {was}"
        raise CheckpointError(f"checkpoint {directory} was written by a run of {was} process(es), this one has {now}: "
                              f"resume it {how}, or start a new --output")
    diffs = []
    for k, v in run.items():
        old = old_run.get(k)
        if k == "student_config" and old is None:  # a checkpoint of an older bsbr
            logger.warning("checkpoint %s records no student config (an older bsbr wrote it): only the student's "
                           "weights are checked", directory)
        elif isinstance(old, dict) and isinstance(v, dict):  # (what the checkpoint records: a later bsbr records
            gone = {n: x for n, x in old.items() if n not in v and x not in (None, 0)}  # more, or retired some)
            if gone:
                whose = "the student's" if k == "student_config" else f"{k}'s"
                raise CheckpointError(f"checkpoint {directory} records {whose} "
                                      + ", ".join(f"{n}={x!r}" for n, x in gone.items())
                                      + ": an option an earlier bsbr had and this one does not compute; start a "
                                      "new --output")
            diffs += [(f"{k}.{n}", old[n], v[n]) for n in sorted(old) if n in v and old[n] != v[n]]
        elif old != v:
            diffs.append((k, old, v))
    diffs += [(k, old_cfg.get(k), v) for k, v in asdict(cfg).items()
              if k not in RESUMABLE_CHANGES and old_cfg.get(k) != v]
    if diffs:
        short = lambda v: v[:19] + "..." if isinstance(v, str) and v.startswith("sha256:") else v  # noqa: E731
        names = dict(windows="the training windows' tokens", teacher="the teacher's weights",
                     student="the student's initial weights")

        def label(k):
            if k.startswith("student_config."):
                return "the student's " + k.split(".", 1)[1]
            return names.get(k, "--" + k.replace("_", "-") if flags else k)

        shown = "; ".join(f"{label(k)}: checkpoint {short(a)!r}, now {short(b)!r}" for k, a, b in diffs)
        raise CheckpointError(f"checkpoint {directory} was written by a run with other settings ({shown}): resume "
                              f"with the same settings, or start a new --output")


def new_parameters(student) -> Dict[str, torch.nn.Parameter]:
    """The parameters BSBR added to the source model."""
    return {n: p for n, p in student.named_parameters() if is_new_parameter(n)}


def end_to_end_loss(student, teacher, input_ids: torch.Tensor, lm_weight: float):
    """KL(teacher || student) of next-token distributions past the first chunk (of every position when
    no token lies past it), plus lm_weight * CE.
    Returns (the loss, its KL and CE as floats). ``student``: the model, or its DistributedDataParallel
    wrapper (whose forward averages gradients); ``teacher`` runs without gradients.

    Logits exist a block of positions at a time (:mod:`bsbr.models.heads`), each block's made again in
    the backward pass: both models' logits of a whole 4,096-token window, with their softmaxes and
    gradients, were 4 of a step's 9.4 GB (float32)."""
    model = getattr(student, "module", student)
    refuse_without_lm_head(model, "student", "the distillation loss")
    refuse_without_lm_head(teacher, "teacher", "the distillation loss")
    n = input_ids.shape[1]
    if n < 2:
        raise ValueError(f"input_ids of {n} token(s) per window: nothing to predict (give windows of >= 2 tokens)")
    # the predictions of tokens past the first chunk; all of them when there are none
    start = model.config.chunk_size if n - 1 > model.config.chunk_size else 0
    with torch.no_grad():
        teacher_h = final_hidden_states(teacher, input_ids)
    student_h = final_hidden_states(student, input_ids)
    s_head, t_head = model.get_output_embeddings(), teacher.get_output_embeddings()

    def sums(h, th, targets):  # (KL, CE) summed over a block's positions
        s = F.log_softmax(s_head(h).float(), -1)
        with torch.no_grad():
            t = F.log_softmax(t_head(th).float(), -1)
        kl = (t.exp() * (t - s)).sum()
        return torch.stack([kl, F.nll_loss(s.flatten(0, 1), targets.flatten().long(), reduction="sum")])

    total = sum(checkpoint(sums, student_h[:, lo:hi], teacher_h[:, lo:hi], input_ids[:, lo + 1:hi + 1],
                           use_reentrant=False) for lo, hi in position_blocks(start, n - 1))
    kl, ce = total / (input_ids.shape[0] * (n - 1 - start))
    return kl + lm_weight * ce, float(kl.detach()), float(ce.detach())


def _train_step(teacher, student, ids: torch.Tensor, cfg: DistillConfig) -> dict:
    """One step's forward and backward (gradients left in ``.grad``); returns the log entry."""
    total, kl, ce = end_to_end_loss(student, teacher, ids, cfg.lm_weight)
    total.backward()
    return dict(kl=kl, ce=ce)


def _logits_finite(model, ids: torch.Tensor) -> bool:
    """Whether every logit of ``model`` on ``ids`` (b, n) is finite (no gradient), a block at a time."""
    with torch.no_grad():
        h, head = final_hidden_states(model, ids), getattr(model, "module", model).get_output_embeddings()
        return all(bool(torch.isfinite(head(h[:, lo:hi])).all()) for lo, hi in position_blocks(0, ids.shape[1]))


def _lora_parameters(student, seed: int) -> Dict[str, torch.nn.Parameter]:
    """LoRA adapters on the student's attention projections, initialised from ``seed`` (not the caller's RNG)."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as e:
        raise ValueError("params='lora' needs peft: pip install peft (or bsbr[lora])") from e
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        inject_adapter_in_model(LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj",
                                                                                "out_proj"]), student)
    return {n: p for n, p in student.named_parameters() if "lora_" in n}


def _merge_lora(student) -> None:
    """Fold LoRA adapters into their base linear layers and put the plain layers back, so the
    saved model is an ordinary BSBR checkpoint."""
    _fold_adapters(student)


def _fold_adapters(student, skip=frozenset()) -> None:
    """:func:`_merge_lora`, leaving the adapter modules whose ids are in ``skip``."""
    for name, module in list(student.named_modules()):
        if hasattr(module, "base_layer") and hasattr(module, "merge") and id(module) not in skip:
            module.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(student.get_submodule(parent_name), child, module.base_layer)


def _trainable(student, cfg: DistillConfig):
    """The trained parameters (by name; only these require grad) and their AdamW optimizer."""
    new = new_parameters(student)
    if cfg.params == "new":
        params = new
    elif cfg.params == "all":
        params = dict(student.named_parameters())
    else:  # the new pieces start from scratch, so they train beside the adapters
        params = {**new, **_lora_parameters(student, cfg.seed)}
    keep = {id(p) for p in params.values()}
    for p in student.parameters():
        p.requires_grad_(id(p) in keep)
    groups = [dict(params=list(params.values()), lr=cfg.lr)]
    if cfg.params != "new" and cfg.base_lr is not None:
        # the new pieces start from scratch and need a large step; changes to the pretrained
        # weights (themselves, or their adapters) a small one
        groups = [dict(params=[p for n, p in params.items() if n in new], lr=cfg.lr),
                  dict(params=[p for n, p in params.items() if n not in new], lr=cfg.base_lr)]
    return params, torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=0.0)


def _native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 matrices natively (AVX512-BF16 or AMX)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def teacher_reach(config, gate_open: bool) -> int:
    """Tokens up to which a BSBR model's logits are its source's (the teacher's), so that the KL to the
    teacher is 0 there whatever is trained. An open gate (``gate_open``) reads the chunk states from
    :func:`exact_reach` on; a closed one reads none, and the model first leaves a token unread where more
    chunks holding a non-sink token lie before the window than ``retrieval_blocks``: ``(local_chunks +
    retrieval_blocks + sink_tokens // chunk_size) x chunk_size``, or, in the bounded mode, where their
    non-sink tokens no longer fit in the slots: ``(local_chunks + (recall_tokens + sink_tokens) //
    chunk_size) x chunk_size``. Within that, every far key must be read at its own distance: learned
    positions and ``far_positions='absolute'`` do, ``'hybrid'`` within its own-position chunks, and
    ``'window'`` (like ``'hybrid'`` without such chunks) only for the chunk just before the window, so up
    to ``(local_chunks + 1) x chunk_size`` tokens."""
    B, S, L = config.chunk_size, config.sink_tokens, config.local_chunks
    recall = getattr(config, "recall_tokens", 0)
    if gate_open:
        reach = exact_reach(config)
    elif recall:
        reach = (L + (recall + S) // B) * B
    else:
        reach = (L + getattr(config, "retrieval_blocks", 0) + S // B) * B
    if getattr(config, "position_type", "learned") != "rope" or config.far_positions == "absolute":
        return reach
    own = config.own_position_chunks()
    return min(reach, (own if own else L + 1) * B)


def shortest_window(student, params: str) -> int:
    """The fewest tokens a window needs for ``params`` to learn anything from the KL to the teacher: its
    logits (all but the last token's) must reach a token where the student is not its teacher, and for
    ``params="new"`` one where the new pieces are read (:func:`exact_reach`, :func:`teacher_reach`)."""
    start = teacher_reach(student.config, gate_open(student))
    if params == "new":
        start = max(start, exact_reach(student.config))
    return start + 2


def _with_earlier_data(data: Optional[dict], before) -> Optional[dict]:
    """This run's data record, with the checkpoint's record ``before`` and its ``earlier`` ones among its ``earlier``
    ones, each once (a resume reads the same tokens, perhaps from other files: the earlier steps' are kept)."""
    def own(record):
        return {k: v for k, v in record.items() if k != "earlier"}

    if not isinstance(data, dict) or not isinstance(before, dict):
        return data
    earlier, older = list(data.get("earlier") or []), before.get("earlier")
    for e in (own(before), *(older if isinstance(older, list) else ())):
        if isinstance(e, dict) and e != own(data) and e not in earlier:  # (each record once, this run's not)
            earlier.append(e)
    return dict(data, earlier=earlier) if earlier else data


def distill(teacher, student, windows: Sequence[torch.Tensor], output_dir, cfg: DistillConfig,
            resume: bool = False, settings: Optional[dict] = None, data: Optional[dict] = None,
            should_stop: Optional[Callable[[], bool]] = None, extra_files: Optional[Callable[[Path], None]] = None,
            overwrite: bool = False, progress: bool = True, models: Optional[dict] = None) -> dict:
    """Train ``student`` (a converted BSBRForCausalLM) to imitate ``teacher`` (its source) on token
    ``windows`` (1-D LongTensors), checkpointing to ``output_dir/checkpoint``; rank 0 then moves the final
    model (``save_pretrained``, ``distill.json``, ``distill.png``, what ``extra_files(dir)`` writes) into
    ``output_dir``, ``config.json`` last. Returns the progress log.

    A checkpoint is continued only with ``resume``, only if written with the same weights, windows,
    ``settings``, student config and config (except :data:`RESUMABLE_CHANGES`), and only if ``cfg`` leaves
    steps or time to train (:func:`check_work_left`). ``data``: where the windows came from, recorded in
    ``distill.json`` (a resume compares the windows' tokens, not this), as are ``models`` (the teacher's and the
    student's names) and the software and thread count of the run that published it. ``overwrite`` starts over whatever
    ``output_dir`` holds: its checkpoint stays until this run's first checkpoint replaces it, its other files (the old
    model) until this run's model replaces them (an interrupted run's checkpoint records their names, so
    its resume removes them too). ``should_stop`` is
    asked after every step, and once more before the model is published: True writes a checkpoint and
    raises :class:`DistillInterrupted` (so a Ctrl-C after the last step publishes nothing; the resume
    publishes the checkpoint). Weights that
    turn inf or nan raise ValueError before they are saved. ``progress``: a progress bar on rank 0.

    Both models are given back as they came: their train/eval modes and which parameters require gradients (the
    student's weights trained), and the student without the activation checkpointing and input-gradient hook
    training used; adapters the caller injected (peft's ``inject_adapter_in_model``) are folded into its weights once
    the model is published (the saved model is an ordinary checkpoint), kept if the run stops before. A peft model
    (``get_peft_model``) or a student with an adapter transformers loaded is refused: merge it first. It trains with
    autograd on whatever the caller's grad mode."""
    if any(p.is_inference() for m in (student, teacher) if isinstance(m, torch.nn.Module) for p in m.parameters()):
        raise ValueError("the student or the teacher was loaded under torch.inference_mode(), whose weights cannot be "
                         "trained through: load them outside it")
    modes = [([(sub, sub.training) for sub in m.modules()], {p: p.requires_grad for p in m.parameters()})
             for m in (teacher, student) if isinstance(m, torch.nn.Module)]  # (each submodule's mode: one may differ)
    grads_before = [{p: p.grad for p in m.parameters()} for m in (teacher, student)
                    if isinstance(m, torch.nn.Module)]  # (the last step's gradients were left: a model's worth)
    peft_config = hasattr(student, "peft_config")  # (set by a lora run's adapters, left after they are folded in)
    hooks = list(getattr(student, "_require_grads_hooks", None) or [])
    theirs = {id(m) for m in student.modules() if hasattr(m, "base_layer")} if isinstance(student, torch.nn.Module) \
        else set()  # adapters the caller put on the student
    try:  # (autograd on, whatever the caller's mode: a notebook's torch.set_grad_enabled(False), inference_mode)
        with torch.inference_mode(False), torch.enable_grad():
            if isinstance(windows, (str, bytes)) or not isinstance(windows, Iterable):
                raise TypeError("windows must be a sequence of 1-D tensors of token ids, got "
                                f"{type(windows).__name__}")
            windows = [w.clone() if isinstance(w, torch.Tensor) and w.is_inference() else w for w in windows]
            return _distill(teacher, student, windows, output_dir, cfg, resume=resume, settings=settings, data=data,
                            should_stop=should_stop, extra_files=extra_files, overwrite=overwrite, bar_on=progress,
                            models=models)
    finally:
        if getattr(student, "is_activation_checkpointing", False):
            student.activation_checkpointing_disable()
        if not hooks and getattr(student, "_require_grads_hooks", None):  # (activation checkpointing's)
            student.disable_input_require_grads()
        if isinstance(student, torch.nn.Module):  # an interrupted lora run: its adapters folded in, as a
            _fold_adapters(student, skip=theirs)  # finished run's are
        if not peft_config and hasattr(student, "peft_config"):
            del student.peft_config
        for (submodules, grads), before in zip(modes, grads_before):
            for sub, training in submodules:
                sub.training = training
            for p, g in grads.items():  # (by parameter: adapters put in and taken out shift the order)
                p.requires_grad_(g)
                p.grad = before[p]


def _distill(teacher, student, windows: Sequence[torch.Tensor], output_dir, cfg: DistillConfig,
             resume: bool = False, settings: Optional[dict] = None, data: Optional[dict] = None,
             should_stop: Optional[Callable[[], bool]] = None, extra_files: Optional[Callable[[Path], None]] = None,
             overwrite: bool = False, bar_on: bool = True, models: Optional[dict] = None) -> dict:
    """:func:`distill`, leaving the models' modes to it."""
    if not isinstance(cfg, DistillConfig):
        raise TypeError(f"cfg must be a DistillConfig, got {type(cfg).__name__}")
    cfg = cfg.resolved()  # (the caller's config is left as given)
    if hasattr(student, "merge_and_unload"):  # (its save_pretrained writes the adapters alone: no model published)
        raise TypeError("student is a peft model: merge its adapters (student.merge_and_unload()), then distill the "
                        "model that returns")
    if getattr(student, "_hf_peft_config_loaded", False):  # (its save would write the adapter, not the model)
        raise ValueError("the student carries a peft adapter transformers loaded with it (an adapter_config.json in "
                         "its folder): move the adapter's files out of the folder to distill the model alone, or "
                         "merge it: load the folder without them, apply the adapter (peft's "
                         "PeftModel.from_pretrained(model, ADAPTER_DIR).merge_and_unload()) and save the model that "
                         "returns to a new folder, with the tokenizer and conversion.json")
    if cfg.params == "lora" and any(hasattr(m, "base_layer") for m in student.modules()):
        # (lora's own adapters become the active ones: the caller's were dropped when they were folded in)
        raise ValueError("params='lora' on a student that already carries adapters: fold them into its weights first "
                         "(merge() on each adapter layer, as a peft model's merge_and_unload() does), or train with "
                         "params='new' or 'all'")
    if getattr(getattr(student, "config", None), "model_type", None) != "bsbr":  # (else an AttributeError, later)
        raise TypeError(f"student must be a converted BSBRForCausalLM (convert_to_bsbr(source)), got "
                        f"{type(student).__name__}")
    refuse_without_lm_head(student, "student", "distill")
    quantized = quantized_module(student)
    if quantized is not None:  # (its packed weights are no parameters to train, nor weights a folder holds)
        raise TypeError(f"the student's {quantized} is a quantized module: distill the float model, and quantize it "
                        "after training")
    quantized = quantized_module(teacher) if cfg.bf16 else None
    if quantized is not None:  # (its quantized kernels take float32 alone)
        raise TypeError(f"the teacher's {quantized} is a quantized module, which bfloat16 autocast (bf16) cannot "
                        "run: train without bf16, or give the float teacher")
    half = next((n for n, p in student.named_parameters() if p.dtype == torch.float16), None)
    if half is not None:  # (every step divided 0 by 0 in the new pieces, whose gradient is 0 while the gate is closed)
        raise TypeError(f"the student's {half} is float16, in which AdamW's eps (1e-8) is 0: distill student.float() "
                        "(cfg.bf16 trains it under bfloat16 autocast)")
    if not isinstance(teacher, torch.nn.Module):
        raise TypeError(f"teacher must be a causal LM (a transformers model with an LM head), got "
                        f"{type(teacher).__name__}")
    refuse_without_lm_head(teacher, "teacher", "distill")
    rows = head_rows(teacher) or student.config.vocab_size
    if rows != student.config.vocab_size:  # (the KL compares their logits)
        raise ValueError(f"the teacher's vocabulary ({rows} tokens) is not the student's ({student.config.vocab_size}):"
                         " give the model the student was converted from (a student whose embeddings were resized "
                         "since needs a teacher with its vocabulary)")
    for role, model in (("student", student), ("teacher", teacher)):  # a broken model, not a learning rate
        bad = next((n for n, p in model.named_parameters() if not torch.isfinite(p).all()), None)
        if bad is not None:
            raise ValueError(f"the {role}'s weight {bad} holds inf or nan before training: give a sound {role} "
                             f"(convert or save it again)")
    if resume and overwrite:
        raise ValueError("resume continues the checkpoint, overwrite replaces it: give one of them")
    if len(windows) == 0:
        raise ValueError("no training windows")
    vocab = student.config.vocab_size
    for i, w in enumerate(windows):  # (else an index error deep in the first step)
        if not (isinstance(w, torch.Tensor) and w.dim() == 1 and w.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"windows[{i}] must be a 1-D int64 (or int32) tensor of token ids, got "
                            f"{getattr(w, 'dtype', type(w).__name__)} {tuple(getattr(w, 'shape', ()))}")
        if len(w) < 2:
            raise ValueError(f"windows[{i}] holds {len(w)} token(s): a window needs 2 or more (nothing to predict)")
        if not 0 <= int(w.min()) <= int(w.max()) < vocab:
            raise ValueError(f"windows[{i}] holds ids outside the student's vocabulary [0, {vocab}): wrong tokenizer?")
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"output_dir {output_dir} is not a directory")
    if not (resume or overwrite) and output_dir.is_dir() and any(
            p.name != "checkpoint" and not p.name.startswith(".final.tmp-") for p in output_dir.iterdir()):
        raise ValueError(f"output_dir {output_dir} holds files, which the model would replace: give a new or empty "
                         "directory, or overwrite=True")
    if earlier_layout(output_dir / "checkpoint") and not overwrite:  # (named first: --resume cannot continue it)
        raise earlier_layout_error(output_dir / "checkpoint", "give overwrite=True to start over (moving out any file "
                                   "of yours beside it first), or another output_dir")
    strays = resume_strays(output_dir) if resume and output_dir.is_dir() else None
    if strays is not None or output_dir.is_dir() and overwrite and any(output_dir.iterdir()) and \
            not is_bsbr_output(output_dir):
        names = checkpoint_strays(output_dir)[0] if strays is None else strays
        mine = f" ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})" if names else ""
        flag = "overwrite" if overwrite else "resume"
        raise ValueError(f"output_dir {output_dir} holds files no bsbr command wrote{mine}: {flag}=True replaces only "
                         "a bsbr output (a BSBR model, its records or a checkpoint); move them or choose another "
                         "output_dir")
    longest = max(len(w) for w in windows)
    if cfg.params == "new" and longest < shortest_window(student, "new"):
        raise ValueError(f"params='new' on windows of at most {longest} tokens: the new pieces cannot improve this "
                         f"student there (windows of {shortest_window(student, 'new')} tokens or more can)")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    if len(windows) < world and rank == 0:
        logger.warning("%d training windows for %d processes: some processes train on the same window in each step "
                       "(give more text or a larger --max-windows)", len(windows), world)
    if cfg.bf16 and not _native_bf16():
        # an AVX2-only CPU multiplies bfloat16 matrices in a fallback loop: 1.1 against 53 GFLOP/s in float32
        # (576 x 1536 weights, 1,024 rows, one thread)
        logger.warning("bf16: this CPU has no native bfloat16 matrix multiply (%s), so bf16 training is many times "
                       "slower than float32 here: drop --bf16", torch.backends.cpu.get_cpu_capability())
    ckpt_dir = output_dir / "checkpoint"
    run = dict(**(settings or {}), windows=windows_fingerprint(windows), teacher=weights_fingerprint(teacher),
               student=weights_fingerprint(student), student_config=student_record(student.config), world_size=world)
    teacher.eval()
    student.eval()  # no dropout anywhere: deterministic, resumable
    if cfg.activation_checkpointing:  # transformers checkpoints a layer in training mode (dropout is 0 throughout)
        student.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        student.train()
    teacher.requires_grad_(False)

    order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(cfg.seed))
    progress = dict(step=0, elapsed=0.0, log=[], config=asdict(cfg), world_size=world, run=run)
    params, opt = _trainable(student, cfg)
    if has_checkpoint(ckpt_dir) and not overwrite:
        if not resume:
            raise CheckpointError(f"{ckpt_dir} holds a checkpoint: pass --resume to continue it, --overwrite to "
                                  f"start over, or choose another --output")
        manifest = read_manifest(ckpt_dir)
        check_same_run(manifest["progress"], cfg, run, ckpt_dir)
        check_work_left(manifest["progress"], cfg, output_dir)
        progress = load_checkpoint(ckpt_dir, params, opt, manifest)
        if published(manifest["progress"], output_dir):  # the old files it names were replaced then
            progress.pop("replaces", None)
        progress["config"] = asdict(cfg)  # the stopping rule and save interval of this run
        if progress["log"] and progress["log"][0].get("step") == 0:  # (an earlier bsbr's log counted from 0)
            progress["log"] = [dict(e, step=e["step"] + 1) if isinstance(e.get("step"), int) else e
                               for e in progress["log"]]
        logger.info("resumed from %s at step %d", ckpt_dir, progress["step"])
    elif resume:
        logger.info("--resume: no checkpoint in %s yet, starting fresh", ckpt_dir)
    if world > 1:  # every process continues the same checkpoint (an --output each node sees on its own disk: not)
        seen = torch.tensor([progress["step"], -progress["step"]])
        dist.all_reduce(seen, op=dist.ReduceOp.MAX)
        if seen[0] != -seen[1]:
            raise CheckpointError(f"the processes of this run found {ckpt_dir} at different steps ({-int(seen[1])} to "
                                  f"{int(seen[0])}): give an --output on storage every node shares")
    progress.update(data=_with_earlier_data(data, progress.get("data")), models=models,  # (this run's: not
                    software=software())                                                # compared by a resume)
    if overwrite and output_dir.is_dir():  # the old output's files, replaced when this run's model is published
        progress["replaces"] = sorted(p.name for p in output_dir.iterdir()
                                      if p.name != ckpt_dir.name and not p.name.startswith(".final.tmp-"))
    left = None if cfg.minutes is None else cfg.minutes * 60.0 - progress["elapsed"]
    check_step_fits(teacher, student, params, opt, max(windows, key=len), cfg, left, world,
                    step=lambda ids: _train_step(teacher, student, ids, cfg),
                    shortest=shortest_window(student, cfg.params))
    # every trained parameter gets a gradient in every step (checked for new, all and lora, windows of one
    # chunk or more) but the new pieces on a window within the exact reach, where they have no effect: only
    # then does DDP search the graph for unused parameters
    unused = min(len(w) for w in windows) <= exact_reach(student.config) + 1
    model = torch.nn.parallel.DistributedDataParallel(student, find_unused_parameters=unused) if world > 1 else student

    def save(state: dict) -> None:
        with writing("the checkpoint"):
            save_checkpoint(ckpt_dir, params, opt, state)  # replaces any old checkpoint in one rename

    budget = None if cfg.minutes is None else cfg.minutes * 60.0
    t0 = time.monotonic() - progress["elapsed"]
    out_of_time = _any_rank(budget is not None and time.monotonic() - t0 >= budget, world)  # every rank starts alike
    bar = progress_bar(disable=rank != 0 or not bar_on, desc="distill", unit="step", total=cfg.steps,
                       initial=progress["step"])  # (a resume's bar starts where its checkpoint is)
    said_at = time.monotonic()
    try:  # the bar ends its line before any error is printed
        def finished() -> bool:  # the steps asked for are done, or the time budget ran out
            return (cfg.steps is not None and progress["step"] >= cfg.steps) or out_of_time

        while not finished():
            ids = windows[int(order[(progress["step"] * world + rank) % len(windows)])][None]
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
                entry = _train_step(teacher, model, ids, cfg)
            try:
                opt.step()
            except RuntimeError as e:  # Adam's step lr / (1 - beta1) past float32's range
                if "overflow" not in str(e):
                    raise
                raise ValueError(f"training diverged at step {progress['step'] + 1}: the optimizer's step overflows "
                                 f"float32 ({e}): {LOWER_LR}") from e
            _check_finite(params, progress["step"])
            stop = bool(should_stop()) if should_stop is not None else False
            out_of_time = budget is not None and time.monotonic() - t0 >= budget
            if world > 1:  # every rank stops after the same step (a rank asked, or its clock ran out; rank 0
                # writes checkpoints, so the clocks part), and the log holds the mean loss of all ranks' windows
                shared = torch.tensor([float(stop), float(out_of_time), entry["kl"], entry["ce"]], dtype=torch.float64)
                dist.all_reduce(shared)
                stop, out_of_time = bool(shared[0] > 0), bool(shared[1] > 0)
                entry.update(kl=float(shared[2]) / world, ce=float(shared[3]) / world)
            if not (math.isfinite(entry["kl"]) and math.isfinite(entry["ce"])):  # the same on every rank
                raise ValueError(f"training diverged at step {progress['step'] + 1}: the loss is {entry['kl']} "
                                 f"(finite weights, non-finite logits): {LOWER_LR}")
            progress["step"] += 1  # (the steps done: the log, the lines and the messages count from 1)
            entry.update(step=progress["step"], seconds=round(time.monotonic() - t0, 2))
            progress["log"].append(entry)
            bar.update(1)
            bar.set_postfix({k: round(entry[k], 4) for k in ("kl", "ce")})
            if rank == 0 and bar.disable and time.monotonic() - said_at >= STEP_LOG_SECONDS:  # (no bar: a line)
                said_at = time.monotonic()
                logger.info("step %d%s: kl %.4f, ce %.4f, %.0f s in", progress["step"],
                            "" if cfg.steps is None else f"/{cfg.steps}", entry["kl"], entry["ce"], said_at - t0)
            # (the last step's checkpoint is written after the trained model's logits are checked, below)
            if rank == 0 and (stop or (progress["step"] % cfg.checkpoint_every == 0 and not finished())):
                save({**progress, "elapsed": time.monotonic() - t0})
            if stop:
                if world > 1:
                    dist.barrier()
                raise DistillInterrupted(f"interrupted at step {progress['step']}; checkpoint written to {ckpt_dir}")
    finally:
        bar.close()
    if progress["step"] == 0:  # the time budget ran out before one step: nothing to save
        raise ValueError(f"no training step fits in minutes={cfg.minutes} (one step takes longer): give more "
                         "--minutes, or --steps")
    if weights_fingerprint(student) == run["student"]:  # every update was 0: a model that is the student
        raise ValueError(f"{progress['step']} training steps changed no weight (every update was 0, e.g. a loss so "
                         f"large that the optimizer's moments overflow): nothing is published; give a smaller "
                         "--lm-weight or --lr and start over (--overwrite)")
    # the last update meets no loss in the loop: one forward checks it (the same on every rank)
    if not _logits_finite(student, windows[int(order[0])][None]):
        raise ValueError(f"training diverged at step {progress['step']}: the trained model's logits are not finite "
                         f"(its weights are): {LOWER_LR}")
    progress["elapsed"] = time.monotonic() - t0
    stop = _any_rank(should_stop is not None and bool(should_stop()), world)  # a Ctrl-C after the last step
    if rank == 0:
        save(progress)
    if stop:
        if world > 1:
            dist.barrier()
        raise DistillInterrupted(f"interrupted after step {progress['step']}; checkpoint written to {ckpt_dir}")
    if rank == 0:
        _publish(student, progress, output_dir, extra_files, should_stop, bar_on)
    return progress


def published(saved: dict, output_dir: Path) -> bool:
    """Whether ``output_dir`` holds the model of the checkpoint whose progress is ``saved`` (its config.json,
    and a distill.json with the same log)."""
    try:
        record = json.loads((Path(output_dir) / "distill.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return (Path(output_dir) / "config.json").is_file() and isinstance(record, dict) \
        and record.get("log") == saved.get("log")


def check_work_left(saved: dict, cfg: DistillConfig, output_dir: Path) -> None:
    """Refuse to resume a checkpoint (progress ``saved``) that already meets ``cfg``'s stopping rule: nothing
    would train. Allowed only with the checkpoint's own stopping rule while its model is not yet published
    (a run stopped after its last step, or killed while publishing): the resume publishes it."""
    step, used = saved.get("step", 0), saved.get("elapsed", 0.0)
    where = f"the checkpoint in --output {output_dir}"
    if cfg.steps is not None and step >= cfg.steps:
        what = f"--steps {cfg.steps}: {where} is already at step {step}: give more --steps (or --minutes)"
    elif cfg.minutes is not None and used >= cfg.minutes * 60:
        what = (f"--minutes {cfg.minutes:g}: {where} has already used {used / 60:.2f} minutes: give more --minutes "
                f"(or --steps)")
    else:
        return
    old = saved.get("config") or {}
    if (old.get("steps"), old.get("minutes")) == (cfg.steps, cfg.minutes) and not published(saved, output_dir):
        return
    raise CheckpointError(what)


def _publish(student, progress: dict, output_dir: Path, extra_files, should_stop=None, bar_on: bool = True) -> None:
    """Write the final model into a fresh directory beside ``output_dir``'s files, then move it in: the old
    ``config.json`` first goes, then the old files ``progress["replaces"]`` names that the new model does not
    write, then the new files come, ``config.json`` last. A ``should_stop`` that turns True while the model
    is written raises :class:`DistillInterrupted` before anything is moved (the checkpoint is saved)."""
    from ..progress import library_bars_off
    from .plots import plot_progress

    if student.is_activation_checkpointing:  # (the modes and flags: distill() gives them back)
        student.activation_checkpointing_disable()
    _merge_lora(student)
    for stale in output_dir.glob(".final.tmp-*"):  # what a killed run left
        shutil.rmtree(stale, ignore_errors=True)
    with writing("the model"):  # (what a failed write names: the model, not the checkpoint, saved before)
        final = temp_dir(output_dir, ".final.tmp-")
        try:
            with library_bars_off(not bar_on):  # (save_pretrained's own "Writing model shards")
                student.save_pretrained(final)
            write_json({k: v for k, v in progress.items() if k != "replaces"}, final / "distill.json")  # (NaN: null)
            plot_progress(progress, final / "distill.png")
            if extra_files is not None:
                extra_files(final)
            if should_stop is not None and should_stop():
                raise DistillInterrupted(f"interrupted after step {progress['step']}, before the model was published; "
                                         f"checkpoint written to {output_dir / 'checkpoint'}")
            (output_dir / "config.json").unlink(missing_ok=True)
            for name in progress.get("replaces", ()):
                old = output_dir / name
                if not (final / name).exists():
                    if old.is_dir() and not old.is_symlink():
                        shutil.rmtree(old)
                    else:
                        old.unlink(missing_ok=True)
            publish_files(final, output_dir)
        except BaseException:
            shutil.rmtree(final, ignore_errors=True)
            raise


@contextlib.contextmanager
def writing(what: str):
    """Mark an error raised inside as a failed write of ``what`` (``error.bsbr_writing``): the command's message
    names it, and an error of reading (a teacher's weights on a failing disk) is not taken for one."""
    try:
        yield
    except BaseException as e:
        with contextlib.suppress(Exception):  # (an exception class that takes no attributes keeps its own message)
            if getattr(e, "bsbr_writing", None) is None:
                e.bsbr_writing = what
        raise


def _any_rank(flag: bool, world: int) -> bool:
    """Whether ``flag`` holds on any rank (every rank gets the same answer)."""
    if world == 1:
        return flag
    t = torch.tensor([float(flag)])
    dist.all_reduce(t)
    return bool(t.item() > 0)


def _check_finite(params: Dict[str, torch.nn.Parameter], step: int) -> None:
    """Refuse to go on (and so to save) once a step has made a trained weight inf or nan. The same on
    every rank: data-parallel replicas hold the same weights."""
    with torch.no_grad():
        finite = torch.stack([torch.isfinite(p).all() for p in params.values()]).tolist()  # one sync
    if not all(finite):
        bad = list(params)[finite.index(False)]
        raise ValueError(f"training diverged at step {step + 1}: {bad} became inf or nan: {LOWER_LR}")

