"""What every ``bsbr bench`` subcommand refuses, and when: a bad ``--json``/``--plot``, a bad option value or
a bad input is one line (exit 2) naming the argument, before the benchmark runs, with nothing written."""
import json
from pathlib import Path

import pytest
import torch

from cli_checks import one_error_line, tree_hash

from bsbr.bench import attention as bench_attention
from bsbr.bench import converted as bench_converted
from bsbr.bench import models as bench_models
from bsbr.bench import quality as bench_quality
from bsbr.cli import main

# the smallest command line of each subcommand (sizes that would run in a second, were it run)
COMMANDS = {
    "attention": ["--seq-lens", "64", "--hidden", "32", "--heads", "2", "--chunk-size", "32", "--repeats", "1"],
    "models": ["--seq-lens", "64", "--repeats", "1", "--hidden", "32", "--heads", "2", "--ff-dim", "64"],
    "quality": ["--steps", "2", "--batch", "2", "--seq-len", "80", "--hidden", "16", "--heads", "2"],
    "converted": ["--gpt2-small-random", "--seq-lens", "64", "--decode-contexts", "--repeats", "1"],
}


@pytest.fixture
def nothing_runs(monkeypatch):
    """Every benchmark (and every model load) fails the test if it starts: refusals come first."""
    def runs(*a, **k):
        raise AssertionError("the benchmark ran before the arguments were checked")

    import bsbr.convert.converter as converter

    for module, name in ((bench_attention, "bench_attention"), (bench_attention, "bench_model_scaling"),
                         (bench_attention, "bench_core"), (bench_models, "bench_models"),
                         (bench_quality, "run_quality"), (bench_converted, "gpt2_small_random"),
                         (converter, "load_source")):
        monkeypatch.setattr(module, name, runs)


def _argv(command, *extra):
    """``bsbr bench COMMAND`` with its smallest options, those ``extra`` gives replaced by ``extra``'s
    (a list option may be given only once)."""
    given, base, keep = {x for x in extra if x.startswith("--")}, [], True
    for x in COMMANDS[command]:
        keep = x not in given if x.startswith("--") else keep
        base += [x] if keep else []
    return ["bench", command, *base, *extra]


def _refused(argv, capsys, command):
    assert main(argv) == 2
    return one_error_line(capsys.readouterr().err, command)


def _quality_result(path, models=("bsbr",), machine=None, **config):
    """A small 'bsbr bench quality' result file, as --json writes it."""
    config = dict(models=list(models), chunk_size=16, hidden=16, layers=1, heads=2, seq_len=64, steps=2, batch=2,
                  **config)
    results = [{"model": m, "attention": m, "kwargs": {}, "params": 10, "train_seconds": 0.0, "eval_seconds": 0.0,
                "final_train_loss": 5.0, "eval_loss": 5.0, "buckets": {"0-63": 5.0}} for m in models]
    machine = machine or {"cpu": "test cpu", "torch": "2.13"}
    path.write_text(json.dumps({"benchmark": "quality", "config": config, "machine": machine, "results": results,
                                "comparison": []}))
    return str(path)


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("case", ["plot-suffix", "same-file", "json-is-dir"])
def test_bench_refuses_bad_outputs_before_running(command, case, tmp_path, monkeypatch, capsys, nothing_runs):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "existing").mkdir()
    (tmp_path / "keep.json").write_text("{}\n")
    outputs = {"plot-suffix": ["--json", "r.json", "--plot", "r.txt"],
               "same-file": ["--json", "keep.json", "--plot", "keep.json"],
               "json-is-dir": ["--json", "existing"]}[case]
    before = tree_hash(tmp_path)
    line = _refused(["bench", command, *COMMANDS[command], *outputs], capsys, f"bench {command}")
    assert {"plot-suffix": "--plot r.txt", "same-file": "--plot keep.json is also given to --json",
            "json-is-dir": "--json existing is a directory"}[case] in line
    assert tree_hash(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["existing", "keep.json"]


@pytest.mark.parametrize("command, flag, value", [
    ("attention", "--max-seconds", "inf"), ("attention", "--max-seconds", "nan"),
    ("models", "--max-seconds", "0"), ("models", "--max-seconds", "nan"), ("models", "--model-budget", "-1"),
    ("models", "--model-budget", "inf"), ("quality", "--lr", "inf"), ("quality", "--lr", "nan"),
    ("quality", "--lr", "0"), ("converted", "--gate-init", "inf"), ("converted", "--gate-init", "nan"),
])
def test_bench_refuses_bad_float_options(command, flag, value, capsys, nothing_runs):
    line = _refused(["bench", command, *COMMANDS[command], f"{flag}={value}"], capsys, f"bench {command}")
    assert f"argument {flag}: '{value}': give a " in line and ("finite number" in line or "> 0" in line)


def test_bench_models_refuses_a_one_token_length(capsys, nothing_runs):
    """Its training step predicts each next token: one token has none to predict."""
    argv = ["bench", "models", *COMMANDS["models"][2:], "--seq-lens", "64", "1"]
    line = _refused(argv, capsys, "bench models")
    assert "argument --seq-lens: must be an integer from 2 to" in line and "got 1" in line, line


@pytest.mark.parametrize("device, told", [("bogus", "give cpu, cuda or cuda:N"), ("cpu:1", "give cpu, cuda or cuda:N"),
                                          ("meta", "give cpu, cuda or cuda:N"),
                                          ("cuda:0", "CUDA is not available here: give --device cpu")])
def test_bench_attention_refuses_a_device_it_cannot_run_on(device, told, capsys, nothing_runs):
    if device.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    line = _refused(["bench", "attention", *COMMANDS["attention"], "--device", device], capsys, "bench attention")
    assert f"--device {device}" in line and told in line, line


def test_bench_converted_refuses_a_source_with_gpt2_small_random(tmp_path, capsys, nothing_runs):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "llama"}))
    line = _refused(["bench", "converted", str(src), *COMMANDS["converted"]], capsys, "bench converted")
    assert f"SOURCE {src}" in line and "--gpt2-small-random" in line


def test_bench_converted_refuses_a_mistyped_local_path(tmp_path, monkeypatch, capsys, nothing_runs):
    """A bare name that is no local path is not looked up on the hub (as bsbr convert does)."""
    monkeypatch.chdir(tmp_path)
    line = _refused(["bench", "converted", "nowhere_dir", "--seq-lens", "64"], capsys, "bench converted")
    assert "SOURCE nowhere_dir does not exist" in line


def test_bench_converted_refuses_an_output_inside_its_source(tmp_path, capsys, nothing_runs):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "llama"}))
    before = tree_hash(src)
    line = _refused(["bench", "converted", str(src), "--json", str(src / "config.json")], capsys, "bench converted")
    assert "--json" in line and "SOURCE" in line and tree_hash(src) == before


def test_bench_quality_merge_refuses_to_overwrite_its_input(tmp_path, capsys, nothing_runs):
    a = _quality_result(tmp_path / "a.json")
    before = tree_hash(tmp_path)
    line = _refused(["bench", "quality", "--merge", a, "--json", a], capsys, "bench quality")
    assert f"--json {a} would overwrite the --merge input" in line
    assert tree_hash(tmp_path) == before


def test_bench_quality_merge_refuses_a_fifo_or_a_directory(tmp_path, capsys, nothing_runs):
    import os

    os.mkfifo(tmp_path / "pipe")  # read, it would block for ever
    (tmp_path / "d").mkdir()
    for bad in (tmp_path / "pipe", tmp_path / "d"):
        line = _refused(["bench", "quality", "--merge", str(bad), "--json", str(tmp_path / "m.json")], capsys,
                        "bench quality")
        assert f"--merge {bad} is not a regular file" in line


def test_bench_converted_refuses_a_gate_float32_cannot_hold_before_loading(capsys, nothing_runs):
    line = _refused(["bench", "converted", "--gate-init", "1e39"], capsys, "bench converted")
    assert "--gate-init" in line


def test_bench_models_names_hidden_and_heads_that_do_not_divide(capsys, nothing_runs):
    line = _refused(["bench", "models", "--hidden", "15", "--heads", "2", "--seq-lens", "64"], capsys, "bench models")
    assert "--hidden (15) must be divisible by --heads (2)" in line


def test_bench_quality_merge_refuses_rows_counted_twice(tmp_path, capsys, nothing_runs):
    a = _quality_result(tmp_path / "a.json")
    copy = _quality_result(tmp_path / "copy.json")
    out = tmp_path / "m.json"
    line = _refused(["bench", "quality", "--merge", a, str(tmp_path / "." / "a.json"), "--json", str(out)], capsys,
                    "bench quality")
    assert "is given twice" in line
    line = _refused(["bench", "quality", "--merge", a, copy, "--json", str(out)], capsys, "bench quality")
    assert f"--merge {copy}: model 'bsbr' is also in {a}" in line
    assert not out.exists()


def test_bench_quality_merge_names_the_settings_that_differ(tmp_path, capsys, nothing_runs):
    a = _quality_result(tmp_path / "a.json", seed=0)
    b = _quality_result(tmp_path / "b.json", models=("standard",), seed=1)
    line = _refused(["bench", "quality", "--merge", a, b, "--json", str(tmp_path / "m.json")], capsys, "bench quality")
    assert f"--merge {b} was run with a different configuration than {a} (seed 0 / 1)" in line


@pytest.mark.parametrize("text, what", [("[1, 2]", "is not a 'bsbr bench quality' result"),
                                        ("{bad", "is not valid JSON"), ("", "is empty"), ("\n", "is empty"),
                                        ('{"benchmark": "quality", "config": {}, "results": 3}', "is a damaged"),
                                        ("damaged", "is a damaged")])
def test_bench_quality_merge_names_a_bad_file(text, what, tmp_path, capsys, nothing_runs):
    good = _quality_result(tmp_path / "good.json", models=("linear",))
    bad = tmp_path / "bad.json"
    bad.write_text(text)
    if text == "damaged":  # a setting missing (the plot's title failed on it: "internal error"), or a string
        for config in ({k: v for k, v in json.loads(Path(good).read_text())["config"].items() if k != "steps"},
                       dict(json.loads(Path(good).read_text())["config"], seq_len="64")):
            bad.write_text(json.dumps(dict(json.loads(Path(good).read_text()), config=config)))
            line = _refused(["bench", "quality", "--merge", good, str(bad), "--plot", str(tmp_path / "m.png")],
                            capsys, "bench quality")
            assert f"--merge {bad} is a damaged" in line
        return
    line = _refused(["bench", "quality", "--merge", good, str(bad), "--json", str(tmp_path / "m.json")], capsys,
                    "bench quality")
    assert f"--merge {bad} {what}" in line
    assert not (tmp_path / "m.json").exists()


def test_bench_quality_merges_results_of_different_models(tmp_path, capsys):
    a = _quality_result(tmp_path / "a.json", models=("bsbr",))
    b = _quality_result(tmp_path / "b.json", models=("sliding_window",))
    out = tmp_path / "m.json"
    assert main(["bench", "quality", "--merge", a, b, "--json", str(out)]) == 0
    merged = json.loads(out.read_text())
    assert [r["model"] for r in merged["results"]] == ["bsbr", "sliding_window"]
    assert merged["config"]["merged_from"] == [a, b] and len(merged["comparison"]) == 1
    assert merged["machine"] == {"cpu": "test cpu", "torch": "2.13"}  # both ran on it
    c = _quality_result(tmp_path / "c.json", models=("standard",))  # (a merge merged again: its merged_from is
    again = tmp_path / "again.json"  # no setting of the runs)
    assert main(["bench", "quality", "--merge", str(out), c, "--json", str(again)]) == 0
    assert [r["model"] for r in json.loads(again.read_text())["results"]] == ["bsbr", "sliding_window", "standard"]


def test_bench_quality_refuses_a_split_just_one_window_long_in_one_line(monkeypatch):
    # a window is seq_len + 1 bytes drawn from inside a split: one exactly that long has no room (randint failed)
    import torch

    from bsbr.errors import UserError

    monkeypatch.setattr(bench_quality, "load_corpus", lambda root=None: (torch.zeros(33, dtype=torch.long),
                                                                         torch.zeros(1000, dtype=torch.long), 2))
    with pytest.raises(UserError, match="--seq-len 32 does not fit the standard library: its train and held-out "
                                        "splits hold 33 and 1,000 bytes; give a --seq-len below 32"):
        bench_quality.run_quality(["bsbr"], chunk_size=8, hidden=16, layers=1, heads=2, ff_dim=16, seq_len=32, batch=1,
                                  steps=1, eval_windows=1, progress=False)


def test_bench_quality_merges_a_corpus_recorded_relative_with_its_real_path(tmp_path, capsys, monkeypatch):
    # a result recorded its corpus as given (relative); one of this version, by real path: they did not merge
    monkeypatch.chdir(tmp_path)
    (tmp_path / "qc").mkdir()
    a = _quality_result(tmp_path / "a.json", models=("bsbr",), corpus="qc")
    b = _quality_result(tmp_path / "b.json", models=("sliding_window",), corpus=str(tmp_path / "qc"))
    assert main(["bench", "quality", "--merge", a, b, "--json", str(tmp_path / "m.json")]) == 0, capsys.readouterr().err


def test_bench_quality_merges_results_bsbr_0_2_0_wrote(tmp_path, capsys):
    """bsbr 0.2.0 named the chunk size "block" in its results (the stored study's runs): they still merge."""
    stored = Path(__file__).resolve().parents[2] / "docs" / "scaling"
    a, c = str(stored / "quality_a.json"), str(stored / "quality_c.json")
    assert "block" in json.loads(Path(a).read_text())["config"]
    out = tmp_path / "m.json"
    assert main(["bench", "quality", "--merge", a, c, "--json", str(out)]) == 0
    merged = json.loads(out.read_text())
    assert merged["config"]["chunk_size"] == 64 and "block" not in merged["config"]
    assert len(merged["results"]) == 7 and merged["comparison"]
    # a retired BSBR model of the study (bsbr_topk2) lost its comparison with the window the merged study holds
    b = str(stored / "quality_b.json")
    assert main(["bench", "quality", "--merge", a, b, c, "--json", str(tmp_path / "all.json")]) == 0
    stored_comparison = json.loads((stored / "quality.json").read_text())["comparison"]
    assert sorted((r["bsbr_model"], r["difference"]) for r in json.loads((tmp_path / "all.json").read_text())[
        "comparison"]) == sorted((r["bsbr_model"], r["difference"]) for r in stored_comparison)


def test_bench_quality_merge_keeps_each_runs_machine(tmp_path):
    a = _quality_result(tmp_path / "a.json", models=("bsbr",), machine={"cpu": "one"})
    b = _quality_result(tmp_path / "b.json", models=("sliding_window",), machine={"cpu": "two"})
    out = tmp_path / "m.json"
    assert main(["bench", "quality", "--merge", a, b, "--json", str(out)]) == 0
    assert json.loads(out.read_text())["machine"] == [{"cpu": "one"}, {"cpu": "two"}]
    old = tmp_path / "old.json"  # a result written before the machine was recorded: unknown, not the other's
    old.write_text(json.dumps({k: v for k, v in json.loads(open(a).read()).items() if k != "machine"}))
    assert main(["bench", "quality", "--merge", str(old), b, "--json", str(out)]) == 0
    assert json.loads(out.read_text())["machine"] == [None, {"cpu": "two"}]


@pytest.mark.parametrize("command, flag, values", [
    ("attention", "--seq-lens", ["64", "64"]), ("models", "--seq-lens", ["64", "128", "64"]),
    ("models", "--models", ["bsbr", "bsbr"]), ("converted", "--seq-lens", ["64", "64"]),
    ("converted", "--decode-contexts", ["32", "32"]), ("quality", "--models", ["gau", "gau"]),
])
def test_bench_refuses_a_list_value_given_twice(command, flag, values, tmp_path, capsys, nothing_runs):
    out = tmp_path / "r.json"
    argv = _argv(command, flag, *values, "--json", str(out))
    line = _refused(argv, capsys, f"bench {command}")
    assert f"{flag} {values[0]} is given twice: give each value once" in line and not out.exists()


@pytest.mark.parametrize("command", ["attention", "models", "quality"])
@pytest.mark.parametrize("seed", ["99999999999999999999999", "4294967296", "-1"])
def test_bench_refuses_a_seed_torch_cannot_take(command, seed, capsys, nothing_runs):
    # torch's CPU generator keeps a seed's low 32 bits: 2 ** 32 ran as seed 0
    line = _refused(["bench", command, *COMMANDS[command], "--seed", seed], capsys, f"bench {command}")
    assert f"--seed: must be an integer from 0 to 4,294,967,295, got {seed}" in line


@pytest.mark.parametrize("case, what", [("dir", "is a directory, not a wheel file"), ("missing", "does not exist"),
                                        ("text", "is not a wheel (zip) file"),
                                        ("zip", "has no bsbr/bsbr.py: it is not the bsbr 0.1.1 wheel"),
                                        ("this version's",
                                         "is not the bsbr 0.1.1 wheel (it holds bsbr-0.2.0.dist-info)")])
def test_bench_attention_names_a_bad_earlier_wheel(case, what, tmp_path, capsys, nothing_runs):
    import zipfile

    path = tmp_path / case
    if case == "dir":
        path.mkdir()
    elif case == "text":
        path.write_text("not a zip\n")
    elif case == "zip":
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("other/x.py", "")
    elif case != "missing":  # this library's own wheel has a bsbr/bsbr.py too (a shim that failed to load alone)
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("bsbr/bsbr.py", "from .layers import BSBRAttention\n")
            zf.writestr("bsbr-0.2.0.dist-info/METADATA", "")
    line = _refused(["bench", "attention", *COMMANDS["attention"], "--earlier-wheel", str(path)], capsys,
                    "bench attention")
    assert f"--earlier-wheel {path} {what}: give the file bsbr-0.1.1-py3-none-any.whl" in line
    # (a plain `pip download bsbr==0.1.1 --no-deps` finds nothing below Python 3.12, which the wheel declares)
    assert "pip download bsbr==0.1.1 --no-deps --only-binary=:all: --python-version 3.12" in line


@pytest.mark.parametrize("case, what", [("missing", "does not exist"), ("file", "is a file, not a directory"),
                                        ("empty", "has 0 train and 0 held-out .py files")])
def test_bench_quality_names_a_bad_corpus(case, what, tmp_path, monkeypatch, capsys):
    def trains(*a, **k):
        raise AssertionError("trained before --corpus was checked")

    monkeypatch.setattr(bench_quality, "train_and_eval", trains)
    path = tmp_path / case
    if case == "file":
        path.write_text("x = 1\n")
    elif case == "empty":
        path.mkdir()
    line = _refused(["bench", "quality", *COMMANDS["quality"], "--corpus", str(path)], capsys, "bench quality")
    assert f"--corpus {path} {what}" in line, line
    assert line.endswith("add .py files to it (each goes to one split by a hash of its path)" if case == "empty" else
                         "give a directory of .py files (or leave out --corpus: the standard library)"), line


@pytest.mark.parametrize("option", [["--steps", "999"], ["--models", "gau"], ["--seed", "0"], ["--lr", "0.1"],
                                    ["--corpus", "x"], ["--threads", "2"], ["--hidden", "16"]])
def test_bench_quality_merge_refuses_the_training_options(option, tmp_path, capsys, nothing_runs):
    a = _quality_result(tmp_path / "a.json")
    out = tmp_path / "out.json"
    line = _refused(["bench", "quality", "--merge", a, *option, "--json", str(out)], capsys, "bench quality")
    assert f"{option[0]} is not used with --merge" in line and f"drop {option[0]}" in line and not out.exists()


@pytest.mark.parametrize("command, argv, flag, what", [
    ("attention", ["--model-scaling", "--earlier-wheel", "w"], "--earlier-wheel", "is not used with --model-scaling"),
    ("attention", ["--model-scaling", "--warmup", "1"], "--warmup", "is not used with --model-scaling"),
    ("attention", ["--model-scaling", "--max-seconds", "5"], "--max-seconds", "is not used with --model-scaling"),
    ("attention", ["--model-scaling", "--skip-core"], "--skip-core", "is not used with --model-scaling"),
    ("attention", ["--model-scaling", "--max-standard-len", "9"], "--max-standard-len", "is not used with"),
    ("attention", ["--layers", "2"], "--layers", "applies to --model-scaling only"),
    ("attention", ["--vocab", "50"], "--vocab", "applies to --model-scaling only"),
    ("attention", ["--ff-dim", "64"], "--ff-dim", "applies to --model-scaling only"),
    ("attention", ["--max-earlier-len", "64"], "--max-earlier-len", "applies to --earlier-wheel only"),
    ("models", ["--no-train", "--model-budget", "5"], "--model-budget", "caps the train steps, which --no-train skips"),
    ("converted", ["--decode-contexts", "--decode-steps", "2"], "--decode-steps", "applies to --decode-contexts"),
])
def test_bench_refuses_an_option_it_would_ignore(command, argv, flag, what, tmp_path, capsys, nothing_runs):
    out = tmp_path / "r.json"
    line = _refused(_argv(command, *argv, "--json", str(out)), capsys, f"bench {command}")
    assert f"{flag} {what}" in line and not out.exists()


def test_a_plot_that_fails_leaves_no_new_json(tmp_path, monkeypatch, capsys):
    """The JSON and the plot are one set: a plot that fails after the run leaves the old JSON as it was."""
    (tmp_path / "r.json").write_text('{"old": 1}\n')

    def broken(*a, **k):
        raise RuntimeError("the plot failed")

    monkeypatch.setattr(bench_attention, "plot_rows", broken)
    argv = ["bench", "attention", *COMMANDS["attention"], "--skip-core", "--threads", "1", "--json",
            str(tmp_path / "r.json"), "--plot", str(tmp_path / "r.png")]
    assert main(argv) != 0
    assert (tmp_path / "r.json").read_text() == '{"old": 1}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]
    monkeypatch.undo()
    assert main(argv) == 0
    assert json.loads((tmp_path / "r.json").read_text()) != {"old": 1} and (tmp_path / "r.png").is_file()


def _small_corpus(root):
    """A --corpus with one train and one held-out file (the split is a hash of each path)."""
    from bsbr.corpus import split_of

    root.mkdir()
    names = {split_of(f"m{i}.py"): f"m{i}.py" for i in range(40)}
    for name in (names["train"], names["heldout"]):
        (root / name).write_text("def f(x):\n    return x + 1\n" * 40)
    return root, names["train"]


def test_bench_quality_refuses_a_json_inside_its_corpus(tmp_path, capsys, nothing_runs):
    root, train = _small_corpus(tmp_path / "corp")
    before = tree_hash(root)
    line = _refused(["bench", "quality", *COMMANDS["quality"], "--corpus", str(root), "--json", str(root / train)],
                    capsys, "bench quality")
    assert "--json" in line and "--corpus" in line and tree_hash(root) == before


def test_bench_quality_refuses_a_seq_len_longer_than_its_corpus(tmp_path, monkeypatch, capsys):
    def trains(*a, **k):
        raise AssertionError("trained with windows that do not fit")

    monkeypatch.setattr(bench_quality, "train_and_eval", trains)
    root, _ = _small_corpus(tmp_path / "corp")
    argv = _argv("quality", "--corpus", str(root), "--seq-len", "20000")
    line = _refused(argv, capsys, "bench quality")
    assert "--seq-len 20,000 does not fit --corpus" in line and "give a --seq-len below 1,0" in line


def test_bench_quality_refuses_a_diverged_run(tmp_path, capsys):
    root, _ = _small_corpus(tmp_path / "corp")
    out = tmp_path / "r.json"
    argv = _argv("quality", "--seq-len", "32", "--chunk-size", "16", "--models", "bsbr", "--corpus", str(root),
                 "--lr", "1e30", "--json", str(out))
    assert main(argv) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]  # (after the training's progress bar)
    assert "bsbr bench quality: error: bsbr diverged" in line and "give a smaller --lr" in line and not out.exists()


def test_benchmarks_run_on_one_thread_unless_told(monkeypatch):
    """Side-by-side ratios at torch's default two threads swung with any other load on a 2-core machine
    (docs/findings.md, Speed): one thread unless --threads says otherwise."""
    import argparse

    import torch

    from bsbr.bench.common import set_threads

    got = []
    monkeypatch.setattr(torch, "set_num_threads", got.append)
    set_threads(argparse.Namespace(threads=None))
    set_threads(argparse.Namespace(threads=3))
    assert got == [1, 3]


@pytest.mark.parametrize("command", ["models", "quality"])
@pytest.mark.parametrize("hidden, heads, what", [("12", "4", "--hidden (12) / --heads (4) gives a head size of 3, "
                                                               "which must be even"),
                                                 ("10", "3", "--hidden (10) must be divisible by --heads (3)")])
def test_bench_names_hidden_and_heads_that_give_no_head_size(command, hidden, heads, what, capsys, nothing_runs):
    line = _refused(_argv(command, "--hidden", hidden, "--heads", heads), capsys, f"bench {command}")
    assert what in line


def test_bench_attention_model_scaling_names_hidden_and_heads_that_give_an_odd_head_size(capsys, nothing_runs):
    line = _refused(_argv("attention", "--model-scaling", "--hidden", "12", "--heads", "4"), capsys, "bench attention")
    assert "--hidden (12) / --heads (4) gives a head size of 3, which must be even" in line


def test_bench_quality_refuses_a_compared_pair_as_long_as_the_window(capsys, nothing_runs):
    # both models of such a pair are full attention: the run printed "BSBR NOT better, diff +nan" and exited 0
    line = _refused(_argv("quality", "--models", "bsbr", "sliding_window", "--seq-len", "64", "--chunk-size", "64"), capsys,
                    "bench quality")
    assert "bsbr and sliding_window read chunks of 64 tokens, at least --seq-len 64" in line
    assert "give a smaller --chunk-size or a longer --seq-len" in line
    line = _refused(_argv("quality", "--models", "bsbr_chunk128", "sliding_window_128", "--seq-len", "128",
                          "--chunk-size", "32"), capsys, "bench quality")  # a fixed pair: --chunk-size does not help
    assert "bsbr_chunk128 and sliding_window_128 read chunks of 128 tokens" in line and "a --seq-len above 128" in line


def test_bench_quality_runs_a_pair_shorter_than_the_window_whatever_block(monkeypatch, capsys):
    # the models compared do not use --chunk-size: the default chunk 64 at --seq-len 64 must not refuse them
    ran = []
    monkeypatch.setattr(bench_quality, "run_quality", lambda **kw: ran.append(kw) or (_ for _ in ()).throw(KeyboardInterrupt))
    main(_argv("quality", "--models", "bsbr_chunk32", "sliding_window_32", "--seq-len", "64"))  # (stopped there)
    assert ran and ran[0]["models"] == ["bsbr_chunk32", "sliding_window_32"]


def test_bench_quality_merge_refuses_a_result_without_models(tmp_path, capsys, nothing_runs):
    empty = _quality_result(tmp_path / "empty.json", models=())
    out, png = tmp_path / "m.json", tmp_path / "m.png"
    line = _refused(["bench", "quality", "--merge", empty, "--json", str(out), "--plot", str(png)], capsys,
                    "bench quality")
    assert f"--merge {empty} holds no model results" in line and not out.exists() and not png.exists()


def test_bench_converted_takes_gate_init_as_convert_does(monkeypatch):
    # the same type as `bsbr convert --gate-init`: 'none' (no gate) was refused as "invalid number"
    seen = []
    monkeypatch.setattr(bench_converted, "cmd", lambda args: seen.append(args.gate_init) or 0)
    assert main(_argv("converted", "--gate-init", "none")) == 0 and main(_argv("converted")) == 0
    assert seen == [None, 0.0]


def test_bench_converted_refuses_a_chunk_size_past_the_window_cap_before_loading(capsys, nothing_runs):
    line = _refused(_argv("converted", "--chunk-size", "524289"), capsys, "bench converted")
    assert "--local-chunks must be at most 1 with --chunk-size 524,289" in line and "local_chunks" not in line


@pytest.mark.parametrize("extra, message", [
    (("--recall-tokens", "4", "--retrieval-blocks", "2"), "--recall-tokens and --retrieval-blocks are exclusive"),
    (("--far-positions", "window"), "--far-positions places rotary positions, but the --gpt2-small-random source "
                                    "has learned positions"),
    (("--retrieval", "normalized", "--feature-map", "identity"),
     "--retrieval normalized needs the non-negative --feature-map hedgehog"),
])
def test_bench_converted_refuses_conversion_flags_as_convert_does_before_loading(extra, message, capsys, nothing_runs):
    line = _refused(_argv("converted", *extra), capsys, "bench converted")
    assert message in line


def test_quality_refuses_a_model_it_cannot_build_before_any_model_trains(capsys, monkeypatch, tmp_path):
    # bsbr_compressed4 (a head size of 6 is not divisible by its factor 4) was refused after standard had trained
    import bsbr.bench.quality as quality

    def trains(*a, **k):
        raise AssertionError("a model trained before the refusal")

    monkeypatch.setattr(quality, "train_and_eval", trains)
    out = tmp_path / "q.json"
    line = _refused(["bench", "quality", "--models", "standard", "bsbr_compressed4", "--hidden", "12", "--heads", "2",
                     "--steps", "2", "--seq-len", "40", "--chunk-size", "16", "--json", str(out)], capsys,
                    "bench quality")
    assert "--models bsbr_compressed4 cannot be built with --hidden 12 and --heads 2" in line, line
    assert not out.exists()


@pytest.mark.parametrize("command", ["attention", "models"])
def test_a_bench_that_measured_nothing_exits_2_and_writes_nothing(command, tmp_path, capsys, monkeypatch):
    # every row failed (out of memory at a length too long for the machine): exit 0, a JSON of no measurement and
    # an empty plot (with matplotlib's warning of a legend without labels)
    from bsbr.bench import layers

    def out_of_memory(*a, **k):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes")

    monkeypatch.setattr(layers if command == "attention" else bench_models, "measure_peak", out_of_memory)
    argv = _argv(command, "--json", str(tmp_path / "r.json"), "--plot", str(tmp_path / "r.png"),
                 *(["--skip-core"] if command == "attention" else ["--no-train"]))
    line = _refused(argv, capsys, f"bench {command}")
    assert "nothing was measured: every row failed or was skipped" in line and "give shorter --seq-lens" in line
    assert not list(tmp_path.iterdir())

    def fault(*a, **k):  # (not the lengths: shorter ones would not help)
        raise TypeError("unsupported operand type(s) for +: 'int' and 'str'")

    monkeypatch.setattr(layers if command == "attention" else bench_models, "measure_peak", fault)
    assert main(argv) == 1
    line = one_error_line(capsys.readouterr().err, f"bench {command}")
    assert "internal error RuntimeError: nothing was measured" in line and "TypeError" in line
    assert "shorter" not in line and not list(tmp_path.iterdir())
    if command == "attention":  # the core op's rows are a measurement: with them the run is written
        monkeypatch.setattr(layers, "measure_peak", out_of_memory)
        assert main([a for a in argv if a != "--skip-core"]) == 0
        assert json.loads((tmp_path / "r.json").read_text())["core"]["rows"] and (tmp_path / "r.png").is_file()
