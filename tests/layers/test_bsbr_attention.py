import warnings

import pytest
import torch

from bsbr import BSBRAttention, BSBRLayer, BSBRModel
from bsbr.layers import RotaryEmbedding, StandardAttention

VARIANTS = [
    dict(),  # the plain pattern: own chunk + every earlier chunk's state, additive
    dict(retrieval="normalized", feature_map="hedgehog", gate_init=0.5, num_kv_heads=2),
    dict(retrieval="normalized", compression_factor=2, retrieval_blocks=2),
    dict(retrieval="additive", compression_factor=3, gate_init=1.0, num_kv_heads=1),
    dict(retrieval="normalized", gate_init=0.5, num_kv_heads=2, local_chunks=2, sink_tokens=3, retrieval_blocks=1),
    dict(retrieval="normalized", gate_init=0.5, num_kv_heads=2, local_chunks=2, sink_tokens=2, recall_tokens=5),
    dict(retrieval="additive", gate_init=0.3, recall_tokens=3),
]


def layer(seed=0, **kw):
    torch.manual_seed(seed)
    return BSBRAttention(24, 4, 8, dropout=0.0, **kw).double().eval()


@pytest.mark.parametrize("kw", VARIANTS)
def test_forward_equals_streaming_step(kw):
    a = layer(**kw)
    x = torch.randn(2, 29, 24, dtype=torch.float64)
    full = a(x)
    o1, st = a.step(x[:, :13], None)
    o2, st = a.step(x[:, 13:], st)
    torch.testing.assert_close(torch.cat([o1, o2], 1), full, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kw", VARIANTS)
def test_layer_is_causal(kw):
    a = layer(**kw)
    x = torch.randn(1, 40, 24, dtype=torch.float64)
    base = a(x)
    for t in (3, 8, 15, 39):
        y = x.clone()
        y[:, t] += 5.0
        assert torch.equal(a(y)[:, :t], base[:, :t])


@pytest.mark.parametrize("kw", VARIANTS)
def test_padded_batch_equals_each_sequence_alone(kw):
    a = layer(**kw)
    rot = RotaryEmbedding(6)
    x = torch.randn(3, 21, 24, dtype=torch.float64)
    mask = torch.ones(3, 21, dtype=torch.long)
    mask[0, :5] = 0
    mask[1, 16:] = 0
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    out = a(x, mask, rot(pos, torch.float64))
    for b in range(3):
        keep = mask[b].bool()
        xb = x[b : b + 1, keep]
        alone = a(xb, None, rot(torch.arange(xb.shape[1]), torch.float64))
        torch.testing.assert_close(out[b : b + 1, keep], alone, rtol=1e-10, atol=1e-10)


def test_one_chunk_equals_standard_attention_with_same_projections():
    a = layer(num_kv_heads=2)
    s = StandardAttention(24, 4, num_kv_heads=2).double().eval()
    for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
        getattr(s, name).load_state_dict(getattr(a, name).state_dict())
    x = torch.randn(2, 8, 24, dtype=torch.float64)
    torch.testing.assert_close(a(x), s(x), rtol=1e-10, atol=1e-10)


def test_the_op_gets_rotated_queries_and_keys_un_rotated_meta_inputs_and_each_far_table_its_own(monkeypatch):
    """What the layer hands the op: q and k rotated by the token's own positions; the meta maps' inputs not
    rotated (a chunk's mean of rotated vectors cancels out); far queries and far keys each rotated by their
    own table (tables that differ here)."""
    import bsbr.layers.bsbr_attention as module
    from bsbr.layers.rotary import apply_rotary

    a = layer(retrieval="normalized", gate_init=0.5, retrieval_blocks=1, local_chunks=2)
    x = torch.randn(1, 40, 24, dtype=torch.float64)
    cos, sin, cq, sq, ck, sk = torch.randn(6, 40, 6, dtype=torch.float64).unbind(0)
    seen = []
    real = module._run_op
    monkeypatch.setattr(module, "_run_op", lambda op, tensors, **kw: seen.append(tensors) or real(op, tensors, **kw))
    a(x, position_embeddings=(cos, sin), far_position_embeddings=((cq, sq), (ck, sk)))
    q, k, _, _ = a.project(x, None)
    got_q, got_k, _, mq, mk, _, _, qr, kr = seen[0]
    for got, want in ((got_q, apply_rotary(q, cos, sin)), (got_k, apply_rotary(k, cos, sin)), (mq, q), (mk, k),
                      (qr, apply_rotary(q, cq, sq)), (kr, apply_rotary(k, ck, sk))):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("gate", [0.0, -0.5])
def test_closed_gate_is_chunk_local_attention_and_can_open(gate):
    """A gate at or below 0 reads no chunk state, yet gets the gradient of an open one (straight through the
    clamp), so training can open it: below 0 too, where the clamp's own gradient is 0."""
    a = layer(retrieval="normalized", gate_init=gate)
    x = torch.randn(1, 24, 24, dtype=torch.float64)
    out = a(x)
    # chunk-local attention: each chunk alone
    local = torch.cat([a(x[:, i : i + 8]) for i in range(0, 24, 8)], dim=1)
    torch.testing.assert_close(out, local, rtol=1e-10, atol=1e-10)
    out.square().sum().backward()
    assert a.retrieval_gate.grad is not None and (a.retrieval_gate.grad != 0).all()


@pytest.mark.parametrize("gate", [0.0, 0.5])
def test_a_layer_built_under_inference_mode_runs(gate):
    x = torch.randn(1, 20, 24, dtype=torch.float64)
    expect = layer(retrieval="normalized", gate_init=gate, retrieval_blocks=1, local_chunks=2)(x).detach()
    with torch.inference_mode():  # its parameters are inference tensors, which keep no version counter
        a = layer(retrieval="normalized", gate_init=gate, retrieval_blocks=1, local_chunks=2)
        torch.testing.assert_close(a(x), expect, rtol=1e-12, atol=1e-12)
        out, state = a.step(x[:, 12:], a(x[:, :12], output_state=True)[1])
        torch.testing.assert_close(out, expect[:, 12:], rtol=1e-10, atol=1e-10)


def test_a_gate_written_through_data_is_seen_at_the_next_call():
    # EMA and weight-averaging code writes parameters through .data, which bumps no version counter
    a = layer(retrieval="normalized", gate_init=0.0, retrieval_blocks=1, local_chunks=2)
    x = torch.randn(1, 40, 24, dtype=torch.float64)
    with torch.no_grad():
        closed = a(x)
        a.retrieval_gate.data.fill_(0.5)
        opened = a(x)
        a.retrieval_gate.data = torch.zeros_like(a.retrieval_gate)
        torch.testing.assert_close(a(x), closed, rtol=0, atol=0)
    assert not torch.allclose(opened, closed)
    expect = layer(retrieval="normalized", gate_init=0.5, retrieval_blocks=1, local_chunks=2)
    expect.load_state_dict({**a.state_dict(), "retrieval_gate": torch.full_like(a.retrieval_gate, 0.5)})
    with torch.no_grad():
        torch.testing.assert_close(opened, expect(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kw", [dict(retrieval_blocks=1, local_chunks=2, sink_tokens=2), dict(recall_tokens=4), {}])
def test_closed_gate_skips_the_states_without_changing_the_output(kw):
    # without gradients a closed gate is passed to the op as 0: no chunk state is read or kept (feature
    # size 0), except by the recall mode, which chooses its cache with them; with gradients it goes as a
    # tensor and the states are read; both must give the same output (and recall state)
    a = layer(retrieval="normalized", gate_init=0.0, num_kv_heads=2, **kw)
    x = torch.randn(2, 45, 24, dtype=torch.float64)
    with torch.no_grad():
        fast = a(x, output_state=True)
        assert a._op_gate() == 0
        step, _ = a.step(x[:, 40:], a(x[:, :40], output_state=True)[1])
    full, state = a(x, output_state=True)
    assert full.requires_grad
    torch.testing.assert_close(fast[0], full, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(step, full[:, 40:].detach(), rtol=1e-10, atol=1e-10)
    if kw.get("recall_tokens"):
        for name in ("recall_F", "recall_z", "recall_kr", "recall_pos"):
            torch.testing.assert_close(getattr(fast[1], name), getattr(state, name).detach(), rtol=1e-12, atol=1e-12)
    else:
        assert fast[1].F_past.shape[3] == fast[1].F_cur.shape[2] == 0 < state.F_cur.shape[2]
        assert fast[1].nbytes() < state.nbytes()
    for name in ("k_buf", "v_buf", "k_sink", "kr_past", "v_past"):
        torch.testing.assert_close(getattr(fast[1], name), getattr(state, name).detach(), rtol=1e-12, atol=1e-12)
    with torch.no_grad():  # opening the gate in place is seen at the next call
        a.retrieval_gate.fill_(0.5)
        assert isinstance(a._op_gate(), torch.Tensor)
        assert not torch.allclose(a(x), fast[0])
        if not kw.get("recall_tokens"):  # a state without chunk states cannot continue with them
            with pytest.raises(ValueError, match="gate was closed"):
                a.step(x[:, 40:], fast[1])


@pytest.mark.parametrize("recall", [0, 5])
def test_the_bounded_mode_runs_its_op_in_float32_under_half_precision(recall, monkeypatch):
    # its cache is chosen by recall error, an order bfloat16 rounding scrambles; the exact modes stay in bf16
    import bsbr.layers.bsbr_attention as module

    kw = dict(retrieval="normalized", gate_init=0.5, local_chunks=2, sink_tokens=2, recall_tokens=recall)
    a = layer(**kw)
    half = BSBRAttention(24, 4, 8, dropout=0.0, **kw).to(torch.bfloat16).eval()
    half.load_state_dict({k: v.to(torch.bfloat16) for k, v in a.state_dict().items()})
    spied, op = [], module.chunk_bsbr_attention
    monkeypatch.setattr(module, "chunk_bsbr_attention", lambda q, *r, **k: spied.append(q.dtype) or op(q, *r, **k))
    x = torch.randn(1, 64, 24, dtype=torch.float64)
    out, state = half(x[:, :60].to(torch.bfloat16), output_state=True)
    assert out.dtype == torch.bfloat16 and spied == [torch.float32 if recall else torch.bfloat16]
    assert state.k_buf.dtype == spied[0]
    step, _ = half.step(x[:, 60:].to(torch.bfloat16), state)  # the state continues in its own dtype
    full = half(x.to(torch.bfloat16))
    torch.testing.assert_close(torch.cat([out, step], 1), full, atol=2e-3, rtol=2e-2)  # bf16 rounding
    ref = a(x).float()
    assert (full.float() - ref).abs().max().item() < 0.1 * ref.abs().max().item()


def test_float16_chunk_states_keep_float32_range_over_long_contexts():
    # the states' running sums passed float16's 65,504 past ~65k tokens of like keys: outputs were nan
    torch.manual_seed(0)
    a = BSBRAttention(16, 1, 256, retrieval="normalized", gate_init=1.0).eval()
    x = torch.randn(1, 1, 16).expand(1, 70000, 16) * 8
    with torch.no_grad():
        ref, half = a(x), a.half()(x.half())
    assert half.dtype == torch.float16 and (half.float() - ref).abs().max().item() < 0.01


def test_model_runs_any_length_and_pads():
    torch.manual_seed(0)
    m = BSBRModel(50, 32, 2, 4, 16, 64, dropout=0.0).eval()
    ids = torch.randint(0, 50, (2, 300))
    assert m(ids).shape == (2, 300, 32)
    mask = torch.ones(2, 300, dtype=torch.long)
    mask[1, :37] = 0
    out = m(ids, mask)
    torch.testing.assert_close(out[1:, 37:], m(ids[1:, 37:]), rtol=1e-5, atol=1e-5)


def test_bsbr_layer_gradients_flow():
    # 40 tokens of chunk 8: chunks 2-4 weigh two or more earlier chunks' states, so the meta maps matter
    l = BSBRLayer(24, 4, 8, 48, dropout=0.0)
    x = torch.randn(2, 40, 24, requires_grad=True)
    l(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    no_grad = [n for n, p in l.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad, no_grad


@pytest.mark.parametrize(
    "kw,exc",
    [
        (dict(hidden_dim=30, num_heads=4), ValueError),  # not divisible
        (dict(chunk_size=0), ValueError),
        (dict(compression_factor=5), ValueError),  # does not divide the feature dim 6
        (dict(compression_factor=0), ValueError),
        (dict(retrieval_blocks=-1), ValueError),
        (dict(recall_tokens=-1), ValueError),
        (dict(recall_tokens=4, retrieval_blocks=2), ValueError),
        (dict(num_kv_heads=3), ValueError),
        (dict(retrieval="softmax"), ValueError),
        (dict(retrieval="normalized", feature_map="identity"), ValueError),
        (dict(feature_map="relu"), ValueError),
        (dict(feature_map="elu"), ValueError),  # linear attention's map; measured worse for BSBR
        (dict(dropout=1.5), ValueError),
        (dict(gate_init="open"), TypeError),
        (dict(local_chunks=0), ValueError),
        (dict(sink_tokens=-1), ValueError),
        (dict(sink_tokens=1.5), ValueError),
    ],
)
def test_bad_construction_raises(kw, exc):
    args = dict(hidden_dim=24, num_heads=4, chunk_size=8)
    args.update(kw)
    with pytest.raises(exc):
        BSBRAttention(**args)


def test_bad_forward_inputs_raise():
    a = layer()
    with pytest.raises(ValueError, match="hidden_states"):
        a(torch.randn(2, 5, 23, dtype=torch.float64))
    with pytest.raises(ValueError, match="hidden_states"):
        a(torch.randn(5, 24, dtype=torch.float64))
    with pytest.raises(TypeError, match="hidden_states"):
        a([[0.0]])
    with pytest.raises(ValueError, match="attention_mask"):
        a(torch.randn(2, 5, 24, dtype=torch.float64), torch.ones(2, 6))
    with pytest.raises(ValueError, match="attention_mask"):
        a(torch.randn(2, 5, 24, dtype=torch.float64), torch.full((2, 5), 2))
    assert a(torch.randn(2, 0, 24, dtype=torch.float64)).shape == (2, 0, 24)
    m = BSBRModel(50, 24, 1, 4, 8, 48)
    with pytest.raises(ValueError, match="input_ids"):
        m(torch.randint(0, 60, (1, 5)) + 50)
    with pytest.raises(ValueError, match="input_ids"):
        m(torch.randn(1, 5))


def test_the_native_model_rotates_by_its_rope_theta_and_drops_out_its_embeddings_in_training():
    m = BSBRModel(50, 32, 1, 4, 4, 64, dropout=0.5, rope_theta=500.0)
    d = m.layers[0].attention.head_dim
    torch.testing.assert_close(m.rotary.inv_freq, 500.0 ** (-torch.arange(0, d, 2, dtype=torch.float32) / d))
    seen = []
    m.layers[0].register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    ids = torch.randint(0, 50, (2, 40), generator=torch.Generator().manual_seed(0))
    m.train()(ids)
    m.eval()(ids)
    assert (seen[0] == 0).float().mean() > 0.3 and not (seen[1] == 0).any()


def test_the_native_models_layers_read_rotary_positions():
    # without them one layer is blind to the order of what a token reads: the same output for [5, 6, 7], [6, 5, 7]
    torch.manual_seed(0)
    m = BSBRModel(vocab_size=50, hidden_dim=32, num_layers=1, num_heads=4, chunk_size=8, ff_dim=64, dropout=0.0).eval()
    a, b = m(torch.tensor([[5, 6, 7]]))[0, -1], m(torch.tensor([[6, 5, 7]]))[0, -1]
    assert (a - b).abs().max() > 1e-3


@pytest.mark.parametrize("kw", VARIANTS)
def test_prefill_state_is_contiguous(kw):
    # the layer's q/k/v are transposed views; decode reshapes the state's arrays every step, which
    # would copy the whole past each token if they kept those strides
    a = layer(**kw)
    with torch.no_grad():
        _, state = a(torch.randn(2, 29, 24, dtype=torch.float64), output_state=True)
    assert all(t.is_contiguous() for t in state.tensors().values())


@pytest.mark.parametrize("batch,table_dims", [(1, 2), (1, 3), (3, 3)])
@pytest.mark.parametrize("grad_off", [torch.no_grad, torch.inference_mode])
def test_one_token_rotation_matrix_equals_the_elementwise_rotation(batch, table_dims, grad_off):
    # a decode step rotates one token per sequence by one matmul with a cached matrix; it must equal
    # x * cos + rotate_half(x) * sin, for every table shape, and follow a table changed in place (inference
    # tensors have no version counter: the matrix was reused after a refill and rotated by the old position)
    from bsbr.layers.rotary import apply_rotary, rotate_half

    rot = RotaryEmbedding(8)
    pos = torch.tensor([[5]]) if table_dims == 2 else torch.arange(batch).view(batch, 1) * 1000 + 7
    x = torch.randn(batch, 3, 1, 8, dtype=torch.float64)
    with grad_off():
        cos, sin = rot(pos[0] if table_dims == 2 else pos, torch.float64)
        c, s = (cos[None].clone(), sin[None].clone()) if table_dims == 2 else (cos.clone(), sin.clone())
        want = x * c[:, None] + rotate_half(x) * s[:, None]
        torch.testing.assert_close(apply_rotary(x, cos, sin), want, rtol=1e-12, atol=1e-12)
        cos.mul_(-1.0)  # the same table object, changed in place: the matrix is rebuilt
        torch.testing.assert_close(apply_rotary(x, cos, sin), -x * c[:, None] + rotate_half(x) * s[:, None],
                                   rtol=1e-12, atol=1e-12)
        c2, s2 = rot(pos[0] + 3 if table_dims == 2 else pos + 3, torch.float64)
        cos.copy_(c2), sin.copy_(s2)  # refilled with another position, as a decode loop reusing its buffers
        c2, s2 = (c2[None], s2[None]) if table_dims == 2 else (c2, s2)
        torch.testing.assert_close(apply_rotary(x, cos, sin), x * c2[:, None] + rotate_half(x) * s2[:, None],
                                   rtol=1e-12, atol=1e-12)


def test_a_step_advances_the_state_it_is_given_after_inference_mode():
    """Continued outside torch.inference_mode, the step returned an advanced copy and left the state passed in
    behind, though the docs say it returns the state passed in, advanced."""
    torch.manual_seed(0)
    layer = BSBRAttention(32, 4, 4, dropout=0.0, sink_tokens=2, retrieval_blocks=1).eval()
    x = torch.randn(1, 12, 32)
    with torch.inference_mode():
        _, state = layer(x[:, :8], output_state=True)
    with torch.no_grad():
        _, advanced = layer.step(x[:, 8:9], state)
    assert advanced is state and state.n_seen.tolist() == [9]


def test_a_frozen_closed_gate_keeps_no_chunk_states_even_with_autograd_on():
    # a gate that cannot open in this call (closed, and requires_grad off) reads no state, so none is built
    a = BSBRAttention(16, 2, 4, dropout=0.0, gate_init=0.0, retrieval="normalized")
    x = torch.randn(1, 12, 16)
    _, open_state = a(x, output_state=True)  # trainable: the states are kept, so the gate can open
    assert open_state.feature_size > 0
    a.requires_grad_(False)
    assert a._op_gate() == 0
    _, state = a(x, output_state=True)
    assert state.feature_size == 0


def test_training_from_a_cache_built_without_autograd_warns_that_the_closed_gate_gets_no_gradient():
    a = BSBRAttention(16, 2, 4, dropout=0.0, gate_init=0.0, retrieval="normalized")
    x = torch.randn(1, 12, 16)
    with torch.no_grad():
        _, state = a(x, output_state=True)
    assert state.feature_size == 0  # (no chunk states: the gate was closed and could not open)
    a.train()
    with pytest.warns(UserWarning, match="the cache continued here was built without autograd"):
        a.step(x[:, :1], state.select(torch.arange(1)))
    a.eval()  # in eval mode it is what was asked: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a.step(x[:, :1], state.select(torch.arange(1)))
