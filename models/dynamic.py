"""Dynamic windows: each head's budget (an allocation's sink + window) filled by content -- the one definition
of the fill rule, and the evicting cache that runs it.

A :class:`Fill` (recent ``R``, chunk ``C``, decay ``d``) turns an allocation's head with (sink ``s``, window
``w``) into a head that holds, from every query on, at most ``s + w`` keys -- exactly what the static head
holds once the sequence is long -- chosen like this:

- its sinks, positions ``[0, s)``;
- the recent keys: a query at position ``t`` of chunk ``c = C * floor(t / C)`` sees positions
  ``[c - R + 1, t]`` (R to R + C - 1 keys: the recency floor, and the chunk so far);
- the middle: at each chunk start ``c > 0`` the keys the head held before it that are neither sinks nor
  recent for chunk ``c`` (positions ``s .. c - R``) are ranked by score (a tie: the older key first); query
  ``t`` of the chunk sees the first ``w - R - (t - c)`` of them -- each new token of the chunk evicts the
  lowest-ranked middle key still held, so the count stays ``s + w``.

A key's score is the attention its head gave it while it was held: each query adds its probability over the
keys it sees, averaged over the query heads that share the KV head; after each chunk start's choice every
score is multiplied by ``d`` (``d = 1``: H2O's accumulated attention; ``d = 0``: the last chunk's queries
only, an observation window as SnapKV's). A head whose window cannot hold the recent keys and a middle
(``w < R + C``), or on a layer with a native sliding window, keeps its static window (:mod:`models.window`).

The rule is causal and depends on the attention probabilities, so it runs chunk by chunk: :func:`attend` is
the one implementation of a forward's attention under it, for the masked evaluator (every key of the
sequence, nothing held before) and for :class:`FilledCache`'s multi-token forwards (its held keys, then the
new ones); the cache's one-token decode step (``FilledLayer._decode``) is the same rule without copying
the cache. FlexAttention cannot serve it: its block mask is fixed before the kernel runs, while chunk ``c``'s
mask needs the probabilities of every earlier chunk (a flex forward could only replay a choice already made
by a dense pass).

Bytes: the cache stores, per held key, K and V plus a float32 score, an int32 position and an int32 rank
(:data:`META_BYTES`), counted in ``Allocation.kv_bytes`` of a filled allocation.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, CacheLayerMixin

from headkv.models import window as win
from headkv.models.common import HeadkvError
from headkv.models.kv_cache import RESERVE, BatchRows

__all__ = ["Fill", "FillError", "FilledCache", "attend", "meta_bytes", "room"]

ROWS = 1024  # the masked forward computes the logits of this many queries at once (memory: rows x keys)
META_BYTES = 12  # per held key: its float32 score, int32 position and int32 rank


class FillError(HeadkvError):
    """A fill rule or a request that a dynamic allocation cannot serve, in one line."""


@dataclass(frozen=True)
class Fill:
    """How a head's budget is filled by content (see the module docstring)."""

    recent: int = 4  # R: the recency floor (the query's own key included)
    chunk: int = 8  # C: the middle is re-chosen once every C tokens
    decay: float = 0.5  # d: each chunk start, every score is multiplied by d after the ranking

    def __post_init__(self) -> None:
        for name in ("recent", "chunk"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise FillError(f"fill '{name}' must be a positive integer, got {v!r}")
        d = self.decay
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not (0.0 <= float(d) <= 1.0):
            raise FillError(f"fill 'decay' must be a number in [0, 1], got {d!r}")
        object.__setattr__(self, "decay", float(d))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: object) -> Fill:
        if not isinstance(d, dict) or set(d) - {"recent", "chunk", "decay"}:
            raise FillError("'fill' must be an object with keys recent, chunk, decay")
        return cls(**d)

    def label(self) -> str:
        return f"fill(R{self.recent},C{self.chunk},d{self.decay:g})"


def room(sink: torch.Tensor, window: torch.Tensor, cap: torch.Tensor | None, fill: Fill) -> torch.Tensor:
    """Each head's middle at a chunk start, ``w - R`` (0: the head keeps its static window: ``w < R + C``,
    or a native cap), broadcasting over sink/window."""
    m = torch.where(window >= fill.recent + fill.chunk, window - fill.recent, 0)
    m = torch.where(m >= 1, m, 0)
    if cap is not None:
        m = torch.where(cap > 0, 0, m)
    return m + 0 * sink


def meta_bytes(slots: int) -> int:
    """Bytes of the scores, positions and ranks a filled cache keeps beside K and V for ``slots`` keys."""
    return META_BYTES * int(slots)


# ---- the rule --------------------------------------------------------------------------------------------


def _rank(score: torch.Tensor, pos: torch.Tensor, candidate: torch.Tensor) -> torch.Tensor:
    """Each candidate's rank in its (sequence, head) row by score, highest first, a tie going to the older
    key; -1 for a key that is not a candidate. score, pos, candidate: (B, Hkv, K)."""
    by_pos = torch.argsort(torch.where(candidate, pos, torch.iinfo(pos.dtype).max), dim=-1, stable=True)
    s = torch.where(candidate, score, -math.inf).gather(-1, by_pos)
    order = by_pos.gather(-1, torch.argsort(s, dim=-1, descending=True, stable=True))
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(order.shape[-1], device=order.device)
                                            .expand_as(order))
    return torch.where(candidate, rank, -1)


def _choose(score: torch.Tensor, pos: torch.Tensor, candidate: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """The ``m`` (Hkv,) best-ranked candidates of each row (:func:`_rank`), (B, Hkv, K) bool."""
    rank = _rank(score, pos, candidate)
    return (rank >= 0) & (rank < m.view(1, -1, 1))


def _chunk_start(c: int, pos, held, score, rank, sink, m, fill: Fill):
    """Chunk start ``c``: rank the middle candidates (-1: not one) among the keys the last query held (the
    evictions of the chunk before included), evict those beyond ``m`` (w - R); the scores decay after the
    ranking. Returns (held, score, rank)."""
    held = held & ((m == 0).view(1, -1, 1) | (rank < _limit(c - 1, m, fill).view(1, -1, 1)))
    candidate = (m > 0).view(1, -1, 1) & held & (pos >= sink.view(1, -1, 1)) & (pos <= c - fill.recent)
    rank = _rank(score, pos, candidate)
    return held & (rank < m.view(1, -1, 1)), score * fill.decay, rank


def _limit(t: torch.Tensor | int, m: torch.Tensor, fill: Fill) -> torch.Tensor:
    """How many ranked middle keys query ``t`` sees: ``w - R - (t - c)``; broadcasts t against m."""
    return m - torch.remainder(torch.as_tensor(t, device=m.device), fill.chunk)


def _scores(query, key, scaling, softcap):
    """Attention logits (B, Hkv, r, Q, K) of query (B, Hq, Q, D) against key (B, Hkv, K, D)."""
    b, n_q, q_len, d = query.shape
    n_kv = key.shape[1]
    q = (query * scaling).view(b, n_kv, n_q // n_kv, q_len, d)
    s = torch.matmul(q, key.unsqueeze(2).transpose(-1, -2))
    return torch.tanh(s / softcap) * softcap if softcap is not None else s


def attend(query, key, value, pos, held, score, rank, t0: int, sink, window, cap, fill: Fill, scaling,
           softcap=None):
    """A forward's attention under the fill rule; returns (out (B, Q, Hq, D), held, score, rank).

    ``key``/``value`` (B, Hkv, K, D): the keys held before this forward (any order) followed by the Q new
    ones, at positions ``t0 .. t0 + Q - 1``; ``pos`` (B, Hkv, K) their positions (-1: an empty slot),
    ``held`` (B, Hkv, K) bool which of the earlier ones a head still holds (a new key is held from its own
    query on), ``score`` (B, Hkv, K) float32 their scores and ``rank`` (B, Hkv, K) their middle ranks of the
    last chunk start (-1: not ranked). sink, window, cap: the layer's (Hkv,) tensors. The returned state is
    what the head holds for the last query (the next query evicts by rank first, see :func:`_limit`)."""
    b, n_q, q_len, _ = query.shape
    n_kv, k_len = key.shape[1], key.shape[2]
    r = n_q // n_kv
    m = room(sink, window, cap, fill)
    dyn = (m > 0).view(1, -1, 1, 1)  # (1, Hkv, 1, 1)
    first_new = k_len - q_len
    held, score, rank = held.clone(), score.clone(), rank.clone()
    out = query.new_empty(b, n_kv, r, q_len, value.shape[-1])
    q_all = torch.arange(t0, t0 + q_len, device=query.device)
    limit = _limit(q_all.view(1, -1), m.view(-1, 1), fill).unsqueeze(-1)  # (Hkv, Q, 1)
    block = max(ROWS // fill.chunk, 1) * fill.chunk  # queries whose logits are computed at once
    a, b0 = t0, 0
    while a < t0 + q_len:
        if a % fill.chunk == 0 and a > 0:
            held, score, rank = _chunk_start(a, pos, held, score, rank, sink, m, fill)
        e = min(t0 + q_len, (a // fill.chunk + 1) * fill.chunk)  # this chunk's queries: a .. e - 1
        i, j = a - t0, e - t0
        if i == 0 or i - b0 >= block:  # the next block of queries: logits and static masks at once
            b0 = i
            b1 = min(q_len, i + block + (fill.chunk - a % fill.chunk if a % fill.chunk else 0))
            logits = _scores(query[:, :, b0:b1], key[..., : first_new + b1, :], scaling, softcap)
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # (B, Hkv, r, Q", K")
            static = win.allowed(q_all[b0:b1], pos[..., : first_new + b1], sink, window, cap)
        held[..., first_new + i : first_new + j] = True
        upto = first_new + j  # keys after these queries are never seen by them
        kp, rk = pos[..., :upto].unsqueeze(-2), rank[..., :upto].unsqueeze(-2)  # (B, Hkv, 1, K')
        mine = held[..., :upto].unsqueeze(-2) & (kp <= q_all[i:j].view(-1, 1)) & (rk < limit[:, i:j])
        seen = torch.where(dyn, mine, static[..., i - b0 : j - b0, :upto])  # (B, Hkv, Q', K')
        probs = logits[..., i - b0 : j - b0, :upto].masked_fill(~seen.unsqueeze(2), -math.inf).softmax(-1)
        out[..., i:j, :] = torch.matmul(probs.to(value.dtype), value[..., :upto, :].unsqueeze(2))
        score[..., :upto] += probs.sum(dim=(2, 3)) / r
        a = e
    last = t0 + q_len - 1
    mine = held & (rank < _limit(last, m, fill).view(1, -1, 1))
    static = win.allowed(torch.tensor([last], device=pos.device), pos, sink, window, cap)[..., 0, :]
    held = torch.where(dyn.squeeze(-1), mine, static) & (pos >= 0)
    return out.view(b, n_q, q_len, -1).transpose(1, 2).contiguous(), held, score, rank


# ---- the masked forward and the evicting cache -----------------------------------------------------------


class ContentMask:
    """Mask provider for ``models.attention.windowed`` whose mask depends on content: the patch hands it the
    whole attention call (``content = True``). Over a full cache (the evaluator) it runs :func:`attend` on the
    sequence's keys; over a :class:`FilledCache` the cache runs it on its held keys and the new ones."""

    content = True

    def __init__(self, sink: torch.Tensor, window: torch.Tensor, cap: torch.Tensor | None,
                 fill: Fill) -> None:
        self.sink, self.window, self.cap, self.fill = sink, window, cap, fill

    def attend(self, layer: int, query, key, value, scaling, softcap, source) -> torch.Tensor:
        if isinstance(source, FilledCache):
            return source.attend(layer, query, key, value, scaling, softcap)
        if key.shape[2] != query.shape[2]:
            raise FillError("a dynamic allocation's masked forward takes a whole sequence in one forward, "
                            "without a cache; generate through its evicting cache (evict=True)")
        b, n_kv, t = key.shape[:3]
        pos = torch.arange(t, device=key.device).expand(b, n_kv, t)
        held = torch.zeros(b, n_kv, t, dtype=torch.bool, device=key.device)
        score = torch.zeros(b, n_kv, t, dtype=torch.float32, device=key.device)
        rank = torch.full((b, n_kv, t), -1, dtype=torch.int32, device=key.device)
        cap = None if self.cap is None else self.cap[layer]
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        return attend(query, key, value, pos, held, score, rank, 0, self.sink[layer], self.window[layer], cap,
                      self.fill, scale, softcap)[0]


class FilledLayer(BatchRows, CacheLayerMixin):
    """One layer's held keys under the fill rule: every KV head's segment of one flat buffer (its size grows
    with the tokens seen, up to the head's sink + window), with each slot's position (-1: empty) and score."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, sink: torch.Tensor, window: torch.Tensor, cap: torch.Tensor | None,
                 fill: Fill) -> None:
        super().__init__()
        self.sink, self.window = sink.long(), window.long()
        self.cap = None if cap is None or not bool((cap > 0).any()) else cap.long()
        self.fill = fill
        self.m = room(self.sink, self.window, self.cap, fill)
        self.most = (self.sink + self.window).tolist()  # no head ever holds more
        self.sizes = [0] * len(self.most)  # each head's segment now
        self.any_dyn = bool((self.m > 0).any())
        self.seen = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, d = key_states.shape
        if h != len(self.most):
            raise FillError(f"the allocation has {len(self.most)} KV heads per layer, the model {h}")
        self.device = key_states.device
        for name in ("sink", "window", "m"):
            setattr(self, name, getattr(self, name).to(self.device))
        self.cap = None if self.cap is None else self.cap.to(self.device)
        self.keys = key_states.new_zeros(b, 0, d)
        self.values = value_states.new_zeros(b, 0, value_states.shape[-1])
        self.pos = torch.full((b, 0), -1, dtype=torch.int32, device=self.device)
        self.score = torch.zeros(b, 0, dtype=torch.float32, device=self.device)
        self.rank = torch.full((b, 0), -1, dtype=torch.int32, device=self.device)
        self._relayout(self.sizes)
        self.is_initialized = True

    # ---- layout ----------------------------------------------------------------------------------
    def _relayout(self, sizes: list[int]) -> None:
        """Segment sizes, the flat index of the padded view (Hkv, Kmax) and which of its entries are slots."""
        self.sizes = list(sizes)
        n = torch.tensor(sizes, device=self.device)
        self.offsets = torch.cumsum(n, 0) - n
        kmax = max(sizes)
        j = torch.arange(kmax, device=self.device).view(1, -1)
        self.valid = j < n.view(-1, 1)  # (Hkv, Kmax)
        self.index = self.offsets.view(-1, 1) + torch.minimum(j, (n - 1).clamp(min=0).view(-1, 1))
        self.owner = torch.repeat_interleave(torch.arange(len(sizes), device=self.device), n)  # (S,)
        self.m_of = self.m[self.owner]
        self.dyn_of = self.m_of > 0

    def padded(self):
        """keys, values (B, Hkv, Kmax, D); positions (-1: empty or no slot), scores, ranks (B, Hkv, Kmax)."""
        b, _, d = self.keys.shape
        flat = self.index.flatten()
        shape = (b, *self.index.shape)
        pos = torch.where(self.valid, self.pos[:, flat].view(shape).long(), -1)
        return (self.keys[:, flat].view(*shape, d), self.values[:, flat].view(*shape, self.values.shape[-1]),
                pos, self.score[:, flat].view(shape), self.rank[:, flat].view(shape))

    def _store(self, keys, values, pos, held, score, rank, sizes: list[int]) -> None:
        """Lay the held entries of a padded view (B, Hkv, K, ...) out in segments of ``sizes``."""
        if bool((held.sum(-1) > torch.tensor(sizes, device=held.device)).any()):
            raise RuntimeError("a head holds more keys than its segment: the fill rule was broken")
        kmax = max(max(sizes), 1)
        short = kmax - held.shape[-1]
        if short > 0:  # the view is shorter than the new segments: pad it with empty entries
            keys, values = F.pad(keys, (0, 0, 0, short)), F.pad(values, (0, 0, 0, short))
            pos, held = F.pad(pos, (0, short), value=-1), F.pad(held, (0, short))
            score, rank = F.pad(score, (0, short)), F.pad(rank, (0, short), value=-1)
        order = torch.argsort((~held).to(torch.int8), dim=-1, stable=True)[..., :kmax]  # held entries first
        keep = held.gather(-1, order)
        self._relayout(sizes)
        flat = (torch.arange(len(sizes), device=self.device).view(-1, 1) * kmax
                + torch.arange(kmax, device=self.device))[self.valid]  # (S,) into (Hkv * Kmax)
        b = keys.shape[0]

        def lay(x: torch.Tensor, empty=None) -> torch.Tensor:
            if x.dim() == 3:  # per entry: pos, score, rank
                return torch.where(keep, x.gather(-1, order), empty).reshape(b, -1)[:, flat]
            x = x.gather(2, order.unsqueeze(-1).expand(-1, -1, -1, x.shape[-1]))
            return x.reshape(b, -1, x.shape[-1])[:, flat]

        self.keys, self.values = lay(keys), lay(values)
        self.pos, self.score = lay(pos, -1).to(torch.int32), lay(score, 0.0)
        self.rank = lay(rank, -1).to(torch.int32)

    def _grow_to(self, tokens: int) -> list[int]:
        """Segment sizes that hold every head's keys after ``tokens`` tokens (a few reserved ahead)."""
        return [max(s, min(most, tokens + RESERVE)) if s < min(most, tokens) else s
                for s, most in zip(self.sizes, self.most, strict=True)]

    # ---- attention ---------------------------------------------------------------------------------
    def attend(self, query, key, value, scaling, softcap) -> torch.Tensor:
        if not self.is_initialized:
            self.lazy_initialization(key, value)
        if key.shape[0] != self.keys.shape[0]:
            raise FillError(f"the cache holds {self.keys.shape[0]} sequences, the batch {key.shape[0]}")
        t0, q_len = self.seen, key.shape[2]
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        if q_len == 1 and t0 > 0:
            return self._decode(query, key, value, scale, softcap)
        k0, v0, p0, s0, r0 = self.padded()
        b, n_kv = key.shape[:2]
        new_pos = torch.arange(t0, t0 + q_len, device=self.device).expand(b, n_kv, q_len)
        keys, values, pos = torch.cat([k0, key], 2), torch.cat([v0, value], 2), torch.cat([p0, new_pos], -1)
        out, held, score, rank = attend(
            query, keys, values, pos, torch.cat([p0 >= 0, torch.zeros_like(new_pos, dtype=torch.bool)], -1),
            torch.cat([s0, torch.zeros(new_pos.shape, device=self.device)], -1),
            torch.cat([r0, torch.full_like(new_pos, -1, dtype=torch.int32)], -1),
            t0, self.sink, self.window, self.cap, self.fill, scale, softcap)
        self.seen = t0 + q_len
        self._store(keys, values, pos, held, score, rank, self._grow_to(self.seen))
        return out

    def _decode(self, query, key, value, scale, softcap) -> torch.Tensor:
        """One token (position ``seen``): a chunk start's ranking or the eviction of the lowest-ranked middle
        key, the static heads' slide, the write, and attention over the flat buffer (every held key is
        seen), scores added; no copy of the cache."""
        t = self.seen
        if self.any_dyn and t % self.fill.chunk == 0:
            _, _, pos, score, rank = self.padded()
            held, score, rank = _chunk_start(t, pos, pos >= 0, score, rank, self.sink, self.m, self.fill)
            self.pos = self._unpad(torch.where(held, pos, -1)).to(torch.int32)
            self.score, self.rank = self._unpad(score), self._unpad(rank).to(torch.int32)
        p = self.pos.long()
        seen = torch.full((p.shape[0],), t + 1, device=self.device)  # with key t: what query t may see
        kept = win.keep(p, seen, self.sink, self.window, self.cap)  # (B, Hkv, S): every head's rule
        slide = ~kept.gather(1, self.owner.view(1, 1, -1).expand(p.shape[0], 1, -1)).squeeze(1)
        if self.any_dyn:  # a filled head: this token evicts the lowest-ranked middle key
            slide = torch.where(self.dyn_of, self.rank >= _limit(t, self.m_of, self.fill), slide)
        self.pos.masked_fill_(slide & (p >= 0), -1)
        self.seen = t + 1
        sizes = self._grow_to(self.seen)
        if sizes != self.sizes:
            k0, v0, p0, s0, r0 = self.padded()
            self._store(k0, v0, p0, p0 >= 0, s0, r0, sizes)
        free = self.valid & (self.pos[:, self.index] < 0)  # (B, Hkv, Kmax)
        dst = self.index.gather(1, free.to(torch.int8).argmax(-1).T).T  # (B, Hkv): each head's first free
        idx = dst.unsqueeze(-1)
        self.keys.scatter_(1, idx.expand(-1, -1, self.keys.shape[-1]), key[:, :, 0])
        self.values.scatter_(1, idx.expand(-1, -1, self.values.shape[-1]), value[:, :, 0])
        self.pos.scatter_(1, dst, torch.full_like(dst, t, dtype=torch.int32))
        self.score.scatter_(1, dst, torch.zeros_like(dst, dtype=torch.float32))
        self.rank.scatter_(1, dst, torch.full_like(dst, -1, dtype=torch.int32))
        b, n_q = query.shape[:2]
        r = n_q // len(self.sizes)
        logits = torch.matmul(query[:, :, 0] * scale, self.keys.transpose(1, 2))  # (B, Hq, S)
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        own = self.owner.view(1, -1) == torch.arange(n_q, device=self.device).view(-1, 1) // r  # (Hq, S)
        seen = own.unsqueeze(0) & (self.pos >= 0).unsqueeze(1)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        probs = logits.masked_fill(~seen, -math.inf).softmax(-1)
        self.score += probs.sum(1) / r
        out = torch.matmul(probs.to(self.values.dtype), self.values)  # (B, Hq, D)
        return out.unsqueeze(1)

    def _unpad(self, x: torch.Tensor) -> torch.Tensor:
        """A padded view (B, Hkv, Kmax) back to the flat slots (B, S)."""
        return x[:, self.valid]

    # ---- transformers' layer API -------------------------------------------------------------------
    def update(self, key_states, value_states, *args, **kwargs):
        return key_states, value_states  # the work happens in attend, which has the queries

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return sum(self.sizes) + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        cap = None if self.cap is None else self.cap.cpu()
        self.__init__(self.sink.cpu(), self.window.cpu(), cap, self.fill)

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("evicted tokens cannot be restored: the filled cache does not support crop")

    def _select(self, index: torch.Tensor) -> None:
        if self.is_initialized:
            index = index.to(self.device)
            for name in ("keys", "values", "pos", "score", "rank"):
                setattr(self, name, getattr(self, name).index_select(0, index))


class FilledCache(Cache):
    """transformers ``Cache`` for a filled (dynamic) allocation: per (layer, KV head) at most its sink +
    window keys, chosen by :mod:`models.dynamic`'s rule. Made by ``alloc.allocation.applied(evict=True)``."""

    evicting = True
    reindex = False
    prefix = False

    def __init__(self, sink: torch.Tensor, window: torch.Tensor, cap: torch.Tensor | None,
                 fill: Fill) -> None:
        super().__init__(layers=[FilledLayer(sink[i].cpu(), window[i].cpu(),
                                             None if cap is None else cap[i].cpu(), fill)
                                 for i in range(sink.shape[0])])
        self.fill = fill

    def attend(self, layer: int, query, key, value, scaling, softcap) -> torch.Tensor:
        return self.layers[layer].attend(query, key, value, scaling, softcap)

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        from headkv.models.attention import is_active_source

        if layer_idx == 0 and not is_active_source(self):
            raise RuntimeError("FilledCache must be used inside applied(model, allocation, evict=True)")
        return key_states, value_states

    def note_padding(self, attention_mask: torch.Tensor | None, q_len: int) -> None:
        if attention_mask is not None and not bool(attention_mask[:, -q_len:].bool().all()):
            raise FillError("a dynamic allocation's cache takes batches of equal-length prompts (no padding)")

    def positions(self, layer: int, q_len: int, k_len: int):
        raise NotImplementedError("the filled cache runs its own attention (models.dynamic.attend)")

    def decode_bias(self, layer: int, k_len: int, q_heads: int = 0):
        raise NotImplementedError("the filled cache runs its own attention (models.dynamic.attend)")

    # ---- measures ---------------------------------------------------------------------------------
    def bytes_held(self) -> int:
        """Bytes of the K and V entries held now, with their scores and positions (all layers, sequences)."""
        total = 0
        for layer in self.layers:
            if layer.is_initialized:
                n = int((layer.pos >= 0).sum())
                total += n * (layer.keys.shape[-1] + layer.values.shape[-1]) * layer.keys.element_size()
                total += meta_bytes(n)
        return total

    def kept_tokens(self) -> int:
        return sum(int((layer.pos >= 0).sum(-1).max()) for layer in self.layers if layer.is_initialized)


@torch.no_grad()
def kept_once(model, ids: torch.Tensor, sink: torch.Tensor, window: torch.Tensor, cap: torch.Tensor | None,
              fill: Fill) -> torch.Tensor:
    """The fill rule applied once, at the end of a full-attention prefill of ``ids`` (1, N): the compress-once
    protocol of the field's presses (bench/peers). Returns which context positions each head keeps, (layers,
    KV heads, N) bool.

    A key's score is the attention the context's queries gave it, averaged over the KV head's query heads,
    each query's chunk weighted as the streaming rule weighs it at a choice at N (``decay`` per chunk start
    since). A filled head keeps its sinks, the last ``R - 1`` keys (the next query completes its recency
    floor) and its highest-scored other keys up to ``sink + window`` in all; a static head what
    :func:`models.window.keep` holds after N tokens."""
    from headkv.models.attention import captured

    n = ids.shape[1]
    chunks = torch.arange(n, device=ids.device) // fill.chunk
    since = ((n - 1) // fill.chunk - chunks).double()  # chunk starts between a query and the choice at n
    weight = torch.pow(torch.tensor(fill.decay, dtype=torch.float64), since)
    scores: dict[int, torch.Tensor] = {}

    def score(layer: int, probs: torch.Tensor) -> None:  # (1, Hq, N, N)
        h = sink.shape[1]
        p = probs[0].double().view(h, -1, n, n).mean(1)  # (Hkv, N, N)
        scores[layer] = torch.einsum("q,hqk->hk", weight.to(p.device), p)

    with captured(model, score):
        model(ids, use_cache=False)
    pos = torch.arange(n, device=ids.device)
    kept = []
    for layer in range(sink.shape[0]):
        s, w = sink[layer].to(ids.device), window[layer].to(ids.device)
        c = None if cap is None else cap[layer].to(ids.device)
        static = win.keep(pos, n, s, w, c)  # (Hkv, N)
        dyn = room(s, w, c, fill) > 0
        candidate = (dyn.view(-1, 1) & (pos >= s.view(-1, 1)) & (pos <= n - fill.recent)).unsqueeze(0)
        chosen = _choose(scores[layer].unsqueeze(0), pos.expand_as(candidate), candidate,
                         w - fill.recent + 1)[0]
        mine = (pos < s.view(-1, 1)) | (pos > n - fill.recent) | chosen
        kept.append(torch.where(dyn.view(-1, 1), mine, static))
    return torch.stack(kept)
