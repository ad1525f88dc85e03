"""The bounded recall mode (``recall_tokens``): the three forms agree (float64, gradients), it is
causal, a cache holding everything with a closed gate is causal softmax attention, streaming
continues a chunked prefill, the streaming state never grows, and an outlier token stays cached."""
import pytest
import torch
import torch.nn.functional as F

from bsbr.ops import (BSBROptions, bsbr_attention_step, chunk_bsbr_attention, naive_bsbr_attention,
                      recurrent_bsbr_attention)
from bsbr.ops.bsbr.recall import keep_largest

DT = torch.float64
FORMS = (naive_bsbr_attention, chunk_bsbr_attention, recurrent_bsbr_attention)


def make(b=2, hq=4, hkv=2, n=45, d=5, dv=6, df=4, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)

    def r(*s):
        return torch.randn(*s, generator=g, dtype=DT)

    x = dict(q=r(b, hq, n, d), k=r(b, hkv, n, d), v=r(b, hkv, n, dv), mq=r(b, hq, n, 3), mk=r(b, hkv, n, 3),
             fq=r(b, hq, n, df).exp() * 0.3, fk=r(b, hkv, n, df).exp() * 0.3, qr=r(b, hq, n, d), kr=r(b, hkv, n, d))
    if requires_grad:
        for t in x.values():
            t.requires_grad_(True)
    return x


def run(fn, x, options, **kw):
    return fn(x["q"], x["k"], x["v"], x["mq"], x["mk"], options, fq=x["fq"], fk=x["fk"], qr=x["qr"], kr=x["kr"], **kw)


CASES = [
    # (n, chunk, local_chunks, sinks, M, hq, hkv, retrieval, padded)
    (45, 4, 2, 3, 5, 4, 2, "normalized", True),
    (45, 4, 1, 0, 3, 2, 2, "additive", False),
    (40, 5, 3, 2, 12, 6, 3, "normalized", True),  # a cache larger than a chunk
    (9, 4, 2, 1, 2, 2, 1, "normalized", False),  # the window never fills
    (30, 1, 2, 0, 4, 2, 1, "additive", True),  # every token is a chunk
]


@pytest.mark.parametrize("n,chunk,L,S,M,hq,hkv,variant,padded", CASES)
def test_three_forms_agree(n, chunk, L, S, M, hq, hkv, variant, padded):
    x = make(hq=hq, hkv=hkv, n=n, seed=n + M)
    options = BSBROptions(chunk, local_chunks=L, sink_tokens=S, recall_tokens=M, retrieval=variant)
    valid = None
    if padded:
        valid = torch.ones(2, n, dtype=torch.bool)
        valid[1, :4] = False
        valid[0, n // 2] = False
    gate = torch.rand(hq, dtype=DT, generator=torch.Generator().manual_seed(1)) + 0.2
    ref, o_c, o_r = (run(fn, x, options, gate=gate, valid=valid)[0] for fn in FORMS)
    torch.testing.assert_close(o_c, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(o_r, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("fn", FORMS)
def test_garbage_in_padded_positions_reaches_nothing(fn):
    # (design.md: a NaN there changes nothing; in the bounded mode a padded token must not reach a slot)
    n = 45
    x = make(hq=4, hkv=2, n=n, seed=50)
    options = BSBROptions(4, local_chunks=2, sink_tokens=3, recall_tokens=5, retrieval="normalized")
    valid = torch.ones(2, n, dtype=torch.bool)
    valid[1, :9] = False
    valid[0, n // 2] = False
    gate = torch.full((4,), 0.7, dtype=DT)
    o = run(fn, x, options, gate=gate, valid=valid)[0]
    for garbage in (1e3, float("nan"), float("inf")):
        y = {k: t.clone() for k, t in x.items()}
        for t in y.values():
            t[~valid[:, None, :].expand(-1, t.shape[1], -1)] = garbage
        assert torch.equal(run(fn, y, options, gate=gate, valid=valid)[0], o), garbage


@pytest.mark.parametrize("variant", ["normalized", "additive"])
@pytest.mark.parametrize("dv", [6, 5])  # 5: the head dim, where the CPU forward would use the fused kernel
def test_gradients_chunked_equal_reference(variant, dv):
    options = BSBROptions(4, local_chunks=2, sink_tokens=2, recall_tokens=4, retrieval=variant)
    grads = []
    for fn in FORMS[:2]:
        x = make(n=29, dv=dv, seed=3, requires_grad=True)
        gate = torch.full((4,), 0.6, dtype=DT, requires_grad=True)
        o = run(fn, x, options, gate=gate)[0]
        (o * torch.linspace(-1, 1, o.numel(), dtype=DT).view(o.shape)).sum().backward()
        grads.append([t.grad for t in x.values()] + [gate.grad])
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("fn", FORMS, ids=["naive", "chunk", "recurrent"])
def test_causal_bit_identical(fn):
    options = BSBROptions(4, local_chunks=2, sink_tokens=2, recall_tokens=3, retrieval="normalized")
    x = make(n=40, seed=5)
    base = run(fn, x, options)[0]
    for p in (9, 23, 39):
        y = {name: t.clone() for name, t in x.items()}
        for t in y.values():
            t[:, :, p] += 5.0  # every input of token p changes
        o = run(fn, y, options)[0]
        assert torch.equal(o[:, :, :p], base[:, :, :p]), f"token {p} changed an earlier output"
        assert not torch.equal(o[:, :, p], base[:, :, p])


def test_cache_holding_everything_with_closed_gate_is_causal_attention():
    n, hq, hkv = 50, 4, 2
    x = make(hq=hq, hkv=hkv, n=n, seed=7)
    x["qr"], x["kr"] = x["q"], x["k"]  # far keys at their own positions
    options = BSBROptions(4, local_chunks=2, sink_tokens=3, recall_tokens=n, retrieval="normalized")
    want = F.scaled_dot_product_attention(x["q"], x["k"].repeat_interleave(2, 1), x["v"].repeat_interleave(2, 1),
                                          is_causal=True)
    for fn in FORMS:
        o = run(fn, x, options, gate=torch.zeros(hq, dtype=DT))[0]
        torch.testing.assert_close(o, want, rtol=1e-10, atol=1e-10)


def test_streaming_continues_a_chunked_prefill():
    options = BSBROptions(4, local_chunks=2, sink_tokens=2, recall_tokens=5, retrieval="normalized")
    x = make(n=50, seed=11)
    valid = torch.ones(2, 50, dtype=torch.bool)
    valid[1, :7] = False  # left padding
    full = run(chunk_bsbr_attention, x, options, valid=valid)[0]
    for cut in (3, 21, 24):
        head = {k: t[:, :, :cut] for k, t in x.items()}
        tail = {k: t[:, :, cut:] for k, t in x.items()}
        o1, st = run(chunk_bsbr_attention, head, options, valid=valid[:, :cut], output_final_state=True)
        o2, _ = run(recurrent_bsbr_attention, tail, options, valid=valid[:, cut:], initial_state=st)
        torch.testing.assert_close(torch.cat([o1, o2], 2), full, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("steps", [300, pytest.param(10_000, marks=pytest.mark.slow)])
def test_streaming_state_is_constant_over_many_steps(steps):
    options = BSBROptions(4, recall_tokens=3, retrieval="normalized")
    hq, hkv, d = 2, 1, 4
    g = torch.Generator().manual_seed(0)
    xq, xk = torch.randn(steps, 4, 1, hq, d, generator=g), torch.randn(steps, 4, 1, hkv, d, generator=g)
    state, sizes = None, set()
    with torch.inference_mode():
        for i in range(steps):
            q, mq, fq, _ = xq[i]
            k, v, mk, fk = xk[i]
            o, state = bsbr_attention_step(q, k, v, mq, mk, state, options, fq=fq.exp(), fk=fk.exp())
            if i >= options.window:
                sizes.add(tuple((name, tuple(t.shape)) for name, t in state.tensors().items()) + (state.nbytes(),))
    assert len(sizes) == 1, "the streaming state changed size"
    assert int(state.n_seen) == steps and bool(state.recall_on.all()) and bool(torch.isfinite(o).all())
    assert state.F_past.shape[2] == 0  # no per-chunk arrays
    # nor the running sums of the current chunk's state and what it reads from the others (kept at full size,
    # never written or read: 12 of SmolLM2's 98 MB bounded cache)
    assert [state.tensors()[n].numel() for n in ("F_cur", "z_cur", "S_cur", "zS_cur")] == [0] * 4
    assert state.feature_size == 4


def test_needle_is_kept_and_found():
    """A token whose value the state cannot recall (an outlier among ordinary values) stays in the cache
    chunk after chunk, and a query matching its far key reads it exactly."""
    B, M, n, needle = 4, 4, 80, 9
    x = make(b=1, hq=2, hkv=1, n=n, seed=13)
    x["v"] = x["v"] * 0.1
    x["v"][:, :, needle] = 10.0
    x["kr"][:, :, needle] = 0.0
    x["kr"][:, :, needle, 0] = 8.0  # a far key no other key resembles
    x["qr"][:, :, -1] = 0.0
    x["qr"][:, :, -1, 0] = 8.0  # the last query asks for it
    options = BSBROptions(B, local_chunks=2, sink_tokens=1, recall_tokens=M, retrieval="normalized")
    o, st = run(chunk_bsbr_attention, x, options, gate=torch.zeros(2, dtype=DT), output_final_state=True)
    assert needle in st.recall_pos[0, 0].tolist()
    torch.testing.assert_close(o[0, :, -1], torch.full((2, 6), 10.0, dtype=DT), rtol=0, atol=1e-3)


def test_ties_keep_the_later_token():
    err = torch.tensor([1.0, 2.0, 2.0, 0.5, 2.0])
    pos = torch.tensor([3, 7, 9, 1, 8])
    cand = torch.tensor([True, True, True, True, False])
    idx, kept = keep_largest(err, pos, cand, torch.eye(5), 3)
    assert idx.tolist() == [2, 1, 0] and kept.all()


@pytest.mark.parametrize("case", ["tie", "zero feature"])
def test_the_three_forms_keep_the_same_token_on_a_tie_and_on_a_zero_feature(case):
    """The reference ranks recall errors by its own code (not keep_largest): on a tie it keeps the later token as the
    others do, and a token of all-zero features (0/0 under the normalized form: ReLU-like maps) ranks first."""
    if case == "tie":  # tokens 4 and 5 (one chunk) of equal features and values: equal errors, the largest
        x, chunk = make(b=1, hq=1, hkv=1, n=12, seed=3), 2
        for name in ("fk", "v"):
            x[name][:, :, 5] = x[name][:, :, 4]
        x["v"][:, :, 4:6] *= 20
    else:
        x, chunk = make(b=1, hq=1, hkv=1, n=16, seed=3), 4
        x["fk"][:, :, 5] = 0.0
    options = BSBROptions(chunk, local_chunks=1, recall_tokens=1, retrieval="normalized")
    gate = torch.ones(1, dtype=DT)
    ref, o_c, o_r = (run(fn, x, options, gate=gate)[0] for fn in FORMS)
    torch.testing.assert_close(o_c, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(o_r, ref, rtol=1e-10, atol=1e-10)
    if case == "tie":
        st = run(chunk_bsbr_attention, x, options, gate=gate, output_final_state=True)[1]
        assert st.recall_pos[0, 0].tolist() == [5]  # the later of the two


def test_a_near_duplicate_is_a_value_at_cosine_above_095_with_one_ranked_before():
    """The threshold (docs/design.md, 5b): a value at cosine 0.97 with a worse-recalled one waits for the slots
    left; one at 0.9 (the digits of a number differ about so) is kept in its turn."""
    for cosine, want in ((0.97, [0, 2]), (0.9, [0, 1])):
        v = torch.tensor([[1.0, 0.0], [cosine, (1 - cosine ** 2) ** 0.5], [0.0, 1.0]])
        idx, kept = keep_largest(torch.tensor([3.0, 2.0, 1.0]), torch.arange(3), torch.ones(3, dtype=torch.bool), v, 2)
        assert idx.tolist() == want and kept.all(), cosine


def test_options_refuse_recall_with_blocks():
    with pytest.raises(ValueError, match="exclusive"):
        BSBROptions(8, retrieval_blocks=2, recall_tokens=4)
    with pytest.raises(ValueError, match="recall_tokens"):
        BSBROptions(8, recall_tokens=-1)


def test_near_duplicates_leave_room_for_other_tokens():
    """Five tokens share nearly one value that the state recalls badly; the cache keeps one of them,
    then the next worst-recalled tokens, and the three forms agree on which."""
    B, M, n = 4, 3, 48
    x = make(b=1, hq=2, hkv=1, n=n, seed=21)
    x["v"] = x["v"] * 0.1
    g = torch.Generator().manual_seed(5)
    copies, other = [9, 14, 18, 23, 27], 30
    for j in copies:
        x["v"][0, 0, j] = 10.0 + 0.3 * torch.randn(6, generator=g, dtype=DT)  # cosine > 0.99 with each other
    x["v"][0, 0, other] = torch.tensor([5.0, -5.0, 5.0, -5.0, 5.0, -5.0], dtype=DT)
    options = BSBROptions(B, local_chunks=2, sink_tokens=1, recall_tokens=M, retrieval="normalized")
    gate = torch.full((2,), 0.5, dtype=DT)
    _, st = run(chunk_bsbr_attention, x, options, gate=gate, output_final_state=True)
    held = st.recall_pos[0, 0].tolist()
    assert sum(j in held for j in copies) == 1 and other in held and bool(st.recall_on.all())
    ref, o_c, o_r = (run(fn, x, options, gate=gate)[0] for fn in FORMS)
    torch.testing.assert_close(o_c, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(o_r, ref, rtol=1e-10, atol=1e-10)


def test_a_recall_budget_past_the_limit_is_refused_where_it_is_set(tmp_path, capsys):
    # choosing the cache compares every pair of candidates: a budget of a million converted, then tried to
    # allocate a terabyte at the model's first token
    from bsbr.cli import main
    from bsbr.numbers import MAX_RECALL_TOKENS

    BSBROptions(4, recall_tokens=MAX_RECALL_TOKENS)
    with pytest.raises(ValueError, match="recall_tokens must be at most 4,096"):
        BSBROptions(4, recall_tokens=MAX_RECALL_TOKENS + 1)
    assert main(["convert", "unused", str(tmp_path / "out"), "--recall-tokens", "1048576"]) == 2
    assert "--recall-tokens: must be an integer from 0 to 4,096" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_prefill_without_autograd_keeps_one_cache_not_one_per_chunk():
    # every chunk's copy of the M-slot cache was stacked into one (b, hkv, C, M, d) array: at 64k tokens, chunk
    # 16, M = 256 and head dim 32, 1.74 GB for one small layer (241 MB now)
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    Largest.numel = max(Largest.numel, t.numel())
            return out

    b, h, n, d, B, M = 1, 1, 2048, 4, 8, 64
    x = [torch.randn(b, h, n, d, dtype=DT) for _ in range(5)]
    with torch.no_grad(), Largest():
        chunk_bsbr_attention(*x, BSBROptions(chunk_size=B, local_chunks=2, recall_tokens=M), gate=0)
    assert Largest.numel < (n // B) * M * d // 4, Largest.numel  # (the input itself: n * d)
