"""A fixed-capacity per-head KV cache whose decode step has static shapes: the GPU serving path.

:class:`StaticHeadCache` holds, like :class:`models.kv_cache.PerHeadCache`, exactly each (layer, KV head)'s
sink + window keys (which keys, and where each lives, is :mod:`models.window`'s ``keep`` / ``slot``), but
its storage is laid out once, at the first forward, for a known most-tokens ``max_len``: a head's capacity
is ``min(sink + window, max_len)`` and never changes. A decode step then has the same shapes every time:
the write slots are computed on the device from a device-side position counter (no ``.item()``, no
host-side loop over heads), one ``index_copy_`` writes every head, and the mask of slots not yet written
(or of sinks past a native cap) comes from per-slot positions on the device. So the whole model step can
be captured once as a CUDA graph and replayed (:class:`GraphDecoder`), which removes the launch overhead
that dominates batch-1 decode on a GPU.

Layout per layer (chosen once, from the allocation):

- *uniform* (every KV head has the same sink and window, e.g. StreamingLLM or full attention): one
  ``(B, Hkv, C + 1, D)`` tensor per K and V, attended by SDPA with grouped-query heads as any cache;
- *ragged* (heads of unequal capacity): one flat ``(B, S + 1, D)`` buffer, head ``h`` owning the segment
  ``[offset_h, offset_h + capacity_h)``; a decode step attends over it as one KV head, each query head masked
  to its own segment (:func:`models.attention._flat_attention`). The bytes held are exactly the
  allocation's (no padding to the largest head); scoring the other heads' segments is the price, small next
  to the weights at batch 1 and a batched matrix product at large batches.

The ``+ 1`` is a trash slot: a prefill writes the tokens no head keeps there (always masked).
Prefill: one multi-token forward into the empty cache (its queries see the new keys under the allocation's
mask, on the FlexAttention path for long prompts), then the survivors are written in one scatter. Later
multi-token forwards and padded batches are refused in one line: :class:`models.kv_cache.PerHeadCache`
serves those. Full attention as a static cache (the fair GPU baseline beside transformers' DynamicCache) is
the uniform allocation with window ``max_len``.
"""

from __future__ import annotations

import logging

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from models import window as win
from models.attention import is_active_source
from models.common import HeadkvError

__all__ = ["GraphDecoder", "StaticHeadCache", "StaticLayer"]

log = logging.getLogger(__name__)
_FAR = 2**62  # "no native cap"


class StaticError(HeadkvError):
    """A request the static cache does not serve (padding, a second prefill, a prompt beyond max_len)."""


class StaticLayer(CacheLayerMixin):
    """One layer's fixed-capacity storage (see the module docstring)."""

    is_sliding = False
    is_compileable = True
    is_croppable = False

    def __init__(
        self, sink: torch.Tensor, window: torch.Tensor, cap: torch.Tensor | None, max_len: int
    ) -> None:
        super().__init__()
        self.sink, self.window = sink.long().cpu(), window.long().cpu()  # (Hkv,)
        n = len(self.sink)
        cap = torch.zeros(n, dtype=torch.long) if cap is None else cap.cpu().long()
        self.capv = torch.where(cap > 0, cap, _FAR)  # (Hkv,) native cap, "none" as a huge number
        self.capacity = torch.clamp(self.sink + self.window, max=max_len)  # (Hkv,)
        self.max_len = int(max_len)
        self.uniform = bool((self.sink == self.sink[0]).all() and (self.window == self.window[0]).all()
                            and (self.capv == self.capv[0]).all())
        if self.uniform:  # every head: slots 0..C-1, trash C
            self.offsets = torch.zeros(n, dtype=torch.long)
            self.slots = int(self.capacity[0]) + 1
        else:  # head h: slots offset_h .. offset_h + capacity_h - 1 of the flat buffer, trash S
            self.offsets = torch.cumsum(self.capacity, 0) - self.capacity
            self.slots = int(self.capacity.sum()) + 1
        self.seen = 0  # tokens written (host side; a replayed graph's steps are counted by GraphDecoder)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, d = key_states.shape
        if h != len(self.sink):
            raise StaticError(f"the allocation has {len(self.sink)} KV heads per layer, the model {h}")
        dev, self.dtype, self.device = key_states.device, key_states.dtype, key_states.device
        shape = (b, h, self.slots, d) if self.uniform else (b, self.slots, d)
        self.keys = torch.zeros(shape, dtype=key_states.dtype, device=dev)
        self.values = torch.zeros(shape, dtype=value_states.dtype, device=dev)
        self.pos = torch.full((self.slots,), -1, dtype=torch.long, device=dev)  # -1: empty
        self.t = torch.zeros((), dtype=torch.long, device=dev)  # the next token's position, on the device
        self.s, self.w = self.sink.to(dev), self.window.to(dev)
        self.off = self.offsets.to(dev)
        trash = self.slots - 1
        self.trash = torch.tensor(trash, device=dev)
        owner = torch.repeat_interleave(torch.arange(h), self.capacity)  # (S,) the KV head of each slot
        cap_slot = self.capv[:1].expand(self.slots - 1) if self.uniform else self.capv[owner]
        self.slot_cap = torch.cat([cap_slot, torch.zeros(1, dtype=torch.long)]).to(dev)  # trash: never seen
        self.owner = None if self.uniform else torch.cat([owner, torch.tensor([-1])]).to(dev)
        self.is_initialized = True

    def _slot(self, p: torch.Tensor) -> torch.Tensor:
        """Storage index of position(s) ``p`` (..., 1) for every head (..., Hkv): :func:`models.window.slot`
        within the head's segment."""
        return win.slot(p, self.s, self.w) + self.off

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        q_len = key_states.shape[2]
        if q_len == 1 and self.seen > 0:
            self._write_one(key_states, value_states)
            self.seen += 1
            return self._held()
        if self.seen:
            raise StaticError("the static cache takes one prefill, then one token per step; use the "
                              "evicting cache (static off) for chunked prompts")
        if q_len > self.max_len:
            raise StaticError(f"a prompt of {q_len} tokens exceeds the static cache's max_len {self.max_len}")
        self._write_prefill(key_states, value_states)
        self.seen = q_len
        if q_len == 1:  # a one-token prompt: attended like a decode step
            return self._held()
        return key_states, value_states  # the prefill's queries attend over its own keys (masked)

    def _held(self) -> tuple[torch.Tensor, torch.Tensor]:
        """What a decode step attends over: (B, Hkv, C + 1, D), or the flat buffer as one head."""
        if self.uniform:
            return self.keys, self.values
        return self.keys.unsqueeze(1), self.values.unsqueeze(1)

    def _write_one(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        slot = self._slot(self.t.view(1))  # (Hkv,)
        if self.uniform:
            self.keys.index_copy_(2, slot[:1], key_states)
            self.values.index_copy_(2, slot[:1], value_states)
            self.pos.index_copy_(0, slot[:1], self.t.view(1))
        else:
            self.keys.index_copy_(1, slot, key_states[:, :, 0])
            self.values.index_copy_(1, slot, value_states[:, :, 0])
            self.pos.index_copy_(0, slot, self.t.expand(len(slot)))
        self.t.add_(1)

    def _write_prefill(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        t = key_states.shape[2]
        p = torch.arange(t, device=self.device)
        held = win.keep(p, t, self.s, self.w, self.slot_cap[self.off])  # (Hkv, T): what the next query sees
        slot = torch.where(held, self._slot(p.view(-1, 1)).T, self.trash)  # (Hkv, T)
        if self.uniform:
            self.keys.index_copy_(2, slot[0], key_states)
            self.values.index_copy_(2, slot[0], value_states)
            self.pos.index_copy_(0, slot[0], p)
        else:
            flat = slot.reshape(-1)
            self.keys.index_copy_(1, flat, key_states.flatten(1, 2))
            self.values.index_copy_(1, flat, value_states.flatten(1, 2))
            self.pos.index_copy_(0, flat, p.repeat(len(self.sink)))
        self.pos[-1] = -1
        self.t.fill_(t)

    def decode_bias(self, q_heads: int) -> torch.Tensor:
        """The mask of one query after its own write, from device state only: ((1 | q_heads), 1, slots),
        0 where a slot holds a key this query sees (written, within the native cap), -inf elsewhere; over the
        flat buffer also -inf outside each query head's KV head's segment."""
        q = self.t - 1
        seen = (self.pos >= 0) & (q - self.pos < self.slot_cap)  # (slots,)
        bias = torch.zeros(self.slots, device=self.device).masked_fill_(~seen, float("-inf"))
        if self.uniform:
            return bias.view(1, 1, -1)
        r = q_heads // len(self.sink)
        mine = self.owner.view(1, -1) == torch.arange(q_heads, device=self.device).view(-1, 1) // r
        return bias.masked_fill(~mine, float("-inf")).unsqueeze(1)  # (Hq, 1, S)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.slots + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return self.max_len

    def reset(self) -> None:
        if self.is_initialized:
            self.keys.zero_(), self.values.zero_(), self.pos.fill_(-1), self.t.zero_()
        self.seen = 0

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("evicted tokens cannot be restored: the static cache does not support crop")

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Each sequence ``repeats`` times (before a graph is captured: the buffers become new tensors)."""
        if self.is_initialized:
            self.keys = self.keys.repeat_interleave(repeats, 0)
            self.values = self.values.repeat_interleave(repeats, 0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self.keys, self.values = self.keys[indices], self.values[indices]


class StaticHeadCache(Cache):
    """transformers ``Cache`` of :class:`StaticLayer` s, one per layer (made by ``alloc.allocation.applied``
    with ``static=max_len``)."""

    evicting = True  # its keys are not transformers' contiguous cache: the attention patch bypasses its mask

    def __init__(
        self, sink: torch.Tensor, window: torch.Tensor, cap: torch.Tensor | None, max_len: int
    ) -> None:
        if max_len < 1:
            raise StaticError(f"max_len must be >= 1, got {max_len}")
        caps = [None if cap is None else cap[i] for i in range(sink.shape[0])]
        super().__init__(layers=[StaticLayer(sink[i], window[i], caps[i], max_len)
                                 for i in range(sink.shape[0])])
        self.max_len = int(max_len)
        self.prefix = False  # this forward is a prefill: its keys are a full prefix (flex may serve it)

    def note_padding(self, attention_mask: torch.Tensor | None, q_len: int) -> None:
        """Called by the attention mask hook once per forward; a padded batch is refused (not graph-safe)."""
        if attention_mask is not None and attention_mask.shape[-1] >= q_len and q_len > 1:
            if not bool(attention_mask[:, -q_len:].bool().all()):
                raise StaticError("the static cache serves unpadded batches; use the evicting cache for "
                                  "left-padded prompts")
        self.prefix = q_len > 1 and self.layers[0].seen == 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if layer_idx == 0 and not is_active_source(self):
            raise RuntimeError("StaticHeadCache must be used inside applied(model, allocation, static=...)")
        return self.layers[layer_idx].update(key_states, value_states)

    def positions(self, layer: int, q_len: int, k_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions of a prefill's queries and keys: 0..T-1 both (the decode step uses decode_bias)."""
        held = self.layers[layer]
        if q_len != k_len or held.seen != q_len:
            raise RuntimeError(f"layer {layer}: a static cache serves a prefill or one token per step")
        p = torch.arange(q_len, device=held.device)
        return p, p

    def decode_bias(self, layer: int, k_len: int, q_heads: int = 0) -> torch.Tensor:
        held = self.layers[layer]
        if k_len != held.slots:
            raise RuntimeError(f"layer {layer}: attention got {k_len} keys, the static cache {held.slots}")
        return held.decode_bias(q_heads)

    def advance(self, steps: int) -> None:
        """Count ``steps`` tokens written by replaying a captured step (the device counters moved already)."""
        for layer in self.layers:
            layer.seen += steps

    def bytes_allocated(self) -> int:
        """Bytes of the K and V tensors (all layers, the whole batch), the trash slot included."""
        return sum(layer.keys.nbytes + layer.values.nbytes for layer in self.layers if layer.is_initialized)


class GraphDecoder:
    """Single-token decode steps of ``model`` over a :class:`StaticHeadCache`, captured once as a CUDA graph.

    Call inside ``applied(model, allocation, static=max_len)`` after the prefill: ``step(ids)`` (B, 1) runs
    one step and returns the logits (B, V) of the new token. On CUDA the first ``warmup`` steps run eagerly
    (real steps, on a side stream, as capture needs), the next one is captured and every later one replays
    the graph with the new token ids and positions copied into static buffers; elsewhere (or if capture
    fails, said once in a log line) every step runs eagerly. ``graphed`` says which."""

    def __init__(self, model: torch.nn.Module, cache: StaticHeadCache, warmup: int = 2) -> None:
        self.model, self.cache, self.warmup = model, cache, warmup
        self.graph: torch.cuda.CUDAGraph | None = None
        self.graphed = False
        self.failed = False
        self._ids = self._pos = self._logits = None

    def _forward(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return self.model(ids, position_ids=pos, cache=self.cache, use_cache=True).logits[:, -1]

    @torch.no_grad()
    def step(self, ids: torch.Tensor) -> torch.Tensor:
        n = self.cache.get_seq_length()
        if n + 1 > self.cache.max_len:
            raise StaticError(f"the static cache is full: max_len {self.cache.max_len} tokens")
        if ids.device.type != "cuda" or self.failed:
            return self._forward(ids, torch.full_like(ids, n))
        if self._ids is None:
            self._ids, self._pos = torch.zeros_like(ids), torch.zeros_like(ids)
        self._ids.copy_(ids)
        self._pos.fill_(n)
        if self.graph is not None:
            self.graph.replay()
            self.cache.advance(1)
            return self._logits
        if self.warmup > 0:  # a real step on a side stream (cuBLAS handles, lazy init) before capture
            self.warmup -= 1
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = self._forward(self._ids, self._pos)
            torch.cuda.current_stream().wait_stream(side)
            return out
        return self._capture()

    def _capture(self) -> torch.Tensor:
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self._logits = self._forward(self._ids, self._pos)  # recorded, not run
        except Exception as err:  # noqa: BLE001 - anything capture refuses: decode eagerly
            log.warning("CUDA graph capture failed (%s): decoding eagerly", str(err).splitlines()[0][:160])
            self.failed = True
            torch.cuda.synchronize()
            n = self.cache.get_seq_length()
            return self._forward(self._ids, torch.full_like(self._ids, n))
        self.cache.advance(-1)  # capture ran the Python side of a step (host counters) but no kernel
        self.graph, self.graphed = graph, True
        self.graph.replay()
        self.cache.advance(1)
        return self._logits
