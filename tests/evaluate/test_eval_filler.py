import itertools
import re

import pytest
import torch

from bsbr.evaluate import filler, passkey

SEED = "0:1024:0.5:1"


def first(f, seed, n=60):
    return list(itertools.islice(f.sentences(seed), n))


@pytest.mark.parametrize("kind", filler.FILLER_KINDS)
def test_every_kind_is_seeded_and_clean(kind):
    f = filler.get_filler(kind)
    assert f.name == kind and f.describe()["name"] == kind
    a = first(f, SEED)
    assert a == first(filler.get_filler(kind), SEED)  # a fresh source, same seed: same text
    assert len(set(a)) > 3 if kind != "classic" else a[:5] == list(filler.CLASSIC)
    if kind != "classic":  # the seed moves where the text starts
        assert a != first(f, "0:1024:0.5:2")
    for s in a:
        assert not re.search(r"\d", s) and "pass key" not in s.lower()
        assert s[0].isupper() and s[-1] in ".!?"


def test_prose_falls_back_to_docstrings_without_licence_texts(tmp_path):
    missing = filler.get_filler("prose", licenses_dir=tmp_path / "absent")
    assert "docstrings" in missing.describe()["origin"]
    assert first(missing, SEED, 5)
    lic = tmp_path / "licenses"
    lic.mkdir()
    (lic / "MIT").write_text("Permission is hereby granted, free of charge, to any person. "
                             "THE SOFTWARE IS PROVIDED AS IS, WITHOUT WARRANTY OF ANY KIND. Version 2 only.\n")
    f = filler.get_filler("prose", licenses_dir=lic)
    assert str(lic) in f.describe()["origin"] and f.describe()["sentences"] == 2  # the digit sentence is dropped
    assert set(first(f, SEED, 10)) == {"Permission is hereby granted, free of charge, to any person.",
                                       "THE SOFTWARE IS PROVIDED AS IS, WITHOUT WARRANTY OF ANY KIND."}


def test_file_filler_and_errors(tmp_path):
    text = tmp_path / "story.txt"
    text.write_text("Once upon a time there was a fox.\nIt lived in the woods   near a river!\n"
                    "The key is 12345 here.\nshort one.\n")
    for spec in (str(text), f"file:{text}"):
        f = filler.get_filler(spec)
        assert f.name == "file:story.txt"
        assert set(first(f, SEED, 6)) == {"Once upon a time there was a fox.", "It lived in the woods near a river!"}
    empty = tmp_path / "code.py"
    empty.write_text("x = 1\n")
    with pytest.raises(ValueError, match="no usable sentences"):
        filler.get_filler(str(empty))
    empty.write_text("The pass key is hidden in this text.\n")  # a rule the message did not name
    with pytest.raises(ValueError, match="no usable sentences .* or the words 'pass key'"):
        filler.get_filler(str(empty))
    with pytest.raises(ValueError, match="unknown filler"):
        filler.get_filler("lorem")
    for missing in ("notes.txt", "sub/notes", "file:notes"):  # reads as a file's name, not a mistyped kind
        with pytest.raises(ValueError, match=f"filler file '{missing}' does not exist"):
            filler.get_filler(missing)
    with pytest.raises(ValueError, match="is a directory"):
        filler.get_filler(str(tmp_path))
    # a UTF-8 byte-order mark hid the first sentence's capital (a one-sentence file had "no usable sentences");
    # a UTF-16 file without one was read as NUL-laced text with no sentences
    (tmp_path / "bom.txt").write_text("Once upon a time there was a fox.\n", encoding="utf-8-sig")
    assert first(filler.get_filler(str(tmp_path / "bom.txt")), SEED, 1) == ["Once upon a time there was a fox."]
    (tmp_path / "utf16.txt").write_text("Once upon a time there was a fox.\n", encoding="utf-16-le")
    with pytest.raises(ValueError, match="holds NUL bytes, as UTF-16 text does too"):
        filler.get_filler(str(tmp_path / "utf16.txt"))


def test_a_file_named_like_a_kind(tmp_path, monkeypatch, caplog):
    """--passkey-filler random names the built-in kind even where a file of that name lies here: eval says
    so once, only for a kind the user named (the defaults include random), and file:random reads the file."""
    from argparse import Namespace

    from bsbr.evaluate.cli import _check_lists

    monkeypatch.chdir(tmp_path)
    (tmp_path / "random").write_text("The river ran past the old mill at dawn.\n")
    lists = dict(text_file=None, passkey_lengths=None, passkey_depths=None, passkey_models=None, lm_eval_task_dir=None)
    _check_lists(Namespace(passkey_filler=None, **lists))
    assert not caplog.text
    _check_lists(Namespace(passkey_filler=["random", "classic"], **lists))
    assert caplog.text.count("file:random") == 1
    assert filler.get_filler("random").name == "random"
    assert filler.get_filler("file:random").name == "file:random"


def test_split_sentences():
    got = filler.split_sentences("Hello there my friend. See 3 cats now. what a day it is. "
                                 "A <tag> here is bad. Visit https://x.org please now. Fine, it is done!")
    assert got == ["Hello there my friend.", "Fine, it is done!"]



def test_split_sentences_of_other_languages_and_typographic_quotes():
    # a sentence starting with a capital outside A-Z, or after an opening quote other than " and ', was glued to
    # the one before it (German read as half its sentences; Russian merged past 80 words: "no usable sentences")
    import unicodedata

    german = "Das ist ein guter Tag heute. Über den Berg geht der Weg weiter. Äpfel sind rot und sehr süß."
    assert len(filler.split_sentences(german)) == 3
    russian = " ".join(["Это очень хороший день для прогулки."] * 30)
    assert len(filler.split_sentences(russian)) == 30
    quoted = "He walked to the door slowly. \u201cCome back,\u201d she said. The rain kept falling all night."
    assert filler.split_sentences(quoted) == ["He walked to the door slowly.", "The rain kept falling all night."]
    french = "C'est une belle journée pour sortir. Élise est partie très tôt ce matin."
    assert filler.split_sentences(unicodedata.normalize("NFD", french)) == filler.split_sentences(french) == [
        "C'est une belle journée pour sortir.", "Élise est partie très tôt ce matin."]


@pytest.mark.parametrize("kind", filler.FILLER_KINDS)
@pytest.mark.parametrize("length", [200, 1000])
def test_prompts_from_every_filler(word_tokenizer, kind, length):
    """Deterministic, the key's span exact, the length respected (at most one short sentence's worth
    below the room left for the answer)."""
    key = "40721"
    p = passkey.build_prompt(word_tokenizer, length, 0.5, key, answer_tokens=8, filler=kind, filler_seed=SEED)
    assert p.input_ids == passkey.build_prompt(word_tokenizer, length, 0.5, key, answer_tokens=8, filler=kind,
                                               filler_seed=SEED).input_ids
    assert p.meta["filler"] == kind
    assert length - 8 - 24 <= p.length <= length - 8
    key_ids = word_tokenizer(" " + passkey.KEY_SENTENCE.format(key=key), add_special_tokens=False)["input_ids"]
    assert p.input_ids[p.key_start:p.key_end] == key_ids
    assert abs(p.key_start - 0.5 * length) <= 100  # the nearest sentence boundary (prose sentences are long)
    text = word_tokenizer.decode(p.input_ids)
    assert text.count("4 0 7 2 1") == 2 and text.rstrip().endswith("The pass key is")
    if kind != "classic":
        other = passkey.build_prompt(word_tokenizer, length, 0.5, key, answer_tokens=8, filler=kind,
                                     filler_seed="another")
        assert other.input_ids != p.input_ids


def test_long_prompt_fills_closely(word_tokenizer):
    p = passkey.build_prompt(word_tokenizer, 32768, 0.1, "12345", answer_tokens=8, filler="prose", filler_seed=SEED)
    assert 32768 - 8 - 24 <= p.length <= 32768 - 8
    assert abs(p.key_start - 3277) <= 100


class Echo(torch.nn.Module):
    """Answers with the first five digits of its prompt (the key): every trial succeeds."""

    def __init__(self, tokenizer):
        super().__init__()
        self.tok = tokenizer

    def generate(self, input_ids, max_new_tokens, **kw):
        digits = [w for w in self.tok.decode(input_ids[0]).split() if w.isdigit()]
        new = self.tok(" " + " ".join(digits[:5]), add_special_tokens=False)["input_ids"][:max_new_tokens]
        return torch.cat([input_ids, torch.tensor([new])], dim=1)


def test_run_passkey_rotates_fillers_and_reports_each(word_tokenizer, tmp_path):
    text = tmp_path / "mine.txt"
    text.write_text("My own text has sentences like this one. And here is another sentence of mine.")
    fillers = ["classic", "random", str(text)]
    r = passkey.run_passkey({"echo": Echo(word_tokenizer)}, word_tokenizer, lengths=[120, 200], depths=[0.3, 0.7],
                            trials=3, fillers=fillers, progress=False)
    assert [f["name"] for f in r["fillers"]] == ["classic", "random", "file:mine.txt"]
    assert [s["filler"] for s in r["samples"][:3]] == ["classic", "random", "file:mine.txt"]
    # keys depend on (seed, length, depth, trial) only
    assert [s["key"] for s in r["samples"]] == [passkey.make_key(0, L, d, t) for L in (120, 200) for d in (0.3, 0.7)
                                                for t in range(3)]
    m = r["models"]["echo"]
    assert m["accuracy"] == 1.0 and set(m["by_filler"]) == {"classic", "random", "file:mine.txt"}
    assert all(v["trials"] == 4 and v["accuracy"] == 1.0 and set(v["by_length"]) == {"120", "200"}
               for v in m["by_filler"].values())
    assert set(m["seconds_by_length"]) == {"120", "200"}
    lines = list(passkey.passkey_summary_lines(r))
    i = lines.index("pass-key accuracy per filler (trials):")
    assert [line.split()[:2] for line in lines[i + 2:i + 5]] == [["classic", "1.00"], ["random", "1.00"],
                                                               ["file:mine.txt", "1.00"]]
    assert lines[-1].startswith("  seconds: echo")
    # two trials per cell would reach two of the three fillers: the third was listed, never read (a 0 in the plot)
    with pytest.raises(ValueError, match=r"trials \(2\) are fewer than the fillers \(3\): file:mine.txt would never"):
        passkey.run_passkey({"echo": Echo(word_tokenizer)}, word_tokenizer, lengths=[120], depths=[0.5], trials=2,
                            fillers=fillers, progress=False)
    r2 = passkey.run_passkey({"echo": Echo(word_tokenizer)}, word_tokenizer, lengths=[120], depths=[0.5], trials=2,
                             progress=False)  # the default fillers: as many as the trials read
    assert [f["name"] for f in r2["fillers"]] == ["classic", "prose"]
    with pytest.raises(ValueError, match="distinct"):
        passkey.run_passkey({"echo": Echo(word_tokenizer)}, word_tokenizer, fillers=["random", "random"])


def test_a_filler_file_too_short_for_its_prompts_is_warned_of_and_recorded_by_absolute_path(
        word_tokenizer, tmp_path, monkeypatch, caplog):
    """A user's filler file of two usable sentences was cycled to fill every prompt, silently, and its JSON
    origin was the path as typed (from another folder, the record named no file)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.txt").write_text("My own text has sentences like this one. And here is another sentence of mine.")
    long_text = " ".join(f"Sentence number {w} of a long and varied text goes here." for w in
                         itertools.islice(itertools.product("abcdefghij", repeat=2), 100)).replace("'", "")
    (tmp_path / "long.txt").write_text(long_text.replace("(", "").replace(")", "").replace(",", ""))
    for name, warned in (("mine.txt", True), ("long.txt", False)):
        caplog.clear()
        with caplog.at_level("WARNING", logger="bsbr"):
            r = passkey.run_passkey({"echo": Echo(word_tokenizer)}, word_tokenizer, lengths=[200], depths=[0.5],
                                    trials=1, fillers=[name], progress=False)
        assert r["fillers"][0]["origin"] == str(tmp_path / name)
        assert ("filler " + str(tmp_path / "mine.txt") + " has 2 usable sentences" in caplog.text) is warned, name


def test_a_built_in_filler_too_short_for_its_prompts_is_warned_of(word_tokenizer, caplog, tmp_path):
    # prose and docstrings repeated their whole text at the documented 32k lengths, where a file was warned of
    with caplog.at_level("WARNING", logger="bsbr"):
        passkey.run_passkey({"echo": Echo(word_tokenizer)}, word_tokenizer, lengths=[30_000], depths=[0.5],
                            trials=2, fillers=["docstrings", "classic"], progress=False)
    assert "filler docstrings (standard library docstrings) has " in caplog.text
    assert "usable sentences" in caplog.text and "classic" not in caplog.text.split("usable")[0]
    caplog.clear()  # (and where the lm-eval task is written from the same prompts)
    from bsbr.evaluate.lm_eval_task import write_lm_eval_task

    with caplog.at_level("WARNING", logger="bsbr"):
        write_lm_eval_task(tmp_path / "task", word_tokenizer, [30_000], [0.5], 1, fillers=["docstrings"])
    assert "filler docstrings (standard library docstrings) has " in caplog.text


def test_a_filler_file_that_cannot_be_read_or_is_huge_is_refused_in_one_line(tmp_path, monkeypatch):
    # an unreadable file was a PermissionError traceback, a 50 GB one was read whole (MemoryError), and a name
    # holding a newline printed the error on two lines
    huge = tmp_path / "huge\nname.txt"
    huge.write_text("The grass is green and the sky is blue today.\n" * 20)
    with open(huge, "r+b") as f:
        f.truncate(filler.FILLER_MAX + 1)  # (sparse)
    with pytest.raises(ValueError, match="over 64 MB") as e:
        filler.get_filler(str(huge))
    assert "\n" not in str(e.value)
    small = tmp_path / "small.txt"
    small.write_text("The grass is green and the sky is blue today.\n" * 20)

    def denied(self):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(type(small), "read_bytes", denied)
    with pytest.raises(ValueError, match="small.txt: cannot read it \\(Permission denied\\): give a readable"):
        filler.get_filler(str(small))


def test_prose_sentences_are_listed_once_and_kept_whole_past_an_abbreviation():
    sentences = filler.license_sentences(str(filler.LICENSES_DIR))
    assert len(sentences) == len(set(sentences)) == filler.get_filler("prose").describe()["sentences"]
    assert filler.split_sentences("Pick one of the tools, e.g. the small hammer by the door. Then walk home slowly "
                                  "now.") == ["Pick one of the tools, e.g. the small hammer by the door.",
                                              "Then walk home slowly now."]


def test_the_random_filler_writes_each_of_its_three_sentence_forms():
    import random

    rng = random.Random(0)
    sentences = [filler.random_sentence(rng) for _ in range(200)]
    place_first = sum(s.split(",")[0].lower() in filler._PLACE for s in sentences)
    assert 20 < place_first < 100


def test_a_filler_file_lists_each_sentence_once(tmp_path):
    """A repeated sentence (a refrain, a licence's repeated clause) is one sentence of the cycle, not a heavier one."""
    text = tmp_path / "refrain.txt"
    text.write_text("The river runs down to the sea. The wind is cold tonight. The river runs down to the sea.\n"
                    "The river runs down to the sea.\n")
    f = filler.get_filler(str(text))
    assert f.describe()["sentences"] == 2
    assert first(f, SEED, 4)[0::2] == first(f, SEED, 4)[0::2][:1] * 2  # strictly alternating


def test_licence_texts_read_each_file_once_not_through_its_links(tmp_path):
    """Debian links GPL to GPL-3 and so on: a link is skipped, so the prose keeps the files' own order
    (through the link, GPL-3's sentences came first, sorted under GPL)."""
    lic = tmp_path / "licenses"
    lic.mkdir()
    (lic / "Apache").write_text("Apache sentences come first in order. Apache has a second sentence too.\n")
    (lic / "Zlib").write_text("Zlib sentences come last in order. Zlib has a second sentence too.\n")
    (lic / "Aardvark").symlink_to(lic / "Zlib")
    assert filler.license_sentences(str(lic)) == (
        "Apache sentences come first in order.", "Apache has a second sentence too.",
        "Zlib sentences come last in order.", "Zlib has a second sentence too.")
