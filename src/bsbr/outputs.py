"""Safe outputs, shared by every command that writes a model, a checkpoint or a result: output checks
before any expensive work, directories staged beside the target and renamed into place, files replaced
in one rename (README.md, "What the commands refuse"). Nothing here imports torch."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import stat
import tempfile
import threading
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence, Tuple

from .errors import OutputError, UserError, absent, check_not_interrupted
from .numbers import counted

NAME_MAX = 255  # bytes in one path component (Linux, macOS)
PATH_MAX = 4096  # bytes in a path, its terminating NUL included (Linux)
STAGED_EXTRA = len(".tmp-12345678.")  # bytes a name gains as the temporary file or folder an output is staged in
FIGURE_EXTRA = len("..tmp")  # bytes a figure's name gains as the file it is saved through (results.save_figure)
# bytes an output's path may gain where it is written: a staging folder beside it (".bsbr-results.tmp-12345678/")
# or in its place (".NAME.tmp-12345678/"), and a name inside that (a file written through ".NAME.tmp-12345678")
PATH_RESERVE = 2 * (NAME_MAX + 1)
logger = logging.getLogger(__name__)


def resolved_path(path) -> Path:
    """The absolute path at which the system makes or finds ``path``: its folder's links followed before
    ``..``, as the system reads ``link/../out`` (``abspath`` would take it for ``out`` beside the link), the
    last name kept as given (an output that is itself a link is seen as one)."""
    p = Path(os.getcwd(), os.path.expanduser(str(path)))
    if p.name in ("", ".."):  # (a root, or a path ending in ..)
        return Path(os.path.realpath(p))
    return Path(os.path.realpath(p.parent), p.name)


def _real(path) -> Path:
    """The file ``path`` names, as the system reads it: links followed before ``..`` (``abspath`` first would
    take ``link/..`` for the folder the link is in)."""
    return Path(os.path.realpath(os.path.expanduser(str(path))))


def _overlap(a: Path, b: Path) -> bool:
    return a.is_relative_to(b) or b.is_relative_to(a)


def _identity(path: Path):
    """What makes two names of one place one (``path`` real): the nearest folder or file at or above it that exists,
    by device and inode (one folder under two names: a bind mount, another spelling on a case-insensitive disk,
    which path strings cannot tell), and the names below it."""
    for p in (path, *path.parents):
        with contextlib.suppress(OSError):
            st = os.stat(p)
            # (a file system that numbers no inodes, as some FUSE and network drives, reports 0: the path decides)
            return (st.st_dev, st.st_ino, path.relative_to(p).parts) if st.st_ino else path
    return path


def _inside(a: Path, b: Path) -> bool:
    """Whether ``a`` is ``b`` or lies inside it by :func:`_identity` (``b`` must exist)."""
    place = _identity(b)
    return isinstance(place, tuple) and not place[2] and any(_identity(p) == place for p in (a, *a.parents))


def _mounts() -> list:
    """(mount point, device, root of the mount within its file system) of each mount that can be reached, deepest
    first, from /proc/self/mountinfo (none where there is none: not Linux). A mount another was mounted over, and
    every mount inside it, is hidden."""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            lines = f.read().splitlines()
    except OSError:
        return []

    def unescape(field):  # (a space, tab, newline or backslash in a path is written as an octal escape)
        return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)

    rows = {f[0]: (f[1] if f[1] != f[0] else None, Path(unescape(f[4])), f[2], Path(unescape(f[3])))
            for f in (line.split() for line in lines) if len(f) > 4}  # (the top of the tree may be its own parent)
    # covered: a mount with another mounted at its point (a child there), or at a folder above its point (a sibling
    # mounted later over that folder)
    covered = {parent for parent, point, *_ in rows.values() if parent in rows and rows[parent][1] == point}
    covered |= {m for m, (parent, point, *_) in rows.items() for n, (other, above, *_) in rows.items()
                if n != m and other == parent and point != above and point.is_relative_to(above)}

    def hidden(mount_id, depth=0):  # (depth: no cycle in a table read while it changes)
        if mount_id in covered:
            return True
        parent, point = rows[mount_id][:2]
        while parent in rows and rows[parent][1] == point and depth < len(rows):  # (the mounts it covers)
            parent, depth = rows[parent][0], depth + 1
        return parent in rows and depth < len(rows) and hidden(parent, depth + 1)

    shown = [row[1:] for mount_id, row in rows.items() if not hidden(mount_id)]
    return sorted(shown, key=lambda row: -len(row[0].parts))


def _in_file_system(p: Path, mounts: list):
    """The real path ``p`` as (device, path within its file system): one folder reached through two mounts (a bind
    mount) is one pair (None without mount information)."""
    for point, device, root in mounts:
        if p.is_relative_to(point):
            return device, root / p.relative_to(point)
    return None


def _within(a: Path, b: Path, mounts: list) -> bool:
    """Whether the real path ``a`` is ``b`` or lies inside it, through any of ``mounts`` (:func:`_mounts`) that
    shows a folder of them under another path (a bind mount): realpath cannot see that."""
    in_a = _in_file_system(a, mounts)
    if in_a is None:
        return False
    # what ``b`` shows: its own place, and the places mounted inside it
    shown = [_in_file_system(b, mounts)] + [(device, root) for point, device, root in mounts if point.is_relative_to(b)]
    return any(place is not None and in_a[0] == place[0] and in_a[1].is_relative_to(place[1]) for place in shown)


def _links_into(folder: Path, target: Path) -> bool:
    """Whether a link at the top of ``folder`` points into ``target`` (an unreadable folder: the input's own
    check says so)."""
    with contextlib.suppress(OSError), os.scandir(folder) as entries:
        return any(_real(e.path).is_relative_to(target) for e in entries if e.is_symlink())
    return False


def _check_path_names(out: Path, path, option: str) -> None:
    """An :class:`OutputError` when a name in the path is longer than a file name may be (else the file
    system's bare "File name too long" comes from the first look at it), when a ``..`` in it follows a folder
    that does not exist (the system cannot follow it, so a reader would not find what was written), or when the
    nearest folder above it that exists is a link that leads nowhere or a loop of links (a disk not mounted: the
    folders it names were made on the disk below, and the results hidden once it is mounted). (The output itself as
    a link is the caller's to refuse: a link is never written through.)"""
    nearest = next((q for q in Path(os.path.expanduser(str(path))).parents if os.path.lexists(q)), None)
    try:
        if nearest is not None:
            os.stat(nearest)
    except OSError:
        mend = "mend the link (a disk not mounted?), or " if nearest.is_symlink() else ""
        raise OutputError(f"{option} {path}: {nearest} {absent(nearest)}: {mend}choose another {option}") from None
    given = Path(os.path.expanduser(str(path))).parts
    for i in (i for i, part in enumerate(given) if part == ".." and i):
        if not Path(*given[:i]).is_dir():
            raise OutputError(f"{option} {path}: {Path(*given[:i])} is no folder, so the .. after it cannot be "
                              "followed: give the path without it")
    for part in out.parts:
        if len(os.fsencode(part)) > NAME_MAX:
            raise OutputError(f"{option} {path}: its name {part[:24]}... is {len(os.fsencode(part))} bytes, more "
                              f"than a file name may be ({NAME_MAX}): give a shorter name")
    if (n := len(os.fsencode(str(out)))) + PATH_RESERVE >= PATH_MAX:  # (shorter by k: true of a file beside it too)
        shown, k = str(path) if len(str(path)) <= 60 else f"{str(path)[:48]}...", n - (PATH_MAX - 1 - PATH_RESERVE)
        raise OutputError(f"{option} {shown}: the path is {n:,} bytes"
                          f"{'' if str(out) == str(path) else ' as an absolute path'}, and the files it is written "
                          f"through (up to {PATH_RESERVE} bytes longer) would pass what a path may be "
                          f"({PATH_MAX - 1:,}): give a path {counted(k, 'byte')} shorter")


def refuse_input_overlap(path, inputs: Iterable, option: str) -> None:
    """An :class:`OutputError` when the output ``path`` is one of ``inputs`` (``(label, path)`` pairs, path
    None when not given), inside one, or contains one."""
    out = resolved_path(path)
    real_out, mounts = _real(out), _mounts()
    for label, src in inputs:
        if src is None:
            continue
        s = resolved_path(src)
        real_src = _real(src)
        overlap = _overlap(real_out, real_src) or _within(real_out, real_src, mounts) or \
            _within(real_src, real_out, mounts) or _inside(real_out, real_src) or _inside(real_src, real_out)
        if (_overlap(out, s) or overlap) and (s.exists() or out == s):
            raise OutputError(f"{option} {path} overlaps the {label} {src}: the {label} would be overwritten; "
                              f"choose another {option}")
        if s.is_dir() and _links_into(s, real_out):
            raise OutputError(f"{option} {path} holds files the {label} {src} links to: the {label} would be "
                              f"overwritten; choose another {option}")


def holds_cwd(out: Path) -> bool:
    """Whether the output directory ``out`` (resolved) is or contains the current directory."""
    cwd = resolved_path(os.getcwd())  # (the real path: a shell's $PWD may name it through a link)
    return cwd.is_relative_to(out) or _real(cwd).is_relative_to(_real(out))


def check_output_dir(path, *, overwrite: bool = False, inputs: Iterable = (), option: str = "OUTPUT",
                     allow_existing: bool = False, renamed: bool = True) -> Path:
    """Check, before any expensive work, that ``path`` may be written as an output directory.

    ``inputs``: ``(label, path)`` pairs the command reads (a source or student directory); the output may
    not be one of them, inside one, or contain one (even with ``overwrite``). ``allow_existing``: the
    caller continues what is there (``distill --resume``); ``renamed``: the output is renamed into place
    (:func:`staged_dir`), which a mount point holding one cannot be (``distill`` publishes into its output).
    Returns the absolute path."""
    out = resolved_path(path)
    _check_path_names(out, path, option)
    cwd = resolved_path(os.getcwd())  # (the real path: a shell's $PWD may name it through a link)
    # replacing it would replace the current directory (a killed run's leftovers in it are taken over instead)
    replaces_cwd = holds_cwd(out) and not (_real(out) == _real(cwd) and _written_into(out))
    if overwrite and replaces_cwd:
        raise OutputError(f"{option} {path} is (or contains) the current directory: --overwrite would replace it; "
                          f"choose another {option}")
    refuse_input_overlap(path, inputs, option)
    if out.is_symlink():  # (distill, which writes into its output, refuses one as the others do: one rule)
        why = " (the output is renamed into place, which would replace the link)" if renamed else ""
        raise OutputError(f"{option} {path} is a symbolic link to {os.readlink(out)}: give the directory "
                          f"itself{why}")
    if renamed and not allow_existing and out.is_dir() and os.path.ismount(out) and _leftovers_inside(out) is None:
        raise OutputError(f"{option} {path} is a mount point holding files, which "
                          f"{'--overwrite' if overwrite else 'a bsbr command'} cannot replace (an output is renamed "
                          f"into place): empty it, or choose another {option}")
    if out.exists() and not out.is_dir():
        raise OutputError(f"{option} {path} is a file, not a directory: choose another {option}")
    name_bytes = len(os.fsencode(out.name))
    if name_bytes > NAME_MAX - STAGED_EXTRA:
        raise OutputError(f"{option} {path}: its last name is {name_bytes} bytes; the directory it is staged in "
                          f"beside it needs {STAGED_EXTRA} more: give a name of at most {NAME_MAX - STAGED_EXTRA} "
                          "bytes")
    if out.is_dir() and any(out.iterdir()) and not (overwrite or allow_existing) and replaces_cwd:  # (no advice
        raise OutputError(f"{option} {path} is not empty and is (or contains) the current directory, which "  # that
                          f"--overwrite would replace: choose another {option}")  # the check above then refuses)
    if out.is_dir() and any(out.iterdir()) and not (overwrite or allow_existing):
        left = sorted(e.name for e in out.iterdir())
        if all(_staged_inside(name) for name in left):
            raise OutputError(f"{option} {path} holds only {', '.join(left)}, left by a bsbr command that was killed "
                              f"while writing there: pass --overwrite to replace it, or remove it")
        if is_bsbr_output(out):  # (else the refusal --overwrite would meet, below: it was advised, then refused)
            raise OutputError(f"{option} {path} is not empty: pass --overwrite to replace it, or choose another "
                              f"{option}")
    if not allow_existing and out.is_dir() and any(out.iterdir()) and not is_bsbr_output(out):
        if busy := [e.name for e in out.iterdir() if _LOCK.fullmatch(e.name) and lock_held(e)]:
            raise OutputError(f"{option} {path} holds {busy[0]}, the lock of a bsbr command writing inside it now: "
                              f"wait for it to finish, or choose another {option}")
        card = out / "README.md"
        edited = " (its README.md is not the model card bsbr writes: edited?)" if card.is_file() and not \
            _is_model_card(card) else ""
        names = checkpoint_strays(out)[0]  # (inside a checkpoint folder: by their names there)
        if not names and not edited and _other_config(out / "config.json"):  # (another model, its files named as
            raise OutputError(f"{option} {path} holds another model than a BSBR one (its config.json), which bsbr "
                              f"never replaces: choose another {option}")  # bsbr names its own: not results alone)
        if not names and not edited:  # (all bsbr's, but no model, checkpoint or demo output: results alone)
            held = sorted(e.name for e in out.iterdir())
            raise OutputError(f"{option} {path} holds no BSBR model, checkpoint or demo output (only "
                              f"{', '.join(held[:3])}{', ...' if len(held) > 3 else ''}): --overwrite replaces only "
                              f"a bsbr output; remove them or choose another {option}")
        named = f" ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})" if names and not edited else ""
        raise OutputError(f"{option} {path} holds files no bsbr command wrote{named}{edited}, not only a BSBR model, "
                          f"its records or a checkpoint: --overwrite replaces only a bsbr output; move them or choose "
                          f"another {option}")
    if not _written_into(out) and (parent := unwritable_parent(out)) is not None:
        why = ("it is a file, not a directory" if not parent.is_dir() else "a read-only file system"
               if _read_only(parent) else "permission denied" if not os.access(parent, os.W_OK | os.X_OK)
               else "nothing can be made there")
        raise OutputError(f"{option} {path}: cannot write in {parent} ({why}): choose another {option}")
    if out.is_dir() and not os.access(out, os.W_OK | os.X_OK):
        why = "a read-only file system" if _read_only(out) else "permission denied"
        raise OutputError(f"{option} {path}: directory is not writable ({why}): choose another {option}, or make it "
                          "writable")
    return out


def check_output_files(outputs: Iterable, *, inputs: Iterable = (), plots: Iterable[str] = ()) -> None:
    """Check, before any expensive work, the result files a command was asked to write.

    ``outputs``: ``(option, path)`` pairs, path None when not asked; ``inputs``: ``(label, path)``
    pairs the command reads (files or directories). An output may not be another output, an input or
    a file inside an input directory, nor a directory; its folder must be makeable; an option in
    ``plots`` needs a file suffix matplotlib writes (.png, .pdf, .svg, ...)."""
    seen, mounts = {}, _mounts()
    sources = [(label, _real(src)) for label, src in inputs if src is not None]
    for option, path in outputs:
        if path is None:
            continue
        if not str(path).strip():
            raise OutputError(f"{option} is empty: give a file name")
        if str(path) == "-":  # (as --prompt-file - reads stdin, a reader may take it for stdout)
            raise OutputError(f"{option} -: results are written to a file, not to standard output: give a file name")
        out = resolved_path(path)
        real = _real(out)
        key = _identity(real)  # (one file may be reached by two names: a bind mount, a case-insensitive disk)
        if key in seen:
            raise OutputError(f"{option} {path} is also given to {seen[key]}: give each output its own file")
        seen[key] = option
        for label, src in sources:
            if real.is_relative_to(src) or _within(real, src, mounts) or _inside(real, src):
                raise OutputError(f"{option} {path} would overwrite the {label} {src}: choose another file")
        _check_path_names(out, path, option)
        if out.is_dir() or str(path).endswith(("/", os.sep)):
            raise OutputError(f"{option} {path} is a directory: give a file name")
        if out.is_symlink() or (out.exists() and not out.is_file()):  # a device (/dev/null), a pipe, a link
            raise OutputError(f"{option} {path} is not a regular file (a link, device or pipe): give a file name "
                              "(the file is replaced, not written through)")
        if (parent := unwritable_parent(out)) is not None:
            raise OutputError(f"{option} {path}: cannot write in {parent} (not a writable directory): choose "
                              "another path")
        name_bytes = len(os.fsencode(out.name))
        extra = FIGURE_EXTRA if option in plots else STAGED_EXTRA  # (save_figure's, atomic_write_text's file)
        if name_bytes > NAME_MAX - extra:
            raise OutputError(f"{option} {path}: its name is {name_bytes} bytes; the file it is written through "
                              f"beside it needs {extra} more than a name may have ({NAME_MAX}): give a name "
                              f"{counted(name_bytes - (NAME_MAX - extra), 'byte')} shorter")
        if option in plots:
            from matplotlib.backend_bases import FigureCanvasBase

            formats = {f: d for f, d in FigureCanvasBase.get_supported_filetypes().items() if f in _FIGURE_MAGIC}
            if not shutil.which(_tex_system()):  # .pgf needs a TeX system to lay out its text
                formats.pop("pgf", None)
            if out.suffix.lstrip(".").lower() not in formats:
                raise OutputError(f"{option} {path}: name a figure format by its suffix, one of "
                                  f"{', '.join('.' + f for f in sorted(formats))}")
        figure = option in plots  # (else it writes JSON)
        if out.is_file() and _owned_by_another_in_a_sticky_folder(out):
            raise OutputError(f"{option} {path} is another user's file in a folder where only its owner may replace "
                              "it (sticky, as /tmp): choose another file")
        if out.is_file() and out.name in _MODEL_FILES and _holds_model(out.parent):  # JSON, but the model's own
            raise OutputError(f"{option} {path} is a file of the model in {out.parent} (which would no longer load): "
                              "choose another file")
        if out.is_file() and out.name == "manifest.json" and any(_CHECKPOINT_DATA.fullmatch(p.name)
                                                                 for p in out.parent.iterdir()):
            raise OutputError(f"{option} {path} is the manifest of the distill checkpoint in {out.parent} (which "
                              "could no longer be resumed): choose another file")
        if out.is_file() and not _replaceable(out, figure):
            kind = f"a {out.suffix.lstrip('.').upper() or 'figure'} image" if figure else "a JSON file"
            raise OutputError(f"{option} {path} exists and is not {kind}, which is all it would be replaced by: "
                              "move it, or choose another file")


# how a figure file of each format matplotlib writes begins (svg: within its first KB; avif: from byte 4).
# Only these formats are accepted: a rerun must recognise its own earlier plot (matplotlib's raw RGBA dumps,
# .raw and .rgba, begin with nothing to recognise)
_FIGURE_MAGIC = {"png": (b"\x89PNG\r\n\x1a\n",), "pdf": (b"%PDF",), "eps": (b"%!PS", b"\xc5\xd0\xd3\xc6"),
                 "ps": (b"%!PS",), "jpg": (b"\xff\xd8\xff",), "jpeg": (b"\xff\xd8\xff",),
                 "tif": (b"II*\x00", b"MM\x00*"), "tiff": (b"II*\x00", b"MM\x00*"), "webp": (b"RIFF",),
                 "svgz": (b"\x1f\x8b",), "svg": (b"<svg",), "pgf": (b"%%",), "gif": (b"GIF87a", b"GIF89a"),
                 "avif": (b"ftypavif",)}


_JSON_READ = 1 << 26  # bytes of an existing JSON result read to check it parses (a larger one is not replaced)


def _replaceable(path: Path, figure: bool) -> bool:
    """Whether an existing result file may be replaced: empty, or of the kind the option writes (a JSON
    document, or a figure of the format its suffix names), so a mistyped --json never replaces a model's
    weights or a user's script."""
    try:
        with open(path, "rb") as f:
            head = f.read(1024)
            if not head:
                return True
            if figure:
                magic = _FIGURE_MAGIC.get(path.suffix.lower().lstrip("."), ())
                return any(head.startswith(m) or (m == b"<svg" and m in head) or (m == b"ftypavif" and head[4:12] == m)
                           for m in magic)
            if not head.lstrip().startswith((b"{", b"[")):  # (not read whole: a model's weights could be GBs)
                return False
            json.loads(head + f.read(_JSON_READ))
    except (OSError, ValueError, RecursionError):
        return False
    return True


# the files of a saved model that are JSON (so a result's --json could replace them), and its records
_MODEL_FILES = {"config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json",
                "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
                "chat_template.json", "conversion.json", "distill.json"}


def _owned_by_another_in_a_sticky_folder(path: Path) -> bool:
    if not hasattr(os, "geteuid"):  # (Windows: no sticky folders)
        return False
    folder, uid = os.stat(path.parent), os.geteuid()
    return bool(folder.st_mode & stat.S_ISVTX) and uid != 0 and uid not in (folder.st_uid, os.stat(path).st_uid)


def _holds_model(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def _tex_system() -> str:
    import matplotlib

    return matplotlib.rcParams["pgf.texsystem"]


# what a bsbr command writes at the top of its output: the model and tokenizer files save_pretrained writes,
# the conversion and distillation records, demo's results, and the model/ and checkpoint/ folders
_WRITTEN = {"config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
            "conversion.json", "distill.json", "distill.png", "eval.json", "eval.png", "speed.json", "speed.png",
            "README.md", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
            "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model", "chat_template.jinja",
            "chat_template.json"}
_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")  # the weight shards save_pretrained writes


# what bsbr stages and leaves when killed: ".NAME.tmp-" (and ".NAME.old-": an output being replaced) and
# tempfile's 8-character suffix; and the data files of a distill checkpoint (bsbr.distill.checkpoint's names)
_STAGED = re.compile(r"\..+\.(tmp|old)-[a-z0-9_]{8}")
_CHECKPOINT_DATA = re.compile(r"(trainable|optimizer)-\d{7,}-[0-9a-f]{8}\.safetensors")
_EARLIER_CHECKPOINT = ("progress.json", "trainable.safetensors", "optimizer.safetensors")


def earlier_checkpoint(folder: Path) -> bool:
    """Whether ``folder`` holds the whole checkpoint of a bsbr distill before 2026-11-29: its three files, the
    progress with that recipe's fields (its ``stage``)."""
    if not all((folder / name).is_file() and not (folder / name).is_symlink() for name in _EARLIER_CHECKPOINT):
        return False
    with contextlib.suppress(OSError, ValueError, RecursionError):
        progress = json.loads((folder / "progress.json").read_text(encoding="utf-8"))
        return isinstance(progress, dict) and {"step", "log", "config", "stage"} <= progress.keys()
    return False

_SAFETENSORS_TMP = re.compile(r"\.tmp[A-Za-z0-9]{6}")  # safetensors' save_file writes through one (a kill leaves it)


def _chat_templates(entry: Path) -> bool:
    """Whether ``entry`` is the folder a tokenizer's ``save_pretrained`` writes its named chat templates in."""
    return entry.name == "additional_chat_templates" and entry.is_dir() and not entry.is_symlink() and all(
        f.is_file() and not f.is_symlink() and f.suffix == ".jinja" for f in entry.iterdir())


def _written_name(name: str) -> bool:
    """Whether a file of this name is one bsbr writes at the top of an output (:data:`_WRITTEN`, weight shards)."""
    return name in _WRITTEN or bool(_SHARD.fullmatch(name))


# SHA-256 of the model cards earlier bsbr versions wrote (before 2026-12-03, before 2026-12-07, and the last one
# with no front matter), which --overwrite also replaces
_EARLIER_CARDS = {"0306ce1d1899582c5d13ca55cb7d4a667e42f31f1f3621d5f678b3d2fbc6b198",
                  "045040cdb2aa3cc875b44a028ff14c88cf5ff5724834ca530271cf795551d2b4",
                  "6bf772cb0ce4e22a832e8a5a2b0bbf09ed52e841a7839f8a46b0bd34038b3af0"}


def _holds(path: Path, text: str) -> bool:
    """Whether ``path`` holds ``text`` exactly."""
    try:
        return path.read_text(encoding="utf-8") == text
    except (OSError, UnicodeDecodeError):
        return False


def _is_model_card(path: Path) -> bool:
    """Whether ``path`` holds a model card bsbr wrote, as it wrote it (edited, it is the user's)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    if hashlib.sha256(text.encode()).hexdigest() in _EARLIER_CARDS:
        return True
    import yaml

    front = re.match(r"---\n(.*?)\n---\n", text, re.DOTALL)
    try:
        data = yaml.safe_load(front.group(1)) if front else None
    except yaml.YAMLError:
        return False
    base_model = data.get("base_model") if isinstance(data, dict) else None
    return isinstance(base_model, (str, type(None))) and text == model_card(base_model)


def left_by_a_kill(name: str) -> bool:
    """Whether a file or folder name is one bsbr stages its outputs under (so one a killed command left)."""
    return bool(_STAGED.fullmatch(name))


def _written_entry(entry: Path) -> bool:
    """Whether an entry at the top of an output is one a bsbr command writes there (:func:`is_bsbr_output`)."""
    if entry.is_symlink():
        return False
    if _idle_lock(entry):
        return True
    if left_by_a_kill(entry.name):  # (a user's .notes.old-20240115 backup matches the name too: looked into)
        staged = re.fullmatch(r"\.(.+)\.tmp-[a-z0-9_]{8}", entry.name)  # (atomic_write_text's file of a record)
        return bool(staged and _written_name(staged.group(1))) if entry.is_file() else \
            not lock_held(entry) and _bsbr_files_only(entry)
    if entry.is_dir():
        if entry.name == "checkpoint":
            return all(checkpoint_file(f) for f in entry.iterdir())
        return _chat_templates(entry) or entry.name == "model" and is_bsbr_output(entry)
    if entry.name == "README.md":  # the model card bsbr writes, unless edited (then it is the user's)
        return _is_model_card(entry)
    if entry.name == "bsbr_auto.py":  # the same: the module config.json's auto_map names, as bsbr writes it
        from .models.bsbr.configuration_bsbr import AUTO_CODE, EARLIER_AUTO_CODES

        return any(_holds(entry, text) for text in (AUTO_CODE, *EARLIER_AUTO_CODES))
    return _written_name(entry.name)


def _bsbr_files_only(folder: Path, depth: int = 3) -> bool:
    """Whether everything in ``folder`` (a killed run's staging folder: a partial model, a demo's files, an old
    output moved aside) is something bsbr writes, a few folders deep."""
    results = folder.name.startswith(".bsbr-results.tmp-")  # (write_together's: result files of any name, their
    # plots being saved and the old results it keeps to put back)

    def mine(e):  # a file bsbr writes through while it writes: safetensors' weights being saved (beside the
        # config.json save_pretrained writes first), a plot being saved
        plot = re.fullmatch(r"\.(.+)\.tmp(\.\w+)", e.name)
        return e.is_file() and not e.is_symlink() and (
            results or _SAFETENSORS_TMP.fullmatch(e.name) and (folder / "config.json").is_file()
            or plot is not None and _written_name(plot.group(1) + plot.group(2)))

    config = folder / "config.json"
    if config.exists() and not _bsbr_config(config) and (_other_config(config) or any(  # (a backup of a model)
            f.suffix == ".safetensors" or _SAFETENSORS_TMP.fullmatch(f.name) for f in folder.iterdir())):
        return False  # (an empty or cut-off config.json with no weights yet: save_pretrained's, killed writing it)
    return depth > 0 and all(_written_entry(e) or mine(e) or e.is_dir() and not e.is_symlink() and
                             _bsbr_files_only(e, depth - 1) for e in folder.iterdir())


_UNREADABLE = object()


def _config_json(config: Path):
    """``config`` parsed as JSON, or :data:`_UNREADABLE` (missing, unreadable, cut off)."""
    with contextlib.suppress(OSError, ValueError, RecursionError):
        return json.loads(config.read_text(encoding="utf-8"))
    return _UNREADABLE


def config_model_type(config: Path):
    """The ``model_type`` a config.json names, or None (none, or not a JSON object)."""
    got = _config_json(config)
    return got.get("model_type") if isinstance(got, dict) else None


def _bsbr_config(config: Path) -> bool:
    return config_model_type(config) == "bsbr"


def _other_config(config: Path) -> bool:
    """Whether ``config`` is whole JSON that is not a BSBR model's config."""
    return _config_json(config) is not _UNREADABLE and not _bsbr_config(config)


def _unfinished(folder: Path) -> bool:
    """Whether ``folder``, a killed run's staging folder beside an output, holds only what bsbr writes and no
    intact weights file at any depth: weights cut short or still in safetensors' temporary file, or none yet.
    One holding intact weights is kept: a whole result kept when its path appeared, or a user's backup."""
    from safetensors import safe_open

    def intact(f: Path) -> bool:
        try:
            with safe_open(str(f), "pt"):  # (a file cut short fails its header's check)
                return True
        except Exception:  # (safetensors' own error type)
            return False

    with contextlib.suppress(OSError):  # (a folder it cannot read, or one removed meanwhile: kept)
        return _bsbr_files_only(folder) and not any(
            intact(f) for f in folder.rglob("*.safetensors") if f.is_file() and not f.is_symlink())
    return False


def not_written(out: Path) -> list:
    """The names of the entries at the top of the directory ``out`` that no bsbr command writes there."""
    return sorted(e.name for e in out.iterdir() if not _written_entry(e))


def checkpoint_file(f: Path) -> bool:
    """Whether ``f``, in a distill output's ``checkpoint/``, is a file bsbr writes there (it holds files only)."""
    return not f.is_symlink() and f.is_file() and bool(
        left_by_a_kill(f.name) or f.name == "manifest.json" or _CHECKPOINT_DATA.fullmatch(f.name)
        or _SAFETENSORS_TMP.fullmatch(f.name) or f.name in _EARLIER_CHECKPOINT and earlier_checkpoint(f.parent))


def checkpoint_strays(out: Path) -> Tuple[list, bool]:
    """What no bsbr command wrote in the output ``out``, the entries of a distill ``checkpoint/`` folder and of a
    demo's ``model/`` named inside them (``checkpoint/NAME``), and whether ``checkpoint/`` holds any file distill
    writes there."""
    names, ckpt, model = [], out / "checkpoint", out / "model"
    for name in not_written(out):
        if name == ckpt.name and ckpt.is_dir() and not ckpt.is_symlink():
            names += sorted(f"{ckpt.name}/{f.name}" for f in ckpt.iterdir() if not checkpoint_file(f))
        elif name == model.name and model.is_dir() and not model.is_symlink() and _bsbr_config(model / "config.json"):
            names += [f"{model.name}/{n}" for n in not_written(model)] or [name]
        else:
            names.append(name)
    mine = ckpt.is_dir() and not ckpt.is_symlink() and any(checkpoint_file(f) for f in ckpt.iterdir())
    return names, mine


def resume_strays(out: Path) -> Optional[list]:
    """What a resumed distill run's model, published over the directory ``out``, would replace that no bsbr
    command wrote: their names (``checkpoint/NAME`` inside its checkpoint folder; for files of the names bsbr
    writes, beside no BSBR model: the entries at the top), or None when there is none (nothing but an empty
    checkpoint folder, as a first save killed at once leaves, or a bsbr output)."""
    ckpt = out / "checkpoint"
    empty = ckpt.is_dir() and not ckpt.is_symlink() and not any(ckpt.iterdir())
    entries = sorted(e.name for e in out.iterdir() if e != ckpt or not empty)
    if not entries or is_bsbr_output(out):
        return None
    return checkpoint_strays(out)[0] or [e for e in entries if e != ckpt.name] or entries


def is_bsbr_output(out: Path) -> bool:
    """Whether the directory is one a bsbr command wrote, which --overwrite may replace: a BSBR model (its
    config.json says so; at the top, or in model/ as bsbr demo writes it) or a distill checkpoint, holding
    nothing but what bsbr writes there (a user's file beside them is not replaced with them)."""
    def bsbr_manifest(manifest: Path) -> bool:
        with contextlib.suppress(OSError, ValueError, AttributeError, RecursionError):
            got = json.loads(manifest.read_text(encoding="utf-8"))
            return isinstance(got.get("files"), dict) and "format" in got
        return False

    entries = list(out.iterdir())
    ckpt = out / "checkpoint"
    # a distill checkpoint: its manifest, or data files alone with nothing else at the top (a first save
    # interrupted before its manifest); or what a command killed while writing into the directory left
    marked = _bsbr_config(out / "config.json") or _bsbr_config(out / "model" / "config.json") or \
        bsbr_manifest(ckpt / "manifest.json") or \
        (ckpt.is_dir() and any(ckpt.iterdir()) and all(e == ckpt or left_by_a_kill(e.name) for e in entries)) or \
        _leftovers_inside(out) is not None or \
        (entries and all(_idle_lock(e) or left_by_a_kill(e.name) and not (e / "config.json").exists()
                         for e in entries))  # (killed runs' partial outputs within it; a complete one is kept)
    return marked and not not_written(out)


_LOCK = re.compile(r"\..+\.lock")  # output_lock's file beside an output (inside this one: an output within it)


# what flock fails with where the system or file system has no such locks (Lustre without -o flock, NFS without
# lockd, some SMB and FUSE mounts)
_NO_LOCKS = {errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL}


def _flock(fd: int, exclusive: bool = True, wait: bool = False) -> Optional[str]:
    """Lock the open file ``fd`` (``fcntl.flock``; :class:`BlockingIOError` when another holds it and not
    ``wait``). None once locked, else why nothing was: the system (Windows) or file system has no such locks."""
    try:
        import fcntl
    except ImportError:
        return "this system has no file locks"
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | (0 if wait else fcntl.LOCK_NB))
    except OSError as e:
        if e.errno not in _NO_LOCKS:
            raise
        return f"its file system has no file locks: {e.strerror}"
    return None


def _open_dir(folder: Path) -> Optional[int]:
    """``folder`` open for reading, to lock (None where the system cannot open a folder: Windows)."""
    try:
        return os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except PermissionError:
        if os.name == "nt":
            return None
        raise


def lock_held(path: Path) -> bool:
    """Whether ``path``, an :func:`output_lock` file or a staging folder, is held by a running command (False
    where locks are not kept: then none is told from a killed one's)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        _flock(fd, exclusive=False)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _hold(folder: Path) -> Optional[int]:
    """A descriptor holding an exclusive lock on ``folder`` (a staging folder in use) until it is closed:
    :func:`lock_held` then tells it from one a killed command left."""
    fd = _open_dir(folder)
    if fd is not None:
        with contextlib.suppress(OSError):  # (NFS locks exclusively only what is open for writing: then unheld)
            _flock(fd, wait=True)
    return fd


def _idle_lock(entry: Path) -> bool:
    """An :func:`output_lock` file no running command holds (a killed one's, left behind)."""
    return bool(_LOCK.fullmatch(entry.name)) and entry.is_file() and entry.stat().st_size == 0 and not lock_held(entry)


STAGED_INSIDE = ".bsbr.tmp-"  # the prefix of the folder staged_dir writes in inside an empty output directory


def _staged_inside(name: str) -> bool:
    return name.startswith(STAGED_INSIDE)


def _leftovers_inside(out: Path) -> list:
    """What killed runs left inside the directory ``out`` while writing into it, when it holds nothing else
    (else None): their staging folders, and beside one the files it had moved in (``config.json``, moved
    last, not among them)."""
    entries = list(out.iterdir())
    staged = [e for e in entries if _staged_inside(e.name) and e.is_dir() and not e.is_symlink()]
    if len(staged) == len(entries):
        return entries
    moved_in = staged and not (out / "config.json").exists() and all(
        e in staged or (e.is_file() and not e.is_symlink() and _written_entry(e)) or _chat_templates(e)
        for e in entries)
    return entries if moved_in else None


def _written_into(out: Path) -> bool:
    """Whether :func:`staged_dir` writes into ``out`` (an existing directory, empty or holding only what
    killed runs left inside it: :func:`_leftovers_inside`) instead of beside it."""
    return out.is_dir() and not out.is_symlink() and _leftovers_inside(out) is not None


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Hold a Ctrl-C or SIGTERM that comes while the block runs (the renames that publish an output)
    until it ends, then deliver it: an interrupt leaves the old output or the new one, never neither. (A
    handler swap, not a signal mask: the kernel may hand the signal to one of torch's threads.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    # (a handler not set from Python reads as None and could not be restored: such a signal is not held)
    held = [sig for sig in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(sig) is not None]
    pending = []
    saved = [signal.signal(sig, lambda signum, frame: pending.append(signum)) for sig in held]
    try:
        yield
    finally:
        for sig, handler in zip(held, saved):
            signal.signal(sig, handler)
        for sig in dict.fromkeys(pending):
            signal.raise_signal(sig)


def write_errors() -> tuple:
    """The exceptions a write that ran out of room raises: OSError, and safetensors' own error (its
    writer reports a full disk as ``SafetensorError``, not as OSError)."""
    from safetensors import SafetensorError

    return OSError, SafetensorError


_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def save_tokenizer(tokenizer, directory) -> None:
    """``tokenizer.save_pretrained(directory)``. The tokenizers library's writer reports a failed write (a full
    disk) as a bare Exception naming "os error N": it is raised as the OSError it is, which every command's
    handling of a failed write knows (it was an internal error)."""
    try:
        tokenizer.save_pretrained(directory)
    except OSError:
        raise
    except Exception as e:
        code = _OS_ERROR.search(str(e))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(directory)) from e


def out_of_room(error: BaseException) -> bool:
    """Whether ``error`` (one of :func:`write_errors`) says the disk or quota is full: safetensors' own
    error (it reports a full disk so), or an OSError of ENOSPC/EDQUOT."""
    return not isinstance(error, OSError) or error.errno in (errno.ENOSPC, errno.EDQUOT)


def write_failure(option: str, path, error: BaseException, what: str, unchanged: bool = True) -> OutputError:
    """The one-line error of a write that failed (a full disk, a quota) while writing ``what`` into the
    output ``option`` ``path``; ``unchanged``: nothing was published there."""
    why = " ".join(str(error).split())[:200]
    kept = f"; {path} is as it was" if unchanged else ""
    fix = "free some space or choose another" if out_of_room(error) else "choose another"
    return OutputError(f"{option} {path}: could not write {what} ({why}){kept}: {fix} {option}")


def _read_only(directory: Path) -> bool:
    """Whether ``directory`` lies on a file system mounted read-only."""
    with contextlib.suppress(OSError, AttributeError):
        return bool(os.statvfs(directory).f_flag & os.ST_RDONLY)
    return False


def unwritable_parent(path: Path) -> Optional[Path]:
    """The nearest existing directory above ``path`` when ``path`` cannot be made there (not a directory,
    or not writable); None when it can. Tried by making a file there: root passes ``os.access`` where it
    cannot write (/proc, a root-squashed NFS mount)."""
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not (parent.is_dir() and os.access(parent, os.W_OK | os.X_OK)):
        return parent
    try:
        fd, probe = tempfile.mkstemp(prefix=".bsbr-probe-", dir=parent)
    except OSError:
        return parent
    os.close(fd)
    try:
        os.unlink(probe)
    except OSError:  # (an append-only folder: a file can be made, not removed)
        return parent
    return None


def _umask() -> int:
    """The process's umask, read from /proc (setting it to read it, the only other way, leaves it 0 for a moment
    for every thread: files other threads create then are writable by all)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def shared_modes(root: Path) -> None:
    """Give the weight files under ``root`` the mode any other written file gets (``0666`` less the umask):
    safetensors writes its files owner-only (0600), so a model shared with a group could not be loaded."""
    mode = 0o666 & ~_umask()
    for path in Path(root).rglob("*.safetensors"):
        if path.is_file() and not path.is_symlink():
            path.chmod(mode)


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
    is kept, complete, when ``path`` appeared while writing).

    An existing empty directory is written into, not replaced (a mount point cannot be replaced, the
    current directory should not be, and its owner and mode are the user's): the temporary directory is
    made inside it, and its entries are renamed into it at the end, a model's ``config.json`` last (a kill
    during those renames can leave some of them, but no loadable model)."""
    out = resolved_path(path)
    into = _written_into(out)
    left = _leftovers_inside(out) if into else []
    made = [] if into else _make_parents(out)
    tmp = temp_dir(out, STAGED_INSIDE) if into else temp_dir(out.parent, f".{out.name}.tmp-")
    held = _hold(tmp)  # (so that another command does not take it for a killed run's)
    try:
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            _remove_empty(made)
            raise
        try:
            shared_modes(tmp)
            if into:
                _publish_into(tmp, out, left)
            else:
                publish_dir(tmp, out, overwrite=overwrite)
        except BaseException as e:
            if not isinstance(e, OutputError):  # ``path`` appeared meanwhile: the complete result stays in tmp
                shutil.rmtree(tmp, ignore_errors=True)
                _remove_empty(made)
            raise
    finally:
        if held is not None:
            os.close(held)
    # what a killed run into the same path left beside it: removed where it holds no intact weights (a kill while
    # it was written; up to a model's size each), else kept (a result kept when its path appeared while it was
    # written, or an old output being moved aside)
    left = []
    with contextlib.suppress(OSError):  # (a folder that can be written but not listed: the output is published)
        left = sorted(p.name for p in out.parent.iterdir() if _STAGED.fullmatch(p.name) and not lock_held(p) and
                      p.name.rsplit(".", 1)[0] == f".{out.name}")  # (".out.tmp-v2.tmp-X" is another output's)
    for name in [n for n in left if n.rsplit(".", 1)[1].startswith("tmp-") and not n.startswith(".bsbr-results.")
                 and not (out.parent / n).is_symlink() and (out.parent / n).is_dir() and _unfinished(out.parent / n)]:
        # (write_together's results staging, whose name an output named bsbr-results shares, is never removed)
        shutil.rmtree(out.parent / name, ignore_errors=True)
        if not (out.parent / name).exists():  # (else, as another user's in a shared folder, it is named below)
            logger.info("%s: removed %s, an unfinished output an earlier run left when it was killed", out, name)
            left.remove(name)
    if left:
        logger.warning("%s: beside it lie %s, left by an earlier run that was killed; remove %s when not needed",
                       out, ", ".join(left), "them" if len(left) > 1 else "it")


@contextlib.contextmanager
def output_lock(path, option: str, inputs: Iterable = ()) -> Iterator[None]:
    """Hold an exclusive lock on the output ``path`` while the block runs, so that a second command
    writing there at the same time is refused at once instead of mixing its files with the first's. The
    lock is ``fcntl.flock`` on ``.NAME.lock`` beside ``path`` (released by the kernel if the process
    dies; the file is removed when the block ends), or, where nothing can be made beside it, on the folder
    ``path`` itself (then written into, never replaced by a rename). An output overlapping one of the
    command's ``inputs`` (:func:`refuse_input_overlap`) is refused first: nothing is written into an input.
    Where the system or file system keeps no locks, the block runs unlocked and a warning says so."""
    out = resolved_path(path)
    _check_path_names(out, path, option)
    refuse_input_overlap(path, inputs, option)
    busy = f"{option} {path} is being written by another bsbr command"  # (which one, the lock cannot tell)
    if unwritable_parent(out) is not None and out.is_dir() and not out.is_symlink():
        fd = _open_dir(out)
        try:
            try:
                _warn_unlocked(path, option, "this system cannot lock a folder" if fd is None else _flock(fd))
            except BlockingIOError:
                raise OutputError(f"{busy}: wait for it to finish, or choose another {option}") from None
            yield
        finally:
            if fd is not None:
                os.close(fd)
        return
    if unwritable_parent(out) is not None or len(os.fsencode(out.name)) > NAME_MAX - len(".lock."):
        yield  # nothing can be written there (or under that name): the output checks say why
        return
    lock = out.parent / f".{out.name}.lock"
    try:  # (a folder that looks writable but is not, as /proc: made or opened, it fails here)
        made = _make_parents(out)
        fd = _open_lock(lock)
    except OSError as e:
        if lock.exists():
            raise OutputError(f"{option} {path}: its lock file {lock} cannot be opened ({e.strerror}): another "
                              f"user's bsbr command made it; remove it if none is running, or choose another "
                              f"{option}") from None
        raise OutputError(f"{option} {path}: cannot write in {out.parent} ({e.strerror}): choose another "
                          f"{option}") from None
    os.close(fd)
    while True:
        fd = _open_lock(lock)
        try:
            _warn_unlocked(path, option, _flock(fd))
        except BlockingIOError:
            os.close(fd)
            _remove_empty(made)
            raise OutputError(f"{busy} (it holds {lock}): wait for it to finish, or choose another {option}") from None
        try:  # the holder before us may have removed the file after we opened it: lock the one there now
            if os.path.samestat(os.fstat(fd), os.stat(lock)):
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            lock.unlink()
        os.close(fd)
        _remove_empty(made)


def _warn_unlocked(path, option: str, why: Optional[str]) -> None:
    if why is not None:
        logger.warning("%s %s: not locked (%s): a second bsbr command writing there at the same time would not be "
                       "refused", option, path, why)


def _open_lock(lock: Path) -> int:
    """The lock file, made if missing, open for writing (an exclusive lock over NFS needs it), or read-only where
    it is another user's (0644, as a killed run left it in a shared folder: flock needs no more elsewhere)."""
    try:
        return os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    except PermissionError:
        return os.open(lock, os.O_RDONLY)


def _make_parents(path: Path) -> list:
    """Make ``path``'s folder; return the folders this made (deepest first), for :func:`_remove_empty`."""
    made = [p for p in [path.parent, *path.parent.parents] if not p.exists()]
    path.parent.mkdir(parents=True, exist_ok=True)
    return made


def write_together(files: Sequence[Tuple[os.PathLike, Callable[[Path], object]]],
                   figures: Optional[Iterable[os.PathLike]] = None) -> None:
    """Write result files as one set: each ``(path, write)`` first has ``write(staged)`` write its file
    in a staging folder beside ``path``; only when all are written are they renamed into place, in one
    short final step. A write that fails (or an interruption) before that step leaves the old files
    untouched, and neither staging folders nor the folders made for them; a rename that fails in that step
    puts back the files renamed before it. With ``figures`` (the paths among them that are plots; the
    others are JSON), an existing file is checked again before that step as :func:`check_output_files`
    checked it before the work: one of another kind put there meanwhile is not replaced."""
    held = []  # a lock on each staging folder while it is in use
    try:
        _write_together(files, figures, held)
    finally:
        for fd in held:
            if fd is not None:
                os.close(fd)


def _write_together(files, figures, held: list) -> None:
    staging, staged, made = {}, [], []
    path = None
    try:
        for path, write in files:
            path = resolved_path(path)
            if path.parent not in staging:
                left = sorted(p.name for p in path.parent.glob(".bsbr-results.tmp-*") if not lock_held(p)) \
                    if path.parent.is_dir() else []
                if left:  # (not removed: one may hold results its command could not put in place, as it said)
                    logger.warning("%s: %s left by an earlier run that was killed while writing its results; remove "
                                   "%s when not needed", path.parent, ", ".join(left), "them" if len(left) > 1 else "it")
                made += _make_parents(path)
                staging[path.parent] = temp_dir(path.parent, ".bsbr-results.tmp-")
                held.append(_hold(staging[path.parent]))  # (another command's warning above skips it)
            write(staging[path.parent] / path.name)
            staged.append((staging[path.parent] / path.name, path))
        check_not_interrupted()
    except BaseException as e:
        for folder in staging.values():
            shutil.rmtree(folder, ignore_errors=True)
        _remove_empty(sorted(made, key=lambda p: len(p.parts), reverse=True))
        if isinstance(e, OSError) and path is not None:  # a full disk, a folder that takes no files
            fix = "free some space or choose another path" if out_of_room(e) else "choose another path"
            raise UserError(f"{path}: could not be written ({e.strerror or e}); no result file was written: {fix}") from e
        raise
    plots = None if figures is None else {resolved_path(p) for p in figures if p is not None}
    changed = [] if plots is None else [path for _, path in staged if path.is_symlink() or path.exists() and not (
        path.is_file() and _replaceable(path, path in plots))]
    if changed:  # (checked again: a file may have been put there while the results were computed)
        for folder in staging.values():
            shutil.rmtree(folder, ignore_errors=True)
        raise UserError(f"{changed[0]} became a file no bsbr command wrote while the results were computed: not "
                        "replaced, no result file was written: move it, or choose another path")
    done = []  # (path, its old file kept in the staging folder, or None)
    try:
        with signals_held():
            for tmp, path in staged:
                old = None
                if path.exists():  # kept until every file is in place, to put back if one cannot be
                    old = tmp.with_name(f".old-{tmp.name}")
                    try:
                        os.link(path, old)
                    except OSError:  # (a file system without hard links)
                        shutil.copy2(path, old)
                os.replace(tmp, path)
                done.append((path, old))
    except OSError as e:  # (a file another user owns in a sticky folder: renaming over it is not permitted)
        for done_path, old in reversed(done):
            with contextlib.suppress(OSError):
                os.replace(old, done_path) if old is not None else done_path.unlink()
        for folder in staging.values():
            shutil.rmtree(folder, ignore_errors=True)
        raise UserError(f"{path}: could not be replaced ({e.strerror or e}); the result files are as they were: "
                        "choose another path") from e
    for parent, folder in staging.items():
        shutil.rmtree(folder)  # (now only the old files)
        with contextlib.suppress(OSError):  # not every file system lets a directory be synced
            fsync(parent)


def _remove_empty(folders) -> None:
    """Remove the folders a failed command created (deepest first), where they are still empty."""
    for p in folders:
        with contextlib.suppress(OSError):
            p.rmdir()


def publish_dir(tmp: Path, out: Path, *, overwrite: bool = False) -> None:
    """Rename the complete directory ``tmp`` to ``out`` (same file system). An old ``out`` (``overwrite``) is
    swapped with it in one step where the system can (Linux), else moved aside first."""
    check_not_interrupted()
    replace = False
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    elif out.exists():
        if not overwrite:
            raise OutputError(f"{out} appeared while writing: not replaced (the result is in {tmp})")
        if out.is_symlink() or not out.is_dir() or not is_bsbr_output(out):  # (checked again: it may have changed)
            raise OutputError(f"{out} gained files no bsbr command wrote while writing: not replaced (the result is in "
                              f"{tmp})")
        replace = True
    with signals_held():  # (an interrupt here is delivered after the renames and the old output's removal)
        if replace and _exchange(tmp, out):  # the new output in place, the old one at tmp
            if tmp.is_dir() and not tmp.is_symlink() and not is_bsbr_output(tmp):  # (a file put in it at the last
                _exchange(tmp, out)  # moment: the old output goes back, with it)
                raise OutputError(f"{out} gained files no bsbr command wrote while writing: not replaced (the result "
                                  f"is in {tmp})")
            if tmp.is_dir() and not tmp.is_symlink():
                shutil.rmtree(tmp, ignore_errors=True)
            else:  # (the output had become a file meanwhile)
                tmp.unlink()
        else:
            _rename_over(tmp, out, replace)
    _fsync_dir(out.parent)


def _exchange(a: Path, b: Path) -> bool:
    """Swap the paths ``a`` and ``b`` in one step (Linux's ``renameat2`` with ``RENAME_EXCHANGE``), so that a
    kill leaves one or the other at each; False where the system or file system cannot."""
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError, TypeError):  # not Linux, or a C library without it (Windows: TypeError)
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_cwd, exchange = -100, 2  # AT_FDCWD, RENAME_EXCHANGE
    if renameat2(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _rename_over(tmp: Path, out: Path, replace: bool) -> None:
    """Rename ``tmp`` to ``out``, an old ``out`` (``replace``) moved aside first and removed after (a kill
    between the two renames leaves it at ``.NAME.old-*/NAME``)."""
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent)) if replace else None
    published = False
    try:
        if old is not None:
            os.replace(out, old / out.name)
        try:
            os.replace(tmp, out)
            published = True
        finally:
            if not published and old is not None and (old / out.name).exists():
                os.replace(old / out.name, out)  # the rename failed: the old output goes back
    finally:
        if old is not None and (published or not (old / out.name).exists()):
            shutil.rmtree(old, ignore_errors=True)


def _publish_into(tmp: Path, out: Path, left: Sequence[Path] = ()) -> None:
    """Rename the entries of the complete directory ``tmp``, made inside ``out``, into ``out``, which held
    nothing but ``left``: what killed runs left there (:func:`_leftovers_inside`), removed first."""
    check_not_interrupted()
    if any(entry != tmp and entry not in left for entry in out.iterdir()):
        raise OutputError(f"{out} gained files while writing: nothing written into it (the result is in {tmp})")
    for entry in left:
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink()
    publish_files(tmp, out)  # (a model's config.json last: until then the folder holds no loadable model)


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
    path = resolved_path(path)  # (tempfile would take a folder's link/.. for the folder beside the link)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # as open() would create it (mkstemp gives 0600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        check_not_interrupted()
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


MODEL_CARD = """# A BSBR model

Block Sparse attention with Block Retrieval. The `bsbr` package that wrote it must be installed (config.json
records its version as `bsbr_version`). After `import bsbr`, which registers the model with transformers' Auto
classes:

```python
import bsbr
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(PATH)   # or bsbr.load_bsbr_model(PATH)
```

Where bsbr is not imported (the `lm_eval` command line, a script written for any model), pass
`trust_remote_code=True`: `bsbr_auto.py`, which config.json's `auto_map` names, imports the installed bsbr
and nothing else. `conversion.json`, where present, records the conversion's options and its source (name,
model type, a fingerprint of its weights); `distill.json`, where present, the distillation's settings and losses.
"""


def model_card(base_model: Optional[str] = None) -> str:
    """The model card bsbr writes: the hub's front matter (the model ``base_model`` derives from, a hub id, where
    known; transformers' causal LM) and :data:`MODEL_CARD`."""
    from huggingface_hub import ModelCardData

    data = ModelCardData(base_model=base_model, library_name="transformers", pipeline_tag="text-generation",
                         tags=["bsbr"])
    return f"---\n{data.to_yaml()}\n---\n\n{MODEL_CARD}"


def write_model_card(directory, base_model: Optional[str] = None) -> None:
    card = Path(directory) / "README.md"
    if not card.exists():
        card.write_text(model_card(base_model), encoding="utf-8")


def publish_files(staging, directory) -> None:
    """Move every file of the complete ``staging`` directory into ``directory`` (same file system),
    ``config.json`` last and any old ``config.json`` removed first: until the last rename the directory
    holds no loadable model, after it the new one. ``staging`` is removed."""
    staging, directory = Path(staging), Path(directory)
    shared_modes(staging)
    check_not_interrupted()
    old_config = directory / "config.json"
    with signals_held():
        if old_config.exists():
            old_config.unlink()
            _fsync_dir(directory)
        for name in sorted((p.name for p in staging.iterdir()), key=lambda n: (n == "config.json", n)):
            target = directory / name
            if target.is_dir() and not target.is_symlink():  # (a folder is replaced whole, as a file is)
                shutil.rmtree(target)
            os.replace(staging / name, target)
    staging.rmdir()
    _fsync_dir(directory)
