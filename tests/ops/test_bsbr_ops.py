"""The three forms of the BSBR op are one function: reference = chunked = recurrent (float64,
gradients included), causal, padding-invariant, and equal to causal softmax attention inside one chunk."""
import math

import pytest
import torch
import torch.nn.functional as F

from bsbr.ops import (BSBROptions, bsbr_attention_step, chunk_bsbr_attention, naive_bsbr_attention,
                      recurrent_bsbr_attention)

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


OPTION_NAMES = ("chunk_size", "local_chunks", "sink_tokens", "retrieval_blocks", "recall_tokens", "retrieval",
                "own_position_chunks", "scale")


def split(kw):
    """Keyword arguments -> (BSBROptions, the op's tensor arguments)."""
    opts = {name: kw.pop(name) for name in OPTION_NAMES if name in kw}
    return BSBROptions(**opts), kw


def call(fn, x, **kw):
    options, rest = split(dict(kw))
    extra = {name: x[name] for name in ("qr", "kr", "qs") if name in x}
    return fn(x["q"], x["k"], x["v"], x["mq"], x["mk"], options, fq=x["fq"], fk=x["fk"], **extra, **rest)[0]


CASES = [
    # (n, chunk, hq, hkv, d, df, retrieval, retrieval_blocks, gate)
    (1, 64, 2, 2, 8, None, "additive", None, None),
    (63, 64, 2, 2, 8, None, "additive", None, None),
    (64, 64, 2, 2, 8, None, "additive", None, None),
    (65, 64, 2, 2, 8, None, "normalized", None, None),
    (1000, 64, 2, 1, 6, None, "additive", None, None),
    pytest.param(1000, 64, 4, 2, 6, 3, "normalized", 3, "per_head",  # compressed features, blocks, grouped K/V
                 marks=pytest.mark.slow),
    (37, 8, 3, 1, 5, 2, "additive", 2, "scalar"),
    (37, 8, 6, 3, 10, 10, "normalized", None, "per_head"),
    (100, 1, 2, 2, 3, None, "normalized", 4, None),  # chunk size 1: every token is a chunk
]


@pytest.mark.parametrize("n,chunk,hq,hkv,d,df,variant,top_k,gate", CASES)
def test_three_forms_agree(n, chunk, hq, hkv, d, df, variant, top_k, gate):
    top_k = top_k or 0
    x = make_inputs(b=2, hq=hq, hkv=hkv, n=n, d=d, df=df, positive=variant == "normalized")
    gt = None
    if gate == "per_head":
        gt = torch.linspace(0.0, 2.0, hq, dtype=DT)
    elif gate == "scalar":
        gt = torch.tensor(0.7, dtype=DT)
    kw = dict(chunk_size=chunk, retrieval=variant, retrieval_blocks=top_k or 0, gate=gt)
    ref = call(naive_bsbr_attention, x, **kw)
    torch.testing.assert_close(call(chunk_bsbr_attention, x, **kw), ref, rtol=1e-10, atol=1e-10)
    if n <= 100:  # the token-by-token form is slow in Python; 100 tokens cover several chunks
        torch.testing.assert_close(call(recurrent_bsbr_attention, x, **kw), ref, rtol=1e-10, atol=1e-10)
        with torch.no_grad():  # in place, and the selected blocks' scores reused from the score pass
            torch.testing.assert_close(call(recurrent_bsbr_attention, x, **kw), ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("grad", [True, False])
def test_recurrent_long_sequence_small_chunk(grad):
    # 19 chunks, 5 blocks per head, 2 heads per K/V head: the heads' union is sometimes gathered and
    # sometimes most of the chunks (read where they lie)
    x = make_inputs(b=1, hq=2, hkv=1, n=300, d=4, df=4, positive=True)
    kw = dict(chunk_size=16, retrieval="normalized", retrieval_blocks=5)
    with torch.set_grad_enabled(grad):
        torch.testing.assert_close(call(recurrent_bsbr_attention, x, **kw), call(naive_bsbr_attention, x, **kw),
                                   rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("own", [0, 3])
def test_a_step_that_completes_a_chunk_writes_the_stored_chunks_in_place_without_autograd(own):
    # docs/design.md, section 8: without autograd a step writes the cache in place; a completing step copied every
    # stored chunk's state, keys and values (285 ms of a step at 32k context, chunk 16)
    x = make_inputs(b=2, hq=2, hkv=1, n=40, d=4, df=4, positive=True)
    options = BSBROptions(chunk_size=8, retrieval="normalized", retrieval_blocks=2, own_position_chunks=own)
    with torch.no_grad():
        _, state = chunk_bsbr_attention(x["q"], x["k"], x["v"], x["mq"], x["mk"], options, fq=x["fq"], fk=x["fk"],
                                        gate=torch.tensor(0.5, dtype=DT), output_final_state=True)
        step = {name: x[name][:, :, :1] for name in ("q", "k", "v", "mq", "mk", "fq", "fk")}
        for _ in range(16):  # tokens 40..55: the last completes chunk 6 (chunk 5's grew the arrays to 10 chunks)
            before = {name: t.data_ptr() for name, t in state.tensors().items()}
            _, state = bsbr_attention_step(*(step[n][:, :, 0] for n in ("q", "k", "v", "mq", "mk")), state, options,
                                           fq=step["fq"][:, :, 0], fk=step["fk"][:, :, 0],
                                           gate=torch.tensor(0.5, dtype=DT))
    assert state.n_seen.tolist() == [56, 56] and state.F_past.shape[2] == 10
    names = ["F_past", "z_past", "h_past", "kr_past", "v_past"] + (["k_past"] if own else [])
    assert {n: state.tensors()[n].data_ptr() == before[n] for n in names} == dict.fromkeys(names, True)


# dv == d: the CPU forms' fused kernel (used without autograd) returns a log-sum-exp with no gradient
@pytest.mark.parametrize("dv", [7, 5])
@pytest.mark.parametrize("variant,top_k", [("additive", None), ("normalized", 2)])
def test_gradients_agree(variant, top_k, dv):
    kw = dict(chunk_size=8, retrieval=variant, retrieval_blocks=top_k or 0)
    grads = []
    for fn in (naive_bsbr_attention, chunk_bsbr_attention, recurrent_bsbr_attention):
        x = make_inputs(b=2, hq=4, hkv=2, n=29, d=5, dv=dv, df=3, positive=True, requires_grad=True)
        gate = torch.tensor([0.3, 0.5, 1.0, 1.5], dtype=DT, requires_grad=True)
        o = call(fn, x, gate=gate, **kw)
        w = torch.randn(o.shape, generator=torch.Generator().manual_seed(1), dtype=DT)
        (o * w).sum().backward()
        grads.append([t.grad for t in x.values()] + [gate.grad])
    for other in grads[1:]:
        for a, b in zip(grads[0], other):
            torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("fn", [naive_bsbr_attention, chunk_bsbr_attention, recurrent_bsbr_attention])
def test_backward_with_blocks_runs_under_anomaly_detection(fn):
    """The first chunks have no earlier chunk to select: the log-sum-exp of nothing must not give NaN inside
    the backward pass (anomaly mode raises on it), and every gradient is finite."""
    x = make_inputs(b=1, hq=2, hkv=1, n=40, d=4, dv=5, positive=True, requires_grad=True)
    with torch.autograd.detect_anomaly():
        o = call(fn, x, chunk_size=8, local_chunks=1, retrieval_blocks=1, retrieval="normalized")
        o.sum().backward()
    assert all(bool(t.grad.isfinite().all()) for t in x.values())


@pytest.mark.parametrize("variant", ["additive", "normalized"])
def test_causal_perturbing_a_later_token(variant):
    x = make_inputs(b=1, hq=2, hkv=2, n=50, d=4, positive=True)
    assert_causal(x, (0, 7, 8, 20, 49), chunk_size=8, retrieval=variant)  # first, chunk end, chunk start, mid, last


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
@pytest.mark.parametrize("dv,blocks", [(7, dict(chunk_size=8, retrieval_blocks=2)),
                                       # every chunk read, the own-position ring one chunk long: a sequence
                                       # ahead reads a ring slot the one behind does not (dv = d: fused parts)
                                       (4, dict(chunk_size=2, retrieval_blocks=50, own_position_chunks=2))])
def test_padding_left_right_and_holes_equal_each_sequence_alone(fn, variant, dv, blocks):
    n = 30
    x = with_far_keys(make_inputs(b=3, hq=2, hkv=1, n=n, d=4, dv=dv, positive=True))
    valid = torch.ones(3, n, dtype=torch.bool)
    valid[0, :7] = False  # left padding
    valid[1, 19:] = False  # right padding
    valid[2, 3:5] = False  # holes
    kw = dict(retrieval=variant, **blocks)
    o = call(fn, x, valid=valid, **kw)
    for b in range(3):
        alone = {k: t[b : b + 1][:, :, valid[b]] for k, t in x.items()}
        torch.testing.assert_close(o[b : b + 1][:, :, valid[b]], call(naive_bsbr_attention, alone, **kw),
                                   rtol=1e-10, atol=1e-10)
        assert torch.equal(o[b][:, ~valid[b]], torch.zeros_like(o[b][:, ~valid[b]]))
    # garbage in padded positions must not leak anywhere (design.md: a NaN there changes nothing)
    for garbage in (1e3, float("nan"), float("inf")):
        y = {k: t.clone() for k, t in x.items()}
        for t in y.values():
            t[:, :, :][~valid[:, None, :].expand(-1, t.shape[1], -1)] = garbage
        torch.testing.assert_close(call(fn, y, valid=valid, **kw), o, rtol=0, atol=0, msg=str(garbage))


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("case", ["back in step", "growing"])
def test_streams_out_of_step_equal_each_sequence_alone(grad, case):
    """Back in step: the whole-context buffer (chunk < L + K <= own_position_chunks), one sequence two chunks behind
    and the other waiting until they are at one position again (the buffer is sized for the one ahead throughout).
    Growing: two sequences end a chunk at the same step at different chunk indices while the per-chunk arrays grow
    (they grow for the one ahead)."""
    n, kw = 16, dict(chunk_size=2, retrieval_blocks=4, own_position_chunks=6, retrieval="normalized")
    x = with_far_keys(make_inputs(b=2, hq=2, hkv=1, n=n, d=4, dv=4, positive=True))
    valid = torch.ones(2, n, dtype=torch.bool)
    valid[1, 1:5] = False
    if case == "back in step":
        valid[0, 8:12] = False
    else:
        kw = dict(chunk_size=2, retrieval="normalized")
    with torch.set_grad_enabled(grad):
        o = call(recurrent_bsbr_attention, x, valid=valid, **kw)
    for b in range(2):
        alone = {k: t[b : b + 1][:, :, valid[b]] for k, t in x.items()}
        torch.testing.assert_close(o[b : b + 1][:, :, valid[b]], call(naive_bsbr_attention, alone, **kw),
                                   rtol=1e-10, atol=1e-10)


def test_float32_steps_give_no_gist_where_every_earlier_chunk_is_selected():
    """In a batch where one sequence has more candidate chunks than K and the other (left padded) selects all of
    its own, the second's gist (its chunks' read-out less the selected ones') is exactly 0, not float32 rounding
    scaled up by the renormalisation (up to 100x)."""
    n, kw = 40, dict(chunk_size=4, retrieval_blocks=3, retrieval="normalized")
    x = with_far_keys(make_inputs(b=2, hq=2, hkv=1, n=n, d=4, dv=5, positive=True, seed=3))
    valid = torch.ones(2, n, dtype=torch.bool)
    valid[1, :26] = False
    with torch.no_grad():
        o = call(recurrent_bsbr_attention, {k: t.float() for k, t in x.items()}, valid=valid, **kw)
    alone = {k: t[1:2][:, :, valid[1]] for k, t in x.items()}
    err = (o[1:2][:, :, valid[1]].double() - call(naive_bsbr_attention, alone, **kw)).abs().max().item()
    assert err < 2e-6, err


def prefill_then_stream(x, valid, cut, **kw):
    """Chunked prefill of tokens [0, cut), then its state handed to the streaming form for the rest."""
    pre = {k: t[:, :, :cut] for k, t in x.items()}
    post = {k: t[:, :, cut:] for k, t in x.items()}
    options, rest = split(dict(kw))
    _, state = chunk_bsbr_attention(*(pre[n] for n in ("q", "k", "v", "mq", "mk")), options,
                                    **{n: pre[n] for n in pre if n not in ("q", "k", "v", "mq", "mk")},
                                    valid=valid[:, :cut], output_final_state=True, **rest)
    o, _ = recurrent_bsbr_attention(*(post[n] for n in ("q", "k", "v", "mq", "mk")), options,
                                    **{n: post[n] for n in post if n not in ("q", "k", "v", "mq", "mk")},
                                    valid=valid[:, cut:], initial_state=state, **rest)
    return o


@pytest.mark.parametrize("cut", [0, 5, 8, 16, 23])
def test_chunked_prefill_then_streaming_equals_full(cut):
    x = make_inputs(b=2, hq=2, hkv=2, n=30, d=4, positive=True)
    valid = torch.ones(2, 30, dtype=torch.bool)
    valid[1, :3] = False
    kw = dict(chunk_size=8, retrieval="normalized", retrieval_blocks=0)
    full = call(naive_bsbr_attention, x, valid=valid, **kw)
    torch.testing.assert_close(prefill_then_stream(x, valid, cut, **kw), full[:, :, cut:], rtol=1e-10, atol=1e-10)


def test_state_memory_is_bounded_by_chunk_plus_per_chunk_states():
    x = make_inputs(b=1, hq=2, hkv=2, n=256, d=4)
    _, st = chunk_bsbr_attention(x["q"], x["k"], x["v"], x["mq"], x["mk"], BSBROptions(32), output_final_state=True)
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
        ({}, dict(chunk_size=4, retrieval="magic"), ValueError),
        ({}, dict(chunk_size=4, retrieval_blocks=1.5), ValueError),
        ({"q": torch.zeros(2, 4, 5)}, dict(chunk_size=4), ValueError),  # wrong rank
        ({"k": torch.zeros(2, 3, 9, 6, dtype=DT)}, dict(chunk_size=4), ValueError),  # 4 q heads, 3 kv heads
        ({"v": torch.zeros(2, 2, 8, 7, dtype=DT)}, dict(chunk_size=4), ValueError),  # length mismatch
        ({"mk": torch.zeros(2, 2, 9, 4, dtype=DT)}, dict(chunk_size=4), ValueError),  # meta dims differ
        ({"q": [[1.0]]}, dict(chunk_size=4), TypeError),
        ({"q": torch.zeros(2, 4, 9, 6, dtype=torch.long)}, dict(chunk_size=4), TypeError),
        ({"v": torch.zeros(2, 2, 9, 7, dtype=torch.float32)}, dict(chunk_size=4), TypeError),  # mixed dtypes
        ({}, dict(chunk_size=4, valid=torch.ones(2, 8, dtype=torch.bool)), ValueError),
        ({}, dict(chunk_size=4, gate=torch.ones(3, dtype=DT)), ValueError),
        ({}, dict(chunk_size=4, retrieval_blocks=-1), ValueError),
        ({"qr": torch.zeros(2, 4, 9, 5, dtype=DT)}, dict(chunk_size=4), ValueError),  # qr head dim
        ({"kr": torch.zeros(2, 4, 9, 6, dtype=DT)}, dict(chunk_size=4), ValueError),  # kr heads
        ({}, dict(chunk_size=4, meta_q=torch.zeros(4, 5, 3, dtype=DT)), ValueError),  # meta map input size
        ({}, dict(chunk_size=4, meta_q="linear"), TypeError),
        # one map for every head (it broadcast silently), or one per query head given as the K/V heads' maps
        ({}, dict(chunk_size=4, meta_q=torch.zeros(1, 5, 5, dtype=DT)), ValueError),
        ({}, dict(chunk_size=4, meta_k=torch.zeros(1, 5, 5, dtype=DT)), ValueError),
        ({}, dict(chunk_size=4, meta_k=torch.zeros(4, 5, 5, dtype=DT)), ValueError),
        # a head or meta size of 0: a division by zero (head) or nan, the forms disagreeing (meta)
        ({n: torch.zeros(2, 4 if n == "q" else 2, 9, 0, dtype=DT) for n in ("q", "k")}, dict(chunk_size=4), ValueError),
        ({n: torch.zeros(2, 4 if n == "mq" else 2, 9, 0, dtype=DT) for n in ("mq", "mk")}, dict(chunk_size=4),
         ValueError),
        ({}, dict(chunk_size=4, meta_q=torch.zeros(4, 5, 0, dtype=DT), meta_k=torch.zeros(2, 5, 0, dtype=DT)),
         ValueError),
    ],
)
def test_bad_inputs_raise(change, kw, exc):
    x = make_inputs(b=2, hq=4, hkv=2, n=9, d=6)
    x.update(change)
    for fn in (naive_bsbr_attention, chunk_bsbr_attention, recurrent_bsbr_attention):
        with pytest.raises(exc):
            call(fn, x, **kw)


@pytest.mark.parametrize("shape", [(2, 2, 9, 5), (2, 4, 8, 5), (1, 4, 9, 5), (3, 4, 9, 5)])
def test_meta_queries_of_the_wrong_leading_shape_are_refused_by_name(shape):
    # (the K/V heads', one token short, another batch: a traceback, or an output for a batch of 3 from 2)
    x = make_inputs(b=2, hq=4, hkv=2, n=9, d=6)
    x["mq"] = torch.zeros(shape, dtype=DT)
    for fn in (naive_bsbr_attention, chunk_bsbr_attention, recurrent_bsbr_attention):
        with pytest.raises(ValueError, match=r"^mq must have leading shape \(2, 4, 9\)"):
            call(fn, x, chunk_size=4)


@pytest.mark.parametrize("fn", [naive_bsbr_attention, chunk_bsbr_attention, recurrent_bsbr_attention])
def test_inputs_of_two_dtypes_are_refused_after_a_call_of_the_same_shapes(fn):
    """The input checks are skipped for a signature seen before: the signature holds each tensor's dtype, so a
    float32 value beside float64 queries is refused by name, not a raw kernel error or a silent float64 output."""
    x = make_inputs(b=1, hq=2, hkv=2, n=10, d=4, dv=4)
    call(fn, x, chunk_size=4)
    with pytest.raises(TypeError, match="one dtype"):
        call(fn, dict(x, v=x["v"].float()), chunk_size=4)


@pytest.mark.parametrize("fn", [naive_bsbr_attention, chunk_bsbr_attention, recurrent_bsbr_attention])
def test_meta_maps_on_chunk_means_equal_per_token_projections(fn):
    """A linear map commutes with a mean: the op maps chunk means of mq/mk with per-head weights,
    which equals projecting every token first."""
    x = make_inputs(b=2, hq=4, hkv=2, n=29, d=4, dm=5, positive=True)
    g = torch.Generator().manual_seed(5)
    wq, wk = torch.randn(4, 5, 3, generator=g, dtype=DT), torch.randn(2, 5, 3, generator=g, dtype=DT)
    valid = torch.ones(2, 29, dtype=torch.bool)
    valid[1, :4] = False
    kw = dict(chunk_size=8, retrieval="normalized", retrieval_blocks=1, valid=valid, gate=torch.tensor(0.8, dtype=DT))
    per_token = dict(x, mq=torch.einsum("bhnd,hde->bhne", x["mq"], wq), mk=torch.einsum("bhnd,hde->bhne", x["mk"], wk))
    torch.testing.assert_close(call(fn, x, meta_q=wq, meta_k=wk, **kw), call(naive_bsbr_attention, per_token, **kw),
                               rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------- the exact window: previous chunks and sinks
WINDOW_CASES = [  # (n, chunk, local_chunks, sink_tokens, retrieval, retrieval_blocks, gate, unused)
    (37, 8, 2, 1, "additive", None, "per_head", None),
    (65, 8, 3, 4, "normalized", 2, None, None),
    (40, 8, 2, 10, "normalized", None, "per_head", [1.0, 0.5]),  # more sinks than a chunk holds
    (9, 4, 2, 3, "additive", None, None, None),
    (30, 8, 1, 2, "additive", 1, "per_head", None),  # sinks with the plain one-chunk window
    (50, 8, 2, 0, "normalized", None, None, None),  # previous chunk, no sinks
    (20, 8, 4, 2, "normalized", None, None, None),  # the window is longer than the sequence
]


def window_kw(chunk, L, S, variant, top_k, gate, mass):
    return dict(chunk_size=chunk, retrieval=variant, retrieval_blocks=top_k or 0, local_chunks=L, sink_tokens=S,
                gate=None if gate is None else torch.tensor([0.3, 1.2], dtype=DT),
                )


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
    kw = dict(chunk_size=8, retrieval="normalized", local_chunks=L, sink_tokens=S)
    assert_causal(x, (0, 3, 7, 8, 20, 49), **kw)
    # retrieval reaches only chunks before the window: the first L chunks never retrieve, so with a
    # wide-open gate they equal the closed-gate output
    open_ = call(chunk_bsbr_attention, x, gate=torch.tensor(5.0, dtype=DT), **kw)
    closed = call(chunk_bsbr_attention, x, gate=torch.tensor(0.0, dtype=DT), **kw)
    torch.testing.assert_close(open_[:, :, : L * 8], closed[:, :, : L * 8], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(open_[:, :, L * 8 :], closed[:, :, L * 8 :])


@pytest.mark.parametrize("dv", [7, 4])
def test_window_gradients_agree(dv):
    grads = []
    for fn in (naive_bsbr_attention, chunk_bsbr_attention, recurrent_bsbr_attention):
        xs = make_inputs(b=1, hq=2, hkv=1, n=27, d=4, dv=dv, positive=True, requires_grad=True)
        o = call(fn, xs, chunk_size=6, retrieval="normalized", local_chunks=2, sink_tokens=2,
                 gate=torch.tensor(0.5, dtype=DT))
        (o * torch.randn(o.shape, generator=torch.Generator().manual_seed(3), dtype=DT)).sum().backward()
        grads.append([t.grad for t in xs.values()])
    for other in grads[1:]:
        for a, b in zip(grads[0], other):
            torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-9)


def test_window_state_holds_the_window_and_refuses_other_sizes():
    x = make_inputs(b=1, hq=2, hkv=2, n=256, d=4)
    _, st = chunk_bsbr_attention(x["q"], x["k"], x["v"], x["mq"], x["mk"], BSBROptions(32, local_chunks=2,
                                 sink_tokens=4), output_final_state=True)
    assert st.k_buf.shape[2] == 64 and st.k_sink.shape[2] == 4  # two chunks and the sinks, not the context
    assert st.F_past.shape[2] == 8
    step = {k: t[:, :, :1] for k, t in x.items()}
    for sizes, built in ((dict(local_chunks=1, sink_tokens=4), "local_chunks=2"), (dict(local_chunks=2, sink_tokens=0),
                                                                                 "sink_tokens=4")):
        # (it said "state was built with BSBROptions(...), got BSBROptions(...)": which field, and what to do?)
        with pytest.raises(ValueError, match=rf"state was built with other options \({built}; this call's: BSBROptions"
                                             r".*\): continue a state with the layer \(options\) that built it, or pass"):
            recurrent_bsbr_attention(step["q"], step["k"], step["v"], step["mq"], step["mk"],
                                     BSBROptions(32, **sizes), initial_state=st)
    for other in (make_inputs(b=3, hq=2, hkv=2, n=1, d=4), make_inputs(b=1, hq=4, hkv=2, n=1, d=4),
                  make_inputs(b=1, hq=2, hkv=2, n=1, d=8)):  # another batch, more query heads, another head dim
        with pytest.raises(ValueError, match=r"state holds \(batch, query heads"):
            recurrent_bsbr_attention(other["q"], other["k"], other["v"], other["mq"], other["mk"],
                                     BSBROptions(32, local_chunks=2, sink_tokens=4), initial_state=st)


def test_a_state_refuses_meta_inputs_of_another_size_and_is_left_as_it_was():
    # a step with other meta sizes added its token to the chunk state, then failed in torch: a retry with the
    # right inputs counted that token twice (outputs off by up to 3.4)
    x = make_inputs(b=1, hq=2, hkv=1, n=8, d=3, dm=3)
    opts = BSBROptions(2)
    want = naive_bsbr_attention(*(x[n] for n in ("q", "k", "v", "mq", "mk")), opts, fq=x["fq"], fk=x["fk"])[0]
    with torch.no_grad():
        _, st = chunk_bsbr_attention(*(x[n][:, :, :3] for n in ("q", "k", "v", "mq", "mk")), opts,
                                     fq=x["fq"][:, :, :3], fk=x["fk"][:, :, :3], output_final_state=True)
        before = {n: t.clone() for n, t in st.tensors().items()}
        for mq, mk, maps in ((x["mq"][:, :, 3, :2], x["mk"][:, :, 3, :2], {}),
                             (x["mq"][:, :, 3], x["mk"][:, :, 3], dict(meta_q=torch.ones(2, 3, 2, dtype=DT),
                                                                     meta_k=torch.ones(1, 3, 2, dtype=DT)))):
            with pytest.raises(ValueError, match="state holds meta vectors of size 3 mapped to 3"):
                bsbr_attention_step(x["q"][:, :, 3], x["k"][:, :, 3], x["v"][:, :, 3], mq, mk, st, opts,
                                    fq=x["fq"][:, :, 3], fk=x["fk"][:, :, 3], **maps)
        assert all(torch.equal(t, before[n]) for n, t in st.tensors().items())
        o, _ = recurrent_bsbr_attention(*(x[n][:, :, 3:] for n in ("q", "k", "v", "mq", "mk")), opts,
                                        fq=x["fq"][:, :, 3:], fk=x["fk"][:, :, 3:], initial_state=st)
    torch.testing.assert_close(o, want[:, :, 3:])


@pytest.mark.parametrize("kw", [dict(local_chunks=0), dict(local_chunks=1.5), dict(local_chunks=True),
                                dict(sink_tokens=-1), dict(sink_tokens=2.0)])
def test_bad_window_options_raise(kw):
    x = make_inputs(b=1, hq=2, hkv=1, n=9, d=4)
    for fn in (naive_bsbr_attention, chunk_bsbr_attention, recurrent_bsbr_attention):
        with pytest.raises(ValueError, match=next(iter(kw))):
            call(fn, x, chunk_size=4, **kw)


def test_a_window_of_exactly_the_most_tokens_is_allowed_and_one_chunk_more_refused():
    from bsbr.ops.bsbr.options import MAX_TOKENS

    assert BSBROptions(MAX_TOKENS).chunk_size == MAX_TOKENS
    assert BSBROptions(MAX_TOKENS // 2, local_chunks=2).local_chunks == 2
    told = f"^local_chunks must be at most 2 with chunk_size {MAX_TOKENS // 2:,} .* got 3$"
    with pytest.raises(ValueError, match=told):
        BSBROptions(MAX_TOKENS // 2, local_chunks=3)


# ---------------------------------------------------------------- exact block retrieval
@pytest.mark.parametrize("extra", [dict(retrieval_blocks=3, sink_tokens=2, retrieval="normalized", gate="open"),
                                   dict(recall_tokens=4, local_chunks=1), dict(sink_tokens=9)])
def test_an_input_shorter_than_a_chunk_costs_what_its_length_does(extra):
    # (it was padded to a whole chunk: a 3-token forward with chunk 524,288 took 2 s and 1.3 GB)
    from torch.utils.flop_counter import FlopCounterMode

    extra = dict(extra)
    gate = extra.pop("gate", None)
    x = with_far_keys(make_inputs(b=2, hq=4, hkv=2, n=5, d=8, positive=True))
    valid = torch.tensor([[True] * 5, [False, True, True, False, True]])
    kw = dict(extra, valid=valid, **({} if gate else {"gate": torch.zeros((), dtype=DT)}))
    flops = {}
    for chunk in (8, 1 << 16):
        with FlopCounterMode(display=False) as counter:
            o = call(chunk_bsbr_attention, x, chunk_size=chunk, **kw)
        flops[chunk] = counter.get_total_flops()
        torch.testing.assert_close(o, call(naive_bsbr_attention, x, chunk_size=chunk, **kw), rtol=1e-10, atol=1e-10)
    assert flops[1 << 16] <= flops[8], flops


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_blocks_are_one_softmax_inside_the_values_range(dtype):
    # the selected blocks' lse was summed in the input dtype: in bfloat16 their weights summed to e^(+-1), and
    # with the gate closed the chunked form's outputs left the values' range by up to 1.2 (the others did not)
    g = torch.Generator().manual_seed(1)
    n, d = 200, 8
    x = {name: torch.randn(*shape, generator=g) * (10.0 if name in ("q", "k") else 1.0)  # q.k/sqrt(d) ~ 35
         for name, shape in (("q", (1, 2, n, d)), ("k", (1, 1, n, d)), ("v", (1, 1, n, d)), ("mq", (1, 2, n, 4)),
                             ("mk", (1, 1, n, 4)))}
    lo, hi = x["v"].amin(2, keepdim=True).double(), x["v"].amax(2, keepdim=True).double()
    for fn in (naive_bsbr_attention, chunk_bsbr_attention, recurrent_bsbr_attention):
        o = fn(*(t.to(dtype) for t in x.values()), BSBROptions(16, retrieval_blocks=2),
               gate=torch.zeros(2, dtype=dtype))[0].double()
        outside = torch.maximum(o - hi, lo - o).clamp(min=0).max().item()
        assert outside < 0.02, (fn.__name__, outside)  # (the range's ends, rounded to 8 bits: 0.007)


@pytest.mark.parametrize("window", [dict(chunk_size=64, local_chunks=2), dict(chunk_size=16, local_chunks=8),
                                    dict(chunk_size=64, local_chunks=2, sink_tokens=4)])
def test_bfloat16_window_parts_are_as_close_as_one_softmax(window):
    # the window's parts were merged by log-sum-exps rounded to bfloat16 (up to 1/256 of their value): the
    # chunked form drifted 0.115 from the float64 reference where one softmax over the same keys drifts 0.009
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 4, 256, 64, generator=g).mul(3).bfloat16() for _ in range(2))
    v = torch.randn(1, 4, 256, 64, generator=g).bfloat16()
    x = (q, k, v, q, k)
    ref = naive_bsbr_attention(*(t.double() for t in x), BSBROptions(**window), gate=0)[0]
    for fn in (chunk_bsbr_attention, recurrent_bsbr_attention):
        err = (fn(*x, BSBROptions(**window), gate=0)[0].double() - ref).abs().max().item()
        assert err < 0.03, (fn.__name__, err)


def test_half_precision_parts_are_merged_by_float32_log_sum_exps(monkeypatch):
    # the selected blocks' lse was cast back to bfloat16 before the merge (its 99th-percentile error 0.019, 0.0093
    # in float32)
    import bsbr.ops.bsbr.chunk as chunk

    merged, merge = [], chunk.merge
    monkeypatch.setattr(chunk, "merge", lambda parts: merged.append([lse.dtype for _, lse in parts]) or merge(parts))
    g = torch.Generator().manual_seed(0)
    q, k, v, mq, mk = (torch.randn(1, 2, 256, d, generator=g).bfloat16() for d in (16, 16, 16, 4, 4))
    o = chunk_bsbr_attention(q, k, v, mq, mk, BSBROptions(32, sink_tokens=2, retrieval_blocks=2), gate=0)[0]
    assert o.dtype == torch.bfloat16 and merged == [[torch.float32] * 3]  # the window, the sinks, the blocks
    merged.clear()  # blocks covering every earlier chunk, at far positions: read densely, merged as float32 too
    qr, kr = (torch.randn(1, 2, 256, 16, generator=g).bfloat16() for _ in range(2))
    o = chunk_bsbr_attention(q, k, v, mq, mk, BSBROptions(32, retrieval_blocks=8), qr=qr, kr=kr, gate=0)[0]
    assert o.dtype == torch.bfloat16 and merged and all(d == torch.float32 for m in merged for d in m), merged


@pytest.mark.parametrize("retrieval", ["normalized", "additive"])
@pytest.mark.parametrize("blocks", [4, 18])
def test_bfloat16_gist_is_as_close_as_the_reference(retrieval, blocks):
    # with an open gate and exact blocks, the gist is every chunk's read-out less the selected ones',
    # renormalised by up to 100: summed in bfloat16, the chunked and streaming forms were 0.07 to 38 times the
    # output's size from the float64 reference (the reference form, which sums the unselected chunks alone: 0.006)
    g = torch.Generator().manual_seed(0)
    n, B = 160, 8
    x = dict(q=torch.randn(1, 2, n, 16, generator=g), k=torch.randn(1, 1, n, 16, generator=g),
             v=torch.randn(1, 1, n, 16, generator=g) + 3, mq=torch.randn(1, 2, n, 4, generator=g) * 3,
             mk=torch.randn(1, 1, n, 4, generator=g) * 3, fq=torch.randn(1, 2, n, 8, generator=g).abs(),
             fk=torch.randn(1, 1, n, 8, generator=g).abs(), qr=torch.zeros(1, 2, n, 16), kr=torch.zeros(1, 1, n, 16))
    x["qr"][..., 0] = 1
    x["kr"][..., 0] = (torch.arange(n) // B) / 4  # later chunks score higher, by margins no rounding reverses
    x = {name: t.bfloat16() for name, t in x.items()}
    options = BSBROptions(B, retrieval_blocks=blocks, retrieval=retrieval)
    kw = dict(chunk_size=B, retrieval_blocks=blocks, retrieval=retrieval)
    ref = call(naive_bsbr_attention, {name: t.double() for name, t in x.items()}, **kw)
    size = ref.abs().max().item()
    outs = {fn.__name__: call(fn, x, **kw) for fn in (chunk_bsbr_attention, recurrent_bsbr_attention)}
    pre = {name: t[:, :, :100] for name, t in x.items()}  # a chunked prefill, then streaming steps
    o, state = chunk_bsbr_attention(*(pre[name] for name in ("q", "k", "v", "mq", "mk")), options,
                                    output_final_state=True, **{name: pre[name] for name in ("fq", "fk", "qr", "kr")})
    steps = [o]
    for t in range(100, n):
        o_t, state = bsbr_attention_step(*(x[name][:, :, t] for name in ("q", "k", "v", "mq", "mk")), state, options,
                                         **{name: x[name][:, :, t] for name in ("fq", "fk", "qr", "kr")})
        steps.append(o_t.unsqueeze(2))
    outs["prefill, then steps"] = torch.cat(steps, 2)
    for name, o in outs.items():
        assert o.dtype == torch.bfloat16, name
        err = (o.double() - ref).abs().max().item() / size
        assert err < 0.02, (name, err)  # (0.002 to 0.008 measured)
    assert state.S_cur.dtype == state.F_past.dtype == torch.float32 and state.k_buf.dtype == torch.bfloat16
    # and the gradient of fq, whose read-outs the gist subtracts (the chunked and reference forms cast fq per
    # read-out, so its gradients were summed in bfloat16: 0.04 to 0.32 and 0.18 to 0.22 of the largest gradient
    # away)
    grads = {}
    for fn, dtype in ((naive_bsbr_attention, torch.float64), (naive_bsbr_attention, torch.bfloat16),
                      (chunk_bsbr_attention, torch.bfloat16), (recurrent_bsbr_attention, torch.bfloat16)):
        y = dict({name: t.to(dtype) for name, t in x.items()}, fq=x["fq"].to(dtype).detach().requires_grad_())
        call(fn, y, **kw).sum().backward()
        grads[fn.__name__, dtype] = y["fq"].grad.double()
    ref = grads.pop((naive_bsbr_attention.__name__, torch.float64))
    for name, grad in grads.items():
        err = (grad - ref).abs().max().item() / ref.abs().max().item()
        assert err < 0.03, (name, err)  # (0.002 to 0.005 measured)


def with_far_keys(x, seed=7):
    """Add far-key queries/keys (qr, kr) that differ from q/k, as rotary positions past the window make them."""
    g = torch.Generator().manual_seed(seed)
    return dict(x, qr=torch.randn(x["q"].shape, generator=g, dtype=DT).requires_grad_(x["q"].requires_grad),
                kr=torch.randn(x["k"].shape, generator=g, dtype=DT).requires_grad_(x["k"].requires_grad))


BLOCK_CASES = [  # (n, chunk, hq, hkv, local_chunks, sink_tokens, retrieval_blocks, retrieval)
    (70, 8, 4, 2, 2, 3, 2, "normalized"),
    (70, 8, 2, 1, 1, 0, 3, "additive"),
    (70, 8, 2, 2, 2, 10, 2, "normalized"),  # sinks fill chunk 0 and part of chunk 1
    (41, 4, 3, 1, 3, 2, 50, "additive"),  # more blocks than there are chunks
    (33, 1, 2, 1, 2, 1, 4, "normalized"),  # every token is a chunk
    pytest.param(300, 64, 2, 1, 1, 3, 2, "normalized",  # four 16-token pieces per chunk, sinks in the first
                 marks=pytest.mark.slow),
    (70, 8, 2, 2, 2, 10, 9, "normalized"),  # K covers every earlier chunk (read densely); chunk 0 all sinks
    (40, 4, 2, 1, 1, 4, 20, "normalized"),  # dense, and chunk 0 exactly the sinks: its state is read all the same
]


@pytest.mark.parametrize("extra", [dict(retrieval_blocks=2), dict(retrieval_blocks=9), dict(recall_tokens=5), {}])
def test_closed_gate_equals_a_zero_gate(extra):
    # gate=0 (the number) lets the chunked and streaming forms skip reading the chunk states; the
    # result must be the reference's with a zero gate tensor, padded or not
    x = with_far_keys(make_inputs(b=2, hq=4, hkv=2, n=70, d=4, df=3, positive=True))
    kw = dict(chunk_size=8, local_chunks=2, sink_tokens=3, retrieval="normalized", **extra)
    ref = call(naive_bsbr_attention, x, **kw, gate=torch.zeros(4, dtype=DT))
    valid = torch.ones(2, 70, dtype=torch.bool)
    valid[0, :5] = False
    for fn in (chunk_bsbr_attention, recurrent_bsbr_attention):
        torch.testing.assert_close(call(fn, x, **kw, gate=0), ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(call(fn, x, **kw, gate=0, valid=valid)[0, :, 5:],
                                   call(naive_bsbr_attention, x, **kw, gate=torch.zeros(4, dtype=DT), valid=valid)[0, :, 5:],
                                   rtol=1e-10, atol=1e-10)


def test_a_closed_gate_prefill_with_a_state_builds_no_chunk_weight_table(monkeypatch):
    # the chunk-to-chunk weights (a C x C table per query head) were built for the state and never read: a
    # fresh conversion's prefill with use_cache=True took 1.1 GB more at 131k tokens of chunk 16, and time
    # growing with the square of the length
    import bsbr.ops.bsbr.chunk as chunk

    x = make_inputs(b=1, hq=2, hkv=1, n=40, d=4, df=3, positive=True)
    args = [x[n] for n in ("q", "k", "v", "mq", "mk")]
    opt = BSBROptions(chunk_size=4, local_chunks=2, sink_tokens=2, retrieval="normalized")
    o_ref, st_ref = chunk_bsbr_attention(*args, opt, fq=x["fq"], fk=x["fk"], gate=0, output_final_state=True)

    def refused(*a, **k):
        raise AssertionError("chunk weights built under a closed gate")

    monkeypatch.setattr(chunk, "state_weights", refused)
    o, st = chunk_bsbr_attention(*args, opt, fq=x["fq"], fk=x["fk"], gate=0, output_final_state=True)
    assert torch.equal(o, o_ref) and all(torch.equal(t, st_ref.tensors()[n]) for n, t in st.tensors().items())


@pytest.mark.parametrize("n,chunk,hq,hkv,L,S,K,variant", BLOCK_CASES)
def test_three_forms_agree_with_exact_blocks(n, chunk, hq, hkv, L, S, K, variant):
    x = with_far_keys(make_inputs(b=2, hq=hq, hkv=hkv, n=n, d=4, df=3, positive=True))
    kw = dict(chunk_size=chunk, local_chunks=L, sink_tokens=S, retrieval_blocks=K, retrieval=variant,
              gate=torch.linspace(0.2, 1.4, hq, dtype=DT))
    assert not torch.allclose(call(naive_bsbr_attention, x, **kw),
                              call(naive_bsbr_attention, x, **{**kw, "retrieval_blocks": 0}))
    assert_forms_agree(x, kw)


OWN_CASES = [  # (n, chunk, hq, hkv, local_chunks, sink_tokens, retrieval_blocks, own_position_chunks)
    (70, 8, 4, 2, 2, 3, 2, 3),  # blocks read one chunk past the window at own positions, older ones not
    (70, 8, 2, 2, 2, 10, 2, 5),  # sinks fill chunk 0 and part of chunk 1
    (41, 4, 3, 1, 3, 2, 50, 6),  # more blocks than chunks: the dense far part, split at own_from
    (70, 8, 2, 2, 2, 10, 9, 4),  # dense, chunk 0 all sinks
    (33, 1, 2, 1, 2, 1, 4, 7),  # every token is a chunk
    (70, 8, 2, 1, 1, 2, 3, 100),  # every far key at its own position
    (75, 8, 4, 2, 2, 3, 3, 6),  # L + K <= R: the first L + K chunks are one run of the window's buffer
]


@pytest.mark.parametrize("n,chunk,hq,hkv,L,S,K,R", OWN_CASES)
def test_three_forms_agree_with_far_keys_at_own_positions(n, chunk, hq, hkv, L, S, K, R):
    """Far keys fewer than ``own_position_chunks`` chunks back are read as q.k, older ones as qr.kr:
    the reference, chunked and streaming forms agree, padded, after a prefill and in gradients."""
    x = with_far_keys(make_inputs(b=2, hq=hq, hkv=hkv, n=n, d=4, df=3, positive=True))
    kw = dict(chunk_size=chunk, local_chunks=L, sink_tokens=S, retrieval_blocks=K, retrieval="normalized",
              gate=torch.linspace(0.2, 1.4, hq, dtype=DT), own_position_chunks=R)
    ref = call(naive_bsbr_attention, x, **kw)
    for other in (0, R + 1):  # the rule changes what is read (R + 1 only while some key lies R chunks back)
        if other == 0 or R + 1 < -(-n // chunk):
            assert not torch.allclose(ref, call(naive_bsbr_attention, x, **{**kw, "own_position_chunks": other}))
    if R * chunk >= n:  # every far key within reach: as if the far keys were the keys
        torch.testing.assert_close(ref, call(naive_bsbr_attention, dict(x, qr=x["q"], kr=x["k"]),
                                             **{**kw, "own_position_chunks": 0}), rtol=1e-10, atol=1e-10)
    assert_forms_agree(x, kw)
    assert_gradients_agree(x, kw)


def test_own_position_keys_are_a_ring_of_r_minus_one_chunks():
    """The streaming state keeps own-position keys only for the chunks a token may still read so (R - 1
    back at most): a prefill and a decode that go on for 12 chunks hold 2 of them (R = 3)."""
    x = with_far_keys(make_inputs(b=2, hq=2, hkv=1, n=96, d=4, df=3, positive=True))
    options = BSBROptions(8, local_chunks=2, retrieval_blocks=2, own_position_chunks=3)
    args = [x[n] for n in ("q", "k", "v", "mq", "mk")]
    extra = {n: x[n] for n in ("fq", "fk", "qr", "kr")}
    _, st = chunk_bsbr_attention(*(t[:, :, :50] for t in args), options, **{n: t[:, :, :50] for n, t in extra.items()},
                                 output_final_state=True)
    assert st.k_past.shape[2] == 2 and st.kr_past.shape[2] >= 6
    _, st = recurrent_bsbr_attention(*(t[:, :, 50:] for t in args), options,
                                     **{n: t[:, :, 50:] for n, t in extra.items()}, initial_state=st,
                                     output_final_state=True)
    assert st.k_past.shape[2] == 2 and st.kr_past.shape[2] >= 12
    torch.testing.assert_close(st.k_past[:, :, 11 % 2], x["k"][:, :, 88:96])  # the last chunk, in slot 11 mod 2
    torch.testing.assert_close(st.k_past[:, :, 10 % 2], x["k"][:, :, 80:88])


def test_own_position_chunks_inside_the_window_or_with_the_bounded_mode_is_refused():
    with pytest.raises(ValueError, match="own_position_chunks must be 0 or more than local_chunks"):
        BSBROptions(8, local_chunks=2, own_position_chunks=2)
    with pytest.raises(ValueError, match="own_position_chunks needs recall_tokens 0"):
        BSBROptions(8, local_chunks=2, recall_tokens=4, own_position_chunks=3)


def assert_gradients_agree(x, kw):
    """The three forms' gradients with respect to every input are equal (zero where an input is unread)."""
    grads = []
    for fn in (naive_bsbr_attention, chunk_bsbr_attention, recurrent_bsbr_attention):
        xs = {name: t.detach().clone().requires_grad_(True) for name, t in x.items()}
        o = call(fn, xs, **kw)
        (o * torch.randn(o.shape, generator=torch.Generator().manual_seed(3), dtype=DT)).sum().backward()
        grads.append([torch.zeros_like(t) if t.grad is None else t.grad for t in xs.values()])  # None: unread
    for other in grads[1:]:
        for a, b in zip(grads[0], other):
            torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-9)


def assert_forms_agree(x, kw):
    """The chunked and streaming forms equal the reference, alone and padded (padded = each sequence
    alone), and a chunked prefill continued by the streaming form equals the whole."""
    n, chunk = x["q"].shape[2], kw["chunk_size"]
    ref = call(naive_bsbr_attention, x, **kw)
    for fn in (chunk_bsbr_attention, recurrent_bsbr_attention):
        torch.testing.assert_close(call(fn, x, **kw), ref, rtol=1e-10, atol=1e-10)
    valid = torch.ones(2, n, dtype=torch.bool)
    valid[0, :5] = False
    valid[1, 9:12] = False
    full = call(naive_bsbr_attention, x, valid=valid, **kw)
    for b in range(2):
        alone = {k: t[b : b + 1][:, :, valid[b]] for k, t in x.items()}
        torch.testing.assert_close(full[b : b + 1][:, :, valid[b]], call(naive_bsbr_attention, alone, **kw),
                                   rtol=1e-10, atol=1e-10)
    for fn in (chunk_bsbr_attention, recurrent_bsbr_attention):
        torch.testing.assert_close(call(fn, x, valid=valid, **kw), full, rtol=1e-10, atol=1e-10)
    for cut in sorted({0, 3, chunk, n // 2 + 1, n - 1}):
        torch.testing.assert_close(prefill_then_stream(x, valid, cut, **kw), full[:, :, cut:], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("R", [6, 4])
def test_the_window_buffer_holds_every_chunk_only_while_they_are_one_run(R):
    """With L + K <= R the buffer holds every chunk so far while the context has at most L + K chunks (one
    attention call per step), then the window's L again; otherwise always L. Streaming and a chunked
    prefill agree on it."""
    B, L, K = 8, 2, 3
    x = with_far_keys(make_inputs(b=1, hq=2, hkv=1, n=60, d=4))
    options = BSBROptions(B, local_chunks=L, retrieval_blocks=K, own_position_chunks=R)
    names = ("q", "k", "v", "mq", "mk", "fq", "fk", "qr", "kr")
    state, seen = None, []
    for i in range(60):
        step = {n: x[n][:, :, i:i + 1] for n in names}
        _, state = recurrent_bsbr_attention(*(step[n] for n in names[:5]), options,
                                            **{n: step[n] for n in names[5:]}, initial_state=state,
                                            output_final_state=True)
        _, pre = chunk_bsbr_attention(*(x[n][:, :, :i + 1] for n in names[:5]), options,
                                      **{n: x[n][:, :, :i + 1] for n in names[5:]}, output_final_state=True)
        assert pre.k_buf.shape == state.k_buf.shape
        seen.append(state.k_buf.shape[2] // B)
    c = [(i + 1) // B for i in range(60)]  # the chunk of the next token
    want = [max(L, ci + 1) if ci < L + K else L for ci in c] if R >= L + K else [L] * 60
    assert seen == want


def test_block_scores_are_each_chunks_largest_logit_over_its_non_sink_keys():
    from bsbr.ops.bsbr.retrieval import block_scores

    g = torch.Generator().manual_seed(3)
    kr = torch.randn(2, 5, 6, 4, generator=g, dtype=DT)  # (h, C, B, d)
    qr = torch.randn(2, 7, 4, generator=g, dtype=DT)
    got = block_scores(qr, kr, 8)  # (h, T, C): chunk 0 is all sinks, chunk 1 holds two
    for h in range(2):
        for c in range(5):
            ks = kr[h, c, max(8 - 6 * c, 0):]
            want = (qr[h] @ ks.T).max(-1).values if len(ks) else torch.full((7,), float("-inf"), dtype=DT)
            torch.testing.assert_close(got[h, :, c], want)


def test_blocks_covering_every_earlier_chunk_are_full_causal_attention():
    """With as many blocks as chunks, every key before the window is read exactly: with the chunk-state
    gate closed and far keys = keys, the op is plain causal softmax attention."""
    n, B = 50, 8
    x = make_inputs(b=2, hq=4, hkv=2, n=n, d=4)
    k, v = (x[name].repeat_interleave(2, dim=1) for name in ("k", "v"))
    s = (x["q"] @ k.transpose(-1, -2) / 2.0).masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    want = torch.softmax(s, -1) @ v
    for L, S in ((1, 0), (2, 4)):
        kw = dict(chunk_size=B, local_chunks=L, sink_tokens=S, retrieval_blocks=n // B, gate=torch.zeros(1, dtype=DT))
        for fn in (naive_bsbr_attention, chunk_bsbr_attention, recurrent_bsbr_attention):
            torch.testing.assert_close(call(fn, x, **kw), want, rtol=1e-10, atol=1e-10)


def test_a_needle_is_found():
    """One key far back that matches the query strongly: its block is selected (its chunk's score is
    the needle's logit; a mean over the chunk could wash it out) and the output is its value."""
    n, B = 64, 8
    x = make_inputs(b=1, hq=1, hkv=1, n=n, d=8)
    for name in ("q", "k"):
        x[name] = x[name] * 0.1
    x["k"][0, 0, 13] = torch.full((8,), 3.0, dtype=DT)  # chunk 1
    x["v"][0, 0, 13] = 100.0
    x["q"][0, 0, -1] = torch.full((8,), 3.0, dtype=DT)
    for fn in (naive_bsbr_attention, chunk_bsbr_attention, recurrent_bsbr_attention):
        o = call(fn, x, chunk_size=B, local_chunks=2, retrieval_blocks=1, gate=torch.zeros(1, dtype=DT))
        assert o[0, 0, -1].min() > 90.0
        o0 = call(fn, x, chunk_size=B, local_chunks=2, retrieval_blocks=0, gate=torch.zeros(1, dtype=DT))
        assert o0[0, 0, -1].max() < 10.0


def test_a_needle_is_chosen_over_a_chunk_whose_key_bounds_look_better():
    """Chunk 1 holds one key (the needle) with q.k = 48; chunk 3 holds keys that each match half the
    query (q.k = 36) but whose per-dimension bounds would allow 72 (Quest's score picks it): the
    needle's chunk is read, in all three forms."""
    n, B, d = 48, 8, 8
    x = make_inputs(b=1, hq=1, hkv=1, n=n, d=d)
    for name in ("q", "k"):
        x[name] = x[name] * 0.01
    x["k"][0, 0, 12] = 2.0  # chunk 1, every dimension
    x["v"][0, 0, 12] = 100.0
    for t in range(24, 32):  # chunk 3: alternately the even and the odd dimensions
        x["k"][0, 0, t] = 0.0
        x["k"][0, 0, t, t % 2::2] = 3.0
    x["v"][0, 0, 24:32] = -100.0
    x["q"][0, 0, -1] = 3.0
    for fn in (naive_bsbr_attention, chunk_bsbr_attention, recurrent_bsbr_attention):
        kw = dict(chunk_size=B, local_chunks=2, retrieval_blocks=1, gate=torch.zeros(1, dtype=DT))
        assert call(fn, x, **kw)[0, 0, -1].min() > 90.0


def test_block_selection_is_causal_to_the_bit():
    x = with_far_keys(make_inputs(b=1, hq=2, hkv=1, n=60, d=4, positive=True))
    for R in (0, 4):
        assert_causal(x, (0, 7, 8, 20, 33, 59), chunk_size=8, local_chunks=2, sink_tokens=2, retrieval_blocks=2,
                      retrieval="normalized", gate=torch.tensor(0.7, dtype=DT), own_position_chunks=R)


@pytest.mark.parametrize("fn", [chunk_bsbr_attention, recurrent_bsbr_attention])
def test_a_sequence_of_padding_alone_outputs_zeros(fn):
    x = with_far_keys(make_inputs(b=2, hq=2, hkv=1, n=30, d=4, dv=4, positive=True))
    valid = torch.ones(2, 30, dtype=torch.bool)
    valid[1] = False
    for kw in (dict(retrieval_blocks=50, own_position_chunks=8), dict(retrieval_blocks=2, sink_tokens=2)):
        o = call(fn, x, valid=valid, chunk_size=2, local_chunks=3, retrieval="normalized", **kw)
        assert torch.equal(o[1], torch.zeros_like(o[1])) and torch.isfinite(o[0]).all()


def test_a_crowded_block_is_causal_to_the_bit():
    """Dozens of tokens select one chunk: a token's output must not depend on how many later tokens
    read the same block (with dv != d the blocks are read by plain matmuls, whose result for one row
    can depend on the row count)."""
    x = with_far_keys(make_inputs(b=1, hq=1, hkv=1, n=61, d=4, dv=5))
    x["kr"][0, 0, 4:8] += 3.0  # chunk 1's far keys stand out for queries along (1, 1, 1, 1)
    x["qr"][0, 0, 8:] += 3.0
    assert_causal(x, range(9, 61, 3), chunk_size=4, local_chunks=1, retrieval_blocks=1)


@pytest.mark.parametrize("dv", [7, 4])
def test_block_gradients_agree(dv):
    grads = []
    for fn in (naive_bsbr_attention, chunk_bsbr_attention, recurrent_bsbr_attention):
        xs = with_far_keys(make_inputs(b=1, hq=2, hkv=1, n=37, d=4, dv=dv, df=3, positive=True, requires_grad=True))
        o = call(fn, xs, chunk_size=6, local_chunks=2, sink_tokens=2, retrieval_blocks=2, retrieval="normalized",
                 gate=torch.tensor(0.5, dtype=DT))
        (o * torch.randn(o.shape, generator=torch.Generator().manual_seed(3), dtype=DT)).sum().backward()
        grads.append([t.grad for t in xs.values()])
    assert all(t is not None and t.abs().sum() > 0 for t in grads[0])
    for other in grads[1:]:
        for a, b in zip(grads[0], other):
            torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-9)


def test_exact_block_state_keeps_every_chunk():
    x = make_inputs(b=1, hq=2, hkv=2, n=256, d=4)
    _, st = chunk_bsbr_attention(x["q"], x["k"], x["v"], x["mq"], x["mk"], BSBROptions(32, retrieval_blocks=2),
                                 output_final_state=True)
    assert st.kr_past.shape[2:] == (8, 32, 4) and st.v_past.shape[2:] == (8, 32, 7)


@pytest.mark.parametrize("blocks", [0, 2])
def test_normalized_gist_mass(blocks):
    """Normalized state weights: weight one per earlier chunk without exact blocks (linear attention
    over the past); with blocks they sum to one over the chunks before the window, so the gist of the
    unselected chunks never outweighs one chunk however long the context."""
    from bsbr.ops.bsbr.retrieval import state_weights

    g = torch.Generator().manual_seed(0)
    C = 12
    r, h = torch.randn(C, 5, generator=g, dtype=DT), torch.randn(C, 5, generator=g, dtype=DT)
    c = torch.arange(C)
    allowed = c[None, :] <= c[:, None] - 2
    w = state_weights(r, h, allowed, BSBROptions(8, local_chunks=2, retrieval="normalized", retrieval_blocks=blocks))
    expect = allowed.sum(-1).to(DT) if blocks == 0 else allowed.any(-1).to(DT)
    torch.testing.assert_close(w.sum(-1), expect)
    assert torch.equal(w[~allowed], torch.zeros_like(w[~allowed]))


@pytest.mark.parametrize("fn", [naive_bsbr_attention, chunk_bsbr_attention, recurrent_bsbr_attention])
def test_gist_weighs_as_one_chunk_at_every_length(fn):
    """With exact blocks the chunk-state term is renormalised over the chunks a token does not read
    exactly. On a sequence that repeats one chunk (every state, block and meta-score equal), a token
    of the last chunk reads the same window, the same K blocks and a gist of the same mass at 12 and
    at 40 chunks, so its output is the same; weights that were not renormalised (a share that grows
    with the number of unselected chunks) change it."""
    B, K = 4, 2
    one = make_inputs(b=1, hq=2, hkv=1, n=B, d=4, df=3, positive=True)
    kw = dict(chunk_size=B, local_chunks=2, retrieval_blocks=K, retrieval="normalized", gate=torch.ones(2, dtype=DT))

    def last_chunk(C):
        x = {name: t.repeat(1, 1, C, 1) for name, t in one.items()}
        return call(fn, x, **kw)[:, :, -B:]

    short = last_chunk(12)
    torch.testing.assert_close(last_chunk(40), short, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(short, call(fn, {n: t.repeat(1, 1, 12, 1) for n, t in one.items()},
                                          **{**kw, "gate": torch.zeros(2, dtype=DT)})[:, :, -B:])


@pytest.mark.parametrize("fn", [naive_bsbr_attention, chunk_bsbr_attention, recurrent_bsbr_attention])
def test_an_empty_batch_gives_an_empty_output(fn):
    x = {k: t[:0] for k, t in make_inputs(b=2, n=11).items()}
    o = call(fn, x, chunk_size=4, local_chunks=2, sink_tokens=1, retrieval_blocks=1, retrieval="normalized",
             gate=torch.tensor(0.5, dtype=DT))
    assert o.shape == (0, 4, 11, 7)


def test_wrong_options_state_or_dtype_are_named():
    from bsbr.ops import bsbr_attention_step

    x = make_inputs(b=1, n=9)
    args = (x["q"], x["k"], x["v"], x["mq"], x["mk"])
    with pytest.raises(TypeError, match="options must be a bsbr.ops.BSBROptions"):
        chunk_bsbr_attention(*args, dict(chunk_size=4))
    with pytest.raises(TypeError, match="state must be None or a bsbr.ops.BSBRState"):
        recurrent_bsbr_attention(*args, BSBROptions(4), initial_state=123)
    _, st = chunk_bsbr_attention(*args, BSBROptions(4), output_final_state=True)
    with pytest.raises(TypeError, match="state holds torch.float64 tensors, the call has torch.float32"):
        bsbr_attention_step(*(t[:, :, 0].float() for t in args), st, BSBROptions(4))
    o, st2 = bsbr_attention_step(*(t[:0, :, 0] for t in args), None, BSBROptions(4))  # an empty batch
    assert o.shape == (0, 4, 7) and st2.n_seen.shape == (0,)


@pytest.mark.parametrize("variant", ["additive", "normalized"])
@pytest.mark.parametrize("L", [1, 2])
def test_open_gate_gist_written_out_by_hand(variant, L):
    """Gate open, no exact blocks: the window's softmax plus the chunk states weighed by the meta
    softmax (docs/design.md, sections 2, 3 and 5), written out chunk by chunk in plain loops, so a bug
    in the retrieval math the three forms share is caught here."""
    n, B, hq, hkv, g = 29, 4, 4, 2, 0.7
    x = make_inputs(b=1, hq=hq, hkv=hkv, n=n, d=3, dv=2, dm=5, df=3, positive=variant == "normalized")
    q, k, v, mq, mk, fq, fk = (x[name][0] for name in ("q", "k", "v", "mq", "mk", "fq", "fk"))
    want = torch.zeros(hq, n, 2, dtype=DT)
    for i in range(hq):
        j = i // (hq // hkv)  # the query head's K/V head
        for t in range(n):
            c = t // B
            window = [s for s in range(t + 1) if s // B > c - L]
            o = torch.softmax(torch.stack([q[i, t] @ k[j, s] for s in window]) / math.sqrt(3), 0) @ v[j, window]
            past = list(range(c - L + 1))  # chunks before the window
            num, den = torch.zeros(2, dtype=DT), torch.zeros((), dtype=DT)
            if past:
                r = mq[i, (c - 1) * B:c * B].mean(0)
                h = torch.stack([mk[j, p * B:(p + 1) * B].mean(0) for p in past])
                w = torch.softmax(h @ r / math.sqrt(5), 0) * (len(past) if variant == "normalized" else 1)
                for wp, p in zip(w, past):
                    for s in range(p * B, (p + 1) * B):
                        num = num + wp * (fq[i, t] @ fk[j, s]) * v[j, s]
                        den = den + wp * (fq[i, t] @ fk[j, s])
            want[i, t] = o + g * num if variant == "additive" else (o + g * num) / (1 + g * den)
    for fn in (naive_bsbr_attention, chunk_bsbr_attention, recurrent_bsbr_attention):
        got = call(fn, x, chunk_size=B, local_chunks=L, retrieval=variant, gate=torch.tensor([g], dtype=DT))
        torch.testing.assert_close(got[0], want, rtol=1e-10, atol=1e-10)


def test_the_gist_of_unselected_chunks_is_renormalised_to_one_with_a_floor_of_001():
    """gist_scale (docs/design.md): 1 / (total - picked), the unselected chunks' share, floored at 0.01 (a
    token that selected nearly all its chunk weight does not read the rest magnified past 100x); 0 where no
    chunk is left unread."""
    from bsbr.ops.bsbr.retrieval import gist_scale

    total = torch.tensor([1.0, 1.0, 1.0, 1.0], dtype=DT)
    picked = torch.tensor([0.5, 0.95, 0.995, 0.3], dtype=DT)
    got = gist_scale(total, picked, torch.tensor([True, True, True, False]))
    torch.testing.assert_close(got, torch.tensor([2.0, 20.0, 100.0, 0.0], dtype=DT), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("extra", [dict(retrieval_blocks=2, sink_tokens=2), dict(recall_tokens=3), {}])
def test_a_sequence_shorter_than_its_chunk_computes_no_padding(monkeypatch, extra):
    # a 5-token prompt padded to its chunk computed a (g*B, B) mask and scores: 4 GB in float64 at chunk 16384
    import bsbr.ops.bsbr.chunk as chunk_module

    seen = []
    real = chunk_module.attention_lse
    monkeypatch.setattr(chunk_module, "attention_lse", lambda q, k, *a, **kw: seen.append(k.shape[-2]) or real(q, k, *a, **kw))
    x = with_far_keys(make_inputs(b=2, hq=4, hkv=2, n=5, d=4, df=3, positive=True, requires_grad=True))
    kw = dict(local_chunks=2, retrieval="normalized", gate=torch.linspace(0.2, 1.4, 4, dtype=DT), **extra)
    o = call(chunk_bsbr_attention, x, chunk_size=4096, **kw)
    assert seen and max(seen) <= 5
    torch.testing.assert_close(o, call(naive_bsbr_attention, x, chunk_size=8, **kw), rtol=1e-10, atol=1e-10)
    o.sum().backward()
    assert all(x[n].grad is not None for n in "qkv")
    assert all(torch.isfinite(t.grad).all() for t in x.values() if t.grad is not None)


# ------------------------------------------------------------- inputs a direct caller may give (from a fuzz run)
FORMS = (naive_bsbr_attention, chunk_bsbr_attention, recurrent_bsbr_attention)


@pytest.mark.parametrize("name", ["q", "k", "v"])
def test_inputs_whose_last_dim_is_strided_give_the_same_outputs(name):
    # PyTorch's fused CPU kernel read x[..., ::2] as if contiguous (chunked and streaming were off by up to 4)
    g = torch.Generator().manual_seed(0)
    x = {nm: torch.randn(1, 1, 2, 2, generator=g, dtype=DT) for nm in ("q", "k", "v", "mq", "mk")}
    opt = BSBROptions(chunk_size=2)  # one chunk: every form's window is one fused call
    ref = naive_bsbr_attention(*x.values(), opt)[0]
    x[name] = torch.stack([x[name], -x[name]], -1)[..., 0]  # the same values, last-dim stride 2
    assert x[name].stride(-1) == 2
    for fn in FORMS:
        torch.testing.assert_close(fn(*x.values(), opt)[0], ref, rtol=0, atol=1e-12, msg=fn.__name__)


@pytest.mark.parametrize("gate", [None, torch.zeros(1, dtype=DT)])
def test_features_of_size_zero_with_sparse_blocks_in_every_form(gate):
    # (the chunked form failed to reshape 0 features when a token selected some of its earlier chunks)
    g = torch.Generator().manual_seed(1)
    q, k, v, mq, mk = (torch.randn(1, 1, 6, 2, generator=g, dtype=DT) for _ in range(5))
    f0 = torch.zeros(1, 1, 6, 0, dtype=DT)
    opt = BSBROptions(chunk_size=1, retrieval_blocks=1)
    ref = naive_bsbr_attention(q, k, v, mq, mk, opt, fq=f0, fk=f0, gate=gate)[0]
    for fn in FORMS[1:]:
        torch.testing.assert_close(fn(q, k, v, mq, mk, opt, fq=f0, fk=f0, gate=gate)[0], ref, msg=fn.__name__)


def test_large_finite_values_in_padding_reach_nothing():
    # padding's q.k overflowed in the chunked form: NaN at padded outputs (NaN times 0) and in real tokens' gradients
    g = torch.Generator().manual_seed(2)
    x = [torch.randn(1, 1, 6, 2, generator=g, dtype=DT) for _ in range(5)]
    valid = torch.tensor([[True, True, False, True, False, True]])
    for t in x:
        t[:, :, ~valid[0]] = 1e160
    opt = BSBROptions(chunk_size=2, local_chunks=2)
    ref = naive_bsbr_attention(*x, opt, valid=valid)[0]
    for fn in FORMS:
        inputs = [t.clone().requires_grad_() for t in x]
        o = fn(*inputs, opt, valid=valid)[0]
        assert torch.equal(o[:, :, ~valid[0]], torch.zeros_like(o[:, :, ~valid[0]]).abs()), fn.__name__
        torch.testing.assert_close(o, ref, msg=fn.__name__)
        o[:, :, valid[0]].sum().backward()
        assert all(torch.isfinite(t.grad[:, :, valid[0]]).all() for t in inputs), fn.__name__


@pytest.mark.parametrize("fn", [naive_bsbr_attention, chunk_bsbr_attention, recurrent_bsbr_attention])
def test_normalized_with_an_open_gate_needs_the_features_given(fn):
    # the default features are q and k, signed: the shared denominator 1 + g fq.z could reach 0 and the
    # output grow past every value (|o| 148 against |v| 3 before this was refused)
    x = make_inputs(n=20)
    opt = BSBROptions(chunk_size=4, retrieval="normalized")
    base = {n: x[n] for n in ("q", "k", "v", "mq", "mk")}
    for gate in (None, torch.tensor(0.5, dtype=DT)):
        for missing in ("fq", "fk"):
            given = {n: x[n] for n in ("fq", "fk") if n != missing}
            with pytest.raises(ValueError, match="retrieval 'normalized' .* pass fq and fk"):
                fn(*base.values(), opt, gate=gate, **given)
    o, _ = fn(*base.values(), opt, gate=0)  # a closed gate reads no feature
    assert torch.isfinite(o).all()


def test_a_python_float_gate_is_refused_naming_what_is_taken():
    x = make_inputs(n=8)
    with pytest.raises(TypeError, match=r"gate must be None, 0 \(closed\), a 0-dim tensor or a tensor of shape \(4,\)"):
        chunk_bsbr_attention(*(x[n] for n in ("q", "k", "v", "mq", "mk")), BSBROptions(chunk_size=4), gate=0.5)


def test_the_reference_recall_mode_does_not_warn_under_autograd():
    import warnings
    x = make_inputs(n=24, positive=True, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        o, _ = naive_bsbr_attention(*(x[n] for n in ("q", "k", "v", "mq", "mk")),
                                    BSBROptions(chunk_size=4, recall_tokens=3, retrieval="normalized"),
                                    fq=x["fq"], fk=x["fk"])
    o.sum().backward()


def test_zero_heads_no_value_dim_other_devices_and_truthy_flags_are_named():
    """Zero query heads killed the process in the fused kernel (Fatal Python error); a value dim of 0 failed
    in the chunked form alone; a tensor on another device got torch's words, naming no argument;
    output_final_state="no" returned a state."""
    from bsbr.ops import BSBROptions, chunk_bsbr_attention, recurrent_bsbr_attention

    opt = BSBROptions(chunk_size=3, local_chunks=2)
    q, k, v = torch.randn(1, 2, 7, 4), torch.randn(1, 2, 7, 4), torch.randn(1, 2, 7, 3)
    for op in (chunk_bsbr_attention, recurrent_bsbr_attention):
        with pytest.raises(ValueError, match="q needs at least one head"):
            op(q[:, :0], k, v, q[:, :0], k, opt)
        with pytest.raises(ValueError, match="v needs a value dim of at least 1"):
            op(q, k, v[..., :0], q, k, opt)
        with pytest.raises(ValueError, match=r"on q's device \(cpu\), got k on meta"):
            op(q, k.to("meta"), v, q, k, opt)
        with pytest.raises(ValueError, match=r"valid on meta"):
            op(q, k, v, q, k, opt, valid=torch.ones(1, 7, dtype=torch.bool, device="meta"))
        with pytest.raises(ValueError, match="output_final_state must be True or False"):
            op(q, k, v, q, k, opt, output_final_state="no")


def test_a_state_forks_on_any_integer_index():
    # a uint8 or int16 index reached index_select, which takes int64 or int32 only
    from bsbr.ops import BSBROptions, chunk_bsbr_attention

    q = torch.randn(2, 2, 7, 4)
    _, state = chunk_bsbr_attention(q, q, q, q, q, BSBROptions(chunk_size=3), output_final_state=True)
    for dtype in (torch.uint8, torch.int16, torch.int32):
        assert state.select(torch.tensor([1, 0], dtype=dtype)).n_seen.tolist() == [7, 7]


@pytest.mark.parametrize("variant", ["additive", "normalized"])
def test_float32_steps_read_the_chunks_of_sinks_alone_as_precisely_as_the_forward(variant):
    """With every candidate read exactly, the gist left is that of the chunks holding sinks alone; the step took
    it as the read-out of every chunk minus the selected ones, cancelling float32 digits (model logits 1e-4 to
    2e-3 off the forward's)."""
    x = make_inputs(b=1, hq=2, hkv=1, n=120, positive=variant == "normalized", seed=3)
    x["mq"], x["mk"] = x["mq"] * 3, x["mk"] * 3  # (peaked chunk weights: the sinks' chunks get a small share)
    kw = dict(chunk_size=2, local_chunks=2, sink_tokens=4, retrieval_blocks=64, retrieval=variant)
    truth = call(chunk_bsbr_attention, x, **kw)
    x32 = {name: t.float() for name, t in x.items()}
    for fn in (chunk_bsbr_attention, recurrent_bsbr_attention):
        err = (call(fn, x32, **kw).double() - truth).abs().max() / truth.abs().max()
        assert err < 5e-6, (fn.__name__, float(err))  # (the old step: 7e-5 and 1.6e-4)


def test_the_input_checks_memory_stays_bounded_over_many_shapes():
    # each new sequence length is one more remembered signature: a server seeing every prompt length kept them all
    from bsbr.ops.bsbr import inputs

    o = BSBROptions(4)
    for n in range(1, 1100):
        chunk_bsbr_attention(*[torch.randn(1, 1, n, 2) for _ in range(5)], o)
    assert 0 < len(inputs._CHECKED) <= 1024
