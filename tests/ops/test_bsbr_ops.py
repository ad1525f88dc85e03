"""The three forms of the BSBR op are one function: reference = chunked = recurrent (float64,
gradients included), causal, padding-invariant, and equal to causal softmax attention inside one chunk."""
import math

import pytest
import torch
import torch.nn.functional as F

from bsbr.ops import chunk_bsbr_attention, naive_bsbr_attention, recurrent_bsbr_attention

DT = torch.float64


def make_inputs(b=2, hq=4, hkv=2, n=65, d=6, dv=7, dm=5, df=None, positive=False, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    df = df or d

    def r(*s):
        return torch.randn(*s, generator=g, dtype=DT)

    x = dict(q=r(b, hq, n, d), k=r(b, hkv, n, d), v=r(b, hkv, n, dv), mq=r(b, hq, n, dm), mk=r(b, hkv, n, dm))
    x["fq"] = r(b, hq, n, df).exp() * 0.3 if positive else r(b, hq, n, df)
    x["fk"] = r(b, hkv, n, df).exp() * 0.3 if positive else r(b, hkv, n, df)
    if requires_grad:
        for t in x.values():
            t.requires_grad_(True)
    return x


def call(fn, x, **kw):
    return fn(x["q"], x["k"], x["v"], x["mq"], x["mk"], fq=x["fq"], fk=x["fk"], **kw)[0]


CASES = [
    # (n, chunk, hq, hkv, d, df, variant, top_k, gate)
    (1, 64, 2, 2, 8, None, "additive", None, None),
    (63, 64, 2, 2, 8, None, "additive", None, None),
    (64, 64, 2, 2, 8, None, "additive", None, None),
    (65, 64, 2, 2, 8, None, "normalized", None, None),
    (1000, 64, 2, 1, 6, None, "additive", None, None),
    (1000, 64, 4, 2, 6, 3, "normalized", 3, "per_head"),  # compressed features, top-k, grouped K/V
    (37, 8, 3, 1, 5, 2, "additive", 2, "scalar"),
    (37, 8, 6, 3, 10, 10, "normalized", None, "per_head"),
    (100, 1, 2, 2, 3, None, "normalized", 4, None),  # chunk size 1: every token is a chunk
]


@pytest.mark.parametrize("n,chunk,hq,hkv,d,df,variant,top_k,gate", CASES)
def test_three_forms_agree(n, chunk, hq, hkv, d, df, variant, top_k, gate):
    x = make_inputs(b=2, hq=hq, hkv=hkv, n=n, d=d, df=df, positive=variant == "normalized")
    gt = None
    if gate == "per_head":
        gt = torch.linspace(0.0, 2.0, hq, dtype=DT)
    elif gate == "scalar":
        gt = torch.tensor(0.7, dtype=DT)
    kw = dict(chunk_size=chunk, variant=variant, top_k=top_k, gate=gt)
    ref = call(naive_bsbr_attention, x, **kw)
    torch.testing.assert_close(call(chunk_bsbr_attention, x, **kw), ref, rtol=1e-10, atol=1e-10)
    if n <= 100:  # the token-by-token form is slow in Python; 100 tokens cover several chunks
        torch.testing.assert_close(call(recurrent_bsbr_attention, x, **kw), ref, rtol=1e-10, atol=1e-10)


MASS_CASES = [  # (n, chunk, hq, hkv, variant, top_k, mass_power)
    (65, 16, 4, 2, "normalized", None, [1.0, 0.5, 0.0, 2.0]),
    (100, 8, 2, 1, "normalized", 3, [1.0, 1.0]),
    (37, 8, 3, 3, "additive", None, [0.7]),
]


@pytest.mark.parametrize("n,chunk,hq,hkv,variant,top_k,mass", MASS_CASES)
def test_three_forms_agree_with_a_per_token_gate(n, chunk, hq, hkv, variant, top_k, mass):
    x = make_inputs(b=2, hq=hq, hkv=hkv, n=n, d=5, df=4, positive=True)
    kw = dict(chunk_size=chunk, variant=variant, top_k=top_k, gate=torch.linspace(0.2, 1.5, hq, dtype=DT),
              mass_power=torch.tensor(mass, dtype=DT))
    ref = call(naive_bsbr_attention, x, **kw)
    without = call(naive_bsbr_attention, x, **{**kw, "mass_power": None})
    assert not torch.allclose(ref, without)  # the per-token gate changes the output
    torch.testing.assert_close(call(chunk_bsbr_attention, x, **kw), ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(call(recurrent_bsbr_attention, x, **kw), ref, rtol=1e-10, atol=1e-10)


def test_mass_power_one_is_one_softmax_over_local_keys_and_the_retrieved_mass():
    """Written out by hand for chunk 1, which retrieves only chunk 0 (weight exactly 1):
    o_t = (sum_local e^(s-m) v + g fq.F_0) / (sum_local e^(s-m) + g fq.z_0), m = max of the local scores."""
    B = 8
    x = make_inputs(b=1, hq=1, hkv=1, n=2 * B, d=4, df=3, positive=True)
    g = torch.tensor([0.6], dtype=DT)
    o = call(chunk_bsbr_attention, x, chunk_size=B, variant="normalized", gate=g, mass_power=torch.ones(1, dtype=DT))
    q, k, v, fq, fk = (x[n][0, 0] for n in ("q", "k", "v", "fq", "fk"))
    F0, z0 = fk[:B].T @ v[:B], fk[:B].sum(0)
    for t in range(B, 2 * B):
        s = k[B : t + 1] @ q[t] / 2.0
        e = torch.exp(s - s.max())
        want = (e @ v[B : t + 1] + g * (fq[t] @ F0)) / (e.sum() + g * (fq[t] @ z0))
        torch.testing.assert_close(o[0, 0, t], want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(o[0, 0, :B], call(naive_bsbr_attention, x, chunk_size=B)[0, 0, :B])  # chunk 0: local


def test_per_token_gate_is_causal_padding_invariant_and_differentiable():
    kw = dict(chunk_size=8, variant="normalized", top_k=2)
    x = make_inputs(b=1, hq=2, hkv=1, n=40, d=4, positive=True)
    beta = torch.tensor([1.0, 0.5], dtype=DT)
    base = call(chunk_bsbr_attention, x, mass_power=beta, **kw)
    for t in (0, 8, 21, 39):
        y = {k: v.clone() for k, v in x.items()}
        for name in y:
            y[name][:, :, t] += 10.0
        assert torch.equal(call(chunk_bsbr_attention, y, mass_power=beta, **kw)[:, :, :t], base[:, :, :t])
    valid = torch.ones(1, 40, dtype=torch.bool)
    valid[0, :5] = False
    for fn in (chunk_bsbr_attention, recurrent_bsbr_attention):
        o = call(fn, x, valid=valid, mass_power=beta, **kw)
        alone = {k: t[:, :, 5:] for k, t in x.items()}
        torch.testing.assert_close(o[:, :, 5:], call(naive_bsbr_attention, alone, mass_power=beta, **kw),
                                   rtol=1e-10, atol=1e-10)
    grads = []
    for fn in (naive_bsbr_attention, chunk_bsbr_attention, recurrent_bsbr_attention):
        xs = make_inputs(b=1, hq=2, hkv=1, n=21, d=4, positive=True, requires_grad=True)
        b_ = beta.clone().requires_grad_(True)
        o = call(fn, xs, mass_power=b_, gate=torch.tensor(0.5, dtype=DT), **kw)
        (o * torch.randn(o.shape, generator=torch.Generator().manual_seed(2), dtype=DT)).sum().backward()
        grads.append([t.grad for t in xs.values()] + [b_.grad])
    assert grads[0][-1].abs().sum() > 0
    for other in grads[1:]:
        for a, b in zip(grads[0], other):
            torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-9)


def test_recurrent_long_sequence_small_chunk():
    x = make_inputs(b=1, hq=2, hkv=1, n=300, d=4, df=4, positive=True)
    kw = dict(chunk_size=16, variant="normalized", top_k=5)
    torch.testing.assert_close(call(recurrent_bsbr_attention, x, **kw), call(naive_bsbr_attention, x, **kw),
                               rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("variant,top_k", [("additive", None), ("normalized", 2)])
def test_gradients_agree(variant, top_k):
    kw = dict(chunk_size=8, variant=variant, top_k=top_k)
    grads = []
    for fn in (naive_bsbr_attention, chunk_bsbr_attention, recurrent_bsbr_attention):
        x = make_inputs(b=2, hq=4, hkv=2, n=29, d=5, df=3, positive=True, requires_grad=True)
        gate = torch.tensor([0.3, 0.5, 1.0, 1.5], dtype=DT, requires_grad=True)
        o = call(fn, x, gate=gate, **kw)
        w = torch.randn(o.shape, generator=torch.Generator().manual_seed(1), dtype=DT)
        (o * w).sum().backward()
        grads.append([t.grad for t in x.values()] + [gate.grad])
    for other in grads[1:]:
        for a, b in zip(grads[0], other):
            torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("variant", ["additive", "normalized"])
def test_causal_perturbing_a_later_token(variant):
    x = make_inputs(b=1, hq=2, hkv=2, n=50, d=4, positive=True)
    assert_causal(x, (0, 7, 8, 20, 49), chunk_size=8, variant=variant)  # first, chunk end, chunk start, mid, last


def assert_causal(x, positions, **kw):
    """Perturbing every input at token t changes the output at t and nothing before it."""
    base = call(chunk_bsbr_attention, x, **kw)
    for t in positions:
        y = {k: v.clone() for k, v in x.items()}
        for name in y:
            y[name][:, :, t] += 10.0
        out = call(chunk_bsbr_attention, y, **kw)
        assert torch.equal(out[:, :, :t], base[:, :, :t]), f"outputs before {t} changed"
        assert not torch.equal(out[:, :, t], base[:, :, t])


def test_one_chunk_is_causal_softmax_attention():
    x = make_inputs(b=2, hq=4, hkv=2, n=40, d=8)
    o = call(chunk_bsbr_attention, x, chunk_size=64)
    k = x["k"].repeat_interleave(2, dim=1)
    v = x["v"].repeat_interleave(2, dim=1)
    s = x["q"] @ k.transpose(-1, -2) / math.sqrt(8)
    s = s.masked_fill(torch.ones(40, 40, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(o, torch.softmax(s, -1) @ v, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(o, F.scaled_dot_product_attention(x["q"], k, v, is_causal=True), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("fn", [chunk_bsbr_attention, recurrent_bsbr_attention])
@pytest.mark.parametrize("variant", ["additive", "normalized"])
def test_padding_left_right_and_holes_equal_each_sequence_alone(fn, variant):
    n = 30
    x = make_inputs(b=3, hq=2, hkv=1, n=n, d=4, positive=True)
    valid = torch.ones(3, n, dtype=torch.bool)
    valid[0, :7] = False  # left padding
    valid[1, 19:] = False  # right padding
    valid[2, 3:5] = False  # holes
    kw = dict(chunk_size=8, variant=variant, top_k=2)
    o = call(fn, x, valid=valid, **kw)
    for b in range(3):
        alone = {k: t[b : b + 1][:, :, valid[b]] for k, t in x.items()}
        torch.testing.assert_close(o[b : b + 1][:, :, valid[b]], call(naive_bsbr_attention, alone, **kw),
                                   rtol=1e-10, atol=1e-10)
        assert torch.equal(o[b][:, ~valid[b]], torch.zeros_like(o[b][:, ~valid[b]]))
    # garbage in padded positions must not leak anywhere
    y = {k: t.clone() for k, t in x.items()}
    for t in y.values():
        t[:, :, :][~valid[:, None, :].expand(-1, t.shape[1], -1)] = 1e3
    torch.testing.assert_close(call(fn, y, valid=valid, **kw), o, rtol=0, atol=0)


def prefill_then_stream(x, valid, cut, **kw):
    """Chunked prefill of tokens [0, cut), then its state handed to the streaming form for the rest."""
    pre = {k: t[:, :, :cut] for k, t in x.items()}
    post = {k: t[:, :, cut:] for k, t in x.items()}
    _, state = chunk_bsbr_attention(pre["q"], pre["k"], pre["v"], pre["mq"], pre["mk"], fq=pre["fq"], fk=pre["fk"],
                                    valid=valid[:, :cut], output_final_state=True, **kw)
    o, _ = recurrent_bsbr_attention(post["q"], post["k"], post["v"], post["mq"], post["mk"], fq=post["fq"],
                                    fk=post["fk"], valid=valid[:, cut:], initial_state=state, **kw)
    return o


@pytest.mark.parametrize("cut", [0, 5, 8, 16, 23])
def test_chunked_prefill_then_streaming_equals_full(cut):
    x = make_inputs(b=2, hq=2, hkv=2, n=30, d=4, positive=True)
    valid = torch.ones(2, 30, dtype=torch.bool)
    valid[1, :3] = False
    kw = dict(chunk_size=8, variant="normalized", top_k=None)
    full = call(naive_bsbr_attention, x, valid=valid, **kw)
    torch.testing.assert_close(prefill_then_stream(x, valid, cut, **kw), full[:, :, cut:], rtol=1e-10, atol=1e-10)


def test_state_memory_is_bounded_by_chunk_plus_per_chunk_states():
    x = make_inputs(b=1, hq=2, hkv=2, n=256, d=4)
    _, st = chunk_bsbr_attention(x["q"], x["k"], x["v"], x["mq"], x["mk"], chunk_size=32, output_final_state=True)
    assert st.k_buf.shape[2] == 32  # one chunk of keys, not the whole context
    assert st.F_past.shape[2] == 8  # one state per completed chunk


def test_empty_sequence():
    x = make_inputs(b=2, n=0)
    for fn in (naive_bsbr_attention, chunk_bsbr_attention, recurrent_bsbr_attention):
        assert call(fn, x, chunk_size=4).shape == (2, 4, 0, 7)


@pytest.mark.parametrize(
    "change,kw,exc",
    [
        ({}, dict(chunk_size=0), ValueError),
        ({}, dict(chunk_size=2.5), ValueError),
        ({}, dict(chunk_size=4, variant="magic"), ValueError),
        ({}, dict(chunk_size=4, top_k=0), ValueError),
        ({"q": torch.zeros(2, 4, 5)}, dict(chunk_size=4), ValueError),  # wrong rank
        ({"k": torch.zeros(2, 3, 9, 6, dtype=DT)}, dict(chunk_size=4), ValueError),  # 4 q heads, 3 kv heads
        ({"v": torch.zeros(2, 2, 8, 7, dtype=DT)}, dict(chunk_size=4), ValueError),  # length mismatch
        ({"mk": torch.zeros(2, 2, 9, 4, dtype=DT)}, dict(chunk_size=4), ValueError),  # meta dims differ
        ({"q": [[1.0]]}, dict(chunk_size=4), TypeError),
        ({"q": torch.zeros(2, 4, 9, 6, dtype=torch.long)}, dict(chunk_size=4), TypeError),
        ({"v": torch.zeros(2, 2, 9, 7, dtype=torch.float32)}, dict(chunk_size=4), TypeError),  # mixed dtypes
        ({}, dict(chunk_size=4, valid=torch.ones(2, 8, dtype=torch.bool)), ValueError),
        ({}, dict(chunk_size=4, gate=torch.ones(3, dtype=DT)), ValueError),
        ({}, dict(chunk_size=4, mass_power=torch.ones(3, dtype=DT)), ValueError),
        ({}, dict(chunk_size=4, mass_power=1.0), TypeError),
    ],
)
def test_bad_inputs_raise(change, kw, exc):
    x = make_inputs(b=2, hq=4, hkv=2, n=9, d=6)
    x.update(change)
    for fn in (naive_bsbr_attention, chunk_bsbr_attention, recurrent_bsbr_attention):
        with pytest.raises(exc):
            call(fn, x, **kw)


@pytest.mark.parametrize("fn", [naive_bsbr_attention, chunk_bsbr_attention, recurrent_bsbr_attention])
def test_meta_maps_on_chunk_means_equal_per_token_projections(fn):
    """An affine map commutes with a mean: mapping chunk means of raw inputs (one "head") equals
    projecting every token first — the per-token definition the reference uses."""
    x = make_inputs(b=2, hq=4, hkv=2, n=29, d=4, positive=True)
    g = torch.Generator().manual_seed(5)
    raw = torch.randn(2, 1, 29, 7, generator=g, dtype=DT)  # e.g. hidden states
    wq, bq = torch.randn(7, 4 * 3, generator=g, dtype=DT), torch.randn(4 * 3, generator=g, dtype=DT)
    wk, bk = torch.randn(7, 2 * 3, generator=g, dtype=DT), torch.randn(2 * 3, generator=g, dtype=DT)

    def proj(t, w, bias, h):  # (b, 1, T, 7) -> (b, h, T, 3)
        y = t[:, 0] @ w + bias
        return y.view(t.shape[0], t.shape[2], h, 3).transpose(1, 2)

    valid = torch.ones(2, 29, dtype=torch.bool)
    valid[1, :4] = False
    kw = dict(chunk_size=8, variant="normalized", top_k=2, valid=valid, fq=x["fq"], fk=x["fk"])
    per_token = naive_bsbr_attention(x["q"], x["k"], x["v"], proj(raw, wq, bq, 4), proj(raw, wk, bk, 2), **kw)[0]
    mapped = fn(x["q"], x["k"], x["v"], raw, raw, meta_q_map=lambda m: proj(m, wq, bq, 4),
                meta_k_map=lambda m: proj(m, wk, bk, 2), **kw)[0]
    torch.testing.assert_close(mapped, per_token, rtol=1e-10, atol=1e-10)


def test_meta_map_errors():
    x = make_inputs(b=1, hq=2, hkv=1, n=9, d=4)
    with pytest.raises(TypeError, match="callable"):
        call(chunk_bsbr_attention, x, chunk_size=4, meta_q_map="linear")
    with pytest.raises(ValueError, match="meta_q_map"):
        call(chunk_bsbr_attention, x, chunk_size=4, meta_q_map=lambda m: m[:, :1])


# ---------------------------------------------------------------- the exact window: previous chunks and sinks
WINDOW_CASES = [  # (n, chunk, local_chunks, sink_tokens, variant, top_k, gate, mass_power)
    (37, 8, 2, 1, "additive", None, "per_head", None),
    (65, 8, 3, 4, "normalized", 2, None, None),
    (40, 8, 2, 10, "normalized", None, "per_head", [1.0, 0.5]),  # more sinks than a chunk holds
    (9, 4, 2, 3, "additive", None, None, None),
    (30, 8, 1, 2, "additive", 1, "per_head", None),  # sinks with the plain one-chunk window
    (50, 8, 2, 0, "normalized", None, None, None),  # previous chunk, no sinks
    (20, 8, 4, 2, "normalized", None, None, None),  # the window is longer than the sequence
]


def window_kw(chunk, L, S, variant, top_k, gate, mass):
    return dict(chunk_size=chunk, variant=variant, top_k=top_k, local_chunks=L, sink_tokens=S,
                gate=None if gate is None else torch.tensor([0.3, 1.2], dtype=DT),
                mass_power=None if mass is None else torch.tensor(mass, dtype=DT))


@pytest.mark.parametrize("n,chunk,L,S,variant,top_k,gate,mass", WINDOW_CASES)
def test_three_forms_agree_with_a_wider_exact_window(n, chunk, L, S, variant, top_k, gate, mass):
    x = make_inputs(b=2, hq=2, hkv=1, n=n, d=4, positive=True)
    kw = window_kw(chunk, L, S, variant, top_k, gate, mass)
    ref = call(naive_bsbr_attention, x, **kw)
    assert not torch.allclose(ref, call(naive_bsbr_attention, x, **{**kw, "local_chunks": 1, "sink_tokens": 0})) \
        or n <= chunk  # the window changes the output once there is a chunk before the last
    for fn in (chunk_bsbr_attention, recurrent_bsbr_attention):
        torch.testing.assert_close(call(fn, x, **kw), ref, rtol=1e-10, atol=1e-10)
    # padding: each sequence alone, sinks are its own first real tokens
    valid = torch.ones(2, n, dtype=torch.bool)
    valid[0, : min(5, n - 1)] = False
    valid[1, 3:6] = False
    for fn in (chunk_bsbr_attention, recurrent_bsbr_attention):
        o = call(fn, x, valid=valid, **kw)
        for b in range(2):
            alone = {k: t[b : b + 1][:, :, valid[b]] for k, t in x.items()}
            torch.testing.assert_close(o[b : b + 1][:, :, valid[b]], call(naive_bsbr_attention, alone, **kw),
                                       rtol=1e-10, atol=1e-10)
    # a chunked prefill hands its state to token-by-token decoding at any cut
    full = call(naive_bsbr_attention, x, valid=valid, **kw)
    for cut in sorted({0, 3, chunk, n // 2 + 1, n - 1}):
        torch.testing.assert_close(prefill_then_stream(x, valid, cut, **kw), full[:, :, cut:], rtol=1e-10, atol=1e-10)


def test_closed_gate_is_softmax_over_the_window_written_out_by_hand():
    """Gate 0: every token attends exactly to (its chunk so far) + (the chunk before) + (tokens 0..2)."""
    n, B, L, S = 40, 8, 2, 3
    x = make_inputs(b=1, hq=2, hkv=2, n=n, d=4)
    allowed = torch.zeros(n, n, dtype=torch.bool)
    for t in range(n):
        lo = max(0, (t // B - 1) * B)  # start of the previous chunk
        allowed[t, lo : t + 1] = True
        allowed[t, : min(S, t + 1)] = True
    s = (x["q"] @ x["k"].transpose(-1, -2) / 2.0).masked_fill(~allowed, float("-inf"))
    want = torch.softmax(s, -1) @ x["v"]
    for fn in (naive_bsbr_attention, chunk_bsbr_attention, recurrent_bsbr_attention):
        got = call(fn, x, chunk_size=B, local_chunks=L, sink_tokens=S, gate=torch.zeros(1, dtype=DT))
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("L,S", [(2, 0), (2, 4), (3, 1)])
def test_window_is_causal_and_retrieval_skips_the_window(L, S):
    x = make_inputs(b=1, hq=2, hkv=2, n=50, d=4, positive=True)
    kw = dict(chunk_size=8, variant="normalized", local_chunks=L, sink_tokens=S)
    assert_causal(x, (0, 3, 7, 8, 20, 49), **kw)
    # retrieval reaches only chunks before the window: the first L chunks never retrieve, so with a
    # wide-open gate they equal the closed-gate output
    open_ = call(chunk_bsbr_attention, x, gate=torch.tensor(5.0, dtype=DT), **kw)
    closed = call(chunk_bsbr_attention, x, gate=torch.tensor(0.0, dtype=DT), **kw)
    torch.testing.assert_close(open_[:, :, : L * 8], closed[:, :, : L * 8], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(open_[:, :, L * 8 :], closed[:, :, L * 8 :])


def test_window_gradients_agree():
    grads = []
    for fn in (naive_bsbr_attention, chunk_bsbr_attention, recurrent_bsbr_attention):
        xs = make_inputs(b=1, hq=2, hkv=1, n=27, d=4, positive=True, requires_grad=True)
        o = call(fn, xs, chunk_size=6, variant="normalized", local_chunks=2, sink_tokens=2,
                 gate=torch.tensor(0.5, dtype=DT))
        (o * torch.randn(o.shape, generator=torch.Generator().manual_seed(3), dtype=DT)).sum().backward()
        grads.append([t.grad for t in xs.values()])
    for other in grads[1:]:
        for a, b in zip(grads[0], other):
            torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-9)


def test_window_state_holds_the_window_and_refuses_other_sizes():
    x = make_inputs(b=1, hq=2, hkv=2, n=256, d=4)
    _, st = chunk_bsbr_attention(x["q"], x["k"], x["v"], x["mq"], x["mk"], chunk_size=32, local_chunks=2,
                                 sink_tokens=4, output_final_state=True)
    assert st.k_buf.shape[2] == 64 and st.k_sink.shape[2] == 4  # two chunks and the sinks, not the context
    assert st.F_past.shape[2] == 8
    step = {k: t[:, :, :1] for k, t in x.items()}
    for sizes in (dict(local_chunks=1, sink_tokens=4), dict(local_chunks=2, sink_tokens=0)):
        with pytest.raises(ValueError, match="state was built with"):
            recurrent_bsbr_attention(step["q"], step["k"], step["v"], step["mq"], step["mk"], chunk_size=32,
                                     initial_state=st, **sizes)


@pytest.mark.parametrize("kw", [dict(local_chunks=0), dict(local_chunks=1.5), dict(local_chunks=True),
                                dict(sink_tokens=-1), dict(sink_tokens=2.0)])
def test_bad_window_options_raise(kw):
    x = make_inputs(b=1, hq=2, hkv=1, n=9, d=4)
    for fn in (naive_bsbr_attention, chunk_bsbr_attention, recurrent_bsbr_attention):
        with pytest.raises(ValueError, match=next(iter(kw))):
            call(fn, x, chunk_size=4, **kw)
