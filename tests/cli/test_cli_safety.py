"""The issue-13 cases, each run through the real CLI (``main([...])`` in process, a subprocess where the
process itself matters) on tiny local models: the exit status, the one-line message, and that no
file changed that the command was not asked to write."""
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cli_checks import TEXT, SRC, one_error_line, refused, tree_hash
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

import bsbr.outputs
from bsbr.cli import main

def distill_args(models, text, output, *extra):
    source, converted, _ = models
    return ["distill", "--student", converted, "--teacher", source, "--text-file", text, "--seq-len", "96",
            "--max-windows", "4", "--output", output, *extra]


def override(args, *extra):
    """``args`` with the options in ``extra`` set: a value replaces the one ``args`` gives (an option given twice
    is refused), a new option is appended."""
    args, extra = list(args), list(extra)
    while extra:
        flag = extra.pop(0)
        has_value = extra and not str(extra[0]).startswith("--")
        if has_value and flag in args:
            args[args.index(flag) + 1] = extra.pop(0)
        else:
            args += [flag, extra.pop(0)] if has_value else [flag]
    return args


# ------------------------------------------------------------------------------------------- convert
def test_convert_writes_into_an_existing_empty_directory_without_replacing_it(models, tmp_path, monkeypatch):
    # a mount point (a container's volume) cannot be replaced: the whole conversion failed at its last step;
    # the current directory was replaced under the shell; the folder's own mode was lost
    from bsbr.models import load_bsbr_model

    source, _, _ = models
    out = tmp_path / "volume"
    out.mkdir()
    out.chmod(0o750)
    inode = out.stat().st_ino
    assert main(["convert", str(source), str(out), "--chunk-size", "8"]) == 0
    assert out.stat().st_ino == inode and (out.stat().st_mode & 0o777) == 0o750
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    load_bsbr_model(out)
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    assert main(["convert", str(source), ".", "--chunk-size", "8"]) == 0
    assert (Path(os.getcwd()) / "config.json").is_file() and here.samefile(os.getcwd())


def test_a_folder_a_killed_run_left_its_staging_in_is_written_into_with_overwrite(models, tmp_path, capsys):
    # the advice ("pass --overwrite") replaced the folder (its mode and owner lost; a mount point failed after the
    # whole conversion); a kill while its files were being moved in left bsbr's own files, then called foreign
    from bsbr.models import load_bsbr_model

    source, _, _ = models
    out = tmp_path / "volume"
    (out / ".bsbr.tmp-ab12cd34").mkdir(parents=True)
    out.chmod(0o750)
    inode = out.stat().st_ino
    assert "left by a bsbr command that was killed" in refused(capsys, ["convert", source, out, "--chunk-size", "8"],
                                                               "convert", out)
    assert main(["convert", str(source), str(out), "--chunk-size", "8", "--overwrite"]) == 0
    assert out.stat().st_ino == inode and (out.stat().st_mode & 0o777) == 0o750
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    load_bsbr_model(out)
    (out / "config.json").unlink()  # killed midway through moving a conversion's files in: taken over, the
    (out / ".bsbr.tmp-ef56gh78").mkdir()  # folder written into (it was replaced: its mode and inode lost)
    assert main(["convert", str(source), str(out), "--chunk-size", "16", "--overwrite"]) == 0
    assert load_bsbr_model(out).config.chunk_size == 16
    assert out.stat().st_ino == inode and (out.stat().st_mode & 0o777) == 0o750
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    (out / "config.json").unlink()  # the same, with a tokenizer's named chat templates moved in (a folder)
    (out / "additional_chat_templates").mkdir()
    (out / "additional_chat_templates" / "tool_use.jinja").write_text("{{ tools }}")
    (out / ".bsbr.tmp-ij90kl12").mkdir()
    assert main(["convert", str(source), str(out), "--chunk-size", "8", "--overwrite"]) == 0
    assert load_bsbr_model(out).config.chunk_size == 8 and not (out / "additional_chat_templates").exists()


@pytest.mark.parametrize("config", ["", '{"model_type": "bs'])
def test_a_write_into_an_empty_folder_killed_while_its_config_was_written_is_taken_over(models, tmp_path, capsys,
                                                                                      config):
    # save_pretrained killed while it wrote config.json in the staging folder: the rerun said "pass --overwrite",
    # which then called that folder the user's files ("holds files no bsbr command wrote")
    from bsbr.models import load_bsbr_model

    source, _, _ = models
    out = tmp_path / "out"
    (out / ".bsbr.tmp-zmpv3sll").mkdir(parents=True)
    (out / ".bsbr.tmp-zmpv3sll" / "config.json").write_text(config)
    assert "pass --overwrite" in refused(capsys, ["convert", source, out, "--chunk-size", "8"], "convert", out)
    assert main(["convert", str(source), str(out), "--chunk-size", "8", "--overwrite"]) == 0
    load_bsbr_model(out)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    (out / ".bsbr.tmp-zmpv3sll").mkdir()  # a whole config.json of another model: a backup, the user's
    (out / ".bsbr.tmp-zmpv3sll" / "config.json").write_text('{"model_type": "llama"}')
    assert "holds files no bsbr command wrote" in refused(capsys, ["convert", source, out, "--chunk-size", "8",
                                                                   "--overwrite"], "convert", out)


def test_a_killed_eval_s_results_staging_is_kept_by_an_output_named_bsbr_results(models, tmp_path, caplog):
    # write_together stages results in .bsbr-results.tmp-*, the name an output named bsbr-results stages under:
    # a conversion there removed a killed eval's folder holding the old results to put back
    source, _, _ = models
    results = tmp_path / ".bsbr-results.tmp-tx22vjrk"
    results.mkdir()
    (results / ".old-r.json").write_text('{"old": 1}')
    with caplog.at_level("WARNING", logger="bsbr.outputs"):
        assert main(["convert", str(source), str(tmp_path / "bsbr-results"), "--chunk-size", "8"]) == 0
    assert (results / ".old-r.json").read_text() == '{"old": 1}' and results.name in caplog.text


def test_a_folder_that_can_be_written_but_not_listed_gets_its_output(models, tmp_path, monkeypatch):
    # (a /scratch-like parent, mode 0711 or 1733) listing it for a killed run's leftovers, after the publish, failed:
    # "could not write the model ...; OUTPUT_DIR is as it was", with the model in place
    import bsbr.outputs as outputs
    from bsbr.models import load_bsbr_model

    source, _, _ = models
    out = tmp_path / "out"
    listing = Path.iterdir

    def unlistable(self):
        if self == tmp_path:
            raise PermissionError(13, "Permission denied", str(self))
        return listing(self)

    monkeypatch.setattr(outputs.Path, "iterdir", unlistable)
    assert main(["convert", str(source), str(out), "--chunk-size", "8"]) == 0
    monkeypatch.undo()
    load_bsbr_model(out)


def test_a_killed_conversion_s_unfinished_output_beside_it_is_removed_by_the_next_one(models, tmp_path, caplog):
    # a SIGKILL while convert wrote .out.tmp-*/ beside the output left up to a model's size there; every later
    # run warned of it and none removed it (each further kill added one)
    import shutil

    source, _, _ = models
    out = tmp_path / "out"
    assert main(["convert", str(source), str(out), "--chunk-size", "8"]) == 0
    weights = (out / "model.safetensors").read_bytes()
    cut, pending, whole, old, user = (tmp_path / f".out.{n}" for n in (
        "tmp-cut12345", "tmp-pend1234", "tmp-whole123", "old-abcd1234", "tmp-user1234"))
    for d in (cut, pending, whole, old):
        shutil.copytree(out, d)
    (cut / "model.safetensors").write_bytes(weights[:len(weights) // 2])  # cut short
    (pending / "model.safetensors").rename(pending / ".tmpab12CD")  # still in safetensors' temporary file
    user.mkdir()
    (user / "notes.txt").write_text("mine")  # a folder named like staging holding a user's file
    # a user's dated backups of weights alone, at the top or deeper, no config.json beside them (were removed)
    backup, nested = (tmp_path / f".out.tmp-2024011{d}" for d in (5, 6))
    backup.mkdir()
    (backup / "model.safetensors").write_bytes(weights)
    (nested / "old").mkdir(parents=True)
    (nested / "old" / "model.safetensors").write_bytes(weights)
    with caplog.at_level("WARNING", logger="bsbr.outputs"):
        assert main(["convert", str(source), str(out), "--chunk-size", "8", "--overwrite"]) == 0
    assert not cut.exists() and not pending.exists()
    assert whole.is_dir() and old.is_dir() and (user / "notes.txt").read_text() == "mine"
    assert (backup / "model.safetensors").read_bytes() == weights == (nested / "old" / "model.safetensors").read_bytes()
    assert (f"beside it lie {old.name}, {backup.name}, {nested.name}, {user.name}, {whole.name}, left by an earlier "
            "run") in caplog.text
    # one it cannot remove (another user's, in a shared folder) is named, not said to be removed
    cut.mkdir()
    caplog.clear()
    with caplog.at_level("INFO", logger="bsbr.outputs"), \
            pytest.MonkeyPatch.context() as m:
        m.setattr(shutil, "rmtree", lambda *a, **k: None)
        assert main(["convert", str(source), str(out), "--chunk-size", "8", "--overwrite"]) == 0
    assert cut.is_dir() and "removed" not in caplog.text and cut.name in caplog.text


def test_a_killed_write_into_the_current_directory_is_taken_over_with_overwrite(models, tmp_path, capsys,
                                                                                 monkeypatch):
    # "pass --overwrite" was then refused: "is (or contains) the current directory"
    from bsbr.models import load_bsbr_model
    from bsbr.outputs import MODEL_CARD

    source, _, _ = models
    here = tmp_path / "here"
    (here / ".bsbr.tmp-ab12cd34").mkdir(parents=True)
    (here / "README.md").write_text(MODEL_CARD)  # moved in before the kill
    monkeypatch.chdir(here)
    assert "pass --overwrite" in refused(capsys, ["convert", source, ".", "--chunk-size", "8"], "convert", here)
    assert main(["convert", str(source), ".", "--chunk-size", "8", "--overwrite"]) == 0
    load_bsbr_model(here)
    assert not [p for p in here.iterdir() if p.name.startswith(".")]


def test_results_staging_a_killed_eval_left_is_named(tmp_path, caplog):
    # a SIGKILL while eval wrote its results left .bsbr-results.tmp-* beside them, never named
    from bsbr.outputs import write_together

    (tmp_path / ".bsbr-results.tmp-ab12cd34").mkdir()
    with caplog.at_level("WARNING", logger="bsbr.outputs"):
        write_together([(tmp_path / "r.json", lambda p: p.write_text("{}"))])
    assert ".bsbr-results.tmp-ab12cd34 left by an earlier run that was killed" in caplog.text


def test_a_running_commands_staging_folders_are_not_called_a_killed_runs(tmp_path, caplog):
    # two evals writing results into one folder at once: each warned of the other's live staging folder as left
    # by a killed run, and told the user to remove it (which would break that run); so did staged outputs
    from bsbr.errors import OutputError
    from bsbr.outputs import staged_dir, write_together

    caplog.set_level("WARNING", logger="bsbr.outputs")
    write_together([(tmp_path / "a.json", lambda p: (write_together([(tmp_path / "b.json", lambda q: q.write_text(
        "{}"))]), p.write_text("{}")))])
    with pytest.raises(OutputError, match="appeared while writing"):  # (the inner one published m2 first)
        with staged_dir(tmp_path / "m2") as outer:
            with staged_dir(tmp_path / "m2") as inner:
                (inner / "config.json").write_text("{}")
    assert outer.name not in caplog.text and ".bsbr-results.tmp-" not in caplog.text
    (tmp_path / ".m3.old-abcd1234").mkdir()  # a killed run's, named
    with staged_dir(tmp_path / "m3"):
        pass
    assert "beside it lie .m3.old-abcd1234, left by an earlier run that was killed" in caplog.text


OLD_MODEL = '{"model_type": "bsbr"}'  # a bsbr model's config.json, which --overwrite replaces
OLD_JSON, OLD_PNG = '{"old": 1}', b"\x89PNG\r\n\x1a\nold"  # results of the kinds the options write


def test_a_result_file_another_program_put_there_meanwhile_is_not_replaced(tmp_path):
    # the result files were checked only before the work: a script saved as r.json meanwhile was replaced
    import bsbr.outputs as outputs
    from bsbr.errors import UserError

    def write_json(p):
        (tmp_path / "r.json").write_text("#!/bin/sh\necho mine\n")  # (while the results are computed)
        p.write_text("{}")

    with pytest.raises(UserError, match="r.json became a file no bsbr command wrote while the results were computed"):
        outputs.write_together([(tmp_path / "r.json", write_json), (tmp_path / "r.png", lambda p: p.write_text("x"))],
                               figures=[tmp_path / "r.png"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]
    assert (tmp_path / "r.json").read_text().startswith("#!/bin/sh")


def test_a_result_file_that_cannot_be_replaced_leaves_the_set_as_it_was(tmp_path, monkeypatch):
    # a file another user owns in a sticky folder cannot be renamed over: the first file was replaced, the
    # second not, and the staging folder was left behind
    import bsbr.outputs as outputs
    from bsbr.errors import OutputError, UserError

    (tmp_path / "r.json").write_text(OLD_JSON)
    (tmp_path / "r.png").write_bytes(OLD_PNG)
    real = os.replace

    def refuse_the_plot(src, dst):
        if Path(dst).name == "r.png":
            raise PermissionError(1, "Operation not permitted")
        real(src, dst)

    monkeypatch.setattr(outputs.os, "replace", refuse_the_plot)
    with pytest.raises(UserError, match="r.png: could not be replaced .*the result files are as they were"):
        outputs.write_together([(tmp_path / "r.json", lambda p: p.write_text("new json")),
                                (tmp_path / "r.png", lambda p: p.write_text("new png"))])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "r.png"]
    assert (tmp_path / "r.json").read_text() == OLD_JSON and (tmp_path / "r.png").read_bytes() == OLD_PNG
    monkeypatch.undo()
    # and such a file is refused before the work, as the other files no result may replace
    sticky = tmp_path / "shared"
    sticky.mkdir(mode=0o1777)
    sticky.chmod(0o1777)
    (sticky / "r.png").write_bytes(OLD_PNG)
    monkeypatch.setattr(outputs.os, "geteuid", lambda: os.stat(sticky).st_uid + 1)  # neither its nor the folder's owner
    with pytest.raises(OutputError, match="is another user.s file in a folder where only its owner may replace it"):
        outputs.check_output_files([("--json", str(sticky / "r.png"))])
    monkeypatch.undo()
    outputs.write_together([(tmp_path / "r.json", lambda p: p.write_text("new json")),
                            (tmp_path / "r.png", lambda p: p.write_text("new png"))])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "r.png", "shared"]
    assert (tmp_path / "r.png").read_text() == "new png"


def test_a_stray_staging_folder_does_not_make_a_users_model_a_bsbr_output(models, tmp_path, capsys):
    # one .bsbr.tmp-* folder marked the whole directory as bsbr's: --overwrite replaced a user's own model
    source, _, _ = models
    out = tmp_path / "mine"
    shutil.copytree(source, out)
    (out / "README.md").write_text("my notes\n")
    (out / ".bsbr.tmp-abcd1234").mkdir()
    line = refused(capsys, ["convert", source, out, "--chunk-size", "8", "--overwrite"], "convert", out)
    assert "holds files no bsbr command wrote" in line, line


def test_a_publish_that_finds_a_file_in_its_place_keeps_it(tmp_path):
    # --overwrite replaced a file a user saved at the output's path while the command ran
    import bsbr.outputs as outputs
    from bsbr.errors import OutputError

    out, new = tmp_path / "out", tmp_path / ".out.tmp-1"
    out.write_text("a file, appeared meanwhile")
    new.mkdir()
    (new / "config.json").write_text("new")
    with pytest.raises(OutputError, match="gained files no bsbr command wrote while writing: not replaced .the result "
                                          "is in .*.out.tmp-1"):
        outputs.publish_dir(new, out, overwrite=True)
    assert out.read_text() == "a file, appeared meanwhile" and (new / "config.json").read_text() == "new"


def test_a_file_put_in_the_old_output_as_it_is_swapped_out_stays(tmp_path, monkeypatch):
    # a note saved in the old output between the last check and the swap was deleted with the old output
    import bsbr.outputs as outputs
    from bsbr.errors import OutputError

    out, new = tmp_path / "out", tmp_path / ".out.tmp-1"
    for d, text in ((out, "old"), (new, "new")):
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"model_type": "bsbr", "v": text}))
    exchange = outputs._exchange

    def late(a, b):
        if not (b / "notes.txt").exists() and (b / "config.json").read_text().endswith('"old"}'):
            (b / "notes.txt").write_text("mine")
        return exchange(a, b)

    monkeypatch.setattr(outputs, "_exchange", late)
    with pytest.raises(OutputError, match="gained files no bsbr command wrote while writing: not replaced .the result "
                                          "is in .*.out.tmp-1"):
        outputs.publish_dir(new, out, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine" and json.loads((out / "config.json").read_text())["v"] == "old"
    assert json.loads((new / "config.json").read_text())["v"] == "new"


def test_overwrite_swaps_the_old_output_for_the_new_in_one_step(models, tmp_path, monkeypatch):
    # the old output was moved aside, then the new one moved in: a kill between the two renames left neither
    import bsbr.outputs as outputs
    from bsbr.models import load_bsbr_model

    source, _, _ = models
    out = tmp_path / "out"
    assert main(["convert", str(source), str(out), "--chunk-size", "8"]) == 0

    def no_rename(*args):
        raise AssertionError("published by two renames")

    monkeypatch.setattr(outputs.os, "replace", no_rename)
    assert main(["convert", str(source), str(out), "--chunk-size", "16", "--overwrite"]) == 0
    assert load_bsbr_model(out).config.chunk_size == 16 and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_overwrite_of_a_mount_point_is_refused_before_the_work(models, tmp_path, capsys, monkeypatch):
    # a mount point cannot be renamed: the conversion (or the whole demo) ran, then failed with EBUSY
    import bsbr.outputs as outputs

    source, _, _ = models
    out = tmp_path / "volume"
    assert main(["convert", str(source), str(out), "--chunk-size", "8"]) == 0
    real = os.path.ismount
    monkeypatch.setattr(outputs.os.path, "ismount", lambda p: Path(p) == out or real(p))
    line = refused(capsys, ["convert", source, out, "--chunk-size", "16", "--overwrite"], "convert", out)
    assert "is a mount point holding files, which --overwrite cannot replace" in line and "empty it" in line, line
    # without --overwrite it was "not empty: pass --overwrite", which then said "empty it"
    line = refused(capsys, ["convert", source, out, "--chunk-size", "16"], "convert", out)
    assert "is a mount point holding files" in line and "empty it" in line, line
    # distill publishes into its --output in place: its --overwrite of a mount point is no refusal
    from bsbr.outputs import check_output_dir

    check_output_dir(out, overwrite=True, option="--output", renamed=False)


def test_convert_overwrite_refuses_a_directory_another_command_is_writing(models, tmp_path, capsys):
    # a running distill holds its --output's lock: convert --overwrite replaced the directory under it
    from bsbr.outputs import output_lock

    source, _, _ = models
    out = tmp_path / "busy"
    assert main(["convert", str(source), str(out), "--chunk-size", "16"]) == 0
    with output_lock(out, "--output"):
        line = refused(capsys, ["convert", source, out, "--chunk-size", "8", "--overwrite"], "convert", out)
    assert "is being written by another bsbr command" in line, line
    assert main(["convert", str(source), str(out), "--chunk-size", "8", "--overwrite"]) == 0  # once it is done


def test_convert_takes_its_output_lock_before_loading_the_source(models, tmp_path, capsys, monkeypatch):
    # the lock was taken only to save: a second convert into the same OUTPUT_DIR did all its work, then failed
    # (leaving a staging folder of the model's size) or, with --overwrite, replaced the first one's result
    import bsbr.arguments
    from bsbr.outputs import output_lock

    source, _, _ = models
    out = tmp_path / "fresh"

    def never(*a, **k):
        raise AssertionError("the source was loaded while another command held the output")

    monkeypatch.setattr(bsbr.arguments, "load_model_arg", never)
    monkeypatch.setattr(bsbr.arguments, "load_tokenizer_arg", never)
    with output_lock(out, "OUTPUT_DIR"):
        line = refused(capsys, ["convert", source, out, "--chunk-size", "8"], "convert", out)
    assert "is being written by another bsbr command" in line, line
    assert not out.exists() and not list(tmp_path.iterdir())


def test_a_running_commands_staging_folder_is_not_called_a_killed_runs_leftover(models, tmp_path, capsys):
    # the output checks ran before the lock: a second convert into an existing folder said the first one's
    # staging folder was "left by a bsbr command that was killed" and advised --overwrite or removing it
    from bsbr.outputs import output_lock

    source, _, _ = models
    out = tmp_path / "empty"
    (out / ".bsbr.tmp-abcd1234").mkdir(parents=True)  # what a running convert stages its model in
    with output_lock(out, "OUTPUT_DIR"):
        for extra in ([], ["--overwrite"]):
            line = refused(capsys, ["convert", source, out, "--chunk-size", "8", *extra], "convert", out)
            assert "is being written by another bsbr command" in line, line


def test_the_lock_of_a_folder_in_a_parent_nothing_can_be_made_in_is_the_folder_itself(tmp_path, monkeypatch):
    # an empty folder of one's own in a read-only parent (/data/alice): no lock file could be made beside it,
    # and two commands wrote into it at once, both exiting 0 with their files mixed
    import bsbr.outputs as outputs
    from bsbr.errors import OutputError

    out = tmp_path / "mine"
    out.mkdir()
    monkeypatch.setattr(outputs, "unwritable_parent", lambda path: path.parent)  # (root may write anywhere)
    with outputs.output_lock(out, "--output"):
        with pytest.raises(OutputError, match="--output .*mine is being written by another bsbr command"):
            with outputs.output_lock(out, "--output"):
                pass
    with outputs.output_lock(out, "--output"):  # released
        pass
    assert list(tmp_path.iterdir()) == [out] and not list(out.iterdir())


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root, to act as another user")
def test_another_users_lock_file_left_by_a_killed_run_does_not_block_a_shared_folder():
    # a run killed in a shared folder (mode 777) leaves .NAME.lock at 0644: opened for writing, another user's
    # every later command was refused with "cannot write in FOLDER (Permission denied)", a folder it may write in
    import tempfile

    from bsbr.outputs import output_lock

    shared = Path(tempfile.mkdtemp(prefix="bsbr-shared-"))  # (pytest's own folders are closed to other users)
    try:
        shared.chmod(0o777)
        (shared / ".out.lock").touch(mode=0o644)
        with output_lock(shared / "first", "OUTPUT_DIR"):  # (imports what the lock needs before the fork)
            pass
        pid = os.fork()
        if pid == 0:  # the child, as "nobody"
            code = 1
            try:
                os.setgid(65534)
                os.setuid(65534)
                with output_lock(shared / "out", "OUTPUT_DIR"):
                    (shared / "out").mkdir()
                code = 0
            except BaseException as e:
                print(e)
            finally:
                os._exit(code)
        assert os.waitpid(pid, 0)[1] == 0
        assert (shared / "out").is_dir()
    finally:
        shutil.rmtree(shared)


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_an_output_where_nothing_can_be_made_is_named(models, capsys):
    # /proc looks writable to the checks, but nothing can be made there: the error was "/proc/.x.lock: No such
    # file or directory", naming neither the option nor what to do
    source, _, _ = models
    line = refused(capsys, ["convert", source, "/proc/bsbr-no-such-output", "--chunk-size", "8"], "convert")
    assert "OUTPUT_DIR /proc/bsbr-no-such-output: cannot write in /proc" in line and "choose another" in line, line


def test_an_output_on_a_read_only_file_system_is_named_so(models, tmp_path, capsys, monkeypatch):
    # a read-only mount was reported as "permission denied" (os.access says only that it cannot write)
    import types

    source, _, _ = models
    statvfs = os.statvfs
    monkeypatch.setattr(os, "access", lambda p, mode, **k: False if Path(p) == tmp_path else True)
    monkeypatch.setattr(os, "statvfs", lambda p: types.SimpleNamespace(f_flag=os.ST_RDONLY) if Path(p) == tmp_path
                        else statvfs(p))
    line = refused(capsys, ["convert", source, tmp_path / "out", "--chunk-size", "8"], "convert")
    assert line.endswith(f"cannot write in {tmp_path} (a read-only file system): choose another OUTPUT_DIR"), line


def test_convert_with_the_source_forgotten_refuses_to_replace_the_model(models, capsys):
    source, converted, _ = models
    line = refused(capsys, ["convert", converted, "--chunk-size", "16"], "convert", converted)
    # (a BSBR model: `bsbr convert MODEL NEW_DIR` would be refused, so it is not suggested)
    assert "is not empty" in line and "--overwrite" in line and "did you mean" not in line
    line = refused(capsys, ["convert", source, "--chunk-size", "16"], "convert", source)
    # (the user's pretrained model: was told to "remove them", as if its files were results)
    assert f"OUTPUT_DIR {source} holds another model than a BSBR one (its config.json), which bsbr never replaces: " \
        f"choose another OUTPUT_DIR (OUTPUT_DIR {source} holds a model: did you mean `bsbr convert {source} " \
        "NEW_DIR`?)" in line, line


@pytest.mark.parametrize("where", ["same", "inside", "around", "symlink"])
def test_convert_never_writes_into_or_over_the_source(models, tmp_path, capsys, where):
    source, _, _ = models
    if where == "symlink":
        (tmp_path / "link").symlink_to(source, target_is_directory=True)
    out = {"same": source, "inside": source / "bsbr", "around": source.parent, "symlink": tmp_path / "link"}[where]
    line = refused(capsys, ["convert", source, out, "--overwrite"], "convert", source)
    assert "overlaps the SOURCE" in line


def test_convert_checks_before_the_work(models, tmp_path, capsys, monkeypatch):
    source, _, _ = models
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    assert "is a file" in refused(capsys, ["convert", source, afile], "convert", afile)
    no_tok = tmp_path / "no-tokenizer"
    no_tok.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(source / name, no_tok / name)
    line = refused(capsys, ["convert", no_tok, tmp_path / "out"], "convert", no_tok)
    assert "no usable tokenizer" in line and not (tmp_path / "out").exists()
    from tokenizers import Tokenizer, models as tok_models
    from transformers import PreTrainedTokenizerFast

    big_tok = tmp_path / "big-tokenizer"
    shutil.copytree(no_tok, big_tok)
    vocab = {f"w{i}": i for i in range(150)}
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(tok_models.WordLevel(vocab, unk_token="w0")),
                            unk_token="w0", eos_token="w1").save_pretrained(big_tok)
    line = refused(capsys, ["convert", big_tok, tmp_path / "out"], "convert", big_tok)
    assert "tokenizer has 150 tokens, its model only 97" in line and not (tmp_path / "out").exists()
    assert line.endswith("or tokens were added to it (add_tokens) and the model was not resized: resize it "
                         "(model.resize_token_embeddings(len(tokenizer))) and save both"), line
    vocab = {f"w{i}": i for i in range(50)} | {"</s>": 120}  # few tokens, but an EOS past the embeddings: distill
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(tok_models.WordLevel(vocab, unk_token="w0")),  # failed on it
                            unk_token="w0", eos_token="</s>").save_pretrained(big_tok)
    line = refused(capsys, ["convert", big_tok, tmp_path / "out"], "convert", big_tok)
    assert "tokenizer's token '</s>' has id 120, its model only 97 embeddings" in line, line
    assert line.endswith("resize it (model.resize_token_embeddings(121)) and save both"), line  # (not len(tokenizer))
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(tok_models.WordLevel(vocab | {"</s>": 97}, unk_token="w0")),
                            unk_token="w0", eos_token="</s>").save_pretrained(big_tok)  # one past the last row
    line = refused(capsys, ["convert", big_tok, tmp_path / "out"], "convert", big_tok)
    assert "tokenizer's token '</s>' has id 97, its model only 97 embeddings" in line, line
    monkeypatch.chdir(tmp_path)
    t0 = time.perf_counter()
    line = refused(capsys, ["convert", "victim2", "out"], "convert")  # a relative path mistyped: no hub lookup
    assert "victim2 does not exist" in line and time.perf_counter() - t0 < 5
    assert "--chunk-size: must be an integer from 1 to" in refused(capsys, ["convert", source, "out", "--chunk-size", "0"], "convert")
    t0 = time.perf_counter()  # named by its flag, before the source is loaded
    line = refused(capsys, ["convert", "out", "--retrieval-blocks", "-1"], "convert")
    assert "--retrieval-blocks: must be an integer from 0 to" in line and time.perf_counter() - t0 < 5
    assert not (tmp_path / "out").exists()
    assert "current directory" in refused(capsys, ["convert", source, ".", "--overwrite"], "convert", tmp_path)


def test_convert_refuses_an_unwritable_output_before_loading(models, tmp_path, capsys, monkeypatch):
    source, _, _ = models
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    if hasattr(os, "geteuid") and os.geteuid() == 0:  # root writes anywhere: report the folder as the OS would
        access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == ro else access(p, mode, **kw))
    try:
        assert "permission denied" in refused(capsys, ["convert", source, ro / "out"], "convert", ro)
    finally:
        ro.chmod(0o700)


def test_overwrite_takes_a_killed_runs_lock_inside_an_output_for_bsbrs_and_names_a_users_files(models, tmp_path,
                                                                                               capsys):
    # `convert SRC out/v2` killed leaves out/.v2.lock: `convert SRC out --overwrite` then said out "holds files
    # no bsbr command wrote", naming none (the lock file, hidden from ls, was the one)
    from bsbr.outputs import output_lock

    source, converted, _ = models
    out = shutil.copytree(converted, tmp_path / "out")
    (out / ".v2.lock").touch()
    with output_lock(out / "v2", "OUTPUT_DIR"):  # a command writing out/v2 now
        line = refused(capsys, ["convert", source, out, "--overwrite", "--chunk-size", "8"], "convert", out)
        assert "holds .v2.lock, the lock of a bsbr command writing inside it now: wait for it" in line, line
    (out / ".v2.lock").touch()  # (removed as the lock was released: left by a kill, it stays)
    (out / "notes.txt").write_text("mine")
    line = refused(capsys, ["convert", source, out, "--overwrite", "--chunk-size", "8"], "convert", out)
    assert "holds files no bsbr command wrote (notes.txt), not only a BSBR model" in line, line
    (out / "notes.txt").unlink()
    assert main(["convert", str(source), str(out), "--overwrite", "--chunk-size", "8"]) == 0
    assert not (out / ".v2.lock").exists()


def test_the_model_card_tells_the_hub_its_base_model_library_and_task(models, tmp_path):
    # the card had no front matter: the hub listed a converted model with no base model, library or task
    from huggingface_hub import ModelCard
    from bsbr.arguments import BUNDLED_HUB_ID, hub_id, source_label
    from bsbr.outputs import model_card

    _, converted, _ = models
    data = ModelCard.load(converted / "README.md").data
    assert (data.library_name, data.pipeline_tag, data.tags) == ("transformers", "text-generation", ["bsbr"])
    assert data.base_model is None  # a local source: no hub id
    assert hub_id(source_label(None)) == BUNDLED_HUB_ID and hub_id("Qwen/Qwen2-0.5B") == "Qwen/Qwen2-0.5B"
    assert hub_id(str(tmp_path / "source")) is None and hub_id(None) is None
    mine = shutil.copytree(converted, tmp_path / "mine")
    for base in (BUNDLED_HUB_ID, "gpt2", "true"):  # ("true" is quoted in YAML)
        (mine / "README.md").write_text(model_card(base))
        assert ModelCard.load(mine / "README.md").data.base_model == base and bsbr.outputs.is_bsbr_output(mine)
    (mine / "README.md").write_text(model_card("gpt2") + "Trained on our data.\n")  # edited: the user's
    assert not bsbr.outputs.is_bsbr_output(mine)
    (mine / "README.md").write_text(model_card("gpt2").replace("---\n", "---\nlicense: mit\n", 1))
    assert not bsbr.outputs.is_bsbr_output(mine)


def test_overwrite_replaces_only_what_bsbr_wrote(models, tmp_path, capsys):
    source, converted, _ = models
    home = tmp_path / "models"
    shutil.copytree(converted, home / "conv")
    (home / "notes.txt").write_text("mine")
    line = refused(capsys, ["convert", source, home, "--overwrite", "--chunk-size", "8"], "convert", home)
    assert "holds files no bsbr command wrote" in line and "--overwrite replaces only a bsbr output" in line
    line = refused(capsys, ["demo", "--source", source, "--output", home, "--overwrite"], "demo", home)
    assert "holds files no bsbr command wrote" in line
    mine = shutil.copytree(converted, tmp_path / "mine")
    (mine / "notes.txt").write_text("a note beside the model")  # a bsbr model, with a user's file: kept
    assert "holds files no bsbr command wrote" in refused(capsys, ["convert", source, mine, "--overwrite"], "convert", mine)
    (mine / "notes.txt").unlink()
    card = (mine / "README.md").read_text()
    (mine / "README.md").write_text(card + "\nMy results on our data.\n")  # an edited model card: the user's
    line = refused(capsys, ["convert", source, mine, "--overwrite"], "convert", mine)
    assert "holds files no bsbr command wrote (its README.md is not the model card bsbr writes: edited?)" in line
    # the cards earlier bsbrs wrote are bsbr's (its outputs were refused)
    for earlier in ("before_2026-12-03", "before_2026-12-07", "without_front_matter"):
        shutil.copy(Path(__file__).parent / "data" / f"model_card_{earlier}.md", mine / "README.md")
        assert bsbr.outputs.is_bsbr_output(mine)
    (mine / "README.md").write_text(card)
    # a backup of the weights named like a shard (model-*.safetensors), the auto_map module edited: the user's
    shutil.copy(mine / "model.safetensors", mine / "model-before-distill.safetensors")
    line = refused(capsys, ["convert", source, mine, "--overwrite"], "convert", mine)
    assert "holds files no bsbr command wrote" in line and "model-before-distill.safetensors" in line, line
    (mine / "model-before-distill.safetensors").unlink()
    auto = (mine / "bsbr_auto.py").read_text()
    (mine / "bsbr_auto.py").write_text(auto + "import my_plugin\n")
    line = refused(capsys, ["convert", source, mine, "--overwrite"], "convert", mine)
    assert "holds files no bsbr command wrote" in line and "bsbr_auto.py" in line, line
    from bsbr.models.bsbr.configuration_bsbr import EARLIER_AUTO_CODES

    for earlier in EARLIER_AUTO_CODES:  # (the module earlier bsbrs wrote is bsbr's: a folder converted before the
        (mine / "bsbr_auto.py").write_text(earlier)  # task heads, or before its import was guarded, was refused)
        assert bsbr.outputs.is_bsbr_output(mine)
    assert "BSBRBaseModel, BSBRConfig, BSBRForCausalLM  # noqa" in EARLIER_AUTO_CODES[0]
    (mine / "bsbr_auto.py").write_text(auto)
    assert bsbr.outputs.is_bsbr_output(mine)
    (mine / "checkpoint").mkdir()  # a folder named like distill's, of other files
    (mine / "checkpoint" / "my_weights.pt").write_text("w")
    assert "holds files no bsbr command wrote" in refused(capsys, ["convert", source, mine, "--overwrite"], "convert", mine)
    shutil.rmtree(mine / "checkpoint")
    thesis = tmp_path / "thesis"  # a folder whose checkpoint/ or model/ only looks like bsbr's
    (thesis / "checkpoint").mkdir(parents=True)
    (thesis / "thesis.tex").write_text("mine")
    assert "holds files no bsbr command wrote" in refused(capsys, ["convert", source, thesis, "--overwrite"], "convert",
                                                          thesis)
    shutil.copytree(converted, thesis / "model")
    assert "holds files no bsbr command wrote" in refused(capsys, ["convert", source, thesis, "--overwrite"], "convert",
                                                          thesis)
    assert main(["convert", str(source), str(mine), "--overwrite", "--chunk-size", "16"]) == 0  # a bsbr model alone
    assert json.loads((mine / "config.json").read_text())["chunk_size"] == 16


def test_overwrite_replaces_a_model_whose_tokenizer_has_named_chat_templates(models, tmp_path, capsys, text):
    # transformers saves a tokenizer's named templates in additional_chat_templates/: bsbr's own output was
    # refused as holding files of the user's, and distill's second publish failed on the folder
    source = shutil.copytree(models[0], tmp_path / "source")
    tok = AutoTokenizer.from_pretrained(source)
    tok.chat_template = {"default": "{{ messages[0]['content'] }}", "tool_use": "{{ tools }}"}
    tok.save_pretrained(source)
    out = tmp_path / "out"
    assert main(["convert", str(source), str(out), "--chunk-size", "8"]) == 0
    assert (out / "additional_chat_templates" / "tool_use.jinja").is_file()
    assert main(["convert", str(source), str(out), "--chunk-size", "16", "--overwrite"]) == 0
    assert json.loads((out / "config.json").read_text())["chunk_size"] == 16
    run = ["distill", "--student", out, "--teacher", source, "--text-file", text, "--seq-len", "96",
           "--max-windows", "4", "--output", tmp_path / "dd", "--checkpoint-every", "1", "--params", "all"]
    assert main([str(a) for a in run + ["--steps", "1"]]) == 0
    assert main([str(a) for a in run + ["--steps", "2", "--resume"]]) == 0
    assert json.loads((tmp_path / "dd" / "distill.json").read_text())["step"] == 2
    (out / "additional_chat_templates" / "notes.txt").write_text("mine")
    line = refused(capsys, ["convert", source, out, "--overwrite"], "convert", out)
    assert "holds files no bsbr command wrote" in line


def test_overwrite_keeps_a_file_added_to_the_output_while_writing(models, tmp_path, capsys, monkeypatch):
    # the output was checked only before the work: a note saved into it meanwhile was deleted with the old model
    source, converted, _ = models
    out = shutil.copytree(converted, tmp_path / "out")
    before = tree_hash(out)
    real = bsbr.outputs.shared_modes

    def and_a_note(root):  # (runs on the complete result, right before it is published)
        (out / "notes.txt").write_text("mine")
        real(root)

    monkeypatch.setattr(bsbr.outputs, "shared_modes", and_a_note)
    line = refused(capsys, ["convert", source, out, "--overwrite", "--chunk-size", "16"], "convert")
    assert "gained files no bsbr command wrote while writing: not replaced (the result is in" in line
    (out / "notes.txt").unlink()
    assert tree_hash(out) == before


def test_overwrite_does_not_take_a_checkpoint_folder_for_bsbrs(models, tmp_path, capsys):
    # a user's fine-tuned llama with checkpoint/step-1000.safetensors: any non-empty checkpoint/ marked the
    # folder as bsbr's, and --overwrite replaced the weights, the config and the user's README.md
    source, converted, _ = models
    mine = shutil.copytree(source, tmp_path / "my_finetune")
    (mine / "README.md").write_text("my notes")
    (mine / "checkpoint").mkdir()
    save_file({"w": torch.zeros(2)}, mine / "checkpoint" / "step-1000.safetensors")
    assert "holds files no bsbr command wrote" in refused(capsys, ["convert", source, mine, "--overwrite"], "convert", mine)
    # nor a folder holding only checkpoint/*.safetensors of other names (deleted as an interrupted first save),
    # nor hidden names with ".tmp-" that are not bsbr's staging (".NAME.tmp-" and 8 characters)
    only = tmp_path / "only"
    (only / "checkpoint").mkdir(parents=True)
    save_file({"w": torch.zeros(2)}, only / "checkpoint" / "my-finetune.safetensors")
    assert "holds files no bsbr command wrote" in refused(capsys, ["convert", source, only, "--overwrite"], "convert", only)
    kept = shutil.copytree(converted, tmp_path / "kept")
    (kept / ".env.tmp-keep").write_text("SECRET=1")
    assert "holds files no bsbr command wrote" in refused(capsys, ["convert", source, kept, "--overwrite"], "convert", kept)
    # a distill output interrupted at its first save (its data files alone) is still replaced
    first = tmp_path / "first"
    (first / "checkpoint").mkdir(parents=True)
    save_file({"w": torch.zeros(2)}, first / "checkpoint" / "trainable-0000000-0123abcd.safetensors")
    (first / "checkpoint" / ".manifest.json.tmp-k9_x2abc").write_text("{")
    assert main(["convert", str(source), str(first), "--overwrite", "--chunk-size", "8"]) == 0
    assert (first / "config.json").is_file() and not (first / "checkpoint").exists()


def test_overwrite_refuses_the_current_directory_named_through_a_link(models, tmp_path, capsys, monkeypatch):
    # cd link/proj: the shell's $PWD names the directory through the link; it was replaced under the shell
    source, converted, _ = models
    proj = shutil.copytree(converted, tmp_path / "real" / "proj")
    (tmp_path / "link").symlink_to(tmp_path / "real", target_is_directory=True)
    monkeypatch.chdir(proj)
    inode = proj.stat().st_ino
    line = refused(capsys, ["convert", source, tmp_path / "link" / "proj", "--overwrite"], "convert", proj)
    assert "current directory" in line and proj.stat().st_ino == inode


def test_a_killed_conversions_staging_folder_is_named_and_replaceable(models, tmp_path, capsys):
    # a SIGKILL while convert wrote into an empty OUTPUT_DIR leaves .bsbr.tmp-*/: no command could reuse
    # the directory, and the message blamed the user's files
    source, _, _ = models
    out = tmp_path / "out"
    (out / ".bsbr.tmp-abcd1234").mkdir(parents=True)
    (out / ".bsbr.tmp-abcd1234" / "model.safetensors").write_bytes(b"partial")
    line = refused(capsys, ["convert", source, out, "--chunk-size", "8"], "convert", out)
    assert ".bsbr.tmp-abcd1234" in line and "killed" in line and "--overwrite" in line
    assert main(["convert", str(source), str(out), "--chunk-size", "8", "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []


@contextlib.contextmanager
def _ctrl_c_raises():
    """SIGINT raises KeyboardInterrupt inside the block, as in an interactive process, whatever handler the test
    process had (a worker process can start with SIGINT ignored)."""
    import signal

    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)


def test_an_interrupt_while_an_output_is_renamed_into_place_leaves_old_or_new(tmp_path, monkeypatch):
    # a Ctrl-C between moving the old output aside and renaming the new one in deleted the new one and
    # left OUTPUT missing (the old only in a hidden .OUT.old-*)
    import signal

    import bsbr.outputs as outputs

    out, new = tmp_path / "out", tmp_path / ".out.tmp-1"
    for d, text in ((out, OLD_MODEL), (new, "new")):
        d.mkdir()
        (d / "config.json").write_text(text)
    replace, calls = os.replace, []

    def interrupted_replace(a, b):
        replace(a, b)
        calls.append(b)
        if len(calls) == 1:
            signal.raise_signal(signal.SIGINT)  # right after the old output was moved aside

    monkeypatch.setattr(outputs.os, "replace", interrupted_replace)
    monkeypatch.setattr(outputs, "_exchange", lambda a, b: False)  # (where no one-step swap exists: two renames)
    with _ctrl_c_raises(), pytest.raises(KeyboardInterrupt):  # delivered once both renames are done
        outputs.publish_dir(new, out, overwrite=True)
    assert len(calls) == 2 and (out / "config.json").read_text() == "new" and sorted(os.listdir(tmp_path)) == ["out"]


def test_an_interrupt_while_the_replaced_output_is_removed_leaves_no_copy(tmp_path, monkeypatch):
    # a Ctrl-C while the old output (moved aside) was being deleted left a hidden .out.old-*/ holding part
    # of it, never named: gigabytes of a real model
    import signal

    import bsbr.outputs as outputs

    out, new = tmp_path / "out", tmp_path / ".out.tmp-1"
    for d, text in ((out, OLD_MODEL), (new, "new")):
        d.mkdir()
        (d / "config.json").write_text(text)
    rmtree = shutil.rmtree

    def interrupted_rmtree(path, *args, **kwargs):
        signal.raise_signal(signal.SIGINT)
        rmtree(path, *args, **kwargs)

    monkeypatch.setattr(outputs.shutil, "rmtree", interrupted_rmtree)
    with _ctrl_c_raises(), pytest.raises(KeyboardInterrupt):  # delivered once the old copy is gone
        outputs.publish_dir(new, out, overwrite=True)
    assert (out / "config.json").read_text() == "new" and sorted(os.listdir(tmp_path)) == ["out"]


def test_an_output_through_a_link_to_nothing_is_refused(models, text, tmp_path, capsys, monkeypatch):
    # a link to a disk not mounted: its folders were made on the disk below (exit 0, the results hidden once it is
    # mounted); a loop of links got past eval's check and failed after the evaluation
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").symlink_to(tmp_path / "mnt" / "ext" / "outputs")
    (tmp_path / "loopy").symlink_to("loopy")
    line = refused(capsys, ["convert", models[0], "outputs/m1", "--chunk-size", "16"], "convert")
    assert line.endswith(f"OUTPUT_DIR outputs/m1: outputs is a symbolic link to {tmp_path / 'mnt/ext/outputs'}, "
                         "which does not exist: mend the link (a disk not mounted?), or choose another "
                         "OUTPUT_DIR"), line
    line = refused(capsys, ["eval", models[1], "--reference", models[0], "--text-file", text, "--json",
                            "loopy/x/e.json"], "eval")
    assert line.endswith("--json loopy/x/e.json: loopy is a loop of symbolic links: mend the link (a disk not "
                         "mounted?), or choose another --json"), line
    line = refused(capsys, ["distill", "--student", models[1], "--teacher", models[0], "--text-file", text,
                            "--seq-len", "96", "--steps", "1", "--output", "outputs/d"], "distill")
    assert "--output outputs/d: outputs is a symbolic link to" in line, line
    assert not (tmp_path / "mnt").exists()
    # the output itself a link to nothing: a link is never an output (mending it met that refusal next)
    (tmp_path / "e.json").symlink_to(tmp_path / "target.json")
    line = refused(capsys, ["eval", models[1], "--reference", models[0], "--text-file", text, "--json", "e.json"],
                   "eval")
    assert "--json e.json is not a regular file (a link, device or pipe)" in line, line


def test_an_empty_output_folder_that_cannot_be_written_says_why(models, tmp_path, capsys, monkeypatch):
    # "OUTPUT_DIR X: directory is not writable", without why or what to do
    out = tmp_path / "out"
    out.mkdir()
    access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **k: Path(p) != out and access(p, mode, **k))
    line = refused(capsys, ["convert", models[0], out, "--chunk-size", "16"], "convert")
    assert line.endswith(f"OUTPUT_DIR {out}: directory is not writable (permission denied): choose another "
                         "OUTPUT_DIR, or make it writable"), line


def test_a_tokenizer_that_cannot_be_written_is_a_failed_write(models, tmp_path, capsys, monkeypatch):
    # the tokenizers library reports a full disk as a bare Exception: "internal error ... report it", status 1
    import transformers

    def full(self, *a, **k):
        raise Exception("No space left on device (os error 28)")

    monkeypatch.setattr(transformers.PreTrainedTokenizerBase, "save_pretrained", full)
    out = tmp_path / "out"
    line = refused(capsys, ["convert", models[0], out, "--chunk-size", "16"], "convert")
    assert f"OUTPUT_DIR {out}: could not write" in line and "No space left on device" in line, line
    assert "free some space or choose another OUTPUT_DIR" in line and not out.exists()


def test_convert_writes_all_or_nothing_and_records_its_source(models, tmp_path, capsys, monkeypatch):
    import bsbr.outputs
    from bsbr.convert.converter import load_source

    source, converted, _ = models
    out = tmp_path / "out"
    shutil.copytree(converted, out)
    before = tree_hash(out)

    def fail(directory, base_model=None):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(bsbr.outputs, "write_model_card", fail)  # the last file of the conversion fails
    assert main(["convert", str(source), str(out), "--overwrite", "--chunk-size", "16"]) == 2
    assert "No space left" in capsys.readouterr().err
    assert tree_hash(out) == before and sorted(os.listdir(tmp_path)) == ["out"]  # no temporary left behind
    monkeypatch.undo()
    assert main(["convert", str(source), str(out), "--overwrite", "--chunk-size", "16"]) == 0
    assert json.loads((out / "config.json").read_text())["chunk_size"] == 16
    meta = json.loads((out / "conversion.json").read_text())
    assert meta["source"] == dict(name=str(source), model_type="llama",
                                  fingerprint=bsbr.arguments.weights_fingerprint(load_source(source)),
                                  architecture=bsbr.arguments.architecture(load_source(source)))
    assert meta["source"]["architecture"]["hidden_act"] == "silu"
    assert "import bsbr" in (out / "README.md").read_text()
    assert sorted(os.listdir(tmp_path)) == ["out"]
    # a source named relative to the current directory is recorded absolute: later commands' "give
    # --reference NAME" holds from any directory
    monkeypatch.chdir(source.parent)
    assert main(["convert", source.name, str(tmp_path / "rel"), "--chunk-size", "16"]) == 0
    assert json.loads((tmp_path / "rel" / "conversion.json").read_text())["source"]["name"] == str(source.resolve())


@pytest.mark.parametrize("command,option", [("convert", "SOURCE"), ("distill", "--teacher"), ("eval", "--reference"),
                                            ("bench converted", "SOURCE"), ("demo", "--source")])
def test_a_bsbr_model_where_a_source_is_expected_is_refused_before_loading(models, text, tmp_path, capsys,
                                                                           monkeypatch, command, option):
    # distill --teacher CONVERTED --force trained the student against itself and exited 0
    _, converted, _ = models
    monkeypatch.setattr("bsbr.convert.converter.load_source", lambda *a: pytest.fail("loaded a model"))
    argv = {"convert": ["convert", converted, tmp_path / "x"],
            "distill": ["distill", "--student", converted, "--teacher", converted, "--text-file", text, "--steps", "1",
                        "--seq-len", "96", "--output", tmp_path / "x"],
            "eval": ["eval", converted, "--reference", converted, "--text-file", text, "--seq-len", "24", "--force"],
            "bench converted": ["bench", "converted", converted, "--seq-lens", "32", "--decode-contexts"],
            "demo": ["demo", "--source", converted, "--output", tmp_path / "x"]}[command]
    line = refused(capsys, argv, command, converted)
    assert f"{option} {converted} is already a BSBR model: give the model it was converted from" in line
    assert not (tmp_path / "x").exists()
    if command == "distill":  # --force allows another BSBR model as the teacher, never the student itself
        line = refused(capsys, [*argv, "--force"], command, converted)
        assert f"--teacher {converted} is the --student: it would learn from itself" in line


def test_distill_never_replaces_its_own_text_files(models, text, tmp_path, capsys):
    # an --output holding the --text-file: with --overwrite the text file was deleted
    out = tmp_path / "out"
    out.mkdir()
    inside = out / "train.txt"
    inside.write_text(text.read_text())
    line = refused(capsys, distill_args(models, inside, out, "--steps", "1", "--overwrite"), "distill", out)
    assert f"--output {out} overlaps the --text-file {inside}" in line and inside.read_text() == text.read_text()


# ------------------------------------------------------------------------------------------ generate
def test_generate_bad_inputs_are_one_line(models, tmp_path, capsys):
    _, converted, _ = models
    for empty in ("", "  "):
        assert "argument --prompt: is empty" in refused(capsys, ["generate", converted, "--prompt", empty], "generate")
    # an empty path would be the current directory
    assert "argument output_dir: is empty" in refused(capsys, ["convert", converted, ""], "convert")
    assert "argument --output: is empty" in refused(capsys, ["demo", "--output", ""], "demo")
    not_utf8 = os.fsdecode(b"\xff\xfe the")  # as argv carries bytes that are not UTF-8
    assert "--prompt is not UTF-8" in refused(capsys, ["generate", converted, "--prompt", not_utf8], "generate")
    # a lone surrogate argv never holds (a caller's own string): the same refusal, not the codec's words
    assert "--prompt is not UTF-8" in refused(capsys, ["generate", converted, "--prompt", "d\ud83df"], "generate")
    assert "--max-new-tokens" in refused(capsys, ["generate", converted, "--prompt", "x", "--max-new-tokens", "0"],
                                         "generate")
    assert "does not exist" in refused(capsys, ["generate", tmp_path / "none", "--prompt", "x"], "generate")
    assert "not a BSBR one" in refused(capsys, ["generate", models[0], "--prompt", "x"], "generate")
    typeless = tmp_path / "typeless"
    typeless.mkdir()
    (typeless / "config.json").write_text("{}")
    line = refused(capsys, ["generate", typeless, "--prompt", "x"], "generate")
    assert "without a model_type" in line and "None" not in line
    capsys.readouterr()
    assert main(["generate", str(converted), "--prompt", "def f", "--max-new-tokens", "5"]) == 0
    printed = capsys.readouterr().out.strip()
    # what it prints: the prompt as given and its greedy continuation of 5 tokens, as generate gives them
    from transformers import AutoTokenizer

    from bsbr import load_bsbr_model
    tok, model = AutoTokenizer.from_pretrained(converted), load_bsbr_model(converted)
    ids = tok("def f", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=5, do_sample=False, eos_token_id=None,
                             pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    assert out.shape[1] == ids["input_ids"].shape[1] + 5
    prompt = tok.decode(ids["input_ids"][0], skip_special_tokens=True)
    whole = tok.decode(out[0], skip_special_tokens=True)
    assert printed == "def f" + whole[len(prompt):] and whole.startswith(prompt) and whole != prompt


# ---------------------------------------------------------------------------------------------- eval
def test_eval_refuses_another_reference_unless_forced(models, text, tmp_path, capsys, caplog):
    source, converted, other = models
    base = ["eval", converted, "--text-file", text, "--seq-len", "24", "--max-windows", "1", "--no-passkey",
            "--no-progress"]
    line = refused(capsys, [*base, "--reference", other], "eval", converted)
    assert "is not the model" in line and "--force" in line
    assert "is a directory" in refused(capsys, [*base, "--reference", source, "--json", tmp_path], "eval", tmp_path)
    assert "does not exist" in refused(capsys, [*base, "--reference", "./nowhere"], "eval")
    assert "nope.txt does not exist" in refused(capsys, [*base[:2], "--text-file", tmp_path / "nope.txt"], "eval")
    assert "not a BSBR one" in refused(capsys, ["eval", source, "--reference", source], "eval")
    caplog.clear()
    assert main([str(a) for a in [*base, "--reference", other, "--force", "--json", tmp_path / "r.json"]]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["config"]["windows"] == 1
    assert f"--force: --reference {other} is not the model {converted} was converted from" in caplog.text  # (said)


def test_a_reference_or_teacher_with_the_same_weights_but_another_architecture_is_refused(models, text, tmp_path,
                                                                                        capsys):
    # only the weights were fingerprinted: the source's weights under another activation and rotary base (a
    # different model: other perplexities, another KL) passed as the reference and the teacher
    import shutil

    source, converted, _ = models
    edited = tmp_path / "edited"
    shutil.copytree(source, edited)
    config = json.loads((edited / "config.json").read_text())
    config["hidden_act"] = "relu"
    (edited / "config.json").write_text(json.dumps(config))
    line = refused(capsys, ["eval", converted, "--reference", edited, "--text-file", text, "--seq-len", "24",
                            "--max-windows", "1", "--no-passkey", "--no-progress"], "eval", converted)
    assert "is not the model" in line and "its config differs: hidden_act" in line and "--force" in line, line
    line = refused(capsys, ["distill", "--student", converted, "--teacher", edited, "--text-file", text, "--seq-len",
                            "96", "--steps", "1", "--output", tmp_path / "out"], "distill", converted)
    assert "its config differs: hidden_act" in line, line
    assert not (tmp_path / "out").exists()


def test_provenance_takes_float32_rounding_and_compares_the_sliding_window(tmp_path):
    # a GGUF file holds its floats in float32 (1e-5 reads back as 9.99999975e-06): the same model from a GGUF
    # and from its folder was refused; a reference without the source's sliding window passed
    from transformers import MistralConfig, MistralForCausalLM

    from bsbr.arguments import METADATA, check_source, source_record
    from bsbr.errors import SourceMismatchError

    kw = dict(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
              num_key_value_heads=1, rms_norm_eps=1e-5)
    torch.manual_seed(0)
    source = MistralForCausalLM(MistralConfig(**kw, sliding_window=16))
    (tmp_path / METADATA).write_text(json.dumps(dict(source=source_record("src", source))))

    def like(**changed):
        other = MistralForCausalLM(MistralConfig(**{**kw, "sliding_window": 16, **changed}))
        other.load_state_dict(source.state_dict())
        return other

    assert check_source(tmp_path, "src.gguf", like(rms_norm_eps=float(torch.tensor(1e-5))), option="--reference") is None
    with pytest.raises(SourceMismatchError, match="its config differs: sliding_layers, sliding_window"):
        check_source(tmp_path, "other", like(sliding_window=None), option="--reference")
    with pytest.raises(SourceMismatchError, match="its config differs: norm_eps"):
        check_source(tmp_path, "other", like(rms_norm_eps=1e-6), option="--reference")


@pytest.mark.parametrize("command", ["eval", "distill"])
def test_the_bundled_default_is_refused_before_loading_for_a_model_of_another_source(models, text, tmp_path, capsys,
                                                                                   monkeypatch, command):
    # without --reference / --teacher, the bundled SmolLM2 was loaded (23 s) only to find it is not the source
    source, converted, _ = models
    monkeypatch.setattr("bsbr.convert.converter.load_source", lambda *a: pytest.fail("loaded a model"))
    argv = (["eval", converted, "--text-file", text, "--seq-len", "24", "--no-passkey"] if command == "eval" else
            ["distill", "--student", converted, "--text-file", text, "--seq-len", "96", "--steps", "1",
             "--output", tmp_path / "out"])
    option = "--reference" if command == "eval" else "--teacher"
    line = refused(capsys, argv, command, converted)
    assert line.endswith(f"{converted} was converted from {source}: give {option} {source}"), line
    assert not (tmp_path / "out").exists()


def test_a_source_recorded_by_name_alone_is_read_as_the_source(models, text, tmp_path, capsys, monkeypatch):
    # bsbr 0.2.0 to 2026-11-28 wrote conversion.json's source as its name alone: read as naming none
    source, converted, _ = models
    old = tmp_path / "old"
    shutil.copytree(converted, old)
    meta = json.loads((old / "conversion.json").read_text())
    (old / "conversion.json").write_text(json.dumps({**meta, "source": str(source)}))
    monkeypatch.setattr("bsbr.convert.converter.load_source", lambda *a: pytest.fail("loaded a model"))
    line = refused(capsys, ["eval", old, "--text-file", text, "--seq-len", "24", "--no-passkey"], "eval", old)
    assert line.endswith(f"{old} was converted from {source}: give --reference {source}"), line


# ------------------------------------------------------------------------------------------- distill
@pytest.mark.parametrize("extra, message", [
    (["--steps", "-5"], "--steps: must be an integer from 1 to"),
    (["--steps", "0"], "--steps: must be an integer from 1 to"),
    ([], "nothing to train"),
    (["--minutes", "0"], "--minutes must be a finite number > 0"),
    (["--steps", "3", "--checkpoint-every", "0"], "--checkpoint-every: must be an integer from 1 to"),
    (["--steps", "3", "--lr", "-1"], "argument --lr: '-1': give a number > 0"),
    (["--steps", "3", "--params", "all", "--base-lr", "0"], "argument --base-lr: '0': give a number > 0"),
    (["--steps", "2", "--resume", "--overwrite"], "give one of them"),
])
def test_distill_refuses_a_plan_that_trains_nothing(models, text, tmp_path, capsys, extra, message):
    assert message in refused(capsys, distill_args(models, text, tmp_path / "out", *extra), "distill", models[1])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("variable, value", [("WORLD_SIZE", "abc"), ("WORLD_SIZE", "0"), ("LOCAL_WORLD_SIZE", "x")])
def test_distill_names_a_torchrun_variable_that_is_no_number(models, text, tmp_path, capsys, monkeypatch, variable,
                                                             value):
    # "error: invalid literal for int() with base 10: 'abc'"; a bad LOCAL_WORLD_SIZE on one process turned a
    # SIGTERM's checkpoint and resume line into that error, exit 2
    monkeypatch.setenv(variable, value)
    if variable == "LOCAL_WORLD_SIZE":
        monkeypatch.setenv("WORLD_SIZE", "2")
    line = refused(capsys, distill_args(models, text, tmp_path / "out", "--steps", "1"), "distill", models[1])
    assert f"the environment variable {variable}={value!r} is not a number of processes" in line
    assert not (tmp_path / "out").exists()
    from argparse import Namespace

    from bsbr.distill.cli import _resume_command

    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "x")  # (read only for several processes)
    assert _resume_command(Namespace(argv=["distill", "--output", "o"])) == "bsbr distill --output o --resume"


def test_an_output_inside_an_input_is_refused_before_anything_is_made_there(models, text, tmp_path, capsys):
    """The output lock made the output's missing folders and its lock file inside the input (then removed them),
    before the overlap was refused: the input was written into."""
    source, converted, _ = models
    for argv, command, inp in ((["convert", source, source / "new" / "x"], "convert", source),
                               (distill_args(models, text, converted / "new" / "x", "--steps", "2"), "distill",
                                converted),
                               (["demo", "--source", source, "--output", source / "new" / "x"], "demo", source)):
        before = inp.stat().st_mtime_ns
        assert "overlaps the" in refused(capsys, argv, command, inp)
        assert not (inp / "new").exists() and inp.stat().st_mtime_ns == before, command


def test_distill_never_writes_into_the_student(models, text, tmp_path, capsys):
    source, converted, _ = models
    line = refused(capsys, distill_args(models, text, converted, "--steps", "2", "--overwrite"), "distill",
                   converted)
    assert "overlaps the --student" in line
    line = refused(capsys, distill_args(models, text, source / "out", "--steps", "2"), "distill", source)
    assert "overlaps the --teacher" in line
    args = distill_args(models, text, tmp_path / "out", "--steps", "2")
    assert "not a BSBR one" in refused(capsys, override(args, "--student", source), "distill", source)
    line = refused(capsys, override(args, "--seq-len", "100000"), "distill")
    assert "fewer than the 100,000 tokens of one window" in line
    assert not (tmp_path / "out").exists()


def test_distill_refuses_another_teacher(models, text, tmp_path, capsys, caplog):
    from transformers import LlamaConfig, LlamaForCausalLM

    source, converted, other = models
    args = distill_args(models, text, tmp_path / "out", "--steps", "2")
    line = refused(capsys, override(args, "--teacher", other), "distill", converted, other)
    assert "is not the model" in line and "--force" in line
    wide = tmp_path / "wide-vocab"
    LlamaForCausalLM(LlamaConfig(vocab_size=120, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                 num_attention_heads=6, num_key_value_heads=2)).save_pretrained(wide)
    assert "is not the model" in refused(capsys, override(args, "--teacher", wide), "distill", converted)
    # (no --force compares them)
    line = refused(capsys, override(args, "--teacher", wide, "--force"), "distill", converted)
    assert f"{converted} has a vocabulary of 97 tokens, --teacher {wide} 120: give the model" in line, line
    assert not (tmp_path / "out").exists()
    caplog.clear()
    assert main([str(a) for a in override(args, "--teacher", other, "--force")]) == 0
    assert f"--force: --teacher {other} is not the model {converted} was converted from" in caplog.text  # (said)
    # another BSBR model as the teacher, with --force: accepted up front, then refused once the student loaded
    assert main(["convert", str(other), str(tmp_path / "other-bsbr"), "--chunk-size", "8"]) == 0
    args = distill_args(models, text, tmp_path / "out2", "--steps", "2")
    assert main([str(a) for a in override(args, "--teacher", tmp_path / "other-bsbr", "--force")]) == 0


def _as_converted(record_path, student_record: str) -> bool:
    """Whether a distilled model's conversion record is the student's, but for its note that it was distilled
    since (and no folder path: a record publishes none)."""
    record, student = json.loads(record_path.read_text()), json.loads(student_record)
    assert record.pop("distilled") == "distill.json" and "output_dir" not in record
    return record == student


@pytest.mark.slow
def test_distill_checkpoint_is_never_replaced_silently(models, text, tmp_path, capsys):
    out = tmp_path / "out"
    args = [str(a) for a in distill_args(models, text, out, "--steps", "3", "--checkpoint-every", "1")]
    assert main(args) == 0
    manifest = json.loads((out / "checkpoint" / "manifest.json").read_text())
    assert manifest["step"] == 3 and set(manifest["files"]) == {"weights", "optimizer"}
    assert all(f["size"] > 0 and len(f["sha256"]) == 64 for f in manifest["files"].values())
    assert manifest["progress"]["run"]["seq_len"] == 96 and manifest["progress"]["config"]["lr"] == 3e-3

    line = refused(capsys, override(args, "--steps", "5"), "distill", out)  # a rerun without --resume
    assert "holds a checkpoint" in line and "--resume" in line and "--overwrite" in line
    line = refused(capsys, override(args, "--resume", "--lr", "1e-3"), "distill", out)
    assert "other settings" in line and "lr: checkpoint 0.003, now 0.001" in line
    line = refused(capsys, override(args, "--resume", "--seq-len", "104"), "distill", out)
    assert "other settings" in line and "--seq-len: checkpoint 96, now 104" in line
    other_text = tmp_path / "other.py"
    other_text.write_text(TEXT.replace("x", "y"))
    other_args = [str(other_text) if a == str(text) else a for a in args]
    line = refused(capsys, override(other_args, "--resume", "--steps", "5"), "distill", out)
    assert "the training windows' tokens" in line

    ckpt = out / "checkpoint"
    data = ckpt / manifest["files"]["weights"]["name"]
    good = data.read_bytes()
    data.write_bytes(good[: len(good) // 2])  # truncated
    assert "is corrupt" in refused(capsys, override(args, "--resume"), "distill", out)
    flipped = bytearray(good)
    flipped[-3] ^= 1  # one bit of a weight: the same size, another hash
    data.write_bytes(bytes(flipped))
    assert "is corrupt" in refused(capsys, override(args, "--resume"), "distill", out)
    data.unlink()  # missing
    assert "is partial" in refused(capsys, override(args, "--resume"), "distill", out)
    data.write_bytes(good)
    assert main(override(args, "--resume", "--steps", "5")) == 0  # more steps: allowed
    assert json.loads((ckpt / "manifest.json").read_text())["step"] == 5
    assert main(override(args, "--overwrite")) == 0  # start over: 3 steps again
    assert json.loads((ckpt / "manifest.json").read_text())["step"] == 3
    # the distilled model keeps its source's record: eval --reference checks it as for the conversion
    source, converted, other = models
    assert _as_converted(out / "conversion.json", (converted / "conversion.json").read_text())
    line = refused(capsys, ["eval", out, "--reference", other, "--text-file", args[args.index("--text-file") + 1],
                            "--seq-len", "24", "--max-windows", "1", "--no-passkey"], "eval", out)
    assert "is not the model" in line


def test_distill_resume_into_a_directory_without_a_checkpoint_refuses(models, text, tmp_path, capsys):
    _, converted, _ = models
    out = tmp_path / "out"
    shutil.copytree(converted, out)
    assert "holds no checkpoint" in refused(capsys, distill_args(models, text, out, "--steps", "2", "--resume"),
                                            "distill", out)


def test_distill_resumes_or_overwrites_past_the_temporary_file_a_killed_checkpoint_save_left(models, text, tmp_path):
    # safetensors writes a file through checkpoint/.tmpXXXXXX: after a kill -9 there, --resume and --overwrite
    # both refused the output as holding files no bsbr command wrote
    out = tmp_path / "out"
    def run(*extra):
        return main([str(a) for a in distill_args(models, text, out, "--params", "all", *extra)])

    assert run("--steps", "1", "--checkpoint-every", "1") == 0
    (out / "checkpoint" / ".tmpQ1w2E3").write_bytes(b"half a tensor")
    assert run("--steps", "2", "--checkpoint-every", "1", "--resume") == 0
    assert json.loads((out / "distill.json").read_text())["step"] == 2
    assert not (out / "checkpoint" / ".tmpQ1w2E3").exists()  # the next save removes it
    (out / "checkpoint" / ".tmpQ1w2E3").write_bytes(b"half a tensor")
    assert run("--steps", "1", "--overwrite") == 0


def test_distill_writes_the_conversion_record_of_the_student_it_loaded(models, text, tmp_path, monkeypatch):
    # conversion.json was read from --student when the model was published: a student folder converted again
    # meanwhile (another source) gave the distilled model that source's record, and eval --reference took it
    import bsbr.distill.trainer as trainer

    source, converted, _ = models
    student, out = shutil.copytree(converted, tmp_path / "student"), tmp_path / "out"
    record = (student / "conversion.json").read_text()
    real = trainer.distill

    def converted_again_meanwhile(*args, **kwargs):
        (student / "conversion.json").write_text('{"source": "another"}')
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "distill", converted_again_meanwhile)
    assert main([str(a) for a in ["distill", "--student", student, "--teacher", source, "--text-file", text,
                                  "--seq-len", "96", "--max-windows", "4", "--output", out, "--steps", "1",
                                  "--params", "all"]]) == 0
    assert _as_converted(out / "conversion.json", record)


@pytest.mark.parametrize("where", ["_expand_home", "_apply_settings"])
def test_a_ctrl_c_as_the_command_starts_is_one_line(models, tmp_path, capsys, monkeypatch, where):
    # a Ctrl-C 0.1 s in (between parsing and the command's own handling) printed a traceback
    import bsbr.cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(bsbr.cli, where, interrupted)
    capsys.readouterr()
    assert main(["convert", str(models[0]), str(tmp_path / "out")]) == 130
    assert capsys.readouterr().err == "bsbr convert: interrupted\n" and not (tmp_path / "out").exists()


def test_outputs_whose_path_runs_through_a_link_and_dotdot_are_written_where_the_system_finds_them(
        models, text, tmp_path, capsys):
    # W/link/../out is W/models/out to the system (the link's folder's parent), as bsbr's readers take it;
    # the outputs took it for W/out: convert said "saved to W/link/../out" and generate then found no model
    # there; distill once checked W/out and wrote through the link (its first checkpoint failed)
    source, _, _ = models
    (tmp_path / "models" / "student").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "models" / "student")
    out = f"{tmp_path}/link/../out"
    assert main(["convert", str(source), out, "--chunk-size", "8"]) == 0
    assert (tmp_path / "models" / "out" / "config.json").is_file() and not (tmp_path / "out").exists()
    assert main(["generate", out, "--prompt", "the", "--max-new-tokens", "1"]) == 0
    assert main(["eval", out, "--reference", str(source), "--no-passkey", "--text-file", str(text), "--seq-len", "32",
                 "--max-windows", "1", "--json", f"{tmp_path}/link/../r.json"]) == 0
    assert json.loads((tmp_path / "models" / "r.json").read_text()) and not (tmp_path / "r.json").exists()
    distilled = f"{tmp_path}/link/../distilled"
    assert main([str(a) for a in distill_args(models, text, distilled, "--steps", "1", "--params", "all",
                                              "--checkpoint-every", "1")]) == 0
    assert (tmp_path / "models" / "distilled" / "config.json").is_file() and not (tmp_path / "distilled").exists()


def test_a_model_replaced_while_it_is_read_is_refused(models, text, tmp_path, capsys, monkeypatch):
    # eval read the model's weights, then (after loading the reference) its conversion.json: a convert
    # --overwrite in between gave one conversion's perplexity under the other's record, exit 0; generate read a
    # config and weights of two models and called the checkpoint corrupt
    import bsbr.convert.converter
    from bsbr.models import BSBRForCausalLM

    source, converted, other = models
    out, newer = tmp_path / "out", tmp_path / "newer"  # other's conversion, replaced by source's
    assert main(["convert", str(other), str(out), "--chunk-size", "8", "--compression-factor", "2"]) == 0
    shutil.copytree(converted, newer)

    def swap():
        if newer.exists():
            os.rename(out, tmp_path / "older")
            os.rename(newer, out)

    load_source = bsbr.convert.converter.load_source
    monkeypatch.setattr(bsbr.convert.converter, "load_source", lambda *a, **k: (swap(), load_source(*a, **k))[1])
    line = refused(capsys, ["eval", out, "--reference", source, "--no-passkey", "--text-file", text, "--seq-len",
                            "32", "--max-windows", "1"], "eval")
    assert f"{out} was replaced while it was read" in line, line
    monkeypatch.undo()
    os.rename(out, newer)
    os.rename(tmp_path / "older", out)
    from_pretrained = BSBRForCausalLM.from_pretrained.__func__
    monkeypatch.setattr(BSBRForCausalLM, "from_pretrained", classmethod(
        lambda cls, *a, **k: (model := from_pretrained(cls, *a, **k), swap())[0]))
    line = refused(capsys, ["generate", out, "--prompt", "the", "--max-new-tokens", "1"], "generate")
    assert f"{out} was replaced while it was read" in line, line


def test_distill_refuses_an_output_a_students_links_point_into(models, text, tmp_path, capsys):
    # a student made of links (cp -rs) into --output: distill --overwrite replaced the files they point to
    _, converted, _ = models
    target = shutil.copytree(converted, tmp_path / "target")
    links = tmp_path / "links"
    links.mkdir()
    for f in target.iterdir():
        (links / f.name).symlink_to(f)
    args = distill_args(models, text, target, "--steps", "1", "--overwrite")
    args[args.index("--student") + 1] = links
    line = refused(capsys, args, "distill", target)
    assert f"--output {target} holds files the --student {links} links to" in line


def test_an_output_name_longer_than_a_file_name_may_be_is_refused_by_its_option(models, text, tmp_path, capsys):
    # "bsbr convert: error: /tmp/.../aaaa...: File name too long", from the first look at the path
    source, converted, _ = models
    long = tmp_path / ("a" * 256)
    assert "OUTPUT_DIR" in refused(capsys, ["convert", source, long / "m"], "convert")
    line = refused(capsys, distill_args(models, text, long, "--steps", "1"), "distill")
    assert line.startswith(f"bsbr distill: error: --output {long}: its name aaaa")
    assert "more than a file name may be" in line
    assert "--json" in refused(capsys, ["eval", converted, "--no-passkey", "--text-file", text, "--json",
                                        long / "r.json"], "eval")
    deep = tmp_path.joinpath(*["d" * 250] * 17)  # each name fits, the path does not (4,096 bytes)
    assert "OUTPUT_DIR" in refused(capsys, ["convert", source, deep], "convert")


def test_an_output_is_checked_against_an_input_read_through_a_link_and_dotdot(models, text, tmp_path, capsys):
    # --dataset link/../data.jsonl is read through the link (the folder above its target), but the output
    # check took ".." against the link's name: --json of that file replaced the dataset with the results
    _, converted, _ = models
    (tmp_path / "real" / "snap").mkdir(parents=True)
    (tmp_path / "real" / "ds").mkdir()
    data = tmp_path / "real" / "ds" / "data.jsonl"
    data.write_text(json.dumps({"text": TEXT}) + "\n")
    (tmp_path / "link").symlink_to(tmp_path / "real" / "snap")
    line = refused(capsys, ["eval", converted, "--no-passkey", "--dataset", f"{tmp_path}/link/../ds/data.jsonl",
                            "--dataset-split", "train", "--seq-len", "32", "--json", data], "eval", data)
    assert "would overwrite the --dataset" in line


def _fork_cli(argv, quiet=True):
    """Run ``main(argv)`` in a forked child (no interpreter start); returns its pid."""
    pid = os.fork()
    if pid == 0:  # the child
        code = 1
        try:
            if quiet:
                sys.stdout = sys.stderr = open(os.devnull, "w")  # noqa: SIM115 (the child exits right after)
            code = main(argv)
        finally:
            os._exit(code)
    return pid


def _final_weights(out):
    return load_file(out / "model.safetensors")


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_sigterm_writes_a_checkpoint_and_prints_the_resume_command(models, text, tmp_path):
    out = tmp_path / "out"
    steps = 40  # the signal arrives within ~50 ms of the first step; the resume runs the rest here
    args = [str(a) for a in distill_args(models, text, out, "--steps", str(steps), "--checkpoint-every", "1")]
    err = tmp_path / "err.txt"
    import subprocess

    # a fresh interpreter, not a fork: a child forked after the parent's torch thread pool has run can
    # hang in OpenMP, and this test waits for the child's progress
    code = "import sys; from bsbr.cli import main; sys.exit(main(sys.argv[1:]))"
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    with open(err, "w") as err_file:
        proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.DEVNULL, stderr=err_file,
                                env=env)
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoint" / "manifest.json").exists():  # a step is done (no progress bar in a log)
            assert time.monotonic() < deadline and proc.poll() is None, err.read_text(errors="replace")[-2000:]
            time.sleep(0.02)
        proc.send_signal(15)
        status = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert status == 130, err.read_text()[-2000:]
    last = err.read_text().strip().splitlines()[-1]
    assert last.startswith("bsbr distill: interrupted at step") and "checkpoint written to" in last, last
    step = int(last.split(" step ")[1].split(";")[0])
    assert 0 < step < steps
    command = last.split("resume with: ")[1]
    assert command.startswith("bsbr distill ") and command.endswith("--resume")
    manifest = json.loads((out / "checkpoint" / "manifest.json").read_text())
    assert manifest["step"] == step and not (out / "config.json").exists()
    assert main(command.split()[1:]) == 0
    log = json.loads((out / "distill.json").read_text())["log"]
    assert [e["step"] for e in log] == list(range(1, steps + 1))


@pytest.mark.parametrize("command", ["convert", "distill"])
@pytest.mark.slow
def test_sigterm_while_loading_is_an_interrupt(models, text, tmp_path, command):
    """SIGTERM before distill trains (or in any other command) exits 130 with one line, as Ctrl-C does."""
    import subprocess

    source, _, _ = models
    out = tmp_path / "out"
    argv = [str(a) for a in (distill_args(models, text, out, "--steps", "2") if command == "distill"
                             else ["convert", source, out, "--chunk-size", "8"])]
    code = ("import os, signal, sys, time; import bsbr.arguments, bsbr.distill.cli\n"
            "def term(*a, **k):\n    os.kill(os.getpid(), signal.SIGTERM); time.sleep(30)\n"
            "bsbr.arguments.load_tokenizer_arg = bsbr.distill.cli.load_tokenizer_arg = term\n"
            "from bsbr.cli import main; sys.exit(main(sys.argv[1:]))")
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 130, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == f"bsbr {command}: interrupted", proc.stderr[-2000:]
    assert not out.exists()


def test_a_ctrl_c_a_library_swallowed_still_stops_the_command_before_it_publishes(models, tmp_path, capsys,
                                                                                   monkeypatch):
    """An interrupt raised inside a ``__del__`` (as one during an import can be) is only printed: the
    command would run on and publish. The handler remembers it, and nothing is published after it."""
    import bsbr.cli
    import bsbr.convert.converter as converter

    source, _, _ = models
    convert = converter.TransformerToBSBRConverter.convert

    def convert_then_swallow(self, src):
        model = convert(self, src)
        try:
            bsbr.cli._interrupt(2, None)  # as the SIGINT handler does
        except KeyboardInterrupt:
            pass
        return model

    monkeypatch.setattr(converter.TransformerToBSBRConverter, "convert", convert_then_swallow)
    out = tmp_path / "out"
    assert main(["convert", str(source), str(out),
                 "--chunk-size", "8"]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "bsbr convert: interrupted"
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    from bsbr.results import write_json

    write_json({"later": 1}, tmp_path / "later.json")  # the interrupt ended with its command
    assert (tmp_path / "later.json").is_file()


def test_a_ctrl_c_a_library_swallowed_in_a_command_that_then_finished_is_an_interrupt(monkeypatch, capsys):
    # (a command that publishes nothing after it, or checks too late: its 0 is not what the user asked for)
    import bsbr.bench.attention
    import bsbr.cli

    def swallowed(args):
        try:
            bsbr.cli._interrupt(2, None)
        except KeyboardInterrupt:
            pass
        return 0

    monkeypatch.setattr(bsbr.bench.attention, "run_attention", swallowed)
    assert main(["bench", "attention", "--seq-lens", "64"]) == 130
    assert capsys.readouterr().err.strip() == "bsbr bench attention: interrupted"


def test_a_ctrl_c_swallowed_while_loading_stops_distill_and_eval_before_their_work(models, text, tmp_path, capsys,
                                                                                  monkeypatch):
    """Swallowed while a model loads, the interrupt stops the command right after the load: distill trained
    for minutes before (and then could not write its checkpoint), eval evaluated everything."""
    import bsbr.cli
    import bsbr.convert.converter as converter
    import bsbr.distill.trainer as trainer
    import bsbr.evaluate.metrics as metrics

    load = converter.load_source

    def load_then_swallow(source):
        model = load(source)
        try:
            bsbr.cli._interrupt(2, None)  # as the SIGINT handler does
        except KeyboardInterrupt:
            pass
        return model

    went_on = []

    def never(*a, **k):  # (an exception would end the command as interrupted too: record the call instead)
        went_on.append(1)
        return real(*a, **k)

    monkeypatch.setattr(converter, "load_source", load_then_swallow)
    real = trainer.distill  # (bsbr.distill.cli imports it when it runs)
    monkeypatch.setattr(trainer, "distill", never)
    out = tmp_path / "distilled"
    assert main([str(a) for a in distill_args(models, text, out, "--steps", "2")]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "bsbr distill: interrupted"
    assert not out.exists() and not went_on
    source, converted, _ = models
    real = metrics.MetricAccumulator
    monkeypatch.setattr(metrics, "MetricAccumulator", never)
    assert main(["eval", str(converted), "--reference", str(source), "--no-passkey", "--text-file", str(text),
                 "--seq-len", "32", "--max-windows", "1", "--json", str(tmp_path / "r.json")]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "bsbr eval: interrupted"
    assert not (tmp_path / "r.json").exists() and not went_on


def test_a_result_file_that_cannot_be_written_is_named(models, text, tmp_path, capsys, monkeypatch):
    import errno

    import bsbr.outputs as outputs

    _, converted, _ = models
    source = models[0]

    def full(parent, prefix):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(outputs, "temp_dir", full)  # (bsbr.results.write_together stages with it)
    out = tmp_path / "results" / "r.json"
    line = refused(capsys, ["eval", converted, "--reference", source, "--no-passkey", "--text-file", text,
                            "--seq-len", "32", "--max-windows", "1", "--json", out], "eval", converted)
    assert f"{out}: could not be written (No space left on device)" in line and "another path" in line
    assert not (tmp_path / "results").exists()


def test_a_task_folder_or_demo_output_that_cannot_be_written_is_named(models, tmp_path, capsys, monkeypatch):
    # a full disk under a new --lm-eval-task-dir gave "error: [Errno 28] No space left on device", and a demo whose
    # output could not be renamed into place named only its staging folder
    import errno

    import bsbr.outputs as outputs

    source, converted, _ = models
    real = outputs.temp_dir

    def full(parent, prefix):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(outputs, "temp_dir", full)
    task = tmp_path / "task"
    line = refused(capsys, ["eval", converted, "--lm-eval-task-dir", task, "--passkey-lengths", "96",
                            "--passkey-depths", "0.5", "--passkey-trials", "1"], "eval", converted)
    assert line.endswith(f"--lm-eval-task-dir {task}: could not write the task ([Errno 28] No space left on device); "
                         f"{task} is as it was: free some space or choose another --lm-eval-task-dir")
    monkeypatch.setattr(outputs, "temp_dir", real)

    def not_permitted(tmp, out, overwrite=False):
        raise PermissionError(errno.EPERM, "Operation not permitted", str(tmp), None, str(out))

    monkeypatch.setattr(outputs, "publish_dir", not_permitted)
    out = tmp_path / "demo"
    line = refused(capsys, ["demo", "--source", source, "--output", out, "--chunk-size", "8", "--seq-len", "64",
                            "--max-windows", "1", "--no-passkey", "--speed-lens", "16", "--decode-contexts",
                            "--repeats", "1"], "demo", source)
    assert line.startswith(f"bsbr demo: error: --output {out}: could not write the demo's files (") and \
        line.endswith("choose another --output")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.slow
def test_sigkill_at_random_moments_resumes_to_the_same_weights_or_refuses_cleanly(models, text, tmp_path, capsys):
    """Runs killed with SIGKILL at random moments (checkpoint every step): each either resumes to the
    uninterrupted run's weights, or refuses cleanly (killed before its first complete checkpoint, or
    after the run finished: nothing left to train). Every other run is killed at a random moment after
    its first checkpoint was written, and must resume or have finished (the moments are drawn from the
    child's progress, not the clock alone: under load a child may not reach its first checkpoint within
    the parent's own run time)."""
    import random

    trials = 10

    plan = ["--steps", "12", "--checkpoint-every", "1"]
    reference = tmp_path / "reference"
    t0 = time.monotonic()
    assert main([str(a) for a in distill_args(models, text, reference, *plan)]) == 0
    duration = time.monotonic() - t0
    expected = _final_weights(reference)
    rng = random.Random(trials)
    outcomes = []
    for trial in range(trials):
        out = tmp_path / f"run{trial}"
        args = [str(a) for a in distill_args(models, text, out, *plan)]
        after_checkpoint = trial % 2 == 1
        pid = _fork_cli(args)
        exited = None  # the child's wait status, once reaped
        try:
            if after_checkpoint:
                deadline = time.monotonic() + 120
                while not (out / "checkpoint" / "manifest.json").exists() and not (out / "config.json").exists():
                    assert time.monotonic() < deadline, "the child wrote no checkpoint in 120 s"
                    done, status = os.waitpid(pid, os.WNOHANG)
                    if done:
                        exited = status
                        break
                    time.sleep(0.01)
            if exited is None:
                time.sleep(rng.uniform(0.0, (0.6 if after_checkpoint else 1.2) * duration))
        finally:
            if exited is None:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
        assert exited is None, f"trial {trial}: the child exited ({exited}) before its first checkpoint"
        capsys.readouterr()
        code = main(override(args, "--resume"))
        err = capsys.readouterr().err
        if code == 0:
            _assert_same(_final_weights(out), expected)
            outcomes.append("resumed")
        else:
            assert code == 2 and "Traceback" not in err
            last = err.strip().splitlines()[-1]
            if "is already at step 12" in last:  # the run had finished
                _assert_same(_final_weights(out), expected)
                outcomes.append("finished")
                continue
            assert not after_checkpoint, f"trial {trial}, killed after a checkpoint, did not resume: {err}"
            assert last.startswith("bsbr distill: error: checkpoint") and "is partial" in last, err
            outcomes.append("refused")
    print("outcomes:", outcomes)


# ------------------------------------------------------------------------------- the error boundary
def test_usage_errors_and_internal_errors_are_one_line(models, capsys, monkeypatch, tmp_path):
    assert main(["convert"]) == 2
    one_error_line(capsys.readouterr().err, "convert")
    assert main(["convert", "a", "b", "--chunk-size", "x"]) == 2
    assert "--chunk-size: must be an integer, got 'x'" in one_error_line(capsys.readouterr().err, "convert")
    assert main(["nosuch"]) == 2
    assert "invalid choice" in one_error_line(capsys.readouterr().err, "")
    import bsbr.arguments

    def bug(*a, **k):
        raise KeyError("a bug")

    monkeypatch.setattr(bsbr.arguments, "check_model_arg", bug)
    _, converted, _ = models
    assert main(["convert", str(converted), "x"]) == 1
    line = one_error_line(capsys.readouterr().err, "convert")
    assert "internal error KeyError" in line and "-v" in line
    for argv in (["convert", str(converted), "x", "-v"], ["-v", "convert", str(converted), "x"]):
        assert main(argv) == 1  # -v: the traceback too (also after the command), the exit status kept
        err = capsys.readouterr().err
        assert "Traceback" in err and "KeyError: 'a bug'" in err and "bsbr convert: error: internal error" in err
        assert "(report it with the traceback above)" in err and "rerun with -v" not in err, err
    monkeypatch.undo()  # refused input keeps its status 2 under -v (it was 1, "a bug")
    assert main(["-v", "generate", str(tmp_path / "nonexistent"), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("bsbr generate: error: MODEL"), err


@pytest.mark.parametrize("command,flag", [([], None), (["convert"], "--chunk-size"), (["generate"], "--prompt"),
                                          (["demo"], "--seq-len"), (["distill"], "--student"),
                                          (["eval"], "--passkey-lengths"), (["bench", "attention"], "--earlier-wheel"),
                                          (["bench", "models"], "--model-budget"),
                                          (["bench", "converted"], "--decode-contexts"),
                                          (["bench", "quality"], "--merge")])
def test_help_imports_no_torch_and_lists_exit_codes(command, flag):
    """``--help`` is fast because it imports neither torch nor transformers (their import is the seconds; the
    time itself is a benchmark figure, docs/findings.md: on a busy machine a unit test cannot time it)."""
    code = ("import sys; from bsbr.cli import main\n"
            f"try: main({command + ['--help']!r})\nexcept SystemExit: pass\n"
            "print('torch' in sys.modules, 'transformers' in sys.modules)")
    env = {**os.environ, "PYTHONPATH": SRC}
    import subprocess

    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    *help_lines, last = r.stdout.strip().splitlines()
    assert last.split() == ["False", "False"]
    text = "\n".join(help_lines)
    if not command:
        assert "exit status:" in text and "130" in text and "internal error" in text
    else:
        assert f"usage: bsbr {command[0]}" in text and flag in text


def test_bench_subcommands_are_registered_in_one_place():
    from bsbr.bench.cli import BENCH_COMMANDS
    from bsbr.cli import COMMANDS, build_parser

    parser = build_parser()
    assert set(parser.commands.choices) == set(COMMANDS)
    bench = parser.commands.choices["bench"]
    bench.format_help()
    assert set(bench.commands.choices) == set(BENCH_COMMANDS) == {"attention", "models", "converted", "quality"}
    args = parser.parse_args(["bench", "quality", "--steps", "3"])
    assert args.steps == 3 and callable(args.func)


def test_bench_help_defaults_are_the_benchmarks():
    """``bsbr bench NAME --help`` reads its defaults from bsbr.bench.defaults (no torch): they are the ones
    the benchmarks run with."""
    from bsbr.bench import defaults, models, quality

    assert set(models.model_specs()) == set(defaults.SHELL_MODELS) >= set(defaults.DEFAULT_SHELL_MODELS)
    assert set(quality.quality_specs()) == set(defaults.QUALITY_MODELS) >= set(defaults.DEFAULT_QUALITY_MODELS)
    assert quality.TRAINING == defaults.QUALITY_TRAINING


# ------------------------------------------------------------------------------- loading strictly
def test_auto_classes_load_strictly(models, tmp_path):
    from transformers import AutoModelForCausalLM

    _, converted, _ = models
    broken = tmp_path / "broken"
    shutil.copytree(converted, broken)
    weights = load_file(broken / "model.safetensors")
    dropped = next(k for k in weights if "retrieval_gate" in k)
    del weights[dropped]
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing_keys"):
        AutoModelForCausalLM.from_pretrained(broken)
    assert AutoModelForCausalLM.from_pretrained(broken, strict=False) is not None  # transformers' way, if asked


@pytest.mark.parametrize("change", ["shape", "int32", "float4"])
def test_a_weight_of_another_shape_or_dtype_is_refused_by_name(models, tmp_path, capsys, change):
    # (float4, as float8 a scaled format, passed the float check: "shape '[97, 96]' is invalid for input of size")
    _, converted, _ = models
    broken = tmp_path / "broken"
    shutil.copytree(converted, broken)
    weights = load_file(broken / "model.safetensors")
    name = next(k for k in weights if k.endswith("q_proj.weight"))
    w = weights[name]
    weights[name] = torch.zeros(w.shape[0] + 1, w.shape[1]) if change == "shape" else w.to(torch.int32) \
        if change == "int32" else torch.zeros(w.shape[0], w.shape[1] // 2, dtype=torch.uint8).view(torch.float4_e2m1fn_x2)
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    line = refused(capsys, ["generate", broken, "--prompt", "x"], "generate", broken)
    expect = {"shape": f"{name} (checkpoint ({w.shape[0] + 1}, {w.shape[1]}), config {tuple(w.shape)})",
              "int32": f"weight {name} is I32, not floating point",
              "float4": f"weight {name} is F4, a scaled float format"}[change]
    assert expect in line, line


@pytest.mark.slow
@pytest.mark.parametrize("between", ["", "import importlib.util; importlib.util.find_spec('transformers')\n"],
                         ids=["import", "find_spec"])
def test_import_bsbr_alone_registers_the_auto_classes(models, between):
    _, converted, _ = models
    # a fresh interpreter: `import bsbr` is light and still registers the model with the Auto classes; a library's
    # check that transformers is installed (find_spec, as accelerate's is_transformers_available) in between
    # took the registration away: trust_remote_code asked for
    code = ("import sys, bsbr; assert 'torch' not in sys.modules\n" + between +
            "from transformers import AutoModelForCausalLM\n"
            f"m = AutoModelForCausalLM.from_pretrained({str(converted)!r}); print(type(m).__name__)")
    import subprocess

    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 0 and r.stdout.strip().endswith("BSBRForCausalLM"), r.stderr[-2000:]


def test_outputs_get_the_usual_permissions(tmp_path):
    """Staged directories and atomically written files end up as mkdir/open would make them, not 0700/0600."""
    from safetensors.torch import save_file

    from bsbr.distill.checkpoint import save_checkpoint
    from bsbr.outputs import atomic_write_text, publish_files, staged_dir

    old = os.umask(0o022)
    umask = os.umask

    def set_for_every_thread(mask):  # reading the umask by setting it left it 0 for a moment, process-wide
        raise AssertionError("os.umask called")  # (another thread's new files were writable by all)

    try:
        os.umask = set_for_every_thread
        with staged_dir(tmp_path / "out") as d:
            atomic_write_text(d / "a.json", "{}")
            save_file({"w": torch.zeros(2)}, d / "model.safetensors")  # safetensors writes owner-only (0600)
        (tmp_path / "stage").mkdir()
        (tmp_path / "final").mkdir()
        save_file({"w": torch.zeros(2)}, tmp_path / "stage" / "model.safetensors")
        publish_files(tmp_path / "stage", tmp_path / "final")  # (distill's publish)
        w = torch.nn.Parameter(torch.zeros(2))
        save_checkpoint(tmp_path / "ckpt", {"w": w}, torch.optim.SGD([w], lr=0.1), {"step": 1})
    finally:
        os.umask = umask
        os.umask(old)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755
    for f in [tmp_path / "out" / "a.json", tmp_path / "out" / "model.safetensors",
              tmp_path / "final" / "model.safetensors", *(tmp_path / "ckpt").glob("*.safetensors")]:
        assert f.stat().st_mode & 0o777 == 0o644, f


def test_distill_refuses_windows_where_the_new_pieces_do_nothing(models, text, tmp_path, capsys):
    # the fixture's student: chunk 8, local_chunks 2, retrieval_blocks 8: every token of a 24-token
    # window reads all earlier tokens exactly, so the chunk states and gate cannot change its output
    args = [str(a) for a in distill_args(models, text, tmp_path / "out", "--steps", "2")]
    args[args.index("--seq-len") + 1] = "24"
    line = refused(capsys, args, "distill", models[1])
    assert "--seq-len 24" in line and "from token 80 on" in line, line
    assert "--seq-len 82 or more" in line and "--params all" in line, line
    assert not (tmp_path / "out").exists()


def test_staged_output_kept_when_the_target_appears_while_writing(tmp_path):
    """A directory that appears at the target while a command writes is not replaced, and the complete
    result stays where the error says; a failure inside the block leaves nothing."""
    from bsbr.errors import OutputError
    from bsbr.outputs import staged_dir

    out = tmp_path / "out"
    with pytest.raises(OutputError, match="appeared while writing") as e:
        with staged_dir(out) as d:
            (d / "model.safetensors").write_text("weights")
            out.mkdir()
            (out / "theirs.txt").write_text("keep")
    kept = Path(str(e.value).split("the result is in ")[1].rstrip(")"))
    assert (kept / "model.safetensors").read_text() == "weights"
    assert sorted(p.name for p in out.iterdir()) == ["theirs.txt"]
    with pytest.raises(RuntimeError):
        with staged_dir(tmp_path / "other"):
            raise RuntimeError("failed half-way")
    assert not (tmp_path / "other").exists() and [p for p in tmp_path.iterdir() if "other" in p.name] == []


def test_version(capsys):
    import bsbr

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"bsbr {bsbr.__version__}"


def test_the_recorded_source_check_spares_the_lm_eval_task_and_the_bundled_file_by_path(models, tmp_path, capsys):
    from bsbr.convert.defaults import default_source_path
    from bsbr.arguments import check_recorded_source

    _, converted, _ = models
    # the lm-eval task needs the model's tokenizer only: no reference is loaded, so none is checked
    assert main(["eval", str(converted), "--lm-eval-task-dir", str(tmp_path / "task"), "--passkey-lengths", "200",
                 "--passkey-depths", "0.5", "--passkey-trials", "1"]) == 0
    bundled = shutil.copytree(converted, tmp_path / "from-bundled")
    meta = json.loads((bundled / "conversion.json").read_text())
    meta["source"]["name"] = str(default_source_path())  # converted with the GGUF's path given explicitly
    (bundled / "conversion.json").write_text(json.dumps(meta))
    check_recorded_source(bundled, None, option="--reference")  # the default is that file: no refusal


@pytest.mark.slow
def test_a_failure_after_loading_is_one_line_on_a_redirected_stderr(models, tmp_path):
    """No library progress bar on stderr that is not a terminal: a failure is the one error line."""
    import subprocess

    _, converted, _ = models
    bad = tmp_path / "bad"
    shutil.copytree(converted, bad)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "hidden_size": config["hidden_size"] * 2}))
    (bad / "conversion.json").unlink()  # (its record of the source would warn of the edit: a line of its own)
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    env.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)
    code = "import sys; from bsbr.cli import main; sys.exit(main(sys.argv[1:]))"
    r = subprocess.run([sys.executable, "-c", code, "generate", str(bad), "--prompt", "def"], capture_output=True,
                       text=True, env=env, timeout=120)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("bsbr generate: error:"), r.stderr


def test_generate_names_a_stdout_that_cannot_encode_the_text_and_reads_a_utf8_prompt_in_any_locale(models):
    """An ASCII stdout gave the codec's words after the whole generation ("'ascii' codec can't encode ..."); under
    a locale that is not UTF-8 a UTF-8 --prompt was refused as "not UTF-8"."""
    import subprocess

    _, converted, _ = models
    code = "import sys; from bsbr.cli import main; sys.exit(main(sys.argv[1:]))"
    base = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-c", code, "generate", str(converted), "--prompt", "the key \u00fc is",
            "--max-new-tokens", "2"]
    r = subprocess.run(argv, capture_output=True, text=True, env={**base, "PYTHONIOENCODING": "ascii"}, timeout=120)
    lines = [line for line in r.stderr.splitlines() if line.strip() and "tokens/s" not in line]
    assert r.returncode == 2 and lines == [lines[-1]] and "stdout: its encoding (ascii)" in lines[-1] \
        and "PYTHONIOENCODING=utf-8" in lines[-1], r.stderr
    r = subprocess.run(argv, capture_output=True, env={**base, "LC_ALL": "C", "PYTHONUTF8": "0",
                                                       "PYTHONCOERCECLOCALE": "0"}, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("the key \u00fc is".encode()), r.stderr  # (the bytes given)


def test_main_called_in_process_keeps_the_programs_logging_and_library_settings(models, tmp_path):
    """main() left a root handler bound to the first call's stderr (a later call logged there, or to a closed
    stream), the bsbr logger at INFO, TRANSFORMERS_VERBOSITY=error in the environment, and transformers' warnings
    and the hub's progress bars off, for the rest of the program."""
    import subprocess

    _, converted, _ = models
    code = f"""
import contextlib, io, json, logging, os
from bsbr.cli import main
from huggingface_hub.utils import are_progress_bars_disabled
argv = ["generate", {str(converted)!r}, "--prompt", "the key is", "--max-new-tokens", "3"]
streams = [io.StringIO(), io.StringIO()]
for s in streams:
    with contextlib.redirect_stderr(s), contextlib.redirect_stdout(io.StringIO()):
        assert main(argv) == 0
streams[0].close()
from transformers.utils import logging as hf_logging
logging.getLogger("bsbr").warning("after")  # (a closed first stream would print a logging error)
print(json.dumps(dict(second="new tokens" in streams[1].getvalue(), handlers=len(logging.getLogger().handlers),
                      level=logging.getLogger("bsbr").level, env=os.environ.get("TRANSFORMERS_VERBOSITY"),
                      verbosity=hf_logging.get_verbosity(), bars=not are_progress_bars_disabled())))
"""
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    for k in ("TRANSFORMERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS", "DATASETS_VERBOSITY"):
        env.pop(k, None)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == dict(second=True, handlers=0, level=0, env=None, verbosity=30, bars=True)
    assert "Logging error" not in r.stderr and "after" in r.stderr


def test_main_calls_in_threads_each_log_and_the_last_gives_the_settings_back(models, tmp_path):
    """Two main() calls at once in threads: the first to end removed the handler the other logged to, and the other
    restored the first one's settings. Also kept: a hub progress-bar switch of a group, and DATASETS_VERBOSITY."""
    import subprocess

    _, converted, _ = models
    code = f"""
import contextlib, io, json, logging, os, sys, threading, time
import datasets, transformers
from bsbr.cli import main
from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars
import bsbr.generate
disable_progress_bars("huggingface_hub.http_get")
def run(n):
    assert main(["generate", {str(converted)!r}, "--prompt", "the key is", "--max-new-tokens", str(n)]) == 0
with contextlib.redirect_stdout(io.StringIO()):
    threads = [threading.Thread(target=run, args=(n,)) for n in (2, 300)]
    for t in threads:
        t.start()
        time.sleep(0.2)
    for t in threads:
        t.join()
print(json.dumps(dict(handlers=len(logging.getLogger().handlers), level=logging.getLogger("bsbr").level,
                      env=os.environ.get("TRANSFORMERS_VERBOSITY"), group=are_progress_bars_disabled(
                          "huggingface_hub.http_get"), datasets=datasets.logging.get_verbosity())))
"""
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1", "DATASETS_VERBOSITY": "error"}
    for k in ("TRANSFORMERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS"):
        env.pop(k, None)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == dict(handlers=0, level=0, env=None, group=True, datasets=40)
    assert r.stderr.count("new tokens in") == 2, r.stderr  # each call's log line
    r = subprocess.run([sys.executable, "-m", "bsbr.cli", "generate", str(converted), "--prompt", "the key is",
                        "--max-new-tokens", "2"], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                       env={**env, "HF_HUB_DISABLE_PROGRESS_BARS": "0"})  # (the variable rules the hub: no warning)
    assert r.returncode == 0 and "Cannot disable progress bars" not in r.stderr, r.stderr


def test_verbose_is_bsbr_s_debug_log_not_every_library_s(tmp_path):
    # -v set the root logger to DEBUG: one plot logged 2,118 matplotlib font lines around bsbr's two
    import subprocess

    code = ("import logging; from bsbr.cli import _apply_settings; _apply_settings(True, True, 0)\n"
            "print([logging.getLogger(n).isEnabledFor(logging.DEBUG) for n in ('bsbr.x', 'matplotlib.font_manager')])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                       env={**os.environ, "PYTHONPATH": SRC})
    assert r.stdout.strip() == "[True, False]", r.stderr


def test_a_logged_warning_says_it_is_one(tmp_path):
    # the command's log printed warnings and errors like its progress lines ("12:00:00 bsbr.x: ..."): a user could
    # not tell "the tokenizer cannot stop at stop_strings" from "converted ..."
    import subprocess

    code = ("import logging; from bsbr.cli import _apply_settings; _apply_settings(False, True, 0)\n"
            "log = logging.getLogger('bsbr.x'); log.info('done'); log.warning('not applied'); log.error('failed')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                       env={**os.environ, "PYTHONPATH": SRC})
    lines = [line.split(" ", 1)[1] for line in r.stderr.splitlines()]
    assert lines == ["bsbr.x: done", "bsbr.x: warning: not applied", "bsbr.x: error: failed"], r.stderr


def test_a_path_starting_with_a_tilde_is_the_home_folders_in_every_check_and_write(models, tmp_path, monkeypatch,
                                                                                  capsys):
    # `--json=~/x` and a quoted "~/x" reach bsbr unexpanded: SOURCE failed as a hub id, --prompt-file "did not
    # exist", and distill checked ~/dist but wrote ./~/dist
    home, here = tmp_path / "home", tmp_path / "here"
    home.mkdir(), here.mkdir()
    shutil.copytree(models[0], home / "src")
    (home / "p.txt").write_text("The grass is green .")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(here)
    assert main(["convert", "~/src", "~/conv", "--chunk-size", "8"]) == 0
    assert main(["generate", "~/conv", "--prompt-file=~/p.txt", "--max-new-tokens", "2"]) == 0
    assert main(["bench", "attention", "--seq-lens", "64", "--hidden", "32", "--heads", "2", "--chunk-size", "32",
                 "--repeats", "1", "--skip-core", "--json=~/b.json"]) == 0
    assert (home / "conv" / "config.json").is_file() and (home / "b.json").is_file()
    assert not any(here.iterdir())
    from bsbr.evaluate.cli import _filler  # a filler file is read while the arguments are parsed

    (home / "f.txt").write_text("The river ran past the old mill at dawn.\n")
    assert _filler("file:~/f.txt") == f"file:{home / 'f.txt'}" and _filler("~/f.txt") == str(home / "f.txt")


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_generate_into_a_full_disk_names_stdout(models):
    """The generated text's write error was "[Errno 28] No space left on device", naming nothing."""
    _, converted, _ = models
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    with open("/dev/full", "w") as full:
        proc = subprocess.run([sys.executable, "-m", "bsbr.cli", "generate", str(converted), "--prompt", "def f",
                               "--max-new-tokens", "2"], stdout=full, stderr=subprocess.PIPE, text=True, env=env,
                              timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = one_error_line(proc.stderr, "generate")
    assert line.startswith("bsbr generate: error: stdout: No space left on device: the generated text"), line


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_program_calling_main_keeps_its_stdout_descriptor_after_a_failed_write(models, tmp_path):
    # a full disk under stdout pointed the host's descriptor 1 at /dev/null for good: its later output was lost
    source, _, _ = models
    code = ("import os, sys; from bsbr.cli import main; "
            f"rc = main(['convert', {str(source)!r}, {str(tmp_path / 'out')!r}, '--chunk-size', '8']); "
            "sys.stderr.write(f'rc={rc} fd1={os.readlink(\"/proc/self/fd/1\")}')")
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    with open("/dev/full", "w") as full:
        proc = subprocess.run([sys.executable, "-c", code], stdout=full, stderr=subprocess.PIPE, text=True, env=env,
                              timeout=120)
    assert proc.stderr.strip().endswith("rc=2 fd1=/dev/full"), proc.stderr[-2000:]


def test_staging_folders_and_their_locks_are_released_when_the_work_fails(tmp_path):
    # staged_dir kept the descriptor holding its staging folder's lock when the block raised: one per failure
    from bsbr.outputs import staged_dir

    def open_fds():
        return len(os.listdir("/proc/self/fd"))

    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc/self/fd")
    before = open_fds()
    for _ in range(3):
        with pytest.raises(RuntimeError):
            with staged_dir(tmp_path / "out"):
                raise RuntimeError
    assert open_fds() == before and not list(tmp_path.iterdir())


def test_outputs_with_dotdot_after_a_missing_folder_or_only_killed_runs_leftovers(models, tmp_path, capsys,
                                                                                  monkeypatch):
    # m1/m2/../out with m2 missing was written to m1/out, where the system finds nothing (m2 does not exist); a
    # folder holding only what a killed run inside it left was "not empty: pass --overwrite", then with --overwrite
    # "holds files no bsbr command wrote", naming none
    source, _, _ = models
    monkeypatch.chdir(tmp_path)
    line = refused(capsys, ["convert", source, "m1/m2/../out", "--chunk-size", "8"], "convert")
    assert "OUTPUT_DIR m1/m2/../out: m1/m2 is no folder, so the .. after it cannot be followed" in line, line
    assert not (tmp_path / "m1").exists()
    (tmp_path / "left" / ".sub.tmp-abcd1234").mkdir(parents=True)
    (tmp_path / "left" / ".sub.lock").touch()
    assert "pass --overwrite" in refused(capsys, ["convert", source, "left", "--chunk-size", "8"], "convert")
    assert main(["convert", str(source), "left", "--chunk-size", "8", "--overwrite"]) == 0
    assert (tmp_path / "left" / "config.json").is_file() and not (tmp_path / "left" / ".sub.lock").exists()


def test_the_printed_lm_eval_command_names_the_folders_written_through_a_link_and_dotdot(models, tmp_path, capsys):
    _, converted, _ = models
    (tmp_path / "real" / "sub").mkdir(parents=True)
    (tmp_path / "lnk").symlink_to(tmp_path / "real" / "sub")
    shutil.copytree(converted, tmp_path / "real" / "cv")
    assert main(["eval", f"{tmp_path}/lnk/../cv", "--lm-eval-task-dir", f"{tmp_path}/lnk/../tasks", "--passkey-lengths",
                 "96", "--passkey-depths", "0.5", "--passkey-trials", "1", "--passkey-filler", "classic",
                 "--passkey-new-tokens", "5"]) == 0
    out = capsys.readouterr().out
    assert f"pretrained={str(tmp_path / 'real' / 'cv')!r}" in out and \
        f"include_path={str(tmp_path / 'real' / 'tasks')!r}" in out, out


def test_overwrite_looks_into_folders_named_like_a_killed_runs(models, tmp_path, capsys):
    # .thesis.old-20240115 (a user's dated backup) matches the name bsbr stages under: --overwrite replaced the
    # folder holding it, and a bsbr output holding it, with the backup inside
    source, converted, _ = models
    for where in (tmp_path / "bk", shutil.copytree(converted, tmp_path / "model")):
        (where / ".thesis.old-20240115").mkdir(parents=True)
        (where / ".thesis.old-20240115" / "thesis.tex").write_text("precious")
        line = refused(capsys, ["convert", source, where, "--chunk-size", "8", "--overwrite"], "convert", where)
        assert "holds files no bsbr command wrote" in line, line
        assert (where / ".thesis.old-20240115" / "thesis.tex").read_text() == "precious"
    (tmp_path / "bk" / ".thesis.old-20240115" / "thesis.tex").unlink()
    (tmp_path / "bk" / ".thesis.old-20240115" / "model.safetensors").write_bytes(b"")  # a killed run's partial model
    assert main(["convert", str(source), str(tmp_path / "bk"), "--chunk-size", "8", "--overwrite"]) == 0
    (tmp_path / "bk" / ".notes.old-20240115").write_text("mine")  # a file named so: only a record's temporary
    line = refused(capsys, ["convert", source, tmp_path / "bk", "--chunk-size", "8", "--overwrite"], "convert")
    assert "holds files no bsbr command wrote (.notes.old-20240115)" in line, line
    (tmp_path / "bk" / ".notes.old-20240115").unlink()
    # killed as safetensors saved the weights (through a .tmpXXXXXX file) into an empty folder's staging folder:
    # "pass --overwrite", then --overwrite refused the folder
    staged = tmp_path / "empty" / ".bsbr.tmp-abcd1234"
    (staged / "model").mkdir(parents=True)
    (staged / "model" / "config.json").write_text('{"model_type": "bsbr"}')  # (written before the weights)
    (staged / "model" / ".tmpK2koCl").write_bytes(b"")
    (staged / ".eval.tmp.png").write_bytes(b"")  # killed as the demo's plot was saved
    results = tmp_path / "empty" / ".bsbr-results.tmp-abcd1234"  # killed as eval's results were put in place
    results.mkdir()
    (results / ".old-r.json").write_text("{}")
    (results / "r.json").write_text("{}")
    assert main(["convert", str(source), str(tmp_path / "empty"), "--chunk-size", "8", "--overwrite"]) == 0
    # a user's backup of a model (of another type) in a folder named so, a user's folder in checkpoint/, and a
    # folder of results alone (refused with a message that named no file)
    # (also one whose config.json was edited by hand and no longer parses, beside its weights)
    for where, files in ((".mymodel.old-20240101", {"config.json": '{"model_type": "llama"}'}),
                         (".llama.old-20240115", {"config.json": '{"model_type": "llama",}', "model.safetensors": "w"}),
                         ("checkpoint/.notes.old-20240101", {"secret.txt": "secret"})):
        shutil.rmtree(tmp_path / "empty")
        shutil.copytree(converted, tmp_path / "empty")
        (tmp_path / "empty" / where).mkdir(parents=True)
        for name, text in files.items():
            (tmp_path / "empty" / where / name).write_text(text)
        refused(capsys, ["convert", source, tmp_path / "empty", "--chunk-size", "8", "--overwrite"], "convert")
        assert (tmp_path / "empty" / where).is_dir()
    shutil.rmtree(tmp_path / "empty")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "eval.json").write_text("{}")
    line = refused(capsys, ["convert", source, tmp_path / "empty", "--chunk-size", "8", "--overwrite"], "convert")
    assert "holds no BSBR model, checkpoint or demo output (only eval.json)" in line, line
    # and a user's folder named so, of files named as bsbr's temporary ones, is not
    backup = tmp_path / "empty" / ".backup.old-20240115"
    backup.mkdir()
    for name in (".old-thesis.tex", ".tmpthesis", ".thesis.tmp.tex"):
        (backup / name).write_text("my thesis")
        line = refused(capsys, ["convert", source, tmp_path / "empty", "--chunk-size", "8", "--overwrite"], "convert")
        assert "holds files no bsbr command wrote (.backup.old-20240115)" in line, line
        (backup / name).unlink()


@contextlib.contextmanager
def bind_mount(folder: Path, at: Path):
    """``folder`` also reached as ``at`` (a bind mount; skips where this user may not mount)."""
    at.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "--bind", folder, at], capture_output=True).returncode:
        pytest.skip("needs a bind mount (root)")
    try:
        yield at
    finally:
        subprocess.run(["umount", at], check=True)


def test_an_input_reached_through_a_bind_mount_is_not_overwritten(models, tmp_path, capsys):
    """A bind mount shows one folder under two paths, which their real paths do not reveal: eval's --json
    named the --text-file through one and replaced it with its results."""
    source, converted, _ = models
    data = tmp_path / "data"
    data.mkdir()
    text = data / "story.json"  # (a JSON file, which --json would replace as its own results)
    text.write_text(json.dumps({"text": TEXT}))
    before = text.read_text()
    with bind_mount(data, tmp_path / "again") as again:
        line = refused(capsys, ["eval", converted, "--reference", source, "--text-file", text, "--seq-len", "32",
                                "--max-windows", "1", "--no-passkey", "--json", again / "story.json"],
                       "eval")
        assert f"would overwrite the --text-file {text}" in line and text.read_text() == before
        (tmp_path / "src-again").mkdir()
        with bind_mount(source, tmp_path / "src-again" / "m"):
            line = refused(capsys, ["convert", source, tmp_path / "src-again" / "m" / "x"], "convert", source)
            assert "overlaps the SOURCE" in line and not (source / "x").exists()
    copy = tmp_path / "src2"  # a folder inside the input, shown elsewhere: its ancestors there are not the input's
    shutil.copytree(source, copy)
    (copy / "extra").mkdir()
    with bind_mount(copy / "extra", tmp_path / "view") as view:
        line = refused(capsys, ["convert", copy, view / "out", "--chunk-size", "8"], "convert", copy)
        assert "overlaps the SOURCE" in line and not (copy / "extra" / "out").exists()


def test_a_mount_hidden_by_a_later_one_is_not_read_as_where_a_path_lies(tmp_path):
    """mountinfo keeps a mount another was mounted over: X/b read through it (an unrelated folder) hid that X/b
    is now the input's own b/, so an output there overwrote the input; and a folder bound inside the input was
    not seen as part of it."""
    from bsbr.errors import OutputError
    from bsbr.outputs import check_output_files

    if os.geteuid() != 0:
        pytest.skip("needs mounts (root)")
    inp, other, x = tmp_path / "input", tmp_path / "unrelated", tmp_path / "X"
    (inp / "b").mkdir(parents=True)
    (inp / "b" / "keep.json").write_text("{}")
    other.mkdir()
    x.mkdir()
    done = []
    try:
        for args, at in ((["-t", "tmpfs", "tmpfs"], x), (["--bind", other], x / "b"), (["--bind", inp], x)):
            if at == x / "b":
                at.mkdir()
            if subprocess.run(["mount", *map(str, args), str(at)], capture_output=True).returncode:
                pytest.skip("mount failed")
            done.append(at)
        with pytest.raises(OutputError, match="would overwrite the --text-file"):
            check_output_files([("--json", x / "b" / "keep.json")], inputs=[("--text-file", inp)])
        check_output_files([("--json", tmp_path / "r.json")], inputs=[("--text-file", inp)])
    finally:
        for at in reversed(done):
            subprocess.run(["umount", str(at)], check=True)
    # a folder from elsewhere shown inside the input: writing there writes into what the input shows
    inp2, elsewhere = tmp_path / "input2", tmp_path / "elsewhere"
    (inp2 / "b").mkdir(parents=True)
    elsewhere.mkdir()
    if subprocess.run(["mount", "--bind", str(elsewhere), str(inp2 / "b")], capture_output=True).returncode:
        pytest.skip("mount failed")
    try:
        with pytest.raises(OutputError, match="would overwrite the --text-file"):
            check_output_files([("--json", elsewhere / "keep.json")], inputs=[("--text-file", inp2)])
    finally:
        subprocess.run(["umount", str(inp2 / "b")], check=True)


def test_one_folder_under_two_names_is_one_without_a_mount_table(models, tmp_path, capsys, monkeypatch):
    """Where there is no mount table (macOS, Windows) and on a case-insensitive disk (``stu`` and ``STU``), path
    strings alone told two names of one folder apart: distill --overwrite into the student's other name trained
    into the student, and --plot and --passkey-plot under two names wrote one file."""
    from bsbr.errors import OutputError
    from bsbr.outputs import check_output_files

    source, converted, _ = models
    monkeypatch.setattr(bsbr.outputs, "_mounts", lambda: [])
    stu = shutil.copytree(converted, tmp_path / "stu")
    (tmp_path / "text.txt").write_text(TEXT)
    with bind_mount(stu, tmp_path / "STU") as other:
        line = refused(capsys, ["distill", "--student", stu, "--teacher", source, "--text-file", tmp_path / "text.txt",
                                "--output", other, "--overwrite", "--steps", "1", "--seq-len", "96"], "distill", stu)
        assert f"--output {other} overlaps the --student {stu}" in line, line
        with pytest.raises(OutputError, match="would overwrite the --text-file"):
            check_output_files([("--json", other / "r.json")], inputs=[("--text-file", stu)])
    (tmp_path / "res").mkdir()
    with bind_mount(tmp_path / "res", tmp_path / "RES") as again:
        with pytest.raises(OutputError, match="--passkey-plot .* is also given to --plot"):
            check_output_files([("--plot", tmp_path / "res" / "a.png"), ("--passkey-plot", again / "a.png")],
                               plots=("--plot", "--passkey-plot"))
        check_output_files([("--plot", tmp_path / "res" / "a.png"), ("--passkey-plot", again / "b.png")],
                           plots=("--plot", "--passkey-plot"))


def test_outputs_are_written_where_files_cannot_be_locked(models, tmp_path, capsys, monkeypatch, caplog):
    """On a file system without flock (Lustre without -o flock, NFS without lockd) every command that writes
    failed with "[Errno 38] Function not implemented" and left its lock file; on Windows (no fcntl, os.geteuid,
    os.O_DIRECTORY) with "No module named 'fcntl'", eval --json after the whole evaluation. They write, unlocked,
    and say so."""
    import errno
    import fcntl
    import sys

    source, _, _ = models
    eval_args = ["--reference", str(source), "--text-file", str(tmp_path / "text.txt"), "--seq-len", "32",
                 "--max-windows", "1", "--no-passkey", "--json", str(tmp_path / "r.json")]
    (tmp_path / "text.txt").write_text(TEXT)

    def no_flock(fd, operation):
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))

    for system in ("file system", "Windows"):
        with monkeypatch.context() as m:
            if system == "Windows":
                m.setitem(sys.modules, "fcntl", None)
                for name in ("geteuid", "O_DIRECTORY", "fchmod"):
                    m.delattr(os, name)
            else:
                m.setattr(fcntl, "flock", no_flock)
            out = tmp_path / system
            for again in ((), ("--overwrite",)):
                caplog.clear()
                assert main(["convert", str(source), str(out), "--chunk-size", "8", *again]) == 0
                assert "not locked" in caplog.text and "would not be refused" in caplog.text
            assert main(["eval", str(out), *eval_args]) == 0 and main(["eval", str(out), *eval_args]) == 0
        assert json.loads((tmp_path / "r.json").read_text())["language_modeling"]
        assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no lock or staging left


def test_an_interrupt_of_the_main_threads_command_does_not_stop_another_threads(models, tmp_path):
    # a notebook's background bsbr command ended 130, its results unwritten, when the user interrupted a command
    # in the main thread (the interrupt is remembered process-wide, should a library swallow it)
    import threading

    from bsbr.errors import INTERRUPTED, check_not_interrupted

    source, _, _ = models
    codes = []
    INTERRUPTED.set()  # (as the main thread's command's handler leaves it until that command ends)
    try:
        worker = threading.Thread(target=lambda: codes.append(main(["convert", str(source), str(tmp_path / "out"),
                                                                    "--chunk-size", "8"])))
        worker.start()
        worker.join()
        with pytest.raises(KeyboardInterrupt):
            check_not_interrupted()
    finally:
        INTERRUPTED.clear()
    assert codes == [0] and (tmp_path / "out" / "config.json").is_file()


def test_a_stderr_without_isatty_is_read_as_no_terminal(models, tmp_path, monkeypatch):
    # a tee (write and flush alone) as sys.stderr: "AttributeError: 'Tee' object has no attribute 'isatty'"
    class Tee:
        def __init__(self):
            self.text = []

        def write(self, text):
            self.text.append(text)
            return len(text)

        def flush(self):
            pass

    tee = Tee()
    monkeypatch.setattr(sys, "stderr", tee)
    source, _, _ = models
    assert main(["convert", str(source), str(tmp_path / "out"), "--chunk-size", "8"]) == 0
    assert (tmp_path / "out" / "config.json").is_file()



def test_a_drive_that_numbers_no_inodes_is_told_apart_by_path(tmp_path, monkeypatch):
    # some FUSE and network drives report inode 0 for every file: any existing folder there "was" the input
    from bsbr.outputs import check_output_files, refuse_input_overlap

    vol = tmp_path / "vol"
    for name in ("model", "results", "src"):
        (vol / name).mkdir(parents=True)
    real = os.stat

    def stat(path, *args, **kwargs):
        st = real(path, *args, **kwargs)
        if isinstance(path, int) or not os.path.abspath(os.fsdecode(path)).startswith(str(vol)):
            return st
        fields = list(st)
        fields[1] = 0
        return os.stat_result(fields)

    monkeypatch.setattr(os, "stat", stat)
    check_output_files([("--json", vol / "results" / "r.json")], inputs=[("MODEL", vol / "model")])
    refuse_input_overlap(vol / "out", [("SOURCE", vol / "src")], "OUTPUT_DIR")
    with pytest.raises(bsbr.errors.OutputError, match="would overwrite the MODEL"):
        check_output_files([("--json", vol / "model" / "r.json")], inputs=[("MODEL", vol / "model")])


def test_a_link_put_at_a_result_path_meanwhile_is_not_replaced(tmp_path):
    from bsbr.errors import UserError

    target = tmp_path / "precious.json"
    target.write_text('{"keep": 1}')

    def write(p):
        p.write_text('{"new": 1}')
        os.symlink(target, tmp_path / "r.json")  # (while the results are computed)

    with pytest.raises(UserError, match="r.json became a file no bsbr command wrote while the results were computed"):
        bsbr.outputs.write_together([(tmp_path / "r.json", write)], figures=[])
    assert (tmp_path / "r.json").is_symlink() and target.read_text() == '{"keep": 1}'


def test_an_output_folder_name_too_long_for_its_staging_folder_is_refused_before_the_work(tmp_path):
    from bsbr.errors import OutputError
    from bsbr.outputs import NAME_MAX, STAGED_EXTRA, check_output_dir, staged_dir

    longest = tmp_path / ("o" * (NAME_MAX - STAGED_EXTRA))
    check_output_dir(longest)
    with staged_dir(longest) as tmp:  # (it can be written)
        (tmp / "config.json").write_text("{}")
    with pytest.raises(OutputError, match=f"give a name of at most {NAME_MAX - STAGED_EXTRA} bytes"):
        check_output_dir(tmp_path / ("o" * (NAME_MAX - STAGED_EXTRA + 1)))


def test_a_killed_runs_staging_folder_beside_a_users_file_is_not_called_all_that_is_there(tmp_path):
    from bsbr.errors import OutputError
    from bsbr.outputs import check_output_dir

    out = tmp_path / "out"
    (out / ".bsbr.tmp-abcd1234").mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    for overwrite in (False, True):  # (told "holds only ... left by a killed bsbr command: pass --overwrite")
        with pytest.raises(OutputError, match=r"holds files no bsbr command wrote \(notes.txt\)"):
            check_output_dir(out, overwrite=overwrite)
    assert (out / "notes.txt").read_text() == "mine"


def test_an_empty_output_folder_is_written_into_whatever_its_parent_allows(tmp_path, monkeypatch):
    # a folder made for the user in a read-only parent (or a mount point) is written into, not replaced
    import tempfile

    from bsbr.outputs import check_output_dir, staged_dir

    out = tmp_path / "parent" / "out"
    out.mkdir(parents=True)
    mkstemp = tempfile.mkstemp

    def no_new_files_in_the_parent(*args, dir=None, **kw):
        if Path(dir) == out.parent:
            raise PermissionError(13, "Permission denied")
        return mkstemp(*args, dir=dir, **kw)

    monkeypatch.setattr(bsbr.outputs.tempfile, "mkstemp", no_new_files_in_the_parent)
    check_output_dir(out)
    with staged_dir(out) as tmp:
        (tmp / "eval.json").write_text("{}")
    assert sorted(p.name for p in out.iterdir()) == ["eval.json"]


def test_without_a_one_step_swap_an_output_is_replaced_only_whole_or_not_at_all(tmp_path, monkeypatch):
    # (where the system cannot exchange two folders in one step, as macOS or some network disks: two renames)
    from bsbr.errors import OutputError
    from bsbr.outputs import staged_dir

    monkeypatch.setattr(bsbr.outputs, "_exchange", lambda a, b: False)
    out = tmp_path / "model"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"model_type": "bsbr"}))
    with pytest.raises(OutputError):  # a user's file added to the old output meanwhile: kept, not replaced
        with staged_dir(out, overwrite=True) as tmp:
            (tmp / "config.json").write_text(json.dumps({"model_type": "bsbr", "new": 1}))
            (out / "my_notes.txt").write_text("written meanwhile")
    assert (out / "my_notes.txt").exists() and "new" not in json.loads((out / "config.json").read_text())
    (out / "my_notes.txt").unlink()
    replace = os.replace

    def second_rename_fails(a, b):
        if ".model.tmp-" in str(a) and Path(b) == out:
            raise OSError(5, "Input/output error")
        return replace(a, b)

    monkeypatch.setattr(bsbr.outputs.os, "replace", second_rename_fails)
    with pytest.raises(OSError):  # the old output is put back where it was, not left hidden as .model.old-*
        with staged_dir(out, overwrite=True) as tmp:
            (tmp / "config.json").write_text(json.dumps({"model_type": "bsbr", "new": 1}))
    assert json.loads((out / "config.json").read_text()) == {"model_type": "bsbr"}


def test_a_model_folders_config_is_moved_in_last(tmp_path, monkeypatch):
    # until config.json is in place the folder holds no loadable model: a kill meanwhile leaves what the next
    # run knows as a killed run's leftovers
    from bsbr.outputs import publish_files

    staging, out = tmp_path / "staging", tmp_path / "out"
    staging.mkdir()
    out.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (staging / name).write_text("{}")
    order, replace = [], os.replace
    monkeypatch.setattr(bsbr.outputs.os, "replace", lambda a, b: (order.append(Path(b).name), replace(a, b)))
    publish_files(staging, out)
    assert order[-1] == "config.json" and sorted(order) == ["config.json", "model.safetensors", "tokenizer.json"]


def test_a_result_with_an_infinity_is_strict_json(tmp_path):
    # (an overflowed perplexity was written as Infinity, which strict JSON readers refuse)
    from bsbr.results import write_json

    write_json({"ppl": float("inf"), "low": -float("inf"), "kl": float("nan"), "rows": [1.5, float("inf")]},
               tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text(), parse_constant=lambda c: pytest.fail(c)) == \
        {"ppl": None, "low": None, "kl": None, "rows": [1.5, None]}


def test_a_figure_that_fails_to_save_leaves_no_file(tmp_path):
    from bsbr.results import save_figure, subplots

    fig, _ = subplots()

    def fails(tmp, **kw):
        Path(tmp).write_bytes(b"half a figure")
        raise OSError(28, "No space left on device")

    fig.savefig = fails
    with pytest.raises(OSError):
        save_figure(fig, tmp_path / "p.png")
    assert list(tmp_path.iterdir()) == []


def test_progress_bars_off_stays_off_inside_and_the_programs_switches_come_back_as_they_were(monkeypatch):
    from transformers.utils import logging as hf_logging

    from bsbr.progress import bar, bars_off, library_bars_off

    with bars_off(), bars_off(False):  # (a call that does not ask for --no-progress, inside one that does)
        assert bar(range(3)).disable
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    was = hf_logging.is_progress_bar_enabled()
    try:
        hf_logging.disable_progress_bar()  # (a program that turned transformers' bars off keeps them off)
        with library_bars_off():
            assert not hf_logging.is_progress_bar_enabled()
        assert not hf_logging.is_progress_bar_enabled()
        hf_logging.enable_progress_bar()
        with library_bars_off():
            assert not hf_logging.is_progress_bar_enabled()
        assert hf_logging.is_progress_bar_enabled()
    finally:
        (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()


def test_an_earlier_result_of_any_size_is_replaced_by_a_rerun(tmp_path):
    from bsbr.outputs import check_output_files

    out = tmp_path / "eval.json"
    out.write_text(json.dumps({"ppl": list(range(30000))}, indent=1))  # (about 230 KB)
    check_output_files([("--json", out)])
