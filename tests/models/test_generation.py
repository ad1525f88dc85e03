"""Cached decoding = a full forward; left-padded batches = each prompt alone."""
import copy
import warnings

import pytest
import torch
from model_sources import VOCAB, make_source

from bsbr import convert_to_bsbr
from bsbr.models import BSBRCache, BSBRForCausalLM

CHUNK = 8


@pytest.fixture(params=[("llama", 1, 0, 0, "absolute", 0), ("gpt2", 1, 0, 0, "absolute", 0),
                        ("llama", 2, 3, 0, "window", 0), ("llama", 2, 3, 2, "window", 0),
                        ("gpt2", 2, 1, 2, "absolute", 0), ("llama", 2, 3, 0, "window", 5),
                        ("llama", 2, 3, 2, "hybrid", 0)],
                ids=["llama", "gpt2", "llama-window", "llama-blocks", "gpt2-blocks", "llama-recall", "llama-hybrid"])
def model(request):
    # an open gate, so the chunk states matter in every chunk after the first; "window" attends
    # exactly to the previous chunk and the sinks (a ring buffer in the cache); "blocks" also reads
    # the 2 best earlier chunks exactly (their keys in the cache); "recall" keeps 5 exact past tokens
    # per K/V head and one state of the rest
    # "hybrid": a source of 6 chunks of positions (3 read at own positions), so blocks 2 chunks back keep
    # their own positions and older ones read as if 2 chunks back
    family, local_chunks, sinks, blocks, far, recall = request.param
    src = make_source(family)
    if far == "hybrid":
        src.config.max_position_embeddings = 6 * CHUNK
    return convert_to_bsbr(src, chunk_size=CHUNK, gate_init=0.7, local_chunks=local_chunks,
                           sink_tokens=sinks, retrieval_blocks=blocks, far_positions=far, recall_tokens=recall)


def test_prefill_then_steps_equal_full_forward_logits(model):
    ids = torch.randint(0, VOCAB, (2, 37), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :11], use_cache=True)
        steps = [out.logits]
        cache = out.cache
        for t in range(11, 37):
            out = model(ids[:, t:t + 1], cache=cache)
            cache = out.cache
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-4)


def test_a_mask_of_a_length_set_aside_in_advance_is_read_from_its_start(model):
    # a manual loop's mask of the final length (ones so far, zeros for the slots to come): its last entries were
    # read, all zeros, so every new token was taken for padding (logits off by 6, no error)
    ids = torch.randint(0, VOCAB, (2, 37), generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(2, 45, dtype=torch.long)
    with torch.no_grad():
        full = model(ids).logits
        mask[:, :11] = 1
        out = model(ids[:, :11], attention_mask=mask, use_cache=True)  # (the first call too: it was refused)
        steps, cache = [out.logits], out.cache
        for t in range(11, 37, 3):
            mask[:, t:t + 3] = 1
            out = model(ids[:, t:t + 3], attention_mask=mask, cache=cache)
            steps.append(out.logits)
            cache = out.cache
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-4)
    with torch.no_grad():  # (a mask of ones for the slots to come too, as the source reads it)
        torch.testing.assert_close(model(ids[:, :11], attention_mask=torch.ones(2, 30, dtype=torch.long)).logits,
                                   full[:, :11], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="attention_mask must have shape"):  # (no cache kept: no loop; as the source)
        model(ids[:, :11], attention_mask=torch.ones(2, 30, dtype=torch.long), use_cache=False)


def test_the_cache_under_its_old_name_past_key_values_is_continued(model):
    # transformers before 5.24 called it past_key_values, and so does much user code: unread, it gave a
    # fresh forward of the new token alone
    ids = torch.randint(0, VOCAB, (2, 30), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(ids).logits[:, -1]
        cache = model(ids[:, :-1], use_cache=True).past_key_values
        with pytest.warns(FutureWarning, match="past_key_values") as said:  # and says that the name is deprecated,
            out = model(ids[:, -1:], past_key_values=cache)
        assert said[0].filename == __file__  # at the caller's line (it named torch's module.py)
        assert out.past_key_values is cache and int(cache.n_seen[0]) == 30
        torch.testing.assert_close(out.logits[:, -1], full, rtol=1e-4, atol=1e-4)
        with pytest.raises(ValueError, match="past_key_values"):
            model(ids[:, -1:], past_key_values=cache, cache=cache)
        model(ids, cache=None, past_key_values=None)  # both unset: no cache, no complaint
    # generate too: transformers' own warning named bsbr's generate as the line (a filter on the caller's missed it)
    kw = dict(max_new_tokens=3, do_sample=False, eos_token_id=None, pad_token_id=0, return_dict_in_generate=True)
    first = model.generate(ids[:, :20], **kw)
    with pytest.warns(FutureWarning, match="past_key_values= is deprecated: pass the cache as cache=") as said:
        old = model.generate(ids[:, 23:], past_key_values=copy.deepcopy(first.cache), **kw)
    assert [w.filename for w in said if w.category is FutureWarning] == [__file__]
    assert torch.equal(old.sequences, model.generate(ids[:, 23:], cache=first.cache, **kw).sequences)
    with warnings.catch_warnings():  # None is unset (a chat loop's first turn): no warning, from either name
        warnings.simplefilter("error")
        model.generate(ids[:, :20], past_key_values=None, **kw)
        model.generate(ids[:, 23:], past_key_values=None, cache=copy.deepcopy(first.cache), **kw)
    peft = pytest.importorskip("peft")  # through a PeftModel's generate: still the caller's line
    wrapped = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.warns(FutureWarning, match="past_key_values= is deprecated") as said:
        wrapped.generate(input_ids=ids[:, 23:], past_key_values=copy.deepcopy(first.cache), **kw)
    assert [w.filename for w in said if w.category is FutureWarning] == [__file__]


def test_greedy_generate_equals_argmax_of_full_forward(model):
    prompt = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        seq = model.generate(prompt, max_new_tokens=30, do_sample=False, eos_token_id=None, pad_token_id=0)
        full = model(seq).logits
    assert seq.shape[1] == 35  # crosses several chunk boundaries
    assert torch.equal(full[:, 4:-1].argmax(-1), seq[:, 5:])


def test_a_chunked_prefill_request_generates_as_one_prefill(model):
    # transformers' prefill_chunk_size splits a long prompt to bound the n x n scores, which BSBR never forms:
    # the prompt is read in one pass (it failed with "Cannot use prefill chunking without a cache")
    prompt = torch.randint(0, VOCAB, (2, 29), generator=torch.Generator().manual_seed(4))
    kw = dict(max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        plain = model.generate(prompt, **kw)
        assert torch.equal(model.generate(prompt, prefill_chunk_size=8, **kw), plain)
        cache = model(prompt[:, :10], use_cache=True).cache  # continuing a cache given by the caller, too
        assert torch.equal(model.generate(prompt, cache=cache, prefill_chunk_size=8, **kw), plain)


def test_left_padded_batch_generation_equals_each_prompt_alone(model):
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g) for n in (3, 12, 7)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros(3, width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = p
        mask[i, width - len(p):] = 1
    kw = dict(max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        batch = model.generate(ids, attention_mask=mask, **kw)
        for i, p in enumerate(prompts):
            alone = model.generate(p[None], **kw)
            assert torch.equal(batch[i, width:], alone[0, len(p):]), f"prompt {i}"


def test_cache_is_bounded_by_chunk_and_per_chunk_states(model):
    prompt = torch.randint(0, VOCAB, (1, 4))
    with torch.no_grad():
        out = model(prompt, use_cache=True)
        cache = out.cache
        for _ in range(60):
            out = model(out.logits[:, -1:].argmax(-1), cache=cache)
            cache = out.cache
    assert isinstance(cache, BSBRCache)
    st = cache.states[0]
    assert int(st.n_seen) == 64
    assert st.k_buf.shape[2] == CHUNK * model.config.local_chunks  # keys of the window, not of 64 tokens
    assert st.k_sink.shape[2] == model.config.sink_tokens
    if model.config.recall_tokens:  # bounded: M cached tokens and one state, no per-chunk arrays
        assert st.F_past.shape[2] == 0 and st.kr_past.numel() == 0
        assert st.recall_kr.shape[2] == model.config.recall_tokens and bool(st.recall_on.all())
        return
    assert 8 <= st.F_past.shape[2] <= 16  # one state per completed chunk (capacity grows by doubling)
    if model.config.retrieval_blocks:  # exact blocks keep every completed chunk's keys and values
        assert st.kr_past.shape[2] == st.F_past.shape[2] and st.kr_past.shape[3] == CHUNK
    else:
        assert st.kr_past.numel() == 0


def test_beam_search_with_the_cache_equals_beam_search_without(model):
    # the cache is reordered as beams swap; without a cache every step is a full forward
    prompt = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(2))
    kw = dict(max_new_tokens=12, num_beams=3, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        out = model.generate(prompt, **kw)
        again = model.generate(prompt, use_cache=False, **kw)
    assert out.shape == (2, 18)  # crosses two chunk boundaries
    assert torch.equal(out, again)


def test_generate_past_the_sources_positions_with_the_default_length(monkeypatch):
    """transformers caps a default-length generate at max_position_embeddings; rope positions go on."""
    source = make_source("llama3-rope")  # 256 positions
    model = convert_to_bsbr(source, chunk_size=CHUNK, retrieval_blocks=2).eval()
    prompt = torch.randint(3, VOCAB, (1, 300))
    out = model.generate(prompt, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert out.shape == (1, 320)  # transformers' default: 20 new tokens
    assert model.generate(prompt, do_sample=False, max_new_tokens=3, eos_token_id=None, pad_token_id=0).shape == (1, 303)
    # a max_length the caller gave is theirs (not the default's 20 new tokens)
    assert model.generate(prompt, do_sample=False, max_length=305, eos_token_id=None, pad_token_id=0).shape == (1, 305)
    gpt2 = convert_to_bsbr(make_source("gpt2"), chunk_size=CHUNK)  # learned absolute positions: 64 of them
    gpt2.config.position_scheme = "absolute"
    with pytest.raises(ValueError, match="max_length"):
        gpt2.generate(torch.randint(3, VOCAB, (1, 70)), do_sample=False)
    # nor does transformers warn ("you may observe exceptions") past the source's positions: its length
    # criterion is given no position limit, except for learned absolute positions
    from transformers.generation.stopping_criteria import MaxLengthCriteria

    seen, call = [], MaxLengthCriteria.__call__
    monkeypatch.setattr(MaxLengthCriteria, "__call__",
                        lambda self, *a, **k: seen.append(self.max_position_embeddings) or call(self, *a, **k))
    model.generate(prompt, do_sample=False, max_new_tokens=2, eos_token_id=None, pad_token_id=0)
    gpt2.generate(torch.randint(3, VOCAB, (1, 30)), do_sample=False, max_new_tokens=2, pad_token_id=0)
    assert seen == [None, None, 64, 64]


@pytest.mark.parametrize("recall", [0, 5])
def test_a_half_precision_model_continues_its_cache(recall):
    # the bounded mode's op runs in float32 under bfloat16 (its states too), the exact modes' in bfloat16:
    # the cache check must expect each one's dtype
    exact = convert_to_bsbr(make_source("llama"), chunk_size=CHUNK, gate_init=0.7, local_chunks=2, sink_tokens=3,
                            retrieval_blocks=0 if recall else 2, far_positions="window", recall_tokens=recall)
    model = copy.deepcopy(exact).to(torch.bfloat16)
    ids = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = exact(ids).logits  # float32
        full = model(ids).logits.float()
        out = model(ids[:, :30], use_cache=True)
        assert out.cache.states[0].k_buf.dtype == (torch.float32 if recall else torch.bfloat16)
        steps, cache = [out.logits.float()], out.cache
        for t in range(30, 40):
            out = model(ids[:, t:t + 1], cache=cache)
            steps.append(out.logits.float())
    # bfloat16's rounding (its kernels differ by CPU): the cached decode is as far from the float32 model as
    # the bfloat16 full forward is (0.150 and 0.150 on one machine, where the two differ by 0.135)
    rounding = (full - ref).abs().max()
    assert (torch.cat(steps, 1) - ref).abs().max() <= 1.5 * rounding + 0.02


@pytest.mark.parametrize("options", [dict(retrieval_blocks=2), dict(retrieval_blocks=0), dict(recall_tokens=5)],
                         ids=["blocks", "window", "recall"])
def test_a_cache_continues_whatever_the_grad_mode_it_was_built_in(options):
    # a fresh conversion's gate is closed but trainable: a prefill under autograd kept the chunk states
    # (the gate could open), one without none, and a step in the other mode refused the cache
    model = convert_to_bsbr(make_source("llama"), chunk_size=CHUNK, local_chunks=2, sink_tokens=3, **options)
    ids = torch.randint(0, VOCAB, (2, 37), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model(ids).logits[:, -3:]
    for prefill_grad in (True, False):
        with torch.set_grad_enabled(prefill_grad):
            cache = model(ids[:, :34], use_cache=True).cache
        steps = []
        for t, grad in zip(range(34, 37), (not prefill_grad, prefill_grad, not prefill_grad)):
            with torch.set_grad_enabled(grad):
                out = model(ids[:, t:t + 1], cache=cache)
            cache = out.cache
            steps.append(out.logits.detach())
        torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-4)


def test_a_closed_gate_that_gets_no_gradient_from_a_cache_without_states_is_warned_of():
    # a prompt cached without autograd keeps no chunk states; the continuation under autograd gave the gate no
    # gradient (a full forward gives it one), so training on continuations never opened it, without a word
    model = convert_to_bsbr(make_source("llama"), chunk_size=CHUNK, local_chunks=2, sink_tokens=3, retrieval_blocks=2)
    ids = torch.randint(0, VOCAB, (1, 37), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        cache = model(ids[:, :30], use_cache=True).cache
    with warnings.catch_warnings():  # (in eval mode, scoring a continuation with gradients on is inference)
        warnings.simplefilter("error")
        model.eval()(ids[:, 30:], cache=copy.deepcopy(cache))
    model.train()
    with pytest.warns(UserWarning, match="built without autograd, so it keeps no chunk states: the closed "
                                         "retrieval_gate gets no gradient"):
        model(ids[:, 30:], cache=cache).logits.sum().backward()
    assert all(layer.attn.retrieval_gate.grad is None for layer in model.model.layers)
    with warnings.catch_warnings():  # (a cache built under autograd keeps them: no warning, and a gradient)
        warnings.simplefilter("error")
        cache = model(ids[:, :30], use_cache=True).cache
        model(ids[:, 30:], cache=cache).logits.sum().backward()
    assert any(bool(layer.attn.retrieval_gate.grad.abs().sum() > 0) for layer in model.model.layers)


def test_a_cache_built_under_inference_mode_continues_outside_it():
    # its tensors are inference tensors, which cannot be written in place outside inference mode
    model = convert_to_bsbr(make_source("llama"), chunk_size=CHUNK, local_chunks=2, sink_tokens=3, retrieval_blocks=2)
    ids = torch.randint(0, VOCAB, (1, 30), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = model(ids).logits[:, -1]
    with torch.inference_mode():
        cache = model(ids[:, :28], use_cache=True).cache
    with torch.no_grad():
        model(ids[:, 28:29], cache=cache)
    with torch.inference_mode():  # and a cache continued outside goes on inside again
        out = model(ids[:, 29:30], cache=cache)
    torch.testing.assert_close(out.logits[:, -1], full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("options", [dict(retrieval_blocks=2), dict(recall_tokens=8, retrieval_blocks=0)])
def test_a_step_under_autograd_after_an_inference_mode_step_at_the_same_position(options):
    # the step's masks, made once per position for every layer, were handed from an inference-mode step to a
    # later step under autograd: "Inference tensors cannot be saved for backward"
    model = convert_to_bsbr(make_source("llama"), chunk_size=4, **options)
    ids = torch.randint(3, VOCAB, (1, 21), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():  # e.g. an evaluation
        model(ids[:, 20:], cache=model(ids[:, :20], use_cache=True).cache)
    out = model(ids[:, 20:], cache=model(ids[:, :20], use_cache=True).cache)
    out.logits.sum().backward()
    torch.testing.assert_close(out.logits[:, -1], model(ids).logits[:, -1], rtol=1e-4, atol=1e-4)


def test_generate_modes_that_cannot_run_say_which(tmp_path):
    """generate(cache_implementation="paged") switches to transformers' continuous batching, which was
    refused as an attn_implementation the user never passed; beam search continuing a given cache was
    pointed at BSBRCache.reorder_cache, which generate gives no way to call."""
    model = convert_to_bsbr(make_source("llama"), chunk_size=CHUNK).eval()
    ids = torch.randint(3, VOCAB, (1, 10), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="continuous batching .* generate without cache_implementation"):
        model.generate(ids, cache_implementation="paged", max_new_tokens=2, do_sample=False)
    # loaded with "sdpa", which transformers keeps for continuous batching: generate returned the prompt and
    # generate_batch a failed request, the reason in a log line only
    model.save_pretrained(tmp_path)
    sdpa = BSBRForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    with pytest.raises(ValueError, match="continuous batching .* generate without cache_implementation"):
        sdpa.generate(ids, cache_implementation="paged", max_new_tokens=2, do_sample=False)
    with pytest.raises(ValueError, match="continuous batching .* generate without cache_implementation"):
        sdpa.generate_batch([ids[0].tolist()], generation_config=model.generation_config)
    out = model.generate(ids, max_new_tokens=2, do_sample=False, return_dict_in_generate=True, pad_token_id=0)
    with pytest.raises(ValueError, match="num_beams or num_return_sequences > 1 cannot continue a given cache"):
        model.generate(out.sequences, past_key_values=out.past_key_values, num_beams=2, max_new_tokens=2,
                       do_sample=False, pad_token_id=0)


def test_the_text_digest_is_the_polynomial_hash_of_the_ids_at_every_length():
    # generate hashes the whole text at each step to tell it from new tokens alone: its powers are kept as a
    # tensor grown by doubling (built from a Python list per call, the hash took 10 ms at 128k tokens)
    from bsbr.models.bsbr.modeling_bsbr import _DIGEST_BASE, _DIGEST_MOD, text_digest

    def by_hand(row, prev=0):
        h = prev
        for t in row:
            h = (h * _DIGEST_BASE + t) % _DIGEST_MOD
        return h

    g = torch.Generator().manual_seed(0)
    for k in (0, 1, 7, 1023, 1024, 1025, 2049, 4100):
        ids = torch.randint(0, 50_000, (2, k), generator=g)
        prev = torch.tensor([3, 123_456_789])
        assert text_digest(ids).tolist() == [by_hand(r) for r in ids.tolist()]
        assert text_digest(ids, prev).tolist() == [by_hand(r, p) for r, p in zip(ids.tolist(), prev.tolist())]


@pytest.mark.parametrize("options", [dict(retrieval_blocks=2), dict(recall_tokens=8, retrieval_blocks=0)])
def test_steps_without_autograd_keep_the_backward_of_earlier_steps_with_it(options):
    """Steps without autograd write the cache in place, into tensors that earlier steps under autograd had
    saved for their backward: "modified by an inplace operation" (the HF source's cache allows it)."""
    model = convert_to_bsbr(make_source("llama"), chunk_size=4, local_chunks=2, sink_tokens=2, **options).eval()
    ids = torch.randint(3, VOCAB, (2, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cache = model(ids[:, :20], use_cache=True).cache
    loss = sum(model(ids[:, t:t + 1], cache=cache).logits.logsumexp(-1).mean() for t in range(20, 23))
    with torch.no_grad():
        for t in range(23, 26):
            model(ids[:, t:t + 1], cache=cache)
        full = model(ids[:, :27]).logits[:, -1]
    loss.backward()
    assert model.lm_head.weight.grad is not None
    with torch.no_grad():  # and the cache went on as a full forward does
        torch.testing.assert_close(model(ids[:, 26:27], cache=cache).logits[:, -1], full, rtol=1e-4, atol=1e-4)


def test_steps_under_autocast_round_as_the_full_forward_whatever_the_grad_mode():
    """A one-token step without autograd rotated q and k by one matmul, which autocast ran in bfloat16, where
    the elementwise rotation (full forward, inference mode) keeps float32: up to 0.5 apart on logits of ~6,
    and greedy tokens that changed with the grad mode."""
    model = convert_to_bsbr(make_source("llama"), chunk_size=4, local_chunks=2, sink_tokens=2,
                            retrieval_blocks=2).eval()
    ids = torch.randint(3, VOCAB, (2, 34), generator=torch.Generator().manual_seed(0))

    def decode(mode):
        with mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            cache = model(ids[:, :22], use_cache=True).cache
            return torch.stack([model(ids[:, t:t + 1], cache=cache).logits[:, 0].float() for t in range(22, 34)], 1)
    assert torch.equal(decode(torch.no_grad), decode(torch.inference_mode))


@pytest.mark.parametrize("options", [dict(retrieval_blocks=2), dict(recall_tokens=8, retrieval_blocks=0)])
def test_a_prompt_under_autograd_then_steps_without_it_give_the_gradients_of_a_stepped_prompt(options):
    """The prompt's one forward under autograd left its cache's tensors in its graph; steps without autograd
    wrote into them in place, and a later step's backward went through the overwritten values (gradients 0.1-0.5
    off). Only steps had marked their state for a copy."""
    model = convert_to_bsbr(make_source("llama"), chunk_size=4, local_chunks=2, sink_tokens=2, **options).eval()
    ids = torch.randint(3, VOCAB, (2, 30), generator=torch.Generator().manual_seed(0))

    def grads(stepwise):
        model.zero_grad()
        if stepwise:
            cache = model(ids[:, :1], use_cache=True).cache
            for t in range(1, 18):
                model(ids[:, t:t + 1], cache=cache)
        else:
            cache = model(ids[:, :18], use_cache=True).cache
        with torch.no_grad():
            for t in range(18, 21):
                model(ids[:, t:t + 1], cache=cache)
        model(ids[:, 21:22], cache=cache).logits.logsumexp(-1).mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    by_steps, at_once = grads(True), grads(False)
    assert by_steps.keys() == at_once.keys()
    for name, g in by_steps.items():
        torch.testing.assert_close(at_once[name], g, rtol=1e-4, atol=1e-4)


def test_a_fork_under_autograd_gives_the_gradients_of_the_cache_it_came_from():
    """A cache forked under autograd (select, beam reorder) was not marked for a copy, so steps without autograd
    wrote into tensors still tied to the prompt's graph: the sinks' gradients flowed back to the prompt."""
    torch.manual_seed(0)
    model = convert_to_bsbr(make_source("llama"), chunk_size=4, local_chunks=2, sink_tokens=2,
                            retrieval_blocks=2).eval().double()
    ids = torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))

    def grad(fork):
        model.zero_grad()
        cache = model(ids[:, :13], use_cache=True).cache
        if fork:
            cache = cache.select(torch.arange(2))
        with torch.no_grad():
            for t in range(13, 19):
                model(ids[:, t:t + 1], cache=cache)
        model(ids[:, 19:20], cache=cache).logits.logsumexp(-1).mean().backward()
        return model.model.embed_tokens.weight.grad.clone()
    torch.testing.assert_close(grad(True), grad(False), rtol=1e-12, atol=1e-12)


def test_a_frozen_model_under_autograd_copies_no_cache():
    """Steps of a model that needs no gradient record no graph: the cache is written in place, never copied."""
    model = convert_to_bsbr(make_source("llama"), chunk_size=4, local_chunks=2, retrieval_blocks=2).eval()
    model.requires_grad_(False)
    ids = torch.randint(3, VOCAB, (1, 20), generator=torch.Generator().manual_seed(0))
    cache = model(ids[:, :12], use_cache=True).cache
    for t in range(12, 20):
        grad = t % 2 == 0
        buffers = [s.k_buf for s in cache.states]
        with torch.set_grad_enabled(grad):
            model(ids[:, t:t + 1], cache=cache)
        if not grad and t % 4 != 3:  # a step without autograd that completes no chunk: written in place
            assert all(s.k_buf is k for s, k in zip(cache.states, buffers))
    assert not any(s.grad_history for s in cache.states)


def test_a_beam_searchs_returned_cache_is_not_continued():
    """Its rows follow the last step's beams, not the sequences it returns (sorted by score): continued with the
    whole text, rows were read as new tokens (or as "tokenized again"), silently wrong."""
    model = convert_to_bsbr(make_source("llama"), chunk_size=CHUNK).eval()
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    ids = torch.randint(3, VOCAB, (1, 12), generator=torch.Generator().manual_seed(28))
    out = model.generate(ids, num_beams=2, num_return_sequences=2, max_new_tokens=6, return_dict_in_generate=True,
                         **kw)
    whole = torch.cat([out.sequences, torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(1))], 1)
    for cache in (out.cache, out.cache.select(torch.tensor([1, 0]))):
        with pytest.raises(ValueError, match="a beam search left this cache following its last beams"):
            model.generate(whole, cache=cache, max_new_tokens=4, **kw)
    # a greedy generation's cache is continued as before
    out = model.generate(ids, max_new_tokens=6, return_dict_in_generate=True, **kw)
    whole = torch.cat([out.sequences, torch.randint(3, VOCAB, (1, 5), generator=torch.Generator().manual_seed(1))], 1)
    mask = torch.ones_like(whole)  # (a generated id may be the pad id)
    assert torch.equal(model.generate(whole, attention_mask=mask, cache=out.cache, max_new_tokens=4, **kw),
                       model.generate(whole, attention_mask=mask, max_new_tokens=4, **kw))


def test_a_cache_reordered_by_hand_is_continued():
    # reorder_cache marked a cache as a beam search's for good: generate then refused it (the refusals of a
    # mismatched batch advise calling it in a loop of one's own)
    model = convert_to_bsbr(make_source("llama"), chunk_size=CHUNK).eval()
    kw = dict(eos_token_id=None, pad_token_id=0, do_sample=False, max_new_tokens=4)
    ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    idx = torch.tensor([1, 0])
    text = torch.cat([ids[idx], ids[idx][:, :3]], 1)
    mask = torch.ones_like(text)
    with torch.no_grad():
        cache = model(ids, use_cache=True).cache
    cache.reorder_cache(idx)
    assert torch.equal(model.generate(text, attention_mask=mask, cache=cache, **kw),
                       model.generate(text, attention_mask=mask, **kw))


def test_a_cache_a_beam_search_continued_in_place_is_not_continued_again():
    # a cache given to a beam search that returns a tensor is reordered to its last beams in place: continued
    # afterwards, a row read another beam's text, silently
    model = convert_to_bsbr(make_source("llama"), chunk_size=CHUNK).eval()
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    ids = torch.randint(3, VOCAB, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cache = model(ids[:, :-1].repeat(2, 1), use_cache=True).cache  # one row per beam
    seq = model.generate(ids, cache=cache, num_beams=2, num_return_sequences=2, max_new_tokens=6, **kw)
    new = torch.cat([seq[:, -1:], torch.tensor([[5, 6, 7]] * 2)], 1)
    for given in (dict(cache=cache), dict(cache=None, past_key_values=cache)):
        with pytest.raises(ValueError, match="a beam search left this cache following its last beams"):
            model.generate(new, max_new_tokens=4, **given, **kw)


def test_a_mask_that_fits_neither_the_input_nor_the_cache_and_input_is_refused():
    # the whole text with a mask of the new tokens alone: transformers read every id as new, so the cached text
    # was read a second time (34 positions for a 21-token text), silently
    model = convert_to_bsbr(make_source("llama"), chunk_size=4).eval()
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0, max_new_tokens=3)
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(19))
    out = model.generate(ids, return_dict_in_generate=True, **{**kw, "max_new_tokens": 5})
    whole = torch.cat([out.sequences, torch.randint(3, VOCAB, (2, 4), generator=torch.Generator().manual_seed(2))], 1)
    for columns in (5, 30):
        with pytest.raises(ValueError, match=f"attention_mask has {columns} columns, the input 18 tokens and the "
                                             "cache 13 positions: give a mask over the input .18. or over the cache"):
            model.generate(whole, attention_mask=torch.ones(2, columns, dtype=torch.long), cache=out.cache, **kw)
    assert out.cache.n_positions == 13  # (refused before anything was read)
    expected = model.generate(whole, attention_mask=torch.ones_like(whole), **kw)
    new = whole[:, 13:]  # the cache's positions and the new tokens: the other length a mask may have
    got = model.generate(new, attention_mask=torch.ones(2, 18, dtype=torch.long), cache=copy.deepcopy(out.cache), **kw)
    assert torch.equal(got[:, -3:], expected[:, -3:])
    assert torch.equal(model.generate(whole, attention_mask=torch.ones_like(whole), cache=out.cache, **kw), expected)


def test_a_cache_of_another_kind_is_refused_before_a_4d_mask_is_read():
    # generate(cache=StaticCache(...)) (transformers makes the mask 4-D for it): AttributeError 'n_positions'
    from transformers import StaticCache

    model = convert_to_bsbr(make_source("llama"), chunk_size=4).eval()
    ids = torch.randint(3, VOCAB, (1, 9), generator=torch.Generator().manual_seed(0))
    with pytest.raises(TypeError, match="cache must be a BSBRCache .*got StaticCache"):
        model.generate(ids, cache=StaticCache(config=model.config, max_cache_len=32), max_new_tokens=2,
                       do_sample=False)
    with pytest.raises(TypeError, match="cache must be a BSBRCache .*got tuple"):
        model(ids, cache=((torch.zeros(1), torch.zeros(1)),), attention_mask=torch.ones(1, 1, 9, 9))


def test_a_cache_a_call_left_midway_is_refused_and_a_copy_made_before_continues():
    # a Ctrl-C in generate(..., cache=cache) (a notebook's "interrupt kernel") left the first layer advanced and
    # the others not; the next call continued it without a word, into logits of nothing
    model = convert_to_bsbr(make_source("llama"), chunk_size=CHUNK, gate_init=0.7, retrieval_blocks=2).eval()
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids).logits
        cache = model(ids[:, :20], use_cache=True).cache
        copy_ = cache.select(torch.arange(2))
        layer = model.model.layers[1]
        forward = layer.forward

        def interrupted(*args, **kwargs):
            raise KeyboardInterrupt

        layer.forward = interrupted
        with pytest.raises(KeyboardInterrupt):
            model(ids[:, 20:30], cache=cache)
        layer.forward = forward
        for again in (cache, cache.select(torch.arange(2))):
            with pytest.raises(ValueError, match="a call that continued it stopped before it finished"):
                model(ids[:, 20:30], cache=again)
        with pytest.raises(ValueError, match="stopped before it finished"):
            model.generate(ids[:, 20:21], cache=cache, max_new_tokens=2, do_sample=False)
        torch.testing.assert_close(model(ids[:, 20:], cache=copy_).logits, full[:, 20:], rtol=1e-4, atol=1e-4)


def test_the_model_and_its_cache_print_their_options():
    # print(model) showed none of the attention's options nor the norms' eps, repr(cache) an address
    model = convert_to_bsbr(make_source("llama"), chunk_size=CHUNK, retrieval_blocks=2)
    text = str(model)
    assert "chunk_size=8, local_chunks=2, sink_tokens=4, retrieval_blocks=2" in text and "eps=1e-06" in text
    with torch.no_grad():
        cache = model(torch.randint(0, VOCAB, (2, 11)), use_cache=True).cache
    assert repr(cache) == "BSBRCache(layers=2, positions=11, tokens per row=[11, 11])"



def test_labels_refused_leave_a_cache_as_it_was():
    # labels were checked after the model had continued the cache: the retry with mended labels read the new
    # tokens twice (logits off by up to 2)
    model = convert_to_bsbr(make_source("llama"), chunk_size=CHUNK, gate_init=0.7).eval()
    ids = torch.randint(0, VOCAB, (1, 25), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids).logits
        cache = model(ids[:, :20], use_cache=True).cache
        bad = ids[:, 20:].clone()
        bad[0, 0] = VOCAB + 3
        for labels, told in ((bad, "labels must lie in"), (ids[:, 20:23], "labels must be an int64 tensor of shape")):
            with pytest.raises(ValueError, match=told):
                model(ids[:, 20:], cache=cache, labels=labels)
        assert cache.n_positions == 20
        out = model(ids[:, 20:], cache=cache, labels=ids[:, 20:])
        # logits_to_keep as transformers reads it (a negative int k: h[:, -k:]), with labels of that length
        kept = model(ids, labels=ids[:, 1:], logits_to_keep=-1)
        assert kept.logits.shape[1] == 24 and torch.isfinite(kept.loss)
    torch.testing.assert_close(out.logits, full[:, 20:], rtol=1e-4, atol=1e-4)


def _cache_warnings(record):
    return [str(w.message) for w in record if "cache read" in str(w.message)]


def test_new_tokens_with_a_mask_over_the_cache_alone_are_refused():
    # a right-padded row's cache mask given with new tokens was read as their mask: that row generated from
    # positions it never had, silently
    model = convert_to_bsbr(make_source("llama"), chunk_size=8).eval()
    ids = torch.randint(3, VOCAB, (2, 14), generator=torch.Generator().manual_seed(0))
    cached = torch.ones(2, 10, dtype=torch.long)
    cached[1, 7:] = 0
    with torch.no_grad():
        cache = model(ids[:, :10], attention_mask=cached, use_cache=True).cache
    with pytest.raises(ValueError, match="attention_mask has 10 columns, the input 4 tokens and the cache 10 "):
        model.generate(ids[:, 10:], cache=cache, attention_mask=cached, do_sample=False, max_new_tokens=2,
                       pad_token_id=0, eos_token_id=None)


def test_negative_rows_select_the_cache_rows_they_name():
    model = convert_to_bsbr(make_source("llama"), chunk_size=8).eval()
    ids = torch.randint(3, VOCAB, (2, 21), generator=torch.Generator().manual_seed(1))
    kw = dict(do_sample=False, max_new_tokens=3, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        cache = model(ids[:, :13], use_cache=True).cache
    want = model.generate(ids[[1, 0], 13:], cache=cache.select(torch.tensor([1, 0])), **kw)
    assert torch.equal(model.generate(ids[[1, 0], 13:], cache=cache.select(torch.tensor([-1, 0])), **kw), want)


def test_rows_of_which_only_some_begin_with_the_cached_text_are_not_warned_of_as_all_doing_so():
    model = convert_to_bsbr(make_source("llama"), chunk_size=8).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (2, 20), generator=g)
    with torch.no_grad():
        cache = model(ids, use_cache=True).cache
    new = torch.randint(3, VOCAB, (2, 18), generator=g)
    new[0, :16] = ids[0, :16]  # row 0 begins with the cache's first 16 tokens, row 1 does not
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model.generate(new, cache=cache, max_new_tokens=1, do_sample=False, pad_token_id=0)
    assert not any("real tokens the cache read" in m for m in _cache_warnings(record)), _cache_warnings(record)


def test_new_tokens_of_a_short_cache_that_begin_as_its_text_are_not_called_its_text_tokenized_again():
    model = convert_to_bsbr(make_source("llama"), chunk_size=8).eval()
    with torch.no_grad():
        cache = model(torch.tensor([[5, 6, 7]]), use_cache=True).cache  # 3 tokens
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model.generate(torch.tensor([[5, 6, 9, 10]]), cache=cache, max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert not any("but for its last token" in m for m in _cache_warnings(record)), _cache_warnings(record)
