"""Bad constructor arguments of the layers (BSBRAttention, the baselines' shared projections, the rotary
embedding, BSBRModel, BSBROptions) are refused with a one-line error naming the argument, before any
work; nonsense (nan, inf, a truthy string for a flag, an empty feature map) is never silently accepted."""
import pytest
import torch

from bsbr import BSBRAttention, BSBRModel
from bsbr.layers import (
    DeltaNet,
    HopfieldAttention,
    LinearAttention,
    RotaryEmbedding,
    SlidingWindowAttention,
    StandardAttention,
)
from bsbr.ops.bsbr import BSBROptions

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("gate", [NAN, INF, -INF, 1e39, 10**400])
def test_a_non_finite_gate_is_refused(gate):
    with pytest.raises(ValueError, match="gate_init must be None or a finite number"):
        BSBRAttention(16, 2, 4, gate_init=gate)


def test_good_gates_still_pass_and_a_non_number_is_still_a_type_error():
    for gate in (None, 0, 0.0, 0.5, -1.0, 2):
        a = BSBRAttention(16, 2, 4, dropout=0.0, gate_init=gate)
        assert not a(torch.randn(1, 9, 16)).isnan().any()
    for gate in ("open", True):
        with pytest.raises(TypeError, match="gate_init"):
            BSBRAttention(16, 2, 4, gate_init=gate)


@pytest.mark.parametrize("theta", [-1.0, 0, 0.0, True, None, NAN, INF, "10000", 1e39])
def test_rotary_theta_must_be_a_finite_number_above_zero(theta):
    with pytest.raises(ValueError, match="theta"):
        RotaryEmbedding(8, theta=theta)
    with pytest.raises(ValueError, match="rope_theta must be a finite number > 0"):
        BSBRModel(50, 16, 1, 2, 4, 32, rope_theta=theta)


@pytest.mark.parametrize("kw, match", [
    (dict(hidden_dim=-1), "hidden_dim must be an int >= 1"), (dict(hidden_dim=16.0), "hidden_dim must be an int"),
    (dict(hidden_dim=10, head_dim=5), "head_dim must be even for rotary positions, got 5"),
    (dict(retrieval_blocks=1, local_chunks=2, own_position_chunks=3), "own_position_chunks: a BSBRLayer gives no far"),
])
def test_native_model_arguments_are_named(kw, match):
    # hidden_dim failed inside nn.Embedding; the far-position options were accepted and changed nothing
    args = dict(vocab_size=50, hidden_dim=16, num_layers=1, num_heads=2, chunk_size=4, ff_dim=32)
    with pytest.raises(ValueError, match=match):
        BSBRModel(**{**args, **kw})


@pytest.mark.parametrize("inv_freq, exc", [
    ([1.0] * 4, TypeError), (torch.ones(4, dtype=torch.long), TypeError), (torch.ones(3), ValueError),
    (torch.ones(1, 4), ValueError), (torch.tensor([1.0, NAN, 1.0, 1.0]), ValueError),
    (torch.tensor([1.0, INF, 1.0, 1.0]), ValueError),
])
def test_rotary_inv_freq_of_the_wrong_kind_is_refused(inv_freq, exc):
    with pytest.raises(exc, match="inv_freq"):
        RotaryEmbedding(8, inv_freq=inv_freq)


@pytest.mark.parametrize("scaling", ["1", True, None, NAN, INF, 0, -1.0, torch.tensor(1.0)])
def test_rotary_attention_scaling_of_the_wrong_kind_is_refused(scaling):
    with pytest.raises(ValueError, match="attention_scaling"):
        RotaryEmbedding(8, attention_scaling=scaling)


def test_good_rotary_arguments_still_pass():
    for kw in (dict(), dict(theta=500), dict(theta=1e6), dict(inv_freq=torch.rand(4, dtype=torch.float64)),
               dict(inv_freq=torch.ones(4), attention_scaling=1), dict(attention_scaling=1.2)):
        cos, sin = RotaryEmbedding(8, **kw)(torch.arange(5))
        assert cos.shape == (5, 8) and torch.isfinite(cos).all() and torch.isfinite(sin).all()
    m = BSBRModel(50, 16, 1, 2, 4, 32, rope_theta=500)
    assert torch.isfinite(m(torch.randint(0, 50, (1, 9)))).all()


@pytest.mark.parametrize("scale", [INF, -INF, NAN, 0, 0.0, -1.0, True, "1", 1e39, 10**400])
def test_bsbr_options_scale_must_be_none_or_a_finite_number_above_zero(scale):
    with pytest.raises(ValueError, match="scale must be None or a finite number > 0"):
        BSBROptions(chunk_size=4, scale=scale)


def test_good_scales_still_pass():
    for scale in (None, 0.125, 1, 2.0):
        assert BSBROptions(chunk_size=4, scale=scale).scale == scale


def test_bsbr_options_retrieval_blocks_has_the_flags_cap():
    """bsbr convert --retrieval-blocks stops at 1,048,576 (a sequence's most tokens); so does the options object."""
    assert BSBROptions(chunk_size=4, retrieval_blocks=1 << 20).retrieval_blocks == 1 << 20
    with pytest.raises(ValueError, match="retrieval_blocks must be at most 1,048,576, got 1,048,577"):
        BSBROptions(chunk_size=4, retrieval_blocks=(1 << 20) + 1)


@pytest.mark.parametrize("feature_map", ["", 0, False, [], "Hedgehog"])
def test_only_none_means_the_default_feature_map(feature_map):
    for retrieval in ("additive", "normalized"):
        with pytest.raises(ValueError, match="feature_map"):
            BSBRAttention(16, 2, 4, retrieval=retrieval, feature_map=feature_map)


def test_none_still_gives_the_default_feature_map():
    assert BSBRAttention(16, 2, 4).feature_q.kind == "identity"
    assert BSBRAttention(16, 2, 4, retrieval="normalized").feature_q.kind == "hedgehog"


MULTIHEAD_LAYERS = {
    "bsbr": lambda **kw: BSBRAttention(16, 2, 4, **kw),
    "standard": lambda **kw: StandardAttention(16, 2, **kw),
    "sliding_window": lambda **kw: SlidingWindowAttention(16, 2, window_size=4, **kw),
    "linear": lambda **kw: LinearAttention(16, 2, **kw),
    "deltanet": lambda **kw: DeltaNet(16, 2, **kw),
    "hopfield": lambda **kw: HopfieldAttention(16, 2, **kw),
}


@pytest.mark.parametrize("name", list(MULTIHEAD_LAYERS))
@pytest.mark.parametrize("kw, match", [
    (dict(bias="no"), "bias must be True or False"), (dict(bias=1), "bias must be True or False"),
    (dict(bias=None), "bias must be True or False"), (dict(bias=0), "bias must be True or False"),
    (dict(out_bias=2), "out_bias must be True or False"), (dict(out_bias="no"), "out_bias must be True or False"),
    (dict(out_bias=0), "out_bias must be True or False"),
])
def test_biases_must_be_bools(name, kw, match):
    with pytest.raises(ValueError, match=match):
        MULTIHEAD_LAYERS[name](**kw)


@pytest.mark.parametrize("name", list(MULTIHEAD_LAYERS))
def test_good_biases_still_pass(name):
    for bias, out_bias, has_out in ((True, None, True), (False, None, False), (True, False, False),
                                    (False, True, True)):
        m = MULTIHEAD_LAYERS[name](bias=bias, out_bias=out_bias)
        assert (m.q_proj.bias is not None) == bias and (m.out_proj.bias is not None) == has_out


@pytest.mark.parametrize("name", list(MULTIHEAD_LAYERS))
def test_an_input_of_another_dtype_than_the_weights_is_one_clear_error(name):
    layer = MULTIHEAD_LAYERS[name]()
    with pytest.raises(TypeError, match=r"hidden_states are torch.float16, the layer's weights torch.float32"):
        layer(torch.randn(2, 8, 16, dtype=torch.float16))
    assert layer.double()(torch.randn(2, 8, 16, dtype=torch.float64)).dtype == torch.float64
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts per op: allowed, with rotary tables too
        layer.float()(torch.randn(2, 8, 16, dtype=torch.bfloat16))
        layer(torch.randn(2, 8, 16), None, RotaryEmbedding(layer.head_dim)(torch.arange(8)))


def test_tables_that_passed_under_autocast_are_checked_again_without_it():
    # float32 tables beside bfloat16 queries pass under autocast; the same tables outside it failed deep in
    # the op ("q, k, v, ... must share one dtype") instead of naming the tables
    layer = MULTIHEAD_LAYERS["bsbr"]().to(torch.bfloat16)
    x = torch.randn(1, 8, 16, dtype=torch.bfloat16)
    tables = RotaryEmbedding(layer.head_dim)(torch.arange(8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(x, None, tables)
    with pytest.raises(TypeError, match="position_embeddings are torch.float32, the layer's queries torch.bfloat16"):
        layer(x, None, tables)


def test_a_rotary_built_on_the_meta_device_skips_the_value_check():
    """Models are built on the meta device before their weights load: inv_freq's values cannot be read there."""
    with torch.device("meta"):
        assert RotaryEmbedding(8, inv_freq=torch.ones(4)).inv_freq.is_meta


@pytest.mark.parametrize("bias", ["no", 1, None])
def test_the_gated_attention_unit_bias_must_be_a_bool(bias):
    from bsbr.layers.gau import GatedAttentionUnit

    with pytest.raises(ValueError, match="bias must be True or False"):
        GatedAttentionUnit(16, query_key_dim=8, bias=bias)
    assert GatedAttentionUnit(16, query_key_dim=8, bias=False).out_proj.bias is None


def test_a_dynamically_quantized_layer_still_runs():
    # its Linear weights are methods (int8 kernels take float input): not compared with the input's dtype
    layer = torch.ao.quantization.quantize_dynamic(BSBRAttention(16, 2, 4, dropout=0.0), {torch.nn.Linear},
                                                   dtype=torch.qint8)
    assert layer(torch.randn(2, 8, 16)).shape == (2, 8, 16)


def test_rotary_tables_of_the_wrong_form_are_named():
    """Malformed position tables were unpacked along their batch dim (a silently wrong output) or failed
    deep in the rotation with torch's size message."""
    import torch

    from bsbr import BSBRAttention

    a = BSBRAttention(32, 4, 8, dropout=0.0)
    x, cos, sin = torch.randn(2, 20, 32), torch.randn(2, 20, 8), torch.randn(2, 20, 8)
    assert a(x, position_embeddings=(cos[:1], sin[:1])).shape == (2, 20, 32)  # one table for the batch
    cases = [(dict(position_embeddings=cos), TypeError, "position_embeddings must be a pair of (cos, sin) tensors"),
             (dict(position_embeddings=(cos[:, :10], sin)), ValueError, "of shape (20, 8) or (2 or 1, 20, 8), got (2, 10, 8)"),
             (dict(position_embeddings=(cos, sin, cos)), TypeError, "position_embeddings must be a pair"),
             (dict(position_embeddings=(cos.double(), sin)), TypeError, "torch.float64, the layer's queries torch.float32"),
             (dict(far_position_embeddings=(cos, sin)), TypeError, "far_position_embeddings[0] must be a pair"),
             (dict(far_position_embeddings=((cos, sin),)), TypeError, "far_position_embeddings must be a tuple of 2 pairs")]
    for kwargs, error, words in cases:
        with pytest.raises(error) as e:
            a(x, **kwargs)
        assert words in str(e.value), (kwargs.keys(), str(e.value))
    with pytest.raises(TypeError, match="position_embeddings must be a pair"):
        a.step(x[:, :1], None, position_embeddings=cos[:, :1])
    # tables for a batch of 2 given a batch of 1 (they broadcast it to 2 rows)
    with pytest.raises(ValueError, match=r"must be \(cos, sin\) tensors of shape \(20, 8\) or \(1, 20, 8\), got "
                                         r"\(2, 20, 8\)"):
        a(x[:1], position_embeddings=(cos, sin))


def _freed_after(forward, tables_of):
    """Whether the rotary tables one ``forward()`` made are freed once it returns."""
    import gc
    import weakref

    held = []
    tables_of(lambda out: held.append(weakref.ref(out[0])))
    with torch.no_grad():
        forward()
    gc.collect()
    return bool(held) and all(r() is None for r in held)


def test_a_freed_models_rotary_tables_are_not_kept_alive():
    """The check kept the last tables that passed, so a freed model's forward at 32k tokens pinned 48 MiB."""
    from model_sources import make_source

    from bsbr import convert_to_bsbr

    model = convert_to_bsbr(make_source("llama"), chunk_size=4).eval()
    assert _freed_after(lambda: model(torch.tensor([[3, 4, 5, 6, 7, 8]])),
                        lambda f: model.model.rotary.register_forward_hook(lambda m, a, out: f(out)))


def test_native_models_keep_no_rotary_tables_either():
    """BSBRModel and the benchmarks' AttentionLM left their last tables behind (16.8 MB after a (8, 4096) forward
    of a small BSBRModel)."""
    from bsbr import BSBRModel
    from bsbr.models.shell import AttentionLM

    ids = torch.randint(0, 50, (2, 24))
    for model in (BSBRModel(vocab_size=50, hidden_dim=32, num_layers=2, num_heads=4, chunk_size=8, ff_dim=64),
                  AttentionLM(50, 32, 2, 4, attention="bsbr", chunk_size=8)):
        hook = model.rotary.register_forward_hook
        assert _freed_after(lambda: model(ids), lambda f: hook(lambda m, a, out: f(out))), type(model).__name__


def test_a_stack_of_bare_layers_keeps_no_rotary_tables():
    """A user's own stack of BSBRAttention layers: the check held its last tables until the next call (270 MB at
    (8, 32k, 128))."""
    import gc
    import weakref

    a = BSBRAttention(32, 4, 8, dropout=0.0)
    x = torch.randn(2, 20, 32)
    cos, sin = torch.randn(20, 8), torch.randn(20, 8)
    a(x, position_embeddings=(cos, sin))
    a(x, position_embeddings=(cos, sin))  # (the second call takes the checked path)
    refs = [weakref.ref(cos), weakref.ref(sin)]
    del cos, sin
    gc.collect()
    assert all(r() is None for r in refs)


def test_a_list_of_tables_refilled_in_place_is_checked_again():
    # the check remembered the container: a list refilled with (1, 8) tables broadcast them over 20 positions
    a = BSBRAttention(32, 4, 8, dropout=0.0)
    x, tables = torch.randn(1, 20, 32), [torch.ones(20, 8), torch.zeros(20, 8)]
    a(x, position_embeddings=tables)
    tables[0], tables[1] = torch.ones(1, 8), torch.zeros(1, 8)
    with pytest.raises(ValueError, match=r"position_embeddings must be .* got \(1, 8\)"):
        a(x, position_embeddings=tables)


def test_rotary_tables_for_an_odd_head_dim_are_refused():
    """Rotary positions rotate pairs of dimensions: with head_dim 9 and tables of width 9, the decode step
    (one token, a rotation matrix) and the forward (rotate_half, halves of 5 and 4) disagreed by 1.68."""
    attn = BSBRAttention(18, 2, 4, dropout=0.0).eval()
    cos, sin = torch.ones(5, 9), torch.zeros(5, 9)
    with pytest.raises(ValueError, match="head dim 9 is odd"):
        attn(torch.randn(1, 5, 18), position_embeddings=(cos, sin))


@pytest.mark.parametrize("build", ["native", "shell", "converted-llama3-rope"])
def test_a_model_built_on_the_meta_device_then_loaded_equals_the_eager_one(build):
    # inv_freq is in no checkpoint: after to_empty() it held garbage, and load_state_dict reported every key
    # matched while the outputs were off by ~1
    from bsbr import BSBRModel
    from bsbr.models import AttentionLM

    converted = None
    if build.startswith("converted"):  # (a scaled rope type's frequencies come from transformers' init functions)
        from model_sources import make_source

        from bsbr import convert_to_bsbr
        from bsbr.models import BSBRForCausalLM

        converted = convert_to_bsbr(make_source("llama3-rope"), chunk_size=4)

    def make():
        if build == "native":
            return BSBRModel(50, 32, 1, 4, 4, 64, dropout=0.0)
        if converted is not None:
            return BSBRForCausalLM(converted.config)
        return AttentionLM(vocab_size=50, hidden_dim=32, num_layers=1, num_heads=4, attention="bsbr", chunk_size=4)

    torch.manual_seed(0)
    eager = make().eval() if converted is None else converted
    with torch.device("meta"):
        lazy = make()
    lazy = lazy.to_empty(device="cpu")
    lazy.load_state_dict(eager.state_dict())
    ids = torch.randint(0, 50, (1, 9))
    with torch.no_grad():
        out = (lambda m: m(ids).logits) if converted is not None else (lambda m: m(ids))
        torch.testing.assert_close(out(lazy.eval()), out(eager), rtol=0, atol=0)


def test_the_layer_runs_on_the_meta_device_and_checks_output_state():
    # (autocast has no meta device: the layer failed there with "unknown device type for autocast")
    attn = BSBRAttention(16, 2, 4, dropout=0.0).to("meta")
    assert attn(torch.empty(1, 9, 16, device="meta")).shape == (1, 9, 16)
    for kw in (dict(gate_init=0.5, retrieval="normalized", local_chunks=2), dict(recall_tokens=3, sink_tokens=2)):
        with torch.no_grad():  # (an open gate's check read the gate's value: "item() ... on meta tensors")
            assert BSBRAttention(16, 2, 4, **kw).to("meta")(torch.empty(1, 9, 16, device="meta")).shape == (1, 9, 16)
    from bsbr import BSBRModel
    model = BSBRModel(40, 16, 2, 4, 4, 32, dropout=0.0).to("meta")  # (its id range check read the ids)
    assert model(torch.zeros(1, 9, dtype=torch.long, device="meta")).shape == (1, 9, 16)
    with pytest.raises(NotImplementedError, match="the meta device holds shapes, not values: exact blocks"):
        BSBRAttention(16, 2, 4, retrieval_blocks=2).to("meta")(torch.empty(1, 9, 16, device="meta"))
    x = torch.empty(2, 10, 16, device="meta")  # a streaming state holds values: step and output_state refused too
    with pytest.raises(NotImplementedError, match="the meta device holds shapes, not values"):
        attn.step(x[:, :1], None)
    with pytest.raises(NotImplementedError, match="the meta device holds shapes, not values"):
        attn(x, output_state=True)
    with pytest.raises(TypeError, match="output_state must be True or False"):
        BSBRAttention(16, 2, 4)(torch.randn(1, 3, 16), output_state="no")  # ("no" is truthy: it returned a tuple)


def test_a_state_selects_rows_by_index_or_mask_and_names_a_bad_index():
    attn = BSBRAttention(16, 2, 4, dropout=0.0).eval()
    _, state = attn(torch.randn(3, 6, 16), output_state=True)
    x = torch.randn(3, 1, 16)
    rows = state.select(torch.tensor([True, False, True]))
    torch.testing.assert_close(attn.step(x[[0, 2]], rows)[0], attn.step(x[[0, 2]], state.select([0, 2]))[0])
    assert state.select([-1]).n_seen.shape == (1,)
    for bad, match in (([3], "row indices in \\[0, 3\\)"), (torch.tensor([True]), "one entry per sequence"),
                       ([0.5], "row indices")):
        with pytest.raises(ValueError, match=match):
            state.select(bad)


def test_the_gated_attention_unit_runs_under_autocast_and_names_bad_rotary_tables():
    # its q and k came out float32 beside a bfloat16 v under autocast (a dtype error deep in the op), and
    # malformed tables failed inside the rotation
    from bsbr.models import AttentionLM

    lm = AttentionLM(vocab_size=50, hidden_dim=32, num_layers=1, num_heads=2, attention="gau", query_key_dim=16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert lm(torch.randint(0, 50, (2, 9))).shape == (2, 9, 50)
    layer = lm.layers[0].attention
    x = torch.randn(1, 9, 32)
    cos, sin = RotaryEmbedding(16)(torch.arange(9))
    for tables, match in (((cos[:5], sin[:5]), r"must be \(cos, sin\) tensors of shape \(9, 16\)"),
                          (cos, "must be a pair of"), ((cos.double(), sin.double()), "give the tables in torch.float32")):
        with pytest.raises((ValueError, TypeError), match=f"position_embeddings {match}|position_embeddings are"):
            layer(x, None, tables)


def test_deltanet_runs_in_half_precision_and_continues_an_inference_mode_state_under_autograd():
    # CPU has no half-precision triangular solve: the chunked form failed inside torch
    layer = DeltaNet(16, 2, chunk_size=4)
    x = torch.randn(1, 9, 16)
    for dtype in (torch.bfloat16, torch.float16):
        out = layer.to(dtype)(x.to(dtype))
        assert out.dtype == dtype and torch.isfinite(out).all()
    layer.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(layer(x)).all()
    with torch.inference_mode():
        _, state = layer.step(x[:, :5])
    out, _ = layer.step(x[:, 5:], state)
    out.sum().backward()
    assert layer.q_proj.weight.grad is not None


def test_deltanet_states_of_the_wrong_form_are_named_as_its_state():
    layer = DeltaNet(16, 2).eval()
    x = torch.randn(2, 5, 16)
    _, state = layer.step(x)
    with pytest.raises(TypeError, match=r"initial_state must be None or the state tensor \(b, h, d, dv\)"):
        layer.step(x[:, :1], (state, "junk"))
    with pytest.raises(ValueError, match=r"initial_state must have shape \(2, 2, 8, 8\), got \(1, 2, 8, 8\)"):
        layer.step(x[:, :1], state[:1])


@pytest.mark.parametrize("normalize", ["no", "False", 1, None])
def test_linear_attention_normalize_must_be_a_bool(normalize):
    # bool("no") silently meant True
    with pytest.raises(ValueError, match="normalize must be True or False"):
        LinearAttention(16, 2, normalize=normalize)


def test_the_attention_shell_refuses_far_position_options_it_cannot_use():
    from bsbr.models import AttentionLM

    with pytest.raises(ValueError, match="own_position_chunks: AttentionLM gives no far key positions"):
        AttentionLM(20, 16, 2, 2, attention="bsbr", chunk_size=2, retrieval_blocks=1, own_position_chunks=2)


def test_a_trainable_gate_steps_without_a_scalar_conversion_warning():
    import warnings

    attn = BSBRAttention(16, 2, 4, retrieval="normalized", gate_init=0.0, retrieval_blocks=1)
    x = torch.randn(1, 9, 16)
    with torch.no_grad():
        _, state = attn(x[:, :6], output_state=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", "the cache continued here was built without autograd")  # (its own test)
        attn.step(x[:, 6:], state)


def test_a_state_is_continued_only_by_streaming():
    attn = BSBRAttention(16, 2, 4, dropout=0.0).eval()
    x = torch.randn(1, 9, 16)
    full, state = attn(x[:, :5], output_state=True)
    with pytest.raises(ValueError, match="state: a streaming state is continued with streaming=True"):
        attn(x[:, 5:], state=state)
    with pytest.raises(TypeError, match="streaming must be True or False"):
        attn(x, streaming="no")
    torch.testing.assert_close(attn(x[:, 5:], streaming=True, state=state)[0], attn(x)[:, 5:])


def test_models_built_under_a_device_context_run_there():
    """The rotary frequencies were pinned to the CPU while every weight followed a ``torch.device``
    context, so the first forward failed ("Tensor on device cpu is not on the expected device meta")."""
    from bsbr.models import AttentionLM

    with torch.device("meta"):
        native = BSBRModel(vocab_size=50, hidden_dim=32, num_layers=1, num_heads=4, chunk_size=4, ff_dim=64)
        shell = AttentionLM(50, 32, 1, 4, attention="bsbr", chunk_size=4)
    ids = torch.zeros(1, 5, dtype=torch.long, device="meta")
    assert native(ids).shape == (1, 5, 32) and shell(ids).shape == (1, 5, 50)
    with torch.no_grad():  # one token: the rotation asks whether autocast is on, which meta cannot say
        assert native(ids[:, :1]).shape == (1, 1, 32) and shell(ids[:, :1]).shape == (1, 1, 50)


def test_numbers_of_another_library_are_named_with_the_fix():
    import numpy as np

    with pytest.raises(ValueError, match=r"chunk_size must be an int >= 1, got np.int64\(4\) \(a numpy.int64: "
                                         r"pass int\(x\)\)"):
        BSBRAttention(16, 2, np.int64(4))
    with pytest.raises(ValueError, match=r"pass float\(x\)"):
        BSBROptions(4, scale=np.float32(0.5))
    assert BSBRAttention(16, 2, 4, dropout=np.float32(0.25)).dropout == 0.25  # dropout is read as a float
    with pytest.raises(ValueError) as e:  # the hint only where following it would help
        BSBRAttention(16, 2, np.int64(0))
    assert "pass int" not in str(e.value)


def test_a_dropout_of_any_real_type_trains():
    """check_dropout took a Fraction, but the models gave it to nn.Dropout unconverted: a TypeError in training."""
    from fractions import Fraction

    from bsbr.models import AttentionLM

    ids = torch.randint(0, 50, (2, 12))
    for model in (AttentionLM(50, 32, 1, 4, attention="bsbr", chunk_size=4, dropout=Fraction(1, 10)),
                  AttentionLM(50, 32, 1, 4, attention="gau", dropout=Fraction(1, 10)),
                  BSBRModel(50, 32, 1, 4, 4, 64, dropout=Fraction(1, 10))):
        assert model.train()(ids).shape[:2] == (2, 12)


@pytest.mark.parametrize("attention", ["linear", "deltanet"])
def test_attentions_without_positions_take_any_head_size(attention):
    """AttentionLM built a rotary for every attention and refused an odd head size with a message about
    rotary dims, for layers that use no positions."""
    from bsbr.models import AttentionLM

    model = AttentionLM(40, 15, 1, 3, attention=attention)
    assert model.rotary is None and model(torch.randint(0, 40, (2, 7))).shape == (2, 7, 40)


def test_a_gate_holding_nan_is_refused_not_read_as_open():
    # nan <= 0 is False: the gate read as open and every output was nan, without a word
    a = BSBRAttention(32, 4, 4, dropout=0.0, gate_init=0.0).eval()
    with torch.no_grad():
        a.retrieval_gate[1] = float("nan")
        with pytest.raises(ValueError, match="retrieval_gate holds nan"):
            a(torch.randn(1, 12, 32))
    with pytest.raises(ValueError, match="retrieval_gate holds nan"):  # and with autograd on (a training forward)
        a(torch.randn(1, 12, 32))


def test_a_01_mask_on_the_meta_device_runs_as_a_bool_one_does():
    # the mask's 0/1 check read values the meta device does not hold (Tensor.item() on meta)
    a = BSBRAttention(32, 4, 4).to("meta")
    x = torch.randn(2, 9, 32, device="meta")
    assert a(x, attention_mask=torch.ones(2, 9, dtype=torch.long, device="meta")).shape == (2, 9, 32)


def test_ids_labels_and_dropout_at_their_upper_edge():
    from bsbr.layers.inputs import check_dropout, check_input_ids, check_labels

    check_input_ids(torch.tensor([[0, 9]]), 10)
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, 10\)"):  # (the embedding's IndexError)
        check_input_ids(torch.tensor([[0, 10]]), 10)
    check_labels(torch.tensor([[9, -100]]), 1, 2, 10)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\) or be -100 .*got 10"):
        check_labels(torch.tensor([[10, -100]]), 1, 2, 10)
    assert check_dropout(0.999) == 0.999
    with pytest.raises(ValueError, match=r"dropout must be a float in \[0, 1\), got 1.0"):  # (every output 0)
        check_dropout(1.0)


def test_float16_inputs_run_the_op_in_float32_and_bfloat16_only_in_the_bounded_mode():
    from bsbr.layers.bsbr_attention import op_dtype

    exact, bounded = BSBROptions(4), BSBROptions(4, retrieval_blocks=0, recall_tokens=4)
    assert [op_dtype(torch.float16, "cpu", o) for o in (exact, bounded)] == [torch.float32] * 2
    assert [op_dtype(torch.bfloat16, "cpu", o) for o in (exact, bounded)] == [torch.bfloat16, torch.float32]
    assert op_dtype(torch.float64, "cpu", exact) == torch.float64
