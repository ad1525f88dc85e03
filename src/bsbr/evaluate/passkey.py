"""Pass-key retrieval, generated offline: can the model fetch one fact from far back?

A prompt of ``length`` tokens is an instruction, neutral filler sentences, one sentence carrying a
5-digit key at relative ``depth`` (0.1 = near the start, 0.9 = near the end), more filler, and the
question ``"What is the pass key? The pass key is"``. The model greedily generates a few tokens;
the trial succeeds when the key's digits appear in them (whitespace removed, so a tokenizer that
decodes digits one by one still counts).

Why it matters here: a key in an earlier chunk than the question is invisible to chunk-local
attention, so the chunk-local baseline can only guess; full attention sees it; BSBR sees it only
through the retrieved chunk states. Perplexity averages over many easy tokens; this test isolates
one long-range lookup.

Keys are drawn from a seeded generator per (length, depth, trial), so every model sees the same
prompts and a rerun gives the same keys.
"""
from __future__ import annotations

import logging
import random
import re
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence

import torch

logger = logging.getLogger(__name__)

INTRO = ("There is a pass key hidden inside a lot of irrelevant text. Find it and remember it. "
         "You will be asked for the pass key at the end.")
FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")
KEY_SENTENCE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
DEFAULT_LENGTHS = (512, 1024, 2048)
DEFAULT_DEPTHS = (0.1, 0.5, 0.9)


@dataclass
class PasskeyPrompt:
    """One prompt: its token ids and where the key sentence lies in them (``[key_start, key_end)``)."""

    input_ids: List[int]
    key: str
    key_start: int
    key_end: int
    depth: float
    target_length: int
    meta: dict = field(default_factory=dict)

    @property
    def length(self) -> int:
        return len(self.input_ids)


def make_key(seed: int, length: int, depth: float, trial: int) -> str:
    """A 5-digit key (10000-99999), a pure function of its arguments (``random.Random`` seeded with
    a string is stable across runs and Python versions, unlike ``hash``)."""
    return str(random.Random(f"passkey:{seed}:{length}:{depth}:{trial}").randint(10000, 99999))


def _ids(tokenizer, text: str, special: bool = False) -> List[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def build_prompt(tokenizer, length: int, depth: float, key: str, answer_tokens: int = 0) -> PasskeyPrompt:
    """A prompt of at most ``length - answer_tokens`` tokens (filler is whole sentences, so it may
    fall a few tokens short) with the key sentence starting at the sentence boundary nearest
    ``depth * length``. Leaving room for the answer keeps prompt + answer within ``length``: with a
    length that is a multiple of the chunk size, the answer never crosses into a new chunk (where
    chunk-local attention would suddenly see nothing of the prompt).

    Pieces are tokenized separately and concatenated as ids (each piece after the intro starts
    with a space, as it would in running text); the intro gets the tokenizer's usual special tokens
    (e.g. BOS). The key's token span is therefore exact, not estimated from characters.
    """
    if not isinstance(length, int) or length < 1:
        raise ValueError(f"length must be a positive int, got {length!r}")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must lie in [0, 1], got {depth!r}")
    if not (isinstance(key, str) and key.isdigit()):
        raise ValueError(f"key must be a string of digits, got {key!r}")
    intro = _ids(tokenizer, INTRO, special=True)
    key_ids = _ids(tokenizer, " " + KEY_SENTENCE.format(key=key))
    question = _ids(tokenizer, " " + QUESTION)
    budget = length - answer_tokens - len(intro) - len(key_ids) - len(question)
    fillers = [_ids(tokenizer, " " + s) for s in FILLER]
    if budget < max(len(f) for f in fillers):
        raise ValueError(f"length {length} is too short for a pass-key prompt: the instruction, key and question "
                         f"alone take {length - budget} tokens")
    # whole filler sentences, cycling, until the budget is used
    sentences: List[List[int]] = []
    used, i = 0, 0
    while used + len(fillers[i % len(fillers)]) <= budget:
        sentences.append(fillers[i % len(fillers)])
        used += len(sentences[-1])
        i += 1
    # insert at the sentence boundary nearest the requested depth
    target = depth * length - len(intro)
    boundaries, acc = [0], 0
    for s in sentences:
        acc += len(s)
        boundaries.append(acc)
    cut = min(range(len(boundaries)), key=lambda j: abs(boundaries[j] - target))
    before = [t for s in sentences[:cut] for t in s]
    after = [t for s in sentences[cut:] for t in s]
    ids = intro + before + key_ids + after + question
    start = len(intro) + len(before)
    return PasskeyPrompt(input_ids=ids, key=key, key_start=start, key_end=start + len(key_ids), depth=depth,
                         target_length=length)


def passkey_found(generated: str, key: str) -> bool:
    """Whether ``key`` appears in the generated text once whitespace is removed."""
    return key in re.sub(r"\s+", "", generated)


@torch.no_grad()
def greedy_continuation(model, input_ids: Sequence[int], max_new_tokens: int, pad_token_id: Optional[int]) -> List[int]:
    """The model's greedy continuation (new token ids only), via ``generate`` with its cache."""
    x = torch.tensor([list(input_ids)], dtype=torch.long)
    out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                         do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=pad_token_id)
    return out[0, x.shape[1]:].tolist()


def run_passkey(models: Mapping[str, torch.nn.Module], tokenizer, lengths: Sequence[int] = DEFAULT_LENGTHS,
                depths: Sequence[float] = DEFAULT_DEPTHS, trials: int = 3, seed: int = 0, max_new_tokens: int = 8,
                chunk_size: Optional[int] = None, progress: bool = True) -> dict:
    """Accuracy of each model per (length, depth) cell, and every trial's output.

    ``chunk_size`` (optional) records whether each key lies in the question's chunk, i.e. whether
    chunk-local attention could see it at all.
    """
    from tqdm.auto import tqdm

    if not models:
        raise ValueError("models must name at least one model")
    if not isinstance(trials, int) or trials < 1:
        raise ValueError(f"trials must be a positive int, got {trials!r}")
    if not lengths or not depths:
        raise ValueError("lengths and depths must be non-empty")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prompts = []
    for length in lengths:
        for depth in depths:
            for trial in range(trials):
                p = build_prompt(tokenizer, int(length), float(depth), make_key(seed, int(length), float(depth), trial),
                                 answer_tokens=max_new_tokens)
                p.meta = dict(trial=trial)
                prompts.append(p)
    correct = {m: {} for m in models}
    samples = []
    bar = tqdm(total=len(prompts) * len(models), desc="passkey", disable=not progress)
    for p in prompts:
        sample = dict(length=p.target_length, prompt_tokens=p.length, depth=p.depth, trial=p.meta["trial"],
                      key=p.key, key_start=p.key_start, key_end=p.key_end, outputs={}, found={})
        if chunk_size:
            sample["key_in_last_chunk"] = p.key_start // chunk_size == (p.length - 1) // chunk_size
        for name, model in models.items():
            new = greedy_continuation(model, p.input_ids, max_new_tokens, pad)
            text = tokenizer.decode(new, skip_special_tokens=True)
            ok = passkey_found(text, p.key)
            sample["outputs"][name], sample["found"][name] = text, ok
            cell = correct[name].setdefault((p.target_length, p.depth), [0, 0])
            cell[0] += int(ok)
            cell[1] += 1
            bar.update(1)
        logger.debug("passkey L=%d depth=%.2f key=%s: %s", p.target_length, p.depth, p.key, sample["found"])
        samples.append(sample)
    bar.close()
    results = {}
    for name in models:
        cells = [dict(length=L, depth=d, correct=c, trials=n, accuracy=c / n) for (L, d), (c, n) in correct[name].items()]
        total_c = sum(c["correct"] for c in cells)
        total_n = sum(c["trials"] for c in cells)
        results[name] = dict(accuracy=total_c / total_n, cells=cells)
    return dict(lengths=[int(x) for x in lengths], depths=[float(d) for d in depths], trials=trials, seed=seed,
                max_new_tokens=max_new_tokens, models=results, samples=samples)
