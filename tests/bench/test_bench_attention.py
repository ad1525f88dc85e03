"""Smoke tests of ``bsbr bench attention`` at tiny sizes: the functions run, the JSON rows carry the
expected keys with positive numbers, the PNG is written and the CLI parses. No timing assertions:
speed is what the benchmark measures, not what a test on a shared machine can check."""
import json
import zipfile

import pytest
import torch

from bsbr import memory
from bsbr.bench import attention as ba
from bsbr.bench import common, earlier, layers, plots, scaling
from bsbr.bench import core as bc
from bsbr.cli import build_parser, main
from bsbr.errors import UserError

TINY = dict(hidden=32, heads=2, chunk_size=32, repeats=1)

# A stand-in for the bsbr 0.1.1 wheel: only the layout matters to the loader (a zip holding
# bsbr/bsbr.py with a BSBRAttention(hidden_dim, num_heads, chunk_size, dropout, compression_factor)).
FAKE_EARLIER = '''
import torch
from torch import nn

class BSBRAttention(nn.Module):
    def __init__(self, hidden_dim, num_heads, chunk_size, dropout=0.1, compression_factor=None):
        super().__init__()
        self.proj = nn.Linear(hidden_dim, hidden_dim)

    def forward(self, hidden_states, attention_mask=None):
        n = hidden_states.shape[1]
        scores = torch.ones(n, n).tril()  # quadratic, like the 0.1.1 layer
        return self.proj(scores @ hidden_states / n)
'''


@pytest.fixture
def fake_wheel(tmp_path):
    path = tmp_path / "bsbr-0.1.1-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("bsbr/__init__.py", "from bsbr.bsbr import BSBRAttention\n")
        zf.writestr("bsbr/bsbr.py", FAKE_EARLIER)
        zf.writestr("bsbr-0.1.1.dist-info/METADATA", "Name: bsbr\nVersion: 0.1.1\n")
    yield str(path)
    import sys

    sys.modules.pop(earlier.EARLIER_MODULE_NAME, None)


def _check_rows(rows, models, seq_lens):
    assert {(r["model"], r["seq_len"]) for r in rows} == {(m, n) for m in models for n in seq_lens}
    for r in rows:
        assert {"model", "seq_len", "time_ms", "peak_mb", "status"} <= set(r)
        assert r["status"] == "ok", r
        assert r["time_ms"] > 0
        assert r["peak_mb"] is not None and r["peak_mb"] >= 0
        assert all(t > 0 for t in r["times_ms"])


@pytest.mark.slow
def test_bench_attention_tiny(tmp_path, fake_wheel):
    res = layers.bench_attention([64, 128], earlier_wheel=fake_wheel, **TINY)
    _check_rows(res["rows"], ["bsbr", "standard", "earlier"], [64, 128])
    assert {(r["baseline"], r["seq_len"]) for r in res["ratios"]} == {
        (m, n) for m in ("standard", "earlier") for n in (64, 128)}
    assert all(r["time_ratio"] > 0 for r in res["ratios"])
    assert len(res["targets"]) == 4 and all(t["met"] is None for t in res["targets"])  # lengths not run
    path = tmp_path / "a.png"
    plots.plot_rows(res["rows"], str(path), "tiny")
    assert path.stat().st_size > 0
    assert "bsbr ms" in ba.format_table(res["rows"])


def test_attention_targets_judged_only_at_their_shape():
    ratios = [{"baseline": "standard", "seq_len": 1024, "time_ratio": 1.3, "memory_ratio": 2.0}]
    default = dict(hidden=512, heads=8, chunk_size=128, retrieval="additive", retrieval_blocks=0)
    judged = layers.attention_targets(ratios, default)
    assert [t["met"] for t in judged] == [None, True, None, None]
    for other in (dict(hidden=256), dict(chunk_size=64), dict(retrieval_blocks=4)):
        unjudged = layers.attention_targets(ratios, {**default, **other})
        assert unjudged[1]["value"] == 1.3 and all(t["met"] is None for t in unjudged)


@pytest.mark.slow
def test_skips_are_recorded():
    res = layers.bench_attention([64, 128], max_standard_len=64, **TINY)
    std = {r["seq_len"]: r for r in res["rows"] if r["model"] == "standard"}
    assert std[64]["status"] == "ok"
    assert std[128]["status"] == "skipped" and "max-standard-len" in std[128]["reason"]
    assert std[128]["time_ms"] is None
    # a predicted time over the limit also skips, with the prediction in the reason
    res = layers.bench_attention([64, 128], max_seconds=1e-9, **TINY)
    std = {r["seq_len"]: r for r in res["rows"] if r["model"] == "standard"}
    assert std[128]["status"] == "skipped" and "predicted" in std[128]["reason"]
    # a first length past the calibration length is predicted from one call there (a lone --seq-lens
    # 1048576 ran for minutes, past Ctrl-C, inside one kernel call)
    res = layers.bench_attention([4096], max_seconds=1e-9, **TINY)
    std = [r for r in res["rows"] if r["model"] == "standard"]
    assert std[0]["status"] == "skipped" and f"from {layers.CALIBRATION_LEN} tokens" in std[0]["reason"]


def test_bench_core_and_flops(monkeypatch):
    core = bc.bench_core([64, 128], heads=2, head_dim=16, chunk_size=32, repeats=1, matmul_size=64)
    assert core["matmul_gflops_per_s"] > 0
    for r in core["rows"]:
        assert r["time_ms"] > 0 and r["gflop"] > 0 and r["gflops_per_s"] > 0 and r["fraction_of_matmul"] > 0
    # with blocks: the op timed and the FLOPs counted are those of that op
    import bsbr.ops.bsbr as ops

    seen, op = [], ops.chunk_bsbr_attention
    monkeypatch.setattr(ops, "chunk_bsbr_attention", lambda *a, **k: seen.append(a[5].retrieval_blocks) or op(*a, **k))
    row = bc.bench_core([256], heads=1, head_dim=16, chunk_size=32, repeats=1, matmul_size=64,
                        retrieval_blocks=2)["rows"][0]
    assert seen and set(seen) == {2}
    flops = bc.bsbr_core_flops(256, 32, 1, 16, retrieval_blocks=2)
    assert row["flops_by_term"] == {k: common.round_sig(v) for k, v in flops.items()}
    assert row["flops_by_term"]["block_attention"] > 0
    assert bc.bsbr_core_flops(100, 32, 1, 16)["chunk_states"] == 2 * 128 * 16 * 16  # (padded to whole chunks)
    f = bc.bsbr_core_flops(16384, 128, 8, 64)
    assert f["total"] == pytest.approx(sum(v for k, v in f.items() if k not in ("total", "standard_causal")))
    assert f["standard_causal"] / f["total"] > 20  # the cost model's point: far fewer FLOPs at 16k
    blocks = bc.bsbr_core_flops(16384, 128, 8, 64, retrieval_blocks=4)
    assert blocks["block_attention"] > 0 == f["block_attention"] and blocks["total"] > f["total"]
    # by hand, a multiply-add counting 2. 256 tokens, chunk 128 (C = 2), d = 64, one head, K = 1 covering the one
    # chunk before the second's window: the op is one causal attention (the model charged K blocks to every
    # token, and every earlier key's score, beside it: 2.6x the op's work at 1,024 tokens, K = 8)
    small = bc.bsbr_core_flops(256, 128, 1, 64, retrieval_blocks=1)
    assert small == dict(exact_window=2 * 256 * 256 * 64, chunk_states=2 * 256 * 64 * 64,
                         retrieval_weights=2 * 2 * 2 * 64, retrieved_states=0, read_out=0, block_scores=0,
                         block_attention=0, total=10_486_272, standard_causal=2 * 256 * 256 * 64)
    # 512 tokens (C = 4), K = 1: chunk c scores its c earlier chunks (B x cB q.k) and reads min(1, c) of them
    sparse = bc.bsbr_core_flops(512, 128, 1, 64, retrieval_blocks=1)
    assert sparse["exact_window"] == 2 * 512 * 128 * 64  # the causal half of each chunk's q.k and p.v
    assert sparse["block_scores"] == 2 * 128 * (0 + 1 + 2 + 3) * 128 * 64
    assert sparse["block_attention"] == 4 * 128 * (0 + 1 + 1 + 1) * 128 * 64
    assert sparse["read_out"] == 2 * 512 * 64 * 64 and sparse["retrieved_states"] == 2 * 4 * 4 * 64 * 64


def test_the_matmul_rate_is_the_median_of_its_repeats(monkeypatch):
    monkeypatch.setattr(bc, "interleaved_times", lambda fns, repeats, **kw: {"matmul": [1.0, 2.0, 3.0]})
    assert bc.matmul_gflops(64, 3, "cpu") == pytest.approx(2 * 64**3 / 2.0 / 1e9)


def test_the_cost_model_follows_the_ops_dense_path():
    # at 1,024 tokens, chunk 128, K = 8 the op makes one causal attention call and no block scores
    import bsbr.ops.bsbr.chunk as chunk

    calls = []
    scores = chunk.block_scores
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(chunk, "block_scores", lambda *a, **k: (calls.append(1), scores(*a, **k))[1])
        q, k, v = (torch.randn(1, 2, 1024, 16) for _ in range(3))
        chunk.chunk_bsbr_attention(q, k, v, q, k, chunk.BSBROptions(chunk_size=128, retrieval_blocks=8))
        assert not calls and bc.bsbr_core_flops(1024, 128, 2, 16, retrieval_blocks=8)["block_scores"] == 0
        chunk.chunk_bsbr_attention(q, k, v, q, k, chunk.BSBROptions(chunk_size=128, retrieval_blocks=4))
        assert calls and bc.bsbr_core_flops(1024, 128, 2, 16, retrieval_blocks=4)["block_scores"] > 0
    # the dense path attends over the input padded to whole chunks; an input shorter than a chunk runs as one
    # chunk of its own length (32 and 128 tokens at chunk 128 were charged alike)
    assert bc.bsbr_core_flops(1025, 128, 1, 16, retrieval_blocks=8)["exact_window"] == 2 * 1152 * 1152 * 16
    assert bc.bsbr_core_flops(32, 128, 1, 16) == bc.bsbr_core_flops(32, 32, 1, 16)


def test_model_scaling_tiny(monkeypatch):
    tiny = dict(hidden=32, heads=2, chunk_size=32, ff_dim=64, vocab_size=50)
    res = scaling.bench_model_scaling([128, 64], **tiny, repeats=3)  # (lengths in any order)
    _check_rows(res["rows"], ["bsbr_model"], [64, 128])
    assert all(r["process_peak_mb"] > 0 and len(r["times_ms"]) == 3 for r in res["rows"])
    t = {r["seq_len"]: r["time_ms"] for r in res["rows"]}  # the longest's time over the shortest's, beside 2
    assert res["ratios"] == {"time_ratio_longest_shortest": common.round_sig(t[128] / t[64]), "linear_would_be": 2.0}
    peak = {r["seq_len"]: r["process_peak_mb"] for r in res["rows"]}
    assert res["targets"][1]["value"] == peak[128]  # the process's peak at the longest length
    # measured, but not judged: the targets are set for other lengths and another model
    assert all(t["value"] is not None and t["met"] is None for t in res["targets"])
    # judged only for the target's own model: one with retrieved blocks is another model
    monkeypatch.setattr(scaling, "TARGET_MODEL_SHAPE", dict(scaling.TARGET_MODEL_SHAPE, shortest=64, longest=128,
                                                            **tiny))
    judged = scaling.bench_model_scaling([64, 128], **tiny, repeats=1)
    assert all(t["met"] is not None for t in judged["targets"])
    blocks = scaling.bench_model_scaling([64, 128], **tiny, repeats=1, retrieval_blocks=2)
    assert all(t["met"] is None for t in blocks["targets"])


@pytest.mark.slow
def test_cli_runs_and_writes(tmp_path, fake_wheel, capsys):
    out, png = tmp_path / "a.json", tmp_path / "a.png"
    rc = main(["bench", "attention", "--seq-lens", "64", "128", "--hidden", "32", "--heads", "2",
               "--chunk-size", "32", "--repeats", "1", "--earlier-wheel", fake_wheel, "--seed", "7",
               "--json", str(out), "--plot", str(png)])
    assert rc == 0
    data = json.loads(out.read_text())
    _check_rows(data["rows"], ["bsbr", "standard", "earlier"], [64, 128])
    assert data["core"]["rows"] and data["machine"]["memory_method"] and data["config"]["seed"] == 7
    assert png.stat().st_size > 0
    printed = capsys.readouterr().out
    assert "standard/bsbr" in printed and f"wrote {out}\nwrote {png}\n" in printed

    out2, png2 = tmp_path / "m.json", tmp_path / "m.png"
    rc = main(["bench", "attention", "--model-scaling", "--seq-lens", "64", "128", "--hidden", "32",
               "--heads", "2", "--chunk-size", "32", "--ff-dim", "64", "--vocab", "50", "--repeats", "1",
               "--seed", "7", "--json", str(out2), "--plot", str(png2)])
    data = json.loads(out2.read_text())
    assert rc == 0 and data["benchmark"] == "model_scaling" and png2.exists() and data["config"]["seed"] == 7


def test_cli_parses_and_rejects_bad_arguments(capsys):
    args = build_parser().parse_args(["bench", "attention", "--seq-lens", "1024", "2048", "--retrieval-blocks", "4",
                                      "--retrieval", "normalized", "--max-standard-len", "8192"])
    assert args.func.args == ("bsbr.bench.attention", "run_attention")  # imported when it runs
    assert args.seq_lens == [1024, 2048] and args.retrieval_blocks == 4 and args.retrieval == "normalized"
    assert args.chunk_size == 128 and args.hidden is None  # mode-dependent default, filled in later
    with pytest.raises(ValueError):
        ba.run_attention(build_parser().parse_args(["bench", "attention", "--hidden", "30", "--heads", "4"]))
    for bad in (["--seq-lens", "0"], ["--repeats", "0"], ["--repeats", "1001"], ["--retrieval-blocks", "-1"],
                ["--threads", str(2 ** 63)]):
        assert main(["bench", "attention", *bad]) == 2  # refused while parsing: one line naming the flag
        assert f"argument {bad[0]}: must be an integer from" in capsys.readouterr().err
    with pytest.raises(UserError):
        ba.run_attention(build_parser().parse_args(["bench", "attention", "--earlier-wheel", "/nonexistent.whl"]))
    assert main(["bench", "attention", "--max-seconds", "0"]) == 2  # refused while parsing
    assert "argument --max-seconds: '0': give a number > 0" in capsys.readouterr().err


def test_loader_rejects_a_non_wheel(tmp_path):
    bad = tmp_path / "x.whl"
    bad.write_text("not a zip")
    with pytest.raises(ValueError):
        earlier.load_earlier_bsbr(str(bad))


def test_measure_peak_sees_torch_allocations():
    mem = memory.measure_peak(lambda: torch.ones(64 * 2**20 // 4))  # 64 MiB, returned so it counts
    if mem.extra_bytes is None:
        pytest.skip("no way to read RSS here")
    assert mem.extra_mb > 32  # tracemalloc would report ~0 for a torch tensor
    times = common.interleaved_times({"a": lambda: 1, "b": lambda: 2}, repeats=3, warmup=0)
    assert [len(v) for v in times.values()] == [3, 3]


def test_proc_fields_are_read_in_kib(tmp_path):
    # (/proc's "kB" are 1,024 bytes: read as 1,000, a 64 MiB peak measured 62.5)
    status = tmp_path / "status"
    status.write_text("Name:\tpython\nVmHWM:\t    2048 kB\nVmRSS:\t  1024 kB\n")
    assert memory._proc_bytes(str(status), "VmHWM") == 2 * 2**20
    assert memory._proc_bytes(str(status), "VmRSS") == 2**20 and memory._proc_bytes(str(status), "VmPeak") is None


def test_measure_peak_falls_back_to_sampling_where_the_peak_cannot_be_reset(monkeypatch):
    """Where /proc/self/clear_refs cannot be written (containers, other kernels) RSS is sampled instead."""
    monkeypatch.setattr(memory, "_reset_hwm", lambda: False)
    mem = memory.measure_peak(lambda: torch.ones(64 * 2**20 // 4))
    if mem.extra_bytes is None:
        pytest.skip("no way to read RSS here")
    assert mem.method == "statm-sampling-1ms" and mem.extra_mb > 32


def test_cuda_helpers_act_on_the_benchmarked_device(monkeypatch):
    """--device cuda:1: the clock's synchronisation, the peak counters and the GPU's name are cuda:1's, not
    the current device's (cuda:0 unless set). No GPU needed: torch.cuda is mocked and its calls recorded."""
    calls = []

    def record(name, ret=None):
        def f(*a, **k):
            calls.append((name, a, k))
            return ret
        return f

    for name, ret in (("synchronize", None), ("empty_cache", None), ("reset_peak_memory_stats", None),
                      ("memory_allocated", 0), ("max_memory_allocated", 0), ("get_device_name", "gpu")):
        monkeypatch.setattr(torch.cuda, name, record(name, ret))
    common.time_call(lambda: None, device="cuda:1")
    memory.measure_peak(lambda: None, device="cuda:1")
    assert common.machine_info("cuda:1")["gpu"] == "gpu"
    device_calls = [c for c in calls if c[0] != "empty_cache"]  # (it empties every device's cache)
    assert len(device_calls) == 8 and all(a == ("cuda:1",) or k.get("device") == "cuda:1" for _, a, k in device_calls)


def test_model_scaling_targets_judged_only_at_their_lengths_and_shape(capsys):
    """A 2x longer input 5x slower would be 'MET' by t(hi)/t(lo) <= 10: the targets are set for the 2-layer
    hidden-256 model from 8,192 to 65,536 tokens, elsewhere reported but not judged."""
    rc = ba.run_attention(build_parser().parse_args([
        "bench", "attention", "--model-scaling", "--seq-lens", "64", "128", "--hidden", "32", "--heads", "2",
        "--chunk-size", "32", "--ff-dim", "64", "--vocab", "50", "--repeats", "1"]))
    out = capsys.readouterr().out
    assert rc == 0 and "MET" not in out and out.count("not judged (set for shortest 8192, longest 65536, hidden 256") == 2


def test_first_call_of_each_layer_is_untimed_even_with_warmup_0(monkeypatch, tmp_path):
    """--warmup 0: the process's one-time allocations were charged to the memory of the model measured first
    (BSBR); each model's first length still gets one untimed call before its memory is measured."""
    events = []
    real_peak = layers.measure_peak

    def warm(fn, device="cpu"):
        events.append("warm")
        return fn()

    monkeypatch.setattr(layers, "time_call", warm)  # (the timed rounds call common.time_call)
    monkeypatch.setattr(layers, "measure_peak", lambda fn, device="cpu": events.append("peak") or real_peak(fn, device))
    layers.bench_attention([64, 128], warmup=0, **TINY)
    assert events == ["warm", "peak", "warm", "peak", "peak", "peak"]  # at 128: no warm-up, as asked
    events.clear()  # the same from the command line, which records the 0
    out = tmp_path / "r.json"
    assert main(["bench", "attention", "--seq-lens", "64", "128", "--hidden", "32", "--heads", "2", "--chunk-size",
                 "32", "--repeats", "1", "--warmup", "0", "--skip-core", "--json",
                 str(out)]) == 0
    assert events == ["warm", "peak", "warm", "peak", "peak", "peak"]
    assert json.loads(out.read_text())["config"]["warmup"] == 0


def test_core_uses_the_warmup_it_is_given(monkeypatch):
    seen = []
    real = bc.interleaved_times
    monkeypatch.setattr(bc, "interleaved_times", lambda fns, repeats, warmup=1, device="cpu":
                        seen.append(warmup) or real(fns, repeats, warmup, device))
    core = bc.bench_core([64], heads=2, head_dim=16, chunk_size=32, repeats=1, warmup=3, matmul_size=64)
    assert seen == [3, 3, 3] and core["warmup"] == 3  # matmul before, the op, matmul after; recorded
    got = {}
    monkeypatch.setattr(ba, "bench_core", lambda *a, **k: got.update(k) or dict(
        matmul_gflops_per_s=1.0, matmul_size=64, rows=[]))
    assert main(["bench", "attention", "--seq-lens", "64", "--hidden", "32", "--heads", "2", "--chunk-size", "32",
                 "--repeats", "1", "--warmup", "2"]) == 0
    assert got["warmup"] == 2  # --warmup reaches the core measurement too


def test_no_calibration_call_past_a_baselines_length_cap(monkeypatch):
    """--max-standard-len 512 --seq-lens 2048: standard attention skips 2048 by its cap, so it is not run at the
    calibration length either."""
    calibrated = []
    monkeypatch.setattr(layers, "_calibration", lambda model, hidden, device: calibrated.append(model))
    res = layers.bench_attention([2048], max_standard_len=512, **TINY)
    std = [r for r in res["rows"] if r["model"] == "standard"]
    assert calibrated == [] and std[0]["status"] == "skipped" and "max-standard-len" in std[0]["reason"]


def test_nothing_to_time_at_a_length_is_no_error():
    # every model failed or was skipped at a length: a ZeroDivisionError, logged as a failed side-by-side timing
    from bsbr.bench.common import interleaved_times

    assert interleaved_times({}, repeats=3) == {}


@pytest.mark.parametrize("args", [["attention", "--hidden", "40000"],
                                  ["attention", "--model-scaling", "--ff-dim", "40000"],
                                  ["attention", "--model-scaling", "--layers", "5000"], ["models", "--hidden", "40000"],
                                  ["models", "--layers", "5000"], ["quality", "--hidden", "40000"],
                                  ["quality", "--heads", "40000"]])
def test_model_sizes_past_what_fits_are_refused_at_parse_time(args, capsys):
    # --hidden 40000 was read as a token count (up to 1M): 6.7 GB and 14 s, then "give shorter or fewer inputs"
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["bench", *args])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"{args[-2]}: must be an integer from 1 to" in err and args[-1] in err, err



def test_the_benchmark_functions_give_the_callers_random_stream_back(tmp_path):
    # each seeded torch's global generator (or drew from it) for its weights and inputs: a program's next draws
    # after a benchmark were the same whatever its own seed
    from bsbr.bench import models as bm
    from bsbr.bench import quality as bq
    from bsbr.bench.converted import gpt2_small_random

    for i in range(10):
        (tmp_path / f"m{i}.py").write_text(f"x{i} = {i}\n" * 40)
    calls = {"bench_attention": lambda: layers.bench_attention([64], **TINY),
             "bench_core": lambda: bc.bench_core([64], heads=2, head_dim=16, chunk_size=32, repeats=1, matmul_size=64),
             "bench_model_scaling": lambda: scaling.bench_model_scaling([64], hidden=32, heads=2, chunk_size=32,
                                                                        ff_dim=64, vocab_size=50, repeats=1),
             "bench_models": lambda: bm.bench_models(seq_lens=[64], models=["standard"], hidden=32, heads=2, ff_dim=64,
                                                     chunk_size=16, repeats=1, train=False),
             "run_quality": lambda: bq.run_quality(["bsbr"], chunk_size=8, hidden=16, layers=1, heads=2, ff_dim=16,
                                                   seq_len=32, batch=1, steps=1, eval_windows=1, corpus=str(tmp_path),
                                                   progress=False),
             "gpt2_small_random": lambda: gpt2_small_random(64)}
    for name, call in calls.items():
        torch.manual_seed(11)
        state = torch.random.get_rng_state()
        call()
        assert torch.equal(torch.random.get_rng_state(), state), name


def test_the_attention_targets_are_judged_at_their_goals_and_ratios_favour_bsbr_above_1():
    rows = [{"model": m, "seq_len": n, "status": "ok", "time_ms": t, "peak_mb": p}
            for m, n, t, p in (("earlier", 4096, 100.0, 200.0), ("bsbr", 4096, 4.0, 10.0))]
    assert layers.attention_ratios(rows) == [{"baseline": "earlier", "seq_len": 4096, "time_ratio": 25.0,
                                              "memory_ratio": 20.0}]
    for peak in (0.0, None):  # BSBR's extra peak measured as 0 (short lengths) or unknown: no memory ratio
        rows[1]["peak_mb"] = peak
        assert layers.attention_ratios(rows) == [{"baseline": "earlier", "seq_len": 4096, "time_ratio": 25.0,
                                                  "memory_ratio": None}]
    rows[1]["peak_mb"] = 10.0
    config = dict(layers.TARGET_SHAPE)
    for baseline, n, key, goal in (("standard", 16384, "time_ratio", 5.0), ("standard", 1024, "time_ratio", 1.0),
                                   ("earlier", 4096, "time_ratio", 20.0), ("earlier", 4096, "memory_ratio", 10.0)):
        met = []
        for value in (goal * 0.99, goal):
            ratios = [{"baseline": baseline, "seq_len": n, "time_ratio": value, "memory_ratio": value}]
            (target,) = [t for t in layers.attention_targets(ratios, config) if t["value"] is not None and
                         t["target"].startswith(f"{baseline}/bsbr {'time' if key == 'time_ratio' else 'extra memory'}"
                                                f" at {n} ")]
            met.append(target["met"])
        assert met == [False, True] and target["goal"] == goal, target


def test_interleaved_times_warm_each_callable_then_rotate_who_runs_first(monkeypatch):
    calls = []
    monkeypatch.setattr(common, "time_call", lambda fn, device: calls.append(fn()) or 1.0)
    times = common.interleaved_times({n: (lambda n=n: n) for n in "abc"}, repeats=4, warmup=2)
    assert "".join(calls) == "aabbcc" + "abc" + "bca" + "cab" + "abc"  # warm-up untimed, then each first in turn
    assert times == {n: [1.0] * 4 for n in "abc"}


def test_round_sig_keeps_significant_digits():
    assert [common.round_sig(x) for x in (123456.0, 0.00123456, -9.87654, 1.0)] == [123500.0, 0.001235, -9.877, 1.0]
    assert common.round_sig(0.123456, 2) == 0.12 and common.round_sig(None) is None and common.round_sig(0) == 0


def test_nothing_measured_is_a_fault_unless_every_failure_was_out_of_memory():
    # an error other than running out of memory is a bug (exit 1), not a length to shorten (exit 2)
    fault = common.failure(ValueError("shapes do not match\nmore"))
    oom = common.failure(RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 10 GB"))
    assert (fault["oom"], oom["oom"]) == (False, True) and fault["reason"] == "ValueError: shapes do not match"
    row = lambda m, f: dict(common.new_row(m, 64), **f)  # noqa: E731
    with pytest.raises(RuntimeError, match=r"nothing was measured.*\(b @ 64: ValueError: shapes do not match\)"):
        common.check_measured([row("a", oom), row("b", fault)])
    with pytest.raises(UserError, match="give shorter --seq-lens"):
        common.check_measured([row("a", oom), row("b", oom)])


def test_a_baseline_is_skipped_by_its_quadratic_time_and_linear_memory_predictions(monkeypatch):
    monkeypatch.setattr(layers, "memory_refusal", lambda need: f"needs {need / 2 ** 20:.0f} MiB" if need else None)
    kw = dict(max_len=None, heads=8, chunk_size=128)
    slow = {"seq_len": 1024, "time_ms": 2000.0, "peak_mb": 0}  # 2 s at 1k: 32 s at 4k
    assert layers._skip_reason("standard", 4096, slow, max_seconds=30, device="cpu", **kw).startswith(
        "predicted 32 s per call (quadratic from 1024 tokens) > --max-seconds 30")
    assert layers._skip_reason("standard", 4096, slow, max_seconds=33, device="cpu", **kw) is None
    big = {"seq_len": 1024, "time_ms": 1.0, "peak_mb": 1000.0}  # its extra memory scaled as its time
    assert layers._skip_reason("standard", 4096, big, max_seconds=30, device="cpu", **kw) == "needs 16000 MiB"
    # the host's memory is not what a GPU run needs
    assert layers._skip_reason("standard", 4096, big, max_seconds=30, device="cuda", **kw) is None


def test_a_baseline_that_fails_its_timing_is_recorded_as_failed(monkeypatch):
    real = layers.interleaved_times

    def flaky(fns, repeats, warmup=1, device="cpu"):
        if "standard" in fns:
            raise RuntimeError("simulated failure")
        return real(fns, repeats, warmup, device)

    monkeypatch.setattr(layers, "interleaved_times", flaky)
    rows = {r["model"]: r for r in layers.bench_attention([64], **TINY)["rows"]}
    assert rows["standard"]["status"] == "failed" and "simulated failure" in rows["standard"]["reason"]
    assert rows["bsbr"]["status"] == "ok" and rows["bsbr"]["time_ms"] > 0


def test_the_matmul_ceiling_is_the_median_of_before_and_after_in_flops(monkeypatch):
    monkeypatch.setattr(bc, "interleaved_times", lambda fns, repeats, warmup=1, device="cpu": {"matmul": [0.5]})
    assert bc.matmul_gflops(1000, 1, "cpu") == 4.0  # 2 n^3 FLOPs in 0.5 s
    monkeypatch.undo()
    rates = iter([10.0, 30.0])
    monkeypatch.setattr(bc, "matmul_gflops", lambda *a, **k: next(rates))
    core = bc.bench_core([64], heads=2, head_dim=16, chunk_size=32, repeats=1, matmul_size=64)
    assert core["matmul_gflops_per_s"] == 20.0


def test_nothing_measured_means_no_row_at_all_was(monkeypatch):
    ok, skipped = common.new_row("bsbr", 64), dict(common.new_row("standard", 64), status="skipped", reason="cap")
    common.check_measured([ok, skipped])  # one model measured: a result
    with pytest.raises(UserError):
        common.check_measured([skipped])


def test_bench_attention_takes_retrieval_blocks_0_its_default():
    args = build_parser().parse_args(["bench", "attention", "--retrieval-blocks", "0"])
    assert args.retrieval_blocks == 0 == build_parser().parse_args(["bench", "attention"]).retrieval_blocks


def test_calibration_warms_up_before_its_timed_call_and_the_core_runs_the_normalized_form():
    calls = []
    row = layers.calibrate(lambda: calls.append(1))
    assert len(calls) == 3 and row["seq_len"] == layers.CALIBRATION_LEN  # warm-up, timed call, memory
    core = bc.bench_core([64], heads=2, head_dim=16, chunk_size=32, repeats=1, matmul_size=64, retrieval="normalized")
    assert core["rows"][0]["time_ms"] > 0


def test_a_wheel_without_the_earlier_layer_is_refused_every_time(tmp_path):
    # the failed import stayed in sys.modules, so a second load returned the broken module
    import zipfile

    wheel = tmp_path / "bsbr-0.1.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("bsbr/bsbr.py", "x = 1\n")
    for _ in range(2):
        with pytest.raises(ValueError, match="bsbr/bsbr.py defines no BSBRAttention"):
            earlier.load_earlier_bsbr(str(wheel))
    assert earlier.EARLIER_MODULE_NAME not in __import__("sys").modules
