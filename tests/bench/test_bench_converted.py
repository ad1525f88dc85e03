"""``bsbr bench converted`` on a tiny llama and its conversion: the table's fields, and the cache's
bytes per context token (exact blocks keep every key and value; the window alone does not)."""
import pytest
import torch

from model_sources import make_source

from bsbr.bench.converted import bench_converted, cache_bytes, speed_lines
from bsbr.convert import convert_to_bsbr


def test_bench_converted_reports_speed_and_cache_bytes():
    source = make_source("llama")
    blocks = convert_to_bsbr(source, chunk_size=8, local_chunks=2, sink_tokens=2, retrieval_blocks=2).eval()
    window = convert_to_bsbr(source, chunk_size=8, local_chunks=2, sink_tokens=2, retrieval_blocks=0).eval()
    res = bench_converted(source, blocks, seq_lens=[48], repeats=1, decode_contexts=[40, 120], decode_steps=2)
    (row,) = res["prefill"]
    assert row["source_ms"] > 0 and row["bsbr_ms"] > 0 and row["speedup"] == row["source_ms"] / row["bsbr_ms"]
    short, long = res["decode"]
    for r in (short, long):
        assert r["source_ms_per_token"] > 0 and r["bsbr_ms_per_token"] > 0
    # the source keeps k and v of every token; exact blocks keep them too (plus states and bounds)
    assert long["bsbr_cache_bytes_per_token"] > long["source_cache_bytes_per_token"] * 0.9
    only_window = bench_converted(source, window, seq_lens=[], decode_contexts=[120], decode_steps=1)["decode"][0]
    assert only_window["bsbr_cache_bytes_per_token"] < long["bsbr_cache_bytes_per_token"]
    lines = speed_lines(res)
    assert len(lines) == 1 + 1 + 1 + 2 and lines[0] == f"side by side on {torch.get_num_threads()} torch thread(s)"


def test_cache_bytes_counts_each_storage_once():
    t = torch.zeros(10)
    assert cache_bytes({"a": t, "b": [t, t[2:]], "c": (torch.zeros(3, dtype=torch.float64),)}) == 40 + 24


def test_decode_prefill_keeps_only_the_last_logits():
    """A long prefill's full logits (6.4 GB per SmolLM2 model at 32k) would be held through the decode."""
    from bsbr.bench.converted import _decode

    source = make_source("llama")
    blocks = convert_to_bsbr(source, chunk_size=8, local_chunks=2, sink_tokens=2, retrieval_blocks=2).eval()
    lengths = []
    for m in (source, blocks):
        m.register_forward_hook(lambda mod, args, out: lengths.append(out.logits.shape[1]))
    import torch

    _decode({"source": source, "bsbr": blocks}, torch.randint(0, 50, (1, 40)), steps=2)
    assert lengths and set(lengths) == {1}


@pytest.mark.parametrize("flag, value", [("--seq-lens", "0"), ("--decode-contexts", "-5"), ("--decode-steps", "0"),
                                         ("--repeats", "0"), ("--threads", "0"), ("--seq-lens", str(2 ** 63)),
                                         ("--decode-contexts", str(2 ** 63)), ("--decode-steps", str(2 ** 63)),
                                         ("--repeats", str(2 ** 63)), ("--threads", str(2 ** 63))])
def test_bench_converted_refuses_bad_sizes_before_loading(flag, value, capsys, monkeypatch):
    import bsbr.convert.converter as converter
    from bsbr.cli import main

    def no_loading(*a, **k):
        raise AssertionError("the source was loaded before the options were checked")

    monkeypatch.setattr(converter, "load_source", no_loading)
    assert main(["bench", "converted", flag, value]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"argument {flag}: must be an integer from 1 to" in err and err.endswith(
        f"got {value} (see 'bsbr bench converted --help')")
