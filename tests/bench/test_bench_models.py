"""Smoke tests of ``bsbr bench models`` and ``bsbr bench quality``: they run at tiny sizes and write
the documented JSON keys. No timing assertions (the machines are shared)."""
import json
import math

import pytest

from bsbr.bench import models as bench_models
from bsbr.bench import quality as bench_quality
from bsbr.cli import main

ROW_KEYS = {"model", "seq_len", "time_ms", "train_time_ms", "peak_mb", "params"}


@pytest.mark.slow
def test_bench_models_cli_writes_json_and_plot(tmp_path):
    out, png = tmp_path / "m.json", tmp_path / "m.png"
    rc = main(["bench", "models", "--seq-lens", "64", "--repeats", "1", "--hidden", "32", "--heads", "2",
               "--ff-dim", "64", "--chunk-size", "16", "--json", str(out), "--plot", str(png)])
    assert rc == 0
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert {r["model"] for r in rows} == set(bench_models.DEFAULT_MODELS)
    for r in rows:
        assert ROW_KEYS <= set(r)
        assert r["seq_len"] == 64 and r["status"] == "ok"
        assert r["time_ms"] > 0 and r["train_time_ms"] > 0 and r["params"] > 0
    assert png.stat().st_size > 0
    assert set(result["exponents"]) == set(bench_models.DEFAULT_MODELS)


def test_bench_models_without_train_steps_records_so(tmp_path, recwarn):
    # --no-train recorded model_budget 90 (a budget for steps that never ran) and no train flag, and its plot
    # drew an empty train panel (matplotlib: "No artists with labels found to put in legend")
    out, png = tmp_path / "m.json", tmp_path / "m.png"
    assert main(["bench", "models", "--seq-lens", "64", "--repeats", "1", "--hidden", "32", "--heads", "2",
                 "--ff-dim", "64", "--chunk-size", "16", "--models", "standard", "bsbr", "--no-train",
                 "--json", str(out), "--plot", str(png)]) == 0
    config = json.loads(out.read_text())["config"]
    assert config["train"] is False and config["model_budget"] is None
    assert not [w for w in recwarn if "No artists" in str(w.message)]


def test_bench_models_rejects_unknown_model(capsys):
    assert main(["bench", "models", "--seq-lens", "64", "--models", "flash"]) == 2
    assert "unknown" in capsys.readouterr().err


def test_fit_exponent():
    fit = bench_models.fit_exponent([(1024, 1.0), (2048, 4.0), (4096, 16.0), (8192, 64.0)])
    assert fit["exponent"] == pytest.approx(2.0) and fit["from"] == 4096
    assert bench_models.fit_exponent([(1024, 1.0)]) is None


def test_bench_quality_tiny(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(10):
        (corpus / f"m{i}.py").write_text(f"def f{i}(x):\n    return x + {i}\n" * 40)
    out = tmp_path / "q.json"
    rc = main(["bench", "quality", "--corpus", str(corpus), "--models", "bsbr", "sliding_window", "--steps", "2",
               "--batch", "2", "--seq-len", "80", "--hidden", "16", "--heads", "2", "--ff-dim", "32", "--chunk-size", "16",
               "--eval-windows", "2", "--json", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert [r["model"] for r in result["results"]] == ["bsbr", "sliding_window"]
    assert list(result["results"][0]["buckets"]) == ["0-63", "64-79"]
    # each window's loss per byte, averaged over the windows (near ln 256 for these untrained models, not a sum)
    assert all(0 < v < 1.5 * math.log(256) for r in result["results"] for v in r["buckets"].values())
    c = result["comparison"][0]
    assert c["bsbr_model"] == "bsbr" and c["chunk"] == c["positions_from"] == 16
    # positions 16-79 exactly (the buckets are 0-63, 64-79: it compared positions 64-79 and said ">= 16")
    assert c["bsbr_loss_past_chunk"] == result["results"][0]["loss_past"]["16"]
    assert c["window_loss_past_chunk"] == result["results"][1]["loss_past"]["16"]
    assert result["config"]["corpus"] == str(corpus.resolve())  # the same folder spelled another way merges
    assert result["machine"]["bsbr"] and result["machine"]["transformers"]  # what ran, beside where
    other = tmp_path / "q2.json"
    assert main(["bench", "quality", "--corpus", f"{corpus}/./", "--models", "standard", "--steps", "2",
                 "--batch", "2", "--seq-len", "80", "--hidden", "16", "--heads", "2", "--ff-dim", "32", "--chunk-size",
                 "16", "--eval-windows", "2", "--json", str(other)]) == 0
    merged = tmp_path / "merged.json"
    assert main(["bench", "quality", "--merge", str(out), str(other), "--json", str(merged)]) == 0
    assert len(json.loads(merged.read_text())["results"]) == 3  # the same file twice is refused (test_bench_refusals)
    assert bench_quality.buckets_for(512) == [(0, 64), (64, 128), (128, 256), (256, 512)]
    assert bench_quality.buckets_for(40) == [(0, 40)]  # (a window shorter than the first bucket: named 0-39)


def test_quality_comparison_of_an_older_result_says_which_positions_it_covers():
    # a result written before loss_past was recorded: the buckets from the chunk on, and the table says where
    # they start
    old = [dict(model=m, buckets={"0-63": 3.0, "64-127": v, "128-255": v}) for m, v in (("bsbr", 1.0),
                                                                                    ("sliding_window", 2.0))]
    (c,) = bench_quality.compare_to_window(old, 32)
    assert (c["positions_from"], c["bsbr_loss_past_chunk"], c["window_loss_past_chunk"]) == (64, 1.0, 2.0)
    table = bench_quality.format_table(dict(results=old, comparison=[c]))
    assert "bsbr vs sliding_window on positions >= 64: 1.0000 vs 2.0000 (BSBR better, diff -1.0000)" in table
    worse = [dict(r, buckets={k: 3.0 - v if k != "0-63" else v for k, v in r["buckets"].items()}) for r in old]
    table = bench_quality.format_table(dict(results=worse, comparison=bench_quality.compare_to_window(worse, 32)))
    assert "on positions >= 64: 2.0000 vs 1.0000 (BSBR NOT better, diff +1.0000)" in table
    # a late bucket JSON could not hold (null: NaN, the training diverged) compares as n/a
    (c,) = bench_quality.compare_to_window([dict(old[0], buckets={"0-63": 3.0, "64-127": None}), old[1]], 32)
    assert c["bsbr_loss_past_chunk"] != c["bsbr_loss_past_chunk"] and c["bsbr_better"] is None
    # the model column is as wide as the longest name (bsbr_normalized_gated's row was shifted one column)
    long = [dict(r, model=m) for r, m in zip(old, ("bsbr_normalized_gated", "sliding_window"))]
    head, _, row, _ = bench_quality.format_table(dict(results=long, comparison=[])).splitlines()
    assert len(row) == len(head) and row.startswith("bsbr_normalized_gated ")
    wide = [dict(r, buckets={"4096-8191": 1.0, "8192-16383": 1.0, "16384-32767": 1.0}) for r in old]
    head, _, row, _ = bench_quality.format_table(dict(results=wide, comparison=[])).splitlines()
    assert head.split()[-3:] == ["4096-8191", "8192-16383", "16384-32767"] and len(row) == len(head)
    new = [dict(r, loss_past={"32": r["buckets"]["64-127"] + 0.5}) for r in old]
    (c,) = bench_quality.compare_to_window(new, 32)
    assert (c["positions_from"], c["bsbr_loss_past_chunk"], c["window_loss_past_chunk"]) == (32, 1.5, 2.5)


def test_quality_is_deterministic_for_a_seed(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(10):
        (corpus / f"m{i}.py").write_text(f"class C{i}:\n    x = {i * 7}\n" * 30)
    kw = dict(chunk_size=8, hidden=16, layers=1, heads=2, ff_dim=32, seq_len=40, batch=2, steps=3, eval_windows=2,
              seed=3, corpus=str(corpus), progress=False)
    a = bench_quality.run_quality(["bsbr_gated", "deltanet"], **kw)
    b = bench_quality.run_quality(["bsbr_gated", "deltanet"], **kw)
    for ra, rb in zip(a["results"], b["results"]):
        assert ra["buckets"] == rb["buckets"] and ra["final_train_loss"] == rb["final_train_loss"]
    other = bench_quality.run_quality(["bsbr_gated", "deltanet"], **{**kw, "seed": 4})  # the seed is used
    alone = bench_quality.run_quality(["deltanet"], **kw)  # a model's start is the seed's, whatever ran before it
    assert alone["results"][0]["buckets"] == a["results"][1]["buckets"]
    assert all(ra["final_train_loss"] != ro["final_train_loss"] for ra, ro in zip(a["results"], other["results"]))


def test_bench_models_records_a_failure_with_an_empty_message(monkeypatch):
    """A call that raises an exception without a message (a bare MemoryError) is recorded as a failed
    row; the benchmark goes on."""
    def no_memory(fn, *a, **k):
        raise MemoryError()

    monkeypatch.setattr(bench_models, "measure_peak", no_memory)
    result = bench_models.bench_models(seq_lens=[64], models=["standard"], hidden=32, heads=2, ff_dim=64, chunk_size=16,
                                       repeats=1, train=False)
    (row,) = result["rows"]
    assert row["status"] == "failed" and row["reason"] == "fwd: MemoryError: "


def test_merging_no_results_is_refused():
    from bsbr.errors import UserError

    with pytest.raises(UserError, match="at least one JSON file"):
        bench_quality.merge_results([])


def test_bench_models_targets_judged_only_for_their_shell():
    ratios = [{"model": "bsbr", "seq_len": n, "forward_speedup": s, "train_speedup": None}
              for n, s in ((4096, 1.5), (16384, 6.0))]
    default = dict(hidden=256, layers=2, heads=4, ff_dim=1024, chunk_size=128)
    assert [t["met"] for t in bench_models.check_targets(ratios, default)] == [True, True]
    for other in (dict(hidden=32), dict(layers=1), dict(heads=2), dict(ff_dim=64), dict(chunk_size=16)):
        unjudged = bench_models.check_targets(ratios, {**default, **other})
        assert unjudged[1]["measured"] == 6.0 and all(t["met"] is None for t in unjudged)
    table = bench_models.format_table(dict(rows=[], exponents={}, targets=bench_models.check_targets(
        ratios, {**default, "hidden": 32})))
    assert table.count("-> not judged (set for hidden 256, layers 2, heads 4, ff_dim 1024, chunk_size 128)") == 2
    assert "None" not in table


def test_bench_models_predicts_a_first_length_past_the_calibration_length():
    """--seq-lens 16384 alone ran standard attention far past --max-seconds: a first length past
    CALIBRATION_LEN is predicted from calls at that length, as bench attention does."""
    result = bench_models.bench_models(seq_lens=[4096], models=["standard"], hidden=32, heads=2, ff_dim=64, chunk_size=16,
                                       repeats=1, max_seconds=1e-9)
    (row,) = result["rows"]
    assert row["status"] == "skipped" and "forward predicted" in row["reason"] and row["time_ms"] is None


def test_bench_models_predicts_a_first_length_from_the_models_own_slope(monkeypatch):
    """One calibration point made the prediction quadratic for every model: a linear model's 16k forward,
    predicted 256x its 1k time, was skipped though it runs in 16x. Calls at half CALIBRATION_LEN and at all of
    it give the slope (here exactly linear: 1 and 2 ms, so 32 ms at 16k, within --max-seconds 0.2)."""
    times = iter([1.0, 2.0])
    monkeypatch.setattr(bench_models, "calibrate", lambda fn: dict(time_ms=next(times), peak_mb=0.0))
    result = bench_models.bench_models(seq_lens=[16384], models=["linear"], hidden=32, heads=2, ff_dim=32, chunk_size=64,
                                       layers=1, repeats=1, max_seconds=0.2, train=False)
    (row,) = result["rows"]
    assert row["status"] == "ok" and row["time_ms"] is not None, row["reason"]


def test_bench_models_warm_up_includes_a_train_step(monkeypatch):
    """The first model's first train step (its train_peak_mb) carried autograd's one-time allocations: the
    warm-up before any measurement runs a train step of each model too."""
    events = []
    real_train, real_peak = bench_models._train_fn, bench_models.measure_peak

    def train_fn(model, ids):
        fn = real_train(model, ids)
        return lambda: events.append("train") or fn()

    monkeypatch.setattr(bench_models, "_train_fn", train_fn)
    monkeypatch.setattr(bench_models, "measure_peak", lambda fn: events.append("peak") or real_peak(fn))
    bench_models.bench_models(seq_lens=[64], models=["standard", "linear"], hidden=32, heads=2, ff_dim=64, chunk_size=16,
                              repeats=1)
    assert events[:2] == ["train", "train"] and events.index("peak") == 2  # one untimed train step per model first


def test_bench_quality_leaves_out_pairs_whose_chunk_is_the_whole_window():
    """At --seq-len 128 the bsbr_chunk128 pair is two full-attention models (NaN comparison, printed 'BSBR NOT
    better, diff +nan'): it is left out; a NaN loss prints n/a."""
    results = [dict(model=m, buckets={"0-63": 3.0, "64-127": 2.0}, loss_past={"32": 2.0, "128": None})
               for m in ("bsbr_chunk32", "sliding_window_32", "bsbr_chunk128", "sliding_window_128")]
    comparison = bench_quality.compare_to_window(results, 64, 128)
    assert [c["chunk"] for c in comparison] == [32]
    (nan,) = [c for c in bench_quality.compare_to_window(results, 64) if c["chunk"] == 128]
    assert nan["bsbr_better"] is None
    line = bench_quality.format_table(dict(results=results, comparison=[nan])).splitlines()[-1]
    assert line == "bsbr_chunk128 vs sliding_window_128 on positions >= 128: n/a vs n/a (n/a, diff n/a)"


def test_bench_quality_records_the_machine(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(10):
        (corpus / f"m{i}.py").write_text(f"x{i} = {i}\n" * 40)
    result = bench_quality.run_quality(["bsbr"], chunk_size=8, hidden=16, layers=1, heads=2, ff_dim=16, seq_len=32, batch=1,
                                       steps=1, eval_windows=1, corpus=str(corpus), progress=False)
    import torch

    assert result["machine"]["torch_threads"] == torch.get_num_threads() and result["machine"]["cpu_count"]


def test_a_ctrl_c_inside_a_finalizer_stops_bench_quality_in_one_line(tmp_path, monkeypatch, capsys):
    # Python only prints an interrupt raised in a __del__ (regex's, 2 of 34 real Ctrl-Cs): the run trained every
    # step, then threw its result away, after a traceback
    import signal

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(10):
        (corpus / f"m{i}.py").write_text(f"def f{i}(x):\n    return x + {i}\n" * 40)
    drawn = []

    class Finalized:
        def __del__(self):
            # (the user's Ctrl-C, while a finalizer runs: raised in this thread, so taken inside __del__; os.kill may
            # hand it to another thread, and the main thread takes it wherever it is then)
            signal.raise_signal(signal.SIGINT)

    def windows(*args, **kwargs):
        drawn.append(1)
        if len(drawn) == 1:
            Finalized()  # (collected at once)
        return real(*args, **kwargs)

    real = bench_quality.windows
    monkeypatch.setattr(bench_quality, "windows", windows)
    out = tmp_path / "q.json"
    rc = main(["bench", "quality", "--corpus", str(corpus), "--models", "bsbr", "--steps", "200", "--batch", "1",
               "--seq-len", "32", "--hidden", "16", "--heads", "2", "--ff-dim", "16", "--chunk-size", "8",
               "--eval-windows", "1", "--json", str(out)])
    err = capsys.readouterr().err
    assert rc == 130 and len(drawn) <= 2 and not out.exists(), (rc, len(drawn), err[-2000:])
    assert err.strip() == "bsbr bench quality: interrupted", err


def test_bench_training_runs_whatever_the_callers_grad_mode(tmp_path):
    import torch

    from bsbr.models.shell import AttentionLM

    attention, kwargs = bench_models.model_specs(8)["bsbr"]
    model = AttentionLM(256, 16, 1, 2, attention=attention, ff_dim=32, **kwargs)
    with torch.no_grad():  # (bench models' train timing)
        bench_models._train_fn(model, torch.randint(0, 256, (1, 24)))()
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(10):
        (corpus / f"m{i}.py").write_text(f"def f{i}(x):\n    return x + {i}\n" * 40)
    with torch.no_grad():  # (bench quality under a notebook's torch.set_grad_enabled(False): an internal error)
        assert main(["bench", "quality", "--corpus", str(corpus), "--models", "bsbr", "--steps", "2", "--batch", "1",
                     "--seq-len", "32", "--hidden", "16", "--heads", "2", "--ff-dim", "16", "--chunk-size", "8",
                     "--eval-windows", "1"]) == 0


def test_bench_help_runs_without_docstrings():
    # python -OO strips the module docstrings its descriptions were cut from: bench attention/models/quality --help
    # ended in a traceback
    import subprocess
    import sys

    for name in ("attention", "models", "quality"):
        run = subprocess.run([sys.executable, "-OO", "-m", "bsbr.cli", "bench", name, "--help"], capture_output=True,
                             text=True, timeout=120)
        assert run.returncode == 0 and "usage: bsbr bench" in run.stdout, run.stderr[-1000:]


def test_the_quality_plot_gives_each_of_twelve_models_its_own_colour(tmp_path, monkeypatch):
    # matplotlib's default cycle repeats after 10 lines: models 1 and 11 were drawn alike
    from bsbr.bench import plots

    figures = []
    monkeypatch.setattr(plots, "save_figure", lambda fig, path, **kw: figures.append(fig))
    results = [dict(model=f"m{i}", buckets={"0-63": 2.0 + i, "64-127": 1.0 + i}) for i in range(12)]
    plots.plot_quality(dict(results=results, config=dict(steps=1, batch=1, seq_len=128, layers=1, hidden=16,
                                                         chunk_size=32)), str(tmp_path / "q.png"))
    colours = [line.get_color() for line in figures[0].axes[0].lines]
    assert len(colours) == 12 and len(set(map(str, colours))) == 12


def test_speed_ratios_and_the_targets_at_their_edges():
    from bsbr.bench.models import TARGET_SHAPE, check_targets, speed_ratios

    rows = [dict(model=m, seq_len=n, time_ms=t, train_time_ms=tt)
            for m, n, t, tt in (("standard", 4096, 40.0, 120.0), ("bsbr", 4096, 40.0, 60.0),
                                ("standard", 8192, 300.0, 900.0), ("bsbr", 8192, 100.0, 300.0))]
    ratios = speed_ratios(rows)
    assert [(r["seq_len"], r["forward_speedup"], r["train_speedup"]) for r in ratios] == [(4096, 1.0, 2.0),
                                                                                         (8192, 3.0, 3.0)]
    faster = check_targets(ratios, dict(TARGET_SHAPE))[0]
    assert faster["measured"] == {4096: 1.0, 8192: 3.0} and faster["met"] is False  # 1.0x at 4,096 is not faster


def test_a_models_time_budget_skips_its_next_train_step():
    from bsbr.bench.models import _skip

    assert _skip("train", 4096, [], [], spent=100.0, max_seconds=15.0, budget=90.0) == \
        "train: model's measuring time 100 s passed --model-budget 90 s"
    assert _skip("train", 4096, [], [], spent=90.0, max_seconds=15.0, budget=90.0) is None
