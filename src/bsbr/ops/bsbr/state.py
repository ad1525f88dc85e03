"""The streaming state of one BSBR attention, and its updates when a chunk completes."""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from .inputs import BSBRArgs
from .options import BSBROptions
from .recall import RecallCache
from .retrieval import state_weights
from .softmax import sum_dtype


def tracked(inputs) -> bool:
    """Whether a call on ``inputs`` records a graph: autograd is on and one of them needs a gradient (its
    state's tensors may then be saved for its backward: :attr:`BSBRState.grad_history`)."""
    return torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in inputs)


@dataclass
class BSBRState:
    """Streaming state of one BSBR attention for a batch; each sequence has its own position. What
    it holds, per option, is docs/design.md, section 8; the fields below say each array's shape.
    Chunk states have feature size 0 (so are empty) when the layer's chunk-state gate is closed. The
    chunk states, meta vectors and state weights (``F_*``, ``z_*``, ``mk_sum``, ``mq_sum``, ``r_cur``,
    ``h_past``, ``w_cur``, ``S_cur``, ``zS_cur``) are kept in :func:`sum_dtype` (float32 for bfloat16
    inputs), the keys and values in the inputs' dtype.
    """

    options: BSBROptions
    n_seen: torch.Tensor  # (b,) real tokens consumed per sequence
    k_buf: torch.Tensor  # (b, hkv, N B, d) keys of the last N chunks in order, the current chunk last
    v_buf: torch.Tensor  # (b, hkv, N B, dv)  (window_tokens); N = buffer_chunks
    k_sink: torch.Tensor  # (b, hkv, S, d) far keys of the sequence's first S tokens
    v_sink: torch.Tensor  # (b, hkv, S, dv)
    F_cur: torch.Tensor  # (b, hkv, df, dv) state of the current (incomplete) chunk
    z_cur: torch.Tensor  # (b, hkv, df)
    mk_sum: torch.Tensor  # (b, hkv, dm_in) running sum of meta-keys of the current chunk
    mq_sum: torch.Tensor  # (b, hq, dm_in)
    r_cur: torch.Tensor  # (b, hq, dm) meta-query of the current chunk (mean over the previous one)
    F_past: torch.Tensor  # (b, hkv, P, df, dv) states of completed chunks (P >= completed)
    z_past: torch.Tensor  # (b, hkv, P, df)
    h_past: torch.Tensor  # (b, hkv, P, dm) meta-keys of completed chunks
    w_cur: torch.Tensor  # (b, hq, P) weights the current chunk gives each completed chunk's state
    S_cur: torch.Tensor  # (b, hq, df, dv) the weighted sum of those states
    zS_cur: torch.Tensor  # (b, hq, df)
    kr_cur: torch.Tensor  # (b, hkv, Bk, d) far keys of the current chunk (Bk = chunk_size with blocks, else 0)
    kr_past: torch.Tensor  # (b, hkv, P, Bk, d) far keys of completed chunks
    v_past: torch.Tensor  # (b, hkv, P, Bk, dv)
    k_sink_own: torch.Tensor  # (b, hkv, So, d) the sinks' keys at their own positions (So = S with
    #                           own_position_chunks, else 0)
    k_past: torch.Tensor  # (b, hkv, Pk, Bo, d) keys at their own positions of the last R - 1 completed chunks
    #                       (R = own_position_chunks; no others are read so), chunk c in slot c mod (R - 1);
    #                       Bo = Bk with own_position_chunks, else 0. (The current chunk's own keys and values
    #                       are the window buffer's last chunk.)
    kr_ring: torch.Tensor  # (b, hkv, Wr, d) far keys of the window's tokens (Wr = W with recall, else 0)
    fk_ring: torch.Tensor  # (b, hkv, Wr, df) their features
    recall_kr: torch.Tensor  # (b, hkv, M, d) the recall cache (see bsbr.ops.bsbr.recall.RecallCache)
    recall_v: torch.Tensor  # (b, hkv, M, dv)
    recall_fk: torch.Tensor  # (b, hkv, M, df)
    recall_pos: torch.Tensor  # (b, hkv, M) long
    recall_on: torch.Tensor  # (b, hkv, M) bool
    recall_F: torch.Tensor  # (b, hkv, df, dv) state of the left-window tokens outside the cache (df = 0 off)
    recall_z: torch.Tensor  # (b, hkv, df)
    grad_history: bool = False  # whether a call that recorded a graph (tracked) made or wrote these tensors

    PER_CHUNK = ("F_past", "z_past", "h_past", "w_cur", "kr_past", "v_past")

    @property
    def completed(self) -> torch.Tensor:
        return torch.div(self.n_seen, self.options.chunk_size, rounding_mode="floor")

    @classmethod
    def empty(cls, a: BSBRArgs, options: BSBROptions, like: torch.Tensor) -> "BSBRState":
        def z(*s):
            return torch.zeros(*s, dtype=like.dtype, device=like.device)

        def zs(*s):  # a sum's
            return torch.zeros(*s, dtype=sum_dtype(like.dtype), device=like.device)

        b, hq, hkv, d, dv, df = a.batch, a.q_heads, a.kv_heads, a.head_dim, a.value_dim, a.feature_dim
        Bk = options.chunk_size if options.retrieval_blocks else 0
        Bo, So = (Bk, options.sink_tokens) if options.own_position_chunks else (0, 0)
        M = options.recall_tokens
        Wr, dfr = (options.window, df) if M else (0, 0)
        dfc = 0 if M else df  # (the bounded mode keeps one state, in its recall cache, and no per-chunk sums)
        cache = RecallCache.empty(b, hkv, M, d, dv, dfr, like)
        return cls(
            options=options, n_seen=torch.zeros(b, dtype=torch.long, device=like.device),
            k_buf=z(b, hkv, options.window, d), v_buf=z(b, hkv, options.window, dv),
            k_sink=z(b, hkv, options.sink_tokens, d), v_sink=z(b, hkv, options.sink_tokens, dv),
            F_cur=zs(b, hkv, dfc, dv), z_cur=zs(b, hkv, dfc), mk_sum=zs(b, hkv, a.meta_in), mq_sum=zs(b, hq, a.meta_in),
            r_cur=zs(b, hq, a.meta_dim), F_past=zs(b, hkv, 0, df, dv), z_past=zs(b, hkv, 0, df),
            h_past=zs(b, hkv, 0, a.meta_dim), w_cur=zs(b, hq, 0), S_cur=zs(b, hq, dfc, dv), zS_cur=zs(b, hq, dfc),
            kr_cur=z(b, hkv, Bk, d), kr_past=z(b, hkv, 0, Bk, d), v_past=z(b, hkv, 0, Bk, dv),
            k_sink_own=z(b, hkv, So, d), k_past=z(b, hkv, 0, Bo, d),
            kr_ring=z(b, hkv, Wr, d), fk_ring=z(b, hkv, Wr, df),
            **{f"recall_{name}": x for name, x in zip(RecallCache._fields, cache)},
        )

    @property
    def feature_size(self) -> int:
        """The feature size of the chunk states it keeps (0: none, as a state built with the gate closed)."""
        return (self.recall_F if self.options.recall_tokens else self.F_cur).shape[2]

    def recall(self) -> RecallCache:
        return RecallCache(*(getattr(self, f"recall_{name}") for name in RecallCache._fields))

    def set_recall(self, cache: RecallCache) -> None:
        for name, x in zip(RecallCache._fields, cache):
            setattr(self, f"recall_{name}", x)

    def tensors(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("options", "grad_history")}

    def check_continues(self, options: BSBROptions, a: BSBRArgs, dtype: torch.dtype) -> None:
        """A state continues only a call with the options, sizes, dtype and chunk-state features it was
        built with."""
        if options != self.options:
            diff = ", ".join(f"{f.name}={getattr(self.options, f.name)!r}" for f in fields(options)
                             if getattr(options, f.name) != getattr(self.options, f.name))
            raise ValueError(f"state was built with other options ({diff}; this call's: {options}): continue a "
                             "state with the layer (options) that built it, or pass None to start one")
        if dtype != self.k_buf.dtype:
            raise TypeError(f"state holds {self.k_buf.dtype} tensors, the call has {dtype}: continue a state in the "
                            "dtype it was built in (cast the model before the prefill)")
        b, hkv, _, d = self.k_buf.shape
        built = (b, self.mq_sum.shape[1], hkv, d, self.v_buf.shape[-1])
        call = (a.batch, a.q_heads, a.kv_heads, a.head_dim, a.value_dim)
        if built != call:
            raise ValueError(f"state holds (batch, query heads, K/V heads, head dim, value dim) = {built}, the call "
                             f"has {call}: continue a state with the batch it was built for (rows of it: "
                             "state.select(rows); beam search: BSBRCache.reorder_cache)")
        meta = (self.mk_sum.shape[-1], self.h_past.shape[-1])
        if meta != (a.meta_in, a.meta_dim):
            raise ValueError(f"state holds meta vectors of size {meta[0]} mapped to {meta[1]}, the call has "
                             f"{a.meta_in} mapped to {a.meta_dim}: continue a state with the meta inputs and maps it "
                             "was built with")
        if self.feature_size != a.feature_dim:
            raise ValueError(f"state keeps chunk states of feature size {self.feature_size}, the call has "
                             f"{a.feature_dim} (a state built while the chunk-state gate was closed keeps none): "
                             "start a new cache")

    def select(self, index) -> "BSBRState":
        """Reorder/select batch entries (beam search): ``index`` the rows' indices (ints, repeats allowed)
        or a boolean mask over the batch."""
        index = self.row_index(index)
        return BSBRState(options=self.options, **{n: t.index_select(0, index) for n, t in self.tensors().items()},
                         grad_history=self.grad_history and torch.is_grad_enabled())  # (tied to the graph still)

    def row_index(self, index) -> torch.Tensor:
        """:meth:`select`'s ``index`` as int64 rows in [0, batch) on the state's device; ValueError if it is
        none (a boolean mask of another length, an index out of range, floats)."""
        b = self.n_seen.shape[0]
        index = torch.as_tensor(index, device=self.n_seen.device)
        if index.numel() == 0 and index.dim() == 1 and index.is_floating_point():  # (torch.as_tensor([]) is float)
            index = index.long()
        if index.dtype == torch.bool:
            if index.shape != (b,):
                raise ValueError(f"a boolean index must have one entry per sequence ({b}), got shape {tuple(index.shape)}")
            index = index.nonzero().flatten()
        if index.dim() != 1 or index.is_floating_point() or index.is_complex() or \
                (index.numel() and not -b <= int(index.min()) <= int(index.max()) < b):
            raise ValueError(f"index must be a 1-D tensor of row indices in [0, {b}) or a boolean mask, got {index!r}")
        return (index % b).long() if index.numel() else index.long()  # (index_select takes int64 or int32)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


def buffer_chunks(options, chunk: int) -> int:
    """Chunks the window's buffer holds when the current chunk (of the batch's furthest sequence) is
    ``chunk``: the window's ``L``; but while every earlier chunk is one of the ``K`` blocks and read at
    its own position (``chunk < L + K <= own_position_chunks``), every chunk so far, so that the step
    reads the whole context as one run of keys, one attention call instead of the window and the blocks
    apart (SmolLM2's decode at 1k context: 70.0 against 75.3 ms per token, docs/findings.md, Speed)."""
    L, K = options.local_chunks, options.retrieval_blocks
    return max(L, chunk + 1) if K and chunk < L + K <= options.own_position_chunks else L


def window_tokens(t: torch.Tensor, chunk_size: int, chunks: int) -> torch.Tensor:
    """t (b, 1), the index of a sequence's next token -> (b, chunks B) the token each slot of its window's
    buffer holds: the ``chunks`` chunks up to t's, in order (indices below 0 or from t on are empty
    slots)."""
    first = (torch.div(t, chunk_size, rounding_mode="floor") - chunks + 1) * chunk_size
    return first + torch.arange(chunks * chunk_size, device=t.device)


def refresh_retrieval(state: BSBRState, which: torch.Tensor) -> None:
    """Recompute what the current chunk reads from the completed chunks' states (w_cur, S_cur, zS_cur)
    for the sequences in ``which`` (b,) bool."""
    b, hkv, P = state.h_past.shape[:3]
    hq = state.r_cur.shape[1]
    if P == 0:
        return
    g = hq // hkv
    r = state.r_cur.view(b, hkv, g, 1, -1)
    reachable = state.completed - (state.options.local_chunks - 1)  # chunks before the window
    allowed = (torch.arange(P, device=r.device)[None, :] < reachable[:, None]).view(b, 1, 1, 1, P)
    w = state_weights(r, state.h_past.unsqueeze(2), allowed, state.options)[:, :, :, 0]  # (b, hkv, g, P)
    S = torch.einsum("bkgp,bkpfv->bkgfv", w, state.F_past).reshape(b, hq, *state.F_past.shape[-2:])
    zS = torch.einsum("bkgp,bkpf->bkgf", w, state.z_past).reshape(b, hq, -1)
    sel = which.view(b, 1, 1)
    state.w_cur = torch.where(sel, w.reshape(b, hq, P), state.w_cur)
    state.S_cur = torch.where(sel.unsqueeze(-1), S, state.S_cur)
    state.zS_cur = torch.where(sel, zS, state.zS_cur)


def ensure_capacity(state: BSBRState, need: int) -> None:
    """Grow the per-chunk arrays so that they hold ``need`` completed chunks (amortised doubling), and
    the own-position key ring up to its R - 1 chunks."""
    P = state.F_past.shape[2]
    if need > P:
        _grow(state, BSBRState.PER_CHUNK, max(need, 2 * P) - P)
    ring = own_ring_chunks(state.options)
    Pk = state.k_past.shape[2]
    if ring and min(need, ring) > Pk:
        _grow(state, ("k_past",), min(max(need, 2 * Pk), ring) - Pk)


def own_ring_chunks(options) -> int:
    """Chunks of the own-position key ring: R - 1 (the chunks a token may read at own positions lie
    1 .. R - 1 chunks back), 0 without own_position_chunks or exact blocks."""
    R = options.own_position_chunks
    return R - 1 if R and options.retrieval_blocks else 0


def _grow(state: BSBRState, names, grow: int) -> None:
    for name in names:
        t = getattr(state, name)
        extra = torch.zeros(t.shape[:2] + (grow,) + t.shape[3:], dtype=t.dtype, device=t.device)
        setattr(state, name, torch.cat([t, extra], dim=2))
