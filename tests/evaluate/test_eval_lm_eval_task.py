import json

import pytest
import torch
from model_sources import make_source

from bsbr.convert import convert_to_bsbr
from bsbr.evaluate import lm_eval_task, passkey


def test_task_files(word_tokenizer, tmp_path):
    y = lm_eval_task.write_lm_eval_task(tmp_path / "task", word_tokenizer, lengths=[96, 160], depths=[0.2, 0.8],
                                        trials=2, fillers=["classic", "random"], max_new_tokens=5)
    assert y == tmp_path / "task" / "bsbr_passkey.yaml"
    text = y.read_text()
    assert "output_type: generate_until" in text and "dataset_path: json" in text and "max_gen_toks: 5" in text
    assert str((tmp_path / "task" / "bsbr_passkey.jsonl").resolve()) in text
    rows = [json.loads(line) for line in (tmp_path / "task" / "bsbr_passkey.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 2 * 2
    assert [r["key"] for r in rows] == [passkey.make_key(0, L, d, t) for L in (96, 160) for d in (0.2, 0.8)
                                        for t in range(2)]
    assert [r["filler"] for r in rows[:2]] == ["classic", "random"]
    for r in rows:
        assert r["prompt_tokens"] <= r["length"] - 4
        assert r["prompt"].count(" ".join(r["key"])) == 2 and r["prompt"].rstrip().endswith("The pass key is")
    assert lm_eval_task.process_results(rows[0], [" " + " ".join(rows[0]["key"]) + " ."]) == {
        "passkey": 1.0, "passkey_len96": 1.0, "passkey_classic": 1.0}
    assert lm_eval_task.process_results(rows[1], [" 00000"]) == {
        "passkey": 0.0, "passkey_len96": 0.0, "passkey_random": 0.0}
    assert lm_eval_task.metric_names(4096, "file:my text.txt") == ("passkey_len4096", "passkey_file_my_text_txt")
    for m in ("passkey", "passkey_len96", "passkey_len160", "passkey_classic", "passkey_random"):
        assert f"  - metric: {m}\n" in text
    with pytest.raises(ValueError, match="identifier"):
        lm_eval_task.write_lm_eval_task(tmp_path, word_tokenizer, task="bsbr-passkey")


def test_rewriting_a_task_is_all_or_nothing(word_tokenizer, tmp_path, monkeypatch):
    """A Ctrl-C while a task folder was rewritten left the new prompts beside the old YAML (its lengths
    and metrics): the files are now replaced together, or not at all."""
    from pathlib import Path

    task = tmp_path / "task"
    lm_eval_task.write_lm_eval_task(task, word_tokenizer, lengths=[96], trials=1, max_new_tokens=5)
    before = {p.name: p.read_bytes() for p in task.iterdir()}
    write_text, written = Path.write_text, []

    def interrupted(self, *args, **kwargs):
        written.append(self.name)
        if len(written) == 2:
            raise KeyboardInterrupt
        return write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", interrupted)
    with pytest.raises(KeyboardInterrupt):
        lm_eval_task.write_lm_eval_task(task, word_tokenizer, lengths=[160], trials=1, max_new_tokens=5)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in task.iterdir()} == before and len(written) == 2
    lm_eval_task.write_lm_eval_task(task, word_tokenizer, lengths=[160], trials=1, max_new_tokens=5)
    assert "lengths: [160]" in (task / "bsbr_passkey.yaml").read_text() and sorted(before) == sorted(
        p.name for p in task.iterdir())


def test_bytecode_beside_the_task_never_runs_in_place_of_its_utils(word_tokenizer, tmp_path):
    # a __pycache__/bsbr_passkey_utils.*.pyc left in the folder (bsbr eval accepts the cache of its own module)
    # whose source hash is unchecked ran in place of the utils just written when lm-eval imported them
    import importlib
    import py_compile
    import sys

    task, marker = tmp_path / "task", tmp_path / "marker"
    (task / "__pycache__").mkdir(parents=True)
    foreign = tmp_path / "foreign.py"
    foreign.write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    cached = task / "__pycache__" / f"bsbr_passkey_utils.{sys.implementation.cache_tag}.pyc"
    py_compile.compile(str(foreign), cfile=str(cached),
                       invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
    lm_eval_task.write_lm_eval_task(task, word_tokenizer, lengths=[96], trials=1, max_new_tokens=5)
    sys.path.insert(0, str(task))
    try:
        module = importlib.import_module("bsbr_passkey_utils")
    finally:
        sys.path.remove(str(task))
        sys.modules.pop("bsbr_passkey_utils", None)
    assert not marker.exists() and hasattr(module, "process_results")


def test_simple_evaluate_on_a_tiny_bsbr_model(word_tokenizer, tmp_path):
    """lm-eval runs the task offline on a saved BSBR model (HFLM loads it via AutoModelForCausalLM
    once bsbr is imported) and reports the task's metric."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    model_dir = tmp_path / "model"
    convert_to_bsbr(make_source("llama"), chunk_size=16).save_pretrained(model_dir)
    word_tokenizer.save_pretrained(model_dir)
    task_dir = tmp_path / "task"
    lm_eval_task.write_lm_eval_task(task_dir, word_tokenizer, lengths=[96, 128], depths=[0.5], trials=2,
                                    fillers=["classic", "random"], max_new_tokens=5)
    from bsbr import BSBRForCausalLM

    lm = HFLM(pretrained=str(model_dir), device="cpu", batch_size=1)
    assert isinstance(lm.model, BSBRForCausalLM)
    torch.manual_seed(0)
    out = lm_eval.simple_evaluate(model=lm,
                                  tasks=["bsbr_passkey"], task_manager=TaskManager(include_path=str(task_dir),
                                                                                    include_defaults=False),
                                  bootstrap_iters=0)
    res = out["results"]["bsbr_passkey"]
    assert 0.0 <= res["passkey,none"] <= 1.0
    for m in ("passkey_len96", "passkey_len128", "passkey_classic", "passkey_random"):
        assert 0.0 <= res[f"{m},none"] <= 1.0
    samples0 = out["samples"]["bsbr_passkey"]
    for L in (96, 128):  # each length's mean is over its own documents only
        assert res[f"passkey_len{L},none"] == pytest.approx(
            sum(s["passkey"] for s in samples0 if s["doc"]["length"] == L) / 2)
    samples = out["samples"]["bsbr_passkey"]
    assert len(samples) == 4 and all(s["passkey"] in (0.0, 1.0) for s in samples)
    assert {s["doc"]["filler"] for s in samples} == {"classic", "random"}
    # the whole prompt reached the model (HFLM cuts from the left only past its max_length)
    assert all(s["arguments"][0][0] == s["doc"]["prompt"] and len(s["resps"][0][0].split()) <= 5 for s in samples)
    assert lm.max_length > max(s["doc"]["prompt_tokens"] for s in samples)


@pytest.mark.slow
def test_the_lm_eval_command_line_runs_the_task_on_a_bsbr_model(word_tokenizer, tmp_path):
    """`lm_eval --model hf` (the form every 0.4 release takes) never imports bsbr: the saved model loads
    through its auto_map with trust_remote_code=True."""
    import os
    import shutil
    import subprocess
    import sys

    pytest.importorskip("lm_eval")
    cli = shutil.which("lm_eval", path=os.path.dirname(sys.executable))
    assert cli, "lm_eval not found next to the interpreter"
    model_dir, task_dir = tmp_path / "model", tmp_path / "task"
    convert_to_bsbr(make_source("llama"), chunk_size=16).save_pretrained(model_dir)
    word_tokenizer.save_pretrained(model_dir)
    lm_eval_task.write_lm_eval_task(task_dir, word_tokenizer, lengths=[96], depths=[0.5], trials=2,
                                    fillers=["classic"], max_new_tokens=5)
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([cli, "--model", "hf", "--model_args", f"pretrained={model_dir},trust_remote_code=True",
                          "--device", "cpu", "--tasks", "bsbr_passkey", "--include_path", str(task_dir),
                          "--output_path", str(tmp_path / "out")],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    results = [json.loads(p.read_text()) for p in (tmp_path / "out").rglob("results_*.json")]
    assert len(results) == 1 and 0.0 <= results[0]["results"]["bsbr_passkey"]["passkey,none"] <= 1.0


def test_metrics_aggregate_per_length_and_filler(word_tokenizer, tmp_path):
    """A stand-in LM that finds every key in the 96-token prompts and none in the 128-token ones:
    lm-eval's means per length, per filler and overall follow."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.api.model import LM
    from lm_eval.tasks import TaskManager

    short_keys = {passkey.make_key(0, 96, d, t) for d in (0.3, 0.7) for t in range(2)}

    class Reader(LM):
        def generate_until(self, requests):
            out = []
            for r in requests:
                digits = "".join(w for w in r.args[0].split() if w.isdigit())[:5]
                out.append(" " + digits if digits in short_keys else " 00000")
            return out

        def loglikelihood(self, requests):
            raise NotImplementedError

        def loglikelihood_rolling(self, requests):
            raise NotImplementedError

    lm_eval_task.write_lm_eval_task(tmp_path, word_tokenizer, lengths=[96, 128], depths=[0.3, 0.7], trials=2,
                                    fillers=["classic", "random"], max_new_tokens=5)
    out = lm_eval.simple_evaluate(model=Reader(), tasks=["bsbr_passkey"], bootstrap_iters=0,
                                  task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False))
    res = out["results"]["bsbr_passkey"]
    assert (res["passkey_len96,none"], res["passkey_len128,none"]) == (1.0, 0.0)
    assert res["passkey,none"] == res["passkey_classic,none"] == res["passkey_random,none"] == 0.5


@pytest.mark.parametrize("bad, words", [(dict(max_new_tokens=0), "max_new_tokens"),
                                        (dict(max_new_tokens=-1), "max_new_tokens"),
                                        (dict(lengths=[96, 96]), "lengths holds a value twice"),
                                        (dict(depths=[0.5, 0.5]), "depths holds a value twice")])
def test_the_task_refuses_what_the_command_refuses(word_tokenizer, tmp_path, bad, words):
    # the Python API wrote max_gen_toks 0 or -1 (a key that can never be found) and the same document twice
    kw = {**dict(lengths=[96], depths=[0.5], trials=1, fillers=["classic"]), **bad}
    with pytest.raises(ValueError, match=words):
        lm_eval_task.write_lm_eval_task(tmp_path / "task", word_tokenizer, **kw)
    assert not (tmp_path / "task").exists()


def test_the_task_prompts_are_the_tokens_bsbr_eval_reads(word_tokenizer, tmp_path):
    """Decoded with its special tokens skipped, a prompt lost the <unk> tokens of its filler (the word
    tokenizer's random filler: 295 tokens in bsbr eval, 130 through lm-eval)."""
    lm_eval_task.write_lm_eval_task(tmp_path / "task", word_tokenizer, lengths=[300], depths=[0.5], trials=2,
                                    fillers=["classic", "random"], max_new_tokens=5)
    rows = [json.loads(line) for line in (tmp_path / "task" / "bsbr_passkey.jsonl").read_text().splitlines()]
    prompts = list(passkey.grid_prompts(word_tokenizer, [300], [0.5], 2, 0, 5, ["classic", "random"]))
    assert any(word_tokenizer.unk_token_id in p.input_ids for p in prompts)  # the case this checks
    for r, p in zip(rows, prompts):
        assert word_tokenizer(r["prompt"], add_special_tokens=False)["input_ids"] == list(p.input_ids)
        assert r["prompt_tokens"] == p.length


def test_the_task_stays_zero_shot_and_greedy_whatever_lm_eval_or_the_model_asks(word_tokenizer, tmp_path):
    """lm-eval's num_fewshot (often passed for every task of a run) put other pass-key prompts, their keys
    as answers, before each prompt: another test, reported under the same metrics."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.api.model import LM
    from lm_eval.tasks import TaskManager

    seen, kwargs = [], []

    class Reader(LM):
        def generate_until(self, requests):
            seen.extend(r.args[0] for r in requests)
            kwargs.extend(r.args[1] for r in requests)
            return [" 00000"] * len(requests)

        def loglikelihood(self, requests):
            raise NotImplementedError

        def loglikelihood_rolling(self, requests):
            raise NotImplementedError

    lm_eval_task.write_lm_eval_task(tmp_path, word_tokenizer, lengths=[96], depths=[0.3, 0.7], trials=2,
                                    fillers=["classic", "random"], max_new_tokens=5)
    assert lm_eval_task.is_task_file(tmp_path / "bsbr_passkey.yaml")
    lm_eval.simple_evaluate(model=Reader(), tasks=["bsbr_passkey"], bootstrap_iters=0, num_fewshot=2,
                            task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False))
    rows = [json.loads(line)["prompt"] for line in (tmp_path / "bsbr_passkey.jsonl").read_text().splitlines()]
    assert sorted(seen) == sorted(rows)
    # plain greedy decoding as bsbr eval's, whatever the model's generation_config.json sets
    assert all(k.items() >= passkey.GREEDY.items() for k in kwargs), kwargs[0]


def test_the_task_writer_defaults_are_bsbr_eval_s_pass_key_defaults():
    """One default grid per concept: the Python task writer, run_passkey and `bsbr eval`'s filled options agree."""
    import inspect

    from bsbr.evaluate import cli, passkey

    task = inspect.signature(lm_eval_task.write_lm_eval_task).parameters
    run = inspect.signature(passkey.run_passkey).parameters
    cli_defaults = dict(lengths=passkey.DEFAULT_LENGTHS, depths=passkey.DEFAULT_DEPTHS,
                        trials=cli._FILLED["passkey_trials"], max_new_tokens=cli._FILLED["passkey_new_tokens"],
                        seed=cli._FILLED["seed"])
    for name, value in cli_defaults.items():
        assert task[name].default == value, name
        assert run[name].default == value, name


def test_the_task_is_written_for_any_tokenizer_and_any_folder(word_tokenizer, tmp_path, monkeypatch, caplog):
    """A tokenizer that adds a BOS gives prompts without it (HFLM adds its own); no false warning of appended
    special tokens; a relative task folder names its data by absolute path (lm-eval runs from anywhere); fillers
    whose metrics would be one, and a task folder that is a file, are refused with nothing left behind."""
    from tokenizers import processors
    from word_tokenizer import build_word_tokenizer

    monkeypatch.chdir(tmp_path)
    bos = build_word_tokenizer()
    bos._tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    with caplog.at_level("WARNING"):
        lm_eval_task.write_lm_eval_task("rel", bos, lengths=[96], depths=[0.5], trials=1, fillers=["classic"])
        lm_eval_task.write_lm_eval_task("plain", word_tokenizer, lengths=[96], depths=[0.5], trials=1,
                                        fillers=["classic"])
    assert "special token" not in caplog.text
    (row,) = [json.loads(line) for line in (tmp_path / "rel" / "bsbr_passkey.jsonl").read_text().splitlines()]
    (prompt,) = passkey.grid_prompts(bos, [96], [0.5], 1, 0, 8, ["classic"])
    assert not row["prompt"].startswith("<s>") and bos(row["prompt"])["input_ids"] == list(prompt.input_ids)
    assert f'test: "{(tmp_path / "rel" / "bsbr_passkey.jsonl").resolve()}"' in \
        (tmp_path / "rel" / "bsbr_passkey.yaml").read_text()
    for name in ("a-b.txt", "a_b.txt"):
        (tmp_path / name).write_text("The fox ran over the hill on a bright and windy day in the valley.\n" * 5)
    with pytest.raises(ValueError, match="fillers file:a-b.txt and file:a_b.txt would share the lm-eval metric"):
        lm_eval_task.write_lm_eval_task("both", word_tokenizer, lengths=[96], depths=[0.5], trials=1,
                                        fillers=["a-b.txt", "a_b.txt"])
    (tmp_path / "file").write_text("mine")
    with pytest.raises(ValueError, match="task_dir file is a file, not a directory"):
        lm_eval_task.write_lm_eval_task("file", word_tokenizer, lengths=[96], depths=[0.5], trials=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-b.txt", "a_b.txt", "file", "plain", "rel"]
    assert (tmp_path / "file").read_text() == "mine"
