"""bsbr eval refuses, in one line and before loading any model, what it cannot do safely: outputs that are
(or lie inside) an input, outputs that collide with each other (the heat map's data beside it too), plot
names without a figure format, a bad --lm-eval-task-dir, flags it would ignore, a broken conversion.json,
a --seq-len shorter than the model's chunk allows."""
import json

import pytest
from cli_checks import one_error_line
from model_sources import make_source

from bsbr.cli import main
from bsbr.convert import convert_to_bsbr

CHUNK = 16
STORY = "The fox ran over the hill. It was a bright and windy day in the valley.\n"
PASSKEY = ["--passkey-lengths", "96", "--passkey-depths", "0.5", "--passkey-trials", "1", "--passkey-filler", "classic",
           "--passkey-new-tokens", "2"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory, word_tokenizer):
    root = tmp_path_factory.mktemp("saved")
    src = make_source("llama")
    src.save_pretrained(root / "ref")
    convert_to_bsbr(src, chunk_size=CHUNK).save_pretrained(root / "conv")
    word_tokenizer.save_pretrained(root / "conv")
    (root / "text.py").write_text("def f ( x ) :\n    return x + y\n" * 40)
    (root / "story.txt").write_text(STORY)
    return root


@pytest.fixture
def no_loading(monkeypatch):
    """Any model or tokenizer loading fails the test: a refusal must come before it."""
    def loaded(*args, **kwargs):
        raise AssertionError("a model was loaded before the refusal")

    monkeypatch.setattr("bsbr.evaluate.saved.load_saved_models", loaded)
    monkeypatch.setattr("bsbr.evaluate.cli.load_eval_tokenizer", loaded)


def _snapshot(root):
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _refused(capsys, argv, *words):
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    line = one_error_line(err, "eval")
    for w in words:
        assert w in line, line
    return line


def _base(saved, *extra):
    return ["eval", str(saved / "conv"), "--reference", str(saved / "ref"), "--text-file", str(saved / "text.py"),
            "--seq-len", "40", "--max-windows", "1", "--no-progress", *extra]


@pytest.mark.parametrize("option,target", [("--json", "conv/config.json"), ("--json", "text.py"),
                                           ("--plot", "ref/plot.png"), ("--json", "conv"),
                                           ("--passkey-plot", "story.txt")])
def test_outputs_may_not_overwrite_inputs(saved, capsys, no_loading, option, target):
    before = _snapshot(saved)
    extra = ["--passkey-filler", str(saved / "story.txt")] + PASSKEY[:6] if option == "--passkey-plot" \
        else ["--no-passkey"]
    _refused(capsys, _base(saved, *extra, option, str(saved / target)), option)
    assert _snapshot(saved) == before


def test_heatmap_data_may_not_replace_the_results_json(saved, tmp_path, capsys, no_loading):
    """--passkey-plot d/res.png puts the heat map's data at d/res.json: the --json file."""
    out = tmp_path / "pk"
    _refused(capsys, _base(saved, *PASSKEY, "--json", str(out / "res.json"), "--passkey-plot", str(out / "res.png")),
             "--json", "--passkey-plot", str(out / "res.json"))
    # --passkey-only: --plot is the heat map itself, its data beside it
    _refused(capsys, ["eval", str(saved / "conv"), "--passkey-only", *PASSKEY, "--json", str(out / "r.json"),
                      "--plot", str(out / "r.png")], "--json", "--plot")
    assert not out.exists()


def test_json_and_plot_may_not_be_one_file(saved, tmp_path, capsys, no_loading):
    same = tmp_path / "ev" / "same.png"
    _refused(capsys, _base(saved, "--no-passkey", "--json", str(same), "--plot", str(same)), "--plot", "--json")
    assert not same.parent.exists()


@pytest.mark.parametrize("option", ["--plot", "--passkey-plot"])
def test_plot_format_is_checked_before_any_work(saved, tmp_path, capsys, no_loading, option):
    out = tmp_path / "r.json"
    _refused(capsys, _base(saved, *PASSKEY, "--json", str(out), option, str(tmp_path / "x.txt")), option, ".png")
    assert not out.exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize("where,words", [("conv", ["overlaps the MODEL"]), ("conv/task", ["overlaps the MODEL"]),
                                         (".", ["overlaps the MODEL"]), ("story.txt", ["is a file"])])
def test_lm_eval_task_dir_may_not_touch_inputs(saved, capsys, no_loading, where, words):
    before = _snapshot(saved)
    _refused(capsys, ["eval", str(saved / "conv"), "--lm-eval-task-dir", str(saved / where), *PASSKEY],
             "--lm-eval-task-dir", *words)
    assert _snapshot(saved) == before


def test_lm_eval_task_dir_is_written_whole(saved, tmp_path, capsys, monkeypatch, word_tokenizer):
    """A failure while building the prompts leaves no task directory; a rerun into an existing one
    replaces the task's files and leaves the others."""
    class Failing:
        def __init__(self):
            self.calls = 0

        def __getattr__(self, name):
            return getattr(word_tokenizer, name)

        def __call__(self, *args, **kwargs):
            return word_tokenizer(*args, **kwargs)

        def decode(self, *args, **kwargs):
            self.calls += 1
            if self.calls > 1:
                raise ValueError("decode failed")
            return word_tokenizer.decode(*args, **kwargs)

    task = tmp_path / "task"
    argv = ["eval", str(saved / "conv"), "--lm-eval-task-dir", str(task), "--passkey-lengths", "96",
            "--passkey-depths", "0.2", "0.8", "--passkey-trials", "1"]
    monkeypatch.setattr("bsbr.evaluate.cli.load_eval_tokenizer", lambda *a, **k: Failing())
    _refused(capsys, argv, "decode failed")
    assert not task.exists() and not list(tmp_path.iterdir())
    monkeypatch.undo()
    task.mkdir()
    (task / "notes.txt").write_text("mine")
    (task / "bsbr_passkey.jsonl").write_text("old")
    assert main(argv) == 0
    assert sorted(p.name for p in task.iterdir()) == ["bsbr_passkey.jsonl", "bsbr_passkey.yaml",
                                                      "bsbr_passkey_utils.py", "notes.txt"]
    assert (task / "notes.txt").read_text() == "mine"
    assert len([json.loads(x) for x in (task / "bsbr_passkey.jsonl").read_text().splitlines()]) == 2


@pytest.mark.parametrize("extra,words", [
    (["--dataset-config", "foo"], ["--dataset-config foo", "--dataset"]),
    (["--dataset-split", "validation"], ["--dataset-split", "--dataset"]),
    (["--text-column", "body"], ["--text-column", "--dataset"]),
    (["--lm-eval-task-dir", "T", "--json", "r.json"], ["--json", "--lm-eval-task-dir"]),
    (["--no-passkey", "--passkey-plot", "p.png"], ["--passkey-plot", "--no-passkey"]),
    (["--passkey-only", "--plot", "a.png", "--passkey-plot", "b.png"], ["--plot", "--passkey-plot"]),
])
def test_flags_that_would_be_ignored_are_refused(saved, tmp_path, capsys, no_loading, monkeypatch, extra, words):
    monkeypatch.chdir(tmp_path)
    _refused(capsys, ["eval", str(saved / "conv"), *extra], *words)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("content,words", [("[1]", ["JSON list"]), ("{x", ["not valid JSON"])])
def test_broken_conversion_record_is_one_line(saved, tmp_path, capsys, no_loading, content, words):
    model = tmp_path / "conv"
    model.mkdir()
    for p in (saved / "conv").iterdir():
        (model / p.name).write_bytes(p.read_bytes())
    (model / "conversion.json").write_text(content)
    argv = ["eval", str(model), "--reference", str(saved / "ref"), "--text-file", str(saved / "text.py"),
            "--seq-len", "40", "--max-windows", "1", "--no-passkey", "--no-progress"]
    _refused(capsys, argv, str(model / "conversion.json"), *words)


@pytest.mark.parametrize("seq_len", ["1", str(CHUNK), str(CHUNK + 1)])
def test_seq_len_is_checked_against_the_chunk_before_loading(saved, capsys, no_loading, seq_len):
    argv = _base(saved, "--no-passkey")
    argv[argv.index("--seq-len") + 1] = seq_len
    _refused(capsys, argv, f"--seq-len {seq_len}", f"chunk size {CHUNK}", f"at least {CHUNK + 2}")
