"""Streaming BSBR attention: token by token from an explicit state.

Per token: one softmax over the window's keys, the sinks and the tokens of its K selected chunks
(O((L + K) B d)), block scores against every key before the window (O(t d): one q.k per key, no
softmax, no values) and one read-out of the chunk states (O(d^2)). When a chunk completes, its state
and far keys are stored and the next chunk's state weights are computed once (O(C d^2)).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..checks import check_flag, eager
from .inputs import check_inputs
from .masks import exact_window, near, sink_outside_window
from .options import BSBROptions
from .softmax import attention_lse, fused_attention, merge
from .retrieval import (GIST_FLOOR, apply_meta, block_scores, combine, gate_closed, gate_per_head, gist_scale,
                        select_blocks)
from .recall import cache_scores, recall_update
from .state import (BSBRState, buffer_chunks, ensure_capacity, own_ring_chunks, refresh_retrieval, tracked,
                    window_tokens)


# (both forms run eagerly inside a compiled model: traced, the step's Python ints (positions) recompiled it
# at every token until dynamo's limit, and dynamic shapes failed on the state's options check)
@eager
def bsbr_attention_step(q, k, v, mq, mk, state: Optional[BSBRState], options: BSBROptions, *, fq=None, fk=None,
                        qr=None, kr=None, gate=None, meta_q=None, meta_k=None, valid=None):
    """One token per sequence: q (b, hq, d), k (b, hkv, d), ...; valid (b,) (False = padding: the
    state is left unchanged and the output is 0). Returns ``(o (b, hq, dv), state)``: the state passed
    in, advanced (created if None; its tensors written in place when autograd is off, replaced
    otherwise). To continue one prefix twice, fork it first: ``state.select(torch.arange(b))``."""
    a, (fq, fk, qr, kr) = check_inputs(options, q, k, v, mq, mk, fq, fk, qr, kr, gate, valid, meta_q, meta_k,
                                           token_dim=3)
    state = _start(state, options, a, q, (q, k, v, mq, mk, fq, fk, qr, kr, gate, meta_q, meta_k))
    if a.batch == 0:
        return q.new_zeros(0, a.q_heads, a.value_dim), state
    valid = None if valid is None else valid.bool()
    return _step(q, k, v, mq, mk, fq, fk, qr, kr, state, gate, meta_q, meta_k, valid), state


def _start(state, options, a, like, inputs) -> BSBRState:
    """The state a call continues: ``state`` checked against the call, or a new one. Its tensors are
    replaced by copies (in the same object) where writing them in place, as a step without autograd does,
    would fail: tensors of ``torch.inference_mode`` outside it, and tensors that an earlier call with autograd
    (on ``inputs`` of which one needed a gradient) may have saved for its backward or tied to its graph."""
    if state is None:
        state = BSBRState.empty(a, options, like)
    elif not isinstance(state, BSBRState):
        raise TypeError(f"the state must be None or a bsbr.ops.BSBRState, got {type(state).__name__}")
    else:
        state.check_continues(options, a, like.dtype)
    copy = state.n_seen.is_inference() and not torch.is_inference_mode_enabled()
    if torch.is_grad_enabled():
        state.grad_history = state.grad_history or tracked(inputs)
    elif state.grad_history:
        copy, state.grad_history = True, False
    if copy:
        for name, t in state.tensors().items():
            setattr(state, name, t.clone())
    return state


def _write(state, slot, rows, named, inplace):
    """Write each x (b, h, d) of ``named`` ((name, x), ...) into ``state.name`` (b, h, slots, d) at
    slot (b,) for the sequences in rows (b,) (None: all). An int slot, every sequence's (in place, all
    rows), is a plain copy."""
    if isinstance(slot, int):
        for name, x in named:
            getattr(state, name)[:, :, slot] = x
        return
    if inplace and rows is None:
        b = torch.arange(slot.shape[0], device=slot.device)
        for name, x in named:
            getattr(state, name)[b, :, slot] = x
        return
    if rows is None:
        rows = torch.ones_like(slot, dtype=torch.bool)
    if inplace:
        r = rows.nonzero()[:, 0]
        if r.numel() == 0:
            return
        everyone = r.numel() == rows.numel()
        s = slot if everyone else slot[r]
        for name, x in named:
            getattr(state, name)[r, :, s] = x if everyone else x[r]
        return
    for name, x in named:
        buf = getattr(state, name)
        at = ((torch.arange(buf.shape[2], device=x.device)[None, :] == slot[:, None]) & rows[:, None])
        setattr(state, name, torch.where(at.view(x.shape[0], 1, -1, 1), x.unsqueeze(2), buf))


def _step(q, k, v, mq, mk, fq, fk, qr, kr, state: BSBRState, gate, meta_q, meta_k, valid):
    """The step on checked inputs."""
    opt = state.options
    b, hq, d = q.shape
    hkv, B = k.shape[1], opt.chunk_size
    scale = 1.0 / math.sqrt(d) if opt.scale is None else opt.scale
    inplace = not torch.is_grad_enabled()  # no copy of the buffers per token when nothing needs gradients
    t = state.n_seen  # index of this token
    m = _step_masks(state, q.device)
    t_host = m["at"]
    _write_token(state, k, v, kr, fk, valid, inplace, t_host)

    # the exact softmax: window (q.k), sinks outside it and selected blocks or the recall cache (qr.kr),
    # one normalisation; a K/V head's g query heads are the rows of one matmul per part
    qg, qrg = q.view(b, hkv, hq // hkv, d), qr.view(b, hkv, hq // hkv, d)
    parts = _window_and_sinks(qg, qrg, state, m)
    read = not gate_closed(gate)  # a closed gate: the states are not read
    num = den = None
    if opt.recall_tokens:
        num, den = _recall_read(qrg, fq, state, parts, read)
    else:
        if read:  # (in sum_dtype, as the state's sums)
            fq = fq.to(state.S_cur.dtype)
            num = torch.einsum("bhf,bhfv->bhv", fq, state.S_cur)
            den = torch.einsum("bhf,bhf->bh", fq, state.zS_cur) if opt.retrieval == "normalized" else None
        if opt.retrieval_blocks and state.kr_past.shape[2]:
            num, den = _read_blocks(qg, qrg, fq, state, m, parts, num, den)
    o = _softmax_of_parts(parts, scale).reshape(b, hq, -1)
    if num is not None:
        o = combine(o.unsqueeze(2), num.unsqueeze(2), None if den is None else den.unsqueeze(2),
                    gate_per_head(gate, hq, num), opt.retrieval).squeeze(2).to(q.dtype)
    # chunk states are kept unless their features have size 0 (a closed gate): then neither they nor the
    # meta sums that weigh them are ever read
    sums = not opt.recall_tokens and state.F_cur.shape[2] > 0
    if valid is not None:  # padding: output 0, state unchanged (replaced, not multiplied: 0 * NaN is NaN)
        keep = valid.view(b, 1, 1)
        o = o.masked_fill(~keep, 0)
        if sums:
            fk, v, mk, mq = (x.masked_fill(~keep, 0) for x in (fk, v, mk, mq))
    if sums:
        _add_to_chunk(state, fk, v, mk, mq, inplace)
    state.n_seen = state.n_seen + (1 if valid is None else valid.long())
    if t_host is not None and valid is None and t_host % B != B - 1:
        return o
    done = t % B == B - 1
    done = done if valid is None else valid & done
    if bool(done.any()):
        if opt.recall_tokens:
            _recall_complete_chunk(state, done)
        else:
            _complete_chunk(state, done, meta_q, meta_k)
        _next_window(state, done)
    return o


def _next_window(state: BSBRState, done: torch.Tensor) -> None:
    """A chunk completed (for the sequences in ``done``): the window's buffer frees its last B slots
    for the next one and keeps the :func:`buffer_chunks` chunks before it (zeros where there were none);
    the other sequences keep their last chunks, so that each sequence's current chunk stays last."""
    B, b = state.options.chunk_size, done.shape[0]
    N = buffer_chunks(state.options, int(state.n_seen.max()) // B)

    def last(x, n):  # x's last n chunks, zeros in front where it holds fewer
        keep = x[:, :, max(x.shape[2] - n * B, 0):]
        return keep if keep.shape[2] == n * B else torch.cat([keep.new_zeros(*x.shape[:2], n * B - keep.shape[2],
                                                                              x.shape[3]), keep], 2)

    for name in ("k_buf", "v_buf") + (("kr_ring", "fk_ring") if state.options.recall_tokens else ()):
        buf = getattr(state, name)
        moved = torch.cat([last(buf, N - 1), buf.new_zeros(*buf.shape[:2], B, buf.shape[3])], 2)
        setattr(state, name, torch.where(done.view(b, 1, 1, 1), moved, last(buf, N)))


def _write_token(state, k, v, kr, fk, valid, inplace, at=None):
    """Store this token where later tokens read it: the window (its chunk is the last of the window's
    buffer), the sinks, the current block.
    ``at``: its index when every sequence is at the same one (plain copies)."""
    opt = state.options
    t, W, S, B = state.n_seen, state.k_buf.shape[2], opt.sink_tokens, opt.chunk_size
    ring = [("k_buf", k), ("v_buf", v)] + ([("kr_ring", kr), ("fk_ring", fk)] if opt.recall_tokens else [])
    fast = at is not None and inplace and valid is None  # int slots: plain copies
    _write(state, W - B + (at % B if fast else t % B), valid, ring, inplace)
    own = opt.own_position_chunks > 0  # far keys also kept at their own positions
    if S and not (fast and at >= S):
        first = t < S
        _write(state, t.clamp(max=S - 1), first if valid is None else valid & first,
               [("k_sink", kr), ("v_sink", v)] + ([("k_sink_own", k)] if own else []), inplace)
    if opt.retrieval_blocks:  # (its keys at their own positions and its values are the window's last chunk)
        _write(state, at % B if fast else t % B, valid, [("kr_cur", kr)], inplace)


_MASKS: dict = {}  # the last step's masks: every layer of a model steps at the same positions
_BIAS: dict = {}  # (id of a mask, dtype) -> (mask, its additive form), for the masks in _MASKS


def _bias(masked, dtype):
    """A step mask (True: not read) as the additive 0 / -inf mask of the fused kernel, made once per step."""
    got = _BIAS.get((id(masked), dtype))
    if got is None or got[0] is not masked:
        got = (masked, torch.zeros(masked.shape, dtype=dtype, device=masked.device).masked_fill_(masked, float("-inf")))
        _BIAS[(id(masked), dtype)] = got
    return got[1]


def _step_masks(state, device):
    """What this step's token may read, a function of the options and positions only (so computed
    once per step for all layers): masks of what it may *not* read (filled with -inf in place) among
    the window's slots (b, 1, 1, W), the sinks (b, 1, 1, S) and, while every candidate is read,
    the blocks' tokens; with blocks the candidate chunks (b, P), their largest count and the last
    chunk before each window; ``at``: the token's index (int) when every sequence is at the same one;
    ``window_slots``: then (first, end), the window's slots to read unmasked;
    ``sinks_apart``: whether the sinks are a part of their own (not while every candidate is read and
    the sinks lie in chunk 0: that chunk is read, sinks included, exactly when they are outside the
    window, as the chunked form's dense far part does)."""
    opt = state.options
    P = state.kr_past.shape[2]
    pos = tuple(state.n_seen.tolist())
    # (masks made under inference mode are inference tensors, which a step under autograd cannot save)
    key = (opt, P, state.k_buf.shape[2], device, pos, torch.is_inference_mode_enabled())
    m = _MASKS.get(key)
    if m is not None:
        return m
    B, L, S, R = opt.chunk_size, opt.local_chunks, opt.sink_tokens, opt.own_position_chunks
    N = state.k_buf.shape[2] // B  # chunks in the window's buffer
    b = state.n_seen.shape[0]
    tt = state.n_seen.view(b, 1)
    held = window_tokens(tt, B, L)  # the token in each slot of the buffer's last L chunks (the window's)
    m = dict(at=pos[0] if len(set(pos)) == 1 else None, sinks_apart=True,
             not_window=~exact_window(tt, held, B, L, 0).view(b, 1, 1, L * B), window_slots=None)
    if m["at"] is not None:  # every sequence's window is the same run of slots: read just those, unmasked
        m["window_slots"] = (max(N - 1 - m["at"] // B, N - L) * B, N * B - B + m["at"] % B + 1)
    # the sinks outside the window, as far keys (qr.kr) and, with own_position_chunks, at own positions
    js = torch.arange(S, device=device).view(1, S)
    sinks = sink_outside_window(tt, js, B, L)
    own = near(tt, js, B, R) if R else torch.zeros_like(sinks)
    for name, reads in (("sinks", sinks & ~own), ("sinks_own", sinks & own)):
        m[f"not_{name}"] = ~reads.view(b, 1, 1, S)
        m[f"{name}_ok"] = bool(reads.any(-1).all())  # every sequence reads one
        m["sinks_far" if name == "sinks" else name] = bool(reads.any())  # some sequence does
    if opt.retrieval_blocks:
        chunks = torch.arange(P, device=device)
        last = torch.div(state.n_seen, B, rounding_mode="floor") - L  # the last chunk before the window
        candidate = (chunks[None, :] <= last[:, None]) & ((chunks + 1) * B > S)  # and holding a non-sink token
        m.update(candidate=candidate, n_cand=int(candidate.sum(-1).max()) if P else 0,
                 last=int(last.max()) if b else -1)
        m["sinks_apart"] = B <= S or m["n_cand"] > opt.retrieval_blocks
        # chunks from own_from on are read at their own positions; [own_lo, own_hi) bounds it in the batch
        own_from = last + L + 1 - R if R else torch.full_like(last, P + 1)
        m.update(own_from=own_from, own_lo=min(max(int(own_from.min()) if b else 0, 0), P),
                 own_hi=min(max(int(own_from.max()) if b else 0, 0), P))
        if 0 < m["n_cand"] <= opt.retrieval_blocks and m["at"] is not None and N > m["at"] // B \
                and not m["sinks_apart"]:
            # every key up to the token is read, at its own position (L + K <= R), and lies in the buffer as
            # one run (buffer_chunks): the window's part reads them all
            m["window_slots"] = ((N - 1 - m["at"] // B) * B, m["window_slots"][1])
            m["dense"] = []
        elif 0 < m["n_cand"] <= opt.retrieval_blocks:  # every candidate is read: its chunks' tokens (sinks
            U = m["last"] + 1  # too, when they lie in chunk 0)
            read = candidate[:, :U].repeat_interleave(B, dim=1)
            if m["sinks_apart"]:
                read = read & (torch.arange(U * B, device=device) >= S)
            own_tok = (chunks[:U].repeat_interleave(B)[None, :] >= own_from[:, None])  # (b, U * B)
            lo, hi = min(m["own_lo"], U), min(m["own_hi"], U)
            # runs of chunks p0 .. p1 - 1 from slot s0 (of the far keys, or of the own-position ring: a
            # row may read nothing of one of its runs): (far?, p0, p1, s0, masked (None: none), every row reads)
            m["dense"] = []
            for far, c0, c1, reads in ((True, 0, hi, read & ~own_tok), (False, lo, U, read & own_tok)):
                for p0, p1, s0 in [(c0, c1, c0)] if far else _ring_pieces(c0, c1, own_ring_chunks(opt)):
                    piece = reads[:, p0 * B:p1 * B]
                    if bool(piece.any()):
                        m["dense"].append((far, p0, p1, s0, None if bool(piece.all()) else ~piece.view(b, 1, 1, -1),
                                           bool(piece.any(-1).all())))
    _MASKS.clear()
    _BIAS.clear()
    _MASKS[key] = m
    return m


def _window_and_sinks(qg, qrg, state, m):
    """The window and the sinks outside it as parts of the exact softmax (see
    :func:`_softmax_of_parts`); ``m`` the step's masks."""
    if m["window_slots"] is None:
        W = state.options.window  # the buffer's last L chunks hold every sequence's window; a token's holds itself
        parts = [(qg, state.k_buf[:, :, -W:], state.v_buf[:, :, -W:], m["not_window"], True)]
    else:  # every slot read: no mask
        s0, s1 = m["window_slots"]
        parts = [(qg, state.k_buf[:, :, s0:s1], state.v_buf[:, :, s0:s1], None, True)]
    if state.options.sink_tokens and m["sinks_apart"]:
        if m["sinks_far"]:
            parts.append((qrg, state.k_sink, state.v_sink, m["not_sinks"], m["sinks_ok"]))
        if m["sinks_own"]:  # sinks at their own positions
            parts.append((qg, state.k_sink_own, state.v_sink, m["not_sinks_own"], m["sinks_own_ok"]))
    return parts


def _softmax_of_parts(parts, scale):
    """One softmax over the keys of every part -> (b, hkv, g, dv). A part is (queries (b, hkv, g, d),
    keys (b, hkv, N, d), values (b, hkv, N, dv), masked-out keys (b, 1, 1, N) bool, whether every row
    reads a key), or (scores (b, hkv, g, N) unscaled, -inf where masked; values) with values a tensor
    or a function of the probabilities (the selected blocks). Key/value parts only, each reading a
    key in every row: each part is one fused attention with its log-sum-exp, merged by them (SmolLM2's
    decode step at 1k context, window and earlier chunks read in place: 0.98x the time of writing
    their scores out; CHANGELOG.md, How the measurements got here)."""
    if all(len(p) == 5 and p[4] for p in parts) and fused_attention(*parts[0][:3]):
        outs = [attention_lse(q, k, v, None, scale, None if masked is None else _bias(masked, q.dtype))
                for q, k, v, masked, _ in parts]
        if len(outs) == 2:  # the weight of part 0 is sigmoid(lse_0 - lse_1)
            (o0, l0), (o1, l1) = outs
            return torch.lerp(o1.to(l0.dtype), o0.to(l0.dtype), torch.sigmoid(l0 - l1).unsqueeze(-1)).to(o0.dtype)
        return merge(outs)
    scores, values = [], []
    for part in parts:
        if len(part) == 5:
            q, k, v, masked, _ = part
            s_x = q @ k.transpose(-1, -2)
            part = (s_x if masked is None else s_x.masked_fill_(masked, float("-inf")), v)
        scores.append(part[0])
        values.append(part[1])
    p = torch.softmax(torch.cat(scores, dim=-1) * scale, dim=-1)  # (b, hkv, g, keys)
    o, at = None, 0
    for s_x, x in zip(scores, values):  # each part's probabilities times its values (b, hkv, g, dv), or a
        p_x = p[..., at:at + s_x.shape[-1]]  # function of them
        o_x = x(p_x) if callable(x) else p_x @ x
        o, at = (o_x if o is None else o + o_x), at + s_x.shape[-1]
    return o


def _read_blocks(qg, qrg, fq, state, m, parts, num, den):
    """Append the selected blocks to the softmax's ``parts``; return num/den without their chunk states.

    While K covers every candidate, chunks 0 .. last are read where they lie. Otherwise each query
    head reads its own K blocks: their q.k are taken from the score pass (read again from the keys
    under autograd, as block scores carry no gradient), and their values are summed, weighted by the
    probabilities, by one ``embedding_bag`` over the value cache, so no block is copied (gathering the
    blocks first: a 32k decode step 206 against 178 ms, docs/findings.md, Speed)."""
    opt = state.options
    b, hkv, g, d = qrg.shape
    B, S, K, P = opt.chunk_size, opt.sink_tokens, opt.retrieval_blocks, state.kr_past.shape[2]
    candidate, n_cand = m["candidate"], m["n_cand"]
    fqg = None if num is None else fq.view(b, hkv, g, -1)
    # the chunks before the window, whose states the token may read (b,); none read with the gate closed
    n_allowed = None if num is None else \
        (torch.div(state.n_seen, B, rounding_mode="floor") - opt.local_chunks + 1).clamp(min=0)
    if n_cand == 0:
        return num, den
    if n_cand <= K:  # every candidate is selected: chunks 0 .. last where they lie
        for far, p0, p1, s0, masked, every in m["dense"]:  # chunks p0 .. p1 - 1, from slot s0
            qx, kx = (qrg, state.kr_past) if far else (qg, state.k_past)
            n_p = (p1 - p0) * B
            parts.append((qx, kx[:, :, s0:s0 + p1 - p0].reshape(b, hkv, n_p, d),
                          state.v_past[:, :, p0:p1].reshape(b, hkv, n_p, -1), masked, every))
        if num is None:
            return num, den
        # what is left unread are the chunks of sinks alone: their gist read directly, renormalised, as the
        # chunked form's (subtracting every candidate from the read-out of all chunks cancelled float32 digits:
        # steps 1e-4 to 2e-3 off the forward)
        chunks = torch.arange(P, device=candidate.device)
        rest = state.w_cur.view(b, hkv, g, P) * ((chunks < n_allowed.view(b, 1)) & ~candidate).view(b, 1, 1, P)
        rest = rest / rest.sum(-1, keepdim=True).clamp(min=GIST_FLOOR)
        num = torch.einsum("bkgu,bkgf,bkufv->bkgv", rest, fqg, state.F_past).reshape(num.shape)
        if den is not None:
            den = torch.einsum("bkgu,bkgf,bkuf->bkg", rest, fqg, state.z_past).reshape(den.shape)
        return num, den
    else:
        span = m["last"] + 1  # chunks 0 .. last hold every candidate
        grad = torch.is_grad_enabled()
        bs, qk = _scores(qg, qrg, state, span, m, keep=not grad)  # (b, hkv, g, span), (.., span, B) or None
        sel = select_blocks(bs, candidate[:, :span].view(b, 1, 1, span), K)  # (b, hkv, g, K), -1: none
        at = sel.clamp(min=0)
        rows = (at + P * torch.arange(b * hkv, device=at.device).view(b, hkv, 1, 1)).reshape(-1)  # (b hkv P) rows

        def picked(x):  # (b, hkv, P, ...) -> (b, hkv, g, K, ...): each head's selected chunks
            return x.reshape(b * hkv * P, -1).index_select(0, rows).view(b, hkv, g, K, *x.shape[3:])
        if grad:
            s_b = (qrg.view(b, hkv, g, 1, 1, d) @ picked(state.kr_past).transpose(-1, -2)).squeeze(-2)  # (b, hkv, g, K, B)
            ring = own_ring_chunks(opt)
            if ring:  # the chunks at own positions: their keys from the ring
                own = (sel >= m["own_from"].view(b, 1, 1, 1)).unsqueeze(-1)
                Pk = state.k_past.shape[2]
                rows_k = (at % ring + Pk * torch.arange(b * hkv, device=at.device).view(b, hkv, 1, 1)).reshape(-1)
                k_own = state.k_past.reshape(b * hkv * Pk, -1).index_select(0, rows_k).view(b, hkv, g, K, B, d)
                s_b = torch.where(own, (qg.view(b, hkv, g, 1, 1, d) @ k_own.transpose(-1, -2)).squeeze(-2), s_b)
        else:
            s_b = qk.gather(3, at.unsqueeze(-1).expand(b, hkv, g, K, B))
        tok = at.unsqueeze(-1) * B + torch.arange(B, device=at.device)  # (b, hkv, g, K, B)
        s_b = s_b.masked_fill_(~((sel >= 0).unsqueeze(-1) & (tok >= S)), float("-inf")).reshape(b, hkv, g, -1)
        table = state.v_past.reshape(b * hkv * P * B, -1)
        bag = ((rows.view(b, hkv, g, K) * B).unsqueeze(-1) + torch.arange(B, device=at.device)).reshape(-1)
        starts = torch.arange(0, bag.numel(), K * B, device=at.device)
        parts.append((s_b, lambda p_b: torch.nn.functional.embedding_bag(
            bag, table, starts, mode="sum", per_sample_weights=p_b.reshape(-1)).view(b, hkv, g, -1)))
        if num is None:
            return num, den
        w = state.w_cur.view(b, hkv, g, -1).gather(-1, at) * (sel >= 0)
        F_sel, z_sel = picked(state.F_past), picked(state.z_past)
        n_sel = (sel >= 0).sum(-1)
    # the selected chunks leave the chunk-state term; the rest is renormalised (gist_scale)
    sc = gist_scale(state.w_cur.view(b, hkv, g, -1).sum(-1), w.sum(-1), n_allowed.view(b, 1, 1) > n_sel)
    num = num - torch.einsum("bkgu,bkgf,bkgufv->bkgv", w, fqg, F_sel.expand(b, hkv, g, *F_sel.shape[3:])).reshape(num.shape)
    num = num * sc.reshape(b, hkv * g, 1)
    if den is not None:
        den = den - torch.einsum("bkgu,bkgf,bkguf->bkg", w, fqg, z_sel.expand(b, hkv, g, *z_sel.shape[3:])).reshape(den.shape)
        den = den * sc.reshape(b, hkv * g)
    return num, den


def _scores(qg, qrg, state, span, m, keep):
    """Block scores of chunks 0 .. span - 1 (:func:`block_scores`): qr.kr before a sequence's
    ``own_from`` chunk, q.k from it. Returns (scores (b, hkv, g, span), every q.k (.., span, B) or None)."""
    opt = state.options
    S, B = opt.sink_tokens, opt.chunk_size
    lo, hi = min(m["own_lo"], span), min(m["own_hi"], span)  # (span, span) without own_position_chunks
    def scores(q, keys, sinks):  # (scores, every q.k or None)
        got = block_scores(q, keys, sinks, keep=keep)
        return got if keep else (got, None)

    got = []
    if hi:
        got.append(scores(qrg, state.kr_past[:, :, :hi], S))
    if lo < span:  # from the ring, in runs of consecutive slots
        runs = [scores(qg, state.k_past[:, :, s0:s0 + p1 - p0], max(S - p0 * B, 0))
                for p0, p1, s0 in _ring_pieces(lo, span, own_ring_chunks(opt))]
        got.append(runs[0] if len(runs) == 1 else
                   (torch.cat([x for x, _ in runs], -1), torch.cat([y for _, y in runs], -2) if keep else None))
    if len(got) == 1:
        return got[0]
    (far, far_qk), (own, own_qk) = got
    if lo == hi:
        return torch.cat([far, own], -1), None if far_qk is None else torch.cat([far_qk, own_qk], -2)
    # chunks lo .. hi - 1 hold both: each sequence's own from its own_from
    b = qg.shape[0]
    at_own = (torch.arange(lo, hi, device=qg.device)[None, :] >= m["own_from"][:, None]).view(b, 1, 1, hi - lo)

    def mix(f, o, dim):  # f over chunks 0 .. hi - 1, o over lo .. span - 1, chunks along dim
        f_lo, f_mid = f.split([lo, hi - lo], dim)
        o_mid, o_hi = o.split([hi - lo, span - hi], dim)
        w = at_own if dim == -1 else at_own.unsqueeze(-1)
        return torch.cat([f_lo, torch.where(w, o_mid, f_mid), o_hi], dim)

    return mix(far, own, -1), None if far_qk is None else mix(far_qk, own_qk, -2)


def _ring_pieces(c0: int, c1: int, ring: int):
    """Chunks c0 .. c1 - 1 of the own-position ring (chunk c in slot c mod ring) as runs of consecutive
    slots: [(first chunk, end chunk, first slot)]."""
    pieces, c = [], c0
    while c < c1:
        n = min(c1 - c, ring - c % ring)
        pieces.append((c, c + n, c % ring))
        c += n
    return pieces


def _recall_read(qrg, fq, state, parts, read):
    """Append the recall cache to the softmax's ``parts``; return the read-out of the state of the other
    left-window tokens (num (b, hq, dv), den (b, hq) or None; both None unless ``read``)."""
    b, hkv, g = qrg.shape[:3]
    cache = state.recall()
    parts.append((cache_scores(qrg, cache.kr, cache.on, 1.0), cache.v))
    if not read:
        return None, None
    fqg = fq.view(b, hkv, g, -1)
    num = (fqg @ cache.F).reshape(b, hkv * g, -1)
    den = (fqg @ cache.z.unsqueeze(-1)).reshape(b, hkv * g) if state.options.retrieval == "normalized" else None
    return num, den


def _add_to_chunk(state, fk, v, mk, mq, inplace):
    """Running sums of the current chunk (inputs already zero for padding)."""
    fk = fk.to(state.F_cur.dtype)  # (sum_dtype)
    for name, x in (("F_cur", fk.unsqueeze(-1) * v.to(fk.dtype).unsqueeze(-2)), ("z_cur", fk), ("mk_sum", mk),
                    ("mq_sum", mq)):
        setattr(state, name, getattr(state, name).add_(x) if inplace else getattr(state, name) + x)


def _recall_complete_chunk(state: BSBRState, done: torch.Tensor) -> None:
    """A chunk completed: the chunk L chunks back (the window buffer's oldest) leaves the window and
    the recall cache is updated from it, for the sequences in ``done`` that have one."""
    opt = state.options
    B, L = opt.chunk_size, opt.local_chunks
    e = torch.div(state.n_seen, B, rounding_mode="floor") - L  # the chunk leaving (n_seen: next token)
    pos = e[:, None] * B + torch.arange(B, device=e.device)[None, :]  # (b, B)
    real = pos >= 0  # its tokens: the window buffer's first B slots
    state.set_recall(recall_update(state.recall(), state.kr_ring[:, :, :B], state.v_buf[:, :, :B],
                                   state.fk_ring[:, :, :B], pos, real, real & (pos >= opt.sink_tokens), done & (e >= 0),
                                   opt.retrieval))


def _complete_chunk(state: BSBRState, done: torch.Tensor, meta_q, meta_k) -> None:
    """Store the chunk that just completed (for the sequences in ``done``) and start the next one."""
    opt = state.options
    b, B = done.shape[0], opt.chunk_size
    c = torch.div(state.n_seen - 1, B, rounding_mode="floor")  # index of the completed chunk
    ensure_capacity(state, int(c[done].max()) + 1)
    P = state.F_past.shape[2]
    at = ((torch.arange(P, device=c.device)[None, :] == c[:, None]) & done[:, None]).view(b, 1, P)
    r = None if torch.is_grad_enabled() else done.nonzero()[:, 0]  # without autograd: written in place (a copy
    # of every stored chunk per completed chunk took 285 of a 32k step's ms at chunk 16)

    def put(name, x, slot=c, where=at):  # x (b, h, ...) into state.name (b, h, P, ...) at chunk slot, done rows
        past = getattr(state, name)
        if r is not None:
            past[r, :, slot[r]] = x[r]
            return
        setattr(state, name, torch.where(where.view(b, 1, -1, *([1] * (past.dim() - 3))), x.unsqueeze(2), past))

    put("F_past", state.F_cur)
    put("z_past", state.z_cur)
    put("h_past", apply_meta(meta_k, (state.mk_sum / B).unsqueeze(2)).squeeze(2))
    if opt.retrieval_blocks:
        put("kr_past", state.kr_cur)
        put("v_past", state.v_buf[:, :, -B:])  # the window's last chunk is the one that completed
        ring = own_ring_chunks(opt)
        if ring:  # the own-position ring: chunk c in slot c mod ring
            Pk = state.k_past.shape[2]
            slot = ((torch.arange(Pk, device=c.device)[None, :] == (c % ring)[:, None]) & done[:, None])
            put("k_past", state.k_buf[:, :, -B:], c % ring, slot)
    d1 = done.view(b, 1, 1)
    state.r_cur = torch.where(d1, apply_meta(meta_q, (state.mq_sum / B).unsqueeze(2)).squeeze(2), state.r_cur)
    state.F_cur = torch.where(d1.unsqueeze(-1), torch.zeros_like(state.F_cur), state.F_cur)
    for name in ("z_cur", "mk_sum", "mq_sum"):
        setattr(state, name, torch.where(d1, torch.zeros_like(getattr(state, name)), getattr(state, name)))
    refresh_retrieval(state, done)


@eager
def recurrent_bsbr_attention(q, k, v, mq, mk, options: BSBROptions, *, fq=None, fk=None, qr=None, kr=None,
                             gate=None, meta_q=None, meta_k=None, valid=None,
                             initial_state: Optional[BSBRState] = None, output_final_state: bool = False):
    """Same arguments and meaning as :func:`bsbr.ops.chunk_bsbr_attention`, computed token by token
    from ``initial_state`` (or an empty one), which is advanced as by :func:`bsbr_attention_step`.
    Returns ``(o, state)``."""
    check_flag("output_final_state", output_final_state)
    a, (fq, fk, qr, kr) = check_inputs(options, q, k, v, mq, mk, fq, fk, qr, kr, gate, valid, meta_q, meta_k,
                                       streams=True)
    state = _start(initial_state, options, a, q, (q, k, v, mq, mk, fq, fk, qr, kr, gate, meta_q, meta_k))
    outs = [_step(*(x[:, :, i] for x in (q, k, v, mq, mk, fq, fk, qr, kr)), state, gate, meta_q, meta_k,
                  None if valid is None else valid[:, i].bool()) for i in range(a.seq_len if a.batch else 0)]
    o = (outs[0].unsqueeze(2) if len(outs) == 1 else torch.stack(outs, dim=2)) if outs else \
        q.new_zeros(a.batch, a.q_heads, a.seq_len, a.value_dim)
    return o, (state if output_final_state else None)
