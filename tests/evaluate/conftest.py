"""The evaluation tests' tokenizer fixture (tests/word_tokenizer.py: built in the test, no downloads)."""
import pytest
from word_tokenizer import build_word_tokenizer


@pytest.fixture(scope="session")
def word_tokenizer():
    return build_word_tokenizer()
