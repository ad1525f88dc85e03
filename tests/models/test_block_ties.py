"""Equal block scores: a repeated token at the same offset in two chunks has the same far key (window
positions), so the chunks' scores tie exactly; every form must pick the same one (the later)."""
import torch
from model_sources import make_source

from bsbr import convert_to_bsbr
from bsbr.ops.bsbr.retrieval import rank_scores, select_blocks


def test_ties_go_to_the_later_chunk_whatever_the_shape():
    scores = torch.tensor([1.0, 3.0, 3.0, 2.0, 3.0, float("-inf")])
    for rows in (1, 7, 300):  # topk's order among equal values changes with the shape
        s = scores.expand(rows, -1)
        assert select_blocks(s, torch.ones(6, dtype=torch.bool), 2).sort(-1).values.tolist() == [[2, 4]] * rows
        assert select_blocks(s, torch.ones(6, dtype=torch.bool), 1).tolist() == [[4]] * rows
    none = select_blocks(scores.expand(3, -1), torch.tensor([True, False, False, False, False, False]), 2)
    assert none.sort(-1).values.tolist() == [[-1, 0]] * 3


def test_scores_a_few_ulps_apart_tie():
    """Far keys computed by a prefill's matmul and by a decode step differ in their last bits (11.5814924
    against 11.5814915 for one key in two chunks); compared as they are, the earlier chunk could win."""
    for dtype in (torch.float32, torch.float64):
        a = torch.tensor(11.5814924, dtype=dtype)
        for later in (a, torch.nextafter(a, a + 1), torch.nextafter(a, a - 1)):
            scores = torch.stack([a, torch.tensor(3.0, dtype=dtype), later])
            assert select_blocks(scores, torch.ones(3, dtype=torch.bool), 1).tolist() == [2]
    s = torch.randn(1000, dtype=torch.float64) * 100
    ranked = rank_scores(s)
    assert (ranked[s.argsort()].diff() >= 0).all()  # the cut keeps the order
    assert ((ranked - s).abs() <= s.abs() * 2.0 ** -10).all()
    assert rank_scores(torch.tensor([float("-inf")])).item() == float("-inf")


def test_prefill_then_decode_equals_the_full_forward_with_tied_blocks():
    """The prefill computes the earlier chunks' far keys, the steps the later ones: their scores tie
    only to a few ulps (they differed by up to 2.6 in the logits on 26 of these 72 runs)."""
    for family, options in (("llama", dict(local_chunks=1, sink_tokens=0, retrieval_blocks=1)),
                            ("mistral", dict(local_chunks=3, sink_tokens=1, retrieval_blocks=2, gate_init=0.7))):
        model = convert_to_bsbr(make_source(family), chunk_size=4, **options).eval()
        for seed in (1, 5, 10):
            ids = torch.randint(3, 97, (1, 150), generator=torch.Generator().manual_seed(seed))[:, :48]
            with torch.no_grad():
                full = model(ids).logits
                out = model(ids[:, :11], use_cache=True)
                steps = [out.logits]
                for t in range(11, ids.shape[1]):
                    out = model(ids[:, t:t + 1], cache=out.cache)
                    steps.append(out.logits)
            torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-4)


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
