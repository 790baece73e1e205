"""Per-head evicting KV cache for real generation: each (layer, KV head) holds only its sink + window.

:class:`PerHeadCache` is a transformers ``Cache`` (pinned 5.24.0). It stores exactly the keys
:mod:`models.window` says a head keeps (``keep``, ``slot``, ``kept_tokens``), ragged in one flat buffer per
layer, so the bytes held are exactly ``Allocation.kv_bytes(T)`` per sequence. It is entered through the one
door, so the mask and the eviction come from one allocation::

    with applied(model, allocation, evict=True) as cache:   # alloc.allocation.applied
        model.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=20)

In a padded batch each sequence counts its own real tokens: a hand-written decode loop must pass
``position_ids`` as ``generate`` does. Design: docs/design.md, section 'The per-head evicting cache'.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from headkv.models import window as win
from headkv.models.attention import is_active_source
from headkv.models.common import HeadkvError

__all__ = ["BatchRows", "DeployError", "HeadLayer", "PerHeadCache", "kv_bytes_of"]

RESERVE = 32  # tokens a filling layer is laid out ahead (one relayout per RESERVE tokens, not per step)
FLAT_MAX_KV_HEADS = 8  # a ragged layer with at most this many KV heads decodes over its flat buffer


class DeployError(HeadkvError):
    """A request real generation cannot serve (e.g. a prompt beyond the model's positions), in one line."""


class BatchRows:
    """Beam search and batch expansion for a cache layer, all through its ``_select(index)`` (keep the batch
    rows ``index``: every per-sequence tensor it holds)."""

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row i becomes row ``beam_idx[i]``."""
        self._select(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._select(torch.arange(self.keys.shape[0], device=self.device).repeat_interleave(repeats))


class HeadLayer(BatchRows, CacheLayerMixin):
    """One layer's per-head ragged ring buffers (see the module docstring)."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(
        self, sink: torch.Tensor, window: torch.Tensor, cap: torch.Tensor | None = None, flat: bool = True
    ) -> None:
        super().__init__()
        self.sink, self.window = sink.long(), window.long()  # (Hkv,)
        self.heads = list(zip(self.sink.tolist(), self.window.tolist(), strict=True))  # the same, on the host
        # the layer's native cap (Hkv,), None if it has none; sinks that leave it are dropped (see _expire)
        self.cap = None if cap is None or not bool((cap > 0).any()) else cap.long()
        self.dead = False  # some held sink left the native cap: its slot is empty (position -1) from then on
        self.gone = False  # every sink left it: nothing more to expire
        self.full = win.kept_tokens(2**62, self.sink, self.window).tolist()  # each head's count once full
        self.room = 0  # the layout holds every head's kept tokens up to this many filled (see _grow)
        self.flat = flat and 1 < len(self.sink) <= FLAT_MAX_KV_HEADS  # decode over the flat buffer if ragged
        self._seg: torch.Tensor | None = None  # (Hq, S) bias of the flat buffer: 0 on a head's own segment
        self.flat_now = False  # a decode step reads the flat buffer: the layer decodes flat and is ragged
        self.seen = 0  # columns seen, padding included (what ``generate`` slices its inputs by)
        self.filled = 0  # most real tokens one sequence has seen; the layout holds kept_tokens(filled) slots
        self.count: torch.Tensor | None = None  # (B,) real tokens of each sequence, once positions diverge
        self.counts: list[int] | None = None  # the same, on the host
        self.lengths: list[int] = [0] * len(self.sink)
        self.offsets = torch.zeros(len(self.sink), dtype=torch.long)
        self.starts = [0] * len(self.sink)  # the offsets on the host
        self.pos: torch.Tensor | None = None  # position of every slot: (S,) shared, or (B, S); -1 = empty
        self.last: tuple[torch.Tensor, torch.Tensor] | None = None  # (q_pos, k_pos) of a general update
        self._gather: tuple[torch.Tensor, torch.Tensor] | None = None  # padded index (Hkv, Kmax) and validity

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, d = key_states.shape
        if h != len(self.sink):
            raise DeployError(
                f"the allocation has {len(self.sink)} KV heads per layer, the model {h}"
            )
        self.device = key_states.device
        self.keys = key_states.new_empty(b, 0, d)  # (B, S, D), S = sum of the heads' kept counts
        self.values = value_states.new_empty(b, 0, value_states.shape[-1])
        self.pos = torch.empty(0, dtype=torch.long, device=self.device)
        self.sink, self.window = self.sink.to(self.device), self.window.to(self.device)
        self.cap = None if self.cap is None else self.cap.to(self.device)
        self.offsets = self.offsets.to(self.device)
        self.is_initialized = True

    # ---- layout ----------------------------------------------------------------------------------
    @property
    def holes(self) -> bool:
        """True when slots of the layout may be empty: laid out ahead of the tokens (``filled < room``, see
        :meth:`_grow`), a sink that left the native cap, or a shorter sequence of a padded batch (a sequence
        of n real tokens fills kept_tokens(n) slots, fewer than the layout for some head exactly when n < the
        layer's longest head)."""
        return (self.dead or self.filled < self.room
                or (self.counts is not None and min(self.counts) < max(self.lengths)))

    def _diverge(self, batch: int) -> None:
        """From now on every sequence has its own positions (its first padding token arrived)."""
        self.count = torch.full((batch,), self.seen, dtype=torch.long, device=self.device)
        self.counts = [self.seen] * batch
        self.pos = self.pos.expand(batch, -1).clone()  # (B, S)

    def _set_counts(self, count: torch.Tensor, counts: list[int]) -> None:
        self.count, self.counts = count, counts
        self.filled = max(self.filled, *counts)

    def _grow(self) -> None:
        """Make room for every head's min(filled, sink + window) tokens (the layout only ever grows). A
        relayout copies the layer, so it lays each head out ``RESERVE`` tokens ahead, capped at its sink +
        window: a head's count grows by at most one per token, so the next ``RESERVE`` tokens fit
        (``room``)."""
        if self.filled <= self.room or self.lengths == self.full:  # nothing to compute per step
            return
        need = win.kept_tokens(self.filled, self.sink, self.window)
        new = torch.minimum(need + RESERVE, self.sink + self.window).tolist()
        self.room = min(self.filled + RESERVE, max(self.full))
        old_len = torch.tensor(self.lengths, device=self.device)
        new_len = torch.tensor(new, device=self.device)
        new_off = torch.cumsum(new_len, 0) - new_len
        head_of = torch.repeat_interleave(torch.arange(len(new), device=self.device), old_len)  # (S_old,)
        dst = new_off[head_of] + torch.arange(head_of.numel(), device=self.device) - self.offsets[head_of]
        b, _, d = self.keys.shape
        # slots not written yet are empty: zeros, never uninitialized memory (masked, but 0 * nan = nan)
        keys = self.keys.new_zeros(b, sum(new), d)
        values = self.values.new_zeros(b, sum(new), self.values.shape[-1])
        pos = torch.full((*self.pos.shape[:-1], sum(new)), -1, dtype=torch.long, device=self.device)
        keys[:, dst], values[:, dst], pos[..., dst] = self.keys, self.values, self.pos
        self.keys, self.values, self.pos = keys, values, pos
        self.lengths, self.offsets, self._gather, self._seg = new, new_off, None, None
        self.flat_now = self.flat and min(new) != max(new)
        self.starts = new_off.tolist()

    def _write(
        self, key_states: torch.Tensor, value_states: torch.Tensor, p: torch.Tensor, seen: int | torch.Tensor
    ) -> None:
        """Store the new tokens that survive this step (sinks, and each head's last ``window``): positions
        ``p`` (Q,) shared by the batch after ``seen`` tokens, or (B, Q) per sequence (-1: padding, never
        stored) after ``seen`` (B,) real tokens."""
        keep = win.keep(p, seen, self.sink, self.window, self.cap)  # (Hkv, Q) or (B, Hkv, Q)
        if p.dim() == 1:
            heads, idx = keep.nonzero(as_tuple=True)  # (n,), (n,)
            dst = self.offsets[heads] + win.slot(p[idx], self.sink[heads], self.window[heads])
            self.keys[:, dst] = key_states[:, heads, idx]
            self.values[:, dst] = value_states[:, heads, idx]
            self.pos[dst] = p[idx]
            return
        rows, heads, idx = keep.nonzero(as_tuple=True)  # (n,) each
        q = p[rows, idx]
        dst = self.offsets[heads] + win.slot(q, self.sink[heads], self.window[heads])
        self.keys[rows, dst] = key_states[rows, heads, idx]
        self.values[rows, dst] = value_states[rows, heads, idx]
        self.pos[rows, dst] = q

    def _write_one(self, key_states: torch.Tensor, value_states: torch.Tensor, t: int | torch.Tensor) -> None:
        """One new token per sequence (position t, or t (B,) per sequence): every head keeps it, in its slot;
        no data-dependent selection."""
        if isinstance(t, int):  # the index is built on the host: a few ints, no tensor arithmetic
            slots = [o + win.slot(t, s, w) for o, (s, w) in zip(self.starts, self.heads, strict=True)]
            dst = torch.tensor(slots, device=self.device)  # (Hkv,)
            self.keys.index_copy_(1, dst, key_states[:, :, 0])
            self.values.index_copy_(1, dst, value_states[:, :, 0])
            self.pos.index_fill_(0, dst, t)
            return
        dst = self.offsets + win.slot(t.view(-1, 1), self.sink, self.window)  # (B, Hkv)
        index = dst.unsqueeze(-1)  # (B, Hkv, 1)
        self.keys.scatter_(1, index.expand(-1, -1, self.keys.shape[-1]), key_states[:, :, 0])
        self.values.scatter_(1, index.expand(-1, -1, self.values.shape[-1]), value_states[:, :, 0])
        self.pos.scatter_(1, dst, t.view(-1, 1).expand_as(dst))

    def _expire(self, t: int | torch.Tensor) -> None:
        """Empty the sink slots that left the native cap for the next query (position t + 1; t (B,) per
        sequence): :func:`models.window.keep` no longer holds them, and no later query sees them."""
        if self.cap is None or self.gone or self.pos.numel() == 0:
            return
        has = (self.sink > 0) & (self.cap > 0)
        if not bool(has.any()):
            return
        laid_out = torch.tensor(self.lengths, device=self.device)
        n = torch.minimum(self.sink * has, laid_out)  # sink slots laid out so far
        heads = torch.repeat_interleave(torch.arange(len(self.sink), device=self.device), n)
        first = torch.cumsum(n, 0) - n
        slots = self.offsets[heads] + torch.arange(heads.numel(), device=self.device) - first[heads]
        pos = self.pos[..., slots]  # (n,) or (B, n)
        t = torch.as_tensor(t, device=self.device)
        gone = (pos >= 0) & (pos <= (t.view(-1, 1) if t.dim() else t) - self.cap[heads])
        if bool(gone.any()):
            self.pos[..., slots] = torch.where(gone, -1, pos)
            self.dead = True
        # positions only grow: once every sink slot is laid out and empty, none is ever refilled
        self.gone = bool((n == self.sink * has).all()) and bool((self.pos[..., slots] < 0).all())

    def _index(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Gather index (Hkv, Kmax) of a ragged layer's padded view, and which entries are real."""
        if self._gather is None:
            kmax = max(self.lengths)
            j = torch.arange(kmax, device=self.device).view(1, -1)
            lengths = torch.tensor(self.lengths, device=self.device).view(-1, 1)
            index = self.offsets.view(-1, 1) + torch.minimum(j, lengths - 1)  # (Hkv, Kmax)
            self._gather = (index, j < lengths)
        return self._gather

    def decode_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """What a decode step attends over: the flat buffer as one head (B, 1, S, D) for a ragged layer
        that decodes flat (:attr:`flat`), else :meth:`padded_kv`."""
        if self.flat_now:
            return self.keys.unsqueeze(1), self.values.unsqueeze(1)
        return self.padded_kv()

    def _segments(self, q_heads: int) -> torch.Tensor:
        """(Hq, S) bias of the flat buffer, in the cache's dtype: 0 on the segment of each query head's KV
        head, -inf elsewhere (kept until the layout changes)."""
        if self._seg is None or self._seg.shape[0] != q_heads:
            heads = torch.arange(len(self.lengths), device=self.device)
            owner = torch.repeat_interleave(heads, torch.tensor(self.lengths, device=self.device))  # (S,)
            own = heads.repeat_interleave(q_heads // len(heads)).view(-1, 1)  # (Hq, 1): each one's KV head
            self._seg = torch.zeros(q_heads, owner.numel(), dtype=self.keys.dtype, device=self.device)
            self._seg.masked_fill_(owner != own, float("-inf"))
        return self._seg

    def padded_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Held keys and values as (B, Hkv, Kmax, D): a free view if the heads hold equal counts."""
        (b, _, d), dv = self.keys.shape, self.values.shape[-1]
        n_heads, kmax = len(self.lengths), max(self.lengths)
        if min(self.lengths) == kmax:  # the flat buffer is already head-major
            return self.keys.view(b, n_heads, kmax, d), self.values.view(b, n_heads, kmax, dv)
        flat = self._index()[0].flatten()
        return self.keys[:, flat].view(b, n_heads, kmax, d), self.values[:, flat].view(b, n_heads, kmax, dv)

    def padded_pos(self) -> torch.Tensor:
        """Positions of the padded view: (Hkv, Kmax) shared by the batch, or (B, Hkv, Kmax) once the batch's
        positions diverged (padding); -1 marks an empty slot."""
        n_heads, kmax = len(self.lengths), max(self.lengths)
        if min(self.lengths) == kmax:
            return self.pos.view(*self.pos.shape[:-1], n_heads, kmax)
        index, valid = self._index()
        return torch.where(valid, self.pos[..., index], -1)

    def padded(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Held keys, values (B, Hkv, Kmax, D) and positions ((B,) Hkv, Kmax); -1 marks an empty slot."""
        return (*self.padded_kv(), self.padded_pos())

    def decode_bias(self, q_heads: int = 0) -> torch.Tensor | None:
        """Bias ((B,) Hkv, 1, K) for a single query after its own write: every held key is visible to it (the
        cache holds exactly what ``allowed`` gives), so only empty slots are masked (a ragged layer's padding,
        a shorter sequence's slots); None when there are none. A single query that took the general path
        (the first token, or one with padding in its column) gets the mask of its positions. Over the flat
        buffer (:meth:`decode_kv`, K = S) the bias is per query head, ((B,) ``q_heads``, 1, S), and masks each
        to its KV head's segment."""
        if self.last is not None:
            return win.hard_bias(*self.last, self.sink, self.window, torch.float32, self.cap)
        if self.flat_now:
            seg = self._segments(q_heads or len(self.lengths))
            if self.holes:
                seg = seg.masked_fill((self.pos < 0).unsqueeze(-2), float("-inf"))  # ((B,) Hq, S)
            return seg.unsqueeze(-2)
        if self.holes:
            empty = self.padded_pos() < 0  # ((B,) Hkv, Kmax)
            bias = torch.zeros(empty.shape, device=self.device).masked_fill_(empty, float("-inf"))
            return bias.unsqueeze(-2)
        if min(self.lengths) == max(self.lengths):
            return None
        valid = self._index()[1]
        return torch.zeros(valid.shape, device=self.device).masked_fill_(~valid, float("-inf")).unsqueeze(1)

    # ---- transformers' layer API ---------------------------------------------------------------
    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, real: torch.Tensor | None = None,
        **kwargs,
    ):
        """Add this step's keys and values; return what the step's queries attend over. ``real`` (B, Q):
        which of the new tokens are real (None: all of them); padding is never stored."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        q_len, start = key_states.shape[2], self.seen
        if real is not None and self.count is None:
            self._diverge(key_states.shape[0])
        self.seen = start + q_len
        if q_len == 1 and start > 0 and real is None:  # one query: what survives is exactly what it may see
            if self.count is None:
                self.filled = self.seen
                t = start
            else:
                t = self.count
                self._set_counts(t + 1, [c + 1 for c in self.counts])
            self._grow()
            self._write_one(key_states, value_states, t)
            self._expire(t)
            self.last = None  # positions built only if asked for (the fast decode path needs none)
            return self.decode_kv()
        # several queries may need keys this step evicts: attend over held + new, then evict
        n_heads = len(self.lengths)
        if self.count is None:  # the batch shares its positions
            p = torch.arange(start, self.seen, device=self.device)  # (Q,)
            new_pos = p.expand(n_heads, -1)  # (Hkv, Q)
        else:  # each sequence counts its own real tokens
            if real is None:
                real = torch.ones(key_states.shape[0], q_len, dtype=torch.bool, device=self.device)
            real = real.to(self.device)
            p = win.positions(real, self.count)  # (B, Q), -1 at padding
            new_pos = p.unsqueeze(1).expand(-1, n_heads, -1)  # (B, Hkv, Q)
        if start:
            k0, v0, pos0 = self.padded()
        else:
            k0, v0, pos0 = key_states[:, :, :0], value_states[:, :, :0], new_pos[..., :0]
        keys, values = torch.cat([k0, key_states], 2), torch.cat([v0, value_states], 2)
        self.last = (p, torch.cat([pos0, new_pos], -1))
        if self.count is None:
            self.filled, seen = self.seen, self.seen
        else:
            seen = self.count + real.sum(1)
            self._set_counts(seen, seen.tolist())
        self._grow()
        self._write(key_states, value_states, p, seen)
        self._expire(seen - 1)
        return keys, values

    def positions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(q_pos, k_pos) of the last update: (Q,) and (Hkv, K) shared by the batch, or (B, Q) and
        (B, Hkv, K) per sequence once its positions diverged."""
        if self.last is None:
            if self.count is None:
                return torch.tensor([self.seen - 1], device=self.device), self.padded_pos()
            return (self.count - 1).view(-1, 1), self.padded_pos()
        return self.last

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """Keys the next forward attends over (transformers' own mask is bypassed for this cache)."""
        return max(self.lengths) + query_length, 0

    def get_seq_length(self) -> int:
        """Columns seen, padding included, so ``generate`` slices its inputs and (without a padding mask)
        assigns absolute position ids as it does for any cache."""
        return self.seen

    def get_max_length(self) -> int:
        return -1  # any number of tokens can stream through

    def reset(self) -> None:
        self.__init__(self.sink.cpu(), self.window.cpu(), None if self.cap is None else self.cap.cpu(),
                      self.flat)

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            "evicted tokens cannot be restored: the per-head cache does not support crop"
        )

    def _select(self, index: torch.Tensor) -> None:
        """Keep the batch rows ``index`` (B',): keys, values and, once diverged, positions and counts."""
        if not self.is_initialized:
            return
        index = index.to(self.device)
        self.keys = self.keys.index_select(0, index)
        self.values = self.values.index_select(0, index)
        if self.count is not None:
            self.pos = self.pos.index_select(0, index)
            self.count = self.count.index_select(0, index)
            self.counts = [self.counts[i] for i in index.tolist()]



class PerHeadCache(Cache):
    """transformers ``Cache`` holding, per (layer, KV head), only that head's sink + window tokens."""

    evicting = True  # tells the attention patch to bypass transformers' contiguous-cache mask
    prefix = False  # its keys are the held ones, not a prefix: the dense path masks them

    def __init__(
        self, sink: torch.Tensor, window: torch.Tensor, cap: torch.Tensor | None = None, reindex: bool = False
    ) -> None:
        """``sink``, ``window``, ``cap``: long tensors (layers, KV heads), ``cap`` the native windows
        (0: none); made by ``alloc.allocation.applied``."""
        caps = [None if cap is None else cap[i].cpu() for i in range(sink.shape[0])]
        super().__init__(
            # re-indexed attention takes the general path, which needs every layer's padded view
            layers=[HeadLayer(sink[i].cpu(), window[i].cpu(), caps[i], flat=not reindex)
                    for i in range(sink.shape[0])]
        )
        self.reindex = reindex
        self._step: tuple[int, int, torch.Tensor | None] | None = None  # (seen, Q, real) of the next forward

    def note_padding(self, attention_mask: torch.Tensor | None, q_len: int) -> None:
        """Called once per forward, by the attention mask hook, with the forward's 2-D padding mask
        (B, seen + Q), transformers' convention (its last Q columns describe the new tokens; a (B, Q) mask
        of the new tokens alone is read the same way). Padding among the new tokens gets no position and no
        slot."""
        real = None
        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.shape[-1] < q_len:
                raise ValueError(
                    "the per-head evicting cache needs a 2-D attention mask "
                    f"(batch, tokens seen + {q_len} new); got shape {tuple(attention_mask.shape)}"
                )
            new = attention_mask[:, -q_len:].bool()
            if not bool(new.all()):
                real = new
        self._step = (self.get_seq_length(), q_len, real)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if layer_idx == 0 and not is_active_source(self):
            raise RuntimeError(
                "PerHeadCache must be used inside applied(model, allocation, evict=True)"
            )
        real, step = None, self._step
        if step is not None and step[:2] == (self.layers[layer_idx].seen, key_states.shape[2]):
            real = step[2]  # this forward's padding (a stale note, of an earlier forward, never matches)
        if real is not None and real.shape[0] != key_states.shape[0]:
            raise ValueError(
                f"the attention mask has {real.shape[0]} rows, the batch {key_states.shape[0]} sequences"
            )
        return super().update(key_states, value_states, layer_idx, *args, real=real, **kwargs)

    def positions(self, layer: int, q_len: int, k_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions of this step's queries and of the keys just returned: (Q,) and (Hkv, K) shared by the
        batch, or (B, Q) and (B, Hkv, K) per sequence (a padded batch)."""
        q_pos, k_pos = self.layers[layer].positions()
        if q_pos.shape[-1] != q_len or k_pos.shape[-1] != k_len:
            raise RuntimeError(
                f"layer {layer}: attention got {q_len} queries x {k_len} keys, not what the cache returned"
            )
        return q_pos, k_pos

    def decode_bias(self, layer: int, k_len: int, q_heads: int = 0) -> torch.Tensor | None:
        """Fast path for one query per step (see :meth:`HeadLayer.decode_bias`)."""
        held = self.layers[layer]
        keys = held.keys.shape[1] if held.flat_now else max(held.lengths)  # what decode_kv handed out
        if k_len != (held.last[1].shape[-1] if held.last is not None else keys):
            raise RuntimeError(f"layer {layer}: attention got {k_len} keys, not what the cache returned")
        return held.decode_bias(q_heads)

    # ---- measures ---------------------------------------------------------------------------------
    def bytes_held(self) -> int:
        """Bytes of the K and V entries this cache holds right now (all layers, all sequences): live
        entries only. In a padded batch each sequence holds its own ``Allocation.kv_bytes(T_b)`` (T_b its
        real tokens), while the rectangular storage is laid out for the longest: the slots a shorter
        sequence has not filled yet are allocated but hold nothing, and are counted by
        :meth:`bytes_allocated`, not here. Without padding, or once every sequence holds its sink + window,
        the two agree."""
        return sum(_held_kv_bytes(layer) for layer in self.layers if layer.is_initialized)

    def bytes_allocated(self) -> int:
        """Bytes of the K and V tensors allocated right now (all layers): :meth:`bytes_held` plus the empty
        slots: a padded batch's shorter sequences', and while heads fill, the ``RESERVE`` laid out ahead."""
        return sum(
            _nbytes(layer.keys) + _nbytes(layer.values) for layer in self.layers if layer.is_initialized
        )

    def index_bytes(self) -> int:
        """Bookkeeping: the int64 position of every held slot."""
        return sum(_nbytes(layer.pos) for layer in self.layers if layer.is_initialized)

    def padded_bytes(self) -> int:
        """What K and V would hold if every layer were padded to its fullest head (for comparison)."""
        return sum(_padded_kv_bytes(layer) for layer in self.layers if layer.is_initialized)

    def transient_bytes(self) -> int:
        """Largest padded K+V copy one ragged layer makes for its attention call (0 if none is ragged)."""
        ragged = [layer for layer in self.layers if layer.is_initialized and len(set(layer.lengths)) > 1]
        return max((_padded_kv_bytes(layer) for layer in ragged), default=0)

    def kept_tokens(self) -> int:
        """Key/value entries held over all (layer, KV head) by the sequence that holds the most."""
        return sum(int((layer.pos >= 0).sum(-1).max()) for layer in self.layers if layer.is_initialized)


def _held_kv_bytes(layer: HeadLayer) -> int:
    b, _, d = layer.keys.shape
    entries = int((layer.pos >= 0).sum()) * (b if layer.pos.dim() == 1 else 1)  # shared or per sequence
    return entries * (d + layer.values.shape[-1]) * layer.keys.element_size()


def _padded_kv_bytes(layer: HeadLayer) -> int:
    b, _, d = layer.keys.shape
    return 2 * b * len(layer.lengths) * max(layer.lengths) * d * layer.keys.element_size()


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def kv_bytes_of(cache: Cache) -> int:
    """Bytes of K and V held by any transformers cache (a DynamicCache for full attention, or ours: what its
    ``bytes_held`` counts, a filled cache's scores and positions included)."""
    if hasattr(cache, "bytes_held"):
        return cache.bytes_held()
    return sum(
        _nbytes(getattr(layer, "keys", None)) + _nbytes(getattr(layer, "values", None))
        for layer in cache.layers
    )
