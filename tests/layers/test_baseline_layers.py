"""Baseline attention layers and the AttentionLM shell: they run, are causal, mask padding, decode
step by step like a full forward, reject bad arguments, and the shell's loss backpropagates for every
attention."""
import pytest
import torch
import torch.nn.functional as F

from bsbr.layers import (
    BSBRAttention,
    DeltaNet,
    GatedAttentionUnit,
    HopfieldAttention,
    LinearAttention,
    RotaryEmbedding,
    SlidingWindowAttention,
    StandardAttention,
)
from bsbr.models.shell import ATTENTIONS, AttentionLM

DT = torch.float64
HIDDEN, HEADS = 24, 3  # head dim 8

LAYERS = {
    "sliding_window": lambda: SlidingWindowAttention(HIDDEN, HEADS, window_size=5),
    "linear": lambda: LinearAttention(HIDDEN, HEADS, chunk_size=4),
    "linear_hedgehog": lambda: LinearAttention(HIDDEN, HEADS, feature_map="hedgehog", chunk_size=7),
    "deltanet": lambda: DeltaNet(HIDDEN, HEADS, chunk_size=4),
    "hopfield": lambda: HopfieldAttention(HIDDEN, HEADS, num_steps=3, beta=0.5),
    "gau": lambda: GatedAttentionUnit(HIDDEN, query_key_dim=8, block_size=4),
}

SHELL_KW = {
    "bsbr": dict(chunk_size=8),
    "sliding_window": dict(window_size=8),
    "linear": dict(chunk_size=8),
    "deltanet": dict(chunk_size=8),
    "gau": dict(query_key_dim=8),
}


def layer(name):
    torch.manual_seed(0)
    return LAYERS[name]().to(DT).eval()


def rope(n, dim=8):
    return RotaryEmbedding(dim)(torch.arange(n), DT)


@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_shape_and_causality(name):
    m = layer(name)
    x = torch.randn(2, 23, HIDDEN, dtype=DT)
    pe = rope(23)
    y = m(x, None, pe)
    assert y.shape == x.shape and y.dtype == DT
    x2 = x.clone()
    x2[:, 15:] += torch.randn_like(x2[:, 15:])
    y2 = m(x2, None, pe)
    assert torch.equal(y[:, :15], y2[:, :15])
    assert not torch.equal(y[:, 15:], y2[:, 15:])


@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_left_padding_equals_alone(name):
    """A left-padded sequence gives the outputs it gives alone (padding is invisible), zeros at padding."""
    m = layer(name)
    x = torch.randn(2, 19, HIDDEN, dtype=DT)
    mask = torch.ones(2, 19, dtype=torch.long)
    mask[1, :6] = 0
    y = m(x, mask)
    alone = m(x[1:, 6:])
    torch.testing.assert_close(y[1:, 6:], alone, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(y[:1], m(x[:1]), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["linear", "deltanet"])
def test_step_equals_forward(name):
    m = layer(name)
    x = torch.randn(2, 13, HIDDEN, dtype=DT)
    full = m(x)
    y1, state = m.step(x[:, :6])
    y2, state = m.step(x[:, 6:], state)
    torch.testing.assert_close(torch.cat([y1, y2], 1), full, rtol=1e-10, atol=1e-10)


def test_layer_bad_arguments():
    with pytest.raises(ValueError, match="window_size"):
        SlidingWindowAttention(HIDDEN, HEADS, window_size=0)
    with pytest.raises(ValueError, match="divisible"):
        LinearAttention(25, HEADS)
    with pytest.raises(ValueError, match="normalize=True needs"):
        LinearAttention(HIDDEN, HEADS, feature_map="identity")
    with pytest.raises(ValueError, match="feature_map"):
        LinearAttention(HIDDEN, HEADS, feature_map="relu")
    with pytest.raises(ValueError, match="dropout"):
        DeltaNet(HIDDEN, HEADS, dropout=1.5)
    with pytest.raises(ValueError, match="num_steps"):
        HopfieldAttention(HIDDEN, HEADS, num_steps=0)
    with pytest.raises(ValueError, match="beta"):
        HopfieldAttention(HIDDEN, HEADS, beta=-1.0)
    with pytest.raises(ValueError, match="query_key_dim"):
        GatedAttentionUnit(HIDDEN, query_key_dim=7)
    m = layer("sliding_window")
    with pytest.raises(ValueError, match="hidden_states must have shape"):
        m(torch.randn(2, 5, HIDDEN + 1, dtype=DT))
    with pytest.raises(TypeError, match="hidden_states must be a torch.Tensor"):
        m([[0.0] * HIDDEN])
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        m(torch.randn(2, 5, HIDDEN, dtype=DT), torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"position_embeddings must be \(cos, sin\) tensors of shape \(5, "):
        layer("gau")(torch.randn(1, 5, HIDDEN, dtype=DT), None, rope(5, dim=4))  # (its head dim: query_key_dim)


def lm(name, seed=0):
    torch.manual_seed(seed)
    return AttentionLM(64, HIDDEN, 2, HEADS, attention=name, ff_dim=48, **SHELL_KW.get(name, {}))


@pytest.mark.parametrize("name", ATTENTIONS)
def test_shell_runs_and_backpropagates(name):
    m = lm(name)
    ids = torch.randint(0, 64, (2, 21), generator=torch.Generator().manual_seed(0))
    logits = m(ids)
    assert logits.shape == (2, 21, 64)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, 64), ids[:, 1:].reshape(-1))
    loss.backward()
    att_grads = [p.grad for p in m.layers[0].attention.parameters() if p.requires_grad]
    assert att_grads and all(g is not None and torch.isfinite(g).all() for g in att_grads)
    assert any(g.abs().sum() > 0 for g in att_grads)
    # only the attention differs: embedding, MLPs and norms have the same parameter count
    rest = sum(p.numel() for n_, p in m.named_parameters() if ".attention." not in n_)
    assert rest == sum(p.numel() for n_, p in lm("standard").named_parameters() if ".attention." not in n_)


@pytest.mark.parametrize("name", ATTENTIONS)
def test_shell_is_causal_and_left_padding_invariant(name):
    m = lm(name).to(DT).eval()
    ids = torch.randint(1, 64, (2, 20), generator=torch.Generator().manual_seed(1))
    out = m(ids)
    ids2 = ids.clone()
    ids2[:, 12:] = (ids2[:, 12:] + 5) % 64
    assert torch.equal(m(ids2)[:, :12], out[:, :12])
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    padded = m(ids, mask)
    torch.testing.assert_close(padded[1, 7:], m(ids[1:, 7:])[0], rtol=1e-9, atol=1e-9)


def test_shell_mlp_is_four_times_wide_by_default_and_drops_out_in_training():
    m = AttentionLM(64, 32, 1, 4, attention="standard", dropout=0.5)
    mlp = m.layers[0].mlp
    assert mlp[0].out_features == 128 and mlp[2].in_features == 128
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(0))
    mlp.train()
    assert not torch.equal(mlp(x), mlp(x))
    mlp.eval()
    assert torch.equal(mlp(x), mlp(x))


def test_shell_bad_arguments():
    with pytest.raises(ValueError, match="attention must be one of .*sliding_window"):
        AttentionLM(64, HIDDEN, 1, HEADS, attention="flash")
    with pytest.raises(ValueError, match="chunk_size"):
        AttentionLM(64, HIDDEN, 1, HEADS, attention="bsbr")
    with pytest.raises(ValueError, match="window_size"):
        AttentionLM(64, HIDDEN, 1, HEADS, attention="sliding_window")
    with pytest.raises(ValueError, match="num_layers"):
        AttentionLM(64, HIDDEN, 0, HEADS)
    m = lm("standard")
    with pytest.raises(ValueError, match="input_ids"):
        m(torch.randn(2, 5))
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, 64\)"):
        m(torch.full((1, 3), 64))



DROPPING = {
    "bsbr": lambda p: BSBRAttention(HIDDEN, HEADS, 4, dropout=p),
    "standard": lambda p: StandardAttention(HIDDEN, HEADS, dropout=p),
    "sliding_window": lambda p: SlidingWindowAttention(HIDDEN, HEADS, window_size=5, dropout=p),
    "linear": lambda p: LinearAttention(HIDDEN, HEADS, chunk_size=4, dropout=p),
    "deltanet": lambda p: DeltaNet(HIDDEN, HEADS, chunk_size=4, dropout=p),
    "hopfield": lambda p: HopfieldAttention(HIDDEN, HEADS, dropout=p),
}


@pytest.mark.parametrize("name", DROPPING)
def test_dropout_falls_on_the_heads_output_in_training_only(name):
    """``dropout`` drops entries of the heads' concatenated output before ``out_proj``, in training mode only."""
    torch.manual_seed(0)
    m = DROPPING[name](0.5).to(DT)
    x = torch.randn(1, 9, HIDDEN, dtype=DT)
    seen = []
    m.out_proj.register_forward_hook(lambda mod, inp, out: seen.append(inp[0]))
    m.eval()
    m(x)
    m.train()
    m(x)
    kept, dropped = seen
    zeros = dropped == 0
    assert 0.2 < zeros.double().mean() < 0.8  # about half the entries dropped
    torch.testing.assert_close(dropped[~zeros], 2 * kept[~zeros])  # the rest scaled by 1 / (1 - p)


def test_a_one_token_rotation_under_autocast_keeps_the_tables_float32():
    # the one-token path's rotation matrix is a matmul, which autocast rounds to bfloat16 (off by 1e-2)
    from bsbr.layers import apply_rotary

    x = torch.randn(1, 2, 1, 64)
    cos, sin = RotaryEmbedding(64)(torch.tensor([[12345]]))
    want = x * cos[:, None] + torch.cat((-x[..., 32:], x[..., :32]), -1) * sin[:, None]
    with torch.no_grad():
        torch.testing.assert_close(apply_rotary(x, cos, sin), want)  # (the matrix path, outside autocast)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = apply_rotary(x, cos, sin)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want)


def test_deltanet_reads_and_writes_with_unit_norm_queries_and_keys():
    m = DeltaNet(HIDDEN, HEADS, chunk_size=4).to(DT)
    q, k, *_ = m._inputs(torch.randn(2, 7, HIDDEN, dtype=DT) * 5, None)
    for t in (q, k):
        torch.testing.assert_close(t.norm(dim=-1), torch.ones(t.shape[:-1], dtype=DT))


def test_gau_keys_have_their_own_scale_and_rotary_positions_are_relative():
    torch.manual_seed(0)
    m = GatedAttentionUnit(HIDDEN, query_key_dim=8, block_size=4).to(DT).eval()
    x = torch.randn(1, 9, HIDDEN, dtype=DT)
    rot = RotaryEmbedding(m.rotary_dim)
    tables = lambda shift: tuple(t.to(DT) for t in rot(torch.arange(9)[None] + shift))  # noqa: E731
    with torch.no_grad():
        # queries and keys both rotated: a shift of every position changes nothing
        torch.testing.assert_close(m(x, position_embeddings=tables(100)), m(x, position_embeddings=tables(0)))
        before = m(x)
        m.qk_scale[1].mul_(3.0)  # the keys' scale alone
        assert not torch.allclose(m(x), before)


def test_hopfield_updates_the_query_num_steps_times_at_a_default_temperature_of_one_over_sqrt_d():
    torch.manual_seed(0)
    one, three = (HopfieldAttention(HIDDEN, HEADS, num_steps=s).to(DT) for s in (1, 3))
    three.load_state_dict(one.state_dict())
    torch.testing.assert_close(one.log_beta.exp(), torch.full((HEADS,), (HIDDEN // HEADS) ** -0.5, dtype=DT))
    x = torch.randn(1, 9, HIDDEN, dtype=DT)
    assert not torch.allclose(one(x), three(x))


def test_linear_attention_maps_queries_and_keys_with_their_own_features():
    m = LinearAttention(HIDDEN, HEADS, feature_map="hedgehog", chunk_size=4)
    assert m.feature_q is not m.feature_k
    assert {"feature_q.proj.weight", "feature_k.proj.weight"} <= set(m.state_dict())


def test_deltanet_steps_give_a_padded_token_no_output():
    torch.manual_seed(0)
    m = DeltaNet(HIDDEN, HEADS, chunk_size=4).to(DT).eval()
    x = torch.randn(1, 5, HIDDEN, dtype=DT)
    mask = torch.tensor([[1, 1, 0, 1, 1]])
    out, _ = m.step(x, None, attention_mask=mask)
    torch.testing.assert_close(out[0, 2], m.out_proj(torch.zeros(HIDDEN, dtype=DT)))  # the output bias alone
    torch.testing.assert_close(out, m(x, attention_mask=mask))


def test_a_sliding_window_reads_exactly_window_size_tokens():
    torch.manual_seed(0)
    m = SlidingWindowAttention(HIDDEN, HEADS, window_size=2).to(DT).eval()
    x = torch.randn(1, 6, HIDDEN, dtype=DT)
    y = x.clone()
    y[0, 3] += 1.0  # token 3: inside token 4's window of 2 (tokens 3, 4), outside token 5's (4, 5)
    a, b = m(x), m(y)
    assert not torch.allclose(a[0, 4], b[0, 4]) and torch.equal(a[0, 5], b[0, 5])


def test_standard_attention_gives_a_padded_token_no_output():
    torch.manual_seed(0)
    m = StandardAttention(HIDDEN, HEADS).to(DT).eval()
    out = m(torch.randn(1, 4, HIDDEN, dtype=DT), attention_mask=torch.tensor([[1, 1, 0, 0]]))
    for i in (2, 3):
        torch.testing.assert_close(out[0, i], m.out_proj(torch.zeros(HIDDEN, dtype=DT)))


def test_gau_gates_its_attention_by_u():
    torch.manual_seed(0)
    m = GatedAttentionUnit(HIDDEN, query_key_dim=8, block_size=4).to(DT).eval()
    x = torch.randn(1, 5, HIDDEN, dtype=DT)
    seen = []
    m.out_proj.register_forward_hook(lambda mod, inp, out: seen.append(inp[0]))
    m(x)
    u = F.silu(m.uv_proj(x)).chunk(2, dim=-1)[0]
    with torch.no_grad():  # another u, the same attention (v is the other half of uv_proj)
        m.uv_proj.weight[: u.shape[-1]].mul_(2.0)
        if m.uv_proj.bias is not None:
            m.uv_proj.bias[: u.shape[-1]].mul_(2.0)
    m(x)
    u2 = F.silu(m.uv_proj(x)).chunk(2, dim=-1)[0]
    torch.testing.assert_close(seen[1] / u2, seen[0] / u)  # the attention read-out, divided out of both
    assert not torch.allclose(seen[1], seen[0])


def test_the_shell_ties_its_lm_head_to_the_embedding_after_a_final_norm():
    m = lm("bsbr").to(DT).eval()
    assert m.lm_head.weight is m.embedding.weight  # (bench models compares parameter counts across attentions)
    ids = torch.randint(1, 64, (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        m.norm.weight.zero_()
        m.norm.bias.fill_(1.0)  # every position's normalised state is all ones
        torch.testing.assert_close(m(ids), m.embedding.weight.sum(-1).expand(1, 10, -1))


def test_the_native_model_reads_left_padded_tokens_at_their_own_positions():
    # the normalized form's chunk states hold a feature map (hedgehog, not linear) of rotated keys, which a shift of
    # every position changes: left padding must not shift them
    from bsbr import BSBRModel

    torch.manual_seed(0)
    m = BSBRModel(50, 32, 2, 4, 4, 64, dropout=0.0, retrieval="normalized", gate_init=0.5).to(DT).eval()
    ids = torch.randint(0, 50, (1, 30))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 30, dtype=torch.long)], 1)
    torch.testing.assert_close(m(padded, mask)[:, 3:], m(ids))
