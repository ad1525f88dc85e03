"""``bsbr distill`` through the real CLI (``main([...])`` in process) on the tiny local models of
tests/cli/conftest.py: options refused before anything loads, ``--overwrite`` that keeps the old model
until the new run has a checkpoint, and ``--resume`` that refuses another student."""
import json

import pytest
from cli_checks import refused, tree_hash

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

    monkeypatch.setattr(cli, "load_bsbr_model", loads)
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
    (["--minutes", "-1"], "--minutes must be > 0"),
    (["--steps", "2", "--seq-len", "0"], "--seq-len must be >= 2"),
    (["--steps", "2", "--max-windows", "-1"], "--max-windows must be >= 1"),
    (["--steps", "2", "--seed", str(2 ** 70)], "--seed must fit in 64 bits"),
    (["--steps", "2", "--text-file"], "--text-file needs at least one file"),
])
def test_bad_values_are_refused_before_loading(models, text, tmp_path, capsys, no_loading, extra, message):
    line = refused(capsys, distill_args(models, text, tmp_path / "out", *extra), "distill", models[1])
    assert message in line, line
    assert not (tmp_path / "out").exists()


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


def test_overwrite_keeps_the_old_model_until_the_new_run_has_a_checkpoint(models, text, tmp_path, capsys,
                                                                            monkeypatch):
    out = tmp_path / "out"
    assert main(distill_args(models, text, out, "--steps", "2", "--checkpoint-every", "1")) == 0
    before = tree_hash(out)
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
    # after the new run's first checkpoint (step 2): that checkpoint replaces the old one, and the old
    # model is no longer the output's (no config.json); --resume finishes the new run
    dies_at_step(monkeypatch, 3)
    assert main(args) == 1
    assert json.loads((out / "checkpoint" / "manifest.json").read_text())["step"] == 2
    assert not (out / "config.json").exists()
    monkeypatch.undo()
    assert main([a for a in args if a != "--overwrite"] + ["--resume"]) == 0
    log = json.loads((out / "distill.json").read_text())
    assert [e["step"] for e in log["log"]] == [0, 1, 2] and log["config"]["seed"] == 1
    load_bsbr_model(out)


def test_resume_refuses_a_student_with_another_config(models, text, tmp_path, capsys, monkeypatch):
    source, converted, _ = models
    other = tmp_path / "other-student"  # the same source and chunk size, 2 sink tokens instead of 4
    assert main(["convert", str(source), str(other), "--chunk-size", "8", "--sink-tokens", "2"]) == 0
    out = tmp_path / "out"
    assert main(distill_args(models, text, out, "--steps", "2")) == 0
    import bsbr.distill.cli as cli

    load = cli.load_bsbr_model
    monkeypatch.setattr(cli, "load_bsbr_model", lambda *a: pytest.fail("loaded before the refusal"))
    line = refused(capsys, [*distill_args(models, text, out, "--steps", "3", student=other), "--resume"], "distill", out)
    assert "other settings" in line and "the student's sink_tokens: checkpoint 4, now 2" in line, line
    monkeypatch.setattr(cli, "load_bsbr_model", load)
    # a checkpoint of an older bsbr records no student config: only the student's weights are checked
    manifest = out / "checkpoint" / "manifest.json"
    m = json.loads(manifest.read_text())
    del m["progress"]["run"]["student_config"]
    manifest.write_text(json.dumps(m))
    assert main([*distill_args(models, text, out, "--steps", "3"), "--resume"]) == 0
    assert len(json.loads((out / "distill.json").read_text())["log"]) == 3
