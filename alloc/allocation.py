"""Allocation: per (layer, KV head) sink and window -- the value type every part of headkv meets at -- and
:func:`applied`, the one door through which an allocation reaches a model.

An allocation is frozen. It knows the model it was made for (``model_id``), its shape
(layers x KV heads), how many query heads share each KV head (GQA), and free-form metadata
(policy name, budget, source). Its JSON file format carries a format version so files stay readable.

An allocation bound to a model (``bound(native)``, done by the resolver and the one door) also knows each
layer's native sliding window (``native``, 0 = full attention; e.g. Gemma-3's 512 on 15 of 18 layers). The
keys a head really has are its (sink, window) within that cap (:mod:`models.window`), and every measure
counts those:
- ``eff_ctx``: the study's Eff.Ctx, the mean over heads of the keys a head sees once the sequence is long
  (sink + window; min(window, cap) on a natively sliding layer, whose sinks fall out of the cap);
- ``realized_context(T)``: mean over heads and positions t < T of the keys query t sees;
- ``kv_bytes(T, head_dim, dtype)``: bytes of K and V the allocation keeps after T tokens.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from transformers import DynamicCache, PreTrainedModel

from headkv.models import window as win
from headkv.models.attention import FullCache, windowed
from headkv.models.common import HeadkvError, atomic_write, load_json, printable
from headkv.models.dynamic import ContentMask, Fill, FilledCache, FillError, meta_bytes, room
from headkv.models.families import check_family
from headkv.models.kv_cache import PerHeadCache
from headkv.models.loading import ModelShape, model_shape
from headkv.models.masks import HardMask
from headkv.models.static_cache import StaticHeadCache

FORMAT_VERSION = 1
MAX_KEYS = 10**12  # the largest sink or window: beyond any model's context, far below int64 when summed


class AllocationError(HeadkvError):
    """An allocation that is malformed or does not fit the model it is used with."""


def _int_grid(name: str, value: Any, shape: tuple[int, int] | None) -> tuple[tuple[int, ...], ...]:
    if (
        not isinstance(value, (list, tuple))
        or not value
        or not all(isinstance(r, (list, tuple)) for r in value)
    ):
        raise AllocationError(f"'{name}' must be a non-empty list of per-layer lists")
    rows = []
    for li, row in enumerate(value):
        for v in row:
            if isinstance(v, bool) or not (isinstance(v, int) or isinstance(v, float) and v.is_integer()):
                raise AllocationError(f"'{name}' layer {li} holds a non-integer value {v!r}")
            if v < 0:
                raise AllocationError(f"'{name}' layer {li} holds a negative value {v}")
            if v > MAX_KEYS:
                raise AllocationError(f"'{name}' layer {li} holds a value above {MAX_KEYS:.0e} keys")
        rows.append(tuple(int(v) for v in row))
    widths = {len(r) for r in rows}
    if len(widths) != 1:
        raise AllocationError(f"'{name}' rows have different lengths {sorted(widths)}")
    if shape is not None and (len(rows), widths.pop()) != tuple(shape):
        raise AllocationError(f"'{name}' has shape {len(rows)}x{len(rows[0])}, but the file says {shape}")
    return tuple(rows)


@dataclass(frozen=True)
class Allocation:
    """Per-(layer, KV head) sink and window counts for one model."""

    sink: tuple[tuple[int, ...], ...]
    window: tuple[tuple[int, ...], ...]
    model_id: str = ""
    q_per_kv: int = 1
    meta: dict[str, Any] = field(default_factory=dict, compare=False)
    native: tuple[int, ...] = ()  # each layer's native sliding window (0: none); () = no layer is sliding
    fill: Fill | None = None  # dynamic windows: each head's sink + window filled by content (models.dynamic)

    def __post_init__(self) -> None:
        sink = _int_grid("sink", self.sink, None)
        window = _int_grid("window", self.window, None)
        if (len(sink), len(sink[0])) != (len(window), len(window[0])):
            raise AllocationError("'sink' and 'window' have different shapes")
        if any(w < 1 for row in window for w in row):
            raise AllocationError("every window must be at least 1 (a head always sees its own token)")
        if not isinstance(self.q_per_kv, int) or self.q_per_kv < 1:
            raise AllocationError(f"q_per_kv must be a positive integer, got {self.q_per_kv!r}")
        native = tuple(self.native or ())
        if native and (len(native) != len(sink) or not all(isinstance(c, int) and c >= 0 for c in native)):
            raise AllocationError(
                f"'native' must hold one non-negative integer per layer, got {list(native)!r}"
            )
        object.__setattr__(self, "native", native if any(native) else ())
        if self.fill is not None and not isinstance(self.fill, Fill):
            raise AllocationError(f"'fill' must be a models.dynamic.Fill, got {type(self.fill).__name__}")
        object.__setattr__(self, "sink", sink)
        object.__setattr__(self, "window", window)

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def uniform(cls, shape: tuple[int, int], sink: int, window: int, **kw: Any) -> Allocation:
        n_layers, n_heads = shape
        return cls(((sink,) * n_heads,) * n_layers, ((window,) * n_heads,) * n_layers, **kw)

    @classmethod
    def from_tensors(cls, sink: torch.Tensor, window: torch.Tensor, **kw: Any) -> Allocation:
        return cls(tuple(map(tuple, sink.tolist())), tuple(map(tuple, window.tolist())), **kw)

    def with_meta(self, **meta: Any) -> Allocation:
        return Allocation(
            self.sink, self.window, self.model_id, self.q_per_kv, {**self.meta, **meta}, self.native,
            self.fill,
        )

    def filled(self, fill: Fill | None) -> Allocation:
        """The same budgets filled by content under ``fill`` (None: the static windows again); named
        ``NAME+fill(...)`` after the static allocation's name."""
        base = self.meta.get("static_name", self.name)
        name = base if fill is None else f"{base}+{fill.label()}"
        meta = {**self.meta, "static_name": base, "policy": name}
        return Allocation(self.sink, self.window, self.model_id, self.q_per_kv, meta, self.native, fill)

    def filled_heads(self) -> int:
        """How many heads the fill rule fills by content (the others keep their static window)."""
        if self.fill is None:
            return 0
        sink, window, cap = self.effective()
        return int((room(sink, window, cap, self.fill) > 0).sum())

    def bound(self, native: tuple[int, ...]) -> Allocation:
        """The same allocation on a model whose layers have these native sliding windows (0: none)."""
        if tuple(native or ()) == self.native:
            return self
        native = tuple(native or ())
        return Allocation(self.sink, self.window, self.model_id, self.q_per_kv, self.meta, native, self.fill)

    # ---- views ----------------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        return len(self.sink), len(self.sink[0])

    @property
    def name(self) -> str:
        name = self.meta.get("policy") or self.meta.get("name") or f"alloc-{self.digest()[:10]}"
        return printable(str(name))  # a name from a file: printed, never with raw escape codes

    def tensors(self, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """(sink, window) as long tensors of shape (layers, KV heads)."""
        return (
            torch.tensor(self.sink, dtype=torch.long, device=device),
            torch.tensor(self.window, dtype=torch.long, device=device),
        )

    def caps(self, device: torch.device | str = "cpu") -> torch.Tensor | None:
        """Native caps as a long tensor (layers, KV heads) (0: none), or None when no layer is sliding."""
        if not self.native:
            return None
        return torch.tensor(self.native, dtype=torch.long, device=device).view(-1, 1).expand(*self.shape)

    def effective(
        self, device: torch.device | str = "cpu"
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(sink, window, cap), nothing held in vain under the native caps (:func:`models.window.native`)."""
        cap = self.caps(device)
        return (*win.native(*self.tensors(device), cap), cap)

    # ---- measures -------------------------------------------------------------------------------
    def eff_ctx(self) -> float:
        """The study's Eff.Ctx: mean over heads of sink + window (within the native caps, see above)."""
        s, w = self.tensors()
        return float(win.steady_context(s, w, self.caps()).double().mean())

    def realized_context(self, seq_len: int) -> float:
        s, w = self.tensors()
        cap = self.caps()
        return win.realized_context(seq_len, s.flatten(), w.flatten(), None if cap is None else cap.flatten())

    def kv_tokens(self, seq_len: int) -> int:
        """Key/value slots held over all (layer, KV head) after ``seq_len`` tokens."""
        s, w = self.tensors()
        return int(win.kept_tokens(seq_len, s, w, self.caps()).sum())

    def kv_bytes(self, seq_len: int, head_dim: int, dtype: torch.dtype = torch.float16) -> int:
        """Bytes of K and V kept after ``seq_len`` tokens (batch 1); a filled allocation's cache also keeps
        a score and a position per key (:func:`models.dynamic.meta_bytes`), counted here. The most a filled
        head holds is its static count, so its keys are the static allocation's."""
        slots = self.kv_tokens(seq_len)
        return win.kv_bytes(slots, head_dim, dtype) + (0 if self.fill is None else meta_bytes(slots))

    def check_model(self, model_id: str, shape: tuple[int, int], q_per_kv: int) -> None:
        """Refuse an allocation made for another model, with one clear line."""
        if self.shape != tuple(shape) or self.q_per_kv != q_per_kv:
            raise AllocationError(
                f"allocation '{self.name}' has shape {self.shape[0]}x{self.shape[1]} KV heads "
                f"(q_per_kv {self.q_per_kv}) but model '{model_id}' has {shape[0]}x{shape[1]} "
                f"(q_per_kv {q_per_kv})"
            )

    # ---- JSON -----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "model_id": self.model_id,
            "shape": list(self.shape),
            "q_per_kv": self.q_per_kv,
            "meta": self.meta,
            **({"native": list(self.native)} if self.native else {}),
            **({"fill": self.fill.to_dict()} if self.fill is not None else {}),
            "sink": [list(r) for r in self.sink],
            "window": [list(r) for r in self.window],
        }

    def digest(self) -> str:
        fill = {} if self.fill is None else {"fill": self.fill.to_dict()}
        body = json.dumps({"sink": self.sink, "window": self.window, **fill}, sort_keys=True)
        return hashlib.sha256(body.encode()).hexdigest()

    def save(self, path: str | Path) -> Path:
        """Write atomically: a reader never sees a half-written file."""
        return atomic_write(path, lambda tmp: tmp.write_text(json.dumps(self.to_dict(), indent=1)))

    @classmethod
    def from_dict(cls, d: Any) -> Allocation:
        if not isinstance(d, dict):
            raise AllocationError("an allocation file must hold a JSON object")
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise AllocationError(
                f"unsupported allocation format_version {version!r} (expected {FORMAT_VERSION})"
            )
        missing = [k for k in ("shape", "sink", "window") if k not in d]
        if missing:
            raise AllocationError(f"allocation file lacks {', '.join(missing)}")
        shape = d["shape"]
        if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(x, int) for x in shape)):
            raise AllocationError(f"'shape' must be [layers, kv_heads], got {shape!r}")
        sink = _int_grid("sink", d["sink"], tuple(shape))
        window = _int_grid("window", d["window"], tuple(shape))
        native = d.get("native") or []
        if not isinstance(native, list) or any(isinstance(c, bool) or not isinstance(c, int) for c in native):
            raise AllocationError(f"'native' must be a list of per-layer integers, got {native!r}")
        if not isinstance(d.get("meta") or {}, dict):
            raise AllocationError(f"'meta' must be a JSON object, got {type(d['meta']).__name__}")
        try:
            fill = None if d.get("fill") is None else Fill.from_dict(d["fill"])
        except (FillError, TypeError) as e:
            raise AllocationError(f"bad 'fill': {e}") from None
        return cls(sink, window, str(d.get("model_id", "")), d.get("q_per_kv", 1), dict(d.get("meta") or {}),
                   tuple(native), fill)

    @classmethod
    def load(cls, path: str | Path) -> Allocation:
        data = load_json(path, "allocation file", AllocationError)
        try:
            return cls.from_dict(data)
        except AllocationError as e:
            raise AllocationError(f"{path}: {e}") from None


def kv_bytes(allocation: Allocation | None, shape: ModelShape, seq_len: int, dtype: torch.dtype) -> int:
    """K and V bytes held after ``seq_len`` tokens (batch 1) under ``allocation``; None = full attention."""
    if allocation is None:
        allocation = full_allocation(shape, seq_len)
    return allocation.bound(shape.native).kv_bytes(seq_len, shape.head_dim, dtype)


def full_allocation(shape: ModelShape, seq_len: int) -> Allocation:
    """Full attention over ``seq_len`` tokens as an allocation (every head: no sink, window T), bound to the
    model's native caps: what its measures report for the "full" row."""
    return Allocation.uniform(shape.shape, 0, max(seq_len, 1), q_per_kv=shape.q_per_kv, native=shape.native,
                              meta={"policy": "full"})


@contextmanager
def applied(
    model: PreTrainedModel, allocation: Allocation | None, *, evict: bool = False, reindex: bool = False,
    backend: str = "dense", static: int | None = None, layout: str = "auto",
) -> Iterator[Any]:
    """The one door: run ``model`` under ``allocation`` inside the block; everything is undone on exit.

    The allocation is checked against the model once, here. ``evict=False``: a masked forward over a full
    cache (the evaluator); yields None. ``evict=True``: yields the cache to pass to the model: the per-head
    evicting cache that holds only each head's sink + window (a ``DynamicCache`` for full attention).
    ``reindex=True``: StreamingLLM's position re-indexing (distances counted inside the cache).
    ``allocation=None`` is full attention: the model runs untouched. ``backend``: the masked forward's
    attention kernel, "dense" (the reference), "flex" (block-sparse) or "auto"
    (:func:`models.attention.windowed`), also the prefill's kernel of a static cache.
    ``static=max_len`` (with ``evict=True``): the fixed-capacity cache of :mod:`models.static_cache` for at
    most ``max_len`` tokens per sequence, whose decode step a CUDA graph can capture; with
    ``allocation=None`` it holds every token (full attention as a static cache); ``layout`` its storage
    ("auto", "padded" or "flat": :class:`models.static_cache.StaticHeadCache`).
    """
    if allocation is not None and allocation.fill is not None and (reindex or static is not None):
        raise AllocationError("a dynamic (filled) allocation runs masked or in its evicting cache: no "
                              "re-indexing, no static cache")
    if static is not None:
        if not evict or reindex:
            raise AllocationError("a static cache is an evicting cache without re-indexing (evict=True)")
        if allocation is None:
            shape = model_shape(model)
            allocation = Allocation.uniform(shape.shape, 0, int(static), model_id=shape.model_id,
                                            q_per_kv=shape.q_per_kv)
    if allocation is None:
        if reindex:
            raise AllocationError("full attention holds every token: there is nothing to re-index")
        yield DynamicCache(config=model.config) if evict else None
        return
    check_family(model.config)
    shape = model_shape(model)
    allocation.check_model(shape.model_id, shape.shape, shape.q_per_kv)
    sink, window, cap = allocation.bound(shape.native).effective(model.device)
    if allocation.fill is not None:
        cache = FilledCache(sink, window, cap, allocation.fill) if evict else None
        with windowed(model, ContentMask(sink, window, cap, allocation.fill), cache or FullCache(), backend):
            yield cache
        return
    if static is not None:
        cache = StaticHeadCache(sink, window, cap, int(static), shape.n_kv_heads * shape.q_per_kv, layout)
    else:
        cache = PerHeadCache(sink, window, cap, reindex=reindex) if evict else None
    with windowed(model, HardMask(sink, window, cap), cache if evict else FullCache(reindex), backend):
        yield cache
