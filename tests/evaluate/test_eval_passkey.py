from types import SimpleNamespace

import pytest
import torch
from model_sources import make_source

from bsbr.convert import convert_to_bsbr
from bsbr.evaluate import passkey


def test_keys_are_deterministic_five_digits():
    keys = [passkey.make_key(0, 1024, d, t) for d in (0.1, 0.5) for t in range(3)]
    assert keys == [passkey.make_key(0, 1024, d, t) for d in (0.1, 0.5) for t in range(3)]
    assert all(len(k) == 5 and k.isdigit() for k in keys) and len(set(keys)) == len(keys)
    assert passkey.make_key(1, 1024, 0.1, 0) != passkey.make_key(0, 1024, 0.1, 0)


@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_prompt_holds_the_key_at_the_requested_depth(word_tokenizer, depth):
    length = 400
    p = passkey.build_prompt(word_tokenizer, length, depth, "40721")
    assert length - 8 <= p.length <= length  # whole filler sentences: at most one short
    key_ids = word_tokenizer(" " + passkey.KEY_SENTENCE.format(key="40721"), add_special_tokens=False)["input_ids"]
    assert p.input_ids[p.key_start:p.key_end] == key_ids
    intro = len(word_tokenizer(passkey.INTRO)["input_ids"])
    question = len(word_tokenizer(" " + passkey.QUESTION, add_special_tokens=False)["input_ids"])
    # the key cannot go before the instruction nor after the last filler sentence
    wanted = min(max(depth * length, intro), p.length - question - len(key_ids))
    assert abs(p.key_start - wanted) <= 8  # nearest sentence boundary (sentences are <= 8 tokens here)
    text = word_tokenizer.decode(p.input_ids)
    assert "4 0 7 2 1" in text and text.rstrip().endswith("The pass key is")
    assert text.count("4 0 7 2 1") == 2  # once in "The pass key is K" and once in "K is the pass key"
    if depth == 0.0:
        assert p.key_start == intro
    if depth == 1.0:
        assert p.key_end == p.length - question


def _tokenizer(words, post_processor, normalizer=None, pre_tokenizer=None, decoder=None):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {}
    for w in ["<unk>", "<s>", "</s>", *words]:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizer or pre_tokenizers.Whitespace()
    if normalizer is not None:
        tok.normalizer, tok.decoder = normalizer, decoder
    tok.post_processor = post_processor
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def test_prompts_of_tokenizers_that_append_an_eos_or_prepend_their_own_space():
    """A tokenizer that appends EOS (a Llama tokenizer saved with add_eos_token) put an EOS after the
    intro, mid-prompt; one that prepends its own space (SentencePiece's legacy mode, Llama 2's and
    Mistral v0.1's) put a lone space token before every sentence (16 of 119 tokens, the text
    double-spaced)."""
    import re

    from tokenizers import decoders, normalizers, pre_tokenizers, processors

    from bsbr.evaluate import filler

    texts = [passkey.INTRO, *filler.CLASSIC, passkey.KEY_SENTENCE.format(key="40721"), passkey.QUESTION]
    words = [w for t in texts for w in re.findall(r"\w+|[^\w\s]+", t)]
    eos = _tokenizer(words, processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 1),
                                                                                                ("</s>", 2)]))
    p = passkey.build_prompt(eos, 128, 0.5, "40721")
    intro = eos(passkey.INTRO, add_special_tokens=False)["input_ids"]
    assert p.input_ids[:1 + len(intro)] == [1, *intro] and 2 not in p.input_ids
    spaced = ["▁"] + ["▁" + w for t in texts for w in t.split()]
    legacy = _tokenizer(spaced, processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)]),
                        normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]),
                        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True),
                        decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)]))
    lone = legacy.convert_tokens_to_ids("▁")
    assert legacy(" The sky", add_special_tokens=False)["input_ids"][0] == lone  # (what the tokenizer does)
    p = passkey.build_prompt(legacy, 128, 0.5, "40721")
    assert lone not in p.input_ids and p.input_ids[0] == 1
    text = legacy.decode(p.input_ids, skip_special_tokens=True)
    assert "  " not in text and legacy(text)["input_ids"] == p.input_ids  # running text, read back the same


def test_prompt_errors(word_tokenizer):
    with pytest.raises(ValueError, match="too short"):
        passkey.build_prompt(word_tokenizer, 40, 0.5, "12345")
    with pytest.raises(ValueError, match="depth"):
        passkey.build_prompt(word_tokenizer, 200, 1.5, "12345")
    with pytest.raises(ValueError, match="key"):
        passkey.build_prompt(word_tokenizer, 200, 0.5, "12a45")
    # a negative answer_tokens made a prompt longer than length; a depth of "0.5" or None a bare TypeError
    for bad, words in ((dict(answer_tokens=-50), "answer_tokens must be an int >= 0"),
                       (dict(answer_tokens=True), "answer_tokens must be an int >= 0"),
                       (dict(depth="0.5"), "depth must be a number in"), (dict(depth=None), "depth must be a number")):
        args = dict(length=120, depth=0.5, key="12345", **{k: v for k, v in bad.items() if k == "answer_tokens"})
        args.update({k: v for k, v in bad.items() if k == "depth"})
        with pytest.raises(ValueError, match=words):
            passkey.build_prompt(word_tokenizer, **args)
    import numpy as np  # numpy's numbers are numbers (the checks above refused them for a while)

    assert passkey.build_prompt(word_tokenizer, np.int64(120), np.float32(0.5), "12345", np.int64(5)).input_ids == \
        passkey.build_prompt(word_tokenizer, 120, 0.5, "12345", 5).input_ids
    # trials=True, a length of 120.9 (read as 120) and only="bsbr" (read as its letters) ran
    oracle = {"right": Oracle(word_tokenizer, True)}
    # (2.5 and "3" with the default fillers: a TypeError of slicing, or of comparing str and int)
    for bad, error, words in ((dict(trials=True), ValueError, "trials must be a positive int"),
                              (dict(trials=2.5, fillers=None), ValueError, "trials must be a positive int, got 2.5"),
                              (dict(trials="3", fillers=None), ValueError, "trials must be a positive int, got '3'"),
                              (dict(lengths=[120.9]), ValueError, "lengths must be ints"),
                              (dict(only="right"), TypeError, "only must be a list of model names")):
        kw = {**dict(lengths=[120], depths=[0.5], trials=1, chunk_size=32, progress=False), **bad}
        with pytest.raises(error, match=words):
            passkey.run_passkey(oracle, word_tokenizer, **kw)
    r = passkey.run_passkey(oracle, word_tokenizer, lengths=np.array([120]), depths=np.array([0.5]), trials=np.int64(1),
                            seed=np.int64(0), max_new_tokens=np.int64(8), chunk_size=32, progress=False)
    assert r["lengths"] == [120] and r["models"]["right"]["accuracy"] == 1.0
    import json

    assert json.loads(json.dumps({k: r[k] for k in ("lengths", "depths", "trials", "seed", "max_new_tokens")}))


def test_filling_takes_a_sentence_that_exactly_fills_the_space_left():
    sentences = ["a b c", "d e", "f g h i", "j"]
    assert passkey._fill(str.split, sentences, 5) == [["a", "b", "c"], ["d", "e"]]  # 3 + 2: full, stop
    assert passkey._fill(str.split, sentences, 4) == [["a", "b", "c"], ["j"]]  # "d e" and "f g h i" skipped
    assert passkey._fill(str.split, ["a b c d"], 4) == [["a", "b", "c", "d"]]
    assert passkey._fill(str.split, ["a b c d"], 3) == []


def test_a_filler_is_warned_of_only_when_a_prompt_reads_a_sentence_twice(caplog):
    from bsbr.evaluate.filler import CyclingFiller

    filler = CyclingFiller("file:f.txt", [f"Sentence number {w} is here." for w in "abcdef"], "f.txt")

    def prompt(sentences):
        return passkey.PasskeyPrompt([1], "12345", 0, 1, 0.5, 2, dict(filler="file:f.txt", filler_sentences=sentences))

    with caplog.at_level("WARNING", logger="bsbr.evaluate.passkey"):
        passkey.warn_repeated_fillers([filler], [prompt(5), prompt(6)])  # each sentence once at most
        assert "usable sentences" not in caplog.text
        passkey.warn_repeated_fillers([filler], [prompt(7)])
    assert "filler f.txt has 6 usable sentences" in caplog.text, caplog.text


def test_where_a_filler_starts_never_makes_a_length_too_short(word_tokenizer):
    # one short sentence among 200 long ones: filling gave up after 64 misses in a row, so a length was too short
    # or not by where the seed started the filler (and a grid's check of its shortest length passed the rest)
    from bsbr.evaluate.filler import CyclingFiller

    filler = CyclingFiller("mixed", ["The sky is blue."] + [" ".join(["grass"] * 60) + f" {i}." for i in range(200)],
                           "a test")

    def fits(length, seed):
        try:
            return bool(passkey.build_prompt(word_tokenizer, length, 0.5, "12345", filler=filler, filler_seed=seed))
        except ValueError as e:
            assert "too short" in str(e)
            return False

    shortest = next(n for n in range(40, 120) if fits(n, "0"))
    assert all(fits(shortest + extra, str(seed)) for seed in range(12) for extra in (0, 5, 20))
    assert not any(fits(shortest - 1, str(seed)) for seed in range(12))


def test_scorer():
    assert passkey.passkey_found(" 40721. Remember", "40721")
    assert passkey.passkey_found(" 4 0 7 2 1 .", "40721")
    assert not passkey.passkey_found(" 40712.", "40721")
    assert not passkey.passkey_found(" 4 0 7 2 15", "40721")  # a longer number, spaced: 4 0 7 2 and 15
    assert not passkey.passkey_found(" 94 0 7 2 1", "40721")
    assert passkey.passkey_found("key:\n4 0 7 2 1\n", "40721") and passkey.passkey_found("is 40721.\n", "40721")
    for other in (" 407215", " 9940721", " 4 0 7 2 1 6 8", "40,721", " 40721.5", " 0.40721", " 4 0 7 2 1.5",
                  "\n4\n0\n7\n2\n1", " 4  0 7 2 1"):  # longer numbers are other keys; digits one space apart
        assert not passkey.passkey_found(other, "40721"), other
    assert passkey.passkey_found(" 12721 40721", "40721")
    # the digits after a dot that opens or continues a number are that number's, not a key of their own
    assert not passkey.passkey_found(" .40721", "40721") and not passkey.passkey_found(" 5..40721", "40721")
    assert not passkey.passkey_found("", "40721")
    assert not passkey.passkey_found(" the pass key", "40721")


class Oracle(torch.nn.Module):
    """Generates the key it is told (success) or a fixed wrong number (failure): checks the scoring loop."""

    def __init__(self, tokenizer, right):
        super().__init__()
        self.tok, self.right = tokenizer, right

    def generate(self, input_ids, max_new_tokens, **kw):
        text = self.tok.decode(input_ids[0])
        digits = [w for w in text.split() if w.isdigit()]
        answer = "".join(digits[:5]) if self.right else "99999"
        new = self.tok(" " + " ".join(answer) + " .", add_special_tokens=False)["input_ids"][:max_new_tokens]
        return torch.cat([input_ids, torch.tensor([new])], dim=1)


def test_run_passkey_scores_success_and_failure(word_tokenizer):
    r = passkey.run_passkey({"right": Oracle(word_tokenizer, True), "wrong": Oracle(word_tokenizer, False)},
                            word_tokenizer, lengths=[120, 160], depths=[0.2, 0.8], trials=2, chunk_size=32,
                            progress=False)
    assert r["models"]["right"]["accuracy"] == 1.0 and r["models"]["wrong"]["accuracy"] == 0.0
    assert len(r["models"]["right"]["cells"]) == 4 and len(r["samples"]) == 8
    assert all(c["trials"] == 2 for c in r["models"]["right"]["cells"])
    # the flag: some of the key sentence (the key's second copy ends it) lies in the question's chunk. Chunk 32:
    # at depth 0.8 the sentence (tokens 79-101 of 112, 118-140 of 151) ends in the last chunk, though it starts
    # in the one before (the flag once looked at its start only)
    def flags(r):
        return [(s["length"], s["depth"], s["key_in_last_chunk"]) for s in r["samples"]]

    assert flags(r) == [(120, 0.2, False), (120, 0.2, False), (120, 0.8, True), (120, 0.8, True),
                        (160, 0.2, False), (160, 0.2, False), (160, 0.8, True), (160, 0.8, True)]
    assert all((s["key_end"] - 1) // 32 == (s["prompt_tokens"] - 1) // 32 > s["key_start"] // 32
               for s in r["samples"] if s["key_in_last_chunk"])
    r = passkey.run_passkey({"right": Oracle(word_tokenizer, True)}, word_tokenizer, lengths=[120, 160],
                            depths=[0.2, 0.8], trials=2, chunk_size=128, progress=False)
    assert flags(r) == [(120, 0.2, True), (120, 0.2, True), (120, 0.8, True), (120, 0.8, True),
                        (160, 0.2, False), (160, 0.2, False), (160, 0.8, True), (160, 0.8, True)]


def test_a_tokenizer_that_cannot_write_the_keys_digits_is_refused():
    # digits read as <unk>: no model could answer, and every model scored 0 without a word
    from word_tokenizer import build_word_tokenizer

    with pytest.raises(ValueError, match=r"^the tokenizer cannot write the pass key's digits \(' \d{5}' is encoded as "
                                         r"tokens that decode as '<unk>( <unk>)*'\): no model could answer"):
        list(passkey.grid_prompts(build_word_tokenizer(digits=False), [128], [0.5], 1, 0, 8, ["classic"]))


def test_greedy_continuation_is_plain_greedy_whatever_the_models_generation_config_sets():
    # a source's repetition penalty or no-repeat n-grams, carried over by a conversion, hit the key's digits
    model = convert_to_bsbr(make_source("llama"), chunk_size=16).eval()
    model.generation_config.update(no_repeat_ngram_size=1, repetition_penalty=50.0, eos_token_id=None,
                                   prompt_lookup_num_tokens=3, return_dict_in_generate=True)  # (a TypeError)
    ids = torch.randint(3, 97, (1, 40), generator=torch.Generator().manual_seed(0))
    want = ids
    with torch.no_grad():
        for _ in range(6):
            want = torch.cat([want, model(want).logits[:, -1:].argmax(-1)], 1)
    assert passkey.greedy_continuation(model, ids[0].tolist(), 6, 0) == want[0, 40:].tolist()


def test_run_passkey_with_tiny_models(word_tokenizer):
    src = make_source("llama")
    bsbr = convert_to_bsbr(src, chunk_size=16)
    r = passkey.run_passkey({"source": src, "bsbr": bsbr}, word_tokenizer, lengths=[96], depths=[0.5], trials=1,
                            max_new_tokens=5, progress=False)
    assert set(r["models"]) == {"source", "bsbr"}
    assert all(isinstance(o, str) for o in r["samples"][0]["outputs"].values())


def test_prompt_leaves_room_for_the_answer(word_tokenizer):
    """prompt + answer fit in the nominal length, so the answer never crosses a chunk boundary
    when the length is a multiple of the chunk size."""
    p = passkey.build_prompt(word_tokenizer, 400, 0.5, "40721", answer_tokens=8)
    assert 400 - 8 - 8 <= p.length <= 400 - 8


def test_depth_minus_zero_is_depth_zero(word_tokenizer):
    # -0.0 gave another key, another filler and a "-0" column (only the CLI's parser mapped it to 0)
    from bsbr.evaluate.passkey import grid_prompts

    zero, minus = (list(grid_prompts(word_tokenizer, [200], [d], 1, 0, 8, ["random"])) for d in (0.0, -0.0))
    assert [(p.input_ids, p.key) for p in zero] == [(p.input_ids, p.key) for p in minus]
    assert [str(p.depth) for p in minus] == ["0.0"]
    r = passkey.run_passkey({"right": Oracle(word_tokenizer, True)}, word_tokenizer, lengths=[200], depths=[-0.0],
                            trials=1, progress=False)
    assert [str(d) for d in r["depths"]] == ["0.0"] and "right@0 " in " ".join(passkey.passkey_summary_lines(r))


def test_each_trial_of_a_cell_reads_its_own_stretch_of_filler(monkeypatch):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1]))
    from word_tokenizer import build_word_tokenizer

    seeds = []
    real = passkey.build_prompt
    monkeypatch.setattr(passkey, "build_prompt", lambda *a, **k: seeds.append(k["filler_seed"]) or real(*a, **k))
    list(passkey.grid_prompts(build_word_tokenizer(), [256], [0.5], 3, 0, 8, ["docstrings"]))
    assert len(seeds) == 3 and len(set(seeds)) == 3


class _Generates(torch.nn.Module):
    """A model the pass-key run accepts; the tests replace its continuation."""

    def generate(self):
        raise AssertionError("not called: greedy_continuation is replaced")


def test_a_key_sentence_ending_at_a_chunk_boundary_is_not_in_the_questions_chunk(monkeypatch):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1]))
    from word_tokenizer import build_word_tokenizer

    def run(key_end):
        p = passkey.PasskeyPrompt(input_ids=[5] * 100, key="12345", key_start=40, key_end=key_end, depth=0.5,
                                  target_length=100, meta=dict(filler="classic", filler_sentences=1, trial=0))
        monkeypatch.setattr(passkey, "grid_prompts", lambda *a, **k: iter([p]))
        monkeypatch.setattr(passkey, "greedy_continuation", lambda *a, **k: [])
        r = passkey.run_passkey({"bsbr": _Generates()}, build_word_tokenizer(), lengths=[100], depths=[0.5],
                                trials=1, chunk_size=64, progress=False, fillers=["classic"])
        return r["samples"][0]["key_in_last_chunk"]
    assert (run(64), run(65)) == (False, True)  # tokens [40, 64) lie wholly before the chunk [64, 128)


def test_each_fillers_accuracy_by_length_is_a_share_of_its_trials(monkeypatch):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1]))
    from word_tokenizer import build_word_tokenizer

    answers = iter([True, False, True, True])
    monkeypatch.setattr(passkey, "greedy_continuation", lambda *a, **k: [])
    monkeypatch.setattr(passkey, "passkey_found", lambda text, key: next(answers))
    r = passkey.run_passkey({"bsbr": _Generates()}, build_word_tokenizer(), lengths=[128], depths=[0.2, 0.8],
                            trials=2, progress=False, fillers=["classic"])
    assert r["models"]["bsbr"]["by_filler"]["classic"]["by_length"] == {"128": 0.75}


def test_a_run_of_no_model_is_refused():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1]))
    from word_tokenizer import build_word_tokenizer

    for models, only in (({}, None), ({"bsbr": _Generates()}, [])):  # (an empty only ran nothing, "ok")
        with pytest.raises(ValueError, match="models must name at least one model"):
            passkey.run_passkey(models, build_word_tokenizer(), lengths=[128], depths=[0.5], trials=1, only=only,
                                progress=False, fillers=["classic"])


def test_seconds_by_length_add_up_every_prompt_of_that_length(monkeypatch):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1]))
    from word_tokenizer import build_word_tokenizer

    clock = iter(range(1000))  # each generation takes 1 s: 4 prompts of 128 tokens, 4 of 256 per model
    # (the module's own clock: the process-wide time.perf_counter is read by other threads too)
    monkeypatch.setattr(passkey, "time", SimpleNamespace(perf_counter=lambda: float(next(clock))))
    monkeypatch.setattr(passkey, "greedy_continuation", lambda *a, **k: [])
    r = passkey.run_passkey({"bsbr": _Generates(), "source": _Generates()}, build_word_tokenizer(),
                            lengths=[128, 256], depths=[0.2, 0.8], trials=2, progress=False, fillers=["classic"])
    for name in ("bsbr", "source"):
        assert r["models"][name]["seconds_by_length"] == {"128": 4.0, "256": 4.0}
        assert r["models"][name]["seconds"] == 8.0


def test_an_answer_budget_one_token_short_of_the_key_is_refused():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1]))
    from word_tokenizer import build_word_tokenizer

    tok = build_word_tokenizer()  # (a key's five digits are five tokens)
    passkey.check_answer_room(tok, [256], [0.5], 1, 0, 5)
    with pytest.raises(ValueError):
        passkey.check_answer_room(tok, [256], [0.5], 1, 0, 4)
