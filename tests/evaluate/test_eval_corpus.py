import os
import sysconfig
from pathlib import Path

import pytest
import torch

from bsbr import corpus


def test_stdlib_split_is_deterministic_disjoint_and_complete():
    train, held, every = (corpus.stdlib_files(s) for s in ("train", "heldout", "all"))
    assert set(train).isdisjoint(held)
    assert sorted(train + held) == every
    assert corpus.stdlib_files("heldout") == held  # same listing twice
    assert every == sorted(every)
    root = sysconfig.get_paths()["stdlib"]
    rel = [p.relative_to(root).as_posix() for p in every]
    excluded = ("site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__")  # (distutils/tests)
    assert not any(part in excluded for r in rel for part in r.split("/"))
    assert 0.05 < len(held) / len(every) < 0.15  # about 10% held out
    # the split is a function of the relative path only
    assert all(corpus.split_of(p.relative_to(root).as_posix()) == "heldout" for p in held)


def test_split_is_stable_across_processes_and_versions():
    # pinned: a split that changed between runs or releases would put evaluation files in training
    assert [corpus.split_of(p) for p in ("bz2.py", "calendar.py", "asyncio/subprocess.py")] == ["heldout"] * 3
    assert [corpus.split_of(p) for p in ("os.py", "typing.py", "json/decoder.py")] == ["train"] * 3
    # either side of the 10% cut: hashes in [0.085, 0.1) and [0.1, 0.12)
    assert [corpus.split_of(p) for p in ("dbm/__init__.py", "_pyio.py", "antigravity.py")] == \
        ["heldout", "train", "train"]


def test_the_default_corpus_order_is_the_same_wherever_python_is_installed(tmp_path, monkeypatch):
    """The order hashed each file's absolute path: the same files, seed and Python under another prefix
    (/usr/lib against /opt/python) gave other windows, and other eval numbers."""
    names = [f"m{i}.py" for i in range(12)] + ["pkg/a.py", "pkg/b.py"]
    orders = []
    for prefix in ("usr/lib/python3.11", "opt/python/lib/python3.11"):
        root = tmp_path / prefix
        for i, name in enumerate(names):
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_text(f"x = {i}\n")
        monkeypatch.setattr(corpus, "stdlib_root", lambda root=root: root)
        orders.append(["".join(piece for piece in doc) for doc in corpus.stdlib_texts("all", seed=3)])
    assert orders[0] == orders[1]
    assert orders[0] != sorted(orders[0])  # (mixed, not alphabetical)


def test_split_of_a_small_tree(tmp_path):
    for name in ["a.py", "b.py", "pkg/c.py", "pkg/test_d.py", "test/e.py", "site-packages/f.py", "g.txt"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x = 1\n")
    os.mkfifo(tmp_path / "fifo.py")  # read, it would block the command for ever
    (tmp_path / "dangling.py").symlink_to(tmp_path / "gone.py")
    every = [p.relative_to(tmp_path).as_posix() for p in corpus.stdlib_files("all", root=tmp_path)]
    assert every == ["a.py", "b.py", "pkg/c.py"]
    parts = corpus.stdlib_files("train", root=tmp_path) + corpus.stdlib_files("heldout", root=tmp_path)
    assert sorted(parts) == corpus.stdlib_files("all", root=tmp_path)


def test_bad_split_and_missing_root(tmp_path):
    with pytest.raises(ValueError, match="split"):
        corpus.stdlib_files("valid")
    with pytest.raises(FileNotFoundError):
        corpus.stdlib_files("all", root=tmp_path / "nope")


class CharTokenizer:
    """ids = character codes mod 50; EOS = 99 (a tokenizer stand-in for window arithmetic)."""
    eos_token_id = 99

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % 50 for c in text]}


def test_token_windows_shapes_eos_and_determinism():
    texts = ["abcdefghij", "klmno", "pqrstuvwxyz" * 3]
    w = corpus.token_windows(CharTokenizer(), texts, seq_len=8, max_windows=None)
    stream = [ord(c) % 50 for c in texts[0]] + [99] + [ord(c) % 50 for c in texts[1]] + [99]
    stream += [ord(c) % 50 for c in texts[2]] + [99]
    assert w.dtype == torch.long and w.shape == (len(stream) // 8, 8)
    assert w.flatten().tolist() == stream[: w.numel()]
    assert torch.equal(w, corpus.token_windows(CharTokenizer(), iter(texts), 8, None))
    assert corpus.token_windows(CharTokenizer(), texts, 8, max_windows=2).shape == (2, 8)
    s = corpus.token_windows(CharTokenizer(), texts, 8, max_windows=None, stride=3)
    assert s[1].tolist() == stream[3:11] and s[-1].tolist() == stream[3 * (len(s) - 1): 3 * (len(s) - 1) + 8]
    g = corpus.token_windows(CharTokenizer(), texts, 4, max_windows=None, stride=6)  # gaps between windows
    assert g[2].tolist() == stream[12:16]


def test_the_files_read_are_those_with_a_token_in_a_window(tmp_path):
    # a file whose tokens all fell in the last, partial window (dropped) or between windows of a wider stride
    # was recorded as read, and `bsbr eval` warned that a model distilled on it was evaluated on trained text
    files = [tmp_path / n for n in ("long.txt", "gap.txt", "next.txt", "tail.txt")]
    for f, text in zip(files, ("a" * 20, "bc", "d" * 12, "ef")):
        f.write_text(text)
    texts, record = corpus.corpus_texts(text_files=files)
    # stream: 20 a, EOS (21), gap 2 + EOS (24), next 12 + EOS (37), tail 2 + EOS (40); windows [0, 8) [12, 20)
    # [24, 32) with stride 12: gap.txt (21-22) lies between the second and the third, tail.txt (37-38) after it
    windows, read, left = corpus.windows_read(CharTokenizer(), texts, record, 8, None, stride=12)
    assert len(windows) == 3
    assert read["files"] == [str(files[0].resolve()), str(files[2].resolve())]
    assert left == [str(files[1].resolve()), str(files[3].resolve())]
    texts, record = corpus.corpus_texts(text_files=files)
    _, read, left = corpus.windows_read(CharTokenizer(), texts, record, 8, None)  # 5 windows: [0, 40), all read
    assert read["files"] == [str(f.resolve()) for f in files] and left == []
    # an empty file (no text: its EOS alone) is read where its EOS is in a window; it was named as not read
    (tmp_path / "empty.txt").write_text("")
    texts, record = corpus.corpus_texts(text_files=[files[0], tmp_path / "empty.txt", files[2]])
    _, read, left = corpus.windows_read(CharTokenizer(), texts, record, 8, None)  # [0, 32): 20 + 1, 1, 12 + 1 of 35
    assert read["files"] == [str(f.resolve()) for f in (files[0], tmp_path / "empty.txt", files[2])] and left == []
    # a file whose text makes no token (blank, to a tokenizer that drops whitespace) is read where its EOS is
    (tmp_path / "blank.txt").write_text("\n\n")
    texts, record = corpus.corpus_texts(text_files=[files[0], tmp_path / "blank.txt", files[2]])
    _, read, left = corpus.windows_read(NoSpaceTokenizer(), texts, record, 8, None)
    assert read["files"] == [str(f.resolve()) for f in (files[0], tmp_path / "blank.txt", files[2])] and left == []
    texts, record = corpus.corpus_texts(text_files=files)
    _, read, left = corpus.windows_read(CharTokenizer(), texts, record, 8, 3)  # [0, 24): max_windows reached
    assert read["files"] == [str(f.resolve()) for f in files[:2]] and left == [str(f.resolve()) for f in files[2:]]


class NoSpaceTokenizer(CharTokenizer):
    """CharTokenizer that drops whitespace, as a word-level tokenizer does."""

    def __call__(self, text, add_special_tokens=False):
        return super().__call__("".join(text.split()), add_special_tokens)


class CountingTokenizer(CharTokenizer):
    """CharTokenizer that records the length of every string it is asked to tokenize."""

    def __init__(self):
        self.calls = []

    def __call__(self, text, add_special_tokens=False):
        self.calls.append(len(text))
        return super().__call__(text, add_special_tokens)


def test_a_large_document_is_read_and_tokenized_a_piece_at_a_time(tmp_path, monkeypatch):
    """A 487 MB --text-file was read whole and tokenized as one string to make 2 windows of 96 tokens: killed
    for memory at 19.9 GB. Now a piece at a time (line ends kept, CRLF read as LF, as before), and no
    further than the windows need."""
    monkeypatch.setattr(corpus, "PIECE_CHARS", 100)
    lines = [f"line {i} " + "x" * (i % 37) + ("\r\n" if i % 3 else "\n") for i in range(400)]
    path = tmp_path / "big.txt"
    path.write_bytes("".join(lines).encode() + "no newline at the end".encode())
    whole = path.read_text(encoding="utf-8")
    pieces = list(next(corpus.read_texts([path])))
    assert "".join(pieces) == whole and "\r" not in whole
    assert all(len(p) <= 2 * 100 for p in pieces) and all(p.endswith("\n") for p in pieces[:-1])
    tok = CountingTokenizer()
    assert torch.equal(corpus.token_windows(tok, corpus.read_texts([path]), 8, 3),
                       corpus.token_windows(CharTokenizer(), [whole], 8, 3))
    assert sum(tok.calls) <= 200  # two pieces at most for 24 tokens, not the whole file
    tok = CountingTokenizer()  # a long string (a dataset row) is cut the same way
    w = corpus.token_windows(tok, [whole, "abc"], 8, None)
    assert max(tok.calls) <= 100 and torch.equal(w, corpus.token_windows(CharTokenizer(), [whole, "abc"], 8, None))


def test_a_file_of_short_lines_is_cut_into_pieces_at_the_last_line_end_in_reach(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus, "PIECE_CHARS", 100)
    path = tmp_path / "lines.txt"
    path.write_text("".join(f"line {i:03d}\n" for i in range(60)))  # 60 lines of 9 characters
    assert [len(p) for p in next(corpus.read_texts([path]))] == [99, 99, 99, 99, 99, 45]  # 11 lines a piece


def test_token_windows_keep_only_what_a_later_window_can_use():
    """Windows far apart in a long stream (a wide stride) keep about a window and a piece of tokens, not the
    stream read so far (2M tokens here: about 32 MB as Python lists)."""
    import tracemalloc

    tracemalloc.start()
    try:
        windows = corpus.token_windows(CharTokenizer(), ("x" * 1000 for _ in range(2000)), 16, None, stride=100_000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert windows.shape == (21, 16) and peak < 4 * 2 ** 20, peak


def test_token_windows_errors():
    with pytest.raises(ValueError, match="seq_len"):
        corpus.token_windows(CharTokenizer(), ["abc"], 1, 1)
    with pytest.raises(ValueError, match="not enough"):
        corpus.token_windows(CharTokenizer(), ["abc"], 100, 1)
    with pytest.raises(ValueError, match="max_windows"):
        corpus.token_windows(CharTokenizer(), ["abc"], 2, 0)

    class NoEos(CharTokenizer):
        eos_token_id = None

    with pytest.raises(ValueError, match="eos"):
        corpus.token_windows(NoEos(), ["abc"], 2, 1)
    # a row of a dataset passed whole (a dict) was read as its keys: the word "text"
    with pytest.raises(TypeError, match="got dict"):
        corpus.token_windows(CharTokenizer(), [{"text": "abc def"}], 2, 1)


def test_stdlib_texts_windows_with_a_real_tokenizer(word_tokenizer):
    w = corpus.token_windows(word_tokenizer, corpus.stdlib_texts("heldout"), seq_len=64, max_windows=3)
    assert w.shape == (3, 64)
    assert torch.equal(w, corpus.token_windows(word_tokenizer, corpus.stdlib_texts("heldout"), 64, 3))


def test_dataset_without_the_package_is_a_clear_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *a, **k):
        if name == "datasets":
            raise ImportError("no datasets")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match="pip install datasets"):
        corpus.dataset_texts("wikitext")


def test_a_utf8_byte_order_mark_is_not_read_as_text(tmp_path, word_tokenizer):
    # it was three tokens of junk at the start of the file, scored and trained on
    text = "def f ( x ) : return x\n" * 20
    (tmp_path / "plain.py").write_text(text, encoding="utf-8")
    (tmp_path / "bom.py").write_text(text, encoding="utf-8-sig")
    windows = [corpus.token_windows(word_tokenizer, corpus.read_texts([tmp_path / name]), 16, None)
               for name in ("plain.py", "bom.py")]
    assert torch.equal(windows[0], windows[1])


def test_local_dataset_text_files_are_documents_and_a_data_file_or_path_is_local(tmp_path, monkeypatch):
    pytest.importorskip("datasets")

    def read(name, split="train"):
        return [d if isinstance(d, str) else "".join(d) for d in corpus.dataset_texts(str(name), split=split)]

    text = "def x(y):\n\n    return y\n"
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text(text)  # the text builder's default: one row per line, blanks dropped
    (tmp_path / "texts" / "empty.txt").write_text("")
    assert read(tmp_path / "texts") == [text]
    (tmp_path / "d.jsonl").write_text('{"text": "a b"}\n{"text": "c"}\n')  # one file: read as its one split
    assert read(tmp_path / "d.jsonl") == ["a b", "c"]
    assert read(tmp_path / "texts" / "a.txt") == [text]
    # a piece at a time, as --text-file reads (whole, a file of over 2 GB failed: one Arrow string)
    monkeypatch.setattr(corpus, "PIECE_CHARS", 8)
    doc = next(corpus.dataset_texts(str(tmp_path / "texts"), split="train"))
    assert not isinstance(doc, str) and all(len(piece) <= 16 for piece in doc)
    with pytest.raises(ValueError, match="Bad split: test. Available splits: .'train'."):
        corpus.dataset_texts(str(tmp_path / "texts"), split="test")
    with pytest.raises(ValueError, match="no such folder or file"):  # not sent to the hub as a name
        corpus.dataset_texts(str(tmp_path / "gone"))
    with pytest.raises(ValueError, match="no such folder or file"):
        corpus.dataset_texts("./gone")
    with pytest.raises(ValueError, match="no such folder or file"):  # a data file's name (it got hub advice)
        corpus.dataset_texts("ds/gone.jsonl")
    for name in ("gone.jsonl.gz", "data/gone.ndjson"):  # (compressed, or datasets' other suffixes: hub advice too)
        with pytest.raises(ValueError, match="no such folder or file"):
            corpus.dataset_texts(name)
    # datasets reads a path as a pattern: a file in gl[1]/ was read from gl1/, silently; the folder is refused
    (tmp_path / "gl[1]").mkdir()
    (tmp_path / "gl1").mkdir()
    (tmp_path / "gl[1]" / "d.jsonl").write_text('{"text": "mine"}\n')
    (tmp_path / "gl1" / "d.jsonl").write_text('{"text": "another"}\n')
    assert read(tmp_path / "gl[1]" / "d.jsonl") == ["mine"]
    with pytest.raises(ValueError, match=r"a folder whose path holds \*, \? or \[ .* rename it, or give one of its"):
        read(tmp_path / "gl[1]")


def test_the_corpus_description_names_local_inputs_by_absolute_path(tmp_path, monkeypatch):
    # eval's JSON and distill.json record it: a relative path named nothing once read from elsewhere
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.txt").write_text("x")
    assert corpus.corpus_texts(text_files=["a.txt"])[1] == dict(kind="text_files", files=[str(tmp_path / "a.txt")])
    with pytest.raises(TypeError, match=r"text_files must be a list of paths, got one path: give \['a.txt'\]"):
        corpus.corpus_texts(text_files="a.txt")  # ("text file not found: a, ., t, x, t")
    pytest.importorskip("datasets")
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "test.jsonl").write_text('{"text": "a"}\n')
    assert corpus.corpus_texts(dataset="ds")[1]["name"] == str(tmp_path / "ds")


def test_an_unwritable_datasets_cache_is_named_not_the_users_file(tmp_path, monkeypatch):
    # "could not load dataset 'd.jsonl' ...: [Errno 2] No such file or directory: '/proc/xx'": the file was fine
    datasets = pytest.importorskip("datasets")
    (tmp_path / "d.jsonl").write_text('{"text": "a b"}\n')
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", Path("/proc/bsbr-none/datasets"))
    with pytest.raises(ValueError, match=r"\(datasets' cache, /proc/bsbr-none/datasets: set HF_DATASETS_CACHE to a "
                                         r"writable folder\)"):
        next(corpus.dataset_texts(str(tmp_path / "d.jsonl"), split="train"))


def test_a_folder_inside_a_corpus_that_cannot_be_listed_is_refused_not_skipped(tmp_path, monkeypatch):
    # os.walk and datasets' glob skip a folder they cannot list: bench quality reported 30 of 60 files, exit 0
    for folder in (tmp_path, tmp_path / "sub"):
        folder.mkdir(exist_ok=True)
        for i in range(3):
            (folder / f"m{i}.py").write_text(f"x = {i}\n")
    scandir = os.scandir

    def denied(path="."):  # (as a folder without read permission; root would read it anyway)
        if Path(path).name == "sub":
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", denied)
    for call in (lambda: corpus.stdlib_files("all", root=tmp_path), lambda: corpus.local_dataset_files(str(tmp_path))):
        with pytest.raises(OSError, match="a folder inside the corpus, whose files would be left out") as e:
            call()
        assert e.value.filename == str(tmp_path / "sub")


def test_the_seed_orders_the_corpus_and_the_record_names_what_that_order_read():
    """--seed shuffles which files come first (eval and distill read them in that order), and the files-read
    record names that seed's files."""
    import sys

    sys.path.insert(0, str(Path(__file__).parents[1]))
    from word_tokenizer import build_word_tokenizer

    root, files = corpus.stdlib_root(), corpus.stdlib_files("heldout")
    assert corpus.mixed_order(files, 0, root=root) != corpus.mixed_order(files, 1, root=root)
    texts, record = corpus.corpus_texts(split="heldout", seed=1)
    _, read, _ = corpus.windows_read(build_word_tokenizer(), texts, record, 64, 1)
    order = corpus.mixed_order(files, 1, root=root)
    assert read["files"] and [Path(f) for f in read["files"]] == order[:len(read["files"])]


def test_a_document_whose_only_token_in_a_window_is_its_last_was_read():
    class CharTok:
        eos_token_id = 99

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) % 50 for c in text]}
    used = set()
    corpus.token_windows(CharTok(), ["aaaaaa", "bc"], 8, 1, used=used)  # a*6 EOS b | c EOS: the window ends with b
    assert used == {0, 1}


def test_a_long_string_is_cut_at_line_ends(monkeypatch):
    monkeypatch.setattr(corpus, "PIECE_CHARS", 16)
    text = "def alpha():\n    return beta\n" * 2
    pieces = list(corpus._str_pieces(text))
    assert "".join(pieces) == text and len(pieces) > 1 and all(p.endswith("\n") for p in pieces[:-1])


@pytest.mark.parametrize("template, lead", [("$A", []), ("<s> $A", ["<s>"]), ("$A </s>", []),
                                            ("<s> $A </s>", ["<s>"]), ("<s> <s> $A", ["<s>", "<s>"])])
def test_a_prompt_begins_with_the_specials_a_tokenizer_puts_before_a_text_not_after(template, lead):
    import sys

    from tokenizers import processors

    sys.path.insert(0, str(Path(__file__).parents[1]))
    from word_tokenizer import build_word_tokenizer

    tok = build_word_tokenizer()
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[("<s>", tok.bos_token_id), ("</s>", tok.eos_token_id)])
    assert corpus.leading_specials(tok) == tok.convert_tokens_to_ids(lead)
