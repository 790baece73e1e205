"""Streaming evaluation: a long token stream fed through the real evicting cache, StreamingLLM's protocol.

Every token is predicted from what the cache still holds: the model never re-reads an evicted token. The
stream goes in ``chunk`` tokens per forward (``chunk=1`` is StreamingLLM's token-by-token protocol; the
per-head cache makes any chunking compute the same thing, which the tests check, and a larger chunk is
many times faster on CPU). Full attention (``allocation=None``) streams through transformers'
``DynamicCache``, which keeps everything.

``reindex=True`` applies StreamingLLM's position re-indexing (positions counted inside the cache), so a
head never sees a distance beyond ``sink + window - 1`` however long the stream; without it, distances to
the sink tokens grow with the stream and leave the model's training context.

Perplexity is reported for the whole stream and per segment of ``segment`` predicted tokens, so drift
along the stream shows.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from headkv.alloc.allocation import Allocation, applied, kv_bytes
from headkv.alloc.results import (
    append_row,
    done_keys,
    measurement_key,
    model_identity,
    tokens_digest,
    versions,
)
from headkv.models.kv_cache import kv_bytes_of
from headkv.models.loading import model_shape

log = logging.getLogger(__name__)


@dataclass
class StreamResult:
    name: str
    reindex: bool
    tokens: int  # predicted tokens (stream length - 1)
    chunk: int  # tokens per forward
    ppl: float
    acc: float  # next-token top-1 accuracy
    eff_ctx: float
    kv_bytes: int  # K and V bytes the cache held at the end of the stream (measured)
    kv_bytes_predicted: int  # the allocation's own figure for the same stream length
    kv_bytes_full: int  # full attention's figure for the same stream length
    wall_s: float
    segment: int  # predicted tokens per segment
    segment_ppl: list[float] = field(default_factory=list)
    segment_tokens: list[int] = field(default_factory=list)
    segment_nll: list[float] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def stream_nll(
    model: PreTrainedModel,
    allocation: Allocation | None,
    tokens: torch.Tensor,
    *,
    reindex: bool = False,
    chunk: int = 1,
    segment: int = 1024,
    name: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> StreamResult:
    """Perplexity of ``tokens`` (n,) streamed through the real cache of ``allocation`` (None = full)."""
    if tokens.dim() != 1 or tokens.numel() < 2:
        raise ValueError("a stream is a 1-D tensor of at least 2 tokens")
    if chunk < 1 or segment < 1:
        raise ValueError("chunk and segment must be >= 1")
    start = time.perf_counter()
    n = tokens.numel()
    ids = tokens.to(model.device).view(1, -1)
    nll = torch.zeros(n - 1, dtype=torch.float64)
    correct = 0
    with applied(model, allocation, evict=True, reindex=reindex) as cache:
        for lo in range(0, n - 1, chunk):
            hi = min(lo + chunk, n - 1)  # the last token is only a target
            logits = model(ids[:, lo:hi], cache=cache, use_cache=True).logits[0].float()  # (q, V)
            target = ids[0, lo + 1 : hi + 1]
            nll[lo:hi] = F.cross_entropy(logits, target, reduction="none").double().cpu()
            correct += int((logits.argmax(-1) == target).sum())
            if progress:
                progress(hi, n - 1)
    seen, shape = cache.get_seq_length(), model_shape(model)
    sums = [float(s.sum()) for s in nll.split(segment)]
    counts = [len(s) for s in nll.split(segment)]
    return StreamResult(
        name=name or (allocation.name if allocation is not None else "full"),
        reindex=reindex,
        tokens=n - 1,
        chunk=chunk,
        ppl=math.exp(float(nll.mean())),
        acc=correct / (n - 1),
        eff_ctx=allocation.eff_ctx() if allocation is not None else float(seen),
        kv_bytes=kv_bytes_of(cache),
        kv_bytes_predicted=kv_bytes(allocation, shape, seen, model.dtype),
        kv_bytes_full=kv_bytes(None, shape, seen, model.dtype),
        wall_s=time.perf_counter() - start,
        segment=segment,
        segment_ppl=[math.exp(s / c) for s, c in zip(sums, counts, strict=True)],
        segment_tokens=counts,
        segment_nll=sums,
    )


def run_streams(
    model: PreTrainedModel,
    entries: list[Any],
    stream: torch.Tensor,
    out: str | Path,
    settings: dict[str, Any],
    progress: Callable[[str, int, int], None] | None = None,
) -> tuple[list[StreamResult], list[str]]:
    """Stream ``stream`` through every entry's real cache, one results row each, resumable by measurement
    key; returns (new results, labels skipped as already measured)."""
    conditions = {"kind": "streaming", **model_identity(model), "tokens_digest": tokens_digest(stream),
                  "chunk": settings["chunk"], "segment": settings["segment"]}
    done = done_keys(out, "streaming")
    results, skipped = [], []
    for e in entries:
        reindex = bool(settings["reindex"]) and e.allocation is not None  # full: nothing to re-index
        key = measurement_key(e.allocation, {**conditions, "reindex": reindex})
        if key in done:
            skipped.append(e.label)
            continue
        res = stream_nll(model, e.allocation, stream, reindex=reindex, chunk=settings["chunk"],
                         segment=settings["segment"], name=e.label,
                         progress=(lambda i, n, label=e.label: progress(label, i, n)) if progress else None)
        results.append(res)
        append_row(out, {**settings, **conditions, "key": key, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                         **e.source, **res.to_dict(), "versions": versions()})
    return results, skipped


def stream_table(results: list[StreamResult], segment: int) -> list[str]:
    """Streaming results as printed lines: PPL, bytes held vs predicted vs full, PPL per segment."""
    lines = [f"{'allocation':28s} {'reindex':>7s} {'PPL':>8s} {'acc':>7s} {'KV held':>10s} "
             f"{'predicted':>10s} {'full':>10s}  PPL per {segment}-token segment"]
    for r in results:
        segs = " ".join(f"{p:.1f}" for p in r.segment_ppl)
        lines.append(f"{r.name:28s} {str(r.reindex):>7s} {r.ppl:8.3f} {100 * r.acc:6.2f}% {r.kv_bytes:10d} "
                     f"{r.kv_bytes_predicted:10d} {r.kv_bytes_full:10d}  {segs}")
    return lines
