"""A tiny word-level tokenizer built in the test (no downloads) that covers the pass-key prompt's
words, digits one by one, and a little Python, with ids below the tiny models' vocabulary (97)."""
import re

from bsbr.evaluate import filler, passkey

SPECIALS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2 = the tiny llama's unk / bos / eos
PYTHON = ["def", "return", "class", "import", "self", "x", "y", "if", "else", "for", "in", "(", ")", ":", "=", ",",
          "+", "#", "print", "None"]


def build_word_tokenizer(digits: bool = True):  # (without digits: they read as <unk>)
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = []
    for text in [passkey.INTRO, *filler.CLASSIC, passkey.KEY_SENTENCE.format(key=""), passkey.QUESTION]:
        words += re.findall(r"\w+|[^\w\s]+", text)
    words += [str(d) for d in range(10) if digits] + PYTHON
    vocab = {w: i for i, w in enumerate(SPECIALS)}
    for w in words:
        vocab.setdefault(w, len(vocab))
    assert len(vocab) <= 97, len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(),
                                                 pre_tokenizers.Digits(individual_digits=True)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
