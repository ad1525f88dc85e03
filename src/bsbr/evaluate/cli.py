"""``bsbr eval``: how much of its source a converted model keeps, with numbers."""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import Optional

from ..numbers import MAX_COUNT, MAX_REPEATS, SEED_RANGE, integer
from ..arguments import (add_dataset_arguments, check_bsbr_dir, check_bsbr_positions, check_dataset, check_model_arg,
                         check_model_tokenizer, check_positions, check_recorded_source, check_source, check_text_files,
                         check_unique, dataset_options, expand_home, load_tokenizer_arg, read_config, read_metadata,
                         same_file, warn_past_rotary_positions)
from ..errors import OutputError, UserError
from ..outputs import check_output_dir, check_output_files, left_by_a_kill
from ..results import write_json
from .baselines import has_wide_window, load_eval_tokenizer
from .filler import FILLER_KINDS, default_fillers, filler_path, get_filler
from .lm_eval_task import TASK_NAME, check_filler_metrics, is_task_file, write_lm_eval_task
from .passkey import (DEFAULT_DEPTHS, DEFAULT_LENGTHS, check_prompt_lengths, passkey_summary_lines,
                      shortest_length)
from .report import summary_lines

logger = logging.getLogger(__name__)


def needle_depth(text: str) -> float:
    """An argparse type: a pass-key needle's depth, a number in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"depth must lie in [0, 1], got {text}")
    return value + 0.0  # (-0 is depth 0)


def _heatmap_path(args) -> Optional[Path]:
    """Where the pass-key heat map goes: --passkey-plot, else beside --plot (NAME.passkey.png; with
    --passkey-only, --plot itself), else beside --json; None when none is given. Its data (the
    pass-key result as JSON) goes beside it with the suffix ``.json``."""
    if args.passkey_plot:
        return Path(args.passkey_plot)
    if args.plot:
        return Path(args.plot) if args.passkey_only else Path(args.plot).with_suffix(".passkey.png")
    if args.json:
        return Path(args.json).with_suffix(".passkey.png")
    return None


def _inputs(args) -> list:
    """``(label, path)`` of what the command reads from disk: the model, a local reference or dataset, the
    text files and the filler files (outputs may not be, or lie inside, any of them)."""
    inputs = [("MODEL", args.model)]
    for option, value in (("--reference", args.reference), ("--dataset", args.dataset)):
        if value is not None and Path(value).expanduser().exists():
            inputs.append((option, Path(value).expanduser()))
    inputs += [("--text-file", f) for f in args.text_file or []]
    inputs += [("--passkey-filler", f) for f in map(filler_path, args.passkey_filler or []) if f and f.is_file()]
    return inputs


def _check_seq_len(args) -> None:
    """--seq-len against the model's chunk size (read from its config.json, no weights loaded): a
    window needs a token past the first chunk with a target, so at least chunk_size + 2 tokens."""
    chunk = read_config(Path(args.model).expanduser() / "config.json", "MODEL").get("chunk_size")
    if isinstance(chunk, int) and not isinstance(chunk, bool) and chunk >= 1 and args.seq_len < chunk + 2:
        raise UserError(f"--seq-len {args.seq_len} is too short for {args.model} (chunk size {chunk}): give at least "
                        f"{chunk + 2} (tokens past the first chunk are scored)")


def _check_lists(args) -> None:
    """No list option repeats a value (a repeated length or depth would count its cells twice). A filler
    kind given by name that is also a file or folder here is named once (the kind is used)."""
    for spec in dict.fromkeys(args.passkey_filler or ()):
        if spec in FILLER_KINDS and os.path.lexists(spec):
            logger.warning("--passkey-filler %s is the built-in kind; %s here is not read (give file:%s for the file)",
                           spec, os.path.join(".", spec), spec)
    names = {spec: get_filler(spec).name for spec in args.passkey_filler or ()}  # (each file read once)
    named = {}  # two files of one name: their results would share a key
    for spec, name in names.items():
        path = filler_path(spec)
        if path is not None and os.path.realpath(named.setdefault(name, path)) != os.path.realpath(path):
            raise UserError(f"--passkey-filler {spec} and {named[name]} are two files of one name, and the results "
                            f"are kept by file name ({name}): rename or copy one of them")
    if args.lm_eval_task_dir:
        try:
            check_filler_metrics(names.values())
        except ValueError as e:
            raise UserError(f"--passkey-filler: {e}") from None
    def filler_key(spec):  # a file by what makes two spellings one file (links too), a kind by its name
        path = filler_path(spec)
        return same_file(path) if path is not None and path.is_file() else names[spec]

    for option, values, key in (("--text-file", args.text_file, same_file),
                                ("--passkey-lengths", args.passkey_lengths, int),
                                ("--passkey-depths", args.passkey_depths, float),
                                ("--passkey-filler", args.passkey_filler, filler_key),
                                ("--passkey-models", args.passkey_models, str)):
        check_unique(option, values, key)


TASK_FILES = (f"{TASK_NAME}.yaml", f"{TASK_NAME}.jsonl", f"{TASK_NAME}_utils.py")


def _check_task_dir(task_dir: Path, arg) -> None:
    """--lm-eval-task-dir may hold only what a previous --lm-eval-task-dir wrote (:data:`TASK_FILES`, and
    the ``__pycache__`` of the utils module that lm-eval imports, whose bytecode is removed when they are written)."""
    for p in sorted(task_dir.iterdir()) if task_dir.is_dir() else ():
        ours = p.is_file() and p.name in TASK_FILES and is_task_file(p) or (
            p.name == "__pycache__" and p.is_dir()
            and all(q.name.startswith(f"{TASK_NAME}_utils.") and q.suffix == ".pyc" for q in p.iterdir()))
        if not ours and p.name in TASK_FILES:  # (a file of the task's name that is not the task's, or was edited)
            raise OutputError(f"--lm-eval-task-dir {arg} holds {p.name}, which is not the task bsbr eval wrote there "
                              f"(or was edited since): give a new or empty directory, or move {p.name} away")
        if not ours and left_by_a_kill(p.name):
            raise OutputError(f"--lm-eval-task-dir {arg} holds {p.name}, left by a bsbr command that was killed while "
                              f"it wrote there: remove {p.name}")
        if not ours:
            raise OutputError(f"--lm-eval-task-dir {arg} holds {p.name}, which bsbr eval does not write there: "
                              f"give a new or empty directory, or move {p.name} away")


def _is_passkey_output(path: Path) -> bool:
    """Whether ``path`` is what bsbr eval writes as a derived file: its pass-key heat map (a PNG carrying
    its title; an earlier bsbr's, before 2026-12-02, carries none, and is known by that bsbr's pass-key data
    beside it, which records no run ``config``) or the pass-key data (a
    :func:`~bsbr.evaluate.passkey.run_passkey` result as JSON)."""
    if path.suffix == ".png":
        from .plots import HEATMAP_TITLE, png_title

        title = path.is_file() and png_title(path)
        return title == HEATMAP_TITLE or title == "" and _passkey_data(path.with_suffix(".json")) == "earlier"
    return _passkey_data(path) is not None


def _passkey_data(path: Path) -> Optional[str]:
    """Whether ``path`` holds pass-key data bsbr eval wrote: "earlier" where it records no run ``config`` (an
    earlier bsbr's), "yes", or None."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    if not (isinstance(data, dict) and {"lengths", "depths", "trials", "fillers", "models", "samples"} <= data.keys()):
        return None
    return "yes" if "config" in data else "earlier"


def _check_outputs(args) -> None:
    """Every file or directory the command will write, before anything is loaded. A file derived from an
    option (the heat map and its data beside --plot or --json) may replace only what bsbr eval wrote
    there (:func:`_is_passkey_output`)."""
    inputs = _inputs(args)
    if args.lm_eval_task_dir:
        task_dir = check_output_dir(args.lm_eval_task_dir, inputs=inputs, option="--lm-eval-task-dir",
                                    allow_existing=True)
        _check_task_dir(task_dir, args.lm_eval_task_dir)
        return
    outputs = [("--json", args.json), ("--plot", args.plot)]
    derived = []  # (what, path) beside the option ``beside``
    heatmap = None if args.no_passkey else _heatmap_path(args)
    if heatmap is not None:
        if args.passkey_plot:
            beside = ("--passkey-plot", args.passkey_plot)
            outputs.append(beside)
        elif args.passkey_only and args.plot:  # --plot is the heat map itself
            beside = ("--plot", args.plot)
        else:
            beside = ("--plot", args.plot) if args.plot else ("--json", args.json)
            derived.append(("the pass-key heat map", heatmap))
        derived.append(("the pass-key data", heatmap.with_suffix(".json")))
    labelled = [(f"{what} (beside {beside[0]})", path) for what, path in derived]
    figures = [label for label, path in labelled if path.suffix != ".json"]
    check_output_files(outputs + [(label, str(path)) for label, path in labelled], inputs=inputs,
                       plots=("--plot", "--passkey-plot", *figures))
    for what, path in derived:
        path = path.expanduser()
        if os.path.lexists(path) and not _is_passkey_output(path):
            kind = f"a {'pass-key heat map' if path.suffix == '.png' else 'pass-key report'} of bsbr eval"
            raise OutputError(f"{beside[0]} {beside[1]} puts {what} at {path}, which exists and is not {kind}: "
                              f"move it, or choose another {beside[0]}")


def _filler(text: str) -> str:
    text = expand_home(text)  # (the file is read here, while parsing)
    try:
        get_filler(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _check_loadable(model) -> None:
    """Refuse, without loading its weights, a saved BSBR model whose config.json holds values the model
    refuses (:func:`check_bsbr_dir` has refused one without safetensors weights)."""
    from ..models.bsbr.configuration_bsbr import BSBRConfig

    path = Path(os.path.expanduser(str(model)))
    try:
        BSBRConfig.from_pretrained(path)
    except (ValueError, TypeError, OSError, AttributeError) as e:  # (AttributeError: a dtype torch lacks)
        raise UserError(f"MODEL {model}: its config.json does not make a model ({' '.join(str(e).split())[:200]}): "
                        "convert it again") from None


def _write_lm_eval_task(args, passkey: dict, tokenizer) -> int:
    from ..outputs import output_lock, resolved_path, write_failure

    try:
        with output_lock(args.lm_eval_task_dir, "--lm-eval-task-dir"):  # (one command writes a task there at a time)
            yaml_path = write_lm_eval_task(args.lm_eval_task_dir, tokenizer, **passkey)
    except OSError as e:  # a full disk, a folder that takes no files (a new folder: nothing was published)
        raise write_failure("--lm-eval-task-dir", args.lm_eval_task_dir, e, "the task") from e
    longest = max(passkey["lengths"]) + passkey["max_new_tokens"]
    print(f"lm-eval task {TASK_NAME}: {yaml_path}")
    print(f"run it (offline) with:\n"
          f"  import bsbr, lm_eval\n"
          f"  from lm_eval.models.huggingface import HFLM\n"
          f"  from lm_eval.tasks import TaskManager\n"
          f"  out = lm_eval.simple_evaluate(model=HFLM(pretrained={os.path.realpath(args.model)!r}, device='cpu', "
          f"backend='causal', dtype='float32', max_length={longest}), tasks=[{TASK_NAME!r}], "
          f"task_manager=TaskManager(include_path={str(resolved_path(args.lm_eval_task_dir))!r}))\n"
          f"  print(out['results'][{TASK_NAME!r}])")
    if importlib.util.find_spec("lm_eval") is None:  # (the snippet's import would fail)
        print("(lm-eval is not installed here: pip install 'bsbr[eval]')")
    return 0


# options of one part of the evaluation: given to a run that skips that part, they would be ignored,
# so they are refused (their defaults are read from the parser when it is built: None or False, so one
# given at the value it would default to is refused too; _FILLED holds those values, set once checked)
_PERPLEXITY_OPTIONS = ("text_file", "dataset", "seq_len", "max_windows", "stride", "buckets", "split")
_PASSKEY_OPTIONS = ("passkey_lengths", "passkey_depths", "passkey_trials", "passkey_filler", "passkey_new_tokens",
                    "passkey_models")
_TASK_IGNORES = ("passkey_models", "json", "plot", "passkey_plot", "reference", "force", "passkey_only")
_DEFAULTS: dict = {}
_FILLED = dict(seq_len=2048, max_windows=16, buckets="chunk", passkey_trials=3, passkey_new_tokens=8, seed=0)


def _distilled_on(args, corpus: dict) -> Optional[str]:
    """What of the text this evaluation read (``corpus``: its record, with the files read) MODEL was distilled on
    (the data its distill.json records, of this run and the distillations its student came from), said as the
    options that name it; None when that is nothing, or MODEL was not distilled. Text is compared by the files
    read (a standard-library file by its path in the library, wherever that lies), a hub dataset by name,
    config and split. Advice only: a record it cannot read is passed over."""
    try:
        data = json.loads((Path(args.model).expanduser() / "distill.json").read_text(encoding="utf-8")).get("data")
        earlier = data.get("earlier") if isinstance(data, dict) else None
        records = [data, *(earlier if isinstance(earlier, list) else ())] if isinstance(data, dict) else []
        files, hub = _read_keys(corpus)
    except Exception:  # (a damaged record or dataset: refused, with its reason, where it is read)
        return None
    trained, hubs = set(), []
    for record in records:
        try:
            more, other = _read_keys(record)
        except Exception:
            continue
        trained |= more
        hubs += [other] if other else []
    split = corpus.get("split")
    if hub is not None and any(h[:2] == hub[:2] and h[2] & hub[2] for h in hubs):
        return f"--dataset {args.dataset} (split {split})"
    both = files & trained
    if not both:
        return None
    if args.text_file:
        return "--text-file " + " ".join(str(f) for f in args.text_file if _key(f) in both)
    part = f"{len(both):,} of the {len(files):,} files read" if len(both) < len(files) else ""
    if args.dataset:
        return f"--dataset {args.dataset} (split {split}{f': {part}' if part else ''})"
    return f"the default corpus's {split} split" + (f" ({part})" if part else "")


def _key(path, root=None):
    """How a file read is compared: its path in the standard library (under ``root``, default this Python's), or
    what makes two names one file here (:func:`~bsbr.arguments.same_file`: a hard link too)."""
    from ..corpus import stdlib_root

    resolved = Path(path).expanduser().resolve()
    for base in {str(Path(root).resolve()) if root else None, str(stdlib_root().resolve())} - {None}:
        if resolved.is_relative_to(base):
            return "stdlib:" + resolved.relative_to(base).as_posix()
    return same_file(resolved)


def _read_keys(record: dict):
    """(the files a corpus record read, as :func:`_key`; ``(name, config, split parts)`` of a hub dataset, or
    None). An older record names no files read: all of its text files, its local dataset's split, or this
    Python's files of its default-corpus split."""
    from ..corpus import files_read

    kind, root = record.get("kind"), record.get("root") if record.get("kind") == "stdlib" else None
    if record.get("files") is not None and kind in ("text_files", "dataset", "stdlib"):
        return {_key(f, root) for f in record["files"]}, None
    if kind == "dataset" and not Path(record["name"]).expanduser().exists():
        split = record.get("split") or "train"
        return set(), (record["name"], record.get("config"), set(split.split("+")))
    if kind in ("dataset", "stdlib"):
        return {_key(f) for f in files_read(record).get("files") or ()}, None
    return set(), None


def _refuse_ignored(args) -> None:
    """Refuse an option the run would ignore: pass-key options with --no-passkey, perplexity options
    with --passkey-only or --lm-eval-task-dir (which writes the task and exits), the models and outputs of
    an evaluation with --lm-eval-task-dir (the task runs whatever model lm-eval loads)."""
    if args.no_passkey and (args.passkey_only or args.lm_eval_task_dir):  # (not an option ignored: two runs)
        raise UserError(f"--no-passkey and {'--passkey-only' if args.passkey_only else '--lm-eval-task-dir'} "
                        "exclude each other (the one skips the pass-key test, the other runs or writes only it): "
                        "give one")
    skips = []
    if args.no_passkey:
        skips.append(("--no-passkey", _PASSKEY_OPTIONS + ("passkey_plot",)))
    for flag, on in (("--passkey-only", args.passkey_only), ("--lm-eval-task-dir", args.lm_eval_task_dir)):
        if on:
            skips.append((flag, _PERPLEXITY_OPTIONS))
    if args.lm_eval_task_dir:  # it writes the task (with MODEL's own tokenizer, which lm-eval loads) and exits
        skips.append(("--lm-eval-task-dir", _TASK_IGNORES))
    if args.no_passkey and (args.text_file or args.dataset):  # the seed orders the default corpus and makes keys
        skips.append((f"--no-passkey and {'--text-file' if args.text_file else '--dataset'}", ("seed",)))
    for flag, names in skips:
        for name in names:
            if getattr(args, name) != _DEFAULTS[name]:
                why = " (it writes the task, with MODEL's own tokenizer, and exits: evaluate separately)" \
                    if flag == "--lm-eval-task-dir" else ""
                raise UserError(f"--{name.replace('_', '-')} would be ignored with {flag}{why}: drop one")
    for name, value in _FILLED.items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def cmd_eval(args) -> int:
    dataset = dataset_options(args, "test")
    if args.dataset and args.dataset_split is None:  # a local file, or folder of unnamed files, holds one split
        from ..corpus import only_split

        dataset["dataset_split"] = only_split(args.dataset, args.dataset_config) or "test"
    if (args.text_file or args.dataset) and args.split:
        raise UserError(f"--split {args.split} chooses from the default corpus, not from --text-file or --dataset: "
                        "drop one")
    _refuse_ignored(args)
    if args.passkey_only and args.plot and args.passkey_plot:
        raise UserError("--plot and --passkey-plot both name the heat map with --passkey-only: give one")
    check_bsbr_dir(args.model, "MODEL")
    read_metadata(args.model)  # where --reference is checked: refused now if broken
    check_model_arg(args.reference, "--reference")
    check_text_files(args.text_file, args.seq_len)
    _check_lists(args)
    config = Path(args.model).expanduser() / "config.json"
    if "window" in (args.passkey_models or []) and not has_wide_window(read_config(config, "MODEL")):
        raise UserError(f"--passkey-models window: MODEL {args.model}'s exact window is its own chunk alone (no "
                        "earlier chunk, no sinks), so there is no window baseline beside 'local': drop 'window'")
    if not (args.lm_eval_task_dir or args.passkey_only):
        _check_seq_len(args)
    _check_outputs(args)
    if not args.lm_eval_task_dir:  # (the task needs only the model's tokenizer)
        compared = not (args.passkey_only and set(args.passkey_models or ["source"]) <= {"bsbr"})
        check_recorded_source(args.model, args.reference, option="--reference", force=args.force, compared=compared)

    def reference_lengths():  # what the reference runs, for its positions (GPT-2's table)
        lengths = [] if args.passkey_only else [
            ("--seq-len", args.seq_len, lambda table: f"give at most {table:,} (perplexity is compared with the "
                                                      "reference's), or measure longer contexts by pass-key alone: "
                                                      "--passkey-only --passkey-models bsbr window")]
        if passkey is not None and (not args.passkey_models or "source" in args.passkey_models):
            leave = "leave the source out: --passkey-models bsbr window"
            lengths += [("--passkey-lengths", n, lambda table: passkey_fix(
                table, f" (a prompt of n tokens needs n - 1 positions), or {leave}", leave), n - 1)
                for n in passkey["lengths"]]
        return lengths

    def passkey_fix(table: int, fits: str, too_short: str) -> str:
        """The advice for pass-key lengths past ``table`` positions: at most table + 1 tokens (then ``fits``),
        or where even the grid's shortest prompt does not fit, ``too_short`` (its tokenizer loaded here, only
        where a length is refused)."""
        try:
            tok = load_tokenizer_arg(args.model, "MODEL") if args.lm_eval_task_dir else \
                load_eval_tokenizer(args.model, args.reference)
            shortest = shortest_length(tok, **{k: passkey[k] for k in ("depths", "trials", "seed", "max_new_tokens",
                                                                       "fillers")})
        except ValueError:  # (refused where the tokenizer and the grid are checked)
            shortest = 0
        if shortest > table + 1:
            return f"the shortest pass-key prompt takes {shortest:,} tokens: {too_short}"
        return f"give at most {table + 1:,}{fits}"

    def check_reference(source_model):
        note = check_source(args.model, args.reference, source_model, option="--reference", force=args.force)
        if note:
            logger.warning(note)
        check_positions(source_model, "--reference", reference_lengths())
        if not args.passkey_only:  # its perplexity is then no upper bound (pass-key lengths past it are the point)
            warn_past_rotary_positions(source_model, "--reference", [("--seq-len", args.seq_len)])

    passkey = None if args.no_passkey else dict(
        lengths=args.passkey_lengths or list(DEFAULT_LENGTHS), depths=args.passkey_depths or list(DEFAULT_DEPTHS),
        trials=args.passkey_trials, seed=args.seed, max_new_tokens=args.passkey_new_tokens,
        fillers=args.passkey_filler or default_fillers(args.passkey_trials))
    if passkey is not None and passkey["trials"] < len(passkey["fillers"]):  # trial t reads filler t mod F
        unread = ", ".join(map(str, passkey["fillers"][passkey["trials"]:]))
        raise UserError(f"--passkey-trials {passkey['trials']} runs fewer trials than there are fillers "
                        f"({len(passkey['fillers'])}): {unread} would never be read: give --passkey-trials "
                        f"{len(passkey['fillers'])} (a multiple of it weighs every filler alike), or fewer fillers")
    # a model converted with --position-scheme absolute (and the baselines converted like it) stops at its
    # table; a pass-key prompt of length n needs n - 1 positions (the last answer token is never fed back)
    lengths = [] if args.passkey_only or args.lm_eval_task_dir else [("--seq-len", args.seq_len)]
    if passkey is not None and (args.lm_eval_task_dir or set(args.passkey_models or ["bsbr"]) != {"source"}):
        too_short = "none fits the model as converted" if args.lm_eval_task_dir or args.passkey_only else \
            "give --no-passkey (and no other --passkey- option)"
        lengths += [(f"--passkey-lengths {n:,}", n - 1, lambda table: passkey_fix(table, "", too_short))
                    for n in passkey["lengths"]]
    check_bsbr_positions(args.model, "MODEL", lengths)
    reference = Path(expand_home(args.reference)) if args.reference is not None else None
    if reference is not None and (reference / "config.json").is_file() and not args.lm_eval_task_dir:
        from types import SimpleNamespace  # (a local reference's positions, from its config.json, before loading)

        reference_config = SimpleNamespace(**read_config(reference / "config.json", "--reference"))
        check_positions(SimpleNamespace(config=reference_config), "--reference", reference_lengths())
    _check_loadable(args.model)  # (and the task's command loads it: refused now, not there)
    if not (args.passkey_only or args.lm_eval_task_dir):
        check_dataset(args.dataset, **dataset, seq_len=args.seq_len)
    # the tokenizer, before any model is loaded
    tokenizer = load_tokenizer_arg(args.model, "MODEL") if args.lm_eval_task_dir else \
        load_eval_tokenizer(args.model, args.reference)
    check_model_tokenizer(tokenizer, args.model, "MODEL", windows=not (args.passkey_only or args.lm_eval_task_dir))
    if passkey is not None:
        check_prompt_lengths(tokenizer, "--passkey-lengths", "give longer --passkey-lengths or fewer "
                             "--passkey-new-tokens", **passkey)
        if args.lm_eval_task_dir:
            return _write_lm_eval_task(args, passkey, tokenizer)
    if passkey is not None and args.passkey_models:
        passkey["only"] = list(args.passkey_models)
    from ..outputs import write_together
    from .saved import evaluate_saved, passkey_saved  # torch: here, not for the parser

    if args.passkey_only:
        result = passkey_saved(args.model, args.reference, passkey=passkey, progress=not args.no_progress,
                               check_reference=check_reference)
        lines = passkey_summary_lines(result["passkey"])
    else:
        # a missing optional dependency (datasets) is an ImportError: bsbr.cli.main makes it one line
        result = evaluate_saved(args.model, args.reference, text_files=args.text_file, dataset=args.dataset,
                                **dataset, split=args.split or "heldout",
                                seq_len=args.seq_len, max_windows=args.max_windows, stride=args.stride,
                                buckets=args.buckets, passkey=passkey, seed=args.seed, progress=not args.no_progress,
                                check_reference=check_reference)
        lines = summary_lines(result)
        if trained := _distilled_on(args, result["config"].get("corpus") or {}):
            logger.warning("MODEL %s was distilled on %s (its distill.json): its perplexity here is on text it was "
                           "trained on, not held out", args.model, trained)
    from .plots import plot_passkey_heatmap, plot_results

    files = []  # (path, writer, line): all written together at the end: an error or interruption before
    if args.json:  # leaves the old set
        files.append((args.json, lambda p: write_json(result, p), f"results: {args.json}"))
    if args.plot and not args.passkey_only:
        files.append((args.plot, lambda p: plot_results(result, p), f"plot: {args.plot}"))
    heatmap = _heatmap_path(args)
    if heatmap is not None and result.get("passkey"):
        files.append((heatmap, lambda p: plot_passkey_heatmap(result["passkey"], p),
                      f"pass-key heat map: {heatmap} (data: {heatmap.with_suffix('.json')})"))
        # (with the run's record: the data of two models' heat maps, written without --json, told apart)
        files.append((heatmap.with_suffix(".json"), lambda p: write_json(dict(config=result["config"],
                                                                              **result["passkey"]), p), None))
    # before anything is printed: a closed stdout (| head) loses no file
    write_together([f[:2] for f in files], figures=[args.plot, heatmap])
    for line in lines:
        print(line)
    for *_, line in files:
        if line:
            print(line)
    return 0


def register(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a converted model against its source, chunk-local attention and its window alone",
                       description="Perplexity past the first chunk (BSBR vs the source with full attention vs the "
                                   "source restricted to chunk-local attention vs the source in the model's exact "
                                   "window alone, no retrieval), gap closed, next-token agreement, "
                                   "KL, hidden-state similarity, and pass-key retrieval.")
    p.add_argument("model", help="a converted model directory (from `bsbr convert` or distillation)")
    p.add_argument("--reference", default=None,
                   help="the source it was converted from: directory, .gguf file or hub id "
                        "(default: the bundled SmolLM2-135M-Instruct)")
    data = p.add_mutually_exclusive_group()
    data.add_argument("--text-file", nargs="+", metavar="F", help="evaluate on these local text files")
    add_dataset_arguments(p, data, "test, or a local dataset's one split")
    p.add_argument("--split", choices=["heldout", "train"], default=None,
                   help="default corpus split (the standard library's .py files; default heldout)")
    p.add_argument("--seq-len", type=integer(), default=None, help="tokens per window (default 2048)")
    p.add_argument("--max-windows", type=integer(1, MAX_COUNT), default=None, help="windows to evaluate (default 16)")
    p.add_argument("--stride", type=integer(), default=None,
                   help="tokens between window starts (default: seq-len); below seq-len windows overlap and a "
                        "token is scored once per window holding it past that window's first chunk")
    p.add_argument("--buckets", choices=["chunk", "doubling"], default=None,
                   help="position buckets: one per chunk (default), or doubling ranges [B,2B),[2B,4B),...")
    p.add_argument("--passkey-lengths", type=integer(), nargs="+", default=None, metavar="N",
                   help="pass-key lengths in tokens, prompt and answer together: a prompt is at most N minus "
                        "--passkey-new-tokens tokens (whole filler sentences: a few fewer), e.g. 16384 32768 "
                        "(default 1024 2048 4096 8192)")
    p.add_argument("--passkey-depths", type=needle_depth, nargs="+", default=None, metavar="D",
                   help="relative depths of the key (default 0.1 0.3 0.5 0.7 0.9)")
    p.add_argument("--passkey-trials", type=integer(1, MAX_REPEATS), default=None,
                   help="keys per (length, depth) cell; trial t uses filler t mod the number of fillers (default 3)")
    p.add_argument("--passkey-filler", type=_filler, action="extend", nargs="+", default=None, metavar="KIND|FILE",
                   help="filler text, repeatable: classic (the repeated grass/sky sentences), prose (licence texts "
                        "in /usr/share/common-licenses, else standard-library docstrings), docstrings, random "
                        "(seeded random sentences), or a text file's path (default: the first --passkey-trials of "
                        "classic prose random)")
    p.add_argument("--passkey-new-tokens", type=integer(), default=None, help="greedy tokens generated (default 8)")
    p.add_argument("--passkey-plot", metavar="OUT.png", default=None,
                   help="write the pass-key heat map (length x depth per model, accuracy per filler) here, with "
                        "OUT.json beside it (default: beside --plot or --json as NAME.passkey.png; with "
                        "--passkey-only, --plot itself, its data at PLOT.json)")
    p.add_argument("--passkey-models", nargs="+", choices=["source", "local", "window", "bsbr"], default=None,
                   metavar="NAME", help="run the pass-key test on these only (source, local, window, bsbr; default "
                                        "all; window exists for models whose exact window passes their chunk)")
    p.add_argument("--passkey-only", action="store_true",
                   help="run the pass-key test only (no perplexity windows): for long prompts")
    p.add_argument("--lm-eval-task-dir", metavar="DIR", default=None,
                   help="write the pass-key prompts (--passkey-* options, this model's tokenizer) as the offline "
                        "lm-eval task bsbr_passkey into DIR, print how to run it, and exit")
    p.add_argument("--no-passkey", action="store_true", help="skip the pass-key test")
    p.add_argument("--seed", type=integer(*SEED_RANGE), default=None,
                   help="pass-key keys and default corpus order (default 0)")
    p.add_argument("--force", action="store_true",
                   help="use a --reference whose weights are not those the model was converted from")
    p.add_argument("--json", metavar="OUT", default=None, help="write all results here")
    p.add_argument("--plot", metavar="OUT.png", default=None,
                   help="write the plots here (with --passkey-only: the pass-key heat map, its data at OUT.json)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_eval)
    _DEFAULTS.update((name, p.get_default(name)) for name in _PERPLEXITY_OPTIONS + _PASSKEY_OPTIONS + _TASK_IGNORES
                     + ("seed",))
