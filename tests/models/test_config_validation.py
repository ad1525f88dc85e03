"""Bad config values and conversion options are refused at construction with a ValueError naming the
argument, and loading never unpickles a checkpoint."""
import json
import re
import logging

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM

from bsbr import BSBRConfig, BSBRForCausalLM, TransformerToBSBRConverter, convert_to_bsbr, load_bsbr_model
from bsbr.models import BSBRBaseModel
from bsbr.convert import converter

TINY = dict(vocab_size=97, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            max_position_embeddings=32, chunk_size=8)
NAN, INF = float("nan"), float("inf")

BAD_CONFIGS = [
    ("norm_eps", dict(norm_eps=NAN)), ("norm_eps", dict(norm_eps=-1e-5)),
    ("norm_eps", dict(norm_eps="1e-5")),
    ("rope_theta", dict(position_type="rope", rope_parameters={"rope_type": "default", "rope_theta": 0.0})),
    ("rope_theta", dict(position_type="rope", rope_parameters={"rope_type": "default", "rope_theta": -1.0})),
    ("rope_theta", dict(position_type="rope", rope_parameters={"rope_type": "default", "rope_theta": INF})),
    ("rope_theta", dict(position_type="rope", rope_parameters={"rope_type": "default", "rope_theta": NAN})),
    ("rope_parameters", dict(position_type="rope", rope_parameters="x")),
    ("initializer_range", dict(initializer_range=NAN)), ("initializer_range", dict(initializer_range=-0.02)),
    ("gate_init", dict(gate_init=NAN)), ("gate_init", dict(gate_init=INF)), ("gate_init", dict(gate_init=10**400)),
    ("gate_init", dict(gate_init="a")), ("gate_init", dict(gate_init=1e39)),  # inf in float32
    ("compression_factor", dict(compression_factor=2.0)),
    ("attention_bias", dict(attention_bias="no")), ("attention_out_bias", dict(attention_out_bias=1)),
    ("mlp_bias", dict(mlp_bias="no")), ("tie_word_embeddings", dict(tie_word_embeddings="no")),
    ("use_cache", dict(use_cache="no")), ("hidden_act", dict(hidden_act="gelu_nwe")),  # (saved, then failed the build)
    ("feature_map hedgehog", dict(retrieval="normalized", feature_map="identity")),
    ("head_dim must be even", dict(position_type="rope", head_dim=9)),  # (learned positions take one: below)
]


@pytest.mark.parametrize("name, bad", BAD_CONFIGS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(BAD_CONFIGS)])
def test_bad_config_values_are_refused(name, bad):
    with pytest.raises(ValueError, match=name):
        BSBRConfig(**{**TINY, **bad})


def test_the_output_projections_bias_follows_attention_bias_unless_given(tmp_path):
    """attention_out_bias defaults to attention_bias (a config written by hand, or saved before the key existed,
    builds the model its attention_bias says); load_bsbr_model(dtype=...) loads in that dtype."""
    kw = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
              chunk_size=8)
    for bias in (True, False):
        config = BSBRConfig(attention_bias=bias, **kw)
        assert config.attention_out_bias is bias
        assert (BSBRForCausalLM(config).model.layers[0].attn.out_proj.bias is not None) is bias
    assert BSBRConfig(attention_bias=True, attention_out_bias=False, **kw).attention_out_bias is False
    BSBRForCausalLM(BSBRConfig(**kw)).save_pretrained(tmp_path)
    assert {p.dtype for p in load_bsbr_model(tmp_path, dtype=torch.bfloat16).parameters()} == {torch.bfloat16}


def test_good_values_still_pass():
    for ok in (dict(), dict(gate_init=None), dict(gate_init=1), dict(initializer_range=0.0), dict(norm_eps=1),
               dict(attention_out_bias=None), dict(position_type="rope"),
               dict(position_type="rope", rope_parameters={"rope_type": "default", "rope_theta": 500})):
        BSBRConfig(**{**TINY, **ok})


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_source_whose_norms_have_no_epsilon_converts_exactly(family):
    """norm_eps 0 was refused, though transformers runs such a source and BSBR's norms compute the same."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    src = (LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=16, intermediate_size=20, num_hidden_layers=1,
                                        num_attention_heads=2, rms_norm_eps=0.0)) if family == "llama" else
           GPT2LMHeadModel(GPT2Config(vocab_size=97, n_embd=16, n_layer=1, n_head=2, layer_norm_epsilon=0.0))).eval()
    model = convert_to_bsbr(src, chunk_size=8, retrieval_blocks=8, far_positions="absolute")  # (every key where it is)
    ids = torch.randint(0, 97, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, src(ids).logits, rtol=1e-5, atol=1e-5)
    assert model.config.norm_eps == 0.0


def test_hybrid_positions_of_a_source_with_a_huge_range_read_every_chunk_at_its_own_position():
    """max_position_embeddings of 10**8 at chunk 8 made own_position_chunks 6,250,000, past the op's limit:
    refused with a message about an option the user never set."""
    config = BSBRConfig(**{**TINY, "max_position_embeddings": 10**8, "position_type": "rope", "local_chunks": 2,
                           "far_positions": "hybrid"})
    assert config.own_position_chunks() == 2**20
    BSBRForCausalLM(config)


def test_learned_positions_take_an_odd_head_size_rotary_ones_do_not(tmp_path):
    # transformers fills in default rotary parameters and its check of them refused head_dim 9 with an
    # internal error, though GPT-2's learned positions read none: a GPT-2 of that shape did not convert
    from transformers import GPT2Config, GPT2LMHeadModel

    src = GPT2LMHeadModel(GPT2Config(vocab_size=97, n_embd=36, n_head=4, n_layer=1, n_positions=64,
                                     bos_token_id=0, eos_token_id=0)).eval()
    model = convert_to_bsbr(src, chunk_size=8, retrieval_blocks=8)
    ids = torch.randint(0, 97, (1, 60), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, src(ids).logits, rtol=1e-4, atol=1e-4)
    assert model.config.head_dim == 9 and model.config.rope_parameters is None
    model.save_pretrained(tmp_path)
    assert AutoModelForCausalLM.from_pretrained(tmp_path).config.head_dim == 9


@pytest.mark.parametrize("key, value", [("norm_eps", NAN), ("initializer_range", -1.0), ("gate_init", INF),
                                        ("attention_bias", "no"), ("rope_parameters", {"rope_theta": -5.0})])
def test_a_saved_config_with_a_bad_value_is_refused_on_load(tmp_path, key, value):
    model = BSBRForCausalLM(BSBRConfig(**TINY, position_type="rope"))
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg[key] = value
    (tmp_path / "config.json").write_text(json.dumps(cfg))  # NaN/Infinity: what json writes and reads
    name = "rope_theta" if key == "rope_parameters" else key
    for load in (BSBRConfig.from_pretrained, AutoConfig.from_pretrained, AutoModelForCausalLM.from_pretrained,
                 load_bsbr_model):
        with pytest.raises(ValueError, match=name):
            load(tmp_path)


@pytest.mark.parametrize("name", ["own_position_chunks", "far_shift_chunks", "attention_kwargs", "to_dict"])
def test_the_name_of_a_config_method_is_refused_as_an_option(tmp_path, name):
    # kept as an attribute by transformers, it hid the method: every model built from the config (or from a
    # config.json holding it) failed with "'int' object is not callable"
    with pytest.raises(ValueError, match=f"{name}: a method of BSBRConfig .*not an option: drop it"):
        BSBRConfig(**TINY, **{name: 3})
    BSBRForCausalLM(BSBRConfig(**TINY)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=f"{name}: a method of BSBRConfig"):
        BSBRForCausalLM.from_pretrained(tmp_path, **{name: 3})
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(cfg, **{name: 3})))
    for load in (BSBRConfig.from_pretrained, AutoModelForCausalLM.from_pretrained, load_bsbr_model):
        with pytest.raises(ValueError, match=f"{name}: a method of BSBRConfig"):
            load(tmp_path)


BAD_OPTIONS = [
    ("far_positions", dict(far_positions="windows")), ("position_scheme", dict(position_scheme="wrapped")),
    ("feature_map", dict(feature_map="elu")), ("retrieval", dict(retrieval="normalised")),
    ("compression_factor", dict(compression_factor=0)), ("compression_factor", dict(compression_factor=-2)),
    ("compression_factor", dict(compression_factor=2.5)), ("compression_factor", dict(compression_factor="2")),
    ("gate_init", dict(gate_init="a")), ("gate_init", dict(gate_init=10**400)), ("gate_init", dict(gate_init=NAN)),
    ("feature_map hedgehog", dict(retrieval="normalized", feature_map="identity")),
]


@pytest.mark.parametrize("name, bad", BAD_OPTIONS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(BAD_OPTIONS)])
def test_bad_conversion_options_are_refused_before_a_source_is_loaded(monkeypatch, name, bad):
    def no_source(*a, **k):
        raise AssertionError("the source was loaded before the options were checked")

    monkeypatch.setattr(converter, "load_source", no_source)
    with pytest.raises(ValueError, match=name):
        TransformerToBSBRConverter(**bad)
    with pytest.raises(ValueError, match=name):
        convert_to_bsbr("some/model", **bad)


def test_normalized_with_identity_is_refused_up_front_with_the_layers_message(monkeypatch):
    """retrieval='normalized' with feature_map='identity': BSBRConfig and the converter's constructor refuse
    it with the message BSBRAttention gives, before a source is loaded (not only in .convert())."""
    from bsbr import BSBRAttention

    monkeypatch.setattr(converter, "load_source", lambda *a, **k: pytest.fail("the source was loaded"))
    with pytest.raises(ValueError) as layer_error:
        BSBRAttention(16, 2, 4, retrieval="normalized", feature_map="identity")
    message = str(layer_error.value)
    assert message == "retrieval normalized needs the non-negative feature_map hedgehog: give feature_map hedgehog, or retrieval additive"
    for build in (lambda: BSBRConfig(**TINY, retrieval="normalized", feature_map="identity"),
                  lambda: TransformerToBSBRConverter(retrieval="normalized", feature_map="identity"),
                  lambda: TransformerToBSBRConverter(feature_map="identity")):  # the converter's default is normalized
        with pytest.raises(ValueError) as error:
            build()
        assert str(error.value) == message
    BSBRConfig(**TINY, retrieval="additive", feature_map="identity")  # still fine
    TransformerToBSBRConverter(retrieval="additive", feature_map="identity")


def _refused_without_unpickling(path, monkeypatch, match):
    """Every from_pretrained path refuses the folder with an OSError matching ``match``, torch.load never called."""
    def no_unpickling(*a, **k):
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", no_unpickling)
    for load in (AutoModelForCausalLM.from_pretrained, BSBRForCausalLM.from_pretrained,
                 lambda p: BSBRForCausalLM.from_pretrained(p, strict=False)):
        with pytest.raises(OSError, match=match):
            load(path)


def test_pickled_checkpoints_are_never_loaded(tmp_path, monkeypatch):
    model = BSBRForCausalLM(BSBRConfig(**TINY))
    model.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    _refused_without_unpickling(tmp_path, monkeypatch, "pickle")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_bsbr_model(tmp_path)
    with pytest.raises(TypeError, match="path must be a model directory's path, got NoneType"):
        load_bsbr_model(None)  # (pathlib's "expected str, bytes or os.PathLike object")
    with pytest.raises(FileNotFoundError, match="is a file, not a saved BSBR model directory"):
        load_bsbr_model(tmp_path / "config.json")  # (it said "no config.json")
    # asked for by name, the pickle was loaded (through torch's restricted unpickler), as the docs say it never is
    for load in (AutoModelForCausalLM.from_pretrained, BSBRForCausalLM.from_pretrained):
        with pytest.raises(ValueError, match="use_safetensors=False"):
            load(tmp_path, use_safetensors=False)


def test_a_safetensors_index_naming_pickles_is_refused(tmp_path, monkeypatch):
    """transformers loads the files a model.safetensors.index.json names, with torch.load when they are not
    safetensors: a pickle renamed .pt (with a stray .safetensors beside it) loaded silently."""
    model = BSBRForCausalLM(BSBRConfig(**TINY))
    model.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    save_file({"x": torch.zeros(1)}, tmp_path / "stray.safetensors")
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": {k: "weights.pt" for k in model.state_dict()}}))
    _refused_without_unpickling(tmp_path, monkeypatch,
                                "model.safetensors.index.json names weight files that are not safetensors")
    with pytest.raises(ValueError, match="names weight files that are not safetensors"):
        load_bsbr_model(tmp_path)


def test_the_special_token_ids_are_declared_like_a_sources():
    # fine-tuning code reads config.pad_token_id and tests it for None; the sources' configs declare all three
    bare = BSBRConfig(**TINY)
    assert (bare.pad_token_id, bare.bos_token_id, bare.eos_token_id) == (None, None, None)
    given = BSBRConfig(**TINY, pad_token_id=0, bos_token_id=1, eos_token_id=[2, 3])
    again = BSBRConfig.from_dict(given.to_dict())
    assert (again.pad_token_id, again.bos_token_id, again.eos_token_id) == (0, 1, [2, 3])


@pytest.mark.parametrize("override", [dict(far_positions="bogus"), dict(chunk_size=0), dict(position_scheme="x"),
                                      dict(local_chunks=-1)])
def test_values_set_after_a_config_was_built_are_checked_when_the_model_is(tmp_path, override):
    """from_pretrained(DIR, key=value) and a config attribute set by hand bypass BSBRConfig.__init__: a typo
    silently switched far_positions to another mode, chunk_size=0 ended in a ZeroDivisionError."""
    BSBRForCausalLM(BSBRConfig(**TINY)).save_pretrained(tmp_path)
    name = next(iter(override))
    for load in (AutoModelForCausalLM.from_pretrained, BSBRForCausalLM.from_pretrained):
        with pytest.raises(ValueError, match=name):
            load(tmp_path, **override)
    config = AutoConfig.from_pretrained(tmp_path)
    setattr(config, name, override[name])
    with pytest.raises(ValueError, match=name):
        AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("scheme", ["Clamp", "clamp ", None])
def test_a_position_scheme_set_on_a_built_model_is_checked_at_its_forward(scheme):
    # read at every forward, it was never checked there: a misspelling ran as 'wrap', without a word
    from model_sources import make_source

    model = convert_to_bsbr(make_source("gpt2"), chunk_size=8)
    ids = torch.randint(3, 90, (1, model.config.max_position_embeddings + 8))
    model.config.position_scheme = scheme
    with pytest.raises(ValueError, match=f"config.position_scheme must be one of .*, got {scheme!r}"):
        model(ids)


@pytest.mark.parametrize("field", ["retrieval_blocks", "feature_map", "head_dim"])
def test_none_set_on_a_built_models_config_is_what_a_new_config_makes_of_it(field):
    # None means the default; set after the model was built, its forward called it a change ("8 -> None") while
    # save_pretrained took it and the folder loaded as built
    from model_sources import make_source

    model = convert_to_bsbr(make_source("llama"), chunk_size=4)
    ids = torch.randint(3, 90, (1, 24))
    with torch.no_grad():
        want = model(ids).logits
        model.config.update({field: None})
        assert torch.equal(model(ids).logits, want)
    assert getattr(model.config, field) is not None  # (as a new config resolves it: distill read the None)
    model.config.update({"retrieval_blocks": 3})  # (a real change is still one)
    with pytest.raises(ValueError, match="config.retrieval_blocks was changed after this model was built"):
        model(ids)


def test_weights_holding_nan_or_inf_are_refused_by_name(tmp_path):
    from safetensors.torch import load_file, save_file

    BSBRForCausalLM(BSBRConfig(**TINY)).save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    name = sorted(k for k in weights if k.endswith("mlp.fc_in.weight"))[0]
    weights[name][0, 0] = float("nan")
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    for load in (AutoModelForCausalLM.from_pretrained, load_bsbr_model):
        with pytest.raises(ValueError, match=f"nan or inf: {name}") as e:
            load(tmp_path)
        assert str(e.value).count(str(tmp_path)) == 1, str(e.value)  # (load_bsbr_model named the folder twice)
    assert torch.isnan(BSBRForCausalLM.from_pretrained(tmp_path, strict=False).get_parameter(name)).any()
    # offloaded to disk by accelerate, a weight is on the meta device after loading: it was not checked
    pytest.importorskip("accelerate")
    with pytest.raises(ValueError, match=f"nan or inf: {name}"):
        AutoModelForCausalLM.from_pretrained(tmp_path, device_map={"": "disk"}, offload_folder=str(tmp_path / "off"))
    with pytest.raises(ValueError, match=f"nan or inf: {name.removeprefix('model.')}"):  # (its names lack model.)
        BSBRBaseModel.from_pretrained(tmp_path, device_map={"": "disk"}, offload_folder=str(tmp_path / "off2"))


def test_only_the_weight_files_transformers_loads_are_read(tmp_path, monkeypatch):
    """Another .safetensors file beside the model (a user's token cache) made the strict checks refuse it; a
    file path was loaded with torch.load (a .bin pickle unpickled, config.json "unpickled")."""
    from safetensors.torch import save_file

    model = BSBRForCausalLM(BSBRConfig(**TINY))
    model.save_pretrained(tmp_path / "m")
    save_file({"ids": torch.arange(10)}, tmp_path / "m" / "token_cache.safetensors")
    for load in (AutoModelForCausalLM.from_pretrained, load_bsbr_model):
        load(tmp_path / "m")
    torch.save(model.state_dict(), tmp_path / "weights.bin")

    def unpickled(*args, **kwargs):
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", unpickled)
    for path in (tmp_path / "weights.bin", tmp_path / "m" / "config.json", tmp_path / "m" / "model.safetensors"):
        with pytest.raises(OSError, match="is a file, not a model folder: give the folder save_pretrained wrote"):
            BSBRForCausalLM.from_pretrained(path, config=model.config)
        with pytest.raises(OSError):  # (transformers' Auto class refuses a file path before it)
            AutoModelForCausalLM.from_pretrained(path, config=model.config)


def test_a_missing_shard_is_named_not_blamed_on_the_config(tmp_path):
    """With the last shards missing (a partial copy), the layer count check read the shards left and blamed
    config.json's num_hidden_layers; transformers names the missing file."""
    BSBRForCausalLM(BSBRConfig(**dict(TINY, num_hidden_layers=3))).save_pretrained(tmp_path, max_shard_size="4KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    gone = sorted({f for name, f in index.items() if ".layers.2." in name})  # (the shards of the last layer)
    assert gone and len(gone) < len(set(index.values()))
    for shard in gone:
        (tmp_path / shard).unlink()
    with pytest.raises(Exception, match="|".join(gone)):
        load_bsbr_model(tmp_path)


def test_a_config_json_edit_of_another_size_is_refused_before_the_model_is_built(tmp_path):
    """Edits of intermediate_size or head_dim built the edited model in full before the strict check named the
    weights (intermediate_size 2,000,000: 2.7 GB for a 0.05M-parameter model); now its shapes are compared, on the
    meta device, with the weights' headers."""
    from transformers import AutoModelForCausalLM

    BSBRForCausalLM(BSBRConfig(**TINY)).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    for field, value, weight in (("intermediate_size", 10**7, "mlp"), ("head_dim", 10**6, "q_proj")):
        (tmp_path / "config.json").write_text(json.dumps(dict(saved, **{field: value})))
        for load in (BSBRForCausalLM.from_pretrained, AutoModelForCausalLM.from_pretrained, load_bsbr_model,
                     lambda d: BSBRForCausalLM.from_pretrained(d, dtype="auto", use_cache=False)):
            # (a loading option that config.json also holds, dtype or use_cache, is not the culprit; "auto" was
            # read as a torch dtype: no check, and the whole model built)
            with pytest.raises(ValueError, match=rf"{re.escape(str(tmp_path / 'config.json'))}: it builds "
                                                 rf"model\.layers\.0\.\S*{weight}\S* of shape .*, the weights hold "
                                                 r".*: give the config the model was saved with"):
                load(tmp_path)
    # written by another transformers (its version recorded): the edit was blamed on from_pretrained's arguments
    (tmp_path / "config.json").write_text(json.dumps(dict(saved, intermediate_size=10**7, transformers_version="4.0")))
    with pytest.raises(ValueError, match=rf"^{re.escape(str(tmp_path / 'config.json'))}: it builds"):
        AutoModelForCausalLM.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="the config from_pretrained was given .* it builds model.layers.0.mlp"):
        BSBRForCausalLM.from_pretrained(tmp_path, intermediate_size=10**7)
    # any field of the config given as a keyword (only five sizes were read: a 2.2 GB build, then a load report)
    with pytest.raises(ValueError, match="the config from_pretrained was given .* it builds model.layers.0.attn."):
        BSBRForCausalLM.from_pretrained(tmp_path, num_attention_heads=10**6, num_key_value_heads=2)
    # sizes no model has: 10^19 failed in torch's allocator with a C++ frame dump, a head_dim of 2^31 took 13 GB
    for field, value in (("intermediate_size", 10**19), ("head_dim", 2**31)):
        with pytest.raises(ValueError, match=f"{field} must be at most 16,777,216"):
            BSBRConfig(**dict(TINY, **{field: value}))


def test_a_folder_holding_a_variant_or_other_weights_alone_is_named_as_such(tmp_path):
    # a save_pretrained(DIR, variant="fp16") folder passed the "any .safetensors" check, then failed in transformers
    # ("no file named model.safetensors"), with nothing to do
    model = BSBRForCausalLM(BSBRConfig(**TINY))
    model.save_pretrained(tmp_path / "v", variant="fp16")
    with pytest.raises(FileNotFoundError, match=r"holds the weights of a save_pretrained variant "
                                                r"\(model.fp16.safetensors\), not model.safetensors: save it without"):
        load_bsbr_model(tmp_path / "v")
    BSBRForCausalLM.from_pretrained(tmp_path / "v", variant="fp16")  # (as the message says)
    (tmp_path / "v" / "model.fp16.safetensors").rename(tmp_path / "v" / "adapter_model.safetensors")
    with pytest.raises(FileNotFoundError, match=r"has no model.safetensors \(adapter_model.safetensors is not the "
                                                r"model's\): save it with save_pretrained"):
        load_bsbr_model(tmp_path / "v")


def test_a_subfolder_is_named_in_the_refusals(tmp_path):
    # a mistyped subfolder of a local folder was read as a hub id (23 s of retries, then "the hub cannot be
    # reached"); a broken checkpoint in a subfolder was named by its root
    from safetensors.torch import load_file, save_file

    BSBRForCausalLM(BSBRConfig(**TINY)).save_pretrained(tmp_path / "m")
    with pytest.raises(FileNotFoundError, match=f"{re.escape(str(tmp_path / 'mm'))} does not exist .subfolder 'mm'"):
        BSBRForCausalLM.from_pretrained(str(tmp_path), subfolder="mm")
    weights = load_file(tmp_path / "m" / "model.safetensors")
    weights.pop(sorted(weights)[0])
    save_file(weights, tmp_path / "m" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=f"the BSBR checkpoint {re.escape(str(tmp_path / 'm'))} does not match"):
        BSBRForCausalLM.from_pretrained(str(tmp_path), subfolder="m")


def test_a_save_in_the_other_layout_removes_the_earlier_saves_file(tmp_path):
    """A sharded save over a single-file one left model.safetensors, which transformers loads first: the old
    weights, silently (and a single-file save over a sharded one left its index)."""
    model = BSBRForCausalLM(BSBRConfig(**TINY))
    ids = torch.tensor([[5, 6, 7, 8]])
    for shard in ("4KB", None, "4KB"):
        with torch.no_grad():
            model.lm_head.weight.add_(1.0)
            want = model(ids).logits
        model.save_pretrained(tmp_path, **({"max_shard_size": shard} if shard else {}))
        assert (tmp_path / "model.safetensors").is_file() != bool(shard)
        assert (tmp_path / "model.safetensors.index.json").is_file() == bool(shard)
        with torch.no_grad():
            torch.testing.assert_close(BSBRForCausalLM.from_pretrained(tmp_path)(ids).logits, want)


def test_strict_false_loads_a_weight_of_another_shape_as_the_refusal_says(tmp_path):
    # the refusal said "from_pretrained(..., strict=False) loads it anyway"; transformers then refused it
    from safetensors.torch import load_file, save_file

    BSBRForCausalLM(BSBRConfig(**TINY)).save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    name = sorted(k for k in weights if k.endswith("mlp.fc_in.weight"))[0]
    weights[name] = torch.zeros(3, 3)
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="strict=False\\) loads it anyway"):
        AutoModelForCausalLM.from_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, strict=False)
    assert model.get_parameter(name).shape != (3, 3)  # the config's shape, initialised


@pytest.mark.parametrize("field, value", [("num_hidden_layers", 5000), ("vocab_size", 10**9), ("hidden_size", 10**6)])
def test_a_hand_edited_size_is_refused_before_the_model_is_built(tmp_path, monkeypatch, field, value):
    # 30 layers edited to 300 built 300 layers (4.3 GB, 11 s) before the strict check named the missing weights;
    # a vocabulary of 10^9 asked for 192 GB ("could not load ...: can't allocate memory")
    import json

    BSBRForCausalLM(BSBRConfig(**TINY)).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, field: value}))
    monkeypatch.setattr(BSBRForCausalLM, "__init__", lambda *a, **k: pytest.fail("the model was built"))
    for load in (AutoModelForCausalLM.from_pretrained, load_bsbr_model):
        with pytest.raises(ValueError, match=f"config.json: {field} is {value}, the weights"):
            load(tmp_path)
    # the config from_pretrained is given (not the file's), and its keyword arguments, are the ones checked
    monkeypatch.undo()
    assert BSBRForCausalLM.from_pretrained(tmp_path, config=BSBRConfig(**TINY)).config.vocab_size == TINY["vocab_size"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"from_pretrained's {field}: {field} is {value}, the weights"):
        BSBRForCausalLM.from_pretrained(tmp_path, **{field: value})


def test_bsbr_models_argument_names_are_refused_and_a_dropout_is_warned_of(caplog, tmp_path):
    # BSBRModel's names were kept as unread attributes: BSBRConfig(hidden_dim=128, num_layers=2, ...) built the
    # defaults' 12 layers of 768 (89M parameters), and dropout=0.1 a model without dropout, without a word
    with pytest.raises(ValueError, match=r"^hidden_dim 128, num_layers 2: BSBRModel's names, not BSBRConfig fields: "
                                         r"give hidden_size, num_hidden_layers \(the config has hidden_size 768, "
                                         r"num_hidden_layers 12\)$"):
        BSBRConfig(hidden_dim=128, num_layers=2)
    with pytest.raises(ValueError, match="^ff_dim 512: BSBRModel's name, not a BSBRConfig field: give "
                                         "intermediate_size"):
        BSBRConfig(ff_dim=512)
    # a config saved with them beside the fields they name loads, and drops them (an earlier bsbr saved them, unread,
    # beside the fields the weights were built with: they disagree)
    BSBRForCausalLM(BSBRConfig(**TINY)).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**saved, "hidden_dim": 128, "dropout": 0.1}))
    with caplog.at_level("WARNING", logger="bsbr.models.bsbr.configuration_bsbr"):
        model = AutoModelForCausalLM.from_pretrained(tmp_path)
        BSBRConfig(attention_dropout=0.0)
    assert "hidden_dim" not in model.config.to_dict() and "dropout" not in model.config.to_dict()
    assert f"config: hidden_dim=128: BSBRModel's names, which an earlier bsbr saved unread: dropped (the model has " \
        f"hidden_size={TINY['hidden_size']})" in caplog.text
    assert caplog.text.count("dropout=0.1: bsbr's decoder has no dropout") == 1, caplog.text  # (once, not per build)
    # without the field it names, the value is not dropped for the default: refused, as by the constructor
    with pytest.raises(ValueError, match="hidden_dim 48: BSBRModel's name"):
        BSBRConfig.from_dict({k: v for k, v in saved.items() if k != "hidden_size"} | {"hidden_dim": 48})
    caplog.clear()
    with caplog.at_level("WARNING", logger="bsbr.models.bsbr.configuration_bsbr"):
        BSBRConfig(dropout=0.1, resid_pdrop=0.2)
    assert "dropout=0.1, resid_pdrop=0.2: bsbr's decoder has no dropout" in caplog.text


def test_a_strict_refusal_says_why_without_transformers_report_first(tmp_path, caplog):
    # a state_dict (or a config from memory) lacking a weight was blamed on "an earlier bsbr (config.json records
    # no bsbr_version)", as "the BSBR checkpoint None"; transformers' report that the weight "was newly
    # initialized" was printed before the refusal
    from model_sources import make_source

    model = convert_to_bsbr(make_source("llama"), chunk_size=8)
    weights = {k: v for k, v in model.state_dict().items() if k != "model.norm.weight"}
    with caplog.at_level("WARNING"), pytest.raises(ValueError, match=r"^the BSBR checkpoint given as state_dict does "
                                                                     r"not match its config: .*model.norm.weight.* "
                                                                     r"strict=False\) loads it anyway\)$"):
        BSBRForCausalLM.from_pretrained(None, config=model.config, state_dict=weights)
    copied = BSBRConfig.from_dict(model.config.to_dict())  # (to_dict records transformers' version, not bsbr's)
    with pytest.raises(ValueError, match="strict=False\\) loads it anyway\\)$"):
        BSBRForCausalLM.from_pretrained(None, config=copied, state_dict=weights)
    model.save_pretrained(tmp_path / "m")
    save_file(weights, tmp_path / "m" / "model.safetensors", metadata={"format": "pt"})
    with caplog.at_level("WARNING"), pytest.raises(ValueError, match="loads it anyway"):
        load_bsbr_model(tmp_path / "m")
    assert "LOAD REPORT" not in caplog.text and "earlier bsbr" not in caplog.text
    from transformers import AutoModelForSequenceClassification

    model.save_pretrained(tmp_path / "lm")  # a load that is accepted still reports its new weights
    with caplog.at_level("WARNING"):
        AutoModelForSequenceClassification.from_pretrained(tmp_path / "lm", num_labels=2)
    assert "LOAD REPORT" in caplog.text and "score.weight" in caplog.text


def test_a_load_holds_back_its_own_report_not_another_threads(monkeypatch):
    # the held report's filter sat on transformers' logger for every thread: an accepted load's report was lost
    # when a refused load ran beside it
    import threading

    from bsbr.models.bsbr.modeling_bsbr import _HeldReport

    held = _HeldReport()

    def record():
        return logging.LogRecord("transformers.modeling_utils", logging.WARNING, "", 0, "X LOAD REPORT", None, None)

    monkeypatch.setattr(logging, "logThreads", False)  # (records carry no thread then)
    mine = record()
    assert not held.filter(mine) and held.records == [mine]
    passed = []
    t = threading.Thread(target=lambda: passed.append(held.filter(record())))
    t.start()
    t.join()
    assert passed == [True] and held.records == [mine]


def test_a_dropout_given_to_from_pretrained_loads_as_for_a_llama(tmp_path, caplog):
    # fine-tuning scripts pass attention_dropout for any Llama-family model: transformers gave it, unknown to the
    # config, to the model's constructor (a TypeError), and AutoConfig dropped a non-zero one without a word
    from transformers import AutoModelForSequenceClassification

    BSBRForCausalLM(BSBRConfig(**TINY)).save_pretrained(tmp_path)
    AutoModelForCausalLM.from_pretrained(tmp_path, attention_dropout=0.0, resid_pdrop=0.0)
    with caplog.at_level("WARNING", logger="bsbr.models.bsbr.configuration_bsbr"):
        AutoModelForSequenceClassification.from_pretrained(tmp_path, attention_dropout=0.1, num_labels=2)
    assert "attention_dropout=0.1: bsbr's decoder has no dropout" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="bsbr.models.bsbr.configuration_bsbr"):
        assert not hasattr(AutoConfig.from_pretrained(tmp_path, embd_pdrop=0.2), "embd_pdrop")
    assert "embd_pdrop=0.2: bsbr's decoder has no dropout" in caplog.text
    # the token-classification head's own dropout is kept and read (it was dropped with a note saying no dropout)
    from transformers import AutoModelForTokenClassification

    caplog.clear()
    with caplog.at_level("WARNING"):
        tok = AutoModelForTokenClassification.from_pretrained(tmp_path, classifier_dropout=0.0, num_labels=3)
    assert tok.dropout.p == 0.0 and tok.config.classifier_dropout == 0.0 and "no dropout" not in caplog.text
    tok = AutoModelForTokenClassification.from_pretrained(tmp_path, hidden_dropout=0.0, num_labels=3)
    assert tok.dropout.p == 0.0  # (transformers' generic head reads it without classifier_dropout, as for a llama)
    caplog.clear()
    with caplog.at_level("WARNING"):  # (another model reads neither: said, as the other dropout options are)
        AutoModelForCausalLM.from_pretrained(tmp_path, hidden_dropout=0.1)
    assert "hidden_dropout=0.1 is not read: bsbr's decoder has no dropout" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):  # (the token head reads the first given: the other one alone is said)
        tok = AutoModelForTokenClassification.from_pretrained(tmp_path, classifier_dropout=0.3, hidden_dropout=0.4,
                                                              num_labels=3)
    assert tok.dropout.p == 0.3 and "classifier_dropout=0.3 is not read" not in caplog.text
    assert "hidden_dropout=0.4 is not read" in caplog.text
    for bad in (1.5, 1.0, -0.1, "x", float("nan")):  # (1.0 would drop every feature the head reads)
        with pytest.raises(ValueError, match="^classifier_dropout must be"):
            BSBRConfig(classifier_dropout=bad)


def test_a_config_of_the_retired_second_block_score_loads_with_a_warning(caplog):
    # development versions wrote window_scored_blocks; it stayed on the config, unread, without a word
    with caplog.at_level("WARNING", logger="bsbr.models.bsbr.configuration_bsbr"):
        config = BSBRConfig(retrieval_blocks=8, window_scored_blocks=2)
    assert "window_scored_blocks, a retired option" in caplog.text
    assert "window_scored_blocks" not in config.to_dict()
    caplog.clear()
    assert "window_scored_blocks" not in BSBRConfig(retrieval_blocks=8, window_scored_blocks=0).to_dict()
    assert not caplog.text


def test_legacy_rope_keys_are_read_not_dropped(tmp_path):
    """A top-level rope_theta (code or a config.json written for older transformers) was dropped for the
    default 10,000: the model loaded without a word and its logits moved by up to 6."""
    from model_sources import make_source

    assert BSBRConfig(position_type="rope", rope_theta=500.0).rope_parameters == {"rope_type": "default",
                                                                                  "rope_theta": 500.0}
    assert BSBRConfig(position_type="rope", rope_theta=5e5, rope_scaling={"type": "linear", "factor": 2.0}
                      ).rope_parameters == {"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5}
    model = convert_to_bsbr(make_source("llama"), chunk_size=16)  # rope_theta 500
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["rope_theta"] = config.pop("rope_parameters")["rope_theta"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = torch.randint(3, 97, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_the_saved_folder_says_which_bsbr_wrote_it_and_a_newer_one_is_warned_of(tmp_path, caplog):
    # a folder written by a newer bsbr ran on an older one with the options it added dropped, without a word
    from model_sources import make_source

    import bsbr

    convert_to_bsbr(make_source("llama"), chunk_size=8).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["bsbr_version"] == bsbr.__version__
    (tmp_path / "config.json").write_text(json.dumps(dict(config, bsbr_version="99.0")))
    from transformers import AutoModelForSequenceClassification

    for load in (load_bsbr_model, AutoModelForCausalLM.from_pretrained,
                 AutoModelForSequenceClassification.from_pretrained):
        caplog.clear()
        with caplog.at_level("WARNING"):
            load(tmp_path)
        newer = f"saved by bsbr 99.0, and this is bsbr {bsbr.__version__}: options added"
        assert caplog.text.count(newer) == 1, (load, caplog.text)  # (the Auto classes said it twice: AutoConfig
        # read the config, then the model's constructor built it again)
    (tmp_path / "config.json").write_text(json.dumps(config))  # (written by this bsbr: nothing to say)
    with caplog.at_level("WARNING"):
        caplog.clear()
        load_bsbr_model(tmp_path)
    assert "saved by bsbr" not in caplog.text


def test_a_note_is_said_for_each_of_two_loads_at_once_in_threads(tmp_path, caplog):
    # the notes said were shared by the threads: two old folders loaded at once said one note between them
    import threading

    from model_sources import make_source

    for name in ("a", "b"):
        convert_to_bsbr(make_source("llama"), chunk_size=8).save_pretrained(tmp_path / name)
        _as_saved_before_versions(tmp_path / name)
    for _ in range(3):
        caplog.clear()
        start = threading.Barrier(2)
        threads = [threading.Thread(target=lambda n=n: (start.wait(), load_bsbr_model(tmp_path / n))) for n in "ab"]
        with caplog.at_level("WARNING"):
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        assert caplog.text.count("config.json records no bsbr_version") == 2, caplog.text


def _as_saved_before_versions(folder, drop=(), **extra):
    """config.json of ``folder`` as an earlier bsbr wrote it: no bsbr_version or auto_map, ``drop`` lost."""
    config = json.loads((folder / "config.json").read_text())
    for name in ("bsbr_version", "auto_map", *drop):
        config.pop(name)
    (folder / "config.json").write_text(json.dumps(dict(config, **extra)))


def test_a_bsbr_0_2_0_folder_loads_with_the_window_it_was_built_with(tmp_path):
    # bsbr 0.2.0 saved no window keys (chunk-local attention + chunk states): they took this bsbr's defaults
    # (2 chunks, 4 sinks, 8 blocks) and the logits changed silently; its meta keys were kept as unread attributes
    from model_sources import make_source

    model = convert_to_bsbr(make_source("llama"), chunk_size=8, local_chunks=1, sink_tokens=0, retrieval_blocks=0,
                            gate_init=0.5)
    model.save_pretrained(tmp_path)
    _as_saved_before_versions(tmp_path, drop=("local_chunks", "sink_tokens", "retrieval_blocks", "far_positions",
                                              "recall_tokens"),
                              meta="shared", meta_dim=None, meta_init="qk", retrieval_top_k=None, retrieval_mass=None)
    loaded = load_bsbr_model(tmp_path)
    assert (loaded.config.local_chunks, loaded.config.sink_tokens, loaded.config.retrieval_blocks) == (1, 0, 0)
    assert not any(hasattr(loaded.config, k) for k in ("meta_init", "retrieval_top_k", "retrieval_mass"))
    ids = torch.randint(3, 97, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_rope_parameters_without_rope_theta_given_after_the_config_was_built_are_refused(tmp_path):
    # from_pretrained(DIR, rope_parameters={"rope_type": "default"}) read theta 10000 for the saved 500 (logits 6.6
    # off, silently); with a linear scaling, a bare TypeError. A new config without it takes transformers' default.
    from model_sources import make_source

    convert_to_bsbr(make_source("llama"), chunk_size=8).save_pretrained(tmp_path)
    for rope in ({"rope_type": "default"}, {"rope_type": "linear", "factor": 2.0}):
        with pytest.raises(ValueError, match="rope_parameters has no rope_theta on a rotary model"):
            AutoModelForCausalLM.from_pretrained(tmp_path, rope_parameters=rope)
        # the legacy name: transformers fills in rope_theta None, which the check read as given ("must be a finite
        # number > 0, got None")
        with pytest.raises(ValueError, match="rope_parameters has no rope_theta on a rotary model"):
            AutoModelForCausalLM.from_pretrained(tmp_path, rope_scaling=dict(rope))  # (transformers edits it)
        config = BSBRConfig(**{**TINY, "position_type": "rope"}, rope_parameters=rope)
        assert config.rope_parameters == {**rope, "rope_theta": 10000.0} and "rope_theta" not in rope
        AutoModelForCausalLM.from_config(config)


def test_hybrid_positions_that_compute_as_window_are_told_when_a_model_is_built(tmp_path, caplog):
    # the converter refuses them; given to from_pretrained (or saved by an earlier bsbr) they ran as 'window' and
    # were saved as 'hybrid' without a word
    from model_sources import make_source

    convert_to_bsbr(make_source("llama"), chunk_size=512).save_pretrained(tmp_path)  # (2,048 positions)
    with caplog.at_level(logging.WARNING, logger="bsbr"):
        model = AutoModelForCausalLM.from_pretrained(tmp_path, far_positions="hybrid")
    assert model.config.own_position_chunks() == 0
    assert sum("far_positions 'hybrid' reads far keys" in r.getMessage() and "it would be 'window' here" in
               r.getMessage() for r in caplog.records) == 1
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="bsbr"):
        AutoModelForCausalLM.from_pretrained(tmp_path)
    assert not any("hybrid" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("retired", [dict(retrieval_top_k=2), dict(meta="linear"), dict(meta_dim=4),
                                     dict(feature_map="elu"), dict(retrieval_mass=1.0)])
def test_options_an_earlier_bsbr_had_are_refused_by_name(tmp_path, retired):
    from model_sources import make_source

    convert_to_bsbr(make_source("llama"), chunk_size=8).save_pretrained(tmp_path)
    _as_saved_before_versions(tmp_path, **retired)
    (name, value), = retired.items()
    with pytest.raises(ValueError, match=f"config.json sets {name}={value!r}: an option of an earlier bsbr .* "
                                         "convert the source again"):
        load_bsbr_model(tmp_path)


def test_a_folder_saved_when_blocks_were_scored_otherwise_is_warned_of(tmp_path, caplog):
    from model_sources import make_source

    convert_to_bsbr(make_source("llama"), chunk_size=8).save_pretrained(tmp_path)
    _as_saved_before_versions(tmp_path, drop=("recall_tokens",))  # (2026-11-29/30: no recall_tokens yet)
    with caplog.at_level("WARNING"):
        load_bsbr_model(tmp_path)
    assert caplog.text.count("scored retrieval blocks by bounds of their keys (retired)") == 1
    convert_to_bsbr(make_source("llama"), chunk_size=8).save_pretrained(tmp_path / "now")
    caplog.clear()
    with caplog.at_level("WARNING"):
        load_bsbr_model(tmp_path / "now")
    assert "retrieval blocks" not in caplog.text


def test_each_load_and_each_command_says_its_notes(tmp_path, caplog):
    # the notes were said once per process, by their text: a second old folder (or a second command run in one
    # program) loaded without its warning, as if it were a folder of today
    from model_sources import make_source

    from bsbr.cli import main

    from word_tokenizer import build_word_tokenizer

    for name in ("a", "b"):
        convert_to_bsbr(make_source("llama"), chunk_size=8).save_pretrained(tmp_path / name)
        _as_saved_before_versions(tmp_path / name)
    build_word_tokenizer().save_pretrained(tmp_path / "a")
    note = "config.json records no bsbr_version"
    for name in ("a", "b", "a"):
        caplog.clear()
        with caplog.at_level("WARNING"):
            load_bsbr_model(tmp_path / name)
            AutoModelForCausalLM.from_pretrained(tmp_path / name)
        assert caplog.text.count(note) == 2, (name, caplog.text)  # (once per load, though each builds its config
        # several times)
    for _ in range(2):
        caplog.clear()
        with caplog.at_level("WARNING"):
            assert main(["generate", str(tmp_path / "a"), "--prompt", "w1 w2", "--max-new-tokens", "1"]) == 0
        assert caplog.text.count(note) == 1, caplog.text


def test_weights_an_earlier_bsbr_built_are_refused_as_its(tmp_path):
    # (the refusal offered strict=False, which loads a model that computes something else)
    from model_sources import make_source
    from safetensors.torch import load_file

    convert_to_bsbr(make_source("llama"), chunk_size=8).save_pretrained(tmp_path)
    _as_saved_before_versions(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    weights["model.layers.0.attn.meta_h_proj.weight"] = torch.zeros(4, 4)
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    for load in (load_bsbr_model, AutoModelForCausalLM.from_pretrained):  # (the Auto classes pass the config read)
        with pytest.raises(ValueError, match="saved by an earlier bsbr .*convert the source again") as e:
            load(tmp_path)
        assert "strict=False" not in str(e.value)
    convert_to_bsbr(make_source("llama"), chunk_size=8).save_pretrained(tmp_path / "now")  # a config of the
    with pytest.raises(ValueError, match="strict=False\\) loads it anyway\\)$"):  # caller's (another folder's)
        BSBRForCausalLM.from_pretrained(tmp_path, config=BSBRConfig.from_pretrained(tmp_path / "now"))  # is not
        # this folder's: the mismatch is the caller's


def test_a_dict_that_no_save_wrote_builds_the_config_its_keywords_do():
    # (only a config.json save_pretrained wrote, which records transformers_version, is read as an earlier bsbr's)
    kw = dict(TINY, position_type="rope", gate_init=0.5)
    for config in (BSBRConfig.from_dict(kw), AutoConfig.for_model("bsbr", **kw)):
        assert config.to_dict() == BSBRConfig(**kw).to_dict()
        assert (config.local_chunks, config.sink_tokens, config.retrieval_blocks) == (2, 4, 8)


def test_each_window_option_an_earlier_save_lacks_is_read_as_it_computed_then(tmp_path):
    # a save of 2026-11-28 had local_chunks and sink_tokens, not yet retrieval_blocks: it took 8 (logits 5-10 off)
    from model_sources import make_source

    # nor far_positions: its sinks were read at their own positions (window took them to the window's: 7.45 off)
    model = convert_to_bsbr(make_source("llama"), chunk_size=8, retrieval_blocks=0, far_positions="absolute")
    model.save_pretrained(tmp_path)
    _as_saved_before_versions(tmp_path, drop=("retrieval_blocks", "recall_tokens", "far_positions"))
    loaded = load_bsbr_model(tmp_path)
    assert (loaded.config.local_chunks, loaded.config.sink_tokens, loaded.config.retrieval_blocks) == (2, 4, 0)
    assert loaded.config.far_positions == "absolute"
    ids = torch.randint(3, 97, (1, 90), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_a_save_that_names_its_block_router_bounds_is_warned_of_as_such(tmp_path, caplog):
    from model_sources import make_source

    convert_to_bsbr(make_source("llama"), chunk_size=8).save_pretrained(tmp_path)
    _as_saved_before_versions(tmp_path, block_router="bounds")  # (2026-11-30: recall_tokens recorded already)
    with caplog.at_level("WARNING"):
        loaded = load_bsbr_model(tmp_path)
    assert "scored retrieval blocks by bounds of their keys (retired)" in caplog.text
    assert not hasattr(loaded.config, "block_router")


def test_a_none_set_on_a_config_builds_what_a_new_config_resolves_it_to():
    # the constructor resolves None (retrieval_blocks: 8, or 0 with recall_tokens; head_dim from the sizes); set
    # on a config afterwards (update, from_pretrained's overrides) it was refused by the layers, as "dim"
    want = BSBRConfig(**{**TINY, "recall_tokens": 16, "retrieval_blocks": None})
    config = BSBRConfig(**TINY)
    config.update({"recall_tokens": 16, "retrieval_blocks": None, "head_dim": None})
    model = AutoModelForCausalLM.from_config(config)
    assert model.config.retrieval_blocks == want.retrieval_blocks == 0
    assert model.config.head_dim == want.head_dim
    assert sorted(model.state_dict()) == sorted(AutoModelForCausalLM.from_config(want).state_dict())


def test_rope_parameters_set_to_none_after_the_config_was_built_is_refused(tmp_path):
    # from_pretrained(DIR, rope_scaling=None) took a new config's rotary default (theta 10000 for the saved 500):
    # logits 5 off, silently
    from model_sources import make_source

    convert_to_bsbr(make_source("llama"), chunk_size=8).save_pretrained(tmp_path)
    for override in ("rope_parameters", "rope_scaling"):
        with pytest.raises(ValueError, match="rope_parameters is None on a rotary model"):
            AutoModelForCausalLM.from_pretrained(tmp_path, **{override: None})


@pytest.mark.parametrize("retired", [dict(retrieval_top_k=2), dict(retrieval_mass=1.0), dict(meta="linear")])
def test_options_an_earlier_bsbr_had_are_refused_by_name_when_given_in_python(retired):
    # kept unread: the model built and saved, then its folder was refused on loading ("convert the source again")
    (name, value), = retired.items()
    with pytest.raises(ValueError, match=f"BSBRConfig\\({name}={value!r}\\): an option of an earlier bsbr"):
        BSBRConfig(**TINY, **retired)
    assert not hasattr(BSBRConfig(**TINY, retrieval_mass=None), "retrieval_mass")


def test_a_retired_option_set_on_a_config_is_refused_when_it_is_saved(tmp_path):
    # config.update put it there, the save succeeded, and the folder was refused on loading
    config = BSBRConfig(**TINY)
    config.update({"retrieval_top_k": 3})
    with pytest.raises(ValueError, match="this config sets retrieval_top_k=3: an option of an earlier bsbr"):
        config.save_pretrained(tmp_path / "c")
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("edit,told", [
    (dict(rope_parameters={"rope_type": "linear", "rope_theta": 500.0}), "Missing required keys in `rope_parameters`"),
    (dict(rope_parameters={"rope_type": "linear", "factor": "4"}), r"rope_parameters\['factor'\] must be None or a"),
    (dict(rope_parameters={"rope_type": "linear", "factor": 0}), r"rope_parameters\['factor'\] must be None or a"),
    (dict(eos_token_id="2"), "eos_token_id must be a token id .an int., a list of them or null, got '2'"),
    (dict(pad_token_id=[1, "x"]), "pad_token_id must be a token id"),
    (dict(bos_token_id=True), "bos_token_id must be a token id")])
def test_rope_parameters_and_token_ids_of_the_wrong_kind_are_named(edit, told):
    # a rope_type's missing key was a KeyError (bsbr eval: "internal error"); a factor of "4" failed in the rope
    # init naming nothing ("'<=' not supported"), one of 0 as "inv_freq must hold only finite values"; an
    # eos_token_id of "2" failed inside generate ("new(): invalid data type 'str'")
    with pytest.raises(ValueError, match=told):
        BSBRConfig(**{**TINY, **edit})


def test_rope_scaling_and_token_ids_sources_hold_are_kept():
    for rope in ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "mscale_all_dim": 0},
                 {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192, "rope_theta": 500000.0}):
        assert BSBRConfig(**TINY, rope_parameters=rope).rope_parameters["factor"] == rope["factor"]
    assert BSBRConfig(**TINY, eos_token_id=[1, 2], pad_token_id=-1).eos_token_id == [1, 2]
    # null: the rope type's default (transformers reads it so); an empty eos list: no end token
    BSBRConfig(**TINY, rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                                        "attention_factor": None, "mscale": None, "mscale_all_dim": None})
    assert BSBRConfig(**TINY, eos_token_id=[]).eos_token_id == []


def test_a_config_its_own_checks_refuse_is_not_saved(tmp_path):
    # AutoConfig.from_pretrained(DIR, recall_tokens=16) (retrieval_blocks kept) or update() skip __init__'s checks:
    # the save wrote a config.json that bsbr then refused to load
    from transformers import AutoConfig

    BSBRConfig(**TINY, retrieval_blocks=2).save_pretrained(tmp_path / "c")
    before = (tmp_path / "c" / "config.json").read_bytes()
    for edit in (dict(recall_tokens=16), dict(chunk_size="x"), dict(far_positions="hybird")):
        config = AutoConfig.from_pretrained(tmp_path / "c", **edit)
        with pytest.raises(ValueError, match=r"^this config would not load once saved \(.+\): set it right before "):
            config.save_pretrained(tmp_path / "c")
        assert (tmp_path / "c" / "config.json").read_bytes() == before


def test_a_retired_value_of_a_current_option_is_refused_on_saving_with_advice_that_keeps_it(tmp_path):
    config = BSBRConfig(**TINY, retrieval="additive", feature_map="hedgehog")
    config.update({"feature_map": "elu"})
    with pytest.raises(ValueError, match="feature_map: hedgehog or identity") as e:
        config.save_pretrained(tmp_path / "c")
    assert "feature_map='elu'" in str(e.value)
    model = BSBRForCausalLM(BSBRConfig(**TINY))
    model.config.update({"retrieval_top_k": 3})
    with pytest.raises(ValueError, match="retrieval_top_k=3"):  # (before transformers makes the folder)
        model.save_pretrained(tmp_path / "m", state_dict=model.state_dict())
    assert not (tmp_path / "m").exists()


def test_a_compression_factor_that_divides_hedgehogs_doubled_features_builds_a_model():
    # hedgehog's features are [softmax(xW), softmax(-xW)]: twice head_dim; a factor dividing them (16 with
    # head_dim 8) is a model that builds and runs, and one dividing neither (3) is refused naming both sizes
    config = BSBRConfig(**{**TINY, "hidden_size": 32, "num_attention_heads": 4}, compression_factor=16,
                        feature_map="hedgehog", retrieval="normalized")
    model = BSBRForCausalLM(config).eval()
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(0, 97, (1, 20))).logits).all()
    with pytest.raises(ValueError, match=r"compression_factor \(3\) must divide the chunk states' feature dim \(16: "
                       r"head_dim 8 x 2 for hedgehog\)"):
        BSBRConfig(**{**TINY, "hidden_size": 32, "num_attention_heads": 4}, compression_factor=3)


def test_a_config_differs_from_its_record_beyond_float32_rounding_and_by_any_key(tmp_path, caplog):
    # a GGUF source stores its floats in float32 (1e-5 reads back as 9.99999975e-06): not an edit of config.json;
    # a rope_parameters that lost a key (yarn's attention_factor) is one, though every key it kept is equal
    from bsbr.arguments import check_bsbr_dir

    rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16}
    BSBRForCausalLM(BSBRConfig(**TINY, norm_eps=9.99999975e-06, position_type="rope",
                               rope_parameters=rope)).save_pretrained(tmp_path)
    (tmp_path / "conversion.json").write_text(json.dumps(dict(source=dict(name="x", architecture=dict(
        norm_eps=1e-05, rope_parameters={**rope, "attention_factor": 2.0})))))
    with caplog.at_level("WARNING", logger="bsbr.arguments"):
        check_bsbr_dir(tmp_path, "MODEL_DIR")
    assert "norm_eps" not in caplog.text
    assert "config.json's rope_parameters is" in caplog.text


def test_a_config_saved_without_a_version_reads_a_null_default_as_it_was_then_and_others_keep_theirs(tmp_path):
    from model_sources import make_source

    from bsbr.models.bsbr.configuration_bsbr import missing_defaults

    filled = missing_defaults({"retrieval_blocks": None, "feature_map": None})
    assert (filled["retrieval_blocks"], filled["feature_map"]) == (8, "hedgehog")  # (null: the default derived)
    make_source("llama").save_pretrained(tmp_path / "llama")  # another model type's folder: not an earlier bsbr's
    config = BSBRConfig.from_pretrained(tmp_path / "llama")
    assert (config.local_chunks, config.sink_tokens, config.retrieval_blocks) == (2, 4, 8)


def test_an_earlier_learned_position_config_is_not_told_of_far_positions_it_never_set(tmp_path, caplog):
    from model_sources import make_source

    convert_to_bsbr(make_source("gpt2"), chunk_size=8).save_pretrained(tmp_path)
    _as_saved_before_versions(tmp_path, drop=("far_positions",))
    with caplog.at_level("INFO"):
        loaded = load_bsbr_model(tmp_path)
    assert loaded.config.far_positions == BSBRConfig().far_positions
    assert "far_positions" not in caplog.text, caplog.text
