"""bsbr eval refuses, in one line and before loading any model, what it cannot do safely: outputs that are
(or lie inside) an input, outputs that collide with each other (the heat map's data beside it too), files
derived from an option that bsbr eval did not write, plot names without a figure format, a bad
--lm-eval-task-dir, flags it would ignore, repeated list values, a broken conversion.json, a --seq-len
shorter than the model's chunk allows, pass-key lengths past the token cap. Its result files are written
as one set, or not at all."""
import importlib.util
import json
import os

import pytest
from cli_checks import one_error_line
from model_sources import make_source

from bsbr.cli import main
from bsbr.convert import convert_to_bsbr
from bsbr.errors import UserError
from bsbr.ops.bsbr.options import MAX_TOKENS

CHUNK = 16
STORY = "The fox ran over the hill. It was a bright and windy day in the valley.\n"
PASSKEY = ["--passkey-lengths", "96", "--passkey-depths", "0.5", "--passkey-trials", "1", "--passkey-filler", "classic",
           "--passkey-new-tokens", "5"]


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


def test_code_of_the_references_tokenizer_is_said_once_its_tokenizer_is_used(saved, tmp_path, word_tokenizer,
                                                                              caplog):
    # MODEL without tokenizer files reads with the reference's: the warning that the reference's tokenizer code
    # never runs was lost when it moved to where a model argument's tokenizer loads
    import shutil

    ref, model, marker = tmp_path / "ref", tmp_path / "model", tmp_path / "ran"
    shutil.copytree(saved / "ref", ref)
    word_tokenizer.save_pretrained(ref)
    cfg = json.loads((ref / "tokenizer_config.json").read_text())
    (ref / "tokenizer_config.json").write_text(json.dumps(dict(cfg, auto_map={"AutoTokenizer": [
        None, "tokenization_my.MyTokenizer"]})))
    (ref / "tokenization_my.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    shutil.copytree(saved / "conv", model)
    for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json"):
        (model / name).unlink(missing_ok=True)
    with caplog.at_level("WARNING"):
        assert main(["eval", str(model), "--reference", str(ref), "--text-file", str(saved / "text.py"), "--seq-len",
                     "40", "--max-windows", "1", "--no-passkey", "--no-progress"]) == 0
    assert caplog.text.count(f"--reference {ref}: its tokenizer_config.json names code of its own "
                             "(tokenization_my.py), which bsbr never runs") == 1 and not marker.exists()
    # the BSBR model alone evaluated (the reference model not loaded: --passkey-only --passkey-models bsbr)
    from bsbr.evaluate.baselines import load_saved_models
    from bsbr.notes import occasion

    caplog.clear()
    with caplog.at_level("WARNING"), occasion():
        load_saved_models(model, reference=str(ref), only={"bsbr"})
    assert f"--reference {ref}: its tokenizer_config.json names code of its own" in caplog.text


def test_a_corpus_too_small_for_one_window_is_refused_before_any_model_loads(saved, tmp_path, capsys, monkeypatch):
    # enough bytes for the file check, too few tokens: refused after loading the model and its reference twice
    def loaded(*args, **kwargs):
        raise AssertionError("a model was loaded before the refusal")

    monkeypatch.setattr("bsbr.evaluate.saved.load_saved_models", loaded)
    (tmp_path / "one_word.txt").write_text("a" * 200 + "\n")
    _refused(capsys, ["eval", str(saved / "conv"), "--reference", str(saved / "ref"), "--no-passkey", "--seq-len", "40",
                      "--text-file", str(tmp_path / "one_word.txt")], "the corpus has only", "one window of 40")


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
    """The command on the saved models; ``extra``'s --text-file replaces the default one (a list option is given once)."""
    text = [] if "--text-file" in extra else ["--text-file", str(saved / "text.py")]
    return ["eval", str(saved / "conv"), "--reference", str(saved / "ref"), *text,
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


def test_a_derived_file_a_user_wrote_is_refused_naming_the_option_it_is_derived_from(saved, tmp_path, capsys,
                                                                                     no_loading):
    (tmp_path / "res.passkey.json").write_text('{"mine": 1}')
    _refused(capsys, _base(saved, *PASSKEY, "--plot", str(tmp_path / "res.png")),
             f"--plot {tmp_path / 'res.png'} puts the pass-key data at {tmp_path / 'res.passkey.json'}")
    assert (tmp_path / "res.passkey.json").read_text() == '{"mine": 1}'


def test_without_pass_keys_the_files_they_would_write_are_not_checked(saved, tmp_path, capsys):
    for mine in ("res.passkey.json", "res.passkey.png"):
        (tmp_path / mine).write_text("mine")
    assert main(_base(saved, "--no-passkey", "--json", str(tmp_path / "res.json"))) == 0, capsys.readouterr().err
    assert (tmp_path / "res.json").is_file()
    assert all((tmp_path / mine).read_text() == "mine" for mine in ("res.passkey.json", "res.passkey.png"))


def test_results_may_not_replace_a_filler_file_that_holds_json(saved, tmp_path, capsys, no_loading):
    notes = tmp_path / "notes.json"  # (JSON, so it passes for a result file that may be replaced)
    notes.write_text(json.dumps([" ".join(["The quiet river ran past the old stone mill at dawn."] * 40)]))
    before = notes.read_text()
    _refused(capsys, _base(saved, "--passkey-lengths", "96", "--passkey-depths", "0.5", "--passkey-trials", "1",
                           "--passkey-new-tokens", "5", "--passkey-filler", str(notes), "--json", str(notes)),
             "would overwrite the --passkey-filler")
    assert notes.read_text() == before


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


@pytest.mark.parametrize("extra", [["--reference", "src"], ["--force"]])
def test_lm_eval_task_dir_refuses_a_reference_it_would_ignore(saved, tmp_path, capsys, no_loading, extra):
    # the task is written with MODEL's own tokenizer (the one lm-eval loads): --reference was silently unused
    task = tmp_path / "task"
    _refused(capsys, ["eval", str(saved / "conv"), "--lm-eval-task-dir", str(task), *PASSKEY, *extra],
             f"{extra[0]} would be ignored with --lm-eval-task-dir")
    assert not task.exists()


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

        def __len__(self):
            return len(word_tokenizer)

        def decode(self, *args, **kwargs):
            self.calls += 1
            if self.calls > 1:
                raise ValueError("decode failed")
            return word_tokenizer.decode(*args, **kwargs)

    task = tmp_path / "task"
    argv = ["eval", str(saved / "conv"), "--lm-eval-task-dir", str(task), "--passkey-lengths", "96",
            "--passkey-depths", "0.2", "0.8", "--passkey-trials", "1"]
    monkeypatch.setattr("bsbr.evaluate.cli.load_tokenizer_arg", lambda *a, **k: Failing())
    _refused(capsys, argv, "decode failed")
    assert not task.exists() and not list(tmp_path.iterdir())
    monkeypatch.undo()
    task.mkdir()
    row = dict.fromkeys(("prompt", "key", "length", "depth", "trial", "filler", "prompt_tokens"), 0)
    (task / "bsbr_passkey.jsonl").write_text(json.dumps(row) + "\n")  # what a previous run (and lm-eval's import) left
    (task / "__pycache__").mkdir()
    (task / "__pycache__" / "bsbr_passkey_utils.cpython-312.pyc").write_bytes(b"pyc")
    assert main(argv) == 0
    assert sorted(p.name for p in task.iterdir()) == ["__pycache__", "bsbr_passkey.jsonl", "bsbr_passkey.yaml",
                                                      "bsbr_passkey_utils.py"]
    assert len([json.loads(x) for x in (task / "bsbr_passkey.jsonl").read_text().splitlines()]) == 2


def test_lm_eval_task_dir_is_locked_while_a_task_is_written_there(saved, tmp_path, capsys):
    # two evals writing one new task folder at once: the second warned of the first's live staging folder as "left
    # by an earlier run that was killed ... remove it", and the first then failed with "tk appeared while writing"
    from bsbr.outputs import output_lock

    task = tmp_path / "task"
    with output_lock(task, "--lm-eval-task-dir"):
        _refused(capsys, ["eval", str(saved / "conv"), "--lm-eval-task-dir", str(task), *PASSKEY],
                 f"--lm-eval-task-dir {task} is being written by another bsbr command")
    assert not task.exists()


@pytest.mark.parametrize("mine", ["notes.txt", "bsbr_passkey_notes.txt", "__pycache__/other.pyc", "sub/x"])
def test_lm_eval_task_dir_with_other_files_is_refused(saved, tmp_path, capsys, no_loading, mine):
    """Only a directory that is missing, empty, or holds a previous task's files is written into."""
    from bsbr.evaluate.lm_eval_task import write_lm_eval_task
    from word_tokenizer import build_word_tokenizer

    task = tmp_path / "task"
    write_lm_eval_task(task, build_word_tokenizer(), lengths=[256], trials=1)  # a previous task
    (task / mine).parent.mkdir(parents=True, exist_ok=True)
    (task / mine).write_text("mine")
    before = _snapshot(task)
    _refused(capsys, ["eval", str(saved / "conv"), "--lm-eval-task-dir", str(task), *PASSKEY],
             "--lm-eval-task-dir", mine.split("/")[0], "move")
    assert _snapshot(task) == before


@pytest.mark.parametrize("name", ["bsbr_passkey.yaml", "bsbr_passkey_utils.py", "bsbr_passkey.jsonl"])
def test_a_users_file_with_a_task_files_name_is_not_replaced(saved, tmp_path, capsys, no_loading, name):
    """A file of the task's names was replaced whatever it held (notes, an edited metric), with exit 0."""
    task = tmp_path / "task"
    argv = ["eval", str(saved / "conv"), "--lm-eval-task-dir", str(task), *PASSKEY]
    assert main(argv) == 0 and main(argv) == 0  # bsbr's own task is replaced
    capsys.readouterr()
    text = (task / name).read_text()
    (task / name).write_text(text.replace("process_results", "my_results") if name.endswith(".py")
                             else "my own notes, not a task\n")
    before = _snapshot(task)
    _refused(capsys, argv, "--lm-eval-task-dir", name, "not the task bsbr eval wrote there", "move")
    assert _snapshot(task) == before


@pytest.mark.parametrize("extra,words", [
    (["--dataset-config", "foo"], ["--dataset-config foo", "--dataset"]),
    (["--dataset-split", "validation"], ["--dataset-split", "--dataset"]),
    (["--text-column", "body"], ["--text-column", "--dataset"]),
    (["--lm-eval-task-dir", "T", "--json", "r.json"], ["--json", "--lm-eval-task-dir"]),
    (["--no-passkey", "--passkey-plot", "p.png"], ["--passkey-plot", "--no-passkey"]),
    (["--passkey-only", "--plot", "a.png", "--passkey-plot", "b.png"], ["--plot", "--passkey-plot"]),
    (["--lm-eval-task-dir", "T", "--no-passkey"], ["--no-passkey", "--lm-eval-task-dir"]),
    (["--text-file", "a.py", "--split", "heldout"], ["--split heldout", "--text-file"]),
    (["--dataset", "x/y", "--split", "train"], ["--split train", "--dataset"]),
    (["--seed", str(2 ** 70)], ["--seed: must be an integer from 0 to 4,294,967,295"]),  # one check of --seed for every command
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


@pytest.mark.parametrize("mode", ["full", "passkey-only", "lm-eval"])
def test_passkey_lengths_past_the_token_cap_are_refused(saved, tmp_path, capsys, no_loading, mode):
    extra = {"full": ["--text-file", str(saved / "text.py"), "--seq-len", "40"], "passkey-only": ["--passkey-only"],
             "lm-eval": ["--lm-eval-task-dir", str(tmp_path / "task")]}[mode]
    _refused(capsys, ["eval", str(saved / "conv"), *extra, "--passkey-lengths", "96", str(MAX_TOKENS + 1)],
             f"--passkey-lengths: must be an integer from 1 to {MAX_TOKENS:,}, got {MAX_TOKENS + 1}")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("extra,words", [
    (["--passkey-lengths", "96", "128", "96"], ["--passkey-lengths 96 is given twice"]),
    (["--passkey-depths", "0.5", "0.50"], ["--passkey-depths 0.5 is given twice"]),
    (["--passkey-depths", "0", "-0"], ["--passkey-depths 0", "is given twice"]),  # (-0 was a depth of its own)
    (["--passkey-models", "bsbr", "source", "bsbr"], ["--passkey-models bsbr is given twice"]),
    (["--passkey-filler", "classic", "--passkey-filler", "classic"], ["--passkey-filler classic is given twice"]),
    (["--passkey-filler", "STORY", "file:STORY"], ["--passkey-filler file:", "is given twice", "story.txt"]),
    (["--text-file", "DIR/text.py", "DIR/./text.py"], ["--text-file", "/./text.py is given twice (as "]),
])
def test_repeated_list_values_are_refused(saved, capsys, no_loading, extra, words):
    extra = [x.replace("STORY", str(saved / "story.txt")).replace("DIR", str(saved)) for x in extra]
    _refused(capsys, _base(saved, *extra), *words)


def test_a_text_file_and_its_hard_link_are_one_file(saved, tmp_path, capsys, no_loading):
    # the text was evaluated twice: only symbolic links and other spellings were caught
    os.link(saved / "text.py", tmp_path / "hard.py")
    _refused(capsys, _base(saved, "--text-file", str(saved / "text.py"), str(tmp_path / "hard.py")),
             "--text-file", "hard.py is given twice (as ", "text.py)")


@pytest.mark.skipif(importlib.util.find_spec("zstandard") is not None, reason="zstandard is installed")
def test_a_compressed_dataset_whose_codec_is_missing_says_what_to_install(tmp_path):
    from bsbr.arguments import check_dataset

    (tmp_path / "zst").mkdir()
    (tmp_path / "zst" / "a.txt.zst").write_bytes(b"\x28\xb5\x2f\xfd" + b"\0" * 20)
    with pytest.raises(UserError, match="not supported: install its package .*pip install zstandard.*decompress it"):
        check_dataset(str(tmp_path / "zst"), None, "train", "text")


def test_a_filler_file_and_a_link_to_it_are_one_filler(saved, tmp_path, capsys, no_loading):
    # they ran as two fillers of one text (keyed by file name)
    (tmp_path / "link.txt").symlink_to(saved / "story.txt")
    _refused(capsys, _base(saved, "--passkey-filler", str(saved / "story.txt"), str(tmp_path / "link.txt")),
             "--passkey-filler", "link.txt is given twice (as ", "story.txt)")


def test_two_filler_files_of_one_name_are_named_as_such(saved, tmp_path, capsys, no_loading):
    # they were refused as "given twice": different texts, one key in the results
    for folder, text in (("a", "The river runs past the old mill. "), ("b", "A small bird sang on the high wall. ")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "f.txt").write_text(text * 40)
    _refused(capsys, _base(saved, "--passkey-filler", str(tmp_path / "a" / "f.txt"), str(tmp_path / "b" / "f.txt")),
             "are two files of one name", "rename or copy one")


def test_filler_that_is_a_directory_or_fifo_says_so(saved, tmp_path, capsys):
    _refused(capsys, _base(saved, "--passkey-filler", str(tmp_path)), "--passkey-filler", "is a directory")
    os.mkfifo(tmp_path / "fifo")
    _refused(capsys, _base(saved, "--passkey-filler", str(tmp_path / "fifo")), "--passkey-filler",
             "not a regular file")


@pytest.mark.parametrize("option,name,derived,content", [
    ("--passkey-plot", "mine.png", "mine.json", '{"mine": 1}\n'),   # the heat map's data beside it
    ("--json", "r.json", "r.passkey.png", "not a figure\n"),          # the heat map beside --json
    ("--json", "r.json", "r.passkey.json", '{"lengths": [1]}\n'),
    ("--plot", "r.png", "r.passkey.json", "[1, 2]\n"),
    ("--plot", "r.png", "r.passkey.png", "a user's PNG"),              # a real image, not eval's heat map
])
def test_derived_files_replace_only_what_eval_wrote(saved, tmp_path, capsys, no_loading, option, name, derived,
                                                     content):
    if content == "a user's PNG":
        from PIL import Image

        Image.new("RGB", (4, 4)).save(tmp_path / derived)
    else:
        (tmp_path / derived).write_text(content)
    before = (tmp_path / derived).read_bytes()
    _refused(capsys, _base(saved, *PASSKEY, option, str(tmp_path / name)), option, str(tmp_path / derived),
             "move it")
    assert [p.name for p in tmp_path.iterdir()] == [derived] and (tmp_path / derived).read_bytes() == before


def test_a_heat_map_an_earlier_bsbr_wrote_is_known_by_the_data_beside_it(tmp_path):
    # heat maps written before 2026-12-02 carry no title: a rerun refused them as "not a pass-key heat map"
    from PIL import Image

    from bsbr.evaluate.cli import _is_passkey_output

    png, data = tmp_path / "e.passkey.png", tmp_path / "e.passkey.json"
    Image.new("RGB", (4, 4)).save(png)
    assert not _is_passkey_output(png)  # (a user's PNG, alone)
    data.write_text(json.dumps({k: [] for k in ("lengths", "depths", "trials", "fillers", "models", "samples")}))
    assert _is_passkey_output(png)
    # beside this bsbr's data (it records its run's config, and its heat map carries a title): a user's PNG
    data.write_text(json.dumps({k: [] for k in ("lengths", "depths", "trials", "fillers", "models", "samples",
                                                "config")}))
    assert _is_passkey_output(data) and not _is_passkey_output(png)
    Image.new("RGB", (4, 4)).save(tmp_path / "x.passkey.gif")
    (tmp_path / "x.passkey.png").write_bytes((tmp_path / "x.passkey.gif").read_bytes())  # (a GIF named .png)
    (tmp_path / "x.passkey.json").write_text(data.read_text())
    assert not _is_passkey_output(tmp_path / "x.passkey.png")


@pytest.mark.slow
def test_result_files_are_written_as_one_set(saved, tmp_path, capsys, monkeypatch):
    """A run that fails or is interrupted while drawing the heat map (the last figure) leaves the
    previous run's four files as they were, and no temporaries or new folders; a rerun replaces them."""
    out = tmp_path / "e"
    argv = _base(saved, *PASSKEY, "--json", str(out / "r.json"), "--plot", str(out / "r.png"))
    assert main(argv) == 0
    names = ["r.json", "r.passkey.json", "r.passkey.png", "r.png"]
    assert sorted(p.name for p in out.iterdir()) == names
    before = _snapshot(tmp_path)

    def fail(error):
        def plot(*args, **kwargs):
            raise error
        return plot

    for error, rc in ((KeyboardInterrupt(), 130), (ValueError("plot failed"), 2)):
        monkeypatch.setattr("bsbr.evaluate.plots.plot_passkey_heatmap", fail(error))
        assert main(argv + ["--seed", "1"]) == rc
        assert main(_base(saved, *PASSKEY, "--json", str(tmp_path / "new" / "sub" / "r.json"))) == rc
        assert _snapshot(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["e"]
        assert sorted(p.name for p in out.iterdir()) == names
    monkeypatch.undo()
    assert main(argv + ["--seed", "1"]) == 0  # the same command again: eval's own files are replaced
    assert sorted(p.name for p in out.iterdir()) == names
    after = _snapshot(tmp_path)
    assert all(after[out / n] != before[out / n] for n in ("r.json", "r.passkey.json"))
    result = json.loads((out / "r.json").read_text())  # (the heat map's data carries the run's record)
    assert dict(config=result["config"], **result["passkey"]) == json.loads((out / "r.passkey.json").read_text())


@pytest.mark.parametrize("mode", ["full", "passkey-only", "lm-eval"])
def test_a_passkey_length_too_short_for_a_prompt_is_refused_before_any_model_runs(saved, tmp_path, capsys,
                                                                                   monkeypatch, mode):
    def loaded(*args, **kwargs):
        raise AssertionError("a model was loaded before the refusal")

    monkeypatch.setattr("bsbr.evaluate.saved.load_saved_models", loaded)
    ref = ["--reference", str(saved / "ref")]
    extra = {"full": [*ref, "--text-file", str(saved / "text.py"), "--seq-len", "40"],
             "passkey-only": [*ref, "--passkey-only"],
             "lm-eval": ["--lm-eval-task-dir", str(tmp_path / "task")]}[mode]
    _refused(capsys, ["eval", str(saved / "conv"), *extra, "--passkey-lengths", "500", "20"],
             "--passkey-lengths: length 20 is too short for a pass-key prompt",
             "(a length above 72 by at least one sentence's tokens has): give longer --passkey-lengths")  # (one "give")
    assert not list(tmp_path.iterdir())


def test_a_window_baseline_the_model_has_not_is_refused_before_loading(saved, tmp_path, capsys, no_loading,
                                                                        word_tokenizer):
    local = tmp_path / "local"
    convert_to_bsbr(make_source("llama"), chunk_size=CHUNK, local_chunks=1, sink_tokens=0,
                    retrieval_blocks=0).save_pretrained(local)
    word_tokenizer.save_pretrained(local)
    _refused(capsys, ["eval", str(local), "--reference", str(saved / "ref"), "--passkey-only", *PASSKEY,
                      "--passkey-models", "bsbr", "window"], "--passkey-models window:", "drop 'window'")


def test_a_missing_datasets_package_is_one_line(saved, capsys, monkeypatch, tmp_path):
    # a local data file's checks imported it first: "No module named 'datasets'"
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` raises ImportError
    monkeypatch.setattr("bsbr.evaluate.saved.load_saved_models", lambda *a: ({}, None, {}))
    (tmp_path / "d.jsonl").write_text('{"text": "a b c"}\n')
    for name in ("wikitext", str(tmp_path / "d.jsonl")):
        _refused(capsys, ["eval", str(saved / "conv"), "--reference", str(saved / "ref"), "--dataset", name,
                          "--no-passkey"], f"--dataset {name}: needs the 'datasets' package: pip install datasets")
    # installed, but failing inside (pyarrow 26 under numpy 1.x): "needs the 'datasets' package" was untrue
    (tmp_path / "fake" / "datasets").mkdir(parents=True)
    (tmp_path / "fake" / "datasets" / "__init__.py").write_text(
        "raise ImportError('pyarrow requires NumPy 2.0 or newer', name='pyarrow')\n")
    monkeypatch.delitem(sys.modules, "datasets")
    monkeypatch.syspath_prepend(str(tmp_path / "fake"))
    _refused(capsys, ["eval", str(saved / "conv"), "--reference", str(saved / "ref"), "--dataset", "wikitext",
                      "--no-passkey"], "--dataset wikitext: the 'datasets' package does not import here (pyarrow "
             "requires NumPy 2.0 or newer): install versions of it and its dependencies that work together")


@pytest.mark.parametrize("name", [["x"], 5])
def test_a_recorded_source_name_that_is_no_string_is_one_line(saved, tmp_path, capsys, no_loading, name):
    # it was "expected str, bytes or os.PathLike object, not list" once --reference defaulted
    model = tmp_path / "conv"
    model.mkdir()
    for p in (saved / "conv").iterdir():
        (model / p.name).write_bytes(p.read_bytes())
    (model / "conversion.json").write_text(json.dumps({"source": {"name": name, "model_type": "llama"}}))
    argv = ["eval", str(model), "--text-file", str(saved / "text.py"), "--seq-len", "40", "--max-windows", "1",
            "--no-passkey", "--no-progress"]
    _refused(capsys, argv, "conversion.json", "source.name", "--reference")


def test_a_dataset_the_offline_hub_cannot_give_is_refused_at_once_before_loading(saved, tmp_path, capsys,
                                                                                   no_loading, monkeypatch):
    """With the hub unreachable, --dataset read only the cache after about a minute of retries, and only once
    the models had loaded: now one line, before loading, without waiting."""
    import socket
    import time

    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # restored after the test, as is the variable
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)

    def unreachable(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))  # nothing cached
    t0 = time.perf_counter()
    argv = ["eval", str(saved / "conv"), "--reference", str(saved / "ref"), "--dataset", "someone/no-such-dataset",
            "--seq-len", "40", "--no-passkey", "--no-progress"]
    _refused(capsys, argv, "--dataset", "someone/no-such-dataset", "connect to the hub, or give local files with "
             "--text-file")
    assert time.perf_counter() - t0 < 20


@pytest.mark.parametrize("extra, words", [(["--text-column", "nope"], "has no column 'nope'"),
                                          (["--dataset-split", "train"], "Bad split: train")])
def test_a_local_dataset_error_offline_gives_no_network_advice(saved, tmp_path, capsys, no_loading, monkeypatch,
                                                                extra, words):
    # every --dataset error while offline ended with "connect to the hub", a wrong column or split too
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    data = tmp_path / "ds"
    data.mkdir()
    (data / "test.csv").write_text("text\nhello world\nfoo bar\n")
    argv = ["eval", str(saved / "conv"), "--reference", str(saved / "ref"), "--dataset", str(data), "--seq-len", "40",
            "--no-passkey", "--no-progress", *extra]
    line = _refused(capsys, argv, "--dataset", words)
    assert "connect to the hub" not in line, line


def test_lm_eval_task_dir_names_a_killed_runs_leftover(saved, tmp_path, capsys, no_loading):
    # a rewrite killed (SIGKILL) leaves its staging folder in the task folder: it was called a file
    # "bsbr eval does not write there"
    task = tmp_path / "task"
    (task / ".bsbr-results.tmp-ab12cd34").mkdir(parents=True)
    _refused(capsys, ["eval", str(saved / "conv"), "--lm-eval-task-dir", str(task), *PASSKEY],
             "left by a bsbr command that was killed", "remove .bsbr-results.tmp-ab12cd34")


def test_lm_eval_task_dir_refuses_a_model_its_command_could_not_run(saved, tmp_path, capsys):
    """The task path loaded only the tokenizer: it wrote the task and printed a command (exit 0) for a model
    with pickled weights alone, a config.json the model refuses, or lengths past an absolute position table."""
    import shutil

    from bsbr.convert import convert_to_bsbr

    def copy(name):
        shutil.copytree(saved / "conv", tmp_path / name)
        return tmp_path / name

    pickled = copy("pickled")
    for f in pickled.glob("*.safetensors"):
        f.rename(f.with_name("pytorch_model.bin"))
    broken = copy("broken")
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "chunk_size": -4}))
    table = tmp_path / "table"
    convert_to_bsbr(make_source("gpt2"), chunk_size=8, position_scheme="absolute").save_pretrained(table)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (saved / "conv" / name).exists():
            shutil.copy(saved / "conv" / name, table)
    for model, words in ((pickled, ["no .safetensors weights"]), (broken, ["chunk_size", "convert it again"]),
                         (table, ["--passkey-lengths 96 needs 95 positions", "64 learned positions",
                                   "the shortest pass-key prompt takes", "tokens: none fits the model as converted, "
                                   "or convert with --position-scheme wrap or clamp"])):
        task = tmp_path / f"task_{model.name}"
        _refused(capsys, ["eval", str(model), "--lm-eval-task-dir", str(task), *PASSKEY], *words)
        assert not task.exists()
    assert main(["eval", str(saved / "conv"), "--lm-eval-task-dir", str(tmp_path / "task"), *PASSKEY]) == 0


def test_json_onto_a_local_datasets_own_file_is_refused(saved, tmp_path, capsys, no_loading):
    # the dataset's data file was replaced by the results (exit 0): a local --dataset is an input too
    data = tmp_path / "ds"
    data.mkdir()
    (data / "test.json").write_text(json.dumps([{"text": "def f ( x ) : return x + y\n" * 30}] * 4))
    before = _snapshot(data)
    argv = ["eval", str(saved / "conv"), "--reference", str(saved / "ref"), "--dataset", str(data), "--seq-len", "40",
            "--no-passkey", "--no-progress", "--json", str(data / "test.json")]
    _refused(capsys, argv, "--json", "--dataset")
    assert _snapshot(data) == before


def test_fillers_whose_lm_eval_metrics_would_be_one_are_refused(saved, tmp_path, capsys, no_loading):
    # my-text.txt and my_text.txt both gave the metric passkey_file_my_text_txt: lm-eval averaged them as one
    for name, text in (("my-text.txt", "The river runs past the old mill. "), ("my_text.txt", "A bird sang on the wall. ")):
        (tmp_path / name).write_text(text * 40)
    _refused(capsys, ["eval", str(saved / "conv"), "--lm-eval-task-dir", str(tmp_path / "task"), *PASSKEY[:-4],
                      "--passkey-filler", str(tmp_path / "my-text.txt"), str(tmp_path / "my_text.txt")],
             "--passkey-filler", "would share the lm-eval metric passkey_file_my_text_txt", "rename one")
    assert not (tmp_path / "task").exists()


def test_a_dataset_read_twice_is_refused(saved, tmp_path, capsys, no_loading):
    # --dataset-split train+train, or a folder holding a file and a link to it: each file's text was read (and
    # trained on, by distill) twice, as `--text-file a a` is refused for
    pytest.importorskip("datasets")
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "a.txt").write_text("The river runs past the old mill and on to the sea. " * 40)
    argv = ["eval", str(saved / "conv"), "--reference", str(saved / "ref"), "--dataset", str(tmp_path / "ds"),
            "--seq-len", "40", "--no-passkey", "--no-progress"]
    _refused(capsys, [*argv, "--dataset-split", "train+train"], "--dataset-split train+train: names 'train' twice",
             "name each split once")
    (tmp_path / "ds" / "b.txt").symlink_to(tmp_path / "ds" / "a.txt")
    _refused(capsys, [*argv, "--dataset-split", "train"], f"--dataset {tmp_path / 'ds'}: a.txt and b.txt are one "
             "file (a link; its text would be read twice): remove one")


def test_an_empty_local_dataset_says_why(saved, tmp_path, capsys, no_loading):
    # datasets raises a bare StopIteration: the line ended at "(config None, split 'test'):"
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "test.jsonl").write_text("")
    argv = ["eval", str(saved / "conv"), "--reference", str(saved / "ref"), "--dataset", str(tmp_path / "ds"),
            "--seq-len", "40", "--no-passkey", "--no-progress"]
    _refused(capsys, argv, "--dataset", "its data files hold no rows")


def test_local_dataset_text_files_of_whitespace_or_too_short_are_refused_as_text_files_are(saved, tmp_path, capsys,
                                                                                           no_loading):
    """A .txt of whitespace alone was evaluated (2 windows of blanks, exit 0); one shorter than a window was
    refused only once both models had loaded, naming neither the option nor the file; an empty one was told to
    give --text-column, which a text file does not take."""
    argv = ["eval", str(saved / "conv"), "--reference", str(saved / "ref"), "--seq-len", "300", "--no-passkey",
            "--no-progress", "--dataset"]
    (tmp_path / "ws.txt").write_text("    \n\t\t\n" * 3000)
    _refused(capsys, [*argv, str(tmp_path / "ws.txt")], "--dataset", "ws.txt: the file holds only whitespace")
    (tmp_path / "short.txt").write_text("def f(x): pass\n")
    _refused(capsys, [*argv, str(tmp_path / "short.txt")], "--dataset", "short.txt: 15 bytes in 1 file(s), fewer "
             "than the 300 tokens of one window")
    (tmp_path / "empty.txt").write_text("")
    line = _refused(capsys, [*argv, str(tmp_path / "empty.txt")], "--dataset", "empty.txt: the file holds no text")
    assert "--text-column" not in line
    (tmp_path / "both").mkdir()
    (tmp_path / "both" / "a.txt").write_text("  \n")
    (tmp_path / "both" / "b.txt").write_text("\n\n")
    _refused(capsys, [*argv, str(tmp_path / "both")], "--dataset", "its files hold only whitespace")


def test_a_local_dataset_that_fails_while_its_rows_are_read_is_named(tmp_path):
    """pyarrow's and pandas' errors while rows were read named neither the file nor what to give (mid-file: in the
    middle of an evaluation); a FIFO or device was reported missing, or looked up on the hub."""
    import os

    from bsbr.corpus import dataset_texts

    (tmp_path / "u16.jsonl").write_bytes('{"text": "a b c"}\n'.encode("utf-16"))
    (tmp_path / "empty.csv").write_text("")
    for f in ("u16.jsonl", "empty.csv"):
        with pytest.raises(ValueError, match=f"dataset '.*{f}': reading its rows failed after 0 .*: give UTF-8 JSON"):
            list(dataset_texts(str(tmp_path / f), split="train"))
    os.mkfifo(tmp_path / "fifo")
    for name in (str(tmp_path / "fifo"), "/dev/null"):
        with pytest.raises(ValueError, match="not a regular file \\(a device or FIFO\\): give data files"):
            list(dataset_texts(name, split="train"))


def test_a_local_dataset_that_does_not_parse_is_one_line(saved, tmp_path, capsys, no_loading):
    # datasets logged "Failed to load JSON from file ..." on a line of its own before the command's error
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "test.jsonl").write_text('{"text": "a b c"}\n{"text": "a b\n')
    argv = ["eval", str(saved / "conv"), "--reference", str(saved / "ref"), "--dataset", str(tmp_path / "ds"),
            "--seq-len", "40", "--no-passkey", "--no-progress"]
    _refused(capsys, argv, "--dataset")


def test_local_dataset_text_files_are_checked_as_text_files_and_bad_rows_named(saved, tmp_path, capsys, no_loading,
                                                                            caplog):
    """--dataset read a UTF-16 or Latin-1 .txt as replacement characters (--text-file refuses them), dropped rows
    whose text was not a string, and left a folder's files of another format unread, all with exit 0."""
    text = (saved / "text.py").read_text()
    argv = ["eval", str(saved / "conv"), "--reference", str(saved / "ref"), "--seq-len", "40", "--no-passkey",
            "--no-progress", "--dataset"]
    (tmp_path / "u16").mkdir()
    (tmp_path / "u16" / "a.txt").write_bytes(text.encode("utf-16"))
    _refused(capsys, [*argv, str(tmp_path / "u16")], "--dataset", "a.txt is UTF-16", "save it as UTF-8")
    (tmp_path / "latin").mkdir()
    (tmp_path / "latin" / "a.txt").write_bytes(text.encode() + b"caf\xe9\n")
    _refused(capsys, [*argv, str(tmp_path / "latin")], "--dataset", "a.txt is not UTF-8 text", "save it as UTF-8")
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"text": text}) + "\n" + json.dumps({"text": [text]}) + "\n")
    from bsbr.corpus import dataset_texts

    with pytest.raises(ValueError, match="row 1's 'text' is a list, not text: pick a column of text with --text-column"):
        list(dataset_texts(str(rows), split="train"))
    rows.write_text(json.dumps({"text": text}) + "\n" + json.dumps({"other": 1}) + "\n")
    with caplog.at_level("WARNING"):
        assert len(list(dataset_texts(str(rows), split="train"))) == 1
    assert "row 1 has no text in column 'text': rows without text are skipped" in caplog.text
    latin = tmp_path / "late.csv"  # a bad byte past the first row: the error named neither the file nor the option
    latin.write_bytes(b"text\n" + b"".join(b'"row %d"\n' % i for i in range(20000)) + b'"caf\xe9"\n')
    with pytest.raises(ValueError, match="dataset .*late.csv.* is not UTF-8 text"):
        list(dataset_texts(str(latin), split="train"))
    from bsbr.arguments import check_dataset

    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "a.txt").write_text(text)
    (folder / "b.jsonl").write_text(json.dumps({"text": text}) + "\n")
    caplog.clear()
    with caplog.at_level("WARNING"):
        check_dataset(str(folder), None, "train", "text")
    assert "1 file(s) are not read (datasets reads one format per folder: here .jsonl;" in caplog.text
    assert "the one chosen): a.txt" in caplog.text


def test_a_folder_whose_one_file_names_a_split_is_refused(tmp_path, caplog):
    """datasets names splits after file names: beside test_results.txt, notes.txt and story.txt were read by no
    split, eval read the one file (warning that the others were of another format) and distill found no train."""
    from bsbr.arguments import check_dataset
    from bsbr.errors import UserError

    folder = tmp_path / "docs"
    folder.mkdir()
    for name in ("notes", "story", "test_results"):
        (folder / f"{name}.txt").write_text("The fox ran over the hill. " * 20)
    for split in ("test", "train"):
        with pytest.raises(UserError, match=r"names splits after file names \(test_results.txt: 'test'\) and so reads "
                                            "none of notes.txt, story.txt: rename the files"):
            check_dataset(str(folder), None, split, "text")
    (folder / "test_results.txt").rename(folder / "results.txt")  # no file names a split: one split of all three
    check_dataset(str(folder), None, "train", "text")
    # a dataset card's configs: the other config's files are that config's, not misnamed
    for config in ("en", "fr"):
        (folder / config).mkdir()
        (folder / config / "train.txt").write_text(f"{config} text. " * 40)
    (folder / "README.md").write_text("---\nconfigs:\n- config_name: en\n  data_files: en/*.txt\n"
                                      "- config_name: fr\n  data_files: fr/*.txt\n---\n")
    with caplog.at_level("WARNING"):
        check_dataset(str(folder), "en", "train", "text")
    assert "the one chosen): fr/train.txt" in caplog.text, caplog.text


def test_csv_cells_reading_na_are_text_and_skipped_rows_are_counted(tmp_path, caplog):
    # pandas read NA, null and nan as missing values: dropped as rows without text, of which only the first was named
    from bsbr.corpus import dataset_texts

    (tmp_path / "a.csv").write_text('text\nNA\nnull\nhello world\n""\n" "\nnan\n')
    with caplog.at_level("WARNING"):
        assert list(dataset_texts(str(tmp_path / "a.csv"), split="train")) == ["NA", "null", "hello world", "nan"]
    assert "2 rows without text in column 'text' were skipped" in caplog.text, caplog.text


def test_a_dataset_of_no_data_format_is_refused_by_name(tmp_path):
    # Markdown went to datasets' task builder ("No task.toml or instruction.md files found")
    import zipfile

    from bsbr.arguments import check_dataset
    from bsbr.errors import UserError

    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.md").write_text("# Notes\n\nThe fox ran over the hill.\n" * 20)
    (tmp_path / "one.md").write_text("The fox ran over the hill.\n" * 20)
    with zipfile.ZipFile(tmp_path / "notes.zip", "w") as z:  # (and XML, whose builder reads no local file)
        z.writestr("inner.md", "# Notes\n")
    (tmp_path / "k.xml").write_text("<a>The fox ran over the hill.</a>\n")
    for name, words in (("notes", "holds no data file"), ("one.md", "is not a data file"),
                        ("notes.zip", "is not a data file"), ("k.xml", "is not a data file")):
        with pytest.raises(UserError, match=f"--dataset .*{name}: {words} .*: give text files with --text-file"):
            check_dataset(str(tmp_path / name), None, "train", "text")
    row = json.dumps({"text": "The fox ran over the hill. " * 10}) + "\n"  # formats datasets reads: still read
    (tmp_path / "rows.ndjson").write_text(row)
    with zipfile.ZipFile(tmp_path / "rows.zip", "w") as z:
        z.writestr("a.jsonl", row)
    for name in ("rows.ndjson", "rows.zip"):
        check_dataset(str(tmp_path / name), None, "train", "text")


def test_compressed_text_files_and_saved_dataset_dicts_are_read_without_false_warnings(tmp_path, caplog):
    """A folder's .txt.gz was read as its gzip bytes; a save_to_disk DatasetDict's dataset_dict.json and a
    downloaded repo's LICENSE were named as files of another format."""
    import gzip

    import datasets
    from bsbr.arguments import check_dataset
    from bsbr.corpus import dataset_texts

    text = "def f(x):\n    return x + 1\n" * 30
    (tmp_path / "gz").mkdir()
    with gzip.open(tmp_path / "gz" / "a.txt.gz", "wt") as f:
        f.write(text)
    rows = [{"text": text}] * 2
    datasets.DatasetDict({s: datasets.Dataset.from_list(rows) for s in ("train", "test")}).save_to_disk(tmp_path / "dd")
    (tmp_path / "hf").mkdir()
    for name in ("train", "test"):
        (tmp_path / "hf" / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "hf" / "LICENSE").write_text("MIT\n")
    with caplog.at_level("WARNING"):
        for name, split in (("gz", "train"), ("dd", "train"), ("hf", "test")):
            check_dataset(str(tmp_path / name), None, split, "text")
            docs = [d if isinstance(d, str) else "".join(d) for d in dataset_texts(str(tmp_path / name), split=split)]
            assert docs and all(d == text for d in docs), (name, docs[:1])
    assert "not read" not in caplog.text, caplog.text
    # a UTF-16 .txt beside a compressed one was no longer checked; UTF-16 inside a .gz was read as text
    (tmp_path / "gz" / "b.txt").write_bytes(text.encode("utf-16-le"))
    with pytest.raises(Exception, match="b.txt looks binary"):
        check_dataset(str(tmp_path / "gz"), None, "train", "text")
    (tmp_path / "u16gz").mkdir()
    with gzip.open(tmp_path / "u16gz" / "a.txt.gz", "wb") as f:
        f.write(text.encode("utf-16-le"))
    with pytest.raises(ValueError, match="holds NUL characters .binary, or UTF-16 text.: give UTF-8 text"):
        list(dataset_texts(str(tmp_path / "u16gz"), split="train"))
    (tmp_path / "hf" / "s1.py").write_text(text)  # files of another format, not only data formats, are named
    with caplog.at_level("WARNING"):
        check_dataset(str(tmp_path / "hf"), None, "test", "text")
    assert "1 file(s) are not read (datasets reads one format per folder: here .jsonl;" in caplog.text
    assert "the one chosen): s1.py" in caplog.text


def test_a_passkey_grid_that_could_not_be_read_whole_is_refused_before_loading(saved, capsys, monkeypatch):
    # fewer trials than fillers: the last filler was never read, yet listed in the JSON and drawn as 0% in the plot;
    # fewer new tokens than the key's answer takes: every cell 0%, exit 0
    grid = ["eval", str(saved / "conv"), "--reference", str(saved / "ref"), "--passkey-only", "--passkey-lengths", "96",
            "--passkey-depths", "0.5"]
    story = str(saved / "story.txt")
    monkeypatch.setattr("bsbr.evaluate.saved.load_saved_models", lambda *a, **k: pytest.fail("loaded the models"))
    _refused(capsys, [*grid, "--passkey-trials", "1", "--passkey-filler", "classic", story],
             "--passkey-trials 1 runs fewer trials than there are fillers (2)", "story.txt would never be read")
    _refused(capsys, [*grid, "--passkey-trials", "1", "--passkey-new-tokens", "3"],
             "--passkey-new-tokens 3 is fewer than the 5 tokens a key's answer", "give --passkey-new-tokens 5")


def test_passkey_lengths_past_a_learned_position_reference_are_refused_before_loading(saved, tmp_path, capsys,
                                                                                       monkeypatch, word_tokenizer):
    # they were refused only once the BSBR model and the reference had loaded
    from transformers import GPT2LMHeadModel

    config = make_source("gpt2").config
    config.n_positions = 128
    gpt2 = GPT2LMHeadModel(config)
    gpt2.save_pretrained(tmp_path / "ref")
    convert_to_bsbr(gpt2, chunk_size=CHUNK).save_pretrained(tmp_path / "conv")  # (wrap: runs past the table)
    word_tokenizer.save_pretrained(tmp_path / "conv")
    from bsbr.errors import UserError

    def loaded(*a, **k):
        raise UserError("loading now")

    monkeypatch.setattr("bsbr.evaluate.saved.load_saved_models", loaded)
    grid = ["eval", str(tmp_path / "conv"), "--reference", str(tmp_path / "ref"), "--passkey-only", "--passkey-depths",
            "0.5", "--passkey-trials", "1", "--passkey-lengths"]
    _refused(capsys, [*grid, "130"], "--passkey-lengths 130 is longer than the --reference's 128 learned positions",
             "give at most 129 (a prompt of n tokens needs n - 1 positions)")
    _refused(capsys, [*grid, "129"], "loading now")  # (its last token is never fed back: 128 positions)
    # a table shorter than any pass-key prompt: "give at most 33" led to "length 33 is too short"
    from bsbr.evaluate.passkey import shortest_length

    config.n_positions = 32
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "short")
    convert_to_bsbr(GPT2LMHeadModel(config), chunk_size=CHUNK, position_scheme="absolute").save_pretrained(
        tmp_path / "table")
    word_tokenizer.save_pretrained(tmp_path / "table")
    shortest = shortest_length(word_tokenizer, [0.5], 1, 0, 8, ["classic"])
    assert 33 < shortest < 96
    grid[1], grid[3] = str(tmp_path / "conv"), str(tmp_path / "short")
    _refused(capsys, [*grid, "96"], "--passkey-lengths 96 is longer than the --reference's 32 learned positions "
             f"(n_positions): the shortest pass-key prompt takes {shortest} tokens: leave the source out")
    grid[1] = str(tmp_path / "table")  # (with --passkey-only, --no-passkey is refused)
    _refused(capsys, [*grid, "96", "--passkey-models", "bsbr"], "--passkey-lengths 96 needs 95 positions, past the "
             "32 learned positions of MODEL", f"the shortest pass-key prompt takes {shortest} tokens: none fits the "
             "model as converted, or convert with --position-scheme wrap or clamp")
    _refused(capsys, [*grid[:4], "--seq-len", "32", "--passkey-lengths", "96", "--passkey-models", "bsbr"],
             "the shortest pass-key prompt takes", "tokens: give --no-passkey (and no other --passkey- option), or "
             "convert")  # (the default depths, trials and fillers: another shortest)


def test_a_local_data_file_evaluates_its_one_split_without_dataset_split(saved, tmp_path, capsys):
    # a data file, or a folder of files naming no split, holds only "train": eval's default "test" refused it
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"text": line}) + "\n"
                            for line in (saved / "text.py").read_text().splitlines(keepends=True)))
    out = tmp_path / "e.json"
    argv = ["eval", str(saved / "conv"), "--reference", str(saved / "ref"), "--dataset", str(data), "--seq-len", "40",
            "--max-windows", "1", "--no-passkey", "--no-progress", "--json", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    corpus = json.loads(out.read_text())["config"]["corpus"]
    assert corpus["split"] == "train" and corpus["name"] == str(data.resolve()), corpus
    # a folder of files naming no split: its split was a NamedSplit (not JSON, not a str), and eval failed
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text((saved / "text.py").read_text())
    argv[argv.index("--dataset") + 1] = str(folder)
    assert main(argv) == 0, capsys.readouterr().err
    assert json.loads(out.read_text())["config"]["corpus"]["split"] == "train"


def test_a_rotary_reference_run_past_its_positions_is_named(saved, tmp_path, caplog):
    # distill warned of it; eval printed the source's perplexity (and the gap closed) as an upper bound
    # without a word
    text = tmp_path / "long.py"
    text.write_text("def f ( x ) :\n    return x + y\n" * 300)
    table = json.loads((saved / "ref" / "config.json").read_text())["max_position_embeddings"]
    argv = ["eval", str(saved / "conv"), "--reference", str(saved / "ref"), "--text-file", str(text), "--seq-len",
            str(table + 16), "--max-windows", "1", "--no-passkey", "--no-progress"]
    with caplog.at_level("WARNING"):
        assert main(argv) == 0
    assert f"--seq-len {table + 16:,} runs the reference past its {table:,} positions" in caplog.text, caplog.text


def test_a_task_written_by_an_earlier_version_is_still_the_tasks(tmp_path):
    """Earlier versions wrote another docstring in the utils module and rows without every key: still bsbr's."""
    from bsbr.evaluate.lm_eval_task import is_task_file

    utils, data = tmp_path / "bsbr_passkey_utils.py", tmp_path / "bsbr_passkey.jsonl"
    utils.write_text('"""The bsbr_passkey metric (written by bsbr.evaluate.lm_eval_task): whether the key\'s digits '
                     'appear\nin the model\'s output once whitespace is removed."""\n'
                     'from bsbr.evaluate.lm_eval_task import process_results  # noqa: F401\n')
    data.write_text(json.dumps(dict(prompt="p", key="1", length=9, depth=0.5, trial=0)) + "\n")
    assert is_task_file(utils) and is_task_file(data)
    data.write_text(json.dumps(dict(prompt="p", key="1", mine=True)) + "\n")
    assert not is_task_file(data)


def test_an_edited_task_yaml_or_utils_module_is_not_replaced(tmp_path):
    """Only the YAML's first line and the utils module's syntax were compared: an edited generation length,
    an added note or a comment in the metric module were replaced by a rerun, exit 0."""
    from bsbr.evaluate.lm_eval_task import _UTILS, _YAML, _ZERO_SHOT, is_task_file, write_lm_eval_task
    from word_tokenizer import build_word_tokenizer

    yaml = write_lm_eval_task(tmp_path / "task", build_word_tokenizer(), lengths=[256], trials=1)
    utils = yaml.with_name("bsbr_passkey_utils.py")
    assert is_task_file(yaml) and is_task_file(utils)
    text = yaml.read_text()
    for edited in (text.replace("max_gen_toks: 8", "max_gen_toks: 16"), text + "# my note\n",
                   text.replace("  do_sample: false\n", "")):
        yaml.write_text(edited)
        assert not is_task_file(yaml), edited
    # written before the YAML carried its digest (and num_fewshot and the greedy options): the template's lines,
    # any values
    old = _YAML.replace(_ZERO_SHOT, "").format(greedy="", task="bsbr_passkey", data='"/x/bsbr_passkey.jsonl"',
                                               max_new_tokens=8,
                       utils="bsbr_passkey_utils", metrics="  - metric: passkey\n    aggregation: mean\n"
                       "    higher_is_better: true\n", lengths="[64]", depths="[0.5]", trials=1, seed=0,
                       fillers='["a"]')
    yaml.write_text(old)
    assert is_task_file(yaml)
    yaml.write_text(old + "# my note\n")
    assert not is_task_file(yaml)
    utils.write_text(_UTILS + "# my comment\n")
    assert not is_task_file(utils)


def test_a_linked_data_file_and_a_compressed_text_with_a_byte_order_mark_are_read_as_their_text(tmp_path):
    # a data file reached through a link (as a hub cache's snapshots are) was looked up by the link's name in its
    # target's folder: "Unable to find"; a .txt.gz kept its UTF-8 byte-order mark as three characters of text
    import gzip

    from bsbr.corpus import dataset_texts

    (tmp_path / "blobs").mkdir()
    (tmp_path / "blobs" / "77aa").write_text("text\nhello world\nthe fox\n")
    (tmp_path / "snap").mkdir()
    (tmp_path / "snap" / "data.csv").symlink_to(tmp_path / "blobs" / "77aa")
    assert list(dataset_texts(str(tmp_path / "snap" / "data.csv"), split="train")) == ["hello world", "the fox"]
    (tmp_path / "link").symlink_to(tmp_path / "blobs")  # ".." after a linked folder: the folder above its target
    (tmp_path / "rows.jsonl").write_text('{"text": "first"}\n{"text": "\\ufeffsecond"}\n')
    assert list(dataset_texts(str(tmp_path / "link" / ".." / "rows.jsonl"), split="train")) == ["first", "\ufeffsecond"]
    (tmp_path / "rows[1].jsonl").write_text('{"text": "bracketed"}\n')  # (a name datasets would read as a pattern)
    assert list(dataset_texts(str(tmp_path / "rows[1].jsonl"), split="train")) == ["bracketed"]
    (tmp_path / "gz").mkdir()
    with gzip.open(tmp_path / "gz" / "a.txt.gz", "wb") as f:
        f.write("\ufeffdef f(x):\n    return x\n".encode("utf-8"))
    docs = ["".join(d) if not isinstance(d, str) else d for d in dataset_texts(str(tmp_path / "gz"), split="train")]
    assert docs == ["def f(x):\n    return x\n"]


def test_a_gguf_source_reached_through_a_link_is_recorded_by_the_path_given(tmp_path):
    # the record followed the link to the hub cache's blob (no .gguf suffix), which --reference then refused
    from bsbr.arguments import source_name

    (tmp_path / "blobs").mkdir()
    (tmp_path / "blobs" / "9f8e").write_bytes(b"GGUF" + bytes(8))
    (tmp_path / "smol.gguf").symlink_to(tmp_path / "blobs" / "9f8e")
    assert source_name(tmp_path / "smol.gguf") == str(tmp_path / "smol.gguf")
    (tmp_path / "snap").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "snap")  # ".." after a linked folder is the folder above its target
    assert source_name(f"{tmp_path}/link/../smol.gguf") == str(tmp_path / "smol.gguf")
    (tmp_path / "snap" / "smol.gguf").symlink_to(tmp_path / "blobs" / "9f8e")
    assert source_name(f"{tmp_path}/link/smol.gguf") == str(tmp_path / "snap" / "smol.gguf")


def test_a_plot_whose_heat_map_name_is_too_long_is_refused_by_name(saved, tmp_path, capsys, no_loading):
    # a 249-byte --plot makes NAME.passkey.png too long: "error: ...passkey.png: File name too long"
    plot = tmp_path / ("p" * 245 + ".png")
    _refused(capsys, _base(saved, *PASSKEY, "--plot", str(plot)), "the pass-key heat map (beside --plot)",
             "more than a file name may be (255): give a shorter name")


def test_eval_fills_the_defaults_its_help_gives_and_reads_a_depth_of_one(capsys):
    import argparse

    from bsbr.cli import build_parser
    from bsbr.evaluate import cli as ev

    args, _ = build_parser().parse_known_args(["eval", "m/conv"])
    ev._refuse_ignored(args)  # (where the defaults are filled, after the refusals of options given)
    assert (args.seq_len, args.passkey_trials) == (2048, 3)
    assert main(["eval", "--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "tokens per window (default 2048)" in help_text and "number of fillers (default 3)" in help_text
    assert (ev.needle_depth("0"), ev.needle_depth("1")) == (0.0, 1.0)  # (the help's [0, 1])
    for bad in ("1.01", "-0.1", "nan", "inf", "-inf"):  # (nan compares false both ways)
        with pytest.raises(argparse.ArgumentTypeError, match="depth must lie in"):
            ev.needle_depth(bad)


def test_a_users_file_in_the_task_folders_bytecode_cache_is_refused(tmp_path):
    from bsbr.errors import UserError
    from bsbr.evaluate.cli import _check_task_dir

    cache = tmp_path / "__pycache__"
    cache.mkdir()
    _check_task_dir(tmp_path, str(tmp_path))  # an empty one (a rerun deletes the bytecode it finds)
    (cache / "bsbr_passkey_utils.cpython-311.pyc").write_bytes(b"")
    _check_task_dir(tmp_path, str(tmp_path))  # the task's bytecode alone
    for mine in ("bsbr_passkey_utils.notes.txt", "my_notes.txt"):  # beside the task's bytecode, not its own
        (cache / mine).write_text("mine")
        with pytest.raises(UserError, match="__pycache__"):
            _check_task_dir(tmp_path, str(tmp_path))
        (cache / mine).unlink()


def test_a_passkey_plot_alone_is_a_file_output_on_a_closed_stdout():
    from bsbr.cli import _writes_files, build_parser

    args, _ = build_parser().parse_known_args(["eval", "m/conv", "--passkey-only", "--passkey-plot", "p.png"])
    assert _writes_files(args)
