"""The pass-key test as a local, offline lm-eval (0.4.x) task: :func:`write_lm_eval_task` writes the
prompts ``bsbr eval`` builds (for a given tokenizer) as a JSONL file, a ``generate_until`` task YAML
on it, and the utils module with the ``passkey`` metric (also averaged per length and per filler).
How to run it with lm-eval's ``HFLM``, and its ``max_length`` and BOS caveats: docs/passkey.md.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import string
from pathlib import Path
from typing import Optional, Sequence, Union

from ..outputs import staged_dir, write_together
from .filler import Filler, default_fillers
from .passkey import (DEFAULT_DEPTHS, DEFAULT_LENGTHS, GREEDY, filler_sources, grid_prompts, passkey_found,
                      warn_repeated_fillers)

logger = logging.getLogger(__name__)

TASK_NAME = "bsbr_passkey"
METRIC = "passkey"

_ZERO_SHOT = "num_fewshot: 0\n"  # (lm-eval's num_fewshot would put other prompts and their keys before each one)
_YAML = """\
# pass-key retrieval, written by bsbr.evaluate.lm_eval_task.write_lm_eval_task (offline: a local JSONL file)
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
num_fewshot: 0
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{key}}}}"
generation_kwargs:
  until: []
  max_gen_toks: {max_new_tokens}
  do_sample: false
{greedy}process_results: !function {utils}.process_results
metric_list:
{metrics}metadata:
  version: 1.0
  lengths: {lengths}
  depths: {depths}
  trials: {trials}
  seed: {seed}
  fillers: {fillers}
"""

# the rest of passkey.GREEDY (lm-eval passes do_sample false itself and sets the temperature): plain greedy
# decoding, whatever the model's generation_config.json sets
_GREEDY_YAML = "".join(f"  {k}: {json.dumps(v)}\n" for k, v in GREEDY.items() if k != "do_sample")

_UTILS = '''\
"""The bsbr_passkey metric (written by bsbr.evaluate.lm_eval_task): whether the model's output holds the
key as bsbr eval finds it (bsbr.evaluate.passkey.passkey_found: its digits as one number, or one space
apart)."""
from bsbr.evaluate.lm_eval_task import process_results  # noqa: F401
'''


def metric_names(length: int, filler: str) -> tuple:
    """The per-length and per-filler metric names of a document: ``passkey_len{length}`` and
    ``passkey_{filler}`` (non-word characters of the filler's name become ``_``)."""
    return f"{METRIC}_len{int(length)}", f"{METRIC}_{re.sub(r'[^0-9A-Za-z_]', '_', filler)}"


def check_filler_metrics(names: Sequence[str]) -> None:
    """Refuse fillers whose per-filler metric names are one (lm-eval would average them together): a ValueError
    naming both."""
    seen: dict = {}
    for name in dict.fromkeys(names):
        metric = metric_names(0, name)[1]
        if seen.setdefault(metric, name) != name:
            raise ValueError(f"fillers {seen[metric]} and {name} would share the lm-eval metric {metric}, which "
                             "would average them together: rename one of them")


def process_results(doc: dict, results: Sequence[str]) -> dict:
    """lm-eval's per-document scorer: ``passkey`` is 1.0 when the first generated text holds ``doc["key"]``
    as :func:`~bsbr.evaluate.passkey.passkey_found` finds it (as ``bsbr eval`` scores it), else 0.0; the same
    value is also reported under the document's length and filler (:func:`metric_names`), so lm-eval averages
    each of them too, over
    the documents that have it (lm-eval warns that the metrics count different documents: that is
    this breakdown, and matters only if the task is put in a size-weighted group)."""
    hit = float(passkey_found(results[0], str(doc["key"])))
    return {METRIC: hit, **{name: hit for name in metric_names(doc["length"], doc["filler"])}}


def _without_bos(tokenizer, ids) -> list:
    """``ids`` without a leading BOS token (lm-eval adds the model's own when it encodes a prompt)."""
    ids = list(ids)
    bos = getattr(tokenizer, "bos_token_id", None)
    return ids[1:] if ids and bos is not None and ids[0] == bos else ids


def _prompt_text(tokenizer, ids) -> str:
    """A prompt's text for the task: its tokens without a leading BOS, special tokens kept (an ``<unk>`` the
    filler held is one: skipped, the prompt lost it, and lm-eval read fewer tokens than bsbr eval)."""
    return tokenizer.decode(_without_bos(tokenizer, ids), skip_special_tokens=False)


ROW_KEYS = ("prompt", "key", "length", "depth", "trial", "filler", "prompt_tokens")


_DIGEST = "# sha256 of the lines above: "  # the YAML's last line: any edit of the task shows
_EARLIER_UTILS_SHA256 = "5d44233ed7939300ffb33478ee7677b87df0cb379e60f6b9ce4c5c3e2fad1d24"  # (another docstring)


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _yaml_pattern(template: str) -> re.Pattern:
    """What ``template.format`` writes, whatever its values (one line each; the metric list as written)."""
    out = []
    for literal, field, _, _ in string.Formatter().parse(template):
        out.append(re.escape(literal))
        if field == "metrics":
            out.append(r"(?:  - metric: \w+\n    aggregation: mean\n    higher_is_better: true\n)+")
        elif field is not None:
            out.append(r"[^\n]*")
    return re.compile("".join(out))


def is_task_file(path: Path, task: str = TASK_NAME) -> bool:
    """Whether ``path`` is a file :func:`write_lm_eval_task` wrote for ``task``, unedited: the YAML by the
    digest on its last line (one written before that line: by its lines, any values), the utils module by its
    text (this version's or the earlier one), the data by its first row's keys."""
    try:
        with open(path, encoding="utf-8") as f:
            if path.name == f"{task}.yaml":
                lines = f.read(1 << 20).splitlines(keepends=True)
                if lines and lines[-1].startswith(_DIGEST):
                    return lines[-1] == f"{_DIGEST}{_sha256(''.join(lines[:-1]))}\n"
                return _yaml_pattern(_YAML.replace(_ZERO_SHOT, "").replace("{greedy}", "")).fullmatch(
                    "".join(lines)) is not None
            if path.name == f"{task}_utils.py":
                text = f.read(4096)
                return text == _UTILS or _sha256(text) == _EARLIER_UTILS_SHA256
            if path.name == f"{task}.jsonl":
                row = json.loads(f.readline())
                return isinstance(row, dict) and {"prompt", "key"} <= set(row) <= set(ROW_KEYS)
    except (OSError, ValueError):  # (unreadable, not text, not JSON)
        return False
    return False


def write_lm_eval_task(task_dir: Union[str, os.PathLike], tokenizer, lengths: Sequence[int] = DEFAULT_LENGTHS,
                       depths: Sequence[float] = DEFAULT_DEPTHS, trials: int = 3, seed: int = 0,
                       fillers: Optional[Sequence[Union[str, Filler]]] = None, max_new_tokens: int = 8,
                       task: str = TASK_NAME) -> Path:
    """Write the task (``{task}.yaml``, ``{task}.jsonl``, ``{task}_utils.py``) into ``task_dir`` and
    return the YAML's path. The prompts are :func:`~bsbr.evaluate.passkey.grid_prompts`'s; each JSONL
    row holds ``prompt`` (text), ``key``, ``length``, ``depth``, ``trial``, ``filler`` and ``prompt_tokens``."""
    if not task.isidentifier():
        raise ValueError(f"task must be a Python identifier (it names the utils module), got {task!r}")
    sources = filler_sources(default_fillers(trials) if fillers is None else fillers)
    check_filler_metrics([f.name for f in sources])
    prompts = list(grid_prompts(tokenizer, lengths, depths, trials, seed, max_new_tokens, sources))
    warn_repeated_fillers(sources, prompts)
    texts = [_prompt_text(tokenizer, p.input_ids) for p in prompts]
    changed = sum(tokenizer(t, add_special_tokens=False)["input_ids"] != _without_bos(tokenizer, p.input_ids)
                  for t, p in zip(texts, prompts))
    if changed:
        logger.warning("%d of %d pass-key prompts read back as other tokens through this tokenizer's text: lm-eval "
                       "may score them differently from bsbr eval", changed, len(prompts))
    from ..corpus import leading_specials  # (torch: not for the parser)

    appended = len(tokenizer("x")["input_ids"]) - len(leading_specials(tokenizer)) - len(tokenizer(
        "x", add_special_tokens=False)["input_ids"])
    if appended > 0:  # (as a Llama tokenizer saved with add_eos_token=True)
        logger.warning("this tokenizer appends %d special token(s) to every text it encodes: lm-eval's HFLM adds them "
                       "after each prompt, bsbr eval does not, so their answers may differ", appended)
    rows = [json.dumps(dict(zip(ROW_KEYS, (text, p.key, p.target_length, p.depth, p.meta["trial"], p.meta["filler"],
                                           p.length)))) + "\n"
            for text, p in zip(texts, prompts)]
    task_dir = Path(task_dir).expanduser()
    data = task_dir.resolve() / f"{task}.jsonl"  # where it will be: the YAML names it
    names = [METRIC] + [metric_names(L, "")[0] for L in lengths] + [metric_names(0, f.name)[1] for f in sources]
    metrics = "".join(f"  - metric: {m}\n    aggregation: mean\n    higher_is_better: true\n"
                      for m in dict.fromkeys(names))
    files = {  # the YAML last: it is what lm-eval looks for
        f"{task}.jsonl": "".join(rows),
        f"{task}_utils.py": _UTILS,
    }
    yaml = _YAML.format(greedy=_GREEDY_YAML, task=task, data=json.dumps(str(data)), max_new_tokens=int(max_new_tokens),
                        utils=f"{task}_utils", metrics=metrics, lengths=json.dumps([int(x) for x in lengths]),
                        depths=json.dumps([float(d) for d in depths]), trials=trials, seed=int(seed),
                        fillers=json.dumps([f.name for f in sources]))
    files[f"{task}.yaml"] = f"{yaml}{_DIGEST}{_sha256(yaml)}\n"
    if task_dir.is_dir():  # the files replaced together: never one task's data beside another's YAML
        for cached in (task_dir / "__pycache__").glob(f"{task}_utils.*.pyc"):  # (bytecode of the utils replaced:
            cached.unlink()  # one whose source hash is unchecked would run in their place)
        write_together([(task_dir / name, lambda path, text=text: path.write_text(text, encoding="utf-8"))
                        for name, text in files.items()])
    elif task_dir.exists():
        raise ValueError(f"task_dir {task_dir} is a file, not a directory")
    else:  # a new directory appears whole, or not at all
        with staged_dir(task_dir) as tmp:
            for name, text in files.items():
                (tmp / name).write_text(text, encoding="utf-8")
    return task_dir / f"{task}.yaml"
