"""``torch.compile`` of a converted model: the same logits as eager, and no recompile limit hit as the
length changes. The chunked op branches and loops over chunks in Python, so it runs eagerly inside a
compiled model (``torch.compiler.disable``), as does the cache's count of consumed positions (a Python
int); traced, each recompiled at every new chunk count or length and hit dynamo's limit of 8 (a tiny
llama, lengths 40-250: 273 s of compiling, then eager anyway; with the block selection left eager: 34 s,
but still the limit by the ninth length)."""
import pytest
import torch

from model_sources import make_source

from bsbr import convert_to_bsbr


@pytest.mark.slow
def test_a_compiled_conversion_follows_new_lengths_without_hitting_the_recompile_limit():
    import torch._dynamo

    torch.manual_seed(0)
    model = convert_to_bsbr(make_source("llama"), chunk_size=8).eval()  # 8 exact blocks of 8 tokens
    torch._dynamo.reset()
    try:
        compiled = torch.compile(model)
        with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True), torch.no_grad():
            for n in (40, 50, 60, 70, 80, 90, 100, 110, 130, 150):  # more lengths than the limit; blocks
                # selected among the earlier chunks from 88 tokens on
                ids = torch.randint(0, model.config.vocab_size, (1, n))
                torch.testing.assert_close(compiled(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("family, options", [
    ("llama", {}), pytest.param("qwen2", dict(recall_tokens=8, retrieval_blocks=0), marks=pytest.mark.slow)])
def test_compiled_cached_decode_steps_equal_the_full_forward(family, options):
    # a rotary model's second and later compiled steps read the rotation matrix dynamo traced for the first
    # step's positions: logits off by 3-5, generate() repeating one token, no warning
    import torch._dynamo

    torch.manual_seed(0)
    # the decode step's positions (Python ints) recompiled it at every token, until dynamo's limit after 8;
    # with dynamic shapes it failed on the first step
    model = convert_to_bsbr(make_source(family), chunk_size=8, **options).eval()
    ids = torch.randint(3, model.config.vocab_size, (1, 34))
    for dynamic in (None, True):
        torch._dynamo.reset()
        try:
            compiled = torch.compile(model, backend="eager", dynamic=dynamic)  # dynamo's tracing, no build time
            with torch.no_grad(), torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
                full = model(ids).logits
                cache = compiled(ids[:, :21], use_cache=True).cache
                for t in range(21, 34):
                    torch.testing.assert_close(compiled(ids[:, t:t + 1], cache=cache).logits[:, 0], full[:, t],
                                               rtol=1e-4, atol=1e-4)
        finally:
            torch._dynamo.reset()


def test_fullgraph_is_refused_with_the_reason():
    # dynamo stopped at a host read of the gate ("Could not guard on data-dependent expression") or of the mask,
    # or advised "Remove the `torch.compiler.disable` call"
    import torch._dynamo

    model = convert_to_bsbr(make_source("llama"), chunk_size=4).eval()
    ids = torch.randint(3, model.config.vocab_size, (2, 30))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    for kwargs in ({}, {"attention_mask": mask}):
        torch._dynamo.reset()
        try:
            with torch.no_grad(), pytest.raises(Exception, match="a BSBR model compiles with graph breaks: .* so "
                                                                   "compile it without fullgraph=True"):
                torch.compile(model, fullgraph=True, backend="eager")(ids, **kwargs)
        finally:
            torch._dynamo.reset()


def test_the_eager_parts_build_on_a_torch_whose_disable_takes_no_reason(monkeypatch):
    # torch 2.5-2.7 (pyproject allows them): disable(fn=None, recursive=True); reason= failed every import of
    # the models
    from bsbr.ops.checks import eager

    seen = []

    def disable(fn=None, recursive=True):
        seen.append(fn)
        return fn

    monkeypatch.setattr(torch.compiler, "disable", disable)
    assert eager(len)("abc") == 3 and seen == [len]


class _Logits(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model(ids, use_cache=False, return_dict=False)[0]


def test_torch_jit_trace_is_refused_in_one_line():
    # a trace froze the chunks each token reads: a trace at 100 tokens gave logits 7 off at 137, and GPT-2
    # conversions failed inside torch (enable_gqa given a traced tensor)
    for family in ("llama", "gpt2"):
        model = convert_to_bsbr(make_source(family), chunk_size=16).eval()
        with pytest.raises(RuntimeError, match="torch.jit.trace cannot record BSBR attention: the chunks a token "
                                               "reads follow the input's length"):
            torch.jit.trace(_Logits(model), (torch.randint(3, 97, (1, 100)),), check_trace=False)


def test_torch_export_at_one_length_equals_eager_and_block_selection_is_refused():
    model = convert_to_bsbr(make_source("llama"), chunk_size=16).eval()  # 2 chunks + 8 blocks: up to 160 tokens
    exported = torch.export.export(_Logits(model), (torch.randint(3, 97, (2, 100)),)).module()
    ids = torch.randint(3, 97, (2, 100), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(exported(ids), _Logits(model)(ids), rtol=0, atol=1e-5)
    # past them the chunks read are chosen by value (torch's own error named a guard on a data-dependent symbol)
    with pytest.raises(NotImplementedError, match="torch.export cannot record exact block retrieval past the "
                                                  "window: .* export the bounded mode"):
        torch.export.export(_Logits(model), (torch.randint(3, 97, (1, 240)),))


def test_torch_export_of_a_mask_or_of_several_lengths_is_refused_in_one_line():
    model = convert_to_bsbr(make_source("llama"), chunk_size=16, recall_tokens=8).eval()  # (exports at any length)
    ids = torch.randint(3, 97, (1, 40))

    class Masked(_Logits):
        def forward(self, ids, mask):
            return self.model(ids, attention_mask=mask, use_cache=False, return_dict=False)[0]

    with pytest.raises(NotImplementedError, match="torch.export cannot record an attention_mask of a BSBR model"):
        torch.export.export(Masked(model), (ids, torch.ones_like(ids)))
    with pytest.raises(NotImplementedError, match="torch.export records BSBR attention at one batch size and length"):
        torch.export.export(_Logits(model), (ids,), dynamic_shapes=({1: torch.export.Dim("n", min=2, max=500)},))


def test_torch_export_of_the_native_model_and_of_a_layer_s_state():
    # BSBRModel read its ids' range by value (torch's 17-line data-dependent guard error at every length); a
    # layer asked for its streaming state failed the same way, deep in the chunked op
    from bsbr import BSBRAttention, BSBRModel

    torch.manual_seed(0)
    model = BSBRModel(vocab_size=97, hidden_dim=32, num_layers=2, num_heads=4, chunk_size=16, ff_dim=64).eval()
    ids = torch.randint(0, 97, (1, 40))
    with torch.no_grad():
        torch.testing.assert_close(torch.export.export(model, (ids,)).module()(ids), model(ids), rtol=0, atol=1e-5)
    attn = BSBRAttention(hidden_dim=32, num_heads=4, chunk_size=16).eval()

    class WithState(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = attn

        def forward(self, x):
            return self.attn(x, output_state=True)[0]

    with pytest.raises(NotImplementedError, match="torch.export cannot record BSBR attention's streaming state"):
        torch.export.export(WithState(), (torch.randn(1, 40, 32),))


def test_a_torch_without_is_exporting_is_not_exporting(monkeypatch):
    # torch.compiler.is_exporting came after torch 2.5, which pyproject allows: a forward past the window that
    # called it failed with an AttributeError
    import types

    from bsbr.ops import checks

    monkeypatch.setattr(checks, "torch", types.SimpleNamespace(compiler=types.SimpleNamespace()))
    assert checks.exporting() is False


def test_torch_export_of_the_model_itself_records_its_logits_and_loss_and_refuses_a_cache():
    # the plain call (use_cache defaults to True) failed with torch's data-dependent guard error, as did labels
    # (then refused, as checked by value; the check is skipped while exporting, as transformers checks nothing)
    model = convert_to_bsbr(make_source("llama"), chunk_size=16).eval()
    ids = torch.randint(3, 97, (1, 40))
    exported = torch.export.export(model, (ids,)).module()
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, model(ids).logits, rtol=0, atol=1e-5)
    with torch.no_grad():  # (the closed gate's value was read: torch's data-dependent guard error)
        torch.testing.assert_close(torch.export.export(model, (ids,)).module()(ids).logits, model(ids).logits,
                                   rtol=0, atol=1e-5)
    for kwargs, told in ((dict(use_cache=True), "cannot record a BSBR model's cache .* export with use_cache=False"),
                         (dict(position_ids=torch.arange(40)[None], use_cache=False),
                          "cannot record position_ids of a BSBR model .* export without them")):
        with pytest.raises(NotImplementedError, match=told):
            torch.export.export(model, (ids,), kwargs)
    labels = ids.clone()
    labels[0, :5] = -100
    exported = torch.export.export(model, (ids,), dict(labels=labels, use_cache=False)).module()
    torch.testing.assert_close(exported(ids, labels=labels, use_cache=False).loss, model(ids, labels=labels).loss)


def test_per_sample_gradients_with_labels_as_on_the_source():
    # torch.func.vmap(grad(...)) with labels= failed on the labels' check by value ("calling .item() on a Tensor"),
    # where transformers' model computes them
    from torch.func import functional_call, grad, vmap

    model = convert_to_bsbr(make_source("llama"), chunk_size=8)
    ids = torch.randint(3, 97, (3, 30), generator=torch.Generator().manual_seed(1))
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, x):  # (the config's use_cache=True: under vmap no cache is built, as none was asked for)
        return functional_call(model, p, (x[None],), dict(labels=x[None])).loss

    per_sample = vmap(grad(loss), in_dims=(None, 0))(params, ids)
    for i in (0, 2):
        one = grad(loss)(params, ids[i])
        torch.testing.assert_close(per_sample["model.embed_tokens.weight"][i], one["model.embed_tokens.weight"])
    with pytest.raises(ValueError, match="labels must lie in"):  # (still checked on an eager call)
        model(ids, labels=ids + 100)
