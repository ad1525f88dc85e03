"""Pass-key retrieval, generated offline: can the model fetch one fact from far back?

A key in an earlier chunk than the question is invisible to chunk-local attention, visible to full
attention, and reaches BSBR only through retrieval; perplexity averages over many easy tokens, this
test isolates one long-range lookup. Prompts, fillers and scoring are described in docs/passkey.md;
keys and filler offsets are seeded per (length, depth, trial), so every model and every rerun sees the
same prompts.
"""
from __future__ import annotations

import itertools
import logging
import numbers
import random
import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Union

from ..errors import check_not_interrupted
from .filler import MAX_WORDS, MIN_WORDS, Filler, default_fillers, get_filler
from .modes import in_eval_mode

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

INTRO = ("There is a pass key hidden inside a lot of irrelevant text. Find it and remember it. "
         "You will be asked for the pass key at the end.")
KEY_SENTENCE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
DEFAULT_LENGTHS = (1024, 2048, 4096, 8192)
DEFAULT_DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)
MAX_MISSES = 64  # consecutive filler sentences too long for the space left before filling stops
MAX_SCAN = 4096  # sentences read for the first that fits (a filler's sentences, round again if fewer)
MODEL_ORDER = ("source", "local", "window", "bsbr")


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


def _running_text(tokenizer) -> Callable[[str], List[int]]:
    """The ids of a piece that continues running text: `` " " + piece``, less the lone space token a
    tokenizer that prepends its own space puts first (SentencePiece's legacy mode, as Llama 2's and
    Mistral v0.1's: `` " The"`` is ``▁``, ``▁The``, where running text has ``▁The`` alone)."""
    alone, before = _ids(tokenizer, " x"), _ids(tokenizer, "a")
    within = _ids(tokenizer, "a x")[len(before):]
    extra = alone[0] if len(alone) == len(within) + 1 and alone[1:] == within else None

    def encode(piece: str) -> List[int]:
        ids = _ids(tokenizer, " " + piece)
        return ids[1:] if extra is not None and ids[:1] == [extra] else ids

    return encode


class PromptTooShort(ValueError):
    """:func:`build_prompt`'s refusal of a length that leaves no room for filler; ``needed``: the tokens the
    instruction, key, question and answer take."""

    def __init__(self, message: str, needed: int):
        super().__init__(message)
        self.needed = needed


def build_prompt(tokenizer, length: int, depth: float, key: str, answer_tokens: int = 0,
                 filler: Union[str, Filler] = "classic", filler_seed: str = "") -> PasskeyPrompt:
    """A prompt of at most ``length - answer_tokens`` tokens (filler is whole sentences, so it may
    fall a few tokens short) with the key sentence starting at the sentence boundary nearest
    ``depth * length``. Leaving room for the answer keeps prompt + answer within ``length``: with a
    length that is a multiple of the chunk size, the answer never crosses into a new chunk (where
    chunk-local attention would suddenly see nothing of the prompt).

    ``filler``: a kind or file (see :func:`~bsbr.evaluate.filler.get_filler`) or a
    :class:`~bsbr.evaluate.filler.Filler`; ``filler_seed`` picks where its text starts.

    Pieces are tokenized separately and concatenated as ids (each piece after the intro starts
    with a space, as it would in running text: :func:`_running_text`); the intro gets the special
    tokens the tokenizer puts before a text (e.g. BOS), none it appends. The key's token span is
    therefore exact, not estimated from characters.
    """
    if not _whole(length) or length < 1:
        raise ValueError(f"length must be a positive int, got {length!r}")
    if not (isinstance(depth, numbers.Real) and not isinstance(depth, bool) and 0.0 <= depth <= 1.0):
        raise ValueError(f"depth must be a number in [0, 1], got {depth!r}")
    if not _whole(answer_tokens) or answer_tokens < 0:
        raise ValueError(f"answer_tokens must be an int >= 0, got {answer_tokens!r}")
    length, answer_tokens = int(length), int(answer_tokens)
    if not (isinstance(key, str) and key.isdigit()):
        raise ValueError(f"key must be a string of digits, got {key!r}")
    from ..corpus import leading_specials  # (torch: not for the parser)

    source = get_filler(filler)
    intro = leading_specials(tokenizer) + _ids(tokenizer, INTRO)  # (an EOS after it would end the text mid-prompt)
    encode = _running_text(tokenizer)
    key_ids = encode(KEY_SENTENCE.format(key=key))
    question = encode(QUESTION)
    budget = length - answer_tokens - len(intro) - len(key_ids) - len(question)
    sentences = _fill(encode, source.sentences(filler_seed), budget)
    if not sentences:
        raise PromptTooShort(f"length {length} is too short for a pass-key prompt: the instruction, key and "
                             f"question and the {answer_tokens} answer tokens alone take {length - budget} "
                             f"tokens, leaving no room for one {source.name!r} filler sentence (a length above "
                             f"{length - budget} by at least one sentence's tokens has)", length - budget)
    # insert at the sentence boundary nearest the requested depth
    target = depth * length - len(intro)
    boundaries = [0, *itertools.accumulate(len(s) for s in sentences)]
    cut = min(range(len(boundaries)), key=lambda j: abs(boundaries[j] - target))
    before = [t for s in sentences[:cut] for t in s]
    after = [t for s in sentences[cut:] for t in s]
    ids = intro + before + key_ids + after + question
    start = len(intro) + len(before)
    return PasskeyPrompt(input_ids=ids, key=key, key_start=start, key_end=start + len(key_ids), depth=depth,
                         target_length=length, meta=dict(filler=source.name, filler_sentences=len(sentences)))


def _fill(encode: Callable[[str], List[int]], sentences: Iterable[str], budget: int) -> List[List[int]]:
    """Token ids (``encode``'s) of whole sentences from ``sentences``, in order, skipping any that does not fit
    the space left (so long prose sentences still fill closely), until ``budget`` tokens are used or
    :data:`MAX_MISSES` sentences in a row did not fit. The first sentence that fits is looked for through
    :data:`MAX_SCAN` sentences: where a filler file starts never makes a length too short."""
    out: List[List[int]] = []
    cache: Dict[str, List[int]] = {}
    used, misses = 0, 0
    if budget <= 0:
        return out
    for s in sentences:
        ids = cache.get(s)
        if ids is None:
            ids = cache[s] = encode(s)
        if 0 < len(ids) <= budget - used:
            out.append(ids)
            used += len(ids)
            misses = 0
            if used == budget:
                break
        else:
            misses += 1
            if misses >= (MAX_MISSES if out else MAX_SCAN):
                break
    return out


def passkey_found(generated: str, key: str) -> bool:
    """Whether ``key`` is one of the numbers in the generated text: a run of digits (``12345``) or of
    digits one space apart (``1 2 3 4 5``). A longer number that contains it (``123456``, ``1 2 3 4 56``,
    ``12345.6``, ``0.12345``) is not it."""
    spaced = (m.replace(" ", "") for m in re.findall(r"(?<![\d.])\d(?: \d)+(?![\d]|\.\d)", generated))
    return key in re.findall(r"(?<![\d.])\d+(?:\.\d+)*", generated) or key in spaced


# Plain greedy decoding, whatever the model's generation_config.json sets: generate takes every option not
# passed from it, and a source's repetition penalty or no-repeat n-grams (which a conversion carries over)
# hit the key's digits, which the prompt holds twice (SmolLM2 with repetition_penalty 1.1: 14 of 18 keys
# found, against 18). Its stop ids are kept. The lm-eval task passes the same.
GREEDY = dict(do_sample=False, num_beams=1, top_p=None, top_k=None, repetition_penalty=1.0, no_repeat_ngram_size=0,
              bad_words_ids=None, suppress_tokens=None, begin_suppress_tokens=None, sequence_bias=None, min_length=0,
              min_new_tokens=None, forced_bos_token_id=None, forced_eos_token_id=None,
              exponential_decay_length_penalty=None, guidance_scale=None, watermarking_config=None, stop_strings=None,
              max_time=None, num_return_sequences=1, prompt_lookup_num_tokens=None, assistant_early_exit=None,
              dola_layers=None, penalty_alpha=None, encoder_repetition_penalty=1.0, encoder_no_repeat_ngram_size=0,
              token_healing=False,  # (the encoder_ ones read a decoder-only model's prompt as its encoder input)
              return_dict_in_generate=False)  # (the token ids, whatever generation_config.json says)


def greedy_continuation(model, input_ids: Sequence[int], max_new_tokens: int, pad_token_id: Optional[int]) -> List[int]:
    """The model's greedy continuation (new token ids only), via ``generate`` with :data:`GREEDY`: one
    prefill pass that keeps the last position's logits only (``logits_to_keep``), then cached decode steps."""
    import torch  # here, not above: the command line's parser imports this module (bsbr eval --help)

    with torch.inference_mode():
        x = torch.tensor([list(input_ids)], dtype=torch.long)
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                             temperature=None, pad_token_id=pad_token_id, **GREEDY)
        return out[0, x.shape[1]:].tolist()


def filler_sources(fillers: Sequence[Union[str, Filler]]) -> List[Filler]:
    """:func:`~bsbr.evaluate.filler.get_filler` of each, checked non-empty and distinct by name."""
    if not fillers:
        raise ValueError("fillers must name at least one filler")
    sources = [get_filler(f) for f in fillers]
    names = [f.name for f in sources]
    if len(set(names)) != len(names):
        raise ValueError(f"fillers must be distinct, got {names}")
    return sources


def _whole(x) -> bool:
    """An int of any kind (numpy's too), not a bool."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def grid_prompts(tokenizer, lengths: Sequence[int], depths: Sequence[float], trials: int, seed: int,
                 max_new_tokens: int, fillers: Sequence[Union[str, Filler]]) -> Iterable[PasskeyPrompt]:
    """The prompts of a pass-key grid, in order (length, then depth, then trial): trial ``t`` of a
    cell has the key :func:`make_key` (seed, length, depth, t), filler ``fillers[t % len(fillers)]``
    starting at a point seeded by the same four, and ``max_new_tokens`` tokens of room for the
    answer; ``meta`` holds ``trial`` and ``filler``. ``bsbr eval`` and the lm-eval task share them."""
    if not _whole(trials) or trials < 1:
        raise ValueError(f"trials must be a positive int, got {trials!r}")
    if not _whole(seed):
        raise ValueError(f"seed must be an int, got {seed!r}")
    if len(lengths) == 0 or len(depths) == 0:
        raise ValueError("lengths and depths must be non-empty")
    if any(not _whole(n) for n in lengths):  # (120.9 was read as 120)
        raise ValueError(f"lengths must be ints, got {list(lengths)}")
    lengths, trials, depths = [int(n) for n in lengths], int(trials), [float(d) + 0.0 for d in depths]  # (-0 is 0)
    if not _whole(max_new_tokens) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int (room for the answer), got {max_new_tokens!r}")
    for name, values in (("lengths", list(map(int, lengths))), ("depths", list(map(float, depths)))):
        if len(set(values)) < len(values):  # the same prompts twice, counted twice
            raise ValueError(f"{name} holds a value twice: {values}")
    sources = filler_sources(fillers)
    if trials < len(sources):  # trial t reads filler t mod F
        raise ValueError(f"trials ({trials}) are fewer than the fillers ({len(sources)}): "
                         f"{', '.join(s.name for s in sources[trials:])} would never be read")
    check_answer_room(tokenizer, lengths, depths, trials, seed, max_new_tokens)
    for length in map(int, lengths):
        for depth in map(float, depths):
            for trial in range(trials):
                p = build_prompt(tokenizer, length, depth, make_key(seed, length, depth, trial),
                                 answer_tokens=max_new_tokens, filler=sources[trial % len(sources)],
                                 filler_seed=f"{seed}:{length}:{depth}:{trial}")
                p.meta.update(trial=trial)
                yield p


def shortest_length(tokenizer, depths: Sequence[float], trials: int, seed: int, max_new_tokens: int,
                    fillers: Sequence[Union[str, Filler]]) -> int:
    """The shortest length whose prompts of :func:`grid_prompts` all have room for filler (keys and filler
    sentences differ in tokens, so lengths are tried upwards from what the rest takes)."""
    n = 1
    for _ in range(1000):  # (a few dozen: the longest filler sentence's tokens)
        try:
            list(grid_prompts(tokenizer, [n], depths, trials, seed, max_new_tokens, fillers))
            break
        except PromptTooShort as e:
            n = max(n + 1, e.needed + 1)
    return n


def check_answer_room(tokenizer, lengths: Sequence[int], depths: Sequence[float], trials: int, seed: int,
                      max_new_tokens: int, name: str = "max_new_tokens") -> None:
    """A ValueError when the tokenizer cannot write some key of the grid (its tokens do not decode to its digits:
    an unknown token for digits), or ``max_new_tokens`` (the option ``name``) is fewer than the tokens some
    answer (a space and its key) takes: no answer could be found."""
    need = 0
    for key in {make_key(seed, int(n), float(d), t) for n in lengths for d in depths for t in range(trials)}:
        ids = _ids(tokenizer, " " + key)
        said = tokenizer.decode(ids)
        if key not in "".join(said.split()):
            raise ValueError(f"the tokenizer cannot write the pass key's digits (' {key}' is encoded as tokens "
                             f"that decode as {said.strip()!r}): no model could answer; use a tokenizer that spells "
                             "numbers")
        need = max(need, len(ids))
    if max_new_tokens < need:
        raise ValueError(f"{name} {max_new_tokens} is fewer than the {need} tokens a key's answer (a space and five "
                         f"digits) takes with this tokenizer: give {name} {need} or more")


def check_prompt_lengths(tokenizer, option: str, fix: str, lengths: Sequence[int], depths: Sequence[float],
                         trials: int, seed: int, max_new_tokens: int, fillers: Sequence[Union[str, Filler]], **_) -> None:
    """Refuse, before any model runs, a grid whose answers do not fit ``--passkey-new-tokens`` or whose
    shortest length leaves no room for filler: its prompts are built (cheap where this can fail) and a
    :class:`~bsbr.errors.UserError` names ``option``, the flag that set the lengths, and ``fix``. Takes a
    ``passkey`` dict of :func:`run_passkey`'s keyword arguments."""
    from ..errors import UserError

    try:
        check_answer_room(tokenizer, lengths, depths, trials, seed, max_new_tokens, "--passkey-new-tokens")
    except ValueError as e:
        raise UserError(str(e)) from None
    try:
        list(grid_prompts(tokenizer, [min(lengths)], depths, trials, seed, max_new_tokens, fillers))
    except ValueError as e:
        raise UserError(f"{option}: {e}: {fix}") from None


def _rate(counts: Iterable[Sequence[int]]) -> dict:
    """The sums of ``[correct, trials]`` counts (at least one trial), and their accuracy."""
    correct, trials = (sum(column) for column in zip(*counts))
    return dict(correct=correct, trials=trials, accuracy=correct / trials)


def warn_repeated_fillers(sources: Sequence[Filler], prompts: Sequence[PasskeyPrompt]) -> None:
    """Warn of a filler (a file, or a built-in text but the classic sentences, repeated by design) whose usable
    sentences are too few to fill a prompt without repeating them."""
    for source in sources:
        distinct = source.describe().get("sentences")
        used = max((p.meta["filler_sentences"] for p in prompts if p.meta["filler"] == source.name), default=0)
        if source.name != "classic" and distinct and used > distinct:
            named = source.origin if source.name.startswith("file:") else f"{source.name} ({source.origin})"
            logger.warning("filler %s has %d usable sentences (%d-%d words, capitalised, ending in . ! or ?, without "
                           "digits): the longest prompts read each %.1f times on average; a longer text gives a test "
                           "less like the repeated classic filler", named, distinct, MIN_WORDS, MAX_WORDS,
                           used / distinct)


@in_eval_mode
def run_passkey(models: Mapping[str, torch.nn.Module], tokenizer, lengths: Sequence[int] = DEFAULT_LENGTHS,
                depths: Sequence[float] = DEFAULT_DEPTHS, trials: int = 3, seed: int = 0, max_new_tokens: int = 8,
                chunk_size: Optional[int] = None, progress: bool = True,
                fillers: Optional[Sequence[Union[str, Filler]]] = None, only: Optional[Sequence[str]] = None) -> dict:
    """Accuracy of each model per (length, depth) cell and per filler, and every trial's output, on
    the prompts of :func:`grid_prompts` (``trials`` a multiple of the number of fillers gives each
    filler the same weight in every cell). ``chunk_size`` (optional) records whether each key lies
    in the question's chunk, i.e. whether chunk-local attention could see it at all. ``only``: the
    names of the models to run (default: all of ``models``), e.g. to skip the slow source at 32k.

    Returns ``{"lengths", "depths", "trials", "seed", "max_new_tokens", "fillers": [description],
    "models": {name: {"accuracy", "cells": [{"length", "depth", "correct", "trials", "accuracy"}],
    "by_filler": {filler: {"correct", "trials", "accuracy", "by_length": {length: accuracy}}},
    "seconds", "seconds_by_length"}}, "samples": [...]}``.
    """
    from ..progress import bar as progress_bar

    if isinstance(only, str):  # (read as its letters)
        raise TypeError(f"only must be a list of model names, got the string {only!r}: give [{only!r}]")
    if only is not None:
        unknown = sorted(set(only) - set(models))
        if unknown:
            raise ValueError(f"only names models that are not here: {unknown} (have {sorted(models)})")
        models = {n: m for n, m in models.items() if n in set(only)}
    if not models:
        raise ValueError("models must name at least one model")
    for name, model in models.items():
        if not callable(getattr(model, "generate", None)):  # (a task head's class: an AttributeError, later)
            raise TypeError(f"model {name!r} is a {type(model).__name__}, which cannot generate: the pass-key test "
                            "runs causal LMs (AutoModelForCausalLM)")
    sources = filler_sources(default_fillers(trials) if fillers is None else fillers)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prompts = list(grid_prompts(tokenizer, lengths, depths, trials, seed, max_new_tokens, sources))
    warn_repeated_fillers(sources, prompts)
    cells = {m: {} for m in models}          # (length, depth) -> [correct, n]
    by_filler = {m: {} for m in models}      # filler -> length -> [correct, n]
    seconds = {m: {} for m in models}        # length -> seconds
    samples = []
    bar = progress_bar(total=len(prompts) * len(models), desc="passkey", disable=not progress)
    for p in prompts:
        check_not_interrupted()  # (a Ctrl-C a library swallowed)
        filler = p.meta["filler"]
        sample = dict(length=p.target_length, prompt_tokens=p.length, depth=p.depth, trial=p.meta["trial"],
                      filler=filler, key=p.key, key_start=p.key_start, key_end=p.key_end, outputs={}, found={})
        if chunk_size:  # some of the key sentence (its digits come twice) lies in the question's own chunk
            sample["key_in_last_chunk"] = (p.key_end - 1) // chunk_size == (p.length - 1) // chunk_size
        for name, model in models.items():
            bar.set_description(f"passkey {name} L={p.target_length} depth={p.depth:g} {filler}")
            t0 = time.perf_counter()
            new = greedy_continuation(model, p.input_ids, max_new_tokens, pad)
            seconds[name][p.target_length] = seconds[name].get(p.target_length, 0.0) + time.perf_counter() - t0
            text = tokenizer.decode(new, skip_special_tokens=True)
            ok = passkey_found(text, p.key)
            sample["outputs"][name], sample["found"][name] = text, ok
            for c in (cells[name].setdefault((p.target_length, p.depth), [0, 0]),
                      by_filler[name].setdefault(filler, {}).setdefault(p.target_length, [0, 0])):
                c[0] += int(ok)
                c[1] += 1
            bar.set_postfix_str(" ".join(f"{m}={sum(c for c, _ in cells[m].values())}/"
                                         f"{sum(n for _, n in cells[m].values())}" for m in models), refresh=False)
            bar.update(1)
        logger.debug("passkey L=%d depth=%.2f filler=%s key=%s: %s", p.target_length, p.depth, filler, p.key,
                     sample["found"])
        samples.append(sample)
    bar.close()
    results = {}
    for name in models:
        cell_list = [dict(length=L, depth=d, **_rate([counts])) for (L, d), counts in cells[name].items()]
        # fillers in the order first run, which is the order given (trial t uses filler t mod F)
        per_filler = {f: dict(**_rate(rows.values()), by_length={str(L): c / n for L, (c, n) in rows.items()})
                      for f, rows in by_filler[name].items()}
        results[name] = dict(**_rate(cells[name].values()), cells=cell_list, by_filler=per_filler,
                             seconds=round(sum(seconds[name].values()), 2),
                             seconds_by_length={str(L): round(t, 2) for L, t in seconds[name].items()})
    return dict(lengths=[int(x) for x in lengths], depths=[float(d) + 0.0 for d in depths], trials=int(trials),
                seed=int(seed), max_new_tokens=int(max_new_tokens), fillers=[f.describe() for f in sources],
                models=results, samples=samples)


def model_order(passkey: dict) -> list:
    """The result's model names: source, local, window, bsbr first, then any others in their order."""
    names = [n for n in MODEL_ORDER if n in passkey["models"]]
    return names + [n for n in passkey["models"] if n not in names]


def accuracy_grid(passkey: dict, model: str) -> list:
    """Accuracy of ``model`` as rows (lengths, in the result's order) of columns (depths); ``None``
    for a cell without trials."""
    acc = {(c["length"], c["depth"]): c["accuracy"] for c in passkey["models"][model]["cells"]}
    return [[acc.get((L, d)) for d in passkey["depths"]] for L in passkey["lengths"]]


def passkey_summary_lines(passkey: dict) -> Iterable[str]:
    """A text table of a :func:`run_passkey` result: accuracy per length (rows) and model@depth
    (columns), overall accuracy, accuracy per filler, and seconds per model."""
    names = model_order(passkey)
    yield f"pass-key accuracy ({passkey['trials']} trials per cell; rows = length, columns = depth):"
    yield f"  {'length':<7} " + " ".join(f"{n}@{d:g}".rjust(11) for n in names for d in passkey["depths"])
    grids = {n: accuracy_grid(passkey, n) for n in names}
    for i, L in enumerate(passkey["lengths"]):
        yield f"  {L:<7} " + " ".join(f"{a:.2f}".rjust(11) for n in names for a in grids[n][i])
    yield "  overall: " + ", ".join(f"{n} {passkey['models'][n]['accuracy']:.2f}" for n in names)
    fillers = [f["name"] for f in passkey.get("fillers", [])  # those some model ran (trials cycle through them)
               if any(f["name"] in passkey["models"][n].get("by_filler", {}) for n in names)]
    if fillers:
        yield "pass-key accuracy per filler (trials):"
        yield f"  {'filler':<24} " + " ".join(f"{n:>11}" for n in names)
        for f in fillers:
            rows = (passkey["models"][n].get("by_filler", {}).get(f) for n in names)
            yield f"  {f:<24} " + " ".join((f"{r['accuracy']:.2f} ({r['trials']})" if r else "-").rjust(11)
                                           for r in rows)
    if all("seconds" in passkey["models"][n] for n in names):
        yield "  seconds: " + ", ".join(f"{n} {passkey['models'][n]['seconds']:.1f}" for n in names)
