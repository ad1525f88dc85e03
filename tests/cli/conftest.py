"""Tiny local models for the CLI tests: a random llama source with a word-level tokenizer, saved to
disk, and its BSBR conversion (chunk 8). Nothing is downloaded."""
import hashlib
from pathlib import Path

import pytest
from model_sources import make_source

SRC = str(Path(__file__).parents[2] / "src")
CHUNK = 8


def tree_hash(path) -> dict:
    """{relative path: sha256} of every file under ``path`` (empty for a missing path)."""
    path = Path(path)
    if path.is_file():
        return {"": hashlib.sha256(path.read_bytes()).hexdigest()}
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def one_error_line(err: str, command: str) -> str:
    """The stderr of a refused command: exactly one line, ``bsbr COMMAND: error: ...``."""
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"bsbr{' ' + command if command else ''}: error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    """(source_dir, converted_dir, other_source_dir): the llama source with a tokenizer, its conversion,
    and a second source with the same shapes and vocabulary but other weights."""
    import importlib.util

    import torch

    from bsbr.cli import main

    # the word-level tokenizer of the evaluation tests (ids below the tiny models' vocabulary)
    spec = importlib.util.spec_from_file_location("_eval_conftest", Path(__file__).parents[1] / "evaluate" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    build_word_tokenizer = module.build_word_tokenizer

    root = tmp_path_factory.mktemp("models")
    tok = build_word_tokenizer()
    src = make_source("llama")
    src.save_pretrained(root / "source")
    tok.save_pretrained(root / "source")
    other = make_source("llama")
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.01)
    other.save_pretrained(root / "other")
    tok.save_pretrained(root / "other")
    assert main(["convert", str(root / "source"), str(root / "converted"), "--chunk-size", str(CHUNK)]) == 0
    return root / "source", root / "converted", root / "other"
