"""``bsbr distill``: single process, or data parallel under ``torchrun --nproc_per_node N``."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import logging
import os
import shlex
import signal
import sys
import threading
from pathlib import Path
from typing import Optional

from ..numbers import MAX_COUNT, SEED_RANGE, finite_number, integer
from ..arguments import (METADATA, add_dataset_arguments, as_flags, check_bsbr_dir, check_dataset, check_default_model,
                         check_model_arg, check_model_tokenizer, check_positions, check_recorded_source, check_source,
                         check_text_files, check_unique, dataset_options, hub_id, load_model_arg, load_tokenizer_arg,
                         hub_revision, same_file, source_label, source_name, warn_past_rotary_positions)
from ..errors import INTERRUPTED, CheckpointError, OutputError, UserError, check_not_interrupted
from ..outputs import (check_output_dir, checkpoint_strays, holds_cwd, is_bsbr_output, out_of_room, output_lock,
                       resolved_path, resume_strays, save_tokenizer, write_errors, write_failure, write_model_card)
# torch, the trainer and the models load inside the commands, so `bsbr distill --help` starts without them

logger = logging.getLogger(__name__)


def _plan(args):
    """The run's DistillConfig, checked before anything is loaded."""
    from .trainer import DistillConfig

    if args.minutes is None and args.steps is None:
        raise UserError("nothing to train: give --minutes M (the usual) or --steps S")
    if args.resume and args.overwrite:
        raise UserError("--resume continues the checkpoint in --output, --overwrite replaces it: give one of them")
    if args.text_file is not None and not args.text_file:
        raise UserError("--text-file needs at least one file (without --text-file: the standard library's sources)")
    if args.params == "lora":
        try:  # (its adapters are made once the models are loaded: refused now, not then)
            importlib.import_module("peft")
        except ImportError as e:  # (installed, an import inside it may still fail: said as it is)
            raise UserError("--params lora needs peft: pip install peft (or bsbr[lora])" if e.name == "peft" else
                            f"--params lora: peft does not import here ({' '.join(str(e).split())[:160]}): install "
                            "a peft that works with this transformers (bsbr[lora])") from None
    try:  # the config's field names are the options' names
        cfg = DistillConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(DistillConfig)})
        cfg = cfg.resolved()
    except ValueError as e:
        raise UserError(as_flags(str(e), ("base_lr", "lm_weight", "checkpoint_every", "steps", "minutes", "params",
                                          "lr"))) from e
    return cfg


def _check_new_pieces_matter(student, args, teacher=None, window=None) -> None:
    """Refuse windows so short that what ``--params`` trains cannot learn from the KL to the teacher: where
    the student equals its teacher (and, for ``--params new``, before its new pieces are read), each
    window's loss is 0 up to rounding, which Adam would follow as if it were a gradient. ``--params all`` or
    ``lora`` is checked once the ``teacher`` is loaded: a student whose own weights were trained since its
    conversion (a merged LoRA) differs from it on the first ``window``, and may train there."""
    from .trainer import shortest_window

    config = student.config
    need = shortest_window(student, args.params)
    why = ("the pieces --params new trains (chunk states, gates, maps) can improve this student only from token "
           f"{need - 2} on" if args.params == "new" else
           f"this student's logits are its teacher's up to token {need - 2}, so the KL to it is 0 there and "
           f"--params {args.params} learns nothing")
    table = config.max_position_embeddings if config.position_type == "learned" else None
    refuse = args.params == "new" or not args.lm_weight
    if refuse and args.params != "new" and min(args.seq_len, table or need) < need:
        refuse = not _differs(student, teacher, window)
    if table is not None and table < need and refuse:
        # the teacher (its source) cannot run past its learned positions
        raise UserError(f"{why}, and a window's last token is only a target, so a window needs {need} tokens, but "
                        f"the source (the teacher) has {table} learned positions: no --seq-len works; convert with "
                        "fewer --retrieval-blocks or a smaller --chunk-size" + ("" if args.params == "new" else
                                                                                ", or give --lm-weight"))
    if args.seq_len < need and refuse:
        need_all = shortest_window(student, "all") if args.params == "new" and not args.lm_weight else 0
        other = ", or give --lm-weight" if args.params != "new" else ", or --params all" + (
            f" with --seq-len {need_all} or more (or --lm-weight)" if args.seq_len < need_all else "")
        raise UserError(f"--seq-len {args.seq_len}: {why}, and a window's last token is only a target: use "
                        f"--seq-len {need} or more{other}")
    if not (config.retrieval_blocks and config.retrieval == "normalized"):
        return
    own = config.own_position_chunks() * config.chunk_size
    if own and args.seq_len <= own:
        logger.warning(f"--seq-len {args.seq_len}: this student reads far keys at their own positions up to {own} "
                       "tokens (far_positions 'hybrid'), so on these windows it is its source reading its window and "
                       "blocks, with little to learn: on SmolLM2, 12 steps on 4,096-token windows started at KL 0.0001 "
                       "and left perplexity at 8k-32k unchanged or worse; the zero-shot conversion is the one to use "
                       "(docs/findings.md, Distillation of the default)")
        return
    logger.info("distilling a model with exact blocks opens its chunk states: on SmolLM2 (window far positions), 12 "
                "steps on 4,096-token windows gained 1-5 points of the window's gap at 8k and 1.5-3% of perplexity at "
                "16k-32k; check your own lengths with bsbr eval (docs/findings.md, Distillation of the default)")


def _differs(student, teacher, window) -> bool:
    """Whether ``student``'s log-probabilities of ``window``'s targets (each token's next: the last token is only a
    target) differ from ``teacher``'s past rounding."""
    import torch

    with torch.no_grad():
        got, want = (m(window[None, :-1].to(m.device)).logits.float().log_softmax(-1).cpu()
                     for m in (student, teacher))
    return bool((got - want).abs().max() > 1e-4)


def _local_dataset(args) -> Optional[str]:
    """``--dataset`` when it names a local folder or file (an input), else None."""
    return args.dataset if args.dataset and os.path.exists(os.path.expanduser(args.dataset)) else None


def _settings(args) -> dict:
    """The run's settings a resume must repeat. The windows' tokens are compared too, so text files and a
    local --dataset are recorded by content, not by path (which may be spelled another way); a hub
    --dataset by its name, so that another one is refused before anything loads."""
    chosen = dataset_options(args, "train") if args.dataset else {}
    # only values off their defaults (a run before these options recorded none of them)
    defaults = dataset_options(argparse.Namespace(dataset=args.dataset, dataset_config=None, dataset_split=None,
                                                  text_column=None), "train")
    named = {} if _local_dataset(args) else dict(dataset=args.dataset)
    return dict(seq_len=args.seq_len, max_windows=args.max_windows, **named,
                **{name: value for name, value in chosen.items() if value != defaults[name]})


def _student_config(student_dir: Path) -> dict:
    """:func:`~bsbr.distill.trainer.student_record` of the student's config.json, read without its weights."""
    from ..models.bsbr.configuration_bsbr import BSBRConfig
    from .trainer import student_record

    try:
        return student_record(BSBRConfig.from_pretrained(student_dir))
    except (OSError, ValueError, TypeError) as e:
        raise UserError(f"--student {student_dir}: config.json is not a BSBR config ({' '.join(str(e).split())})") \
            from e


# torchrun passes a Ctrl-C on to its workers and kills them 30 s later (its default --shutdown-timeout): less
# than a step of a real model (110-230 s for SmolLM2 at 4,096 tokens on 2 cores, docs/findings.md)
SHUTDOWN_TIMEOUT = 900
TORCHRUN_GRACE = ("; torchrun kills its workers 30 s after a Ctrl-C unless started with --shutdown-timeout longer "
                  f"than a step (e.g. torchrun --shutdown-timeout {SHUTDOWN_TIMEOUT})")


def _resume_command(args) -> str:
    """The command that continues this run: its arguments without --overwrite, with --resume, under
    torchrun with as many processes when it runs data parallel (a checkpoint resumes at its world size)."""
    argv = [a for a in getattr(args, "argv", None) or [] if a != "--overwrite"]
    if "--resume" not in argv:
        argv.append("--resume")
    world = processes("WORLD_SIZE", 1)
    local = processes("LOCAL_WORLD_SIZE", world) if world > 1 else 1
    if world <= 1:
        start = "bsbr "
    elif local >= world:
        start = f"torchrun --shutdown-timeout {SHUTDOWN_TIMEOUT} --nproc_per_node {world} -m bsbr.cli "
    else:  # several nodes: each starts its part, with the rendezvous options this run was given
        start = (f"torchrun --shutdown-timeout {SHUTDOWN_TIMEOUT} --nnodes {world // local} --nproc_per_node {local} "
                 "(this run's --rdzv options) -m bsbr.cli ")
    return start + " ".join(shlex.quote(a) for a in argv)


@contextlib.contextmanager
def _stop_on_signal():
    """While active: the first SIGINT / SIGTERM sets the event it yields, asking the run to stop after its
    current step (and write a checkpoint); a Ctrl-C after it stops at once, as does a SIGTERM after a Ctrl-C
    (torchrun passes a second Ctrl-C on so). A SIGTERM after a SIGTERM does not: a job manager (SLURM's
    scancel, systemd) signals every process of the job, and torchrun passes its own copy on to its workers."""
    stop, first = threading.Event(), []

    def handle(signum, frame):
        if stop.is_set() and signal.SIGINT in (signum, first[0]):
            raise KeyboardInterrupt
        first.append(signum)
        stop.set()
        if getattr(stop, "trained", False):  # (set once training is over: the model is published, or being so)
            logger.warning("%s: training is over; stopping once the model is published", signal.Signals(signum).name)
            return
        logger.warning("%s: finishing the current step, then writing a checkpoint (Ctrl-C again stops at once)%s",
                       signal.Signals(signum).name,
                       TORCHRUN_GRACE if processes("WORLD_SIZE", 1) > 1 else "")

    main_thread = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM) if main_thread}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def processes(name: str, default: int) -> int:
    """torchrun's count of processes in the variable ``name`` (unset or empty: ``default``); a
    :class:`UserError` naming a value that is none."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise UserError(f"the environment variable {name}={text!r} is not a number of processes: unset it, or start "
                        "the run with torchrun")
    return int(text)


def cmd_distill(args) -> int:
    if processes("WORLD_SIZE", 1) > 1:  # (read again later, where a bad value could no longer be told in one line)
        processes("LOCAL_WORLD_SIZE", 1)
    cfg = _plan(args)
    student_dir, out = Path(args.student), resolved_path(args.output)  # (where the system finds link/../out)
    with contextlib.ExitStack() as held:
        refusal = None
        try:  # (under torchrun each process checks what it reads: on several nodes, each its own disk)
            _check_inputs(args, student_dir)
            if os.environ.get("RANK", "0") == "0":  # one run per --output at a time (other ranks write nothing there)
                # (the path as given: a link to nothing on its way is refused, which its resolved path hides)
                held.enter_context(output_lock(args.output, "--output", inputs=_inputs(args, student_dir)))
        except UserError as e:
            refusal = e
        _start_together(refusal)
        sigterm = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
        try:
            return _distill(args, cfg, student_dir, out)
        finally:
            _leave_process_group()
            if sigterm is not None:  # (a survivor of a lost process ignored torchrun's SIGTERM: see _distill)
                signal.signal(signal.SIGTERM, sigterm)


def _check_inputs(args, student_dir: Path) -> None:
    """Refuse, before any loading, a --student, --teacher, --text-file or --dataset this run cannot read."""
    check_bsbr_dir(student_dir, "--student")
    # a BSBR teacher (another conversion, distilled) only with --force, and never the student itself
    check_model_arg(args.teacher, "--teacher", bsbr_ok=args.force)
    if args.teacher is not None and Path(os.path.expanduser(str(args.teacher))).resolve() == student_dir.resolve():
        raise UserError(f"--teacher {args.teacher} is the --student: it would learn from itself (nothing); give "
                        "the model it was converted from")
    check_unique("--text-file", args.text_file, key=same_file)  # (one file twice would be trained on twice)
    check_text_files(args.text_file, args.seq_len)
    check_dataset(args.dataset, **dataset_options(args, "train"), seq_len=args.seq_len)


def _inputs(args, student_dir: Path) -> list:
    """The run's inputs as (option, path) pairs: what --output may not overlap."""
    return [("--student", student_dir), ("--teacher", args.teacher), ("--dataset", _local_dataset(args)),
            *[("--text-file", f) for f in args.text_file or []]]


def _start_together(refusal: Optional[UserError]) -> None:
    """Under torchrun, join the process group, and stop every process when one refused to start
    (``refusal``: its inputs, or rank 0's output lock): the others would wait for it in the group until torchrun
    kills them."""
    import torch
    import torch.distributed as dist

    if processes("WORLD_SIZE", 1) > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
    if dist.is_initialized():
        refused = torch.tensor([refusal is not None], dtype=torch.int32)
        dist.all_reduce(refused, op=dist.ReduceOp.MAX)
        if refused.item():
            _leave_process_group()
            refusal = refusal or UserError("another process of this run refused to start (its message says why)")
    if refusal is not None:
        raise refusal


def _leave_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except RuntimeError as e:  # (a group whose other process died: what stopped the run is the error to show)
            logger.debug("leaving the process group: %s", e)


def _distill(args, cfg, student_dir: Path, out: Path) -> int:
    import torch.distributed as dist

    from .checkpoint import MANIFEST, START_OVER, earlier_layout, earlier_layout_error, has_checkpoint, read_manifest
    from .trainer import DistillInterrupted, check_same_run, check_work_left, published

    ckpt = out / "checkpoint"
    if args.resume and not os.path.lexists(out):  # (the printed resume line, the folder since moved: it started over)
        raise CheckpointError(f"--resume: --output {out} does not exist, so there is no run to continue: give the "
                              "--output of the run (moved? its new path), or leave out --resume to start one")
    check_output_dir(out, overwrite=args.overwrite, option="--output", renamed=False,
                     allow_existing=args.resume or has_checkpoint(ckpt) and not args.overwrite,
                     inputs=_inputs(args, student_dir))
    if earlier_layout(ckpt) and not args.overwrite:  # (to be replaced, not resumed)
        strays = checkpoint_strays(out)[0]  # (a user's files beside it: --overwrite would refuse them)
        move = f"move {', '.join(strays[:3])}{', ...' if len(strays) > 3 else ''} out, then " if strays else ""
        raise earlier_layout_error(ckpt, "choose another --output" if holds_cwd(out) else  # (--overwrite: refused)
                                   f"{move}pass --overwrite to start over, or choose another --output")
    if args.resume and out.is_dir() and any(out.iterdir()) and not ckpt.is_dir():
        raise CheckpointError(f"--resume: --output {out} holds no checkpoint (no {ckpt.name}/): give the --output of "
                              f"the run to continue, or an empty one")
    strays = resume_strays(out) if args.resume and out.is_dir() else None
    if strays is not None:
        names = f" ({', '.join(strays[:3])}{', ...' if len(strays) > 3 else ''})" if strays else ""
        raise UserError(f"--output {out} holds files no bsbr command wrote{names}: the resumed run's model replaces "
                        "the directory; move them first")
    if not args.resume and not args.overwrite and has_checkpoint(ckpt):
        if not is_bsbr_output(out):  # (--resume and --overwrite would both refuse the user's files beside it)
            strays, mine = checkpoint_strays(out)
            names = ", ".join(strays[:3]) + (", ..." if len(strays) > 3 else "")
            if not mine:  # (a user's own checkpoint/ folder: nothing of distill's to resume)
                raise OutputError(f"--output {out} holds files no bsbr command wrote ({names}): move them, or "
                                  f"choose another --output")
            raise OutputError(f"--output {out} holds a checkpoint and files no bsbr command wrote ({names}): move "
                              f"them out, then pass --resume to continue it, or choose another --output")
        restart = "" if holds_cwd(out) else ", --overwrite to start over"  # (which would replace the cwd: refused)
        raise CheckpointError(f"--output {out} holds a checkpoint: pass --resume to continue it{restart}, or "
                              f"choose another --output")
    if args.resume and has_checkpoint(ckpt):
        # a partial or corrupt checkpoint, or one of another run (student, settings; the windows' text in _train),
        # is refused before loading
        try:
            saved = read_manifest(ckpt)["progress"]
            run = _settings(args)
            if (saved.get("run") or {}).get("student_config") is not None:  # (an older checkpoint: trainer warns)
                run["student_config"] = _student_config(student_dir)
            run["world_size"] = processes("WORLD_SIZE", 1)
            check_same_run(saved, cfg, run, ckpt, flags=True)
        except CheckpointError as e:  # (--overwrite, which it advises, refuses an output holding the cwd)
            if not holds_cwd(out) or START_OVER not in str(e):
                raise
            raise CheckpointError(str(e).replace(START_OVER, "start a new --output")) from e
        check_work_left(saved, cfg, out)
    check_recorded_source(student_dir, args.teacher, option="--teacher", force=args.force)
    check_default_model(args.teacher, "--teacher")  # (after: a student of another source names it instead)
    # with --overwrite, the old run's checkpoint: not one this run may print a resume command for
    before = (ckpt / MANIFEST).read_bytes() if args.overwrite and (ckpt / MANIFEST).is_file() else None
    try:
        return _train(args, cfg, student_dir, out)
    except write_errors() as e:  # a full disk or a quota while saving: say what the last checkpoint holds
        step = _checkpoint_step(ckpt, before) if not dist.is_initialized() or dist.get_rank() == 0 else None
        what = getattr(e, "bsbr_writing", None)  # (set by the trainer's writes: the checkpoint, the model)
        if what is None:  # (an error of reading: the teacher's weights, the text)
            raise
        if step is None:
            raise write_failure("--output", out, e, what, unchanged=False) from e
        fix = "once there is room" if out_of_room(e) else "once it can be written (a permission, a read-only disk?)"
        raise UserError(f"--output {out}: could not write {what} ({' '.join(str(e).split())[:200]}); "
                        f"checkpoint {ckpt} holds step {step}: {fix}, resume with: {_resume_command(args)}") from e
    except RuntimeError as e:  # under torchrun: another process of the run died, and its connection with it
        if not _peer_failed(e):
            raise
        if threading.current_thread() is threading.main_thread():
            # torchrun follows a process's death by SIGTERM to the others: this one says where the run stands
            # (reading the checkpoint hashes its files: seconds for a real model, where SIGTERM cut it short)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        step = _checkpoint_step(ckpt, before)
        raise UserError(f"another process of this run stopped ({' '.join(str(e).split())[:120]}); "
                        + (f"checkpoint {ckpt} holds step {step}: resume with: {_resume_command(args)}"
                           if step is not None else "no checkpoint was written: run the command again")) from e
    except KeyboardInterrupt as e:  # Ctrl-C / SIGTERM: after a step and its checkpoint, or at any other moment
        rank0 = not dist.is_initialized() or dist.get_rank() == 0
        if isinstance(e, DistillInterrupted):
            line = str(e)
        else:
            step, done = _checkpoint_step(ckpt, before) if rank0 else None, False
            if step is None:
                raise
            with contextlib.suppress(OSError, CheckpointError):  # (read a moment ago; unreadable now: not said)
                done = published(read_manifest(ckpt)["progress"], out)  # (a signal after the model was moved in)
            if done:
                print(f"bsbr distill: interrupted; {out} holds the distilled model, complete", file=sys.stderr,
                      flush=True)
                return 130
            line = f"interrupted; checkpoint {ckpt} holds step {step}"
        if rank0:
            print(f"bsbr distill: {line}; resume with: {_resume_command(args)}", file=sys.stderr, flush=True)
        return 130


def _peer_failed(error: RuntimeError) -> bool:
    """Whether ``error`` is the process group losing another process of a data-parallel run."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return False
    return isinstance(error, getattr(dist, "DistBackendError", ())) or any(
        s in str(error) for s in ("Connection closed by peer", "Connection reset by peer", "Broken pipe"))


def _checkpoint_step(ckpt: Path, before) -> Optional[int]:
    """The step of the complete checkpoint in ``ckpt``, or None when there is none or its manifest is still
    ``before`` (the bytes it held when this run started: another run's checkpoint)."""
    from .checkpoint import MANIFEST, read_manifest

    try:
        if before is not None and (ckpt / MANIFEST).read_bytes() == before:
            return None
        return read_manifest(ckpt)["progress"]["step"]
    except (OSError, CheckpointError):
        return None


def _train(args, cfg, student_dir: Path, out: Path) -> int:
    """Load the inputs, train and publish (the checks of :func:`cmd_distill` passed); ``cfg`` the
    :class:`~bsbr.distill.trainer.DistillConfig`."""
    import torch
    import torch.distributed as dist

    from ..corpus import corpus_texts, windows_read
    from ..models import load_bsbr_model
    from .checkpoint import has_checkpoint, read_manifest
    from .trainer import check_same_run, distill, windows_fingerprint

    tokenizer = load_tokenizer_arg(student_dir, "--student")
    check_model_tokenizer(tokenizer, student_dir, "--student")
    torch.manual_seed(args.seed)
    # the standard library's "train" split by default: evaluation uses the disjoint "heldout" split
    texts, data = corpus_texts(text_files=args.text_file, dataset=args.dataset, **dataset_options(args, "train"),
                            split="train", seed=args.seed)
    windows, data, left = windows_read(tokenizer, texts, data, args.seq_len, args.max_windows)
    windows = list(windows)
    logger.info("%d training windows of %d tokens", len(windows), args.seq_len)
    if args.resume and has_checkpoint(out / "checkpoint"):  # other text (a local dataset is known by its tokens
        check_same_run(read_manifest(out / "checkpoint")["progress"], cfg,  # alone) refused before loading
                       dict(windows=windows_fingerprint(windows)), out / "checkpoint", flags=True)
    # the record of the source it was converted from, for eval --reference: read with the student (the folder
    # may be replaced while it trains)
    record = (student_dir / METADATA).read_text(encoding="utf-8") if (student_dir / METADATA).is_file() else None
    student = load_bsbr_model(student_dir)
    if args.params == "new":  # (before the teacher loads; the others compare the two models)
        _check_new_pieces_matter(student, args)
    teacher = load_model_arg(args.teacher, "--teacher", bsbr_ok=args.force)  # (checked as cmd_distill did)
    note = check_source(student_dir, args.teacher, teacher, option="--teacher", force=args.force)
    if note:
        logger.warning(note)
    check_positions(teacher, "--teacher", [("--seq-len", args.seq_len)])  # (once it is the student's source)
    warn_past_rotary_positions(teacher, "--teacher", [("--seq-len", args.seq_len)])  # (the student imitates it)
    if args.params != "new":
        _check_new_pieces_matter(student, args, teacher, windows[0])
    data = _data_record(data, left, args, student_dir, len(windows))  # (its warning once the run is not refused)

    def extra_files(directory: Path) -> None:
        save_tokenizer(tokenizer, directory)
        found = note is None and args.teacher is not None  # (the teacher is the recorded source)
        moved = None if record is None else _moved_record(record, source_name(args.teacher) if found else None,
                                                          hub_revision(args.teacher) if found else None)
        if moved is not None:  # the student's, marked distilled since
            (directory / METADATA).write_text(moved, encoding="utf-8")
        write_model_card(directory, _base_model(record) or _base_model(moved))  # (the source by its hub id, where
        # the conversion named it so: a teacher given as a local copy keeps it)

    check_not_interrupted()  # a Ctrl-C while loading that a library swallowed: stop before training
    with _stop_on_signal() as stop:
        # --overwrite: the old checkpoint stays until this run's first checkpoint replaces it, the old model
        # until this run's model replaces it
        progress = distill(teacher, student, windows, out, cfg, resume=args.resume, settings=_settings(args),
                           data=data, should_stop=stop.is_set, extra_files=extra_files, overwrite=args.overwrite,
                           models=dict(teacher=source_name(args.teacher), student=str(student_dir.resolve())))
        stop.trained = True
        if not dist.is_initialized() or dist.get_rank() == 0:
            last = progress["log"][-1] if progress["log"] else {}
            losses = ", ".join(f"{k} {last[k]:.4g}" for k in ("kl", "ce") if isinstance(last.get(k), float))
            print(f"distilled {len(progress['log'])} steps in {progress['elapsed'] / 60:.1f} min"
                  f"{f' (last step: {losses})' if losses else ''}; saved to {out}")
        if dist.is_initialized():  # (a signal while waiting here for rank 0's publishing: said below, as one then)
            dist.barrier()
    if stop.is_set():  # the signal came while the model was moved in: it is complete; the command was interrupted
        logger.warning("the model was already being published when the signal came: %s holds it, complete", out)
        INTERRUPTED.set()
    return 0


def _data_record(data: dict, left: list, args, student_dir: Path, windows: int) -> dict:
    """distill.json's record of the text trained on (``bsbr eval`` warns when it reads it): ``data``, with the files
    read (the files ``left`` have no token in the ``windows`` windows, which is said), and as ``earlier`` the records
    of the distillations the student came from."""
    if left:
        named = "--text-file" if args.text_file else f"--dataset {args.dataset}" if args.dataset else \
            "the standard library's train split"
        (logger.warning if args.text_file else logger.info)(
            "%s: %d of the %d files were not read (%s)%s", named, len(left), len(left) + len(data.get("files") or ()),
            f"--max-windows {args.max_windows} windows reached before them, or their text in the last tokens, fewer "
            f"than --seq-len {args.seq_len}" if args.max_windows and windows >= args.max_windows
            else f"their text only in the text's last tokens, fewer than --seq-len {args.seq_len}: no whole window", (
                f": {', '.join(left[:3])}{f' and {len(left) - 3} more' if len(left) > 3 else ''}") if args.text_file
            else "")
    try:
        earlier = json.loads((student_dir / "distill.json").read_text(encoding="utf-8")).get("data")
    except (OSError, ValueError, AttributeError, RecursionError):
        earlier = None
    if isinstance(earlier, dict):
        before = earlier.get("earlier")
        data = dict(data, earlier=[{k: v for k, v in earlier.items() if k != "earlier"},
                                   *[e for e in (before if isinstance(before, list) else ()) if isinstance(e, dict)]])
    return data


def _moved_record(record: str, source: Optional[str] = None, revision: Optional[str] = None) -> str:
    """The student's conversion record as the distilled model's: a note that the weights were distilled since
    (distill.json), and the source named ``source`` where given (the teacher, found to be the recorded source: the
    path it has now; at the hub commit ``revision``, None for a local one), unless the record names it by a hub
    id (which holds wherever its copies lie); an unreadable record as it was. (``output_dir``, the folder an
    earlier bsbr recorded, is dropped: nothing reads it, and it publishes a local path.)"""
    try:
        fields = json.loads(record)
    except ValueError:
        return record
    if not isinstance(fields, dict):
        return record
    recorded = fields.get("source")
    if source is not None and isinstance(recorded, dict) and hub_id(recorded.get("name")) is None:
        fields["source"] = {k: v for k, v in {**recorded, "name": source, "revision": revision}.items()
                            if k != "revision" or v is not None}
    fields.pop("output_dir", None)
    return json.dumps({**fields, "distilled": "distill.json"}, indent=2)


def _base_model(record: Optional[str]) -> Optional[str]:
    """The hub id of the source a distilled model's record names (its model card's ``base_model``), where known
    (a record of bsbr 0.2.0 to 2026-11-28 names a source as it was typed, maybe a relative path: not known)."""
    try:
        fields = json.loads(record) if record is not None else None
    except ValueError:
        return None
    source = fields.get("source") if isinstance(fields, dict) else None
    if isinstance(source, str):  # (the bundled model's label alone is no path)
        return hub_id(source) if source == source_label(None) else None
    return hub_id(source.get("name")) if isinstance(source, dict) else None  # (a local source: its absolute path)


def register(sub) -> None:
    p = sub.add_parser("distill", help="recover a converted model's quality from its source")
    p.add_argument("--teacher", default=None, help="the source model (default: the bundled SmolLM2)")
    p.add_argument("--student", required=True, help="converted model directory (bsbr convert)")
    p.add_argument("--output", required=True, help="where to write checkpoints and the distilled model: new or "
                                                   "empty (or --resume / --overwrite); never the student's directory")
    # defaults = the recipe measured best in docs/findings.md for the default exact window: end-to-end
    # KL (no LM term) on the new pieces only
    p.add_argument("--minutes", type=finite_number(), default=None, help="wall-clock budget")
    p.add_argument("--steps", type=integer(1, MAX_COUNT), default=None, help="optimizer steps (with --minutes: whichever ends first)")
    p.add_argument("--params", choices=["new", "all", "lora"], default="new",
                   help="what trains: the new BSBR pieces (default), all weights, or the new pieces plus LoRA "
                        "adapters (peft; merged into the weights when saved)")
    p.add_argument("--lr", type=finite_number(float32=True, positive=True), default=3e-3,
                   help="learning rate of the new pieces (default 3e-3)")
    p.add_argument("--base-lr", type=finite_number(float32=True, positive=True), default=None,
                   help="with --params all: learning rate of the source's own weights (default 6e-5); "
                        "with lora: of the adapters (default: --lr)")
    p.add_argument("--bf16", action="store_true",
                   help="bfloat16 matmuls (CPU autocast) for teacher and student; weights and optimizer stay float32")
    p.add_argument("--lm-weight", type=finite_number(float32=True), default=0.0,
                   help="weight of the LM loss beside the KL (default 0: pure imitation of the source)")
    p.add_argument("--seq-len", type=integer(2), default=4096,
                   help="tokens per training window (default 4096: the default conversion reads every earlier "
                        "token exactly up to (2 + 8) x 256 = 2,560 tokens, where its new pieces have no effect)")
    p.add_argument("--max-windows", type=integer(1, MAX_COUNT), default=2000,
                   help="at most this many training windows of --seq-len tokens (default %(default)s)")
    data = p.add_mutually_exclusive_group()
    data.add_argument("--text-file", nargs="*", default=None, metavar="F", help="train on these text files (at least one)")
    add_dataset_arguments(p, data, "train")
    p.add_argument("--seed", type=integer(*SEED_RANGE), default=0, help="data order and initialisation (default 0)")
    p.add_argument("--checkpoint-every", type=integer(1, MAX_COUNT), default=25,
                   help="steps between checkpoints in OUTPUT/checkpoint, which --resume continues (default %(default)s)")
    p.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                   help="recompute each layer in the backward pass instead of keeping its activations (default on: "
                        "a 4,096-token window of the default conversion peaks at 5.3 GB with it in float32; without "
                        "it, one was killed at 24 GB. It costs one more forward pass per step)")
    p.add_argument("--resume", action="store_true",
                   help="continue the checkpoint in OUTPUT/checkpoint (same settings; more --steps or --minutes than "
                        "it has done); OUTPUT must exist (an empty one starts fresh)")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in a non-empty --output: its checkpoint stays until this run's first checkpoint "
                        "replaces it, its model and other files until this run's model replaces them")
    p.add_argument("--force", action="store_true",
                   help="use a --teacher whose weights are not those the student was converted from")
    p.set_defaults(func=cmd_distill)
