"""The pass-key test as a local, offline lm-eval (0.4.x) task.

:func:`write_lm_eval_task` writes three files into a directory: ``bsbr_passkey.jsonl`` (one prompt
per line, built for a given tokenizer by :func:`bsbr.evaluate.passkey.build_prompt`, so lengths are
in that tokenizer's tokens), ``bsbr_passkey.yaml`` (``dataset_path: json`` on that file,
``output_type: generate_until``, greedy), and ``bsbr_passkey_utils.py`` (the metric ``passkey``:
1 when the key's digits appear in the output once whitespace is removed, as in ``bsbr eval``; also
averaged per length, ``passkey_len4096``, and per filler, ``passkey_prose``).
Nothing is downloaded; ``import bsbr`` registers BSBR models with ``AutoModelForCausalLM``, so
lm-eval's ``HFLM`` loads a converted model directory as it is::

    import bsbr
    from bsbr.evaluate.lm_eval_task import write_lm_eval_task
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoTokenizer

    write_lm_eval_task("passkey_task", AutoTokenizer.from_pretrained("smol-bsbr"), lengths=[4096, 8192])
    out = simple_evaluate(model=HFLM(pretrained="smol-bsbr", device="cpu", max_length=8200),
                          tasks=["bsbr_passkey"], task_manager=TaskManager(include_path="passkey_task"))
    print(out["results"]["bsbr_passkey"]["passkey,none"])

(``TaskManager(..., include_defaults=False)`` skips indexing lm-eval's built-in tasks, ~20 s, in
recent 0.4 releases.) ``HFLM`` cuts prompts from the left to its ``max_length`` less the tokens to generate (by default
the model's ``max_position_embeddings``, 8,192 for SmolLM2), so pass ``max_length`` above the
longest prompt (plus ``max_new_tokens``) for 16k-32k prompts. Its tokenizer adds no BOS to the prompt
by default, so prompts may differ from ``bsbr eval``'s by that one token.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Sequence, Union

from .filler import DEFAULT_FILLERS, Filler
from .passkey import DEFAULT_DEPTHS, filler_sources, grid_prompts, passkey_found

TASK_NAME = "bsbr_passkey"
METRIC = "passkey"
DEFAULT_TASK_LENGTHS = (1024, 2048, 4096)

_YAML = """\
# pass-key retrieval, written by bsbr.evaluate.lm_eval_task.write_lm_eval_task (offline: a local JSONL file)
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{key}}}}"
generation_kwargs:
  until: []
  max_gen_toks: {max_new_tokens}
  do_sample: false
process_results: !function {utils}.process_results
metric_list:
{metrics}metadata:
  version: 1.0
  lengths: {lengths}
  depths: {depths}
  trials: {trials}
  seed: {seed}
  fillers: {fillers}
"""

_UTILS = '''\
"""The bsbr_passkey metric (written by bsbr.evaluate.lm_eval_task): whether the key's digits appear
in the model's output once whitespace is removed."""
from bsbr.evaluate.lm_eval_task import process_results  # noqa: F401
'''


def metric_names(length: int, filler: str) -> tuple:
    """The per-length and per-filler metric names of a document: ``passkey_len{length}`` and
    ``passkey_{filler}`` (non-word characters of the filler's name become ``_``)."""
    return f"{METRIC}_len{int(length)}", f"{METRIC}_{re.sub(r'[^0-9A-Za-z_]', '_', filler)}"


def process_results(doc: dict, results: Sequence[str]) -> dict:
    """lm-eval's per-document scorer: ``passkey`` is 1.0 when ``doc["key"]`` appears in the first
    generated text (whitespace removed), else 0.0; the same value is also reported under the
    document's length and filler (:func:`metric_names`), so lm-eval averages each of them too, over
    the documents that have it (lm-eval warns that the metrics count different documents: that is
    this breakdown, and matters only if the task is put in a size-weighted group)."""
    hit = float(passkey_found(results[0], str(doc["key"])))
    return {METRIC: hit, **{name: hit for name in metric_names(doc["length"], doc["filler"])}}


def write_lm_eval_task(task_dir: Union[str, os.PathLike], tokenizer, lengths: Sequence[int] = DEFAULT_TASK_LENGTHS,
                       depths: Sequence[float] = DEFAULT_DEPTHS, trials: int = 3, seed: int = 0,
                       fillers: Sequence[Union[str, Filler]] = DEFAULT_FILLERS, max_new_tokens: int = 8,
                       task: str = TASK_NAME) -> Path:
    """Write the task (``{task}.yaml``, ``{task}.jsonl``, ``{task}_utils.py``) into ``task_dir`` and
    return the YAML's path. Prompts are the ones ``bsbr eval`` builds: per (length, depth, trial)
    the same seeded key, trial ``t`` with filler ``fillers[t % len(fillers)]``, and ``max_new_tokens``
    tokens of room left for the answer. Each JSONL row holds ``prompt`` (text), ``key``, ``length``,
    ``depth``, ``trial``, ``filler`` and ``prompt_tokens``."""
    if not task.isidentifier():
        raise ValueError(f"task must be a Python identifier (it names the utils module), got {task!r}")
    sources = filler_sources(fillers)
    prompts = list(grid_prompts(tokenizer, lengths, depths, trials, seed, max_new_tokens, sources))
    task_dir = Path(task_dir)
    task_dir.mkdir(parents=True, exist_ok=True)
    data = (task_dir / f"{task}.jsonl").resolve()
    with open(data, "w", encoding="utf-8") as out:
        for p in prompts:
            text = tokenizer.decode(p.input_ids, skip_special_tokens=True)
            out.write(json.dumps(dict(prompt=text, key=p.key, length=p.target_length, depth=p.depth,
                                      trial=p.meta["trial"], filler=p.meta["filler"], prompt_tokens=p.length)) + "\n")
    names = [METRIC] + [metric_names(L, "")[0] for L in lengths] + [metric_names(0, f.name)[1] for f in sources]
    metrics = "".join(f"  - metric: {m}\n    aggregation: mean\n    higher_is_better: true\n"
                      for m in dict.fromkeys(names))
    (task_dir / f"{task}_utils.py").write_text(_UTILS)
    yaml_path = task_dir / f"{task}.yaml"
    yaml_path.write_text(_YAML.format(task=task, data=json.dumps(str(data)), max_new_tokens=int(max_new_tokens),
                                      utils=f"{task}_utils", metrics=metrics,
                                      lengths=json.dumps([int(x) for x in lengths]),
                                      depths=json.dumps([float(d) for d in depths]), trials=trials, seed=int(seed),
                                      fillers=json.dumps([f.name for f in sources])))
    return yaml_path
