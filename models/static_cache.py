"""A fixed-capacity per-head KV cache whose decode step has static shapes: the GPU serving path.

:class:`StaticHeadCache` holds, like :class:`models.kv_cache.PerHeadCache`, exactly each (layer, KV head)'s
sink + window keys (:mod:`models.window`'s ``keep`` / ``slot``), laid out once for a known ``max_len``: a
head's capacity ``min(sink + window, max_len)`` never changes, and write slots and masks are computed on the
device, so :class:`GraphDecoder` can capture a whole model step as a CUDA graph and replay it. Storage per
group of layers: *padded* or *flat* (``layout``), each with one trash slot. A prefill is one multi-token
forward into the empty cache; later multi-token forwards and padded batches are refused (the evicting
cache serves them).

Design: docs/design.md, section 'The static cache (the GPU serving path)'.
"""

from __future__ import annotations

import logging

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from headkv.models import window as win
from headkv.models.attention import is_active_source
from headkv.models.common import HeadkvError

__all__ = ["GraphDecoder", "StaticHeadCache", "StaticLayer"]

log = logging.getLogger(__name__)
_FAR = 2**62  # "no native cap"


class StaticError(HeadkvError):
    """A request the static cache does not serve (padding, a second prefill, a prompt beyond max_len)."""


FLAT_FROM_BATCH = 64  # layout "auto": a ragged group decodes over the flat buffer from this batch on


class _Rows:
    """What the layers with one (sink, window, cap) row share: the layout, each slot's position, the device
    position counter and, once per step, the write slots and the decode mask (computed at the group's first
    layer, reused by the rest: a step costs a few kernels per group, not per layer)."""

    def __init__(self, sink: torch.Tensor, window: torch.Tensor, capv: torch.Tensor, max_len: int,
                 layout: str) -> None:
        self.sink, self.window, self.capv = sink, window, capv  # (Hkv,) long, on the host
        self.capacity = torch.clamp(sink + window, max=max_len)  # (Hkv,) slots a head holds
        self.uniform = all(bool((x == x[0]).all()) for x in (sink, window, capv))
        self.layout = layout
        self.step = -1  # the host step (tokens seen) whose slots and mask are below
        self.slot = self.bias = self.src = self.device = None

    def initialize(self, batch: int, q_heads: int, device: torch.device, dtype: torch.dtype) -> None:
        """Lay the group out for ``batch`` sequences (the layout decided here) on ``device``."""
        if self.device is not None:  # laid out by the group's first layer
            return
        if self.layout == "auto":
            self.layout = "flat" if not self.uniform and batch >= FLAT_FROM_BATCH else "padded"
        n = len(self.sink)
        self.device, self.dtype, self.q_heads = device, dtype, q_heads
        self.s, self.w = self.sink.to(device), self.window.to(device)
        self.t = torch.zeros((), dtype=torch.long, device=device)  # the next token's position
        if self.layout == "padded":  # (Hkv, C + 1): slot j of head h; C the largest capacity, C the trash
            self.cols = int(self.capacity.max()) + 1
            self.pos = torch.full((n, self.cols), -1, dtype=torch.long, device=device)
            self.cap = self.capv.to(device).view(-1, 1)
        else:  # (S + 1,): head h's segment at offset_h; S the trash
            self.offsets = (torch.cumsum(self.capacity, 0) - self.capacity).to(device)
            self.cols = int(self.capacity.sum()) + 1
            self.pos = torch.full((self.cols,), -1, dtype=torch.long, device=device)
            owner = torch.repeat_interleave(torch.arange(n), self.capacity)
            self.cap = torch.cat([self.capv[owner], torch.zeros(1, dtype=torch.long)]).to(device)
            r = q_heads // n
            kv_of_query = torch.arange(q_heads).view(-1, 1) // r
            mine = torch.cat([owner, torch.tensor([-1])]).view(1, -1) == kv_of_query
            self.segment = torch.zeros(mine.shape).masked_fill_(~mine, float("-inf")).to(device)  # (Hq, S+1)

    def shape(self, batch: int, head_dim: int) -> tuple[int, ...]:
        return (batch, len(self.sink), self.cols, head_dim) if self.layout == "padded" else \
            (batch, self.cols, head_dim)

    def prefill(self, seen: int) -> torch.Tensor:
        """After a ``seen``-token prefill: every slot's position (-1 empty); returns the source index into the
        prompt of each slot ((Hkv, C+1) padded, (S+1,) flat into the (Hkv * T) flattened prompt)."""
        n = len(self.sink)
        if self.layout == "padded":
            held = win.slot_positions(seen, self.s, self.w, self.cols - 1)  # (Hkv, C)
            held = torch.cat([held, held.new_full((n, 1), -1)], 1)
            self.pos.copy_(held)
            src = held.clamp(min=0)
        else:
            local = win.slot_positions(seen, self.s, self.w, int(self.capacity.max()))  # (Hkv, Cmax)
            cols = torch.arange(local.shape[1], device=self.device).view(1, -1)
            inside = cols < self.capacity.to(self.device).view(-1, 1)
            held = torch.cat([local[inside], local.new_full((1,), -1)])  # (S+1,), head-major = segments
            heads = torch.arange(n, device=self.device).view(-1, 1).expand_as(local)[inside]
            self.pos.copy_(held)
            src = torch.cat([heads * seen + held[:-1].clamp(min=0), held.new_zeros(1)])
        self.t.fill_(seen)
        self.bias = self._mask(self.t - 1)  # what a one-token prompt's query sees (decode steps renew it)
        return src

    def advance(self, step: int) -> None:
        """Once per decode step (the group's first layer): this token's slots, positions and mask."""
        if self.step == step:
            return
        self.step = step
        t = self.t
        local = win.slot(t, self.s, self.w)  # (Hkv,)
        if self.layout == "padded":
            self.slot = local
            self.pos.scatter_(1, local.view(-1, 1), t.expand(len(self.sink), 1))
        else:
            self.slot = local + self.offsets
            self.pos.index_copy_(0, self.slot, t.expand(len(self.sink)))
        self.bias = self._mask(t)
        t.add_(1)

    def _mask(self, q: torch.Tensor) -> torch.Tensor:
        """(Hq, 1, slots) in the model's dtype for the query at position ``q``: 0 where a slot holds a key it
        sees (written, within the native cap), -inf elsewhere (flat: also outside its KV head's segment)."""
        seen = (self.pos >= 0) & (q - self.pos < self.cap)  # (Hkv, C+1) or (S+1,)
        if self.layout == "padded":
            bias = torch.zeros(seen.shape, device=self.device).masked_fill_(~seen, float("-inf"))
            bias = bias.repeat_interleave(self.q_heads // len(self.sink), 0)
        else:
            bias = self.segment.masked_fill(~seen, float("-inf"))
        return bias.unsqueeze(1).to(self.dtype)


class StaticLayer(CacheLayerMixin):
    """One layer's fixed-capacity K and V (see the module docstring); its row group is shared."""

    is_sliding = False
    is_compileable = True
    is_croppable = False

    def __init__(self, rows: _Rows, max_len: int) -> None:
        super().__init__()
        self.rows, self.max_len = rows, int(max_len)
        self.seen = 0  # tokens written (host side; a replayed graph's steps are counted by GraphDecoder)

    def lazy_initialization(
        self, key_states: torch.Tensor, value_states: torch.Tensor, q_heads: int = 0
    ) -> None:
        b, h, _, d = key_states.shape
        if h != len(self.rows.sink):
            raise StaticError(f"the allocation has {len(self.rows.sink)} KV heads per layer, the model {h}")
        self.rows.initialize(b, q_heads or h, key_states.device, key_states.dtype)
        self.dtype, self.device = key_states.dtype, key_states.device
        shape = self.rows.shape(b, d)
        self.keys = torch.zeros(shape, dtype=key_states.dtype, device=self.device)
        self.values = torch.zeros(shape, dtype=value_states.dtype, device=self.device)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states, kwargs.get("q_heads", 0))
        q_len, rows = key_states.shape[2], self.rows
        if q_len == 1 and self.seen > 0:
            rows.advance(self.seen)
            if rows.layout == "padded":
                index = rows.slot.view(1, -1, 1, 1).expand(key_states.shape[0], -1, 1, key_states.shape[-1])
                self.keys.scatter_(2, index, key_states)
                self.values.scatter_(2, index, value_states)
            else:
                self.keys.index_copy_(1, rows.slot, key_states[:, :, 0])
                self.values.index_copy_(1, rows.slot, value_states[:, :, 0])
            self.seen += 1
            return self._held()
        if self.seen:
            raise StaticError("the static cache takes one prefill, then one token per step; use the "
                              "evicting cache (static off) for chunked prompts")
        if q_len > self.max_len:
            raise StaticError(f"a prompt of {q_len} tokens exceeds the static cache's max_len {self.max_len}")
        if rows.src is None:  # the group's first layer
            rows.src = rows.prefill(q_len)
        self._write_prefill(key_states, value_states, rows.src)
        self.seen = q_len
        if q_len == 1:  # a one-token prompt: attended like a decode step
            return self._held()
        return key_states, value_states  # the prefill's queries attend over its own keys (masked)

    def _write_prefill(self, key_states: torch.Tensor, value_states: torch.Tensor, src: torch.Tensor) -> None:
        b, d = key_states.shape[0], key_states.shape[-1]
        if self.rows.layout == "padded":
            index = src.view(1, *src.shape, 1).expand(b, -1, -1, d)  # (B, Hkv, C+1, D)
            self.keys.copy_(key_states.gather(2, index))
            self.values.copy_(value_states.gather(2, index))
        else:
            self.keys.copy_(key_states.flatten(1, 2).index_select(1, src))
            self.values.copy_(value_states.flatten(1, 2).index_select(1, src))

    def _held(self) -> tuple[torch.Tensor, torch.Tensor]:
        """What a decode step attends over: (B, Hkv, C + 1, D), or the flat buffer as one head."""
        if self.rows.layout == "padded":
            return self.keys, self.values
        return self.keys.unsqueeze(1), self.values.unsqueeze(1)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return getattr(self.rows, "cols", 0) + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return self.max_len

    def reset(self) -> None:
        raise NotImplementedError("a static cache is laid out for one prompt: make a new one")

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
    with ``static=max_len``). ``layout``: "auto" (per-head tensors padded to the layer's largest head for
    uniform rows and for ragged rows below ``FLAT_FROM_BATCH`` sequences, the exact flat buffer from there
    on), "padded" or "flat"."""

    evicting = True  # its keys are not transformers' contiguous cache: the attention patch bypasses its mask
    reindex = False

    def __init__(
        self, sink: torch.Tensor, window: torch.Tensor, cap: torch.Tensor | None, max_len: int,
        q_heads: int, layout: str = "auto",
    ) -> None:
        if max_len < 1:
            raise StaticError(f"max_len must be >= 1, got {max_len}")
        if layout not in ("auto", "padded", "flat"):
            raise StaticError(f"layout must be auto, padded or flat, got {layout!r}")
        sink, window = sink.long().cpu(), window.long().cpu()
        capv = torch.zeros_like(sink) if cap is None else cap.long().cpu()
        capv = torch.where(capv > 0, capv, _FAR)
        groups: dict[tuple, _Rows] = {}
        layers = []
        for i in range(sink.shape[0]):
            key = (tuple(sink[i].tolist()), tuple(window[i].tolist()), tuple(capv[i].tolist()))
            if key not in groups:
                groups[key] = _Rows(sink[i], window[i], capv[i], max_len, layout)
            layers.append(StaticLayer(groups[key], max_len))
        super().__init__(layers=layers)
        self.max_len = int(max_len)
        self.prefix = False  # this forward is a prefill: its keys are a full prefix (flex may serve it)
        self.q_heads = int(q_heads)
        self.groups = list(groups.values())

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
        return self.layers[layer_idx].update(key_states, value_states, q_heads=self.q_heads)

    def positions(self, layer: int, q_len: int, k_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions of a prefill's queries and keys: 0..T-1 both (the decode step uses decode_bias)."""
        held = self.layers[layer]
        if q_len != k_len or held.seen != q_len:
            raise RuntimeError(f"layer {layer}: a static cache serves a prefill or one token per step")
        p = torch.arange(q_len, device=held.device)
        return p, p

    def decode_bias(self, layer: int, k_len: int, q_heads: int = 0) -> torch.Tensor:
        held = self.layers[layer]
        if k_len != held.rows.cols:
            raise RuntimeError(f"layer {layer}: attention got {k_len} keys, the static cache holds "
                               f"{held.rows.cols}")
        return held.rows.bias  # this step's mask (Hq, 1, slots), built once for the row group (_Rows._mask)

    def advance(self, steps: int) -> None:
        """Count ``steps`` tokens written by replaying a captured step (the device counters moved already)."""
        for layer in self.layers:
            layer.seen += steps


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
        # capture runs a step's Python (host counters, the groups' memo) but no kernel: restore the former
        seen = [layer.seen for layer in self.cache.layers]
        steps = [rows.step for rows in self.cache.groups]
        try:
            with torch.cuda.graph(graph):
                self._logits = self._forward(self._ids, self._pos)  # recorded, not run
        except Exception as err:  # noqa: BLE001 - anything capture refuses: decode eagerly
            log.warning("CUDA graph capture failed (%s): decoding eagerly", str(err).splitlines()[0][:160])
            self.failed = True
            graph = None
        for layer, n in zip(self.cache.layers, seen, strict=True):
            layer.seen = n
        for rows, n in zip(self.cache.groups, steps, strict=True):
            rows.step = n
        if graph is None:
            torch.cuda.synchronize()
            return self._forward(self._ids, self._pos)
        self.graph, self.graphed = graph, True
        self.graph.replay()
        self.cache.advance(1)
        return self._logits
