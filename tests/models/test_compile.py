"""``torch.compile`` of a converted model: the same logits as eager, and no recompile limit hit as the
length changes. The block selection loops over chunks in Python, so it runs eagerly inside a compiled
model (``torch.compiler.disable``); traced, it recompiled at every length and hit dynamo's limit by the
third (a tiny llama, lengths 40-250: 273 s of compiling, then eager anyway; with it left eager: 34 s)."""
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
            for n in (40, 80, 130):  # blocks selected among the earlier chunks from 88 tokens on
                ids = torch.randint(0, model.config.vocab_size, (1, n))
                torch.testing.assert_close(compiled(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)
    finally:
        torch._dynamo.reset()
