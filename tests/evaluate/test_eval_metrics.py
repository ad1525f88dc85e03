import math

import pytest
import torch

from bsbr.evaluate.metrics import MetricAccumulator, gap_closed, kl_divergence, position_buckets, reference_rank

B, N, V, D = 4, 14, 11, 6


def test_position_buckets():
    assert position_buckets(14, 4) == [(4, 8), (8, 12), (12, 13)]
    assert position_buckets(2048, 256, "doubling") == [(256, 512), (512, 1024), (1024, 2047)]
    with pytest.raises(ValueError, match="seq_len"):
        position_buckets(5, 4)
    with pytest.raises(ValueError, match="scheme"):
        position_buckets(20, 4, "log")


def test_gap_closed():
    assert gap_closed(20.0, 20.0, 10.0) == 0.0
    assert gap_closed(20.0, 10.0, 10.0) == 1.0
    assert gap_closed(20.0, 15.0, 10.0) == 0.5
    assert gap_closed(20.0, 30.0, 10.0) == -1.0
    assert gap_closed(10.0, 10.0, 10.0) is None  # nothing to close
    assert gap_closed(float("nan"), 1.0, 1.0) is None
    # bounds in the wrong order or equal up to rounding: no gap (the ratio called a model worse than both 109%)
    assert gap_closed(229.19, 290.98, 285.93) is None
    assert gap_closed(10.0000002, 10.5, 10.0) is None
    # the tolerance is relative to the full model's perplexity: at perplexity 5,000 a gap of 0.1 is rounding,
    # at perplexity 5 a gap of 0.01 is not
    assert gap_closed(5000.1, 5000.05, 5000.0) is None
    assert gap_closed(5.01, 5.005, 5.0) == pytest.approx(0.5)
    # numpy floats and 0-d tensors are numbers (they gave None, "no gap"); a bool is not
    import numpy as np

    assert gap_closed(np.float32(20.0), 15.0, 10.0) == gap_closed(torch.tensor(20.0), 15.0, 10.0) == 0.5
    assert gap_closed(True, 0.5, 0.0) is None
    for bad in (-1, float("nan"), "a"):  # (a ZeroDivisionError, or a bare TypeError)
        with pytest.raises(ValueError, match="rel_eps"):
            gap_closed(6, 8, 6, rel_eps=bad)


def test_rank_and_kl_by_hand():
    ref = torch.tensor([[0.0, 3.0, 1.0, 2.0]])          # argmax 1
    cand = torch.tensor([[5.0, 1.0, 4.0, 0.0]])         # token 1 is 3rd largest: rank 2
    assert reference_rank(cand, ref).tolist() == [2]
    p = torch.tensor([[0.5, 0.5]]).log()
    q = torch.tensor([[0.25, 0.75]]).log()
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert kl_divergence(p, q).item() == pytest.approx(expected)
    assert kl_divergence(p, p).item() == 0.0
    # a model equal to the source, its logits rounded otherwise: per position the KL's rounding sums to about
    # -2e-7 now and then, which a report printed as a negative KL; the mean is reported as 0 (not each position
    # clamped, which would bias every KL upward)
    x = torch.randn(2, 64, 500, generator=torch.Generator().manual_seed(1)) * 5
    near = x * (1 + 1e-7)
    assert kl_divergence(torch.log_softmax(x, -1), torch.log_softmax(near, -1)).mean() < 0
    acc = MetricAccumulator(64, 16, models=("bsbr", "source", "local"))
    acc.update(torch.randint(0, 500, (2, 64)), {"source": x, "bsbr": near, "local": x + torch.randn_like(x)})
    assert acc.result()["kl"]["bsbr"] == 0.0


def _window(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, V, (1, N), generator=g), torch.randn(1, N, V, generator=g) * 2,
            torch.randn(1, N, D, generator=g))


def test_identical_models():
    ids, logits, h = _window()
    acc = MetricAccumulator(N, B)
    acc.update(ids, {m: logits for m in ("bsbr", "source", "local")}, {m: h for m in ("bsbr", "source", "local")})
    r = acc.result()
    assert r["tokens"] == N - 1 - B  # positions B .. N-2
    assert r["perplexity"]["bsbr"] == r["perplexity"]["source"] == r["perplexity"]["local"]
    assert r["gap_closed"] is None
    assert r["agreement"]["bsbr"] == {"top1": 1.0, "top5": 1.0, "top10": 1.0}
    assert r["kl"]["bsbr"] == 0.0 and r["kl"]["local"] == 0.0
    assert r["hidden_cosine"]["bsbr"] == pytest.approx(1.0) and r["hidden_mse"]["bsbr"] == 0.0
    assert [b["tokens"] for b in r["buckets"]] == [4, 4, 1]


def test_known_perplexity_and_gap():
    ids, _, h = _window()
    uniform = torch.zeros(1, N, V)                                    # ppl = V exactly
    # the source puts probability 1/2 on every target: ppl 2
    src = torch.full((1, N, V), 0.0)
    src[0, torch.arange(N - 1), ids[0, 1:]] = math.log(V - 1)        # e^a / (e^a + V - 1) = 1/2
    acc = MetricAccumulator(N, B)
    acc.update(ids, {"bsbr": uniform, "source": src, "local": uniform}, {"bsbr": h, "source": h, "local": h})
    r = acc.result()
    assert r["perplexity"]["source"] == pytest.approx(2.0)
    assert r["perplexity"]["bsbr"] == pytest.approx(V) == r["perplexity"]["local"]
    assert r["gap_closed"] == 0.0                                     # equal to the local baseline
    # uniform logits: every token ties, so the source's argmax is "within" the top-1 (ties favour the candidate)
    assert r["agreement"]["local"]["top1"] == 1.0
    acc2 = MetricAccumulator(N, B)
    acc2.update(ids, {"bsbr": src, "source": src, "local": uniform})
    r2 = acc2.result()
    assert r2["gap_closed"] == pytest.approx(1.0) and "hidden_cosine" not in r2
    # KL(source || uniform) = sum p log(p V) with p = (1/2, 1/(2(V-1)), ...)
    expected = 0.5 * math.log(0.5 * V) + 0.5 * math.log(V / (2 * (V - 1)))
    assert r2["kl"]["local"] == pytest.approx(expected, rel=1e-5)


def test_first_chunk_is_not_scored():
    ids, logits, h = _window()
    bad = logits.clone()
    bad[:, :B] = torch.randn(1, B, V) * 10  # differences only inside the first chunk
    acc = MetricAccumulator(N, B)
    acc.update(ids, {"bsbr": bad, "source": logits, "local": logits})
    r = acc.result()
    assert r["kl"]["bsbr"] == 0.0 and r["agreement"]["bsbr"]["top1"] == 1.0


def test_topk_agreement_counts():
    ids = torch.zeros(1, N, dtype=torch.long)
    src = torch.zeros(1, N, V)
    src[..., 0] = 1.0                                                  # source argmax: token 0
    cand = torch.arange(V, dtype=torch.float).expand(1, N, V).clone()  # token 0 has rank V-1 = 10
    acc = MetricAccumulator(N, B, ks=(1, 5, 10, 11))
    acc.update(ids, {"bsbr": cand, "source": src, "local": src})
    ag = acc.result()["agreement"]["bsbr"]
    assert ag == {"top1": 0.0, "top5": 0.0, "top10": 0.0, "top11": 1.0}


def test_sums_over_windows_equal_one_batch():
    w1, w2 = _window(1), _window(2)
    a, b = MetricAccumulator(N, B), MetricAccumulator(N, B)
    for ids, lg, h in (w1, w2):
        a.update(ids, {"bsbr": lg, "source": lg * 0.5, "local": lg * 0.1}, {"bsbr": h, "source": h + 1, "local": h})
    ids = torch.cat([w1[0], w2[0]]); lg = torch.cat([w1[1], w2[1]]); h = torch.cat([w1[2], w2[2]])
    b.update(ids, {"bsbr": lg, "source": lg * 0.5, "local": lg * 0.1}, {"bsbr": h, "source": h + 1, "local": h})
    ra, rb = a.result(), b.result()
    assert ra["windows"] == rb["windows"] == 2
    for key in ("perplexity", "kl", "hidden_mse"):
        for m in ra[key]:
            assert ra[key][m] == pytest.approx(rb[key][m])
    assert ra["hidden_mse"]["bsbr"] == pytest.approx(1.0)  # every coordinate 1 from the source's


def test_hidden_state_cosine_and_mse_by_hand():
    ids, logits, _ = _window()
    ones = torch.ones(1, N, D)
    half = torch.zeros(1, N, D)
    half[..., : D // 2] = 1.0  # half the coordinates of the source's: cos = 1/sqrt(2), mse = 1/2
    acc = MetricAccumulator(N, B)
    acc.update(ids, {m: logits for m in ("bsbr", "source", "local")}, {"bsbr": half, "source": ones, "local": ones})
    r = acc.result()
    assert r["hidden_cosine"]["bsbr"] == pytest.approx(1 / math.sqrt(2)) and r["hidden_cosine"]["local"] == pytest.approx(1)
    assert r["hidden_mse"]["bsbr"] == pytest.approx(0.5) and r["hidden_mse"]["local"] == 0


def test_bad_inputs():
    ids, logits, _ = _window()
    acc = MetricAccumulator(N, B)
    with pytest.raises(ValueError, match="logits missing"):
        acc.update(ids, {"bsbr": logits, "source": logits})
    block = {m: logits[:, :4] for m in ("bsbr", "source", "local")}
    with pytest.raises(ValueError, match=f"positions {N - 3} .. {N} lie outside the window of {N}"):
        acc.update(ids, block, start=N - 3)  # a block running one past the window's end
    acc.update(ids, block, start=N - 4)  # (its last four positions)
    with pytest.raises(ValueError, match="targets"):
        acc.update(ids[:, :5], {m: logits for m in ("bsbr", "source", "local")})
    with pytest.raises(ValueError, match="source"):
        MetricAccumulator(N, B, models=("bsbr", "local"))
    with pytest.raises(ValueError, match="models must be distinct names"):  # (its NLL was summed twice)
        MetricAccumulator(N, B, models=("bsbr", "source", "bsbr"))
    for ks in ([0], [1, 0], [], [True], [2.0]):  # a top-0 agreement is no agreement (k = 0 was let through)
        with pytest.raises(ValueError, match="ks must be positive ints"):
            MetricAccumulator(N, B, ks=ks)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_evaluate_scores_blocks_of_positions_as_the_whole_window(family, monkeypatch):
    """evaluate() makes each model's logits from its final hidden states a block of positions at a time
    (all four models' logits of an 8k window took 13 GB): the same numbers as every logit at once, and
    perplexities equal to a plain forward's."""
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parents[1]))
    from model_sources import VOCAB, make_source

    from bsbr import convert_to_bsbr
    from bsbr.evaluate import metrics, perplexity_past
    from bsbr.evaluate.baselines import local_baseline
    from bsbr.models import heads

    torch.manual_seed(0)
    src = make_source(family).eval()
    model = convert_to_bsbr(src, chunk_size=8, gate_init=0.3).eval()
    local = local_baseline(src, 8, like=model)
    windows = torch.randint(0, VOCAB, (2, 60), generator=torch.Generator().manual_seed(1))
    whole = metrics.evaluate(model, src, None, windows, 8, local=local, progress=False)["language_modeling"]
    monkeypatch.setattr(heads, "POSITION_BLOCK", 7)
    blocks = metrics.evaluate(model, src, None, windows, 8, local=local, progress=False)["language_modeling"]
    for key in ("perplexity", "kl", "hidden_cosine"):
        for m, x in whole[key].items():
            assert blocks[key][m] == pytest.approx(x, rel=1e-9, abs=1e-12), (key, m)
    assert blocks["agreement"] == whole["agreement"] and blocks["windows"] == whole["windows"] == 2
    assert [b["tokens"] for b in blocks["buckets"]] == [b["tokens"] for b in whole["buckets"]]
    for name, m in (("bsbr", model), ("source", src), ("local", local)):
        assert whole["perplexity"][name] == pytest.approx(perplexity_past(m, windows, 8), rel=1e-5), name


def test_a_perplexity_past_floats_range_is_infinite_not_an_error():
    """A diverged model (mean NLL past 709 nats) made bsbr eval fail with OverflowError after all its work."""
    from types import SimpleNamespace

    from bsbr.evaluate import metrics

    class Hot(torch.nn.Module):  # every logit but token 0's far below it: predicting token 1 costs 1,000 nats
        def forward(self, input_ids, use_cache=False):
            logits = torch.full((*input_ids.shape, 3), -1000.0)
            logits[..., 0] = 0.0
            return SimpleNamespace(logits=logits)

    assert metrics.perplexity_past(Hot(), torch.ones(1, 5, dtype=torch.long), 0) == float("inf")
    acc = metrics.MetricAccumulator(6, 2, models=("bsbr", "source"))
    logits = {m: Hot()(torch.ones(1, 6, dtype=torch.long)).logits for m in ("bsbr", "source")}
    result = acc.update(torch.ones(1, 6, dtype=torch.long), logits) or acc.result()
    assert result["perplexity"]["bsbr"] == float("inf") and result.get("gap_closed") is None


@pytest.mark.parametrize("option", [dict(chunk_size=True), dict(batch_size=True), dict(chunk_size=0)])
def test_evaluate_refuses_a_bool_for_a_count(option):
    # True was taken as 1
    from bsbr.evaluate import metrics

    args = dict(chunk_size=8, batch_size=1) | option
    with pytest.raises(ValueError, match=f"{next(iter(option))} must be an int >= 1"):
        metrics.evaluate(None, None, None, torch.zeros(1, 20, dtype=torch.long), args["chunk_size"],
                         batch_size=args["batch_size"], progress=False)


@pytest.mark.parametrize("bad", ["vocab", "negative"])
def test_evaluate_refuses_token_ids_outside_the_vocabulary(bad):
    """An id equal to the vocabulary size is out of range too (an embedding's IndexError mid-run otherwise)."""
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parents[1]))
    from model_sources import VOCAB, make_source

    from bsbr import convert_to_bsbr
    from bsbr.evaluate import metrics

    src = make_source("llama").eval()
    model = convert_to_bsbr(src, chunk_size=8).eval()
    windows = torch.randint(0, VOCAB, (1, 20), generator=torch.Generator().manual_seed(0))
    windows[0, 5] = VOCAB if bad == "vocab" else -1
    with pytest.raises(ValueError, match=rf"token ids outside \[0, {VOCAB}\)"):
        metrics.evaluate(model, src, None, windows, 8, progress=False)
    windows[0, 5] = VOCAB - 1  # the largest id is in range
    assert metrics.evaluate(model, src, None, windows, 8, progress=False)["language_modeling"]["windows"] == 1


def test_evaluate_refuses_models_of_other_vocabularies_before_any_forward(monkeypatch):
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parents[1]))
    from model_sources import VOCAB, make_source

    from bsbr import convert_to_bsbr
    from bsbr.evaluate import metrics

    src = make_source("llama").eval()
    model = convert_to_bsbr(src, chunk_size=8).eval()
    src.resize_token_embeddings(VOCAB + 8)
    monkeypatch.setattr(type(model), "forward", lambda *a, **k: pytest.fail("ran a forward"))
    with pytest.raises(ValueError, match=rf"vocabularies differ: .*'bsbr': {VOCAB}.*'source': {VOCAB + 8}"):
        metrics.evaluate(model, src, None, torch.zeros(1, 20, dtype=torch.long), 8, progress=False)


def test_final_hidden_states_ask_the_model_for_the_last_positions_logits_only():
    # every position's logits over SmolLM2's 49,152 tokens take 0.8 GB per 4,096-token window, made and dropped
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parents[1]))
    from model_sources import VOCAB, make_source

    from bsbr import convert_to_bsbr
    from bsbr.models.heads import final_hidden_states

    model = convert_to_bsbr(make_source("llama"), chunk_size=8).eval()
    kept = []
    model.register_forward_hook(lambda m, a, k, out: kept.append(out.logits.shape), with_kwargs=True)
    ids = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        h = final_hidden_states(model, ids)
        torch.testing.assert_close(model.lm_head(h), model(ids).logits)
    assert h.shape[:2] == (2, 20) and kept[0] == (2, 1, VOCAB)
