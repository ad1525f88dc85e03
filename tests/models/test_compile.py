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
