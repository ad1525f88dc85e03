import json
import math
import os
import re
from pathlib import Path

import pytest
import torch
from model_sources import make_source

from bsbr.cli import main
from bsbr.convert import convert_to_bsbr
from bsbr.evaluate import evaluate, local_baseline
from bsbr.evaluate.report import summary_lines

CHUNK = 8
PYTHON_TEXT = ("def f ( x ) :\n    return x + y\n\nclass x :\n    def y ( self ) :\n        print ( x , y )\n"
               "for x in y :\n    if x : print ( None ) # The grass is green .\n    else : return 1 2 3\n") * 6


def _finite(tree):
    if isinstance(tree, dict):
        return all(_finite(v) for v in tree.values())
    if isinstance(tree, list):
        return all(_finite(v) for v in tree)
    return not isinstance(tree, float) or math.isfinite(tree)


@pytest.fixture(scope="module")
def tiny():
    src = make_source("llama")
    model = convert_to_bsbr(src, chunk_size=CHUNK, retrieval_blocks=0)
    with torch.no_grad():  # open the retrieval gate so the model differs from the chunk-local baseline
        for name, p in model.named_parameters():
            if name.endswith("retrieval_gate"):
                p.fill_(1.0)
    return src, model, local_baseline(src, CHUNK, like=model)


def test_a_saved_hybrid_model_that_reads_as_window_gets_its_baselines():
    """A model saved with far_positions 'hybrid' where no chunk lies within its reach (as the converter built it
    before it refused that) could not be evaluated: its window baseline was refused as a conversion option."""
    src = make_source("llama")  # 2,048 positions: at chunk 512, half of them reach no further than the window
    model = convert_to_bsbr(src, chunk_size=512)
    model.config.far_positions = "hybrid"  # (what an earlier bsbr wrote to config.json)
    assert local_baseline(src, 512, like=model, same_window=True).config.far_positions == "window"
    absolute = convert_to_bsbr(src, chunk_size=8, far_positions="absolute")  # (the baselines assign positions
    assert local_baseline(src, 8, like=absolute).config.far_positions == "absolute"  # past the table alike)


@pytest.mark.parametrize("options", [dict(position_scheme="clamp"), dict(retrieval="additive", feature_map="identity"),
                                     dict(compression_factor=2, gate_init=0.5)])
def test_the_chunk_local_baseline_takes_the_models_conversion_options(options):
    # the lower bound of "gap closed" assigns positions and reads states as the model does (with the converter's
    # defaults, a GPT-2 model converted with --position-scheme clamp had a baseline that wrapped positions)
    src = make_source("gpt2")
    model = convert_to_bsbr(src, chunk_size=4, retrieval_blocks=0, **options)
    got = local_baseline(src, 4, like=model).config
    for name in ("position_scheme", "retrieval", "feature_map", "compression_factor", "far_positions"):
        assert getattr(got, name) == getattr(model.config, name), name
    assert (got.local_chunks, got.sink_tokens, got.retrieval_blocks) == (1, 0, 0)


def test_fewer_windows_than_asked_are_warned_of(tmp_path, caplog):
    from word_tokenizer import build_word_tokenizer

    from bsbr.evaluate.saved import eval_windows

    text = tmp_path / "t.py"
    text.write_text("x = 1\n" * 200)  # 1,200 tokens: 4 windows of 256
    with caplog.at_level("WARNING"):
        windows, _ = eval_windows(build_word_tokenizer(), text_files=[str(text)], split="all", seq_len=256,
                                  max_windows=16)
    assert f"the corpus gave {windows.shape[0]} windows of 256 tokens (of the 16 asked for)" in caplog.text


def test_local_baseline_is_chunk_local(tiny):
    """Chunk c of the baseline's logits = the source run on chunk c alone (rotary positions are relative)."""
    src, _, local = tiny
    ids = torch.randint(3, 97, (1, 3 * CHUNK), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = local(ids).logits
        for c in range(3):
            alone = src(ids[:, c * CHUNK:(c + 1) * CHUNK]).logits
            torch.testing.assert_close(full[:, c * CHUNK:(c + 1) * CHUNK], alone, atol=1e-4, rtol=1e-4)


def test_evaluate_tiny_model(tiny):
    src, model, local = tiny
    # random weights: full context need not help; on these windows the source beats chunk-local attention
    windows = torch.randint(3, 97, (3, 5 * CHUNK), generator=torch.Generator().manual_seed(2))
    r = evaluate(model, src, None, windows, CHUNK, local=local, progress=False, batch_size=2)
    lm = r["language_modeling"]
    assert _finite(r)
    assert lm["tokens"] == 3 * (5 * CHUNK - 1 - CHUNK)  # first chunk (and the last position) excluded
    assert [(b["start"], b["end"]) for b in lm["buckets"]] == [(8, 16), (16, 24), (24, 32), (32, 39)]
    printed = "\n".join(summary_lines(r))  # the report names each bucket's first and last position
    assert all(f" {lo}-{hi} " in printed for lo, hi in [(8, 15), (16, 23), (24, 31), (32, 38)]), printed
    assert lm["agreement"]["bsbr"]["top1"] <= lm["agreement"]["bsbr"]["top5"] <= lm["agreement"]["bsbr"]["top10"]
    assert lm["kl"]["bsbr"] > 0 and lm["kl"]["local"] > 0 and -1 <= lm["hidden_cosine"]["bsbr"] <= 1
    # the final hidden states differ from the source's (the embeddings, the same in every model, would not)
    assert all(lm["hidden_cosine"][m] < 1 - 1e-6 and lm["hidden_mse"][m] > 0 for m in ("bsbr", "local"))
    assert lm["perplexity"]["source"] != lm["perplexity"]["local"] != lm["perplexity"]["bsbr"]
    ppl = lm["perplexity"]
    assert ppl["local"] > ppl["source"]
    assert lm["gap_closed"] == pytest.approx((ppl["local"] - ppl["bsbr"]) / (ppl["local"] - ppl["source"]))

    model.train()  # a model evaluated between training steps is given back in its modes (it was left in eval mode)
    model.model.layers[0].eval()
    evaluate(model, src, None, windows[:1], CHUNK, progress=False)
    assert model.training and not model.model.layers[0].training and model.model.layers[1].training
    assert not src.training
    model.eval()

    # the closed-gate model *is* the baseline: gap closed 0 exactly
    closed = evaluate(local, src, None, windows, CHUNK, local=local, progress=False)["language_modeling"]
    assert closed["gap_closed"] == 0.0 and closed["kl"]["bsbr"] == closed["kl"]["local"]
    # where chunk-local attention beats the source there is no gap to close (the ratio said 109% for a
    # model worse than both)
    other = torch.randint(3, 97, (3, 5 * CHUNK), generator=torch.Generator().manual_seed(1))
    lm1 = evaluate(model, src, None, other, CHUNK, local=local, progress=False)["language_modeling"]
    assert lm1["perplexity"]["local"] < lm1["perplexity"]["source"] and lm1["gap_closed"] is None

    # the shortest window with a scored token: B + 2 tokens, only position B (predicting B + 1) counts
    short = windows[:1, : CHUNK + 2]
    r1 = evaluate(model, src, None, short, CHUNK, local=local, progress=False)["language_modeling"]
    assert r1["tokens"] == 1


def test_window_baseline_is_the_source_in_the_models_exact_window(tiny, tmp_path):
    """A model with local_chunks=2 and sinks gets a second baseline, the source restricted to that
    window; with the gate closed the model *is* that baseline (retrieval's share 0 exactly), while
    the chunk-local gap is already positive."""
    from bsbr.evaluate import summary_lines
    from bsbr.evaluate.baselines import has_wide_window

    src, _, local = tiny
    wide = convert_to_bsbr(src, chunk_size=CHUNK, local_chunks=2, sink_tokens=2, retrieval_blocks=0)
    assert has_wide_window(wide.config.to_dict()) and not has_wide_window(local.config.to_dict())
    # keys absent: the config's defaults, but in a config.json an earlier bsbr saved without recording its version
    # (bsbr 0.2.0's, whose window was the token's own chunk)
    assert has_wide_window({}) and has_wide_window({"bsbr_version": "0.3.0", "transformers_version": "5.0.0"})
    assert not has_wide_window({"transformers_version": "4.57.0"})
    assert not has_wide_window({"local_chunks": 1, "sink_tokens": 0})
    assert has_wide_window({"local_chunks": 1, "sink_tokens": 4})  # (the window is its chunk and the sinks)
    window = local_baseline(src, CHUNK, like=wide, same_window=True)
    assert (window.config.local_chunks, window.config.sink_tokens, window.config.gate_init) == (2, 2, 0.0)
    # like= the model's config, as the docstring says: it was ignored (a chunk-local 'window' baseline, silently)
    by_config = local_baseline(src, CHUNK, like=wide.config, same_window=True).config
    assert (by_config.local_chunks, by_config.sink_tokens) == (2, 2)
    with pytest.raises(TypeError, match="like must be a BSBR model or its config, got LlamaForCausalLM"):
        local_baseline(src, CHUNK, like=src)
    assert local_baseline(src, CHUNK, like=wide).config.local_chunks == 1  # the gap's baseline stays chunk-local
    # random weights: on these windows local > window > source, so both gaps exist
    windows = torch.randint(3, 97, (2, 5 * CHUNK), generator=torch.Generator().manual_seed(11))
    r = evaluate(wide, src, None, windows, CHUNK, local=local, window=window, progress=False)
    lm = r["language_modeling"]
    assert lm["perplexity"]["local"] > lm["perplexity"]["window"] > lm["perplexity"]["source"]
    assert lm["gap_closed_by_retrieval"] == 0.0 and lm["kl"]["bsbr"] == lm["kl"]["window"]
    assert lm["perplexity"]["window"] != lm["perplexity"]["local"]
    assert any("retrieval, of the gap the window alone leaves" in line and line.endswith("no retrieval: 2 chunk(s) + "
               "2 sink tokens)") for line in summary_lines(r))  # (it said 1 chunk + 0 sinks, the report's defaults)
    from bsbr.evaluate.plots import plot_results

    assert plot_results(r, tmp_path / "w.png").stat().st_size > 0
    with torch.no_grad():
        for name, p in wide.named_parameters():
            if name.endswith("retrieval_gate"):
                p.fill_(1.0)
    lm2 = evaluate(wide, src, None, windows, CHUNK, local=local, window=window, progress=False)["language_modeling"]
    assert lm2["gap_closed_by_retrieval"] != 0.0


def test_a_dynamically_quantized_model_is_evaluated_and_refused_by_save_pretrained(tiny, tmp_path):
    # evaluate read the LM head's weight.shape, a method on a quantized linear ('function' object has no attribute
    # 'shape'); save_pretrained said a bias was missing and to build a new model from the config (its weights lost)
    import copy

    from torch.ao.quantization import quantize_dynamic

    src, model, _ = tiny
    quantized = quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8)
    windows = torch.randint(3, 97, (1, 3 * CHUNK), generator=torch.Generator().manual_seed(2))
    lm = evaluate(quantized, src, None, windows, CHUNK, progress=False)["language_modeling"]
    float_lm = evaluate(model, src, None, windows, CHUNK, progress=False)["language_modeling"]
    assert lm["perplexity"]["bsbr"] == pytest.approx(float_lm["perplexity"]["bsbr"], rel=0.05)
    with pytest.raises(ValueError, match=r"^model.layers.0.attn.q_proj is a quantized module, and a BSBR folder "
                                         "holds float weights: save the float model"):
        quantized.save_pretrained(tmp_path / "q")
    with pytest.raises(ValueError, match=r"^model.layers.0.attn.q_proj is a quantized module"):  # (transformers'
        quantized.save_pretrained(tmp_path / "q", state_dict=quantized.state_dict())  # AttributeError)
    assert not (tmp_path / "q").exists()


def test_evaluate_runs_without_autograd_and_in_eval_mode(tiny):
    # a helper defined between evaluate and its decorators took them: evaluate ran with autograd on (17 GB at 1,024
    # tokens on SmolLM2 against 4.6) and in the caller's train mode (dropout: two calls gave two perplexities)
    src, model, local = tiny
    seen = []
    hook = model.register_forward_hook(lambda m, a, o: seen.append((torch.is_grad_enabled(), m.training)))
    model.train()
    try:
        evaluate(model, src, None, torch.randint(3, 97, (1, 3 * CHUNK)), CHUNK, local=local, progress=False)
        assert model.training  # (given back as it came)
    finally:
        hook.remove()
        model.eval()
    assert seen and set(seen) == {(False, False)}


def test_evaluate_bad_inputs(tiny):
    src, model, local = tiny
    with pytest.raises(ValueError, match="windows"):
        evaluate(model, src, None, torch.zeros(5), CHUNK)
    with pytest.raises(ValueError, match="outside"):
        evaluate(model, src, None, torch.full((1, 20), 500), CHUNK)
    with pytest.raises(ValueError, match="seq_len"):
        evaluate(model, src, None, torch.zeros(1, CHUNK, dtype=torch.long), CHUNK, progress=False)


def test_cli_end_to_end(tiny, tmp_path, word_tokenizer, capsys, monkeypatch):
    src, _, _ = tiny
    ref, conv = tmp_path / "ref", tmp_path / "conv"
    src.save_pretrained(ref)
    model = convert_to_bsbr(src, chunk_size=CHUNK)
    model.save_pretrained(conv)
    word_tokenizer.save_pretrained(conv)
    text = tmp_path / "code.py"
    text.write_text(PYTHON_TEXT)
    out_json, out_png = tmp_path / "r.json", tmp_path / "r.png"
    monkeypatch.chdir(tmp_path)
    rc = main(["eval", str(conv), "--reference", "ref", "--text-file", str(text), "--seq-len", "40",
               "--max-windows", "2", "--passkey-lengths", "96", "128", "--passkey-depths", "0.1", "0.9",
               "--passkey-trials", "1", "--passkey-new-tokens", "5", "--json", str(out_json), "--plot", str(out_png),
               "--no-progress"])
    assert rc == 0
    r = json.loads(out_json.read_text())
    assert r["config"]["chunk_size"] == CHUNK and r["config"]["windows"] == 2
    assert r["config"]["reference"] == str(ref)  # a local reference by absolute path, as the model and corpus
    # zero-shot conversion, gate closed: the source over the default exact window (2 chunks + sinks) and
    # each token's best earlier chunks, which differs from the window alone
    lm = r["language_modeling"]
    assert (r["config"]["local_chunks"], r["config"]["sink_tokens"]) == (2, 4)
    # the conversion's retrieval is recorded too (a hybrid run and a window run looked the same)
    assert (r["config"]["retrieval_blocks"], r["config"]["recall_tokens"], r["config"]["far_positions"]) == (8, 0, "window")
    # and what else tells two models, or two installs, apart (two conversions with other options, or a model and
    # its distilled copy, recorded one config)
    from bsbr import __version__, load_bsbr_model
    from bsbr.arguments import weights_fingerprint

    assert (r["config"]["retrieval"], r["config"]["feature_map"], r["config"]["bsbr"]) == \
        ("normalized", "hedgehog", __version__)
    assert r["config"]["weights"] == weights_fingerprint(load_bsbr_model(conv)) and r["config"]["transformers"]
    assert r["config"]["dtype"] == "float32"  # (HFLM runs the saved dtype unless told: the lm-eval snippet says so)
    assert lm["gap_closed_by_retrieval"] != 0.0 and lm["gap_closed"] != 0.0
    assert set(r["passkey"]["models"]) == {"bsbr", "source", "local", "window"}
    assert len(r["passkey"]["models"]["bsbr"]["cells"]) == 4
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "gap closed" in printed and "pass-key accuracy" in printed
    assert r["config"]["stride"] == 40  # (no --stride: windows side by side; the record says which were scored)
    assert main(["eval", str(conv), "--reference", "ref", "--text-file", str(text), "--seq-len", "40", "--stride", "20",
                 "--max-windows", "3", "--no-passkey", "--json", str(tmp_path / "s.json"), "--no-progress"]) == 0
    assert json.loads((tmp_path / "s.json").read_text())["config"]["stride"] == 20
    assert main(["eval", str(conv), "--reference", "ref", "--split", "train", "--seq-len", "40", "--max-windows", "1",
                 "--no-passkey", "--json", str(tmp_path / "t.json"), "--no-progress"]) == 0
    assert json.loads((tmp_path / "t.json").read_text())["config"]["corpus"]["split"] == "train"  # (not held out)
    # the pass-key alone with --plot: the heat map is the plot (it ran, then failed on the missing perplexities);
    # of the model alone, no reference is needed (nor a conversion record naming one: this folder has none)
    assert main(["eval", str(conv), "--passkey-only", "--passkey-models", "bsbr",
                 "--passkey-lengths", "96", "--passkey-depths", "0.5", "--passkey-trials", "1", "--passkey-new-tokens",
                 "5", "--plot", str(tmp_path / "p.png"), "--no-progress"]) == 0
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (tmp_path / "p.json").is_file()


def test_eval_warns_when_its_windows_end_before_an_open_gate_is_read(tiny, tmp_path, word_tokenizer, caplog):
    """eval's default windows (2,048 tokens) end before a distilled default conversion reads its chunk states
    (2,560 tokens): the distilled model's figures were the fresh conversion's to the digit, without a word."""
    src, _, _ = tiny
    ref, conv = tmp_path / "ref", tmp_path / "conv"
    src.save_pretrained(ref)
    for gate, seq_len, warned in ((0.3, 81, True), (0.3, 82, False), (0.0, 40, False)):
        convert_to_bsbr(src, chunk_size=CHUNK, gate_init=gate).save_pretrained(conv)  # (reach (2 + 8) x 8 = 80)
        word_tokenizer.save_pretrained(conv)
        (tmp_path / "text.py").write_text(PYTHON_TEXT * 3)
        caplog.clear()
        with caplog.at_level("WARNING"):
            assert main(["eval", str(conv), "--reference", str(ref), "--text-file", str(tmp_path / "text.py"),
                         "--seq-len", str(seq_len), "--max-windows", "1", "--no-passkey", "--no-progress"]) == 0
        assert (f"{conv} reads its chunk states (its gate is open, or it has none) only from token 80 on, past every "
                f"window of {seq_len} tokens here: its perplexity figures are those of its exact window and blocks "
                "alone; give windows of 82 tokens or more (--seq-len)" in caplog.text) is warned, \
            (gate, seq_len, caplog.text)
    convert_to_bsbr(src, chunk_size=CHUNK, gate_init=0.3).save_pretrained(conv)
    caplog.clear()  # pass-key prompts alone: those that end before token 80 are named (they were not)
    with caplog.at_level("WARNING"):
        assert main(["eval", str(conv), "--reference", str(ref), "--passkey-only", "--passkey-models", "bsbr",
                     "--passkey-lengths", "80", "200", "--passkey-depths", "0.5", "--passkey-trials", "1",
                     "--passkey-new-tokens", "5", "--no-progress"]) == 0
    assert f"{conv} reads its chunk states (its gate is open, or it has none) only from token 80 on: its pass-key " \
        "prompts of 80 tokens end before that" in caplog.text, caplog.text
    caplog.clear()  # a full run whose pass-key test leaves the model out: not said of its prompts
    with caplog.at_level("WARNING"):
        assert main(["eval", str(conv), "--reference", str(ref), "--text-file", str(tmp_path / "text.py"),
                     "--seq-len", "90", "--max-windows", "1", "--passkey-models", "source", "--passkey-lengths", "80",
                     "--passkey-depths", "0.5", "--passkey-trials", "1", "--passkey-new-tokens", "5",
                     "--no-progress"]) == 0
    assert "pass-key prompts" not in caplog.text, caplog.text


def test_eval_warns_when_it_reads_the_text_the_model_was_distilled_on(tiny, tmp_path, word_tokenizer, caplog):
    # distill and eval of the user's own text (--text-file, a local --dataset of one split) read the same windows:
    # the figures looked held out, and nothing said otherwise
    from bsbr.corpus import corpus_texts

    src, _, _ = tiny
    ref, conv = tmp_path / "ref", tmp_path / "conv"
    src.save_pretrained(ref)
    convert_to_bsbr(src, chunk_size=CHUNK).save_pretrained(conv)
    word_tokenizer.save_pretrained(conv)
    trained, other = tmp_path / "code.py", tmp_path / "other.py"
    trained.write_text(PYTHON_TEXT)
    other.write_text(PYTHON_TEXT.replace("x", "y"))
    (conv / "distill.json").write_text(json.dumps(dict(data=corpus_texts(text_files=[trained])[1])))
    for text, warned in ((trained, True), (other, False)):
        caplog.clear()
        with caplog.at_level("WARNING"):
            assert main(["eval", str(conv), "--reference", str(ref), "--text-file", str(text), "--seq-len", "40",
                         "--max-windows", "1", "--no-passkey", "--no-progress"]) == 0
        assert (f"MODEL {conv} was distilled on --text-file {text} (its distill.json): its perplexity here is on "
                "text it was trained on, not held out" in caplog.text) is warned, caplog.text
    # compared by the files read: the same text named another way was not noticed, and files never read were
    from argparse import Namespace

    from bsbr.corpus import files_read, mixed_order, stdlib_files, stdlib_root
    from bsbr.evaluate.cli import _distilled_on

    pytest.importorskip("datasets")

    def distilled_on(data, text_file=None, dataset=None, split="heldout", dataset_split="test", read=None):
        (conv / "distill.json").write_text(json.dumps(dict(data=data)))
        corpus = files_read(corpus_texts(text_files=text_file, dataset=dataset, dataset_split=dataset_split,
                                         split=split)[1], read)  # (as eval records what it read)
        return _distilled_on(Namespace(model=str(conv), text_file=text_file, dataset=dataset), corpus)

    (tmp_path / "ds").mkdir()
    data_file = str(tmp_path / "ds" / "data.jsonl")
    Path(data_file).write_text('{"text": "a b"}\n')
    ds = corpus_texts(dataset=str(tmp_path / "ds"), dataset_split="train")[1]
    assert distilled_on(ds, dataset=str(tmp_path / "ds"), dataset_split="train") == \
        f"--dataset {tmp_path / 'ds'} (split train)"
    assert distilled_on(corpus_texts(split="train")[1], split="train") == "the default corpus's train split"
    assert distilled_on(corpus_texts(split="train")[1]) is None  # (eval's default: heldout)
    assert distilled_on(dict(kind="text_files", files=5), text_file=[str(trained)]) is None  # (edited by hand)
    assert distilled_on(dict(corpus_texts(text_files=[trained])[1], earlier=5), text_file=[str(trained)]) == \
        f"--text-file {trained}"  # (a damaged part of a record is passed over)
    assert distilled_on(corpus_texts(text_files=[data_file])[1], dataset=data_file, dataset_split="train") == \
        f"--dataset {data_file} (split train)"  # (a data file's one split, which eval reads)
    assert distilled_on(ds, text_file=[data_file]) == f"--text-file {data_file}"
    (tmp_path / "tt").mkdir()
    for split in ("train", "test"):
        (tmp_path / "tt" / f"{split}.jsonl").write_text('{"text": "a b"}\n')
    assert distilled_on(corpus_texts(dataset=str(tmp_path / "tt"), dataset_split="train+test")[1],
                        dataset=str(tmp_path / "tt")) == f"--dataset {tmp_path / 'tt'} (split test)"
    assert distilled_on(corpus_texts(dataset=str(tmp_path / "tt"), dataset_split="train")[1],
                        dataset=str(tmp_path / "tt")) is None  # (eval's test split)
    from bsbr.corpus import read_in_order  # (a plain-text folder: an empty file is no document)
    import gzip

    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "a.txt").write_text("")
    (tmp_path / "txt" / "b.txt").write_text("some text")
    (tmp_path / "txt" / "c.txt.gz").write_bytes(gzip.compress(b"more text"))
    record = corpus_texts(dataset=str(tmp_path / "txt"), dataset_split="train")[1]
    assert read_in_order(record) is None  # (compressed: read as rows, blank ones skipped, an archive's members)
    (tmp_path / "txt" / "c.txt.gz").unlink()
    assert read_in_order(record) == [str((tmp_path / "txt" / "b.txt").resolve())]
    assert distilled_on(corpus_texts(dataset=str(tmp_path / "tt"), dataset_split="train")[1],
                        dataset=str(tmp_path / "tt" / "train.jsonl"), dataset_split="train") is not None
    order = mixed_order(stdlib_files("heldout"), 0, root=stdlib_root())  # (the files eval reads, in order)
    trained_file = stdlib_files("train")[0]
    assert distilled_on(corpus_texts(text_files=[order[1]])[1]) == \
        f"the default corpus's heldout split (1 of the {len(order):,} files read)"
    assert distilled_on(corpus_texts(text_files=[order[1]])[1], read={0}) is None  # (never read)
    os.link(trained, tmp_path / "hard.py")  # a hard link of a trained file (a symbolic one was noticed)
    assert distilled_on(corpus_texts(text_files=[trained])[1], text_file=[str(tmp_path / "hard.py")]) == \
        f"--text-file {tmp_path / 'hard.py'}"
    assert distilled_on(corpus_texts(split="train")[1], text_file=[str(trained_file)]) == f"--text-file {trained_file}"
    assert distilled_on(corpus_texts(split="train")[1], text_file=[str(order[0])]) is None
    # a record of another machine's (or Python's) standard library: its files by their path in the library
    rel = Path(trained_file).relative_to(stdlib_root()).as_posix()
    for elsewhere in (dict(kind="stdlib", split="train", seed=0, root="/elsewhere/lib",
                           files=[f"/elsewhere/lib/{rel}"]),
                      dict(kind="stdlib", split="train", seed=0, root="/elsewhere/lib")):  # (an older record)
        assert distilled_on(elsewhere, text_file=[str(trained_file)]) == f"--text-file {trained_file}"


def test_eval_logs_its_baselines_conversions_quietly(tmp_path, word_tokenizer, caplog):
    # each baseline conversion logged "converted mistral ..." and the source's sliding-window note again,
    # with bsbr convert's advice (eval has none of its options); the perplexities were a dict's repr
    src = make_source("mistral")
    src.save_pretrained(tmp_path / "ref")
    convert_to_bsbr(src, chunk_size=CHUNK).save_pretrained(tmp_path / "conv")
    word_tokenizer.save_pretrained(tmp_path / "conv")
    (tmp_path / "code.py").write_text(PYTHON_TEXT)
    caplog.clear()
    with caplog.at_level("INFO"):
        assert main(["eval", str(tmp_path / "conv"), "--reference", str(tmp_path / "ref"), "--text-file",
                     str(tmp_path / "code.py"), "--seq-len", "40", "--max-windows", "1", "--no-passkey",
                     "--no-progress"]) == 0
    assert caplog.text.count("attends within a sliding window") == 1, caplog.text
    assert "converted mistral" not in caplog.text and "{'bsbr'" not in caplog.text
    assert re.search(r"perplexity past the first chunk: bsbr [0-9.]+, source [0-9.]+, local [0-9.]+, window "
                     r"[0-9.]+; gap closed (-?[0-9.]+%|undefined)\n", caplog.text), caplog.text
    # (a percentage, as the report gives it: the log gave the fraction, 54.344 where the report said 5434.37%)


def test_cli_bad_input_is_one_line(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("bsbr eval: error:")


def test_perplexity_past_is_the_cross_entropy_of_the_scored_tokens_only():
    from bsbr.evaluate import perplexity_past

    src = make_source("llama")
    g = torch.Generator().manual_seed(3)
    windows = torch.randint(3, 97, (2, 30), generator=g)
    with torch.no_grad():
        logits = src(windows).logits
    by_hand = math.exp(torch.nn.functional.cross_entropy(logits[:, 9:-1].reshape(-1, logits.shape[-1]),
                                                         windows[:, 10:].reshape(-1)).item())
    assert perplexity_past(src, windows, 9) == pytest.approx(by_hand, rel=1e-5)
    assert perplexity_past(src, list(windows), 0) != pytest.approx(by_hand, rel=1e-3)  # more tokens scored
    # forward keyword arguments reach the model: a mask hiding all but the token itself changes the number
    eye = torch.full((30, 30), torch.finfo(torch.float32).min).fill_diagonal_(0.0)[None, None]
    assert perplexity_past(src, windows, 9, attention_mask=eye) != pytest.approx(by_hand, rel=1e-3)
    # a padding mask: its padding is not scored (right padding scored the pad ids as targets)
    padded = torch.cat([windows[:1], torch.zeros(1, 8, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones(1, 30), torch.zeros(1, 8)], 1).long()
    alone = perplexity_past(src, windows[:1], 9)
    assert perplexity_past(src, padded, 9, attention_mask=mask) == pytest.approx(alone, rel=1e-5)
    left = torch.cat([torch.zeros(1, 5, dtype=torch.long), windows[:1]], 1)  # (its first real token, predicted from
    mask = torch.cat([torch.zeros(1, 5), torch.ones(1, 30)], 1).long()  # padding, was scored)
    assert perplexity_past(src, left, 0, attention_mask=mask) == pytest.approx(perplexity_past(src, windows[:1], 0),
                                                                              rel=1e-4)
    with pytest.raises(ValueError, match="start must be an int"):
        perplexity_past(src, windows, -1)
    with pytest.raises(ValueError, match="no tokens past start"):
        perplexity_past(src, windows, 29)
    with pytest.raises(ValueError, match="1-D integer tensor"):
        perplexity_past(src, [windows.float()[0]], 0)


def test_perplexity_and_passkey_run_in_eval_mode_and_give_the_models_back(tiny):
    """perplexity_past and run_passkey ran a model in train mode with its dropout on."""
    from bsbr.evaluate import perplexity_past
    from bsbr.evaluate.passkey import run_passkey
    from word_tokenizer import build_word_tokenizer

    src, model, _ = tiny
    seen = []
    model.register_forward_pre_hook(lambda m, a: seen.append(m.training))
    windows = torch.randint(3, 97, (1, 3 * CHUNK), generator=torch.Generator().manual_seed(4))
    model.train()
    perplexity_past(model, windows, CHUNK)
    run_passkey({"bsbr": model}, build_word_tokenizer(), lengths=[256], depths=[0.5], trials=1, max_new_tokens=5,
                progress=False)
    assert seen and not any(seen) and model.training
    model.eval()


def test_a_folder_without_a_tokenizer_is_said_to_have_none_once(tmp_path, word_tokenizer, caplog):
    # it logged tokenizers' advice to install sentencepiece, once per load (three per bsbr eval run)
    from bsbr.evaluate.baselines import load_eval_tokenizer

    ref = tmp_path / "ref"
    word_tokenizer.save_pretrained(ref)
    with caplog.at_level("INFO", logger="bsbr.evaluate.baselines"):
        for _ in range(3):
            assert load_eval_tokenizer(tmp_path / "model", ref) is not None
    assert caplog.text.count("has no tokenizer files; using the reference's") == 1, caplog.text
    assert "sentencepiece" not in caplog.text


def test_evaluate_saved_says_each_note_once_and_reads_every_window_without_a_cap(tiny, tmp_path, word_tokenizer,
                                                                              caplog):
    # its loads cleared the notes said before them (the tokenizer note came twice), and max_windows=None (every
    # window, as token_windows documents) was a TypeError
    from bsbr.evaluate import evaluate_saved

    src, _, _ = tiny
    src.save_pretrained(tmp_path / "ref")
    word_tokenizer.save_pretrained(tmp_path / "ref")
    convert_to_bsbr(src, chunk_size=CHUNK).save_pretrained(tmp_path / "model")
    (tmp_path / "code.py").write_text(PYTHON_TEXT * 3)
    with caplog.at_level("INFO"):
        result = evaluate_saved(tmp_path / "model", tmp_path / "ref", text_files=[tmp_path / "code.py"], seq_len=40,
                                max_windows=None, progress=False)
    assert caplog.text.count("has no tokenizer files; using the reference's") == 1, caplog.text
    assert result["config"]["windows"] >= 2


def test_the_printed_gap_closed_has_two_decimals_of_a_percent():
    lm = dict(tokens=10, perplexity=dict(source=10.0, local=20.0, bsbr=12.345), agreement={}, kl={},
              gap_closed=0.7655, buckets=[])
    lines = summary_lines(dict(config=dict(windows=1, seq_len=64, chunk_size=16), language_modeling=lm))
    assert "gap closed (ppl_local - ppl_bsbr) / (ppl_local - ppl_source): 76.55%" in lines
