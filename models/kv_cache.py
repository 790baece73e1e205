"""Per-head evicting KV cache for real generation: each (layer, KV head) holds only its sink + window.

:class:`PerHeadCache` is a transformers ``Cache`` (pinned 5.24.0). For every layer and KV head it keeps
the head's first ``sink`` tokens and its last ``window`` tokens, exactly the keys that
:func:`models.window.allowed` lets the *next* query see, and drops every other one as generation proceeds.
Which keys survive, where each lives and how many there are is :mod:`models.window`'s (``keep``, ``slot``,
``kept_tokens``); this module only stores them. It is entered through the one door, so the mask and the
eviction come from one allocation::

    with applied(model, allocation, evict=True) as cache:   # alloc.allocation.applied
        model.generate(ids, past_key_values=cache, max_new_tokens=20)   # or a hand-written decode loop

Storage (why ragged): heads of one layer hold different numbers of tokens (a learned allocation gives one
head 600 and its neighbour 20). Padding each layer to its largest head would hold up to ``n_kv_heads`` times
the allocation's bytes in exactly the layers where per-head allocation matters, so each layer stores its
heads *ragged* in one flat ``(batch, sum_h kept_h, head_dim)`` buffer per K and V (head ``h`` owns a
contiguous segment: its sinks, then a ring of ``window`` slots). The bytes held are therefore exactly
``Allocation.kv_bytes(T)``; :meth:`PerHeadCache.bytes_held` measures the live tensors. Attention needs
``(batch, kv_heads, K, head_dim)``: a layer whose heads hold equal counts is handed a zero-copy view; a
ragged layer is gathered into a padded transient (empty slots at position -1, masked) that lives only for
that layer's attention call (:meth:`PerHeadCache.transient_bytes`).

Eviction writes in place: once every head is full, a step writes one slot per head and allocates nothing.
While heads are still filling (``T < sink + window``) the buffer is reallocated each step, as transformers'
own ``DynamicCache`` does. A multi-token forward (prefill, or chunked streaming) attends over the held keys
plus all its new keys, then keeps only the survivors, so any chunking gives the same result as
token-by-token decoding.

Positions are absolute (``get_seq_length`` counts every token seen), so ``generate`` feeds the model its
usual position ids; the cache reports each held key's absolute position to the attention function
(``positions(layer, q_len, k_len)``), which builds the mask from it. With ``reindex=True`` the attention
function applies StreamingLLM's re-indexing (see :class:`models.attention.Rotary`). Transformers' causal
mask is bypassed for this cache (its keys are not a contiguous prefix); padded batches are refused.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from models import window as win
from models.attention import is_active_source
from models.common import HeadkvError

__all__ = ["DeployError", "HeadLayer", "PerHeadCache", "kv_bytes_of"]


class DeployError(HeadkvError):
    """A request real generation cannot serve (e.g. a prompt beyond the model's positions), in one line."""


class HeadLayer(CacheLayerMixin):
    """One layer's per-head ragged ring buffers (see the module docstring)."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, sink: torch.Tensor, window: torch.Tensor) -> None:
        super().__init__()
        self.sink, self.window = sink.long(), window.long()  # (Hkv,)
        self.seen = 0
        self.lengths: list[int] = [0] * len(self.sink)
        self.offsets = torch.zeros(len(self.sink), dtype=torch.long)
        self.pos: torch.Tensor | None = None  # (S,) absolute position of every stored slot
        self.last: tuple[torch.Tensor, torch.Tensor] | None = None  # (q_pos, k_pos) of a multi-token update
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
        self.offsets = self.offsets.to(self.device)
        self.is_initialized = True

    # ---- layout ----------------------------------------------------------------------------------
    def _grow(self, new_seen: int) -> None:
        """Reallocate so that every head can hold min(new_seen, sink + window) tokens."""
        new = win.kept_tokens(new_seen, self.sink, self.window).tolist()
        if new == self.lengths:
            return
        old_len = torch.tensor(self.lengths, device=self.device)
        new_len = torch.tensor(new, device=self.device)
        new_off = torch.cumsum(new_len, 0) - new_len
        head_of = torch.repeat_interleave(torch.arange(len(new), device=self.device), old_len)  # (S_old,)
        dst = new_off[head_of] + torch.arange(head_of.numel(), device=self.device) - self.offsets[head_of]
        b, _, d = self.keys.shape
        keys = self.keys.new_empty(b, sum(new), d)
        values = self.values.new_empty(b, sum(new), self.values.shape[-1])
        pos = torch.full((sum(new),), -1, dtype=torch.long, device=self.device)
        keys[:, dst], values[:, dst], pos[dst] = self.keys, self.values, self.pos
        self.keys, self.values, self.pos = keys, values, pos
        self.lengths, self.offsets, self._gather = new, new_off, None

    def _write(
        self, key_states: torch.Tensor, value_states: torch.Tensor, p: torch.Tensor, new_seen: int
    ) -> None:
        """Store the new tokens that survive this step (sinks, and each head's last ``window``)."""
        keep = win.keep(p, new_seen, self.sink, self.window)  # (Hkv, Q)
        heads, idx = keep.nonzero(as_tuple=True)  # (n,), (n,)
        dst = self.offsets[heads] + win.slot(p[idx], self.sink[heads], self.window[heads])
        self.keys[:, dst] = key_states[:, heads, idx]
        self.values[:, dst] = value_states[:, heads, idx]
        self.pos[dst] = p[idx]

    def _write_one(self, key_states: torch.Tensor, value_states: torch.Tensor, t: int) -> None:
        """One new token (position t): every head keeps it, in its slot; no data-dependent selection."""
        dst = self.offsets + win.slot(t, self.sink, self.window)  # (Hkv,)
        self.keys.index_copy_(1, dst, key_states[:, :, 0])
        self.values.index_copy_(1, dst, value_states[:, :, 0])
        self.pos.index_fill_(0, dst, t)

    def _index(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Gather index (Hkv, Kmax) of a ragged layer's padded view, and which entries are real."""
        if self._gather is None:
            kmax = max(self.lengths)
            j = torch.arange(kmax, device=self.device).view(1, -1)
            lengths = torch.tensor(self.lengths, device=self.device).view(-1, 1)
            index = self.offsets.view(-1, 1) + torch.minimum(j, lengths - 1)  # (Hkv, Kmax)
            self._gather = (index, j < lengths)
        return self._gather

    def padded_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Held keys and values as (B, Hkv, Kmax, D): a free view if the heads hold equal counts."""
        b, _, d = self.keys.shape
        n_heads, kmax = len(self.lengths), max(self.lengths)
        if min(self.lengths) == kmax:  # the flat buffer is already head-major
            return self.keys.view(b, n_heads, kmax, d), self.values.view(b, n_heads, kmax, -1)
        flat = self._index()[0].flatten()
        return self.keys[:, flat].view(b, n_heads, kmax, d), self.values[:, flat].view(b, n_heads, kmax, -1)

    def padded_pos(self) -> torch.Tensor:
        """Absolute positions (Hkv, Kmax) of the padded view; -1 marks padding."""
        n_heads, kmax = len(self.lengths), max(self.lengths)
        if min(self.lengths) == kmax:
            return self.pos.view(n_heads, kmax)
        index, valid = self._index()
        return torch.where(valid, self.pos[index], -1)

    def padded(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Held keys, values (B, Hkv, Kmax, D) and positions (Hkv, Kmax); -1 marks padding."""
        return (*self.padded_kv(), self.padded_pos())

    def decode_bias(self) -> torch.Tensor | None:
        """Bias (Hkv, 1, Kmax) for a single query after its own write: every held key is visible to it (the
        cache holds exactly what ``allowed`` gives), so only padding is masked; None when there is none."""
        if min(self.lengths) == max(self.lengths):
            return None
        valid = self._index()[1]
        return torch.zeros(valid.shape, device=self.device).masked_fill_(~valid, float("-inf")).unsqueeze(1)

    # ---- transformers' layer API ---------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Add this step's keys and values; return what the step's queries attend over."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        q_len, start = key_states.shape[2], self.seen
        self.seen = start + q_len
        if q_len == 1 and start > 0:  # one query: what survives is exactly what it may see
            self._grow(self.seen)
            self._write_one(key_states, value_states, start)
            self.last = None  # positions built only if asked for (the fast decode path needs none)
            return self.padded_kv()
        # several queries may need keys this step evicts: attend over held + new, then evict
        p = torch.arange(start, self.seen, device=self.device)  # (Q,)
        n_heads = len(self.lengths)
        if start:
            k0, v0, pos0 = self.padded()
        else:
            k0, v0, pos0 = key_states[:, :, :0], value_states[:, :, :0], p.new_empty(n_heads, 0)
        keys, values = torch.cat([k0, key_states], 2), torch.cat([v0, value_states], 2)
        self.last = (p, torch.cat([pos0, p.expand(n_heads, -1)], 1))
        self._grow(self.seen)
        self._write(key_states, value_states, p, self.seen)
        return keys, values

    def positions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(q_pos (Q,), k_pos (Hkv, K)) of the last update."""
        if self.last is None:
            return torch.tensor([self.seen - 1], device=self.device), self.padded_pos()
        return self.last

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """Keys the next forward attends over (transformers' own mask is bypassed for this cache)."""
        return max(self.lengths) + query_length, 0

    def get_seq_length(self) -> int:
        """Tokens seen (absolute), so ``generate`` and the models assign absolute position ids."""
        return self.seen

    def get_max_length(self) -> int:
        return -1  # any number of tokens can stream through

    def reset(self) -> None:
        self.__init__(self.sink.cpu(), self.window.cpu())

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            "evicted tokens cannot be restored: the per-head cache does not support crop"
        )

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.keys = self.keys.index_select(0, beam_idx.to(self.device))
        self.values = self.values.index_select(0, beam_idx.to(self.device))


class PerHeadCache(Cache):
    """transformers ``Cache`` holding, per (layer, KV head), only that head's sink + window tokens."""

    evicting = True  # tells the attention patch to bypass transformers' contiguous-cache mask

    def __init__(self, sink: torch.Tensor, window: torch.Tensor, reindex: bool = False) -> None:
        """``sink``, ``window``: long tensors (layers, KV heads); made by ``alloc.allocation.applied``."""
        super().__init__(layers=[HeadLayer(sink[i].cpu(), window[i].cpu()) for i in range(sink.shape[0])])
        self.reindex = reindex

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if layer_idx == 0 and not is_active_source(self):
            raise RuntimeError(
                "PerHeadCache must be used inside applied(model, allocation, evict=True)"
            )
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def positions(self, layer: int, q_len: int, k_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Absolute positions of this step's queries (Q,) and of the keys just returned (Hkv, K)."""
        q_pos, k_pos = self.layers[layer].positions()
        if q_pos.numel() != q_len or k_pos.shape[-1] != k_len:
            raise RuntimeError(
                f"layer {layer}: attention got {q_len} queries x {k_len} keys, not what the cache returned"
            )
        return q_pos, k_pos

    def decode_bias(self, layer: int, k_len: int) -> torch.Tensor | None:
        """Fast path for one query per step (see :meth:`HeadLayer.decode_bias`)."""
        if k_len != max(self.layers[layer].lengths):
            raise RuntimeError(f"layer {layer}: attention got {k_len} keys, not what the cache returned")
        return self.layers[layer].decode_bias()

    # ---- measures ---------------------------------------------------------------------------------
    def bytes_held(self) -> int:
        """Bytes of the K and V tensors this cache holds right now (all layers)."""
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
        """Key/value slots held over all (layer, KV head)."""
        return sum(sum(layer.lengths) for layer in self.layers)


def _padded_kv_bytes(layer: HeadLayer) -> int:
    b, _, d = layer.keys.shape
    return 2 * b * len(layer.lengths) * max(layer.lengths) * d * layer.keys.element_size()


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def kv_bytes_of(cache: Cache) -> int:
    """Bytes of K and V held by any transformers cache (a DynamicCache for full attention, or ours)."""
    if isinstance(cache, PerHeadCache):
        return cache.bytes_held()
    return sum(
        _nbytes(getattr(layer, "keys", None)) + _nbytes(getattr(layer, "values", None))
        for layer in cache.layers
    )
