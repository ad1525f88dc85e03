"""The output helpers on their own (bsbr.outputs, bsbr.results, bsbr.arguments): what each refuses, what it
leaves behind when a write fails."""
import errno
import json
import os

import pytest

from bsbr import outputs
from bsbr.arguments import check_bsbr_positions
from bsbr.errors import OutputError, UserError
from bsbr.results import write_json


def test_a_json_lines_file_named_as_json_is_not_replaced(tmp_path):
    data = tmp_path / "train.jsonl"  # each line a JSON document, the whole file none
    data.write_text('{"text": "first document"}\n{"text": "second document"}\n')
    with pytest.raises(OutputError, match="exists and is not a JSON file"):
        outputs.check_output_files([("--json", str(data))])
    result = tmp_path / "r.json"
    result.write_text('{"perplexity": 1.5}\n')
    outputs.check_output_files([("--json", str(result))])  # an earlier result is replaced


def test_a_failed_write_of_a_set_leaves_neither_the_set_nor_its_staging(tmp_path):
    def ok(p):
        p.write_text("{}\n")

    def full(p):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises((UserError, OSError)):
        outputs.write_together([(tmp_path / "a.json", ok), (tmp_path / "b.json", full)])
    assert list(tmp_path.iterdir()) == []


def test_a_failed_atomic_write_keeps_the_old_file_and_no_temporary_one(tmp_path, monkeypatch):
    path = tmp_path / "r.json"
    path.write_text("old\n")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(outputs.os, "fsync", full)
    with pytest.raises(OSError, match="No space left"):
        outputs.atomic_write_text(path, "new\n")
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"] and path.read_text() == "old\n"


def test_a_failed_write_says_the_output_is_as_it_was_only_when_it_is():
    error = OSError(errno.ENOSPC, "No space left on device")
    kept = str(outputs.write_failure("--output", "run1", error, "the checkpoint"))
    written = str(outputs.write_failure("--output", "run1", error, "the checkpoint", unchanged=False))
    assert "run1 is as it was" in kept and "free some space or choose another --output" in kept
    assert "as it was" not in written and "free some space or choose another --output" in written


def test_json_results_write_nan_and_infinity_as_null_in_lists_and_tuples(tmp_path):
    path = write_json({"ppl": float("inf"), "by_length": (1.5, float("nan")), "rows": [[float("-inf")]]},
                      tmp_path / "r.json")

    def strict(constant):
        raise ValueError(f"not JSON: {constant}")

    assert json.loads(path.read_text(), parse_constant=strict) == {"ppl": None, "by_length": [1.5, None],
                                                                   "rows": [[None]]}


def test_lengths_up_to_a_learned_table_are_accepted_and_one_past_it_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(dict(
        model_type="bsbr", position_type="learned", position_scheme="absolute", max_position_embeddings=128)))
    check_bsbr_positions(tmp_path, "MODEL", [("--seq-len", 128)])
    with pytest.raises(UserError, match="--seq-len needs 129 positions, past the 128 learned positions of MODEL"):
        check_bsbr_positions(tmp_path, "MODEL", [("--seq-len", 129)])


def test_a_folder_name_of_exactly_the_longest_a_name_may_be_is_accepted(tmp_path):
    folder = tmp_path / ("p" * 255)  # 255 bytes: legal
    folder.mkdir()
    outputs.check_output_dir(folder / "model", option="OUTPUT_DIR")
    outputs.check_output_files([("--json", str(folder / "r.json"))])


def test_a_nul_byte_anywhere_in_a_text_files_first_8_kb_makes_it_binary(tmp_path):
    from bsbr.arguments import check_text_files

    dump = tmp_path / "dump.txt"
    dump.write_bytes(b"word " * 1000 + b"\0\0\0\0binary tail\n")  # its first NUL at byte 5,000
    with pytest.raises(UserError, match="--text-file"):
        check_text_files([str(dump)], option="--text-file")


def test_overwrite_refuses_an_output_whose_subfolder_is_the_current_directory(tmp_path, monkeypatch):
    out = tmp_path / "out"
    (out / "additional_chat_templates").mkdir(parents=True)
    (out / "config.json").write_text("{}")
    monkeypatch.chdir(out / "additional_chat_templates")
    with pytest.raises(OutputError, match="current directory"):
        outputs.check_output_dir(out, overwrite=True, option="OUTPUT_DIR")


def test_a_users_model_beside_a_killed_runs_staging_folder_is_never_replaced(tmp_path):
    out = tmp_path / "out"
    (out / ".bsbr.tmp-abcd1234").mkdir(parents=True)  # a killed run's staging folder
    (out / "config.json").write_text(json.dumps({"model_type": "llama"}))  # the user's model, saved there later
    with pytest.raises(OutputError, match="never replaces"):
        outputs.check_output_dir(out, overwrite=True, option="OUTPUT_DIR")


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.isdir("/proc/self"), reason="root on Linux: only /proc refuses")
def test_a_result_file_in_a_folder_nothing_can_be_created_in_is_refused_before_the_work():
    with pytest.raises(OutputError, match="/proc"):
        outputs.check_output_files([("--json", "/proc/r.json")])


def test_a_full_quota_is_told_to_free_some_space():
    for code in (errno.ENOSPC, errno.EDQUOT):
        error = OSError(code, os.strerror(code))
        assert outputs.out_of_room(error)
        assert "free some space or choose another --json" in str(outputs.write_failure("--json", "r.json", error,
                                                                                      "the results"))
    assert not outputs.out_of_room(OSError(errno.EACCES, "Permission denied"))


def test_an_output_that_gains_a_users_file_while_it_is_written_is_not_written_over(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(OutputError):
        with outputs.staged_dir(out) as staged:
            (staged / "config.json").write_text('{"model_type": "bsbr"}')
            (staged / "README.md").write_text("model card")
            (out / "README.md").write_text("my notes")  # saved by the user meanwhile
    assert (out / "README.md").read_text() == "my notes"


def test_a_second_writer_of_an_output_leaves_the_first_ones_staging_folder(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(OutputError):
        with outputs.staged_dir(out) as first:  # still writing (its staging folder locked)
            with outputs.staged_dir(out) as second:  # finishes first
                (second / "config.json").write_text("{}")
            assert first.exists()
