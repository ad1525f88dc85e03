"""The shared argument checks (bsbr.arguments, bsbr.errors, bsbr.memory) at their edges."""
import errno
import logging
import os
import types

import pytest
from cli_checks import refused

from bsbr import arguments, errors, memory
from bsbr.errors import UserError


def test_a_text_file_is_binary_by_a_nul_anywhere_in_its_first_8_kb(tmp_path):
    f = tmp_path / "nul.py"
    f.write_bytes(b"x = 1\n" * 160 + b"\0\0tail\n")  # the first NUL at byte 960
    with pytest.raises(UserError, match="--text-file .*nul.py looks binary"):
        arguments.check_text_files([str(f)], option="--text-file")


def test_enough_text_counts_the_end_of_text_token_each_file_adds(tmp_path):
    files = []
    for name in ("a.txt", "b.txt"):
        (tmp_path / name).write_text("w" * 47)
        files.append(str(tmp_path / name))
    arguments.check_text_files(files, seq_len=96)  # 94 bytes and 2 end-of-text tokens: 96 tokens at most
    with pytest.raises(UserError, match="fewer than the 97 tokens"):
        arguments.check_text_files(files, seq_len=97)


def test_memory_is_refused_past_its_share_of_what_is_available(monkeypatch):
    monkeypatch.setattr(memory, "_proc_bytes", lambda path, key: 10 * 2 ** 30 if key == "MemAvailable" else None)
    share = memory.MEMORY_FRACTION * 10 * 2 ** 30
    assert memory.MEMORY_FRACTION == 0.7 and memory.memory_refusal(share) is None
    assert memory.memory_refusal(share + 2 ** 20) == "would need ~7.0 GiB, more than 70% of the 10.0 GiB available"
    assert memory.memory_refusal(None) is None


def test_a_path_behind_a_folder_that_cannot_be_entered_is_not_called_missing(monkeypatch):
    real = os.stat

    def stat(p, *a, **k):
        if str(p).startswith("/locked/"):
            raise PermissionError(errno.EACCES, "Permission denied", str(p))
        return real(p, *a, **k)

    monkeypatch.setattr(errors.os, "stat", stat)
    assert errors.absent("/locked/model") == "cannot be reached (permission denied on a folder on its way)"
    assert errors.absent("/no/such/model") == "does not exist"


def test_a_rotary_source_is_warned_of_only_past_its_positions(caplog):
    model = types.SimpleNamespace(config=types.SimpleNamespace(model_type="llama", max_position_embeddings=64))
    with caplog.at_level(logging.WARNING):
        arguments.warn_past_rotary_positions(model, "--reference", [("--seq-len", 64)])
        assert not caplog.records
        arguments.warn_past_rotary_positions(model, "--reference", [("--seq-len", 65)])
    assert "--seq-len 65 runs the reference past its 64 positions" in caplog.text


def test_a_missing_path_of_more_than_one_slash_is_not_looked_up_on_the_hub(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("org/name/extra", "name"):
        line = refused(capsys, ["convert", name, str(tmp_path / "out")], "convert")
        assert f"{name} does not exist (no such file or directory; a hub model is named ORG/NAME" in line, line


@pytest.mark.parametrize("seed, ok", [(0, True), (2 ** 32 - 1, True), (2 ** 32, False), (-1, False)])
def test_generate_takes_every_seed_torch_keeps(seed, ok):
    from bsbr.cli import build_parser

    parser = build_parser()
    argv = ["generate", "DIR", "--prompt", "x", "--temperature", "1", "--seed", str(seed)]
    if ok:
        assert parser.parse_args(argv).seed == seed
    else:
        with pytest.raises(SystemExit):
            parser.parse_args(argv)


def test_the_package_lists_its_subpackages_for_completion():
    import bsbr

    assert {"bench", "convert", "distill", "evaluate", "ops", "layers", "models"} <= set(dir(bsbr))
