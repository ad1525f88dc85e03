"""Equal block scores: a repeated token at the same offset in two chunks has the same far key (window
positions), so the chunks' scores tie exactly; every form must pick the same one (the later)."""
import torch
from model_sources import make_source

from bsbr import convert_to_bsbr
from bsbr.ops.bsbr.retrieval import select_blocks


def test_ties_go_to_the_later_chunk_whatever_the_shape():
    scores = torch.tensor([1.0, 3.0, 3.0, 2.0, 3.0, float("-inf")])
    for rows in (1, 7, 300):  # topk's order among equal values changes with the shape
        s = scores.expand(rows, -1)
        assert select_blocks(s, torch.ones(6, dtype=torch.bool), 2).sort(-1).values.tolist() == [[2, 4]] * rows
        assert select_blocks(s, torch.ones(6, dtype=torch.bool), 1).tolist() == [[4]] * rows
    none = select_blocks(scores.expand(3, -1), torch.tensor([True, False, False, False, False, False]), 2)
    assert none.sort(-1).values.tolist() == [[-1, 0]] * 3


def test_cached_decode_equals_the_full_forward_with_tied_blocks():
    model = convert_to_bsbr(make_source("llama"), chunk_size=4, local_chunks=2, sink_tokens=2, retrieval_blocks=2)
    for seed in (3, 5, 11, 22):  # prompts with a token repeated at one offset in two chunks: they differed by 0.06-0.28
        torch.manual_seed(seed)
        ids = torch.randint(3, 97, (1, 30))
        with torch.no_grad():
            full = model(ids, use_cache=False).logits
            out = model(ids[:, :1])
            steps = [out.logits]
            for t in range(1, ids.shape[1]):
                out = model(ids[:, t:t + 1], cache=out.cache)
                steps.append(out.logits)
        torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-4)
