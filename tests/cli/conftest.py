"""Tiny local models for the CLI tests: a random llama source with a word-level tokenizer, saved to
disk, and its BSBR conversion (chunk 8). Nothing is downloaded."""
import pytest
from cli_checks import TEXT
from model_sources import make_source
from word_tokenizer import build_word_tokenizer

CHUNK = 8


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    """(source_dir, converted_dir, other_source_dir): the llama source with a tokenizer, its conversion,
    and a second source with the same shapes and vocabulary but other weights."""
    import torch

    from bsbr.cli import main

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


@pytest.fixture()
def text(tmp_path):
    p = tmp_path / "train.py"
    p.write_text(TEXT)
    return p
