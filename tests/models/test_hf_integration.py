"""The HF models behave as transformers models do: generate continues a returned cache, takes
inputs_embeds, a wrong cache or id is one clear error, return_dict=False gives a tuple, AutoModel
loads a causal LM's checkpoint."""
import copy
import warnings

import pytest
import torch
from model_sources import VOCAB, make_source
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoModelForCausalLM

from bsbr import convert_to_bsbr
from bsbr.models import BSBRBaseModel, BSBRForCausalLM

CHUNK = 4
GEN = dict(do_sample=False, eos_token_id=None, pad_token_id=0)


def make(family, **kw):
    opts = dict(local_chunks=2, sink_tokens=2, retrieval_blocks=2, gate_init=0.3)
    opts.update(kw)
    return convert_to_bsbr(make_source(family), chunk_size=CHUNK, **opts).eval()


@pytest.fixture(params=["gpt2", "llama"])
def model(request):
    return make(request.param)


def left_padded(seed=0):
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    ids[0, :2] = 0
    return ids, mask


def test_generate_continues_a_returned_cache(model):
    ids, mask = left_padded()
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=15, **GEN)

    def first():
        return model.generate(ids, attention_mask=mask, max_new_tokens=7, return_dict_in_generate=True, **GEN)

    o = first()  # the whole sequence with a mask of ones (the cache has consumed the padding)
    seq = o.sequences
    assert o.cache.get_seq_length() == seq.shape[1] - 1
    out = model.generate(seq, attention_mask=torch.ones_like(seq), cache=o.cache, max_new_tokens=8, **GEN)
    assert torch.equal(out, ref)
    o = first()  # the whole sequence with its own mask
    full_mask = torch.cat([mask, torch.ones_like(seq[:, 6:])], 1)
    out = model.generate(seq, attention_mask=full_mask, cache=o.cache, max_new_tokens=8, **GEN)
    assert torch.equal(out, ref)
    o = first()  # only the new token, with the whole mask
    out = model.generate(seq[:, -1:], attention_mask=full_mask, cache=o.cache, max_new_tokens=8, **GEN)
    assert torch.equal(out, ref[:, -9:])
    o = first()  # only the new token, no mask
    out = model.generate(seq[:, -1:], cache=o.cache, max_new_tokens=8, **GEN)
    assert torch.equal(out, ref[:, -9:])


@pytest.mark.parametrize("mode", [dict(retrieval_blocks=2), dict(retrieval_blocks=0, recall_tokens=3)])
def test_a_mask_may_not_turn_tokens_the_cache_read_into_padding(mode):
    """Continuing a batch whose row 0 ended early, with the pads generate fed after its end masked out, gave that
    row silently wrong tokens: the mask over the cached tokens was dropped, and the cache still counted the pads."""
    model = make("llama", **mode)
    ids, mask = left_padded()
    o = model.generate(ids, attention_mask=mask, max_new_tokens=9, return_dict_in_generate=True, **GEN)
    seq = o.sequences
    turn = torch.cat([seq, torch.randint(3, VOCAB, (2, 3), generator=torch.Generator().manual_seed(1))], 1)
    turn_mask = torch.cat([mask, torch.ones_like(turn[:, 6:])], 1)
    turn_mask[0, 9:15] = 0  # row 0's tokens after its "end of text", read by the cache as real
    with pytest.raises(ValueError, match=r"attention_mask marks as padding 5 token\(s\) that the cache read as real "
                                         r"\(row 0"):
        model.generate(turn, attention_mask=turn_mask, cache=o.cache, max_new_tokens=4, **GEN)
    turn_mask[0, 9:15] = 1  # the mask the cache was built with: continues
    out = model.generate(turn, attention_mask=turn_mask, cache=o.cache, max_new_tokens=4, **GEN)
    assert torch.equal(out, model.generate(turn, attention_mask=turn_mask, max_new_tokens=4, **GEN))


def test_a_mask_may_not_turn_pads_the_cache_skipped_into_real_tokens():
    """A step whose mask marked as real the pads the cache had skipped ran silently with the cache's own view
    (logits 3.3 off what the same mask gives without a cache); the reverse was refused."""
    model = make("llama")
    ids, mask = left_padded()
    with torch.no_grad():
        cache = model(ids, attention_mask=mask, use_cache=True).cache
        new = torch.tensor([[5], [7]])
        with pytest.raises(ValueError, match=r"attention_mask marks as real 2 token\(s\) that the cache read as "
                                             r"padding \(row 0\): a cache cannot read tokens it skipped; generate"):
            model(new, attention_mask=torch.ones(2, 7, dtype=torch.long), cache=cache)
        whole = torch.cat([mask, torch.ones_like(new)], 1)  # the mask the cache was built with: continues
        torch.testing.assert_close(model(new, attention_mask=whole, cache=cache).logits,
                                   model(torch.cat([ids, new], 1), attention_mask=whole).logits[:, -1:])


def test_a_step_without_new_tokens_takes_the_whole_mask():
    """A cache step of no tokens given the mask the cache was built with was refused as marking 4 real tokens as
    padding: the mask's new part was sliced as [:, -0:], the whole mask."""
    model = make("llama")
    ids, mask = left_padded()
    with torch.no_grad():
        cache = model(ids, attention_mask=mask, use_cache=True).cache
        assert model(ids[:, :0], attention_mask=mask, cache=cache).logits.shape == (2, 0, VOCAB)


def test_a_4d_mask_is_refused_saying_why(model):
    """The sources take a custom 4-D mask; BSBR said only that the shape was wrong."""
    ids, _ = left_padded()
    causal = torch.tril(torch.ones(6, 6, dtype=torch.bool))[None, None].expand(2, 1, 6, 6)
    with pytest.raises(ValueError, match=r"attention_mask must be a padding mask of shape \(2, 6\) \(1 real token, "
                                         r"0 padding\), got \(2, 1, 6, 6\): .* \(a BSBR model by its window and "
                                         r"retrieved blocks\), so they take no other mask"):
        model(ids, attention_mask=causal)
    with torch.no_grad():  # a step after a prefill: the shape given, not a slice of it (it said (2, 0, 1, 7))
        cache = model(ids, use_cache=True).cache
        with pytest.raises(ValueError, match=r"attention_mask must be a padding mask of shape \(2, 7\) .*, got "
                                             r"\(2, 1, 1, 7\)"):
            model(ids[:, :1], attention_mask=torch.ones(2, 1, 1, 7), cache=cache)


def test_new_tokens_with_their_own_padded_mask_continue_a_cache(model):
    """The check above refused a continuation by new tokens alone, left-padded, with their own mask (generate
    then extends that mask, which covers only the tokens since): it compared it with everything the cache read."""
    ids = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    o = model.generate(ids, max_new_tokens=3, return_dict_in_generate=True, **GEN)
    message = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(3))
    new = torch.cat([o.sequences[:, -1:], message], 1)
    new_mask = torch.ones_like(new)
    new[0, :2], new_mask[0, :2] = 0, 0  # row 0's message is shorter
    whole = torch.cat([o.sequences[:, :-1], new], 1)
    whole_mask = torch.cat([torch.ones_like(o.sequences[:, :-1]), new_mask], 1)
    out = model.generate(new, attention_mask=new_mask, cache=o.cache, max_new_tokens=4, **GEN)
    assert torch.equal(out[:, -4:], model.generate(whole, attention_mask=whole_mask, max_new_tokens=4, **GEN)[:, -4:])


def test_generate_refuses_position_ids_it_cannot_follow(model):
    """generate dropped position_ids silently (the cache's counters place new tokens); the forward takes them."""
    ids = torch.randint(3, VOCAB, (1, 9), generator=torch.Generator().manual_seed(2))
    with pytest.raises(ValueError, match="position_ids: generate places each token by the cache's"):
        model.generate(ids, position_ids=torch.arange(9)[None] + 5, max_new_tokens=3, **GEN)


def test_generate_continues_a_cache_with_more_new_tokens_than_it_holds(model):
    """Only the new tokens, more of them than the cache had read: transformers took them for the whole text and
    dropped as many as the cache held, silently. A hash of the ids the cache read tells the two apart."""
    ids = torch.randint(3, VOCAB, (2, 30), generator=torch.Generator().manual_seed(5))
    kw = dict(max_new_tokens=6, **GEN)
    ref = model.generate(ids, **kw)[:, -6:]
    for held in (3, 10, 15, 20):
        with torch.no_grad():
            cache = model(ids[:, :held], use_cache=True).cache
        assert torch.equal(model.generate(ids[:, held:], cache=cache, **kw)[:, -6:], ref), held  # new tokens only
        with torch.no_grad():
            cache = model(ids[:, :held], use_cache=True).cache
        assert torch.equal(model.generate(ids, cache=cache, **kw)[:, -6:], ref), held  # the whole text
    with torch.no_grad():
        cache = model(ids[:, :10], use_cache=True).cache
    # new tokens that repeat the cache's last ids where a whole text would hold them (only the whole text read
    # can tell): a cache of 4 random tokens then 8 fives, then 20 fives, or in a batch beside a random row
    text = torch.cat([ids[:, :4], torch.full((2, 28), 5)], 1)
    ref_text = model.generate(text, **kw)[:, -6:]
    for rows in (torch.tensor([0]), torch.tensor([0, 1])):
        with torch.no_grad():
            cache = model(text[rows, :12], use_cache=True).cache
        assert torch.equal(model.generate(text[rows, 12:], cache=cache, **kw)[:, -6:], ref_text[rows])
    with torch.no_grad():  # a batch of an ambiguous row (its new tokens begin with its cached text) and a plain one
        cache = model(torch.stack([torch.full((12,), 5), ids[1, :12]]), use_cache=True).cache
    new = torch.stack([torch.full((18,), 5), ids[1, 12:30]])
    whole = torch.cat([torch.stack([torch.full((12,), 5), ids[1, :12]]), new], 1)
    with pytest.warns(UserWarning, match=r"rows \[0\] begin with the text the cache read, rows \[1\] do not"):
        assert torch.equal(model.generate(new, cache=cache, **kw)[:, -6:], model.generate(whole, **kw)[:, -6:])
    with torch.no_grad():  # whole texts, one row's edited (or a beam search's cache, which follows its last beams):
        cache = model(ids[:, :10], use_cache=True).cache  # every row read as new tokens, silently
    edited = ids.clone()
    edited[1, 4] = (ids[1, 4] + 1 - 3) % (VOCAB - 3) + 3
    with pytest.warns(UserWarning, match=r"rows \[0\] begin with the text the cache read, rows \[1\] do not, so "
                                         "every row is read as new tokens"):
        model.generate(edited, cache=cache, **kw)
    with torch.no_grad():  # a fork of some rows, reordered, continued with the whole text or the new tokens
        cache = model(ids[:, :10], use_cache=True).cache
    for rows in (torch.tensor([1, 0]), torch.tensor([1])):
        ref_rows = model.generate(ids[rows], **kw)[:, -6:]
        assert torch.equal(model.generate(ids[rows], cache=cache.select(rows), **kw)[:, -6:], ref_rows)
        assert torch.equal(model.generate(ids[rows, 10:], cache=cache.select(rows), **kw)[:, -6:], ref_rows)
    with torch.no_grad():  # the whole text tokenized again, its last cached token merged with what follows (HF's
        cache = model(ids[:, :10], use_cache=True).cache  # recipe of a cached prompt ending in a space): warned of
    retokenized = ids.clone()  # (read as new tokens, it put the prompt twice before them, silently)
    retokenized[:, 9] = (ids[:, 9] + 1 - 3) % (VOCAB - 3) + 3
    with pytest.warns(UserWarning, match="begin with the text the cache read but for its last token"):
        model.generate(retokenized, cache=copy.deepcopy(cache), **kw)
    with pytest.raises(ValueError, match="some rows begin with the text the cache read, others with it but for its "
                                         "last token"):  # (a whole text beside one tokenized again: not new tokens)
        model.generate(torch.stack([ids[0], retokenized[1]]), cache=copy.deepcopy(cache), **kw)
    with warnings.catch_warnings():  # new tokens in one row beside such a row: new tokens, without a word
        warnings.simplefilter("error")
        model.generate(torch.stack([retokenized[0, 3:], retokenized[1, :27]]), cache=cache, **kw)
    with torch.no_grad():  # the cached text alone again (HF's prompt-reuse recipe with no new text): it was read
        cache = model(ids[:, :10], use_cache=True).cache  # a second time, silently
    with pytest.raises(ValueError, match="input_ids are the text the cache has read, nothing after it") as told:
        model.generate(ids[:, :10], cache=cache, **kw)
    # its advice, followed: new tokens that repeat the cached text, all but their last read by a forward call (the
    # advice read them all, then generate was refused again or read some twice)
    assert "model(input_ids=new[:, :-1], cache=cache)), then generate from the whole text" in str(told.value)
    twice = torch.cat([ids[:, :10], ids[:, :10]], 1)
    with torch.no_grad():
        model(input_ids=ids[:, :9], cache=cache)
    assert torch.equal(model.generate(twice, cache=cache, **kw), model.generate(twice, **kw))
    with torch.no_grad():
        cache = model(ids[:, :10], use_cache=True).cache
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :3] = 0
    with torch.no_grad():  # the same text under padding, whatever ids lie there
        padded = model(ids[:, :10], attention_mask=mask, use_cache=True).cache
    other = ids[:, :10].clone()
    other[1, :3] = 4
    with pytest.raises(ValueError, match="input_ids are the text the cache has read, nothing after it"):
        model.generate(other, attention_mask=mask, cache=padded, **kw)
    assert torch.equal(model.generate(ids[:, 10:], cache=cache, **kw)[:, -6:], ref)  # (the cache is as it was)
    with torch.no_grad():  # a cache built from embeddings knows no ids: the whole text, as transformers reads it
        cache = model(inputs_embeds=model.get_input_embeddings()(ids[:, :10]), use_cache=True).cache
    assert cache.digest is None
    assert torch.equal(model.generate(ids, cache=cache, **kw)[:, -6:], ref)


def test_generate_warns_of_a_whole_text_tokenized_again_inside(model):
    """A chat template's next turn tokenizes the model's reply again, some of its tokens split or merged
    otherwise: the whole text no longer begins with the cache's ids anywhere but in its first ones, was read as
    new tokens, the cached text twice, without a word. Texts that begin with the cache's first 16, 32, 64, ... real
    tokens but not with all of them are warned of; new tokens are not, nor a batch where some row does not begin so
    (new tokens, as the others then are)."""
    ids = torch.randint(3, VOCAB, (2, 40), generator=torch.Generator().manual_seed(7))
    kw = dict(max_new_tokens=3, **GEN)
    with torch.no_grad():
        cache = model(ids[:, :30], use_cache=True).cache

    def edit(at):
        out = ids.clone()
        for r, a in enumerate(at):
            out[r, a] = (ids[r, a] + 1 - 3) % (VOCAB - 3) + 3
        return out

    for at, longest in (((20, 28), 16), ((26, 28), 16)):
        with pytest.warns(UserWarning, match=rf"input_ids begin with the first {longest} real tokens the cache read, "
                                             "yet not as the text it read .*, so they are read as new tokens"):
            model.generate(edit(at), cache=copy.deepcopy(cache), **kw)
    with warnings.catch_warnings():  # one row edited at its first id: new tokens, as the other row then is
        warnings.simplefilter("error")
        model.generate(edit((0, 14)), cache=copy.deepcopy(cache), **kw)
    mask = torch.ones(2, 30, dtype=torch.long)
    mask[1, :6] = 0
    with torch.no_grad():  # left padding: other ids under it are the same text
        padded = model(ids[:, :30], attention_mask=mask, use_cache=True).cache
    again = edit((20, 26))  # (row 1: its 21st real token)
    again[1, :6] = 4
    with pytest.warns(UserWarning, match=r"input_ids begin with the first 16 real tokens"):
        model.generate(again, attention_mask=torch.cat([mask, torch.ones(2, 10, dtype=torch.long)], 1),
                       cache=copy.deepcopy(padded), **kw)
    # the next turn padded otherwise (its rows' lengths changed): the real tokens are compared, not positions
    repadded, remask = torch.zeros(2, 44, dtype=torch.long), torch.ones(2, 44, dtype=torch.long)
    repadded[0, 4:], remask[0, :4] = again[0], 0
    repadded[1, 10:], remask[1, :10] = again[1, 6:], 0
    with pytest.warns(UserWarning, match=r"input_ids begin with the first 16 real tokens"):
        model.generate(repadded, attention_mask=remask, cache=copy.deepcopy(padded), **kw)
    # an earlier text edited or retried, shorter than what the cache read or as long: the cache read past it
    for text, longest in ((ids[:, :24], 16), (ids[:, :17], 16), (edit((24, 24))[:, :30], 16)):
        with pytest.warns(UserWarning, match=rf"the first {longest} real tokens the cache read, yet not as the text "
                                             r"it read .* continue a copy of the cache made before"):
            model.generate(text, cache=copy.deepcopy(cache), **kw)
    with warnings.catch_warnings():  # a next turn rendered alone, opening with the header (or the first words)
        warnings.simplefilter("error")  # the text opened with: fewer than 16 tokens shared
        model.generate(torch.cat([ids[:, :4], ids[:, 30:]], 1), cache=copy.deepcopy(cache), **kw)
        model.generate(torch.cat([ids[:, :12], ids[:, 30:34]], 1), cache=copy.deepcopy(cache), **kw)
    mixed = ids[:, :24].clone()  # a batch of prompts of 24 and 18 real tokens retried: each row shares its own
    mixed[1, :6], short = 0, torch.ones(2, 24, dtype=torch.long)
    short[1, :6] = 0
    with torch.no_grad():
        read = model(torch.cat([mixed, ids[:, 24:30]], 1), attention_mask=torch.cat([short, torch.ones(2, 6,
                     dtype=torch.long)], 1), use_cache=True).cache
    with pytest.warns(UserWarning, match=r"the first 16 real tokens the cache read"):
        model.generate(mixed, attention_mask=short, cache=read, **kw)
    whole = ids[:, :24].clone()  # a row that is all of its 16 cached tokens, beside a row edited: both shared
    whole[1, :8], held = 0, torch.ones(2, 24, dtype=torch.long)
    held[1, :8] = 0
    with torch.no_grad():
        read = model(whole, attention_mask=held, use_cache=True).cache
    whole[0, 20] = (whole[0, 20] + 1 - 3) % (VOCAB - 3) + 3
    with pytest.warns(UserWarning, match=r"the first 16 real tokens the cache read"):
        model.generate(whole, attention_mask=held, cache=read, **kw)
    with warnings.catch_warnings():  # new tokens alone: no warning
        warnings.simplefilter("error")
        assert torch.equal(model.generate(ids[:, 30:], cache=cache, **kw), model.generate(ids, **kw)[:, 30:])


def test_the_prefix_hashes_are_those_of_the_real_tokens_however_they_came():
    """The cache's hashes of each row's first 16, 32, 64, ... real tokens, built chunk by chunk under any padding,
    are those of the row's real tokens hashed at once (the sum of id times base ** index)."""
    from bsbr.models.bsbr.modeling_bsbr import _DIGEST_BASE, _DIGEST_MOD, _PREFIX_LENGTHS, BSBRCache

    g = torch.Generator().manual_seed(3)
    for trial in range(20):
        n = int(torch.randint(1, 80, (1,), generator=g))
        ids = torch.randint(0, 10**9, (3, n), generator=g)
        real = torch.rand(3, n, generator=g) > 0.3
        cache, at = BSBRCache([]), 0
        while at < n:
            step = int(torch.randint(1, 9, (1,), generator=g))
            cache.consumed(ids[:, at:at + step], min(step, n - at), real[:, at:at + step])
            at += step
        for row in range(3):
            tokens = ids[row][real[row]].tolist()
            want = [sum(t * pow(_DIGEST_BASE, i, _DIGEST_MOD) for i, t in enumerate(tokens[:length])) % _DIGEST_MOD
                    for length in _PREFIX_LENGTHS]
            assert cache.digest[row, 4:].tolist() == want and int(cache.digest[row, 3]) == len(tokens), trial


def test_a_left_padded_cache_continues_with_the_whole_text_under_other_pad_ids(model):
    """The cache's hash covered the ids under padding: the whole text passed again with other ids there (a
    history rebuilt with another pad id) was taken for new tokens alone and read a second time, every row
    wrong. Padded positions now hash alike whatever id lies under them."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (2, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :6], ids[0, :6] = 0, 7  # row 0 left-padded with id 7
    out = model.generate(ids, attention_mask=mask, max_new_tokens=4, return_dict_in_generate=True, **GEN)
    text = torch.cat([out.sequences, torch.randint(3, VOCAB, (2, 3), generator=g)], 1)  # the next user turn
    text_mask = torch.cat([mask, torch.ones(2, 7, dtype=torch.long)], 1)
    ref = model.generate(text, attention_mask=text_mask, max_new_tokens=5, **GEN)[:, -5:]
    repadded = text.clone()
    repadded[0, :6] = 0
    got = model.generate(repadded, attention_mask=text_mask, cache=out.cache, max_new_tokens=5, **GEN)[:, -5:]
    assert torch.equal(got, ref)


def test_generate_with_a_cache_and_use_cache_false_is_refused(model):
    """generate(use_cache=False) with a cache fed it the whole text at every step (wrong tokens, exit 0); a forward
    of one's own with both continues the cache, as the sources' do."""
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    with torch.no_grad():
        cache = model(ids[:, :4], use_cache=True).cache
        out = model(ids[:, 4:], cache=cache, use_cache=False).logits[:, -1]
        torch.testing.assert_close(out, model(ids).logits[:, -1], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"generate\(cache=..., use_cache=False\)"):
        model.generate(ids, cache=cache, use_cache=False, max_new_tokens=2, **GEN)


def test_generate_from_inputs_embeds_equals_from_ids(model):
    ids = torch.randint(3, VOCAB, (2, 13), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    e = model.get_input_embeddings()(ids).detach()
    a = model.generate(inputs_embeds=e, attention_mask=mask, max_new_tokens=10, **GEN)
    b = model.generate(ids, attention_mask=mask, max_new_tokens=10, **GEN)
    assert torch.equal(a, b[:, 13:])


def test_ids_after_a_cache_of_embeddings_are_read_as_the_whole_text_with_a_warning(model):
    # a cache that read inputs_embeds has no ids to compare: more new ids than it read had their first ones
    # skipped, silently (other tokens than the same ids through a cache of ids)
    ids = torch.randint(3, VOCAB, (1, 5), generator=torch.Generator().manual_seed(7))
    new = torch.randint(3, VOCAB, (1, 9), generator=torch.Generator().manual_seed(8))
    whole = torch.cat([ids, new], 1)
    with torch.no_grad():
        cache = model(inputs_embeds=model.get_input_embeddings()(ids), use_cache=True).cache
    with pytest.warns(UserWarning, match="this cache read inputs_embeds, whose ids it cannot compare, so input_ids "
                                         "are read as the whole text: its first 5 tokens") as said:
        a = model.generate(whole, cache=cache, max_new_tokens=4, **GEN)
    assert sum("inputs_embeds" in str(w.message) for w in said) == 1  # (at the prefill, not at each new token)
    assert torch.equal(a, model.generate(whole, max_new_tokens=4, **GEN))
    with torch.no_grad():  # new tokens alone, as the warning says: all but the last through the forward
        cache = model(inputs_embeds=model.get_input_embeddings()(ids), use_cache=True).cache
        model(new[:, :-1], cache=cache, use_cache=True)
    assert torch.equal(model.generate(new[:, -1:], cache=cache, max_new_tokens=4, **GEN)[:, -4:], a[:, -4:])


def test_a_cache_of_another_batch_layer_count_or_dtype_is_refused(model):
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        cache = model(ids, use_cache=True).cache
        with pytest.raises(ValueError, match="cache holds .*batch"):
            model(ids[:1, :1], cache=cache)
        with pytest.raises(ValueError, match="cache holds .*batch"):
            model(torch.cat([ids, ids])[:, :1], cache=cache)
        cache.states = cache.states[:1]
        with pytest.raises(ValueError, match="cache holds .*layers"):
            model(ids[:, :1], cache=cache)
        cache.states = cache.states * 3
        with pytest.raises(ValueError, match="cache holds .*layers"):
            model(ids[:, :1], cache=cache)
        cache = model(ids, use_cache=True).cache
        with pytest.raises(ValueError, match="cache holds .*dtype"):
            model.double()(ids[:, :1], cache=cache)


def test_a_cache_of_a_model_built_with_other_position_rules_is_refused():
    # far positions leave the states' shapes as they are: only the options the cache records tell the models apart
    src = make_source("llama")
    a, b = (convert_to_bsbr(src, chunk_size=CHUNK, retrieval_blocks=2, far_positions=far).eval()
            for far in ("window", "absolute"))
    ids = torch.randint(3, VOCAB, (1, 30), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        cache = a(ids[:, :29], use_cache=True).cache
        with pytest.raises(ValueError, match="cache was made by a model with far_positions 'window', this model "
                                             "has 'absolute'"):
            b(ids[:, 29:], cache=cache)
        c = convert_to_bsbr(src, chunk_size=CHUNK, retrieval_blocks=2, compression_factor=2, gate_init=0.5).eval()
        with pytest.raises(ValueError, match="cache was made by a model with compression_factor None, this model "
                                             "has 2"):  # (the states' check blamed a closed gate)
            c(ids[:, 29:], cache=cache)
        b_cache = b(ids[:, :29], use_cache=True).cache.select(torch.arange(1))  # (a copy records them too)
        assert torch.allclose(b(ids[:, 29:], cache=b_cache).logits[0, -1], b(ids).logits[0, -1], atol=1e-4)


@pytest.mark.parametrize("family, opts", [("gpt2", {}), ("llama", {}), ("qwen2", dict(recall_tokens=3,
                                                                                     retrieval_blocks=0))])
def test_rows_packing_several_sequences_read_each_alone_as_the_source_does(family, opts):
    """transformers' DataCollatorWithFlattening packs a batch into one row, position_ids restarting at each
    sequence, no mask: the chunks counted from the row's start, so each sequence read the ones before it."""
    from transformers import DataCollatorWithFlattening

    src = make_source(family).eval()
    model = make(family, gate_init=0.0, **opts)  # (closed: the source's attention over the exact keys)
    gen = torch.Generator().manual_seed(6)
    feats = [{"input_ids": torch.randint(3, VOCAB, (k,), generator=gen).tolist()} for k in (10, 7, 13, 1, 9)]
    packed = DataCollatorWithFlattening(return_flash_attn_kwargs=True)(feats)
    with torch.no_grad():
        out = model(**packed, output_hidden_states=True)
        alone = torch.cat([model(torch.tensor([f["input_ids"]])).logits for f in feats], 1)
        assert torch.allclose(out.logits, alone, atol=1e-5)
        assert len(out.hidden_states) == model.config.num_hidden_layers + 1 and out.cache is None
        if family == "gpt2":  # (the source itself: its window and blocks cover these, at their own positions)
            source_alone = torch.cat([src(torch.tensor([f["input_ids"]])).logits for f in feats], 1)
            assert torch.allclose(out.logits, source_alone, atol=1e-4)
        # two rows of 17 tokens: sequences of 10 and 7, and of 13, 1 and the first 3 of 9 (its prefix alone)
        rows = [DataCollatorWithFlattening()(feats[:2]), DataCollatorWithFlattening()([*feats[2:4], {
            "input_ids": feats[4]["input_ids"][:3]}])]
        both = model(torch.cat([r["input_ids"] for r in rows]),
                     position_ids=torch.cat([r["position_ids"] for r in rows]))
        assert torch.allclose(both.logits.flatten(0, 1), alone[0, :34], atol=1e-5)
    with pytest.raises(ValueError, match="use_cache=True: these rows pack several sequences"):
        model(**packed, use_cache=True)
    model.train()  # gradients reach the weights through the unpacking
    model(**packed).loss.backward()
    assert model.model.embed_tokens.weight.grad.abs().sum() > 0
    model.gradient_checkpointing_enable()  # (which builds no cache, asked or not: as the unpacked forward, which
    with pytest.warns(UserWarning, match="use_cache=True does not go with activation checkpointing"):  # says so)
        assert model(**packed, use_cache=True).cache is None


def test_generate_refuses_a_foreign_cache_or_one_of_another_batch_in_one_line(model):
    from transformers import DynamicCache

    ids = torch.randint(3, VOCAB, (3, 12), generator=torch.Generator().manual_seed(3))
    prefix = DynamicCache()  # (peft's prefix tuning passes its virtual tokens' keys and values so)
    prefix.update(torch.zeros(3, 2, 4, 8), torch.zeros(3, 2, 4, 8), 0)
    for key in ("cache", "past_key_values"):
        with pytest.raises(TypeError, match="cache must be a BSBRCache .*got DynamicCache: .*prefix tuning"):
            model.generate(ids, max_new_tokens=2, **{key: prefix}, **GEN)
        # an empty one, as manual loops begin (the hint was prefix tuning's)
        with pytest.raises(TypeError, match="got DynamicCache: to start one, leave cache= out and pass use_cache="):
            model.generate(ids, max_new_tokens=2, **{key: DynamicCache()}, **GEN)
    with torch.no_grad():
        cache = model(ids[:2, :6], use_cache=True).cache
    with pytest.raises(ValueError, match="cache holds .*batch"):
        model.generate(ids, cache=cache, max_new_tokens=2, **GEN)


def test_the_cache_and_the_options_object_are_importable_from_the_package():
    import bsbr
    from bsbr.models import BSBRCache
    from bsbr.ops import BSBROptions

    assert (bsbr.BSBRCache, bsbr.BSBROptions) == (BSBRCache, BSBROptions)
    assert {"BSBRCache", "BSBROptions"} <= set(bsbr.__all__)


def test_out_of_range_input_ids_are_one_clear_error(model):
    for bad in (VOCAB, -1):
        ids = torch.tensor([[3, 4, bad]])
        with pytest.raises(ValueError, match=rf"input_ids must lie in \[0, {VOCAB}\)"):
            model(ids)
        with pytest.raises(ValueError, match=rf"input_ids must lie in \[0, {VOCAB}\)"):
            model.model(ids)


def test_bad_labels_are_one_clear_error(model):
    ids = torch.tensor([[3, 4, 5, 6]])
    assert torch.isfinite(model(ids, labels=torch.tensor([[3, -100, 5, 6]])).loss)  # -100: ignored
    for bad, words in ((ids[:, :2], r"labels must be an int64 tensor of shape \(1, 4\)"),
                       (ids.float(), "labels must be an int64"), (ids + VOCAB, rf"labels must lie in \[0, {VOCAB}\)"),
                       (ids - 7, r"or be -100 \(ignore_index: not scored\), got -4")):
        with pytest.raises(ValueError, match=words):
            model(ids, labels=bad)


def test_ids_of_another_dtype_and_badly_shaped_embeddings_are_one_clear_error(model):
    for bad in (torch.tensor([[3, 4]], dtype=torch.uint8), torch.tensor([[True, False]]), torch.tensor([[3.0]])):
        with pytest.raises(ValueError, match="input_ids must be an int64"):
            model(bad)
    hidden = model.config.hidden_size
    for bad in (torch.randn(2, 5, hidden - 1), torch.randn(5, hidden), torch.ones(1, 5, hidden, dtype=torch.long)):
        with pytest.raises(ValueError, match=rf"inputs_embeds must be a float tensor of shape \(batch, seq_len, {hidden}\)"):
            model(inputs_embeds=bad)
    assert model(inputs_embeds=torch.randn(1, 5, hidden)).logits.shape == (1, 5, VOCAB)
    # half-precision embeddings of a float32 model run as the sources run them (a rotary model blamed its position
    # tables); wider ones than the weights are named
    ids = torch.randint(3, VOCAB, (1, 13), generator=torch.Generator().manual_seed(0))
    embeds = model.get_input_embeddings()(ids)
    ref = model(ids).logits
    for half in (torch.bfloat16, torch.float16):
        out = model(inputs_embeds=embeds.to(half)).logits
        assert out.dtype == torch.float32 and (out - ref).abs().max() < 0.1, half
    with pytest.raises(ValueError, match="inputs_embeds are torch.float64, the model's weights torch.float32: cast"):
        model(inputs_embeds=embeds.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast mixes dtypes by design
        assert model(inputs_embeds=embeds.bfloat16()).logits.shape == (1, 13, VOCAB)


def test_a_cache_continued_across_autocast_says_so(model):
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    half = copy.deepcopy(model).to(torch.bfloat16)
    cache = half(ids, use_cache=True).cache
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(ValueError, match="under torch.autocast the op "
                                                                    "and its cache run in float32"):
        half(ids[:, :1], cache=cache)
    with pytest.raises(ValueError, match="cache holds") as refused:  # no autocast anywhere: not named
        half.double()(ids[:, :1], cache=cache)
    assert "autocast" not in str(refused.value) and "cast the model before the prefill)" in str(refused.value)
    # a float32 cache continued by the model cast to bfloat16 was told only about autocast
    cache = model(ids, use_cache=True).cache
    with pytest.raises(ValueError, match=r"cast the model before the prefill; one built under torch.autocast"):
        copy.deepcopy(model).to(torch.bfloat16)(ids[:, :1], cache=cache)


def test_bad_position_ids_are_one_clear_error():
    from bsbr import convert_to_bsbr
    from model_sources import make_source

    ids = torch.tensor([[3, 4, 5], [6, 7, 8]])
    for family in ("gpt2", "llama"):  # learned and rotary positions
        m = convert_to_bsbr(make_source(family), chunk_size=4).eval()
        for bad in (torch.arange(4)[None], torch.arange(3.0)[None], torch.arange(6).view(2, 3, 1),
                    torch.ones(1, 3, dtype=torch.bool), torch.arange(9).view(3, 3)):  # (bool: every position 1)
            with pytest.raises(ValueError, match=r"position_ids must be an integer tensor of shape \(2, 3\) or \(1, 3\) "
                                                 r"or \(3,\)"):
                m(ids, position_ids=bad)
        ref = m(ids).logits  # one row for the batch, or 1-D, as transformers' models take them
        # (int16 and uint8: GPT-2's position table lookup raised a bare RuntimeError)
        for good in (torch.arange(3)[None], torch.arange(3), torch.arange(3, dtype=torch.int32).expand(2, 3),
                     torch.arange(3, dtype=torch.int16), torch.arange(3, dtype=torch.uint8)[None]):
            torch.testing.assert_close(m(ids, position_ids=good).logits, ref)
    with pytest.raises(ValueError, match="position_ids must be >= 0"):
        m = convert_to_bsbr(make_source("gpt2"), chunk_size=4).eval()
        m(ids, position_ids=torch.tensor([[-1, 0, 1]]))


def test_return_dict_false_gives_a_tuple_and_output_attentions_is_refused(model):
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(ids, use_cache=False)
        out = model(ids, use_cache=False, return_dict=False)
        assert isinstance(out, tuple) and torch.equal(out[0], ref.logits)
        base = model.model(ids, use_cache=False, return_dict=False)
        assert isinstance(base, tuple) and torch.equal(base[0], model.model(ids, use_cache=False).last_hidden_state)
        for m in (model, model.model):
            with pytest.raises(ValueError, match="output_attentions"):
                m(ids, output_attentions=True)
    model.config.output_attentions = True  # set on the config (from_pretrained(d, output_attentions=True)): the same
    try:
        for m in (model, model.model):
            with pytest.raises(ValueError, match=r"output_attentions is true in the model's config \(set in "
                                                 r"config.json, given to from_pretrained or set on model.config\)"):
                m(ids)  # (the argument's words named no file: a config.json edited to true was not found)
            assert m(ids, output_attentions=False, use_cache=False) is not None
    finally:
        model.config.output_attentions = False


def test_token_type_ids_are_refused_where_the_source_reads_them():
    """A GPT-2 source adds wte(token_type_ids) to its inputs (zeros too); dropping them silently gave
    logits 5.1 away from the source's. None passes. The other sources ignore them, and so does their
    conversion (a tokenizer's token_type_ids, passed on by model(**inputs), were refused)."""
    src = make_source("gpt2").eval()
    model = convert_to_bsbr(src, chunk_size=4).eval()
    ids = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert not torch.allclose(src(ids, token_type_ids=torch.zeros_like(ids)).logits, src(ids).logits)
        for m in (model, model.model):
            with pytest.raises(ValueError, match="token_type_ids is not supported"):
                m(ids, token_type_ids=torch.zeros_like(ids))
            assert m(ids, token_type_ids=None) is not None
        for family in ("llama", "qwen2"):
            src = make_source(family).eval()
            model = convert_to_bsbr(src, chunk_size=4).eval()
            types = torch.ones_like(ids)
            torch.testing.assert_close(model(ids, token_type_ids=types).logits, src(ids, token_type_ids=types).logits,
                                       rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name,value", [("chunk_size", 2), ("local_chunks", 3), ("retrieval_blocks", 1),
                                        ("far_positions", "hybrid"), ("max_position_embeddings", 16),
                                        ("hidden_act", "gelu"), ("norm_eps", 0.1)])
def test_a_config_value_changed_after_the_model_was_built_is_refused(tmp_path, name, value):
    """Setting config.chunk_size on a built model moved its logits by 5.7, to a model that is neither
    the old one nor one built with the new value (the layers keep theirs; the forward read the new);
    retrieval_blocks changed nothing until a save and a reload. The forward now says so; a save writes
    the edited config, and loading it builds that model."""
    model = convert_to_bsbr(make_source("llama"), chunk_size=4).eval()
    ids = torch.randint(3, VOCAB, (1, 20), generator=torch.Generator().manual_seed(0))
    before = getattr(model.config, name)
    setattr(model.config, name, value)
    for m in (model, model.model):
        with pytest.raises(ValueError, match=f"config.{name}|{name}"):
            m(ids)
    model.save_pretrained(tmp_path)
    rebuilt = BSBRForCausalLM.from_pretrained(tmp_path).eval()
    assert getattr(rebuilt.config, name) == value and rebuilt(ids).logits.isfinite().all()
    setattr(model.config, name, before)  # set back, it runs; an initial value and the learned positions'
    model.config.gate_init, model.config.position_scheme = 0.5, "clamp"  # scheme (read at every forward) may change
    assert model(ids).logits.isfinite().all()
    model.config.rope_parameters["rope_theta"] = 10.0  # an edit in place, too
    with pytest.raises(ValueError, match="rope_parameters"):
        model(ids)


@pytest.mark.parametrize("name,value", [("num_attention_heads", 3), ("num_key_value_heads", 1),
                                        ("attention_bias", False), ("compression_factor", 2)])
def test_a_config_value_that_shapes_the_weights_changed_after_the_model_was_built_is_not_saved(tmp_path, name, value):
    """The refusal above told the user to save and reload for these too: the save wrote weights of the old shapes
    under the edited config, which from_pretrained then refused."""
    model = convert_to_bsbr(make_source("llama"), chunk_size=4).eval()
    setattr(model.config, name, value)
    told = (r"this model holds weights its config does not build \(.*; changed since it was built: " + name +
            r"\): set the config back(, or build a new, untrained model from the edited config \(BSBRForCausalLM|$)")
    with pytest.raises(ValueError, match=told):
        model(torch.tensor([[3, 4]]))
    for m in (model, model.model):
        with pytest.raises(ValueError, match=told):
            m.save_pretrained(tmp_path / "edited")
    assert not (tmp_path / "edited").exists()


def test_a_config_edit_that_builds_no_model_is_told_to_set_it_back_only():
    # "build a new, untrained model from the edited config (BSBRForCausalLM(config))" was advised for a config that
    # builds no model (that call failed with the same reason), and the edited fields read "..., far_positions or
    # max_position_embeddings, far_positions"
    model = convert_to_bsbr(make_source("llama"), chunk_size=8, retrieval_blocks=2).eval()
    model.config.recall_tokens, model.config.retrieval_blocks, model.config.far_positions = 16, 0, "hybrid"
    with pytest.raises(ValueError, match=r"it builds no model: far_positions hybrid needs recall_tokens 0.*; changed "
                                         r"since it was built: retrieval_blocks, recall_tokens, far_positions\): set "
                                         r"the config back$"):
        model(torch.tensor([[3, 4]]))


@pytest.mark.parametrize("edit", [dict(gate_init=None), dict(retrieval_blocks=0, recall_tokens=8)])
def test_a_config_edit_that_adds_or_drops_weights_is_not_saved(tmp_path, edit):
    """A gate_init of None (no gate weights) or the bounded mode (no meta maps) set on a built model was saved,
    and from_pretrained then refused the folder (unexpected keys)."""
    model = convert_to_bsbr(make_source("llama"), chunk_size=4).eval()
    for name, value in edit.items():
        setattr(model.config, name, value)
    told = r"(does not build|config builds) \(layers.0.attn.(retrieval_gate|meta_h_proj.weight) is not"
    with pytest.raises(ValueError, match=told):
        model.save_pretrained(tmp_path / "edited")
    assert not (tmp_path / "edited").exists()
    model.config.update(dict(gate_init=0.0, retrieval_blocks=8, recall_tokens=0))  # set back: saved and loaded
    model.save_pretrained(tmp_path / "kept")
    BSBRForCausalLM.from_pretrained(tmp_path / "kept")


def test_a_quantized_or_pruned_model_is_not_saved_and_told_why(tmp_path):
    # the refusal said the model held weights its config does not build, and to set back a config never edited
    model = convert_to_bsbr(make_source("llama"), chunk_size=4).eval()
    quantized = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    with pytest.raises(ValueError, match=r"^model.layers.0.attn.q_proj is a quantized module, and a BSBR folder holds "
                                         "float weights: save the float model, and quantize it again after loading"):
        quantized.save_pretrained(tmp_path / "q")  # (it said a bias was missing and to build a new model)
    assert not (tmp_path / "q").exists()
    pruned = convert_to_bsbr(make_source("llama"), chunk_size=4).eval()
    pruned.model.layers = pruned.model.layers[:1]
    with pytest.raises(ValueError, match="set config.num_hidden_layers to match"):
        pruned.save_pretrained(tmp_path / "p")
    pruned.config.num_hidden_layers = 1  # as told: saved, and loaded as it computes
    pruned.save_pretrained(tmp_path / "p")
    ids = torch.tensor([[3, 4, 5, 6, 7, 8, 9]])
    with torch.no_grad():
        assert torch.equal(BSBRForCausalLM.from_pretrained(tmp_path / "p")(ids).logits, pruned(ids).logits)


def test_the_save_check_changes_no_logger_and_names_no_harmless_edit(tmp_path):
    """The check set the bsbr logger to ERROR and back around its meta-device build: saves from several threads
    left it at ERROR for good. With a harmless and a breaking edit, it blamed the harmless one."""
    import logging
    import threading

    models = [convert_to_bsbr(make_source("llama"), chunk_size=4) for _ in range(3)]
    levels = {name: logging.getLogger(name).level for name in ("bsbr", "bsbr.models.bsbr.configuration_bsbr")}
    threads = [threading.Thread(target=lambda m=m, i=i: [m.save_pretrained(tmp_path / f"{i}-{j}") for j in range(3)])
               for i, m in enumerate(models)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {name: logging.getLogger(name).level for name in levels} == levels
    model = models[0]
    model.config.chunk_size, model.config.gate_init = 16, None  # (chunk_size alone saves and loads)
    with pytest.raises(ValueError, match=r"this model holds weights its config does not build \(layers.0.attn."
                                         r"retrieval_gate is not built; changed since it was built: chunk_size\)"):
        model.save_pretrained(tmp_path / "edited")
    # a caller's own weights (DeepSpeed ZeRO-3 passes the gathered ones; its parameters are empty): not checked
    model.config.chunk_size, model.config.gate_init = 4, 0.0
    model.save_pretrained(tmp_path / "given", state_dict=model.state_dict())


def test_automodel_loads_an_untied_causal_lm_checkpoint(tmp_path):
    model = make("llama")  # untied LM head: lm_head.weight is in the checkpoint
    model.save_pretrained(tmp_path)
    assert "lm_head.weight" in load_file(tmp_path / "model.safetensors")
    base = AutoModel.from_pretrained(tmp_path)
    assert isinstance(base, BSBRBaseModel)
    ids = torch.randint(0, VOCAB, (1, 11))
    with torch.no_grad():
        torch.testing.assert_close(base(ids).last_hidden_state, model.model(ids).last_hidden_state, rtol=0, atol=0)
    sd = load_file(tmp_path / "model.safetensors")
    sd["model.extra.weight"] = torch.zeros(3)
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="unexpected_keys.*extra.*dropped"):
        AutoModel.from_pretrained(tmp_path)


def test_attn_implementation_eager_or_sdpa_loads_and_another_kernel_is_one_clear_error(tmp_path):
    # scripts pass attn_implementation="sdpa" for any model; transformers refused it ("request support")
    model = make("llama")
    model.save_pretrained(tmp_path)
    ids = torch.randint(0, VOCAB, (1, 11))
    with torch.no_grad():
        ref = model(ids).logits
        for impl in ("eager", "sdpa"):
            loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=impl)
            torch.testing.assert_close(loaded(ids).logits, ref, rtol=0, atol=0)
    for impl in ("flash_attention_2", "flex_attention", "sdap"):  # (a misspelling was called "that kernel")
        with pytest.raises(ValueError, match=f"attn_implementation='{impl}': a BSBR model takes 'eager' or 'sdpa'"):
            AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=impl)


def test_loading_a_source_model_as_bsbr_says_to_convert_it(tmp_path):
    make_source("llama").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="holds a 'llama' model, not a BSBR one: convert it first"):
        BSBRForCausalLM.from_pretrained(tmp_path)


def test_activation_checkpointing_gives_the_same_gradients_and_builds_no_cache():
    model = make("llama")
    ids = torch.randint(0, VOCAB, (2, 30), generator=torch.Generator().manual_seed(5))

    def grads():
        model.zero_grad()
        out = model(ids, labels=ids)
        out.loss.backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.train()
    plain, expect = grads()
    assert plain.cache is not None
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    out, got = grads()
    assert out.cache is None and got.keys() == expect.keys()
    for n in expect:
        torch.testing.assert_close(got[n], expect[n], rtol=1e-5, atol=1e-6, msg=n)
    with pytest.warns(UserWarning, match="use_cache=True does not go with activation checkpointing"):
        assert model(ids, use_cache=True).cache is None
    model.eval()  # inference keeps its cache
    cache = model(ids).cache
    assert cache is not None
    model.train()  # a cache continued there: the replay started from the state the first run advanced (CheckpointError)
    with pytest.raises(ValueError, match="cache: a training forward under activation checkpointing"):
        model(ids[:, :3], cache=cache)


def test_generate_in_train_mode_with_activation_checkpointing_keeps_its_cache():
    # generate runs without gradients: nothing is replayed, so the cache is kept (as transformers' layers do);
    # without it each step would see only its newest token
    model = make("llama")
    ids = torch.randint(0, VOCAB, (1, 30), generator=torch.Generator().manual_seed(7))
    model.eval()
    expect = model.generate(ids, max_new_tokens=12, do_sample=False)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "use_cache ... does not go with activation checkpointing"
        got = model.generate(ids, max_new_tokens=12, do_sample=False)
        with torch.no_grad():
            assert model(ids, use_cache=True).cache is not None
    assert torch.equal(got, expect)


@pytest.mark.slow
def test_a_process_that_never_imports_bsbr_loads_a_saved_model_with_trust_remote_code(tmp_path):
    # the lm_eval command line and pipeline scripts never import bsbr: config.json's auto_map names the
    # bsbr_auto.py save_pretrained writes, which imports the installed package
    import os
    import subprocess
    import sys

    model = make("llama")
    model.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "bsbr_auto.py").is_file()
    ids = torch.randint(0, VOCAB, (1, 30), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        save_file({"ids": ids, "logits": model(ids).logits}, tmp_path / "ref.safetensors")
    code = ("import sys, torch\n"
            "from safetensors.torch import load_file\n"
            "from transformers import AutoModelForCausalLM\n"
            "ref = load_file(sys.argv[2])\n"
            "m = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)\n"
            "with torch.no_grad():\n"
            "    assert torch.equal(m(ref['ids']).logits, ref['logits'])\n"
            "m.save_pretrained(sys.argv[1] + '-again')  # it tried to copy bsbr's own modules, and failed\n"
            "m = AutoModelForCausalLM.from_pretrained(sys.argv[1] + '-again', trust_remote_code=True)\n"
            "with torch.no_grad():\n"
            "    assert torch.equal(m(ref['ids']).logits, ref['logits'])\n"
            "print(type(m).__name__, 'bsbr' in sys.modules)\n")
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "m"), str(tmp_path / "ref.safetensors")],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["BSBRForCausalLM", "True"]  # (bsbr imported by bsbr_auto.py alone)


def test_trust_remote_code_with_another_bsbr_installed_says_which_bsbr_the_model_needs(tmp_path):
    # PyPI's bsbr (0.1.1, an earlier library without bsbr.models) made "No module named 'bsbr.models'"
    import os
    import subprocess
    import sys

    make("llama").config.save_pretrained(tmp_path / "m")
    (tmp_path / "old" / "bsbr").mkdir(parents=True)
    (tmp_path / "old" / "bsbr" / "__init__.py").write_text("__version__ = '0.1.1'\n")
    code = ("import sys\nfrom transformers import AutoConfig\n"
            "AutoConfig.from_pretrained(sys.argv[1], trust_remote_code=True)\n")
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "PYTHONPATH": str(tmp_path / "old")}
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "m")], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=300)
    assert out.returncode != 0
    assert "ImportError: this model needs the bsbr package that wrote it (config.json's bsbr_version), which this " \
           "Python cannot import (No module named 'bsbr.models')" in out.stderr, out.stderr[-2000:]


def test_a_config_saved_alone_reads_with_trust_remote_code_in_a_process_that_never_imports_bsbr(tmp_path):
    # its auto_map named a bsbr_auto.py only the model's save_pretrained wrote
    import os
    import subprocess
    import sys

    make("llama").config.save_pretrained(tmp_path / "c")
    code = ("import sys\nfrom transformers import AutoConfig\n"
            "c = AutoConfig.from_pretrained(sys.argv[1], trust_remote_code=True)\n"
            "print(type(c).__name__, c.chunk_size)\n")
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "c")], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["BSBRConfig", str(CHUNK)]


def test_push_to_hub_uploads_the_auto_code(tmp_path, monkeypatch):
    # the hub upload sends the files changed since the save began; nothing reaches the network here
    import os
    import types

    import transformers.modeling_utils as mu
    from transformers.utils.hub import PushToHubMixin

    sent = []

    def upload(self, working_dir, repo_id, files_timestamps, **kwargs):
        sent.extend(f for f in os.listdir(working_dir) if f not in files_timestamps
                    or os.path.getmtime(os.path.join(working_dir, f)) > files_timestamps[f])

    monkeypatch.setattr(PushToHubMixin, "_upload_modified_files", upload)
    monkeypatch.setattr(mu, "hf_api", lambda: types.SimpleNamespace(
        create_repo=lambda repo_id, **k: types.SimpleNamespace(repo_id=repo_id)))
    monkeypatch.setattr(mu, "create_and_tag_model_card", lambda *a, **k: types.SimpleNamespace(
        save=lambda path: open(path, "w").close()))
    make("llama").save_pretrained(tmp_path / "m", push_to_hub=True, repo_id="someone/smol-bsbr")
    assert {"bsbr_auto.py", "config.json", "model.safetensors"} <= set(sent)


def test_explicit_positions_do_not_move_the_far_chunks():
    """Far keys are rotated by their offset in their chunk, counted from the first real token: shifting
    every position by a constant (the near rotary is relative) leaves the logits as they are."""
    model = make("llama", local_chunks=1, sink_tokens=0, retrieval_blocks=2, gate_init=0.0, far_positions="window")
    ids = torch.randint(3, VOCAB, (1, 13), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
        for shift in (1, 3, 101):
            out = model(ids, position_ids=torch.arange(13)[None] + shift, use_cache=False).logits
            torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_a_forward_advances_the_cache_it_is_given_and_a_copy_forks_it():
    model = convert_to_bsbr(make_source("llama"), chunk_size=4, local_chunks=2, sink_tokens=1, retrieval_blocks=1)
    ids = torch.randint(3, 97, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cache = model(ids[:, :9]).cache
        fork = cache.select(torch.arange(2))
        swapped = cache.select([1, 0])  # a list of rows too (it failed: "list object has no attribute to")
        assert cache.select([]).states[0].n_seen.shape == (0,)  # (an empty list is float to torch: IndexError)
        with pytest.raises(ValueError, match="a boolean index must have one entry per sequence"):
            cache.select(torch.tensor([], dtype=torch.bool))  # (an empty mask of a batch of 2 gave no rows)
        assert cache.select(torch.tensor([False, True])).digest.tolist() == cache.select([-1]).digest.tolist() == \
            cache.digest[1:].tolist()
        with pytest.raises(ValueError, match="past_key_value= is not an argument of this model"):
            model(ids[:, 9:], past_key_value=cache)  # (ignored, the step was a fresh forward of 2 tokens)
        out = model(ids[:, 9:], cache=cache)
        assert out.cache is cache and cache.n_positions == 11 and cache.get_seq_length() == 11
        again = model(ids[:, 9:], cache=fork)
        torch.testing.assert_close(again.logits, out.logits, rtol=0, atol=0)
        torch.testing.assert_close(out.logits, model(ids).logits[:, 9:], rtol=1e-4, atol=1e-4)
        # select picks sequences: the swapped cache continues the swapped batch
        torch.testing.assert_close(model(ids.flip(0)[:, 9:], cache=swapped).logits, out.logits.flip(0),
                                   rtol=1e-6, atol=1e-6)


def test_logits_to_keep_as_positions_and_hidden_states_from_the_config():
    model = convert_to_bsbr(make_source("llama"), chunk_size=4, retrieval_blocks=1)
    ids = torch.randint(3, 97, (2, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids).logits
        kept = model(ids, logits_to_keep=torch.tensor([0, 5, 12])).logits
        torch.testing.assert_close(kept, full[:, [0, 5, 12]])
        model.config.output_hidden_states = True
        assert len(model(ids).hidden_states) == model.config.num_hidden_layers + 1


@pytest.mark.parametrize("option", ["prompt_lookup_num_tokens", "assistant_model"])
def test_assisted_generation_is_refused_in_words(model, option):
    # transformers said only "Assisted decoding requires a cache"
    ids = torch.randint(3, VOCAB, (1, 10), generator=torch.Generator().manual_seed(0))
    value = 3 if option == "prompt_lookup_num_tokens" else model
    with pytest.raises(ValueError, match=f"{option}: assisted generation is not supported"):
        model.generate(ids, max_new_tokens=3, **{option: value}, **GEN)


def test_a_bsbr_model_as_another_models_draft_is_refused_in_words(model):
    # as assistant_model of a source's generate it ran until the first rejected draft token, then raised
    # "'BSBRCache' object has no attribute 'crop'"
    src = make_source("qwen2")
    ids = torch.randint(3, VOCAB, (1, 20), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="a BSBR model cannot be the draft model of assisted generation"):
        src.generate(ids, assistant_model=convert_to_bsbr(src, chunk_size=8), max_new_tokens=30, **GEN)


@pytest.mark.parametrize("kw", [dict(), dict(gate_init=0.0), dict(retrieval_blocks=0, recall_tokens=6)])
def test_weights_offloaded_by_accelerate_give_the_same_logits_and_tokens(kw, tmp_path):
    # the gate is read in the streaming step and the meta maps' weights by the op, neither through a call
    # of its module, which is where accelerate puts an offloaded weight in place: both were on the meta device
    accelerate = pytest.importorskip("accelerate")
    ids = torch.randint(3, VOCAB, (1, 30), generator=torch.Generator().manual_seed(0))
    model = make("llama", **kw)
    with torch.no_grad():
        logits, tokens = model(ids).logits, model.generate(ids, max_new_tokens=9, **GEN)
    model.save_pretrained(tmp_path / "m")
    accelerate.cpu_offload(model, execution_device="cpu")
    from_disk = AutoModelForCausalLM.from_pretrained(tmp_path / "m", device_map="auto", max_memory={"cpu": "60KB"},
                                                     offload_folder=str(tmp_path / "offload")).eval()
    assert "disk" in from_disk.hf_device_map.values()
    for offloaded in (model, from_disk):
        with torch.no_grad():
            torch.testing.assert_close(offloaded(ids).logits, logits, rtol=0, atol=0)
            assert torch.equal(offloaded.generate(ids, max_new_tokens=9, **GEN), tokens)


def test_a_folder_without_config_json_is_named(tmp_path):
    """A saved model whose config.json is missing (a save cut short while its files were replaced) loaded as a
    default 768-wide model and failed on meta tensors after a table of mismatched weights."""
    make("llama").save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="is not a saved BSBR model directory \\(no config.json\\)"):
        BSBRForCausalLM.from_pretrained(tmp_path / "m")


def test_trainer_label_smoothing_shifts_the_labels_as_for_the_source(tmp_path):
    """transformers' Trainer shifts the labels for label smoothing only for the causal LMs it knows by
    name: a converted model was trained to predict the token it was reading, silently."""
    from transformers import Trainer, TrainingArguments

    model = make("llama", retrieval_blocks=64, far_positions="absolute")
    ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    args = TrainingArguments(output_dir=str(tmp_path), label_smoothing_factor=0.1, report_to=[], use_cpu=True)
    with torch.no_grad():
        loss = Trainer(model=model, args=args).compute_loss(model, {"input_ids": ids, "labels": ids.clone()})
        logits = model(ids).logits
    shifted = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1),
                                                label_smoothing=0.1)
    assert torch.allclose(loss, shifted, atol=1e-5), (loss, shifted)


def test_labels_take_the_loss_ignore_index(model):
    """The source's loss takes ignore_index; the labels check refused anything but -100."""
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    labels = ids.clone()
    labels[:, :2] = -1
    expected = model(ids, labels=torch.where(labels < 0, -100, labels)).loss
    assert torch.allclose(model(ids, labels=labels, ignore_index=-1).loss, expected)
    with pytest.raises(ValueError, match=r"or be -1 \(ignore_index"):
        model(ids, labels=labels - 1, ignore_index=-1)


def test_a_task_head_where_a_causal_lm_is_needed_is_refused_naming_it(tmp_path):
    """A classifier given where next-token predictions are read died deep inside (distill: "'NoneType' object is
    not callable"; evaluate: "the models' vocabularies differ"); a tied model's classifier folder loaded as a
    causal LM was "strict=False loads it anyway" (a classifier read as an LM); a transformers classifier as a
    source, weights "missing" (its decoder is there) or "no place for" its head."""
    from transformers import AutoModelForQuestionAnswering, AutoModelForSequenceClassification

    from word_tokenizer import build_word_tokenizer

    from bsbr.distill import DistillConfig, distill
    from bsbr.evaluate import evaluate, run_passkey

    src = make_source("qwen2")  # (tied embeddings: its classifier's folder lacks no LM head)
    convert_to_bsbr(src, chunk_size=4).save_pretrained(tmp_path / "lm")
    head = AutoModelForSequenceClassification.from_pretrained(tmp_path / "lm", num_labels=2)
    head.save_pretrained(tmp_path / "cls")
    with pytest.raises(ValueError, match="cls holds a BSBRForSequenceClassification \\(saved from it\\), not a "
                                         "causal LM: load it with AutoModelForSequenceClassification;"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "cls")
    ids = torch.randint(3, VOCAB, (1, 12), generator=torch.Generator().manual_seed(0))
    no_head = "is a BSBRForSequenceClassification, with no LM head, and .* compares next-token predictions"
    with pytest.raises(TypeError, match="^student " + no_head):
        distill(src, head, ids, tmp_path / "out", DistillConfig(steps=1))
    with pytest.raises(TypeError, match="^model 'bsbr' " + no_head):
        evaluate(head, src, build_word_tokenizer(), ids, chunk_size=4)
    wrapped = torch.nn.Module()  # (DistributedDataParallel keeps the model as .module)
    wrapped.module = convert_to_bsbr(src, chunk_size=4)
    with pytest.raises(TypeError, match="^model 'bsbr' is a Module wrapper: give the model it wraps \\(.module\\)$"):
        evaluate(wrapped, src, build_word_tokenizer(), ids, chunk_size=4)
    with pytest.raises(TypeError, match="^model 'bsbr' is a BSBRForSequenceClassification, which cannot generate"):
        run_passkey({"bsbr": head}, build_word_tokenizer(), lengths=[16], depths=[0.5], trials=1)
    qa = AutoModelForQuestionAnswering.from_config(src.config)
    with pytest.raises(ValueError, match="^the source is a Qwen2ForQuestionAnswering, not a causal LM: give the "
                                         "causal LM it was made from$"):
        convert_to_bsbr(qa)
    qa.save_pretrained(tmp_path / "qa")
    with pytest.raises(ValueError, match="qa holds a Qwen2ForQuestionAnswering \\(config.json's architectures\\), "
                                         "not a causal LM: give the causal LM it was made from"):
        convert_to_bsbr(str(tmp_path / "qa"))
    # a causal LM with a second head: its folder was refused as holding weights "config.json has no place for"
    from transformers import GPT2Config, GPT2DoubleHeadsModel

    double = GPT2DoubleHeadsModel(GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2, n_positions=32))
    double.save_pretrained(tmp_path / "double")
    for given, named in ((double, "^the source is"), (str(tmp_path / "double"), "double holds")):
        with pytest.raises(ValueError, match=f"{named} a GPT2DoubleHeadsModel.*, a causal LM with a multiple-choice "
                                             "head BSBR does not carry: save its causal LM alone"):
            convert_to_bsbr(given)


def test_loading_info_is_transformers_own_and_a_tied_base_models_folder_loads_as_a_causal_lm(tmp_path):
    # output_loading_info returned bsbr's filtered lists: a task head new on a causal LM's folder was missing from
    # missing_keys, a dropped LM head from unexpected_keys (code that finds untrained weights by them saw none),
    # and lists where transformers gives sets; a tied model's base folder (complete: its LM head is the embedding)
    # was refused as a causal LM, where transformers loads it
    from transformers import AutoModelForSequenceClassification

    convert_to_bsbr(make_source("llama"), chunk_size=4).save_pretrained(tmp_path / "untied")
    _, info = AutoModelForSequenceClassification.from_pretrained(tmp_path / "untied", output_loading_info=True)
    assert info["missing_keys"] == {"score.weight"} and info["unexpected_keys"] == {"lm_head.weight"}, info
    _, info = AutoModel.from_pretrained(tmp_path / "untied", output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == {"lm_head.weight"}, info
    lm = convert_to_bsbr(make_source("qwen2"), chunk_size=4)  # (tied)
    lm.model.save_pretrained(tmp_path / "base")
    again, info = AutoModelForCausalLM.from_pretrained(tmp_path / "base", output_loading_info=True)
    ids = torch.randint(3, VOCAB, (1, 9), generator=torch.Generator().manual_seed(0))
    assert info["missing_keys"] == set() and torch.equal(again(ids).logits, lm(ids).logits)


def test_task_heads_load_from_a_causal_lm_folder_train_and_reload(tmp_path):
    """AutoModelForSequenceClassification / TokenClassification / QuestionAnswering on a BSBR folder failed with
    transformers' 2,000-character "Unrecognized configuration class" (Llama's folders load them). The head is new
    on a causal LM's folder; a sequence is pooled at its last real token, so a right-padded row is the row alone."""
    from transformers import (AutoModelForQuestionAnswering, AutoModelForSequenceClassification,
                              AutoModelForTokenClassification)

    model = convert_to_bsbr(make_source("llama"), chunk_size=4, retrieval_blocks=2)
    model.config.pad_token_id = 0
    model.save_pretrained(tmp_path / "lm")
    ids = torch.randint(3, VOCAB, (2, 11), generator=torch.Generator().manual_seed(0))
    ids[0, -4:] = 0
    mask = (ids != 0).long()
    cls = AutoModelForSequenceClassification.from_pretrained(tmp_path / "lm", num_labels=3).eval()
    with torch.no_grad():
        torch.testing.assert_close(cls(ids, attention_mask=mask).logits[0], cls(ids[:1, :7]).logits[0])
        hidden = cls.model(ids[1:]).last_hidden_state[:, -1]
        torch.testing.assert_close(cls(ids[1:]).logits, cls.score(hidden))
        tok = AutoModelForTokenClassification.from_pretrained(tmp_path / "lm", num_labels=5).eval()(ids).logits
        qa = AutoModelForQuestionAnswering.from_pretrained(tmp_path / "lm").eval()(ids)
    assert tok.shape == (2, 11, 5) and qa.start_logits.shape == qa.end_logits.shape == (2, 11)
    cls.save_pretrained(tmp_path / "cls")  # a trained head is the folder's own: loaded strictly, the same logits
    again = AutoModelForSequenceClassification.from_pretrained(tmp_path / "cls").eval()
    with torch.no_grad():
        assert torch.equal(again(ids, attention_mask=mask).logits, cls(ids, attention_mask=mask).logits)
    base = AutoModel.from_pretrained(tmp_path / "cls")  # the decoder of a head's folder (its head dropped)
    torch.testing.assert_close(base(ids).last_hidden_state, cls.model(ids).last_hidden_state)
    base.save_pretrained(tmp_path / "base")
    for folder, kind, auto in (("base", "BSBRBaseModel", "AutoModel"), ("cls", "BSBRForSequenceClassification",
                                                                    "AutoModelForSequenceClassification")):
        with pytest.raises(ValueError, match=f"holds a {kind} \\(saved from it\\), not a causal LM: load it with "
                                             f"{auto};"):  # (no LM head: not "strict=False loads it anyway")
            AutoModelForCausalLM.from_pretrained(tmp_path / folder)
    # another head's folder: its head dropped, this one's new (as transformers does; refused as not matching its
    # config); a head of other labels on the folder's own, as the caller asks (ignore_mismatched_sizes=True)
    qa_again = AutoModelForQuestionAnswering.from_pretrained(tmp_path / "cls")
    assert torch.equal(qa_again.model.embed_tokens.weight, cls.model.embed_tokens.weight)
    with pytest.raises(ValueError, match="mismatched_keys': \\['score.weight \\(checkpoint \\(3, 48\\), config .*"
                                         "ignore_mismatched_sizes=True makes a head of these labels anew\\)$"):
        AutoModelForSequenceClassification.from_pretrained(tmp_path / "cls", num_labels=5)
    five = AutoModelForSequenceClassification.from_pretrained(tmp_path / "cls", num_labels=5,
                                                              ignore_mismatched_sizes=True)
    assert five.score.weight.shape[0] == 5 and torch.equal(five.model.norm.weight, cls.model.norm.weight)
    cls.save_pretrained(tmp_path / "bad")  # (a decoder weight of another shape is still refused: it would be random)
    weights = load_file(tmp_path / "bad" / "model.safetensors")
    weights["model.norm.weight"] = torch.ones(7)
    save_file(weights, tmp_path / "bad" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="mismatched_keys': \\['model.norm.weight \\(checkpoint \\(7,\\)"):
        AutoModelForSequenceClassification.from_pretrained(tmp_path / "bad", ignore_mismatched_sizes=True)
    weights = load_file(tmp_path / "cls" / "model.safetensors")  # a head's own folder without its head: refused
    del weights["score.weight"]
    save_file(weights, tmp_path / "cls" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing_keys': \\['score.weight'\\]"):
        AutoModelForSequenceClassification.from_pretrained(tmp_path / "cls")


def test_a_hub_model_in_the_cache_is_checked_as_its_folder_is(tmp_path, monkeypatch):
    # from a hub id an int32 weight loaded truncated (1.25 -> 1.0) where the folder was refused; weights only as
    # pytorch_model.bin got transformers' "do not set use_safetensors=True"; a single-file model in the cache was
    # "not in the local cache" once the hub could not be reached (its shard index was looked for as the model)
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError
    from hub_cache import publish

    import bsbr.models.bsbr.modeling_bsbr as modeling
    from bsbr.models.bsbr.modeling_bsbr import PickledWeightsError

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    cache = tmp_path / "hub"
    model = convert_to_bsbr(make_source("llama"), chunk_size=8)
    model.save_pretrained(tmp_path / "good")
    publish(tmp_path / "good", "org/good", cache)
    loaded = AutoModelForCausalLM.from_pretrained("org/good", cache_dir=cache)
    torch.testing.assert_close(loaded.model.norm.weight, model.model.norm.weight)
    weights = load_file(tmp_path / "good" / "model.safetensors")
    weights["model.norm.weight"] = (weights["model.norm.weight"] * 4).to(torch.int32)
    (tmp_path / "int").mkdir()
    (tmp_path / "int" / "config.json").write_text((tmp_path / "good" / "config.json").read_text())
    save_file(weights, tmp_path / "int" / "model.safetensors", metadata={"format": "pt"})
    publish(tmp_path / "int", "org/int", cache)
    with pytest.raises(ValueError, match="weight model.norm.weight is I32, not floating point"):
        AutoModelForCausalLM.from_pretrained("org/int", cache_dir=cache)
    (tmp_path / "int" / "model.safetensors").unlink()
    torch.save(weights, tmp_path / "int" / "pytorch_model.bin")
    publish(tmp_path / "int", "org/bin", cache)
    with pytest.raises(PickledWeightsError, match="org/bin holds its weights only as pytorch_model.bin"):
        AutoModelForCausalLM.from_pretrained("org/bin", cache_dir=cache)
    # the hub unreachable (no offline mode set): what the cache holds loads
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    import huggingface_hub

    real = huggingface_hub.hf_hub_download

    def unreachable(repo_id, filename, **kwargs):  # (as when the hub cannot be reached: the cache, else this)
        try:
            return real(repo_id, filename, local_files_only=True, **kwargs)
        except LocalEntryNotFoundError:
            raise LocalEntryNotFoundError("cannot reach the hub, and the file is not in the cache") from None

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", unreachable)
    assert modeling.hub_folder("org/good", cache_dir=cache) == cache / "models--org--good" / "snapshots" / ("1" * 40)
    with pytest.raises(OSError, match="org/gone: the hub cannot be reached, and no copy of it is in the local cache"):
        modeling.hub_folder("org/gone", cache_dir=cache)


def test_a_cache_whose_every_row_is_padded_continues_as_generate_without_it():
    # (padding="max_length" pads every row: the tokens a cache holds are its positions, padding included; the
    # tests' left-padded batches always had one row without padding)
    model = make("llama")
    ids = torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 24, dtype=torch.long)
    mask[0, :3] = mask[1, :5] = 0
    with torch.no_grad():
        cache = model(ids[:, :-1], attention_mask=mask[:, :-1], use_cache=True).cache
        assert cache.get_seq_length() == 23
        assert torch.equal(model.generate(ids, attention_mask=mask, cache=cache, max_new_tokens=6, **GEN),
                           model.generate(ids, attention_mask=mask, max_new_tokens=6, **GEN))


def test_a_config_asking_for_tuples_gets_tuples_unless_the_call_asks_otherwise(model):
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    m = copy.deepcopy(model)
    m.config.return_dict = False
    out = m(ids)
    assert isinstance(out, tuple) and torch.equal(out[0], model(ids).logits)
    assert torch.equal(m(ids, return_dict=True).logits, model(ids).logits)


def test_a_question_answering_folder_loads_as_the_base_model_and_is_named_to_a_causal_lm(tmp_path):
    from bsbr.models.bsbr.modeling_bsbr import BSBRForQuestionAnswering

    convert_to_bsbr(make_source("llama"), chunk_size=4).save_pretrained(tmp_path / "lm")
    BSBRForQuestionAnswering.from_pretrained(tmp_path / "lm").save_pretrained(tmp_path / "qa")
    assert type(BSBRBaseModel.from_pretrained(tmp_path / "qa")) is BSBRBaseModel
    with pytest.raises(ValueError, match="qa holds a BSBRForQuestionAnswering \\(saved from it\\), not a causal LM: "
                                         "load it with AutoModelForQuestionAnswering"):
        BSBRForCausalLM.from_pretrained(tmp_path / "qa")


@pytest.mark.parametrize("weights, embeds", [(torch.float16, torch.bfloat16), (torch.bfloat16, torch.float16)])
def test_half_precision_embeddings_of_the_other_half_type_are_refused(model, weights, embeds):
    # bfloat16 into a float16 model was cast silently (values past 65,504 become inf)
    m = copy.deepcopy(model).to(weights)
    e = m.get_input_embeddings()(torch.tensor([[3, 4, 5]])).to(embeds)
    with pytest.raises(ValueError, match=f"inputs_embeds are {embeds}, the model's weights {weights}: cast"):
        m(inputs_embeds=e)
