"""Text for evaluation, distillation and the trained-from-scratch benchmark; nothing downloaded by default.

The default corpus is the Python standard library's own ``.py`` sources: every machine that runs
``bsbr`` has them, they are long (long files exercise retrieval across chunks), and they are not
the web prose a chat model was tuned on, so they are hard to have memorised verbatim. Files are
split into ``"train"`` (``bsbr distill``, ``bsbr bench quality``) and ``"heldout"`` (``bsbr eval``,
``bsbr bench quality``) by a SHA-256 of their relative path: independent of Python's randomised
``hash``, the disk's file order and the other files, so a file keeps its split when files come or go.
"""
from __future__ import annotations

import collections.abc
import glob
import hashlib
import itertools
import logging
import os
import sysconfig
from pathlib import Path
from typing import Collection, Iterable, Iterator, List, Optional, Sequence, Union

import torch

from .errors import absent

logger = logging.getLogger(__name__)


def leading_specials(tokenizer) -> List[int]:
    """The special tokens the tokenizer puts before a text (a BOS), without those it appends (an EOS):
    what a prompt the model continues begins with."""
    full, plain = (list(tokenizer("x", add_special_tokens=special)["input_ids"]) for special in (True, False))
    return next((full[:i] for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain), [])


SPLITS = ("train", "heldout", "all")
HELDOUT_FRACTION = 0.1
# directories never read: test suites (they are code *about* the library, full of fixtures and
# generated data) and installed third-party packages (not the standard library, and they change)
EXCLUDE_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _unit_hash(key: str) -> float:
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2.0**64


def split_of(relative_path: str) -> str:
    """``"heldout"`` for a stable :data:`HELDOUT_FRACTION` of relative paths, else ``"train"``; the
    path is normalised to forward slashes so the split is the same on every OS."""
    return "heldout" if _unit_hash(Path(relative_path).as_posix()) < HELDOUT_FRACTION else "train"


def _unreadable(error: OSError) -> None:
    """``os.walk``'s ``onerror``: a folder inside a corpus it cannot list (it would skip its files silently)."""
    raise OSError(error.errno, f"{error.strerror} (a folder inside the corpus, whose files would be left out): make "
                  "it readable, or give a folder without it", error.filename)


def stdlib_files(split: str = "heldout", root: Optional[Union[str, os.PathLike]] = None) -> List[Path]:
    """The standard library's ``.py`` files in ``split`` (``"train"``, ``"heldout"`` or ``"all"``),
    sorted by relative path (deterministic on every machine with the same Python). Test suites,
    ``test_*.py`` files, ``site-packages`` and caches are excluded (see :data:`EXCLUDE_DIRS`).
    ``root`` defaults to :func:`stdlib_root`; tests pass a small directory.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    root = Path(root) if root is not None else stdlib_root()
    if not root.is_dir():
        raise FileNotFoundError(f"corpus directory not found: {root}")
    found = []
    for d, dirs, files in os.walk(root, onerror=_unreadable):
        dirs[:] = [x for x in dirs if x not in EXCLUDE_DIRS]
        # regular files only: a FIFO would block the read, a dangling link fail it
        found += [(Path(d) / f).relative_to(root).as_posix() for f in files
                  if f.endswith(".py") and not f.startswith("test_") and os.path.isfile(os.path.join(d, f))]
    return [root / rel for rel in sorted(found) if split == "all" or split_of(rel) == split]


def mixed_order(paths: Sequence[Path], seed: int = 0, root: Optional[Union[str, os.PathLike]] = None) -> List[Path]:
    """``paths`` in a deterministic, seed-dependent shuffled order (sorted by a hash of the seed and
    each path relative to ``root``, so that the order is the same wherever the files lie), so the first few
    windows sample many modules instead of the alphabetical start (``__future__``, ``_aix_support``, ...)."""
    def key(p):
        return _unit_hash(f"{seed}:{(Path(p).relative_to(root) if root is not None else Path(p)).as_posix()}")
    return sorted(paths, key=key)


PIECE_CHARS = 1 << 20  # a document is tokenized a piece of about this many characters at a time


def _file_pieces(path) -> Iterator[str]:
    """The text of one file, read a piece at a time: pieces of about :data:`PIECE_CHARS` characters that
    end at a line end (UTF-8 without a leading byte-order mark; undecodable bytes replaced, never an error)."""
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        carry = ""
        while True:
            block = f.read(PIECE_CHARS)
            if not block:
                break
            text = carry + block
            cut = text.rfind("\n") + 1 or len(text) if len(text) >= PIECE_CHARS else 0
            carry, text = text[cut:], text[:cut]
            if text:
                yield text
        if carry:
            yield carry


def _str_pieces(text: str) -> Iterator[str]:
    """A string in pieces of about :data:`PIECE_CHARS` characters ending at a line end (one piece when it is
    shorter)."""
    start = 0
    while len(text) - start > PIECE_CHARS:
        cut = text.rfind("\n", start, start + PIECE_CHARS) + 1 or start + PIECE_CHARS
        yield text[start:cut]
        start = cut
    yield text[start:]


def read_texts(paths: Iterable[Union[str, os.PathLike]]) -> Iterator[Iterator[str]]:
    """Each file as a document read lazily, a piece at a time (see :func:`token_windows`), so that a large
    file is never held or tokenized whole."""
    return (_file_pieces(p) for p in paths)


def stdlib_texts(split: str = "heldout", seed: int = 0) -> Iterator[Iterator[str]]:
    """The default corpus: the texts of :func:`stdlib_files` in :func:`mixed_order`."""
    files = stdlib_files(split)
    if not files:
        raise ValueError(f"no standard-library .py files in split {split!r} under {stdlib_root()}")
    logger.info("corpus: %d standard-library files in split %r", len(files), split)
    return read_texts(mixed_order(files, seed, root=stdlib_root()))


DATA_SUFFIXES = (".txt", ".json", ".jsonl", ".csv", ".tsv", ".parquet", ".arrow")  # a name ending so is a file
COMPRESSED = (".gz", ".bz2", ".zst", ".xz", ".lz4", ".zip")


def spelled_as_a_path(name: str) -> bool:
    """Whether a ``--dataset`` name is spelled as a local path (``./``, ``/``, ``~``, a data file's suffix), never
    a hub dataset's, or names a link here (even one to nothing)."""
    return name.startswith((".", "/", "~")) or name.lower().endswith(DATA_SUFFIXES + COMPRESSED + (".ndjson", ".tar")) \
        or os.path.lexists(os.path.expanduser(name))


def _dataset_builder(datasets, name: str, config: Optional[str], **options):
    """The builder of ``name``: a hub dataset, a local folder of data files, or one local data file (read
    by its folder's builder, as its one split ``train``)."""
    path = Path(name).expanduser()
    if path.is_file():
        # (a link: by its own name; datasets reads a path as a pattern: data[1].jsonl would match data1.jsonl, and
        # a file in gl[1]/ one in gl1/)
        where = dict(path=str(path.parent.resolve()), data_files=glob.escape(str(path.parent.resolve() / path.name)))
    elif path.is_dir():
        if any(c in str(path.resolve()) for c in "*?["):
            raise ValueError("a folder whose path holds *, ? or [ (datasets reads it as a pattern, which may match "
                             "another folder): rename it, or give one of its data files")
        where = dict(path=str(path.resolve()))
    elif path.exists():
        raise ValueError("not a regular file (a device or FIFO): give data files")
    elif os.path.lexists(path):  # (a link to nothing, or a loop of links)
        raise ValueError(f"it {absent(path)}")
    elif spelled_as_a_path(name):
        raise ValueError("no such folder or file")
    else:
        where = dict(path=name)
    return datasets.load_dataset_builder(name=config, **where, **options)


def _text_files(builder, split: str) -> Optional[List[str]]:
    """The local files of ``split`` (``a+b``: both) when ``builder`` reads plain text, else None."""
    if builder.name != "text":
        return None
    files = {str(k): list(v) for k, v in (builder.config.data_files or {}).items()}
    if any(part not in files for part in split.split("+")):
        raise ValueError(f"Bad split: {split}. Available splits: {sorted(files)}")
    chosen = [f for part in split.split("+") for f in files[part]]
    # (compressed files: read through the builder, which decompresses them; opened here, their bytes were text)
    return chosen if all("://" not in f and not f.endswith(COMPRESSED) for f in chosen) else None


def only_split(name: str, config: Optional[str] = None) -> Optional[str]:
    """The one split of a local dataset that has one (a data file, or a folder whose file names name no
    split: ``train``); None for a hub name, several splits, or a dataset that does not open (the caller's
    check names why)."""
    if not Path(name).expanduser().exists():
        return None
    try:
        import datasets

        splits = list(_dataset_builder(datasets, name, config).config.data_files or ())
    except Exception:  # reported by the check that opens it
        return None
    return str(splits[0]) if len(splits) == 1 else None  # (a NamedSplit: neither JSON nor a str to parse)


def dataset_texts(name: str, config: Optional[str] = None, split: str = "test",
                  text_column: str = "text") -> Iterator[Union[str, Iterator[str]]]:
    """Texts from a HuggingFace dataset (an optional dependency; see :func:`_dataset_builder` for what
    ``name`` may be), streamed: only the rows read are fetched. Empty rows are skipped. Plain-text files
    are read one document per file, as ``--text-file`` reads them (the ``text`` builder's default is one
    row per line, which drops the blank lines and newlines of code and prose); local ones a piece at a
    time, as :func:`read_texts` does (whole, a file of over 2 GB did not fit one row)."""
    try:
        import datasets
    except ImportError as e:
        raise ImportError("--dataset needs the 'datasets' package: pip install datasets") from e
    try:
        builder = _dataset_builder(datasets, name, config)
        files = _text_files(builder, split)
        if files is None and builder.name == "text":  # (a hub dataset's text files: whole documents)
            builder = _dataset_builder(datasets, name, config, sample_by="document")
        elif builder.name == "csv":  # a cell reading NA, null or nan is that text, not a missing value (pandas')
            builder = _dataset_builder(datasets, name, config, keep_default_na=False)
        ds = None if files is not None else builder.as_streaming_dataset(split=split)
    except Exception as e:  # network, unknown name, unknown config/split: all user-facing
        why = str(e) or ("its data files hold no rows" if isinstance(e, StopIteration) else type(e).__name__)
        cache, failed = Path(os.path.abspath(datasets.config.HF_DATASETS_CACHE)), getattr(e, "filename", None)
        if isinstance(e, OSError) and failed and (cache.is_relative_to(os.path.abspath(failed))
                                                  or Path(os.path.abspath(failed)).is_relative_to(cache)):
            why += f" (datasets' cache, {cache}: set HF_DATASETS_CACHE to a writable folder)"
        raise ValueError(f"could not load dataset {name!r} (config {config!r}, split {split!r}): {why}") from e
    if files is not None:
        if text_column != "text":
            raise ValueError(f"dataset {name!r} has no column {text_column!r} (columns: ['text']); "
                             "pick one with --text-column")
        return (_file_pieces(f) for f in files if os.path.getsize(f) > 0)

    def read(it, i):  # the row after i rows; a parser's error (mid-file: it reads a block at once) naming the dataset
        try:
            return next(it)
        except UnicodeDecodeError as e:
            raise ValueError(f"dataset {name!r} is not UTF-8 text ({e.reason}): save it as UTF-8") from None
        except (StopIteration, ImportError):
            raise
        except Exception as e:  # (pyarrow's and pandas' own kinds)
            why = " ".join(str(e).split())[:200] or type(e).__name__
            if "Compression type" in why:  # (a codec's package missing: check_dataset says which to install)
                raise ValueError(f"dataset {name!r}: {why}") from None
            raise ValueError(f"dataset {name!r}: reading its rows failed after {i:,} ({why}): give UTF-8 JSON Lines, "
                             "CSV or Parquet") from None

    def rows():
        skipped, it = 0, iter(ds)
        for i in itertools.count():
            try:
                row = read(it, i)
            except StopIteration:
                if skipped > 1:
                    logger.warning("dataset %r: %d rows without text in column %r were skipped", name, skipped,
                                   text_column)
                return
            if text_column not in row:
                raise ValueError(f"dataset {name!r} has no column {text_column!r} (columns: {sorted(row)}); "
                                 "pick one with --text-column")
            text = row[text_column]
            if text is not None and not isinstance(text, str):
                raise ValueError(f"dataset {name!r}: row {i:,}'s {text_column!r} is a {type(text).__name__}, not "
                                 "text: pick a column of text with --text-column")
            if text is not None and builder.name == "text":  # a whole file: a compressed one's byte-order mark
                text = text.removeprefix("\ufeff")
            if text is not None and "\0" in text[:8192]:
                raise ValueError(f"dataset {name!r}: row {i:,}'s {text_column!r} holds NUL characters (binary, or "
                                 "UTF-16 text): give UTF-8 text")
            if text is None or not text.strip():
                if not skipped:
                    logger.warning("dataset %r: row %d has no text in column %r: rows without text are skipped",
                                   name, i, text_column)
                skipped += 1
                continue
            yield text

    return rows()


ROW_BUILDERS = ("json", "csv", "text", "parquet", "arrow", "webdataset")  # datasets' builders of text rows


def rows_file(path: Path) -> bool:
    """Whether datasets reads the file ``path`` as rows that may hold text: a format of one of
    :data:`ROW_BUILDERS` (by its own table of suffixes: ``.ndjson`` and ``.tar`` too), compressed or not, or a
    ``.zip`` holding such files (Markdown goes to its task builder, ``.xml`` and images to others)."""
    import zipfile

    from datasets.packaged_modules import _EXTENSION_TO_MODULE

    if path.name.lower().endswith(".zip"):
        try:
            with zipfile.ZipFile(path) as z:
                return any(rows_file(Path(member)) for member in z.namelist())
        except (OSError, zipfile.BadZipFile):
            return False
    return _EXTENSION_TO_MODULE.get(data_suffix(path.name).lower(), ("",))[0] in ROW_BUILDERS


def data_suffix(name: str) -> str:
    """A file name's format suffix, under a compression suffix (``a.jsonl.gz``: ``.jsonl``)."""
    for c in COMPRESSED:
        name = name.removesuffix(c)
    return Path(name).suffix or name


def local_dataset_files(name: str, config: Optional[str] = None, split: str = "test"):
    """For a local ``--dataset`` (a data file or a folder): ``(read, unread, plain, splits)``, the files its split
    reads, the folder's files no split reads (datasets reads one format per folder, and names splits after file
    names; a card, a licence and ``save_to_disk``'s records aside), whether the read ones are plain text, and
    each split's files; ``([], [], False, {})`` for a hub name."""
    path = Path(name).expanduser()
    if not path.exists():
        return [], [], False, {}
    for _ in os.walk(path, onerror=_unreadable) if path.is_dir() else ():  # (datasets' glob skips what it cannot list)
        pass
    import datasets

    builder = _dataset_builder(datasets, name, config)
    files = {str(k): [str(f) for f in v] for k, v in (builder.config.data_files or {}).items()}
    read = [f for part in split.split("+") for f in files.get(part, ())]
    plain = builder.name == "text"
    if not path.is_dir():
        return read, [], plain, files
    every, root = {str(f) for fs in files.values() for f in fs}, path.resolve()
    records = {"state.json", "dataset_info.json", "dataset_dict.json", "dataset_infos.json"}
    unread = sorted(str(f) for f in root.rglob("*") if f.is_file() and str(f) not in every and f.name not in records
                    and not f.name.upper().startswith(("README", "LICENSE", "LICENCE", "COPYING"))
                    and not any(part.startswith(".") for part in f.relative_to(root).parts))
    return read, unread, plain, files


def corpus_texts(text_files: Optional[Sequence[os.PathLike]] = None, dataset: Optional[str] = None,
                 dataset_config: Optional[str] = None, dataset_split: str = "test", text_column: str = "text",
                 split: str = "heldout", seed: int = 0):
    """(texts iterator, description): local files, a HuggingFace dataset, or the default corpus's
    ``split`` of the standard library's sources; the description names local paths absolute, so that a
    record of it can be rerun from anywhere."""
    if isinstance(text_files, (str, os.PathLike)):  # (a string was read as one file per character)
        raise TypeError(f"text_files must be a list of paths, got one path: give [{str(text_files)!r}]")
    if text_files and dataset:
        raise ValueError("give either text files or a dataset, not both")
    if text_files:
        missing = [str(f) for f in text_files if not Path(f).is_file()]
        if missing:
            raise FileNotFoundError(f"text file not found: {', '.join(missing)}")
        return read_texts(text_files), dict(kind="text_files", files=[str(Path(f).resolve()) for f in text_files])
    if dataset:
        local = Path(dataset).expanduser()
        return (dataset_texts(dataset, dataset_config, dataset_split, text_column),
                dict(kind="dataset", name=str(local.resolve()) if local.exists() else dataset, config=dataset_config,
                     split=dataset_split, text_column=text_column))
    return stdlib_texts(split, seed=seed), dict(kind="stdlib", split=split, seed=seed, root=str(stdlib_root()))


def read_in_order(description: dict) -> Optional[List[str]]:
    """The files :func:`corpus_texts` reads for ``description`` one document each, in the order it reads them (its
    text files; a local plain-text dataset's split; the default corpus's split in its seeded order), or None where
    its documents are rows (a data file's, a hub dataset's)."""
    kind = description.get("kind")
    if kind == "text_files":
        return list(description["files"])
    if kind == "dataset" and Path(description["name"]).exists():
        read, _, plain, _ = local_dataset_files(description["name"], description.get("config"), description["split"])
        # (as dataset_texts reads them: an empty file is no document; compressed ones are read as rows, an archive's
        # members and blank texts among them not counted here: None)
        return [str(Path(f).resolve()) for f in read if os.path.getsize(f) > 0] \
            if plain and not any(f.endswith(COMPRESSED) for f in read) else None
    if kind == "stdlib":
        return [str(f) for f in mixed_order(stdlib_files(description["split"]), description.get("seed", 0),
                                            root=stdlib_root())]
    return None


def files_read(description: dict, documents: Optional[Collection[int]] = None,
               order: Optional[List[str]] = None) -> dict:
    """``description`` with ``files``: the files of the documents numbered ``documents`` (None: all; of ``order``,
    default :func:`read_in_order`'s); for a local dataset of rows, its split's files (its rows are not traced to
    their files)."""
    order = read_in_order(description) if order is None else order
    if order is not None:
        return dict(description, files=[f for i, f in enumerate(order) if documents is None or i in documents])
    if description.get("kind") == "dataset" and Path(description["name"]).exists():
        read = local_dataset_files(description["name"], description.get("config"), description["split"])[0]
        return dict(description, files=[str(Path(f).resolve()) for f in read])
    return description


def windows_read(tokenizer, texts, description: dict, seq_len: int, max_windows: Optional[int],
                 stride: Optional[int] = None):
    """(:func:`token_windows` of ``texts``, ``description`` (:func:`corpus_texts`'s record of them) with the
    files read: those with a token in a window; the files left unread, in order: ``max_windows`` reached before
    them, or their tokens in no window (the last, partial window's, or between windows of a wider ``stride``))."""
    used = set()
    windows = token_windows(tokenizer, texts, seq_len, max_windows, stride, used=used)
    order = read_in_order(description)
    return (windows, files_read(description, used, order),
            [] if order is None else [f for i, f in enumerate(order) if i not in used])


def token_windows(tokenizer, texts: Iterable[Union[str, Iterator[str]]], seq_len: int, max_windows: Optional[int],
                  stride: Optional[int] = None, used: Optional[set] = None) -> torch.Tensor:
    """Fixed-length windows of token ids, shape ``(num_windows, seq_len)``.

    Documents (each a string, or an iterator of its pieces, as :func:`read_texts` gives a file) are
    tokenized without special tokens, a piece of about :data:`PIECE_CHARS` characters at a time (a longer
    string is cut at line ends; the tokens at a cut may differ from the whole string's), and concatenated
    with the tokenizer's EOS token after each one (as in packed pretraining): the stream is
    ``doc_0, EOS, doc_1, EOS, ...``. Window ``i`` is ``stream[i*stride : i*stride + seq_len]``;
    ``stride`` defaults to ``seq_len`` (non-overlapping). Only full windows are returned, at most
    ``max_windows`` (None = all), and documents are read only until enough tokens are buffered,
    so a large corpus is never tokenized in full. Deterministic given the texts' order. ``used``, where given,
    gets the numbers (from 0) of the documents with a token of their text in a returned window.
    """
    if not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an int >= 2, got {seq_len!r}")
    if max_windows is not None and (not isinstance(max_windows, int) or max_windows < 1):
        raise ValueError(f"max_windows must be a positive int or None, got {max_windows!r}")
    stride = seq_len if stride is None else stride
    if not isinstance(stride, int) or stride < 1:
        raise ValueError(f"stride must be a positive int, got {stride!r}")
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ValueError("tokenizer has no eos_token_id: it is needed to separate documents")

    buffer: List[int] = []
    owner: List[int] = []  # the document of each of ``buffer``'s tokens (-1: an EOS)
    start = 0  # where the next window starts in ``buffer``
    out: List[List[int]] = []
    for number, doc in enumerate(texts):
        if not isinstance(doc, (str, collections.abc.Iterator)):  # (a dict or list: read as its keys or items)
            raise TypeError(f"texts must yield str or iterators of str pieces, got {type(doc).__name__}")
        pieces = _str_pieces(doc) if isinstance(doc, str) else doc
        text = False  # whether it has a token of text
        for piece in itertools.chain(pieces, [None]):  # None: the document's end
            if piece is not None and not isinstance(piece, str):
                raise TypeError(f"a document's pieces must be str, got {type(piece).__name__}")
            buffer.extend([eos] if piece is None else tokenizer(piece, add_special_tokens=False)["input_ids"])
            text |= piece is not None and len(buffer) > len(owner)
            # (an EOS is its document's where it has no text: an empty file is read where its EOS is)
            owner.extend([-1 if piece is None and text else number] * (len(buffer) - len(owner)))
            while start + seq_len <= len(buffer):
                out.append(buffer[start:start + seq_len])
                if used is not None:
                    used.update(owner[start:start + seq_len])
                    used.discard(-1)
                start += stride
                if max_windows is not None and len(out) >= max_windows:
                    return torch.tensor(out, dtype=torch.long)
            # drop what no later window can use, so memory stays O(seq_len + one piece)
            dropped = min(start, len(buffer))
            del buffer[:dropped], owner[:dropped]
            start -= dropped
    if not out:
        raise ValueError(f"the corpus has only {len(buffer)} tokens: not enough for one window of {seq_len}; "
                         "lower --seq-len or give more text")
    return torch.tensor(out, dtype=torch.long)
