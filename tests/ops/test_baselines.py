"""Baseline ops (sliding window, linear attention, DeltaNet, Hopfield, GAU): each reference form equals
its fast form(s) in float64 for odd lengths and head dims, gradients included; all are causal; padding
masks mask; bad inputs raise."""
import pytest
import torch
import torch.nn.functional as F

from bsbr.ops.deltanet import chunk_delta_rule, naive_delta_rule
from bsbr.ops.gau import chunk_gau_attention, naive_gau_attention
from bsbr.ops.hopfield import chunk_hopfield_attention, naive_hopfield_attention
from bsbr.ops.linear_attn import chunk_linear_attention, naive_linear_attention, recurrent_linear_attention
from bsbr.ops.sliding_window import chunk_sliding_window_attention, naive_sliding_window_attention

DT = torch.float64
TOL = dict(rtol=1e-10, atol=1e-10)
LENGTHS = [1, 17, 64, 65, 200]


def make(n, d=6, dv=5, b=2, h=3, seed=0):
    """Inputs of every op: q, k, v, beta, all float64 leaf tensors with gradients."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, n, d, generator=g, dtype=DT)
    k = torch.randn(b, h, n, d, generator=g, dtype=DT)
    v = torch.randn(b, h, n, dv, generator=g, dtype=DT)
    beta = torch.rand(b, h, n, generator=g, dtype=DT)
    return [t.requires_grad_(True) for t in (q, k, v, beta)]


def prepare(op_name, q, k, v, beta):
    """Map raw random inputs to what each op expects (differentiably, so gradients reach the leaves)."""
    if op_name == "linear":  # positive features, as the layer's elu + 1 gives
        return (F.elu(q) + 1, F.elu(k) + 1, v), {}
    if op_name == "deltanet":  # unit keys, as in the layer
        return (q, F.normalize(k, dim=-1), v, beta), {}
    return (q, k, v), {}


# op name -> (reference, [(fast form, extra kwargs), ...], kwargs shared by all forms)
OPS = {
    "sliding_window": (naive_sliding_window_attention,
                       [(chunk_sliding_window_attention, {})], {"window_size": 16}),
    "sliding_window_w1": (naive_sliding_window_attention,
                          [(chunk_sliding_window_attention, {})], {"window_size": 1}),
    "sliding_window_w7": (naive_sliding_window_attention,
                          [(chunk_sliding_window_attention, {})], {"window_size": 7}),
    "linear": (naive_linear_attention,
               [(chunk_linear_attention, {"chunk_size": 16}), (chunk_linear_attention, {"chunk_size": 64}),
                (recurrent_linear_attention, {})], {}),
    "linear_unnormalized": (naive_linear_attention,
                            [(chunk_linear_attention, {"chunk_size": 16})], {"normalize": False}),
    "deltanet": (naive_delta_rule,
                 [(chunk_delta_rule, {"chunk_size": 16}), (chunk_delta_rule, {"chunk_size": 64})], {}),
    "hopfield": (naive_hopfield_attention, [(chunk_hopfield_attention, {})], {"num_steps": 3, "beta": 0.6}),
    "gau": (naive_gau_attention, [(chunk_gau_attention, {"block_size": 16})], {}),
}


def base_name(name):
    return "linear" if name.startswith("linear") else name


def outputs_and_grads(fn, name, n, d, kw, seed=0):
    leaves = make(n, d=d, seed=seed)
    args, _ = prepare(base_name(name), *leaves)
    o = fn(*args, **kw)[0]
    w = torch.randn(o.shape, generator=torch.Generator().manual_seed(1), dtype=DT)
    grads = torch.autograd.grad((o * w).sum(), leaves, allow_unused=True)
    return o, grads


@pytest.mark.parametrize("name", list(OPS))
@pytest.mark.parametrize("n", LENGTHS)
def test_reference_equals_fast_forms_with_grads(name, n):
    ref_fn, fast, kw = OPS[name]
    d = 5 if n % 2 else 6  # non-power-of-two head dims, odd and even
    if name == "linear" and n == 200:
        fast = fast[:2]  # the token loop is slow in Python; 65 tokens already cover it
    o_ref, g_ref = outputs_and_grads(ref_fn, name, n, d, kw)
    for fn, extra in fast:
        o, g = outputs_and_grads(fn, name, n, d, {**kw, **extra})
        torch.testing.assert_close(o, o_ref, **TOL)
        for a, b in zip(g, g_ref):
            if b is None:
                assert a is None
            else:
                torch.testing.assert_close(a, b, **TOL)


ALL_FORMS = [(name, fn, {**OPS[name][2], **extra}) for name in OPS
             for fn, extra in [(OPS[name][0], {})] + OPS[name][1]]


@pytest.mark.parametrize("name,fn,kw", ALL_FORMS, ids=[f"{n}-{f.__name__}" for n, f, _ in ALL_FORMS])
def test_causal(name, fn, kw):
    """Changing token t changes no output before t, exactly."""
    n, t = 40, 23
    q, k, v, beta = (x.detach() for x in make(n))
    args, _ = prepare(base_name(name), q, k, v, beta)
    o1 = fn(*args, **kw)[0]
    q2, k2, v2, beta2 = (x.clone() for x in (q, k, v, beta))
    for x in (q2, k2, v2):
        x[:, :, t:] += 3.0 * torch.randn_like(x[:, :, t:])
    beta2[:, :, t:] = torch.rand_like(beta2[:, :, t:])
    args2, _ = prepare(base_name(name), q2, k2, v2, beta2)
    o2 = fn(*args2, **kw)[0]
    assert torch.equal(o1[:, :, :t], o2[:, :, :t])
    assert not torch.equal(o1[:, :, t:], o2[:, :, t:])


def test_sliding_window_is_local_and_full_window_is_softmax_attention():
    q, k, v, _ = (x.detach() for x in make(50))
    full = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(chunk_sliding_window_attention(q, k, v, window_size=50)[0], full, **TOL)
    torch.testing.assert_close(chunk_sliding_window_attention(q, k, v, window_size=1000)[0], full, **TOL)
    # a token further back than the window changes nothing
    o1 = chunk_sliding_window_attention(q, k, v, window_size=8)[0]
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 10] += 5.0
    v2[:, :, 10] += 5.0
    o2 = chunk_sliding_window_attention(q, k2, v2, window_size=8)[0]
    assert torch.equal(o1[:, :, 18:], o2[:, :, 18:])
    assert not torch.equal(o1[:, :, 10:18], o2[:, :, 10:18])


def test_hopfield_one_step_is_softmax_attention():
    q, k, v, _ = (x.detach() for x in make(33))
    full = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(naive_hopfield_attention(q, k, v, num_steps=1)[0], full, **TOL)
    beta = torch.tensor([0.3, 1.0, 2.0], dtype=DT)
    torch.testing.assert_close(chunk_hopfield_attention(q, k, v, beta=beta)[0],
                               F.scaled_dot_product_attention(q * beta.view(1, 3, 1, 1), k, v, is_causal=True,
                                                              scale=1.0), **TOL)


def test_states_continue_a_sequence():
    """Chunked forms with output_final_state / initial_state: two halves = one call."""
    q, k, v, beta = (x.detach() for x in make(57))
    fq, fk = F.elu(q) + 1, F.elu(k) + 1
    o, S = chunk_linear_attention(fq, fk, v, chunk_size=8, output_final_state=True)
    o1, s1 = chunk_linear_attention(fq[:, :, :30], fk[:, :, :30], v[:, :, :30], chunk_size=8, output_final_state=True)
    o2, s2 = recurrent_linear_attention(fq[:, :, 30:], fk[:, :, 30:], v[:, :, 30:], initial_state=s1,
                                        output_final_state=True)
    torch.testing.assert_close(torch.cat([o1, o2], 2), o, **TOL)
    torch.testing.assert_close(s2[0], S[0], **TOL)
    torch.testing.assert_close(s2[1], S[1], **TOL)
    kn = F.normalize(k, dim=-1)
    o, S = chunk_delta_rule(q, kn, v, beta, chunk_size=16, output_final_state=True)
    o1, s1 = chunk_delta_rule(q[:, :, :30], kn[:, :, :30], v[:, :, :30], beta[:, :, :30], chunk_size=16,
                              output_final_state=True)
    o2, s2 = naive_delta_rule(q[:, :, 30:], kn[:, :, 30:], v[:, :, 30:], beta[:, :, 30:], initial_state=s1,
                              output_final_state=True)
    torch.testing.assert_close(torch.cat([o1, o2], 2), o, **TOL)
    torch.testing.assert_close(s2, S, **TOL)


def test_delta_rule_with_beta_one_stores_exactly():
    """With beta = 1 and orthonormal keys, a stored value is read back exactly by its key."""
    d = 6
    keys = torch.eye(d, dtype=DT)[None, None]  # (1, 1, d, d)
    v = torch.randn(1, 1, d, 4, dtype=DT)
    o, S = naive_delta_rule(keys, keys, v, torch.ones(1, 1, d, dtype=DT), scale=1.0, output_final_state=True)
    torch.testing.assert_close(S[0, 0], v[0, 0], **TOL)
    # writing a new value at an old key replaces it (the delta rule), rather than adding to it
    o2, S2 = chunk_delta_rule(keys[:, :, :1], keys[:, :, :1], v[:, :, 1:2], torch.ones(1, 1, 1, dtype=DT),
                              scale=1.0, initial_state=S, output_final_state=True)
    torch.testing.assert_close(S2[0, 0, 0], v[0, 0, 1], **TOL)


PADDED = [
    ("sliding_window", naive_sliding_window_attention, chunk_sliding_window_attention, {"window_size": 8}),
    ("hopfield", naive_hopfield_attention, chunk_hopfield_attention, {"num_steps": 2}),
    ("gau", naive_gau_attention, chunk_gau_attention, {}),
]


@pytest.mark.parametrize("name,ref,fast,kw", PADDED, ids=[p[0] for p in PADDED])
def test_padding_mask(name, ref, fast, kw):
    """Reference = fast form with a padding mask; padded keys change nothing; padded outputs are 0."""
    q, k, v, _ = (x.detach() for x in make(37))
    valid = torch.ones(2, 37, dtype=torch.bool)
    valid[0, :6] = False  # left padding
    valid[1, 20:23] = False  # a hole
    o = fast(q, k, v, valid=valid, **kw)[0]
    torch.testing.assert_close(o, ref(q, k, v, valid=valid, **kw)[0], **TOL)
    assert torch.equal(o[0, :, :6], torch.zeros_like(o[0, :, :6]))
    k2, v2 = k.clone(), v.clone()
    k2[~valid[:, None, :].expand(-1, 3, -1)] = 7.0
    v2[~valid[:, None, :].expand(-1, 3, -1)] = -7.0
    torch.testing.assert_close(fast(q, k2, v2, valid=valid, **kw)[0], o, **TOL)
    if name == "gau":  # GAU on the real tokens alone = GAU on the padded sequence (left padding)
        alone = fast(q[:1, :, 6:], k[:1, :, 6:], v[:1, :, 6:], **kw)[0]
        torch.testing.assert_close(o[:1, :, 6:], alone, **TOL)


def test_bad_inputs():
    q, k, v, beta = (x.detach() for x in make(10))
    with pytest.raises(ValueError, match="window_size"):
        chunk_sliding_window_attention(q, k, v, window_size=0)
    with pytest.raises(ValueError, match="window_size"):
        naive_sliding_window_attention(q, k, v, window_size=2.5)
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        chunk_linear_attention(q.numpy(), k, v)
    with pytest.raises(ValueError, match="k must have the shape of q"):
        chunk_linear_attention(q, k[:, :, :5], v)
    with pytest.raises(ValueError, match="4 dims"):
        chunk_gau_attention(q[0], k[0], v[0])
    with pytest.raises(TypeError, match="one dtype"):
        chunk_hopfield_attention(q, k.float(), v)
    with pytest.raises(TypeError, match="floating point"):
        naive_gau_attention(q.long(), k.long(), v.long())
    with pytest.raises(ValueError, match="chunk_size"):
        chunk_linear_attention(q, k, v, chunk_size=0)
    with pytest.raises(ValueError, match="beta must have shape"):
        chunk_delta_rule(q, k, v, beta[:, :1])
    with pytest.raises(TypeError, match="beta must have the dtype"):
        naive_delta_rule(q, k, v, beta.float())
    with pytest.raises(ValueError, match="num_steps"):
        chunk_hopfield_attention(q, k, v, num_steps=0)
    with pytest.raises(ValueError, match="beta must be a scalar"):
        chunk_hopfield_attention(q, k, v, beta=torch.ones(5, dtype=DT))
    with pytest.raises(ValueError, match="valid"):
        chunk_sliding_window_attention(q, k, v, window_size=4, valid=torch.ones(2, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match="initial_state"):
        chunk_delta_rule(q, k, v, beta, initial_state=torch.zeros(2, 3, 6, 4, dtype=DT))
    with pytest.raises(ValueError, match="eps"):
        naive_linear_attention(q, k, v, eps=-1.0)


def test_a_window_or_chunk_longer_than_the_sequence_costs_the_sequence_only():
    """bench models passed its --chunk-size to both baselines: padded to whole windows/chunks of 8,192, a
    1,024-token input took 450x the time of BSBR's (and 2**20 asked for terabytes at 64 tokens)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 12, 4, generator=g, dtype=torch.float64) for _ in range(3))
    valid = torch.ones(2, 12, dtype=torch.bool)
    valid[0, :3] = False
    huge = 1 << 40
    o, _ = chunk_sliding_window_attention(q, k, v, window_size=huge, valid=valid)
    ref = naive_sliding_window_attention(q, k, v, window_size=12, valid=valid)
    torch.testing.assert_close(o, ref[0] if isinstance(ref, tuple) else ref)
    o, _ = chunk_linear_attention(q.exp(), k.exp(), v, chunk_size=huge)
    ref = naive_linear_attention(q.exp(), k.exp(), v)
    torch.testing.assert_close(o, ref[0] if isinstance(ref, tuple) else ref)
    # (the delta rule padded to the chunk too: 3.3 GB for 10 tokens at chunk 8,192)
    beta = torch.rand(2, 2, 12, generator=g, dtype=torch.float64)
    o, _ = chunk_delta_rule(q, F.normalize(k, dim=-1), v, beta, chunk_size=huge)
    ref = naive_delta_rule(q, F.normalize(k, dim=-1), v, beta)
    torch.testing.assert_close(o, ref[0] if isinstance(ref, tuple) else ref)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_linear_attention_in_half_precision_sums_in_float32(dtype):
    # float16: the key sum passed 65,504 within ~1,000 tokens and the output became 0; bfloat16: the decoding
    # form's running sums rounded single tokens away (0.87 relative error at 2k tokens against 0.003 for the
    # chunked form)
    g = torch.Generator().manual_seed(0)
    q, k = (F.elu(torch.randn(1, 2, 2048, 32, generator=g)) + 1 for _ in range(2))
    v = torch.randn(1, 2, 2048, 32, generator=g)
    want = naive_linear_attention(q.double(), k.double(), v.double())[0]
    half = [x.to(dtype) for x in (q, k, v)]
    for fn in (chunk_linear_attention, recurrent_linear_attention, naive_linear_attention):
        o, state = fn(*half) if fn is naive_linear_attention else fn(*half, output_final_state=True)
        assert o.dtype == dtype
        err = (o.double() - want)[:, :, 1024:].norm() / want[:, :, 1024:].norm()
        assert err < 0.01, (fn.__name__, float(err))
        if state is not None:
            assert state[0].dtype == torch.float32 and state[1].dtype == torch.float32
    if dtype == torch.float16:  # (float32 inputs under autocast: its float16 matmuls overflowed the same way)
        with torch.autocast("cpu", dtype=dtype):
            o, _ = chunk_linear_attention(q, k, v)
        err = (o.double() - want)[:, :, 1024:].norm() / want[:, :, 1024:].norm()
        assert o.dtype == torch.float32 and err < 1e-4, float(err)
    o, state = recurrent_linear_attention(*(x[:, :, :1024] for x in half), output_final_state=True)
    more, _ = recurrent_linear_attention(*(x[:, :, 1024:] for x in half), initial_state=state)
    err = (more.double() - want[:, :, 1024:]).norm() / want[:, :, 1024:].norm()
    assert err < 0.01, float(err)


def test_op_arguments_no_form_reads_otherwise():
    # beta=nan gave zeros in the chunked Hopfield form and nan in the reference; normalize="no" was read as True;
    # scale=nan and eps=inf were taken
    q = k = v = torch.rand(1, 2, 5, 4)
    for fn in (chunk_hopfield_attention, naive_hopfield_attention):
        with pytest.raises(ValueError, match="beta must be a finite number"):
            fn(q, k, v, beta=float("nan"))
    for fn in (chunk_linear_attention, recurrent_linear_attention, naive_linear_attention):
        with pytest.raises(ValueError, match="normalize must be True or False"):
            fn(q, k, v, normalize="no")
        with pytest.raises(ValueError, match="eps must be a finite float"):
            fn(q, k, v, eps=float("inf"))
        with pytest.raises(TypeError, match="got torch.float16, torch.bfloat16, torch.float16"):  # (as given)
            fn(q.half(), k.bfloat16(), v.half())
    with pytest.raises(ValueError, match="scale must be a finite number"):
        chunk_sliding_window_attention(q, k, v, window_size=2, scale=float("nan"))
