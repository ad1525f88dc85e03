"""Conversion copies every weight: inside one chunk a converted model *is* its source."""
import json
import re

import pytest
import torch
from transformers import AutoModelForCausalLM, BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

import bsbr
from bsbr import BSBRForCausalLM, TransformerToBSBRConverter, convert_to_bsbr, load_bsbr_model

from model_sources import VOCAB, make_source, randomize

CHUNK = 16


def outputs(model, ids, **kw):
    with torch.no_grad():
        out = model(ids, **kw)
    return out.logits if hasattr(out, "logits") and out.logits is not None else out.last_hidden_state


def bsbr_outputs(converted, source, ids, **kw):
    if hasattr(source, "lm_head"):
        return outputs(converted, ids, **kw)
    with torch.no_grad():
        return converted.model(ids, **kw).last_hidden_state


def test_one_chunk_reproduces_the_source(source):
    name, src = source
    model = convert_to_bsbr(src, chunk_size=CHUNK)
    ids = torch.randint(0, VOCAB, (2, CHUNK), generator=torch.Generator().manual_seed(0))
    diff = (bsbr_outputs(model, src, ids) - outputs(src, ids)).abs().max().item()
    assert diff <= 1e-4, f"{name}: max |logit diff| {diff}"


def test_one_chunk_reproduces_every_hidden_state_of_the_source(source):
    # (the first is the embeddings with GPT-2's learned positions added: it was the token embeddings alone)
    name, src = source
    model = convert_to_bsbr(src, chunk_size=CHUNK)
    ids = torch.randint(0, VOCAB, (1, CHUNK), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = (model if hasattr(src, "lm_head") else model.model)(ids, output_hidden_states=True).hidden_states
        want = src(ids, output_hidden_states=True).hidden_states
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=f"{name}: hidden state {i}")


def test_first_chunk_of_a_long_input_reproduces_the_source(source):
    name, src = source
    model = convert_to_bsbr(src, chunk_size=CHUNK, local_chunks=1, sink_tokens=0, retrieval_blocks=0)
    ids = torch.randint(0, VOCAB, (2, 60), generator=torch.Generator().manual_seed(0))
    a, b = bsbr_outputs(model, src, ids), outputs(src, ids)
    assert (a[:, :CHUNK] - b[:, :CHUNK]).abs().max().item() <= 1e-4
    assert (a[:, CHUNK:] - b[:, CHUNK:]).abs().max().item() > 1e-3  # later chunks do differ: not a copy of the source


def test_blocks_covering_every_earlier_chunk_reproduce_the_source(source):
    """Exact blocks at their own positions: with as many blocks as earlier chunks, every token reads
    every earlier token exactly, so the converted model is its source at every position."""
    name, src = source
    ids = torch.randint(0, VOCAB, (2, 4 * CHUNK - 1), generator=torch.Generator().manual_seed(1))  # GPT-2 has 64 positions
    model = convert_to_bsbr(src, chunk_size=CHUNK, retrieval_blocks=5, far_positions="absolute")
    diff = (bsbr_outputs(model, src, ids) - outputs(src, ids)).abs().max().item()
    assert diff <= 1e-4, f"{name}: max |logit diff| {diff}"
    fewer = convert_to_bsbr(src, chunk_size=CHUNK, retrieval_blocks=1, far_positions="absolute")
    assert (bsbr_outputs(fewer, src, ids) - outputs(src, ids)).abs().max().item() > 1e-3


def test_recall_cache_holding_every_token_reproduces_the_source(source, tmp_path):
    """recall_tokens at least the context, closed gate, far keys at their own positions: every earlier
    token is read exactly (window, sinks or recall cache), so the converted model is its source; a
    small cache differs. The option survives save/load, and it replaces the exact blocks."""
    name, src = source
    ids = torch.randint(0, VOCAB, (2, 4 * CHUNK - 1), generator=torch.Generator().manual_seed(1))
    model = convert_to_bsbr(src, chunk_size=CHUNK, recall_tokens=4 * CHUNK, far_positions="absolute")
    assert model.config.recall_tokens == 4 * CHUNK and model.config.retrieval_blocks == 0
    diff = (bsbr_outputs(model, src, ids) - outputs(src, ids)).abs().max().item()
    assert diff <= 1e-4, f"{name}: max |logit diff| {diff}"
    small = convert_to_bsbr(src, chunk_size=CHUNK, recall_tokens=2, far_positions="absolute")
    assert (bsbr_outputs(small, src, ids) - outputs(src, ids)).abs().max().item() > 1e-3
    small.save_pretrained(tmp_path)
    assert load_bsbr_model(tmp_path).config.recall_tokens == 2
    with pytest.raises(ValueError, match="exclusive"):
        convert_to_bsbr(src, chunk_size=CHUNK, recall_tokens=2, retrieval_blocks=1)


def test_recall_tokens_flag():
    import argparse

    from bsbr.convert.cli import add_conversion_arguments, check_conversion_options, conversion_options
    from bsbr.convert.defaults import DEFAULT_OPTIONS
    from bsbr.errors import UserError

    p = argparse.ArgumentParser()
    add_conversion_arguments(p)
    assert "M tokens per layer per K/V head" in " ".join(p.format_help().split())  # what it costs
    opts = conversion_options(p.parse_args(["--recall-tokens", "64"]))
    assert opts["recall_tokens"] == 64 and opts["retrieval_blocks"] == 0
    assert conversion_options(p.parse_args([]))["retrieval_blocks"] == DEFAULT_OPTIONS["retrieval_blocks"]
    with pytest.raises(UserError, match="exclusive"):
        check_conversion_options(conversion_options(p.parse_args(["--recall-tokens", "8", "--retrieval-blocks", "2"])))
    with pytest.raises(SystemExit):  # a usage error of the parser, naming the flag (tests/cli)
        p.parse_args(["--recall-tokens", "-1"])
    assert opts["far_positions"] == "window"  # the bounded mode's default
    with pytest.raises(UserError, match="--far-positions hybrid needs --recall-tokens 0"):
        check_conversion_options(conversion_options(p.parse_args(["--recall-tokens", "8", "--far-positions", "hybrid"])))


def test_conflicting_conversion_options_are_refused_before_loading():
    import argparse

    from bsbr.convert.cli import add_conversion_arguments, check_conversion_options, conversion_options
    from bsbr.errors import UserError

    p = argparse.ArgumentParser()
    add_conversion_arguments(p)
    for argv, match in ((("--retrieval", "normalized", "--feature-map", "identity"), "needs the non-negative"),
                        (("--recall-tokens", "8", "--retrieval-blocks", "2"), "are exclusive")):
        with pytest.raises(UserError, match=match):
            check_conversion_options(conversion_options(p.parse_args(list(argv))))


def test_far_positions_change_only_far_keys():
    """far_positions='window' moves sinks and blocks, never the window: until a token has a key
    outside its window, the model is its source; after, it differs from the 'absolute' rule."""
    src = make_source("llama")
    ids = torch.randint(0, VOCAB, (1, 5 * CHUNK), generator=torch.Generator().manual_seed(2))
    near = convert_to_bsbr(src, chunk_size=CHUNK, retrieval_blocks=5, far_positions="window")
    far = convert_to_bsbr(src, chunk_size=CHUNK, retrieval_blocks=5, far_positions="absolute")
    a, b = outputs(near, ids), outputs(far, ids)
    torch.testing.assert_close(a[:, : 2 * CHUNK], outputs(src, ids)[:, : 2 * CHUNK], rtol=1e-4, atol=1e-4)
    assert (a[:, 2 * CHUNK:] - b[:, 2 * CHUNK:]).abs().max() > 1e-3


def test_hybrid_positions_are_absolute_inside_the_sources_range_and_shifted_beyond():
    """far_positions='hybrid' on a source of 8 chunks of positions: far keys fewer than 4 chunks back
    (half the range) keep their own positions (with blocks covering every chunk, the source itself
    while the context fits that), older ones read as if 3 chunks back (neither rule alone)."""
    src = make_source("llama")
    src.config.max_position_embeddings = 8 * CHUNK
    ids = torch.randint(0, VOCAB, (1, 8 * CHUNK), generator=torch.Generator().manual_seed(2))
    models = {rule: convert_to_bsbr(src, chunk_size=CHUNK, retrieval_blocks=8, sink_tokens=2, far_positions=rule)
              for rule in ("hybrid", "absolute", "window")}
    assert models["hybrid"].config.own_position_chunks() == 4
    assert models["hybrid"].model.layers[0].attn.own_position_chunks == 4
    assert models["hybrid"].config.far_shift_chunks() == 3
    assert models["window"].config.far_shift_chunks() == models["window"].config.local_chunks == 2
    out = {rule: outputs(m, ids) for rule, m in models.items()}
    inside = slice(0, 4 * CHUNK)
    torch.testing.assert_close(out["hybrid"][:, inside], outputs(src, ids)[:, inside], rtol=1e-4, atol=1e-4)
    for other in ("absolute", "window"):
        assert (out["hybrid"][:, 4 * CHUNK:] - out[other][:, 4 * CHUNK:]).abs().max() > 1e-3


def test_hybrid_positions_need_blocks_not_the_bounded_mode():
    with pytest.raises(ValueError, match="hybrid"):
        convert_to_bsbr(make_source("llama"), chunk_size=CHUNK, recall_tokens=4, far_positions="hybrid")


def test_a_skipped_weight_would_be_caught():
    """The exactness test can fail: perturbing one copied weight breaks it."""
    src = make_source("gpt2")
    model = convert_to_bsbr(src, chunk_size=CHUNK)
    ids = torch.randint(0, VOCAB, (1, CHUNK))
    with torch.no_grad():
        model.model.embed_positions.weight[3] += torch.randn(48)  # not a constant: LayerNorm removes those
    assert (outputs(model, ids) - outputs(src, ids)).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_conversion_leaves_the_callers_random_stream_alone(family):
    # the model was built with random initial weights (all overwritten): the caller's generator moved on
    src = make_source(family)
    models = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        state = torch.random.get_rng_state()
        models.append(convert_to_bsbr(src, chunk_size=CHUNK, gate_init=0.3))
        assert torch.equal(torch.random.get_rng_state(), state)
    a, b = (m.state_dict() for m in models)
    assert all(torch.equal(a[k], b[k]) for k in a)  # (no weight depends on the generator)


def test_converted_weights_are_copies():
    src = make_source("llama")
    before = {k: v.clone() for k, v in src.state_dict().items()}
    model = convert_to_bsbr(src, chunk_size=CHUNK)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ids = torch.randint(0, VOCAB, (1, 40))
    model(ids, labels=ids).loss.backward()
    opt.step()
    for k, v in src.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_the_layers_a_source_slides_in_are_recorded_as_its_code_reads_them():
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    from bsbr.convert.families import sliding_window

    assert sliding_window(MistralConfig(num_hidden_layers=3, sliding_window=16)) == (16, [0, 1, 2])
    assert sliding_window(MistralConfig(num_hidden_layers=3, sliding_window=None)) == (None, [])
    qwen2 = dict(num_hidden_layers=3, sliding_window=16, max_window_layers=1)
    assert sliding_window(Qwen2Config(**qwen2, use_sliding_window=True)) == (16, [1, 2])
    assert sliding_window(Qwen2Config(**qwen2, use_sliding_window=False)) == (None, [])
    assert sliding_window(LlamaConfig(num_hidden_layers=3, sliding_window=16)) == (None, [])


def test_parameter_overhead_and_closed_gate_is_chunk_local():
    src = make_source("llama")
    model = convert_to_bsbr(src, chunk_size=CHUNK, local_chunks=1, sink_tokens=0, retrieval_blocks=0)
    summary = model.conversion_summary
    assert summary["params_source"] == sum(p.numel() for p in src.parameters())
    assert summary["params_bsbr"] == sum(p.numel() for p in model.parameters()) > summary["params_source"]
    assert summary["extra_params_pct"] == pytest.approx(100 * (summary["params_bsbr"] / summary["params_source"] - 1))
    assert not model.training  # (returned in eval mode, as a loaded model)
    # a closed gate: every chunk is processed as if it were alone
    ids = torch.randint(0, VOCAB, (1, 3 * CHUNK), generator=torch.Generator().manual_seed(3))
    full = outputs(model, ids)
    for c in range(3):
        part = ids[:, c * CHUNK:(c + 1) * CHUNK]
        pos = torch.arange(c * CHUNK, (c + 1) * CHUNK)[None]
        torch.testing.assert_close(full[:, c * CHUNK:(c + 1) * CHUNK], outputs(model, part, position_ids=pos),
                                   rtol=1e-4, atol=1e-4)


def test_closed_gate_with_a_wider_window_is_the_source_under_that_mask(source):
    """local_chunks=2, sink_tokens=3, gate 0: the converted model is its source with attention limited
    to (own chunk so far) + (previous chunk) + (first 3 tokens), written here as a 4-D additive mask."""
    name, src = source
    if not hasattr(src, "lm_head"):
        pytest.skip("a base model: the 4-D mask path is exercised on the LM families")
    model = convert_to_bsbr(src, chunk_size=CHUNK, local_chunks=2, sink_tokens=3, retrieval_blocks=0,
                            far_positions="absolute")
    n = 3 * CHUNK + 5
    i, j = torch.arange(n)[:, None], torch.arange(n)[None]
    allowed = (j <= i) & ((j >= (i // CHUNK - 1) * CHUNK) | (j < 3))
    mask = torch.zeros(n, n).masked_fill(~allowed, torch.finfo(torch.float32).min)[None, None]
    ids = torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(4))
    want = outputs(src, ids, attention_mask=mask)
    assert (want - outputs(src, ids)).abs().max() > 1e-3  # the mask matters: past two chunks it hides tokens
    torch.testing.assert_close(outputs(model, ids), want, rtol=1e-4, atol=1e-4)


def test_save_load_round_trip(tmp_path):
    src = make_source("qwen2")
    model = convert_to_bsbr(src, chunk_size=CHUNK, gate_init=0.3, compression_factor=2, retrieval_blocks=2,
                            local_chunks=2, sink_tokens=2)
    with torch.no_grad():  # trained-looking new pieces: a loader that re-initialised them would differ
        for layer in model.model.layers:
            layer.attn.retrieval_gate.uniform_(0.1, 1.0)
            layer.attn.meta_r_proj.weight.normal_()
    model.save_pretrained(tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert "model.safetensors" in files and "config.json" in files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl"))]
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "bsbr"
    ids = torch.randint(0, VOCAB, (2, 70))
    for loaded in (AutoModelForCausalLM.from_pretrained(tmp_path), load_bsbr_model(tmp_path)):
        assert isinstance(loaded, BSBRForCausalLM)
        torch.testing.assert_close(outputs(loaded.eval(), ids), outputs(model, ids), rtol=0, atol=0)


def test_a_save_that_fails_puts_the_replaced_configs_back(tmp_path, monkeypatch):
    # transformers writes config.json before the weights: a full disk left the new config beside the old weights,
    # which loaded silently (a model of other options with the old weights)
    import transformers.modeling_utils

    model = convert_to_bsbr(make_source("llama"), chunk_size=CHUNK)
    model.save_pretrained(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full)
    other = convert_to_bsbr(make_source("llama"), chunk_size=CHUNK, retrieval_blocks=1, gate_init=0.5)
    other.generation_config.max_new_tokens = 7
    with pytest.raises(OSError, match="No space left on device"):
        other.save_pretrained(tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    (tmp_path / "mine.json").write_bytes(before["config.json"])  # a config.json that is a link: written through it
    (tmp_path / "config.json").unlink()
    (tmp_path / "config.json").symlink_to("mine.json")
    with pytest.raises(OSError, match="No space left on device"):
        other.save_pretrained(tmp_path)
    assert (tmp_path / "config.json").is_symlink() and (tmp_path / "mine.json").read_bytes() == before["config.json"]
    # shards: two replaced, two old when the disk filled: that mix loaded silently under the old config
    from safetensors.torch import save_file as real

    sharded, calls = tmp_path / "sharded", []

    def third_fails(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real(*a, **k)

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", real)
    model.save_pretrained(sharded, max_shard_size="60KB")
    assert len(list(sharded.glob("model-*.safetensors"))) > 3
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", third_fails)
    with pytest.raises(OSError, match="No space left on device") as failed:
        other.save_pretrained(sharded, max_shard_size="60KB")
    assert not (sharded / "config.json").exists() and "its config.json was removed" in str(failed.value.__notes__)
    # a sharded save over a single file that fails before any old file is touched: the old model as it was (its
    # config.json was removed too), without the new shards
    single = tmp_path / "single"
    model.save_pretrained(single)
    kept = {p.name: p.read_bytes() for p in single.iterdir()}
    calls.clear()
    with pytest.raises(OSError, match="No space left on device"):
        other.save_pretrained(single, max_shard_size="60KB")
    assert {p.name: p.read_bytes() for p in single.iterdir()} == kept
    # a fresh folder whose config.json is the user's link to a file not there yet: the link kept, nothing left
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "config.json").symlink_to(tmp_path / "shared_config.json")
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full)
    with pytest.raises(OSError, match="No space left on device"):
        other.save_pretrained(fresh)
    assert [p.name for p in fresh.iterdir()] == ["config.json"] and (fresh / "config.json").is_symlink()
    assert not (tmp_path / "shared_config.json").exists()  # (bsbr_auto.py, the configs: removed)


def test_corrupt_or_incomplete_checkpoints_are_refused(tmp_path):
    src = make_source("gpt2")
    model = convert_to_bsbr(src, chunk_size=CHUNK)
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file, save_file

    sd = load_file(tmp_path / "model.safetensors")
    sd.pop("model.layers.0.mlp.fc_in.weight")
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="does not match"):
        load_bsbr_model(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="its .safetensors weights are unreadable, truncated or empty"):
        load_bsbr_model(tmp_path)
    with pytest.raises(FileNotFoundError):
        load_bsbr_model(tmp_path / "missing")
    src.save_pretrained(tmp_path / "gpt2")  # a plain transformers model: named, not a list of missing weights
    with pytest.raises(ValueError, match="holds a 'gpt2' model, not a BSBR one: convert it first"):
        load_bsbr_model(tmp_path / "gpt2")


def test_gpt2_runs_past_its_position_table():
    src = make_source("gpt2")  # n_positions = 64
    ids = torch.randint(0, VOCAB, (1, 200))
    for scheme in ("wrap", "clamp"):
        model = convert_to_bsbr(src, chunk_size=CHUNK, position_scheme=scheme)
        out = outputs(model, ids)
        assert out.shape == (1, 200, VOCAB) and torch.isfinite(out).all()
        torch.testing.assert_close(out[:, :CHUNK], outputs(src, ids[:, :CHUNK]), rtol=1e-4, atol=1e-4)
        with torch.no_grad():  # (generate's default length runs past the table too: 20 new tokens, as for 'wrap')
            assert model.generate(ids[:, :70], do_sample=False, pad_token_id=0, eos_token_id=None).shape == (1, 90)
    model = convert_to_bsbr(src, chunk_size=CHUNK, position_scheme="absolute")
    with pytest.raises(ValueError, match="position"):
        outputs(model, ids)
    with pytest.raises(ValueError, match="^input reaches position 64 but max_position_embeddings is 64; use "
                                         "position_scheme 'wrap' or 'clamp'"):
        outputs(model, ids[:, :65])  # (one past the table: the last position it has is 63)
    assert outputs(model, ids[:, :64]).shape == (1, 64, VOCAB)


@pytest.mark.parametrize("family, option, value", [("gpt2", "far_positions", "hybrid"),
                                                    ("llama", "position_scheme", "absolute")])
def test_a_position_option_the_model_never_reads_is_logged(family, option, value, caplog, tmp_path):
    # (`bsbr convert` refuses it; in Python a sweep of options over families goes on, told, and so does a
    # from_pretrained override, which was silent)
    from transformers import AutoModelForCausalLM

    src = make_source(family)
    logger = "bsbr.models.bsbr.configuration_bsbr"
    with caplog.at_level("WARNING", logger=logger):
        convert_to_bsbr(src, chunk_size=CHUNK).save_pretrained(tmp_path)
        AutoModelForCausalLM.from_pretrained(tmp_path)
    assert not caplog.records
    kind = "learned" if family == "gpt2" else "rope"
    for make in (lambda: convert_to_bsbr(src, chunk_size=CHUNK, **{option: value}),
                 lambda: AutoModelForCausalLM.from_pretrained(tmp_path, **{option: value})):
        caplog.clear()
        with caplog.at_level("WARNING", logger=logger):
            make()
        assert caplog.text.count(f"{option}={value!r} does nothing for a model with {kind} positions") == 1


def test_a_model_folder_named_like_a_gguf_file_converts(tmp_path):
    src = make_source("llama")
    src.save_pretrained(tmp_path / "model.gguf")
    ids = torch.randint(0, VOCAB, (1, 2 * CHUNK))
    torch.testing.assert_close(outputs(convert_to_bsbr(tmp_path / "model.gguf", chunk_size=CHUNK), ids),
                               outputs(convert_to_bsbr(src, chunk_size=CHUNK), ids), rtol=0, atol=0)


def test_learned_positions_past_the_table_wrap_chunk_aligned_or_clamp():
    from bsbr.models.bsbr.modeling_bsbr import _map_learned_positions

    src = make_source("gpt2")  # n_positions = 64
    pos = torch.arange(200)
    chunk = 24  # 64 positions hold two whole chunks: wrap with period 48, so no chunk straddles the wrap
    wrap, clamp = (convert_to_bsbr(src, chunk_size=chunk, position_scheme=s) for s in ("wrap", "clamp"))
    assert torch.equal(_map_learned_positions(pos, wrap.config), torch.where(pos < 64, pos, pos % 48))
    assert torch.equal(_map_learned_positions(pos, clamp.config), pos.clamp(max=63))
    ids = torch.randint(0, VOCAB, (1, 200), generator=torch.Generator().manual_seed(0))
    a, b = outputs(wrap, ids), outputs(clamp, ids)
    torch.testing.assert_close(a[:, :64], b[:, :64])  # inside the table the schemes agree
    assert (a[:, 64:] - b[:, 64:]).abs().amax() > 1e-3  # past it they read other positions


def test_errors():
    with pytest.raises(ValueError, match="gpt2.*llama.*mistral.*qwen2"):
        convert_to_bsbr(BertModel(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, intermediate_size=64)))
    src = make_source("gpt2")
    with pytest.raises(ValueError, match="chunk_size"):
        convert_to_bsbr(src, chunk_size=0)
    with pytest.raises(ValueError, match="compression_factor"):
        convert_to_bsbr(src, chunk_size=CHUNK, compression_factor=7)
    with pytest.raises(TypeError, match="unknown conversion options"):
        TransformerToBSBRConverter(chunk_size=8, colour="blue")
    with pytest.raises(TypeError, match=r"unknown conversion options \['chunk_sise'\]; accepted: \['chunk_size', "
                                        r"'compression_factor', 'far_positions'"):  # (the two arguments were left out)
        convert_to_bsbr(src, chunk_sise=8)
    for bad in (dict(chunk_size=0), dict(local_chunks=0), dict(sink_tokens=-1), dict(retrieval_blocks=-1),
                dict(recall_tokens=8, retrieval_blocks=2), dict(retrieval="magic")):
        with pytest.raises(ValueError):  # refused before any source is loaded
            TransformerToBSBRConverter(**bad)
    with pytest.raises(ValueError, match="far_positions"):
        convert_to_bsbr(src, far_positions="magic")
    with pytest.raises(ValueError, match="retrieval_blocks"):
        convert_to_bsbr(src, retrieval_blocks=-2)
    with pytest.raises(FileNotFoundError):
        convert_to_bsbr("/nonexistent/model.gguf")
    with pytest.raises(FileNotFoundError):
        convert_to_bsbr("./no/such/dir")
    for flag, bad in (("scale_attn_by_inverse_layer_idx", True), ("scale_attn_weights", False),
                      ("add_cross_attention", True)):  # (said as unsupported, not as a config edited since)
        with pytest.raises(ValueError, match=f"^GPT-2 sources with {flag}={bad} are not supported"):
            convert_to_bsbr(GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=32, n_layer=1, n_head=2, **{flag: bad})))
    with pytest.raises(ValueError, match="already a BSBR"):
        convert_to_bsbr(convert_to_bsbr(src, chunk_size=CHUNK))


def test_public_names_of_the_earlier_library():
    for name in ("BSBRAttention", "BSBRLayer", "BSBRModel", "convert_to_bsbr", "TransformerToBSBRConverter"):
        assert hasattr(bsbr, name)


def test_convert_flags_follow_the_options_object():
    """One name per concept: every BSBROptions field a conversion sets and every converter option is a
    `bsbr convert` flag of the same name, and the flags' defaults are the converter's."""
    import argparse
    import dataclasses

    from bsbr.convert.cli import add_conversion_arguments, conversion_options
    from bsbr.convert.defaults import DEFAULT_CHUNK_SIZE, DEFAULT_OPTIONS
    from bsbr.ops import BSBROptions

    p = argparse.ArgumentParser()
    add_conversion_arguments(p)
    flags = {a.dest for a in p._actions}
    # scale: the head dim's, always; own_position_chunks: --far-positions hybrid derives it from the source's positions
    names = {f.name for f in dataclasses.fields(BSBROptions)} - {"scale", "own_position_chunks"}
    assert names <= flags and set(DEFAULT_OPTIONS) <= flags
    opts = conversion_options(p.parse_args([]))
    assert opts.pop("chunk_size") == DEFAULT_CHUNK_SIZE and opts.pop("compression_factor") is None
    assert opts == DEFAULT_OPTIONS
    # the choices (written out so that `bsbr --help` imports neither torch nor transformers) are the library's
    from bsbr.layers.feature_maps import BSBR_FEATURE_MAPS
    from bsbr.models.bsbr.configuration_bsbr import FAR_POSITIONS, POSITION_SCHEMES
    from bsbr.ops.bsbr.options import VARIANTS

    choices = {a.dest: set(a.choices) for a in p._actions if a.choices}
    assert choices == {"far_positions": set(FAR_POSITIONS), "retrieval": set(VARIANTS),
                       "feature_map": set(BSBR_FEATURE_MAPS), "position_scheme": set(POSITION_SCHEMES)}
    # and a bare BSBRConfig has the same attention options (one set of defaults)
    from bsbr.models import BSBRConfig

    bare = BSBRConfig().to_dict()
    assert {k: bare[k] for k in DEFAULT_OPTIONS} == DEFAULT_OPTIONS and bare["chunk_size"] == DEFAULT_CHUNK_SIZE
    from bsbr.convert.defaults import resolve_options

    assert BSBRConfig(recall_tokens=4).retrieval_blocks == resolve_options({"recall_tokens": 4})["retrieval_blocks"] == 0
    # the additive form's features: identity in the layer, the config and convert alike (convert gave hedgehog)
    from bsbr.layers import BSBRAttention

    additive = resolve_options({"retrieval": "additive"})["feature_map"]
    assert additive == BSBRConfig(retrieval="additive").feature_map == "identity"
    assert BSBRAttention(16, 2, 4, retrieval="additive").feature_q.kind == additive
    assert conversion_options(p.parse_args(["--retrieval", "additive"]))["feature_map"] == "identity"


def test_what_a_conversion_cannot_keep_is_logged(caplog):
    """A sliding window and length-dependent rotary scaling are not carried over: the converter says so."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    kw = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
              num_key_value_heads=2)
    cases = [(MistralForCausalLM(MistralConfig(**kw, sliding_window=16)), "sliding window of 16"),
             (Qwen2ForCausalLM(Qwen2Config(**kw, use_sliding_window=True, sliding_window=16, max_window_layers=0)),
              "sliding window of 16"),
             (LlamaForCausalLM(LlamaConfig(**kw, max_position_embeddings=64, rope_parameters=dict(
                 rope_type="dynamic", rope_theta=1e4, factor=4.0))), "'dynamic'"),
             (Qwen2ForCausalLM(Qwen2Config(**{**kw, "num_hidden_layers": 2}, use_sliding_window=True,
                                           sliding_window=16, max_window_layers=1)), "sliding window of 16"),
             (MistralForCausalLM(MistralConfig(**kw, sliding_window=None)), None),
             (Qwen2ForCausalLM(Qwen2Config(**kw, sliding_window=16)), None),  # use_sliding_window False
             # every layer below max_window_layers: none slides, the conversion is exact
             (Qwen2ForCausalLM(Qwen2Config(**kw, use_sliding_window=True, sliding_window=16, max_window_layers=1)),
              None),
             # Mistral's code slides in every layer whatever layer_types says; Llama's never slides
             (MistralForCausalLM(MistralConfig(**kw, sliding_window=16, layer_types=["full_attention"])),
              "sliding window of 16"),
             (LlamaForCausalLM(LlamaConfig(**kw, sliding_window=16)), None)]
    for src, expected in cases:
        caplog.clear()
        with caplog.at_level("WARNING", logger="bsbr.convert.converter"):
            convert_to_bsbr(src, chunk_size=CHUNK)
        warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert (expected is None and not warned) or any(expected in w for w in warned), (src.config.model_type, warned)


def test_bias_fields_a_familys_code_never_reads_convert_exactly():
    # Mistral's and Qwen2's code hard-code their biases: a config carrying attention_bias / mlp_bias was
    # refused ("the source has no weight ...gate_proj.bias"); Llama's reads them
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    kw = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
              num_key_value_heads=2)
    ids = torch.randint(0, VOCAB, (1, 3 * CHUNK), generator=torch.Generator().manual_seed(0))
    for make, config in ((MistralForCausalLM, MistralConfig(**kw, sliding_window=None, mlp_bias=True, attention_bias=True)),
                         (Qwen2ForCausalLM, Qwen2Config(**kw, mlp_bias=True, attention_bias=True)),
                         (LlamaForCausalLM, LlamaConfig(**kw, mlp_bias=True, attention_bias=True))):
        torch.manual_seed(0)
        src = make(config).eval()
        model = convert_to_bsbr(src, chunk_size=CHUNK, local_chunks=3)
        torch.testing.assert_close(outputs(model, ids), outputs(src, ids), rtol=0, atol=1e-5)


def test_default_rotary_frequencies_are_the_sources_to_the_bit():
    """The default rope's frequencies are computed as the source computes them (float32): computed in
    float64, a third of them differed by an ulp and the logits drifted with the position (1.6e-4 at
    position 16,000 for a Qwen2 with rope_theta 1e6 and head_dim 128)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    kw = dict(vocab_size=VOCAB, hidden_size=256, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
              num_key_value_heads=1, max_position_embeddings=32768)
    for src in (Qwen2ForCausalLM(Qwen2Config(**kw, rope_theta=1e6)), LlamaForCausalLM(LlamaConfig(**kw, rope_theta=1e4))):
        model = convert_to_bsbr(src.eval(), chunk_size=CHUNK, local_chunks=4, sink_tokens=0, retrieval_blocks=0)
        assert torch.equal(model.model.rotary.inv_freq, src.model.rotary_emb.inv_freq), src.config.model_type
        ids = torch.randint(0, VOCAB, (1, 4 * CHUNK), generator=torch.Generator().manual_seed(0))  # inside the window
        pos = torch.arange(16000, 16000 + 4 * CHUNK)[None]
        diff = (outputs(model, ids, position_ids=pos) - outputs(src, ids, position_ids=pos)).abs().max().item()
        assert diff <= 1e-5, (src.config.model_type, diff)


@pytest.mark.parametrize("rope_type", ["default", "linear"])
def test_a_partial_rotary_factor_converts_as_the_source_rotates_or_is_refused_by_name(rope_type):
    """transformers keeps ``partial_rotary_factor`` in rope_parameters: the default rope's tables ignore it (the source
    rotates whole heads, and so does the conversion); a scaled rope's tables honour it and cover half of each head,
    which the source's own forward cannot use: refused, naming the field (not "inv_freq must have shape")."""
    from transformers import LlamaConfig, LlamaForCausalLM

    rope = {"rope_type": rope_type, "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
    if rope_type == "linear":
        rope["factor"] = 4.0
    torch.manual_seed(0)
    src = randomize(LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=80,
                                                 num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                                 rope_parameters=rope))).eval()
    if rope_type == "linear":
        with pytest.raises(ValueError, match=r"^rope_parameters' partial_rotary_factor 0.5 with rope_type 'linear'"):
            convert_to_bsbr(src, chunk_size=CHUNK)
        return
    model = convert_to_bsbr(src, chunk_size=CHUNK)
    ids = torch.randint(0, VOCAB, (1, 2 * CHUNK), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(outputs(model, ids), outputs(src, ids), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_a_source_whose_head_dim_is_not_hidden_over_heads_converts_exactly(family):
    """Mistral-NeMo's shape (head_dim 128 with 5,120 hidden and 32 heads): the heads are as wide as the source
    says, not hidden_size // num_attention_heads."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    config, cls = (LlamaConfig, LlamaForCausalLM) if family == "llama" else (MistralConfig, MistralForCausalLM)
    torch.manual_seed(0)
    src = randomize(cls(config(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=16)))
    model = convert_to_bsbr(src, chunk_size=CHUNK)
    assert model.config.head_dim == 16
    ids = torch.randint(0, VOCAB, (1, 2 * CHUNK), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(outputs(model, ids), outputs(src, ids), atol=1e-4, rtol=1e-4)


def test_the_source_generation_config_is_carried_over(tmp_path):
    """Chat models keep extra stop tokens and sampling defaults in generation_config: a converted model
    stops where its source stops, and keeps them through save/load."""
    src = make_source("llama")
    src.generation_config.eos_token_id = [2, 35]
    src.generation_config.do_sample, src.generation_config.temperature = True, 0.6
    src.generation_config.stop_marker = "<|end|>"  # a key of the source's own (a source built in memory has a
    assert src.generation_config._from_model_config  # config transformers says it built from the model's config)
    converted = convert_to_bsbr(src, chunk_size=64)  # the whole generation inside one chunk: the source's logits
    assert converted.generation_config.eos_token_id == [2, 35] and converted.generation_config.temperature == 0.6
    converted.save_pretrained(tmp_path / "m")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert loaded.generation_config.eos_token_id == [2, 35] and loaded.generation_config.temperature == 0.6
    # saved as the model's own, not one transformers built from its config and drops keys of on loading
    assert json.loads((tmp_path / "m" / "generation_config.json").read_text())["_from_model_config"] is False
    assert loaded.generation_config.stop_marker == "<|end|>"
    stops = 0
    for seed in range(6):
        ids = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            want = src.generate(ids, max_new_tokens=40, do_sample=False, pad_token_id=0)
            got = loaded.generate(ids, max_new_tokens=40, do_sample=False, pad_token_id=0)
        assert got.tolist() == want.tolist()
        stops += want.shape[1] < 46
    assert stops  # some prompt stopped early on a stop token


def test_an_untied_gpt2_converts_untied_without_a_word_of_ties(caplog):
    source = randomize(GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=48, n_layer=2, n_head=4, n_positions=64,
                                                  tie_word_embeddings=False)))
    assert source.lm_head.weight is not source.get_input_embeddings().weight
    ids = torch.randint(3, VOCAB, (1, CHUNK), generator=torch.Generator().manual_seed(0))
    with caplog.at_level("WARNING"):
        model = convert_to_bsbr(source, chunk_size=CHUNK)
    assert "ties its word embeddings" not in caplog.text and not model.config.tie_word_embeddings
    torch.testing.assert_close(outputs(model, ids), outputs(source, ids), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["gpt2", "qwen2"])
def test_a_tied_config_whose_head_was_replaced_converts_untied_as_transformers_loads_it(family, caplog, tmp_path):
    # "the source config ties word embeddings but its lm_head differs from them", exit 2 with no way on, where
    # transformers loads such a folder untied (warning to set tie_word_embeddings=False) and runs it
    source = make_source(family)
    if not source.config.tie_word_embeddings:
        source.config.tie_word_embeddings = True
        source.tie_weights()
    source.lm_head.weight = torch.nn.Parameter(source.get_input_embeddings().weight.detach() * 1.5)
    ids = torch.randint(3, VOCAB, (1, CHUNK), generator=torch.Generator().manual_seed(0))
    with caplog.at_level("WARNING"):
        model = convert_to_bsbr(source, chunk_size=CHUNK)
    assert "the BSBR model keeps them untied (tie_word_embeddings=False)" in caplog.text
    assert not model.config.tie_word_embeddings and model.lm_head.weight is not model.get_input_embeddings().weight
    torch.testing.assert_close(outputs(model, ids), outputs(source, ids), atol=1e-4, rtol=1e-4)
    model.save_pretrained(tmp_path)
    torch.testing.assert_close(outputs(load_bsbr_model(tmp_path), ids), outputs(source, ids), atol=1e-4, rtol=1e-4)


def test_a_source_of_no_float_weights_nan_or_adapters_is_refused_in_one_line():
    # (a dynamically quantized source or a module's extra state: "'torch.dtype' object has no attribute 'is_meta'";
    # nan in an instance converted and saved a checkpoint its own loader refused; peft adapters: "config mismatch?")
    import peft

    quantized = torch.ao.quantization.quantize_dynamic(make_source("llama"), {torch.nn.Linear}, dtype=torch.qint8)

    class Tagged(torch.nn.Module):
        def get_extra_state(self):
            return {"note": 1}

        def set_extra_state(self, state):
            pass
    tagged = make_source("llama")
    tagged.tag = Tagged()
    nan = make_source("llama")
    with torch.no_grad():
        nan.model.layers[0].self_attn.q_proj.weight[0, 0] = float("nan")
    lora = peft.get_peft_model(make_source("llama"), peft.LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj"],
                                                                     r=2))
    low = {}
    for dtype in (torch.float8_e4m3fn, torch.int8):  # (float8: "isfinite not implemented"; int8 converted silently)
        low[dtype] = make_source("llama")
        q = low[dtype].model.layers[0].self_attn.q_proj
        q.weight = torch.nn.Parameter(q.weight.data.to(dtype), requires_grad=False)
    for source, words in ((quantized, "which is no float weight (a quantized module"), (tagged, "'tag._extra_state'"),
                          (low[torch.float8_e4m3fn], "q_proj.weight' is torch.float8_e4m3fn, not a float"),
                          (low[torch.int8], "q_proj.weight' is torch.int8, not a float"),
                          (nan, "'model.layers.0.self_attn.q_proj.weight' holds nan or inf"),
                          (lora.base_model.model, "the source carries peft adapters"),
                          (lora, "source is a peft model: merge its adapters")):
        with pytest.raises((ValueError, TypeError), match=re.escape(words)) as e:
            convert_to_bsbr(source, chunk_size=8)
        assert "\n" not in str(e.value)


def test_peft_on_the_meta_maps_by_target_parameters_changes_the_forward():
    # the maps' weights were read off the modules: peft's wrapper (its delta added when the module is called) was
    # never called, so the adapter changed nothing until merged
    peft = pytest.importorskip("peft")
    ids = torch.randint(3, VOCAB, (1, 40), generator=torch.Generator().manual_seed(0))
    for target in ("meta_r_proj.weight", "meta_h_proj.weight"):
        model = convert_to_bsbr(make_source("llama"), chunk_size=4, retrieval_blocks=1, gate_init=0.5).eval()
        with torch.no_grad():
            base = model(ids).logits
            torch.manual_seed(0)
            adapted = peft.get_peft_model(model, peft.LoraConfig(r=2, target_parameters=[target],
                                                                 init_lora_weights=False)).eval()
            wrapped = adapted(input_ids=ids).logits
            assert (wrapped - base).abs().max() > 1e-3
            torch.testing.assert_close(adapted.merge_and_unload()(ids).logits, wrapped, rtol=1e-5, atol=1e-5)


def test_a_source_on_the_meta_device_is_refused_in_one_line():
    # (built with init_empty_weights, or offloaded): a 36-line load_state_dict error
    with pytest.raises(ValueError, match="is on the meta device, with no values to copy") as e:
        convert_to_bsbr(make_source("llama").to("meta"), chunk_size=8)
    assert "\n" not in str(e.value)


def test_hybrid_positions_that_would_read_as_window_are_refused():
    """With 2,048 positions and chunks of 512, half the range in whole chunks reaches no further than the window:
    'hybrid' was recorded and built, and computed exactly what 'window' does (logits equal), without a word."""
    src = make_source("llama")  # 2,048 positions
    with pytest.raises(ValueError, match=r"far_positions 'hybrid' reads far keys at their own positions within half "
                                         r"the source's positions \(1,024 tokens\), whole chunks of 512 of which reach "
                                         r"no further than the window \(1,024 tokens\): it would be 'window' here"):
        convert_to_bsbr(src, chunk_size=512, far_positions="hybrid")
    assert convert_to_bsbr(src, chunk_size=256, far_positions="hybrid").config.own_position_chunks() == 4
    with pytest.raises(ValueError, match=r"it would be 'window' here: give a smaller chunk_size, or far_positions "
                                         r"'window'$"):  # (not "fewer local_chunks" than 1)
        convert_to_bsbr(src, chunk_size=1024, local_chunks=1, far_positions="hybrid")


@pytest.mark.parametrize("edit, named", [
    (dict(rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}), "rotary frequencies"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": 505.0}), "rotary frequencies"),  # (built: 500)
    (dict(rms_norm_eps=0.5), "epsilon 1e-06, its config 0.5"),
    (dict(rms_norm_eps=1e-5), "epsilon 1e-06, its config 1e-05"),
    (dict(hidden_act="gelu"), "mlp computes another activation than its config's 'gelu'")])
def test_a_source_whose_config_was_edited_after_it_was_built_is_refused(edit, named):
    # the source's modules keep what they were built with (its logits do not change), the conversion followed the
    # edited config: logits 5-6 off, silently (a rope scaling set on a loaded model to extend its context)
    src = make_source("llama")
    src.config.rms_norm_eps = 1e-6  # (as built)
    for name, value in edit.items():
        setattr(src.config, name, value)
    with pytest.raises(ValueError, match=f"the source's .*{named}.*: was its config edited after the model was built"):
        convert_to_bsbr(src, chunk_size=CHUNK)


def test_small_edits_of_a_gpt2_activation_or_a_yarn_attention_factor_are_refused():
    # gelu_new and gelu differ by at most 1e-3 (logits 1.1e-3 off); a yarn attention factor set after the build
    # scales cos and sin (logits 1.9e-3 off)
    from transformers import LlamaConfig, LlamaForCausalLM

    src = make_source("gpt2")  # built with gelu_new
    src.config.activation_function = "gelu"
    with pytest.raises(ValueError, match="computes another activation than its config's 'gelu'"):
        convert_to_bsbr(src, chunk_size=CHUNK)
    rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64}
    src = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=4, max_position_embeddings=256, rope_parameters=dict(rope)))
    convert_to_bsbr(src.eval(), chunk_size=CHUNK)  # as built
    src.config.rope_parameters = {**rope, "attention_factor": 1.5}
    with pytest.raises(ValueError, match="rotary frequencies or scaling are not the ones its config's rope_parameters"):
        convert_to_bsbr(src, chunk_size=CHUNK)


def test_a_dynamic_rope_source_that_ran_past_its_positions_converts_as_built():
    """Dynamic rope rescales the live inv_freq on a long input; the conversion compares the frequencies it was built
    with (original_inv_freq), and reproduces the source on an input within its positions."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    src = randomize(LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        max_position_embeddings=32, rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
    ))).eval()
    with torch.no_grad():
        src(torch.randint(0, VOCAB, (1, 80), generator=torch.Generator().manual_seed(1)))
    assert not torch.equal(src.model.rotary_emb.inv_freq, src.model.rotary_emb.original_inv_freq)
    model = convert_to_bsbr(src, chunk_size=CHUNK)
    ids = torch.randint(0, VOCAB, (1, CHUNK), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(outputs(model, ids), outputs(src, ids), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("built, edit, named", [
    ({}, dict(n_head=2), r"h\.0\.attn was built with num_heads 4 \(its config: 2\), head_dim 8 \(its config: 16\)"),
    (dict(scale_attn_by_inverse_layer_idx=True), dict(scale_attn_by_inverse_layer_idx=False),
     r"h\.1\.attn was built with scaling 0\.176777 \(its config: 0\.353553\)"),
    (dict(scale_attn_weights=False), dict(scale_attn_weights=True),
     r"h\.0\.attn was built with scaling 1 \(its config")])
def test_a_gpt2_whose_attention_config_was_edited_after_it_was_built_is_refused(built, edit, named):
    # GPT-2's weights have one shape for any head count and scale: the conversion followed the edited config
    # (logits 1-5 off, silently)
    from transformers import GPT2Config, GPT2LMHeadModel

    src = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, **built))
    for name, value in edit.items():
        setattr(src.config, name, value)
    with pytest.raises(ValueError, match=f"the source's transformer\\.{named}.*: was its config edited after"):
        convert_to_bsbr(src, chunk_size=CHUNK)


@pytest.mark.parametrize("family", ["gpt2", "llama", "mistral", "qwen2"])
def test_the_pad_tokens_embedding_row_trains_as_in_the_source(family, tmp_path):
    # Llama, Mistral and Qwen2 build their embedding with padding_idx (the pad token's row gets no gradient from
    # the lookup); the converted model's had none, so fine-tuning it trained a row the source's leaves alone
    config = make_source(family).config
    config.pad_token_id = 3
    torch.manual_seed(0)
    src = type(make_source(family))(config).eval()  # (no dropout)
    model = convert_to_bsbr(src, chunk_size=CHUNK).eval()
    want = src.get_input_embeddings().padding_idx
    assert want == (None if family == "gpt2" else 3)
    assert model.get_input_embeddings().padding_idx == want
    model.save_pretrained(tmp_path)
    assert AutoModelForCausalLM.from_pretrained(tmp_path).get_input_embeddings().padding_idx == want
    ids = torch.tensor([[3, 5, 3, 7, 9]])
    for m in (src, model):
        m(ids, labels=ids).loss.backward()
    torch.testing.assert_close(model.get_input_embeddings().weight.grad[3], src.get_input_embeddings().weight.grad[3],
                               rtol=1e-4, atol=1e-6)
    if family != "gpt2":  # (old LLaMA configs ship pad_token_id -1, which nn.Embedding reads as the last row)
        config.pad_token_id = -1
        src = type(make_source(family))(config)
        convert_to_bsbr(src, chunk_size=CHUNK).save_pretrained(tmp_path / "minus")
        src.save_pretrained(tmp_path / "src")
        want = AutoModelForCausalLM.from_pretrained(tmp_path / "src").get_input_embeddings().padding_idx
        assert want == VOCAB - 1
        assert AutoModelForCausalLM.from_pretrained(tmp_path / "minus").get_input_embeddings().padding_idx == want
    # a pad_token_id set on a built source's config (a common recipe: pad = eos) leaves its embedding as built;
    # reloaded, both read it (the converted model followed the config at once: the eos row frozen)
    src.config.pad_token_id = 5
    model = convert_to_bsbr(src, chunk_size=CHUNK)
    assert model.get_input_embeddings().padding_idx == want
    model.save_pretrained(tmp_path / "edited")
    src.save_pretrained(tmp_path / "source")
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "edited").get_input_embeddings().padding_idx == \
        AutoModelForCausalLM.from_pretrained(tmp_path / "source").get_input_embeddings().padding_idx


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_source_converts(dtype):  # (its rotary frequencies are rounded, not edited)
    from transformers import LlamaConfig, LlamaForCausalLM

    src = make_source("llama").to(dtype)
    ids = torch.randint(0, VOCAB, (1, CHUNK))
    torch.testing.assert_close(outputs(convert_to_bsbr(src, chunk_size=CHUNK).to(dtype), ids),
                               outputs(src, ids), rtol=0.05, atol=0.05)
    # SmolLM2's head size and rotary base: its lowest frequencies are subnormal in float16 (a relative error of
    # 1.7e-3 was refused as an edited config)
    smol_like = LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=64, num_hidden_layers=1,
                            num_attention_heads=2, rope_parameters={"rope_type": "default", "rope_theta": 100000.0})
    convert_to_bsbr(LlamaForCausalLM(smol_like).to(dtype), chunk_size=CHUNK)


@pytest.mark.parametrize("family, name", [("llama", "rms_norm_eps"), ("gpt2", "layer_norm_epsilon")])
def test_a_bad_source_value_is_named_as_the_source_names_it(family, name):
    src = make_source(family)
    setattr(src.config, name, -1.0)  # (refused as BSBRConfig's norm_eps, a name the source's config does not have)
    with pytest.raises(ValueError, match=f"norm_eps must be a finite number >= 0.* \\(the source config's {name}\\)"):
        convert_to_bsbr(src, chunk_size=CHUNK)


def test_a_bad_source_value_names_every_source_field_it_reads():
    from transformers import GPT2Config, GPT2LMHeadModel

    src = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=48, n_layer=1, n_head=4, n_positions=64))
    src.config.n_head = 5  # (48 is not a multiple: the message named n_embd alone)
    with pytest.raises(ValueError, match=r"hidden_size \(48\) must be divisible by num_attention_heads \(5\).*"
                                         r"\(the source config's n_embd, n_head\)"):
        convert_to_bsbr(src, chunk_size=CHUNK)


def test_an_activation_is_compared_by_what_it_computes_in_every_layer():
    # an nn.SiLU in place of transformers' SiLUActivation (the same function) was refused as an edited config,
    # and a layer past the first with another activation converted silently (logits 0.6 off)
    src = make_source("llama")
    src.model.layers[0].mlp.act_fn = torch.nn.SiLU(inplace=True)  # (in place: the probe is each layer's own)
    src.config.hidden_act = "swish"  # (silu under another name)
    convert_to_bsbr(src, chunk_size=CHUNK)
    prelu = make_source("llama")  # an activation with weights: refused by name, in any dtype (its weight was named
    prelu.config.hidden_act = "prelu"  # as one with no place in the BSBR model)
    prelu = type(prelu)(prelu.config).to(torch.float16)
    with pytest.raises(ValueError, match=r"the source's activation 'prelu' has learned weights \(model.layers.0.mlp: "
                                         r"weight\), which BSBR's MLP does not carry"):
        convert_to_bsbr(prelu, chunk_size=CHUNK)
    src.model.layers[-1].mlp.act_fn = torch.nn.ReLU()
    with pytest.raises(ValueError, match=r"the source's model.layers.1.mlp computes another activation than its "
                                         r"config's 'swish' \(edited, or the module replaced"):
        convert_to_bsbr(src, chunk_size=CHUNK)


def test_a_source_converts_under_a_float64_default_dtype():
    # the activation probe followed the default dtype and was compared with a float32 one (a bare RuntimeError)
    source = make_source("llama")
    want = convert_to_bsbr(source, chunk_size=4)
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        got = convert_to_bsbr(source, chunk_size=4)
    finally:
        torch.set_default_dtype(before)
    ids = torch.randint(3, 90, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(got(ids).logits, want(ids).logits)


@pytest.mark.parametrize("options, n", [(dict(), 61), (dict(retrieval_blocks=0, recall_tokens=8), 30)])
def test_training_runs_under_anomaly_detection(options, n):
    # rows with no key (log-sum-exp and log of nothing) gave NaN inside backward, which anomaly mode raises
    model = convert_to_bsbr(make_source("llama"), chunk_size=4, **options).train()
    ids = torch.randint(3, 90, (1, n), generator=torch.Generator().manual_seed(1))
    with torch.autograd.set_detect_anomaly(True):
        model(ids).logits.sum().backward()
    assert all(p.grad is None or bool(p.grad.isfinite().all()) for p in model.parameters())



def test_a_gpt2_with_its_own_mlp_width_and_the_sources_special_tokens_convert_exactly():
    # n_inner (GPT-2's MLP width, None: 4 x n_embd) and bos/eos/pad ids are the source's in the converted config
    src = randomize(GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2, n_positions=64,
                                               n_inner=100, bos_token_id=3, eos_token_id=4, pad_token_id=5)))
    model = convert_to_bsbr(src, chunk_size=CHUNK)
    assert model.config.intermediate_size == 100
    assert (model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id) == (3, 4, 5)
    ids = torch.randint(0, VOCAB, (1, CHUNK))
    assert torch.allclose(outputs(model, ids), outputs(src.eval(), ids), atol=1e-5)


def test_an_untied_base_model_without_its_head_is_refused_with_the_class_to_pass():
    from transformers import LlamaConfig, LlamaModel

    src = LlamaModel(LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=80, num_hidden_layers=1,
                                 num_attention_heads=4, tie_word_embeddings=False))
    with pytest.raises(ValueError, match="untied output embeddings but no lm_head: pass the \\*ForCausalLM model"):
        convert_to_bsbr(src, chunk_size=CHUNK)


def test_a_yarn_source_converts_exactly_with_its_attention_factor_on_cos_and_sin():
    # yarn scales both rotary tables by its attention factor (here 0.1 ln 4 + 1 = 1.139): a factor left off one
    # of them changes every logit past the first position
    from transformers import LlamaConfig, LlamaForCausalLM

    src = randomize(LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        max_position_embeddings=256, rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                                      "original_max_position_embeddings": 64}))).eval()
    model = convert_to_bsbr(src, chunk_size=CHUNK).eval()
    assert model.model.rotary.attention_scaling == pytest.approx(0.1 * __import__("math").log(4.0) + 1)
    ids = torch.randint(0, VOCAB, (1, 2 * CHUNK), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, src(ids).logits, rtol=1e-4, atol=1e-4)
