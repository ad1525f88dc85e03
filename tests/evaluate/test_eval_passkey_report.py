"""bsbr eval's pass-key flags: fillers, the heat map with its JSON, --passkey-only, --lm-eval-task-dir."""
import json

import pytest
from model_sources import make_source

from bsbr.cli import main
from bsbr.convert import convert_to_bsbr
from bsbr.evaluate import passkey
from bsbr.evaluate.passkey import accuracy_grid, model_order
from bsbr.evaluate.plots import plot_passkey_heatmap
from bsbr.results import write_json
from test_eval_filler import Echo

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def saved(tmp_path_factory, word_tokenizer):
    root = tmp_path_factory.mktemp("saved")
    src = make_source("llama")
    src.save_pretrained(root / "ref")
    convert_to_bsbr(src, chunk_size=16).save_pretrained(root / "conv")
    word_tokenizer.save_pretrained(root / "conv")
    (root / "story.txt").write_text("The fox ran over the hill. It was a bright and windy day in the valley.")
    return root


def test_heatmap_and_json_structure(word_tokenizer, tmp_path):
    r = passkey.run_passkey({"bsbr": Echo(word_tokenizer), "source": Echo(word_tokenizer)}, word_tokenizer,
                            lengths=[160, 120], depths=[0.9, 0.1, 0.5], trials=2, fillers=["random", "classic"],
                            progress=False)
    assert model_order(r) == ["source", "bsbr"]
    grid = accuracy_grid(r, "bsbr")
    assert len(grid) == 2 and all(len(row) == 3 for row in grid)  # rows = lengths, columns = depths
    r["models"]["bsbr"]["cells"] = [c for c in r["models"]["bsbr"]["cells"] if (c["length"], c["depth"]) != (120, 0.5)]
    r["models"]["bsbr"]["cells"][0]["accuracy"] = 0.5  # (160, 0.9): the first cell run
    assert accuracy_grid(r, "bsbr") == [[0.5, 1.0, 1.0], [1.0, 1.0, None]]  # in the result's order
    png, js = plot_passkey_heatmap(r, tmp_path / "out" / "pk.png"), write_json(r, tmp_path / "out" / "pk.json")
    assert png.read_bytes()[:8] == PNG
    back = json.loads(js.read_text())
    assert back["lengths"] == [160, 120] and back["depths"] == [0.9, 0.1, 0.5]
    assert [f["name"] for f in back["fillers"]] == ["random", "classic"]
    assert set(back["models"]["source"]["by_filler"]) == {"random", "classic"}
    assert plot_passkey_heatmap({**r, "fillers": []}, tmp_path / "nofill.png").read_bytes()[:8] == PNG


def test_passkey_only_cli(saved, tmp_path, capsys):
    out = tmp_path / "pk.json"
    rc = main(["eval", str(saved / "conv"), "--reference", str(saved / "ref"), "--passkey-only",
               "--passkey-lengths", "96", "128", "--passkey-depths", "0.1", "0.9", "--passkey-trials", "2",
               "--passkey-filler", "classic", "--passkey-filler", str(saved / "story.txt"),
               "--passkey-new-tokens", "5", "--json", str(out), "--no-progress"])
    assert rc == 0
    r = json.loads(out.read_text())
    assert "language_modeling" not in r and r["config"]["chunk_size"] == 16
    pk = r["passkey"]
    assert set(pk["models"]) == {"bsbr", "source", "local", "window"}
    assert [f["name"] for f in pk["fillers"]] == ["classic", "file:story.txt"]
    assert all(len(m["cells"]) == 4 and set(m["by_filler"]) == {"classic", "file:story.txt"}
               for m in pk["models"].values())
    heat = tmp_path / "pk.passkey.png"
    assert heat.read_bytes()[:8] == PNG
    from bsbr.evaluate.plots import HEATMAP_TITLE, png_title

    assert png_title(heat) == HEATMAP_TITLE  # (how a rerun knows the file is its own heat map to replace)
    assert json.loads(heat.with_suffix(".json").read_text()) == dict(config=r["config"], **pk)  # (the run's record)
    printed = capsys.readouterr().out
    assert "pass-key accuracy per filler" in printed and f"pass-key heat map: {heat}" in printed


def test_full_eval_writes_the_heatmap_beside_the_plot(saved, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("The grass is green . The sky is blue .\n" * 40)
    rc = main(["eval", str(saved / "conv"), "--reference", str(saved / "ref"), "--text-file", str(text),
               "--seq-len", "40", "--max-windows", "1", "--passkey-lengths", "96", "--passkey-depths", "0.5",
               "--passkey-trials", "1", "--passkey-new-tokens", "5", "--plot", str(tmp_path / "e.png"),
               "--no-progress"])
    assert rc == 0
    assert (tmp_path / "e.png").read_bytes()[:8] == PNG and (tmp_path / "e.passkey.png").read_bytes()[:8] == PNG
    pk = json.loads((tmp_path / "e.passkey.json").read_text())
    assert [f["name"] for f in pk["fillers"]] == ["classic"] and pk["trials"] == 1  # (the default fillers one trial reads)
    # written without --json, it names what it measured (two conversions' heat maps could not be told apart)
    assert pk["config"]["model_dir"] == str((saved / "conv").resolve()) and pk["config"]["weights"] and \
        pk["config"]["retrieval_blocks"] is not None and pk["config"]["bsbr"]


def test_lm_eval_task_dir_cli(saved, tmp_path, capsys, monkeypatch):
    import importlib.util

    rc = main(["eval", str(saved / "conv"), "--lm-eval-task-dir", str(tmp_path / "task"), "--passkey-lengths", "96",
               "--passkey-depths", "0.5", "--passkey-trials", "3"])
    assert rc == 0
    rows = (tmp_path / "task" / "bsbr_passkey.jsonl").read_text().splitlines()
    assert [json.loads(x)["filler"] for x in rows] == ["classic", "prose", "random"]
    assert (tmp_path / "task" / "bsbr_passkey.yaml").is_file()
    out = capsys.readouterr().out
    assert "simple_evaluate" in out and "dtype='float32'" in out  # (as bsbr eval runs it, whatever dtype was saved)
    assert "max_length=104)" in out  # the longest prompt and its answer (96 + the default 8 new tokens)
    assert "pip install" not in out
    # without lm-eval the printed snippet's import fails: said, with what to install
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "lm_eval" else find_spec(name, *a))
    assert main(["eval", str(saved / "conv"), "--lm-eval-task-dir", str(tmp_path / "task2"), "--passkey-lengths", "96",
                 "--passkey-depths", "0.5", "--passkey-trials", "3"]) == 0
    assert "(lm-eval is not installed here: pip install 'bsbr[eval]')" in capsys.readouterr().out


def test_passkey_models_restricts_the_run(saved, tmp_path):
    out = tmp_path / "pk.json"
    args = ["eval", str(saved / "conv"), "--reference", str(saved / "ref"), "--passkey-only", "--passkey-lengths",
            "96", "--passkey-depths", "0.5", "--passkey-trials", "1", "--passkey-new-tokens", "5", "--no-progress"]
    assert main(args + ["--passkey-models", "bsbr", "source", "--json", str(out)]) == 0
    assert set(json.loads(out.read_text())["passkey"]["models"]) == {"bsbr", "source"}
    # a window baseline the model has not: tests/evaluate/test_eval_cli_refusals.py


def test_a_passkey_run_of_the_model_alone_loads_no_reference(saved, tmp_path, monkeypatch):
    # the reference was loaded and both baselines converted (three models in memory, never run)
    import bsbr.evaluate.baselines as baselines

    monkeypatch.setattr(baselines, "local_baseline", lambda *a, **k: pytest.fail("a baseline was converted"))
    monkeypatch.setattr("bsbr.convert.converter.load_source", lambda *a, **k: pytest.fail("the reference was loaded"))
    out = tmp_path / "pk.json"
    assert main(["eval", str(saved / "conv"), "--reference", str(saved / "ref"), "--passkey-only", "--passkey-lengths",
                 "96", "--passkey-depths", "0.5", "--passkey-trials", "1", "--passkey-new-tokens", "5", "--no-progress",
                 "--passkey-models", "bsbr", "--json", str(out)]) == 0
    assert set(json.loads(out.read_text())["passkey"]["models"]) == {"bsbr"}


def test_bad_flags(saved, capsys):
    assert main(["eval", str(saved / "conv"), "--passkey-filler", "lorem"]) == 2
    assert "unknown filler" in capsys.readouterr().err
    assert main(["eval", str(saved / "conv"), "--passkey-only", "--no-passkey"]) == 2


def test_writing_a_figure_leaves_the_programs_matplotlib_backend_and_figures_alone(tmp_path):
    # every plot switched the process to Agg (force=True): a notebook's later plt.show() showed nothing
    import subprocess
    import sys

    code = f"""
import matplotlib
matplotlib.use("svg")
import matplotlib.pyplot as plt
mine = plt.figure()
from bsbr.distill.plots import plot_progress
plot_progress({{"log": [{{"step": 0, "kl": 0.5, "ce": 5.0, "lr": 1e-3, "elapsed": 1.0, "seconds": 1.0}}], "step": 1,
               "elapsed": 1.0}}, {str(tmp_path / "p.png")!r})
print(matplotlib.get_backend(), plt.get_fignums() == [mine.number])
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["svg", "True"] and (tmp_path / "p.png").read_bytes()[:8] == PNG


def test_grouped_bars_stand_over_their_own_group_in_the_names_order():
    from types import SimpleNamespace

    from bsbr.evaluate.plots import grouped_bars

    bars = []
    ax = SimpleNamespace(bar=lambda x, heights, width, **kw: bars.append((list(x), heights, kw["label"])),
                         set_xticks=lambda ticks: None)
    grouped_bars(ax, ["source", "bsbr"], ["classic", "random", "prose"], lambda name, group: (name, group))
    for x, heights, _ in bars:
        assert [round(v) for v in x] == [0, 1, 2] and [g for _, g in heights] == ["classic", "random", "prose"]
    assert [label for *_, label in bars] == ["source (full attention)", "BSBR"] and bars[0][0][0] < bars[1][0][0]


def test_the_text_report_puts_each_agreement_under_its_own_column():
    from bsbr.evaluate.report import summary_lines

    result = dict(config=dict(windows=1, seq_len=64, chunk_size=16),
                  language_modeling=dict(tokens=48, perplexity={"bsbr": 10.0}, kl={"bsbr": 0.25}, buckets=[],
                                         agreement={"bsbr": dict(top1=0.1, top5=0.5, top10=0.9)}))
    lines = list(summary_lines(result))
    head = lines[1].split()
    row = dict(zip(head, next(line for line in lines if line.startswith("bsbr")).split()))
    assert (row["ppl"], row["top1"], row["top5"], row["top10"], row["KL"]) == ("10", "0.100", "0.500", "0.900", "0.25")
