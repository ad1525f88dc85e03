"""``bsbr demo`` (the README's main command) end to end on a tiny local llama: exit status, every
output file, the summary, and no overwrite of a non-empty --output."""
import json
import os

import pytest

from cli_checks import one_error_line, refused, tree_hash

from bsbr.cli import main


def test_demo_writes_model_eval_and_speed(models, tmp_path, capsys, monkeypatch):
    source, _, _ = models
    out = tmp_path / "demo"
    monkeypatch.chdir(source.parent)  # (a relative --source and --output)
    args = ["demo", "--source", source.name, "--output", os.path.relpath(out), "--chunk-size", "8", "--seq-len", "160",
            "--max-windows", "1", "--speed-lens", "32", "--decode-contexts", "24", "--repeats", "1"]
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert main(args) == 0
        assert torch.get_num_threads() == 2  # the speed step's one thread is not left behind
    finally:
        torch.set_num_threads(threads)
    text = capsys.readouterr().out
    assert "=== summary ===" in text and "gap closed" in text and "decode at" in text
    for name in ("eval.json", "eval.png", "speed.json", "speed.png", "model/config.json", "model/model.safetensors"):
        assert (out / name).is_file(), name
    ev = json.loads((out / "eval.json").read_text())
    assert set(ev["passkey"]["models"]) == {"source", "window", "bsbr"}
    assert (ev["config"]["seq_len"], ev["config"]["windows"], ev["config"]["chunk_size"]) == (160, 1, 8)
    # (it named the staging folder, gone by then, and then a path relative to where the demo ran)
    assert ev["config"]["model_dir"] == str(out.resolve() / "model")
    lm = ev["language_modeling"]
    assert set(lm["perplexity"]) == {"source", "local", "window", "bsbr"}
    assert lm["tokens"] == 160 - 8 - 1  # the tokens predicted past the first chunk
    summary = text.split("=== summary ===")[1]
    assert any(line.split()[:2] == ["bsbr", f"{lm['perplexity']['bsbr']:.4g}"] for line in summary.splitlines())
    # within its window (2 chunks of 8 tokens) the conversion is the source: equal per-bucket NLL (past it
    # the default reads far keys just before the window)
    exact = [bk for bk in lm["buckets"] if bk["end"] <= 16]
    assert exact and all(abs(bk["nll"]["bsbr"] - bk["nll"]["source"]) < 1e-4 for bk in exact)
    speed = json.loads((out / "speed.json").read_text())
    assert [r["seq_len"] for r in speed["prefill"]] == [32] and [r["context"] for r in speed["decode"]] == [24]
    assert speed["prefill"][0]["bsbr_ms"] > 0 and speed["decode"][0]["bsbr_ms_per_token"] > 0
    assert speed["machine"]["torch_threads"] == 1  # measured side by side on one thread
    assert speed["config"]["repeats"] == 1  # (--repeats given)
    assert speed["config"]["model"] == str(source.resolve())  # a local source by absolute path, as typed it was not
    assert json.loads((out / "model" / "config.json").read_text())["retrieval_blocks"] > 0
    # recorded as `bsbr convert` records it, so eval and distill can check a --reference/--teacher against it
    record, converted = (json.loads((d / "conversion.json").read_text()) for d in (out / "model", models[1]))
    assert record["source"]["fingerprint"] == converted["source"]["fingerprint"] and record["chunk_size"] == 8
    assert "output_dir" not in record and (out / "model" / "README.md").is_file()  # (no local path published)
    before = tree_hash(out)
    assert main(args) == 2  # a second run does not replace the first without --overwrite
    assert "--overwrite" in one_error_line(capsys.readouterr().err, "demo")
    assert tree_hash(out) == before


@pytest.mark.parametrize("extra, words", [
    (["--chunk-size", "8", "--seq-len", "9"], "--seq-len must be at least --chunk-size + 2 = 10"),
    (["--chunk-size", str(2 ** 63)], "argument --chunk-size: must be an integer from 1 to"),
    (["--repeats", str(2 ** 63)], "argument --repeats: must be an integer from 1 to 1,000"),
    (["--speed-lens", "0"], "argument --speed-lens: must be an integer from 1 to"),
    (["--chunk-size", "600000", "--seq-len", "600002"], "--chunk-size 600,000 must be at most 524,288 (the "
     "conversion's window is 2 chunks"),
])
def test_demo_refuses_bad_sizes_before_converting(models, tmp_path, capsys, monkeypatch, extra, words):
    source, _, _ = models
    monkeypatch.setattr("bsbr.convert.converter.load_source", lambda *a: pytest.fail("loaded the source"))
    line = refused(capsys, ["demo", "--source", source, "--output", tmp_path / "out", *extra], "demo")
    assert words in line and not (tmp_path / "out").exists()


def test_demo_refuses_a_passkey_prompt_that_cannot_fit_before_converting(models, tmp_path, capsys, monkeypatch):
    source, _, _ = models
    monkeypatch.setattr("bsbr.convert.converter.load_source", lambda *a: pytest.fail("loaded the source"))
    line = refused(capsys, ["demo", "--source", source, "--output", tmp_path / "out", "--chunk-size", "8",
                            "--seq-len", "32"], "demo")
    assert "--seq-len: length 32 is too short for a pass-key prompt" in line and not (tmp_path / "out").exists()


def test_demo_refuses_a_corpus_too_small_for_one_window_before_loading(models, tmp_path, capsys, monkeypatch):
    # the windows were built only after the conversion (41 s on SmolLM2 before the refusal)
    source, _, _ = models
    monkeypatch.setattr("bsbr.convert.converter.load_source", lambda *a: pytest.fail("loaded the source"))
    line = refused(capsys, ["demo", "--source", source, "--output", tmp_path / "out", "--chunk-size", "8",
                            "--seq-len", "1048576", "--no-passkey"], "demo")
    assert "not enough for one window of 1048576" in line and not (tmp_path / "out").exists()


def test_demo_refuses_a_speed_length_predicted_to_run_for_hours_before_converting(models, tmp_path, capsys,
                                                                                   monkeypatch):
    """A typo in --speed-lens or --decode-contexts started hours of the source's prefill after the conversion
    and the evaluation; it is refused from one 1,024-token prefill of the source (the limit lowered here, the
    tiny source being fast), before converting, and nothing is written."""
    source, _, _ = models
    monkeypatch.setattr("bsbr.bench.defaults.MAX_SECONDS", 1e-9)
    monkeypatch.setattr("bsbr.convert.cli.convert_source", lambda *a: pytest.fail("converted the source"))
    for flag, lengths in (("--speed-lens", ["--speed-lens", "2048", "--decode-contexts"]),
                          ("--decode-contexts", ["--speed-lens", "64", "--decode-contexts", "2048"])):
        line = refused(capsys, ["demo", "--source", source, "--output", tmp_path / "out", "--chunk-size", "8",
                                "--seq-len", "64", "--no-passkey", *lengths], "demo")
        assert line.startswith(f"bsbr demo: error: {flag} 2048: the source's prefill is predicted to take ") and \
            line.endswith("> 1e-09 s: give a shorter length"), line
        assert not (tmp_path / "out").exists()


def test_demo_warns_of_a_seq_len_past_the_sources_rotary_positions(models, tmp_path, capsys, monkeypatch, caplog):
    # eval warns that the source's perplexity degrades there; the demo compared against it without a word
    source, _, _ = models
    positions = json.loads((source / "config.json").read_text())["max_position_embeddings"]

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("bsbr.convert.converter.convert_to_bsbr", stop)
    with caplog.at_level("WARNING"):
        assert main([str(a) for a in ["demo", "--source", source, "--output", tmp_path / "out", "--chunk-size", "8",
                                      "--seq-len", positions + 8, "--no-passkey", "--max-windows", "1"]]) == 130
    assert f"--seq-len {positions + 8:,} runs the source past its {positions:,} positions" in caplog.text


def test_demo_on_a_full_disk_names_its_output_and_leaves_nothing(models, tmp_path, capsys, monkeypatch):
    from safetensors import SafetensorError

    def full(self, *a, **k):  # safetensors' writer reports a full disk as its own error, not an OSError
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr("bsbr.models.bsbr.modeling_bsbr.BSBRForCausalLM.save_pretrained", full)
    out = tmp_path / "demo"
    line = refused(capsys, ["demo", "--source", models[0], "--output", out, "--chunk-size", "8", "--seq-len", "160",
                            "--no-passkey"], "demo")
    assert f"--output {out}: could not write the demo's files (Error while serializing" in line
    assert "free some space or choose another --output" in line and not list(tmp_path.iterdir())


def test_the_demos_chunk_size_may_fill_the_window_to_its_limit_and_no_further():
    from bsbr.convert.cli import check_default_window
    from bsbr.convert.defaults import DEFAULT_OPTIONS
    from bsbr.errors import UserError
    from bsbr.ops.bsbr.options import MAX_TOKENS

    most = MAX_TOKENS // DEFAULT_OPTIONS["local_chunks"]
    check_default_window(most)
    with pytest.raises(UserError, match=f"^--chunk-size {most + 1:,} must be at most {most:,} "):
        check_default_window(most + 1)


def test_demo_with_a_closed_stdout_goes_on_to_its_checks(models, tmp_path, capsys, monkeypatch):
    # (it writes files, so a closed stdout loses only its summary: refused as a command whose results are printed
    # there alone, `bsbr demo ... >&-` and `| head` wrote nothing)
    import sys

    source, _, _ = models
    monkeypatch.setattr(sys, "stdout", None)
    line = refused(capsys, ["demo", "--source", source, "--output", tmp_path / "out", "--chunk-size", "8",
                            "--seq-len", "9"], "demo")
    assert "--seq-len must be at least --chunk-size + 2 = 10" in line, line


def test_demo_refuses_decode_steps_past_a_sources_learned_positions_before_converting(tmp_path, capsys, monkeypatch):
    # (the decode context alone was checked: a GPT-2 of 64 positions converted and evaluated, then failed in the
    # speed step with "internal error IndexError")
    from model_sources import make_source
    from word_tokenizer import build_word_tokenizer

    src = tmp_path / "gpt2"
    make_source("gpt2").save_pretrained(src)  # 64 positions
    build_word_tokenizer().save_pretrained(src)
    monkeypatch.setattr("bsbr.convert.cli.convert_source", lambda *a: pytest.fail("converted the source"))
    line = refused(capsys, ["demo", "--source", src, "--output", tmp_path / "out", "--chunk-size", "8", "--seq-len",
                            "40", "--speed-lens", "32", "--decode-contexts", "60", "--no-passkey"], "demo")
    assert "--decode-contexts (plus 16 decode steps) 76 is longer than" in line and \
        "give --decode-contexts at most 48" in line, line
    assert not (tmp_path / "out").exists()
