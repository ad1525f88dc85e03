"""Long pass-key prompts stay practical: no tensor of prompt length x prompt length anywhere in a
BSBR model's prefill + cached decoding (4k tokens; 8k and 32k among the slow checks), nor in the source's
(SDPA, 8k tokens)."""
import pytest
from model_sources import make_source
from torch.profiler import ProfilerActivity, profile

from bsbr.convert import convert_to_bsbr
from bsbr.evaluate import passkey


def biggest_allocation(fn):
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    return out, max(e.cpu_memory_usage for e in prof.events())


@pytest.mark.parametrize("which,length", [("bsbr", 4096), pytest.param("bsbr", 8192, marks=pytest.mark.slow),
                                          pytest.param("bsbr", 32768, marks=pytest.mark.slow),
                                          ("source", 8192)])
def test_long_prompt_builds_no_length_squared_tensor(word_tokenizer, which, length):
    src = make_source("llama")
    model = convert_to_bsbr(src, chunk_size=128) if which == "bsbr" else src
    p = passkey.build_prompt(word_tokenizer, length, 0.1, "12345", answer_tokens=4, filler="random",
                             filler_seed="long")
    n = p.length
    assert length - 4 - 24 <= n <= length - 4
    new, biggest = biggest_allocation(lambda: passkey.greedy_continuation(model, p.input_ids, 4,
                                                                          word_tokenizer.eos_token_id))
    assert len(new) == 4
    assert biggest < n * n, f"{which}: an allocation of {biggest / 2**20:.0f} MiB at {n} tokens"
    print(f"{which} {n} tokens: biggest allocation {biggest / 2**20:.1f} MiB (n*n bytes = {n * n / 2**20:.0f} MiB)")
