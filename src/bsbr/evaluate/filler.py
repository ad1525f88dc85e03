"""Filler text for pass-key prompts, offline and seeded: several kinds (:data:`FILLER_KINDS` or a text
file; docs/passkey.md lists them), so a model is not judged on one memorisable text. Sentences with a
digit (a number could pass for the key, or hide it) or a mention of a pass key are dropped. A seed string
picks where a :class:`Filler`'s text starts: trials see different stretches of it, the same on every run.
"""
from __future__ import annotations

import codecs
import importlib
import inspect
import logging
import numbers
import os
import random
import re
import unicodedata
from functools import lru_cache
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple, Union

from ..arguments import not_utf8
from ..errors import absent

logger = logging.getLogger(__name__)

CLASSIC = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")
FILLER_KINDS = ("classic", "prose", "docstrings", "random")
DEFAULT_FILLERS = ("classic", "prose", "random")


def default_fillers(trials: int) -> list:
    """The default fillers a grid of ``trials`` trials per cell reads (trial t reads filler t mod F): the first
    ``trials`` of :data:`DEFAULT_FILLERS`, so that none is named that no trial reads."""
    if not isinstance(trials, numbers.Integral) or isinstance(trials, bool) or trials < 1:
        raise ValueError(f"trials must be a positive int, got {trials!r}")
    return list(DEFAULT_FILLERS[:int(trials)])
LICENSES_DIR = Path("/usr/share/common-licenses")
# a fixed list, so the docstring text depends only on the Python version
DOCSTRING_MODULES = (
    "argparse", "asyncio.events", "calendar", "collections", "concurrent.futures", "configparser", "contextlib",
    "csv", "dataclasses", "datetime", "decimal", "difflib", "email.message", "enum", "fractions", "functools",
    "gzip", "heapq", "http.client", "inspect", "ipaddress", "json", "logging", "mailbox", "pathlib", "pickle",
    "pprint", "queue", "random", "shutil", "smtplib", "socket", "statistics", "string", "subprocess", "tarfile",
    "tempfile", "textwrap", "threading", "typing", "unittest.case", "urllib.parse", "urllib.request", "uuid",
    "warnings", "weakref", "zipfile",
)
MIN_WORDS, MAX_WORDS = 4, 80
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_OPENERS = "\"'(\u201c\u2018\u00ab\u00bf\u00a1"  # what may open a sentence before its capital: quotes, a bracket, ¿ ¡
_FORBIDDEN = re.compile(r"\d|pass[\s-]?key|https?:|www\.|@|[<>{}\[\]|\\=_*#`~^$]", re.IGNORECASE)


def split_sentences(text: str) -> List[str]:
    """The usable sentences of ``text``, in order, whitespace collapsed: ending in ``.``/``!``/``?``,
    :data:`MIN_WORDS`..:data:`MAX_WORDS` words, starting with a capital letter (of any script; the text read
    as NFC: a sentence that opens with a quote, a bracket, ¿ or ¡ is left out), without digits, markup-like
    characters, addresses or the words "pass key"."""
    pieces = []  # split where an end mark is followed by a capital letter (any script's) or an opener
    for piece in _SENTENCE_END.split(re.sub(r"\s+", " ", unicodedata.normalize("NFC", text)).strip()):
        if pieces and not (piece[:1].isupper() or piece[:1] in _OPENERS):
            pieces[-1] += " " + piece
        else:
            pieces.append(piece)
    return [s for s in map(str.strip, pieces) if s and s[-1] in ".!?" and s[0].isupper() and not _FORBIDDEN.search(s)
            and MIN_WORDS <= len(s.split()) <= MAX_WORDS]


@lru_cache(maxsize=None)
def license_sentences(root: str) -> Tuple[str, ...]:
    """Sentences of the licence texts under ``root`` (files in sorted order); empty if it is absent."""
    path = Path(root)
    if not path.is_dir():
        return ()
    sentences = []
    for f in sorted(p for p in path.iterdir() if p.is_file() and not p.is_symlink()):
        try:
            sentences += split_sentences(f.read_text(encoding="utf-8-sig", errors="replace"))
        except OSError as e:  # unreadable file: skip it, the others still make prose
            logger.debug("skipping %s: %s", f, e)
    return tuple(dict.fromkeys(sentences))  # in order, each once


@lru_cache(maxsize=None)
def docstring_sentences() -> Tuple[str, ...]:
    """Sentences of the docstrings of :data:`DOCSTRING_MODULES` and their public classes and functions
    (sorted by name); modules that do not import are skipped."""
    sentences = []
    for name in DOCSTRING_MODULES:
        try:
            mod = importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - a module missing from a stripped-down Python
            logger.debug("no docstrings from %s: %s", name, e)
            continue
        sentences += split_sentences(inspect.getdoc(mod) or "")
        for attr in sorted(vars(mod)):
            obj = getattr(mod, attr, None)
            if (not attr.startswith("_") and getattr(obj, "__module__", None) == mod.__name__
                    and (inspect.isclass(obj) or inspect.isfunction(obj))):
                sentences += split_sentences(inspect.getdoc(obj) or "")
    return tuple(dict.fromkeys(sentences))  # in order, each once


# the random generator's vocabulary: no digits, ordinary words a tokenizer splits into few tokens
_ADJ = ("quiet", "old", "bright", "small", "heavy", "gentle", "narrow", "wooden", "distant", "curious", "silver",
        "patient", "crowded", "empty", "warm", "cold", "careful", "tired", "busy", "tall")
_NOUN = ("engineer", "farmer", "river", "lantern", "village", "teacher", "garden", "window", "letter", "bridge",
         "market", "sailor", "forest", "painter", "kitchen", "train", "library", "mountain", "basket", "doctor")
_VERB = ("carried", "found", "watched", "painted", "opened", "followed", "repaired", "described", "visited",
         "remembered", "cleaned", "counted", "borrowed", "noticed", "built", "measured")
_PLACE = ("near the river", "in the morning", "after the storm", "behind the station", "before dinner",
          "under the old bridge", "at the edge of town", "during the long winter", "beside the harbour",
          "without a word", "on the way home", "in the quiet hall")
_ADV = ("slowly", "quickly", "carefully", "again", "twice", "happily", "reluctantly", "at last")


def random_sentence(rng: random.Random) -> str:
    """One grammatical sentence from ``rng``."""
    subject = f"{rng.choice(('The', 'A', 'One'))} {rng.choice(_ADJ)} {rng.choice(_NOUN)}"
    obj = f"{rng.choice(('the', 'a', 'every'))} {rng.choice(_ADJ)} {rng.choice(_NOUN)}"
    form = rng.randrange(3)
    if form == 0:
        return f"{subject} {rng.choice(_VERB)} {obj} {rng.choice(_PLACE)}."
    if form == 1:
        return f"{subject} {rng.choice(_ADV)} {rng.choice(_VERB)} {obj}."
    return f"{rng.choice(_PLACE).capitalize()}, {subject.lower()} {rng.choice(_VERB)} {obj}."


class Filler:
    """A named, seeded source of filler sentences. ``sentences(seed)`` is an endless iterator;
    equal seeds give equal sentences."""

    name: str
    origin: str

    def sentences(self, seed: str) -> Iterator[str]:
        raise NotImplementedError

    def describe(self) -> dict:
        return dict(name=self.name, origin=self.origin)


class CyclingFiller(Filler):
    """Cycles through a fixed list of sentences, from a seeded offset (``offset=False``: always
    from the first sentence, as the classic test does)."""

    def __init__(self, name: str, sentences: Sequence[str], origin: str, offset: bool = True):
        if not sentences:
            raise ValueError(f"filler {name!r} ({origin}) has no usable sentences")
        self.name, self._sentences, self.origin, self.offset = name, tuple(sentences), origin, offset

    def sentences(self, seed: str) -> Iterator[str]:
        n = len(self._sentences)
        # (seeded by the name's bytes: a file name this locale could not decode holds lone surrogates)
        i = random.Random(f"filler:{self.name}:{seed}".encode("utf-8", "surrogateescape")).randrange(n) \
            if self.offset else 0
        while True:
            yield self._sentences[i % n]
            i += 1

    def describe(self) -> dict:
        return dict(super().describe(), sentences=len(self._sentences))


class RandomFiller(Filler):
    name, origin = "random", "seeded random sentences"

    def sentences(self, seed: str) -> Iterator[str]:
        rng = random.Random(f"filler:random:{seed}")
        while True:
            yield random_sentence(rng)


def filler_path(spec: str) -> Optional[Path]:
    """The file a filler spec names (``file:PATH`` or a path); None for a kind (:data:`FILLER_KINDS`)."""
    return None if spec in FILLER_KINDS else Path(spec.removeprefix("file:"))


def get_filler(spec: Union[str, Filler], licenses_dir: Optional[Union[str, Path]] = None) -> Filler:
    """A :class:`Filler` from a kind name (:data:`FILLER_KINDS`), ``file:PATH`` or an existing file's
    path; a :class:`Filler` passes through. ``licenses_dir`` overrides where ``prose`` looks."""
    if isinstance(spec, Filler):
        return spec
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"a filler is a kind ({', '.join(FILLER_KINDS)}) or a text file, got {spec!r}")
    if spec == "classic":
        return CyclingFiller("classic", CLASSIC, "classic pass-key sentences", offset=False)
    if spec == "random":
        return RandomFiller()
    if spec == "docstrings":
        return CyclingFiller("docstrings", docstring_sentences(), "standard library docstrings")
    if spec == "prose":
        root = str(licenses_dir or LICENSES_DIR)
        found = license_sentences(root)
        if found:
            return CyclingFiller("prose", found, f"licence texts in {root}")
        logger.info("no licence texts in %s; prose filler falls back to the standard library's docstrings", root)
        return CyclingFiller("prose", docstring_sentences(), "standard library docstrings (no licence texts)")
    path = filler_path(spec)
    try:
        return _file_filler(spec, path)
    except OSError as e:  # (unreadable, or a folder on the way without search permission)
        raise ValueError(f"filler file {' '.join(str(path).split())}: cannot read it ({e.strerror or e}): give a "
                         "readable text file") from None


FILLER_MAX = 1 << 26  # bytes a filler file may hold: it is read whole (a book is a few MB)


def _file_filler(spec: str, path: Path) -> "CyclingFiller":
    shown = " ".join(str(path).split())  # (one line, whatever the name holds)
    if not path.is_file():
        if path.exists():
            what = "a directory" if path.is_dir() else "not a regular file (a device or FIFO)"
            raise ValueError(f"filler {spec!r} is {what}: give a text file's path or one of {', '.join(FILLER_KINDS)}")
        if spec.startswith("file:") or any(sep in spec for sep in ("/", "\\", ".")) or os.path.lexists(path):
            raise ValueError(f"filler file {spec!r} {absent(path)}: give an existing text file's path or one of "
                             f"{', '.join(FILLER_KINDS)}")  # (a path, or a link: not a mistyped kind)
        raise ValueError(f"unknown filler {spec!r}: use one of {', '.join(FILLER_KINDS)} or a text file's path")
    if path.stat().st_size > FILLER_MAX:
        raise ValueError(f"filler file {shown} holds {path.stat().st_size:,} bytes, over {FILLER_MAX >> 20} MB (it is "
                         "read whole): give a smaller text")
    with open(path, "rb") as f:
        why = not_utf8(f.read(8192))
    if why:
        raise ValueError(f"filler file {shown} {why}")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:  # (the offset in the file: a byte-order mark is not decoded)
        at = e.start + (len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0)
        raise ValueError(f"filler file {shown} is not UTF-8 text ({e.reason} at byte {at:,}): save it as UTF-8") \
            from None
    sentences = tuple(dict.fromkeys(split_sentences(text)))
    if not sentences:
        raise ValueError(f"filler file {shown} has no usable sentences ({MIN_WORDS}-{MAX_WORDS} words, "
                         "capitalised, ending in . ! or ?, without digits, markup characters, web addresses or "
                         "the words 'pass key')")
    return CyclingFiller(f"file:{path.name}", sentences, str(path.resolve()))  # (a record rerun from anywhere)
