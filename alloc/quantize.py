"""Quantize a per-head allocation to at most K distinct (sink, window) classes, K = 1..4: a form serving
engines can load (they run a window per layer or per group of heads, not one per head).

Deterministic, no model needed: an exact 1-D dynamic program splits the heads' sorted contexts
(``sink + window``) into contiguous classes, each member at the class's arithmetic-mean context, minimising
the squared log ratio; rounding then repairs the budget, so the quantized Eff.Ctx never exceeds the
original and falls short by less than a token. The result is an ordinary Allocation whose metadata records
``classes``, ``class_of``, ``permutation``, ``quantized_from`` and ``quantize_loss``.

Design: docs/design.md, section 'K-class quantization'.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np

from headkv.alloc.allocation import Allocation, AllocationError

MAX_CLASSES = 4  # what serving engines can run: a few window groups per layer


def _segments(values: np.ndarray, counts: np.ndarray, k_max: int) -> list[tuple[int, int]]:
    """The least-loss split of sorted distinct ``values`` (with multiplicities ``counts``) into at most
    ``k_max`` contiguous classes: [(start, stop), ...] index ranges into ``values``."""
    m = len(values)
    x, lx = values.astype(np.float64), np.log(values.astype(np.float64))
    zero = np.zeros(1)
    n_ = np.concatenate([zero, np.cumsum(counts)])
    sx = np.concatenate([zero, np.cumsum(counts * x)])
    sl = np.concatenate([zero, np.cumsum(counts * lx)])
    sl2 = np.concatenate([zero, np.cumsum(counts * lx * lx)])

    def cost(i: np.ndarray, j: int) -> np.ndarray:
        """Loss of the classes values[i:j] for every start in ``i``: sum of (log mean - log c)^2."""
        n = n_[j] - n_[i]
        lm = np.log((sx[j] - sx[i]) / n)
        return np.maximum(n * lm * lm - 2 * lm * (sl[j] - sl[i]) + (sl2[j] - sl2[i]), 0.0)

    k_max = min(k_max, m)
    best = np.full((k_max + 1, m + 1), np.inf)  # best[k, j]: least loss of values[:j] in k classes
    arg = np.zeros((k_max + 1, m + 1), dtype=np.int64)
    best[1, 1:] = [float(cost(np.array([0]), j)[0]) for j in range(1, m + 1)]
    for k in range(2, k_max + 1):
        for j in range(k, m + 1):
            i = np.arange(k - 1, j)
            total = best[k - 1, i] + cost(i, j)
            at = int(np.argmin(total))  # the first minimum: deterministic
            best[k, j], arg[k, j] = total[at], i[at]
    k = 1 + int(np.argmin(best[1:, m]))  # the first minimum: the fewest classes among equals
    bounds, j = [], m
    while k > 1:
        i = int(arg[k, j])
        bounds.append((i, j))
        j, k = i, k - 1
    bounds.append((0, j))
    return bounds[::-1]


def _round(means: list[float], sizes: list[int], total: int) -> list[int]:
    """Integer class contexts, each the floor or ceiling of its mean, with the largest sum(size * context)
    not above ``total`` (ties: the least sum of size * (log context - log mean)^2)."""
    options = [sorted({math.floor(m), math.ceil(m)}) for m in means]
    best: tuple[Any, ...] | None = None
    for combo in itertools.product(*options):
        held = sum(n * c for n, c in zip(sizes, combo, strict=True))
        if held > total:
            continue
        loss = sum(n * math.log(c / m) ** 2 for n, c, m in zip(sizes, combo, means, strict=True))
        key = (-held, loss, combo)
        if best is None or key < best:
            best = key
    assert best is not None  # all floors never exceed the total
    return list(best[2])


def quantize(allocation: Allocation, classes: int) -> Allocation:
    """``allocation`` rounded to at most ``classes`` (1..4) distinct (sink, window) pairs under the same
    average budget, with the class of every head and a per-layer head permutation in its metadata."""
    if isinstance(classes, bool) or not isinstance(classes, int):
        raise AllocationError(f"classes must be an integer from 1 to {MAX_CLASSES}, got {classes!r}")
    if not 1 <= classes <= MAX_CLASSES:
        raise AllocationError(f"classes must be from 1 to {MAX_CLASSES}, got {classes}")
    n_layers, n_heads = allocation.shape
    n = n_layers * n_heads
    if classes > n:
        raise AllocationError(
            f"cannot make {classes} classes of allocation '{allocation.name}': it has only {n} heads "
            f"({n_layers}x{n_heads})"
        )
    heads = [(li, h) for li in range(n_layers) for h in range(n_heads)]
    sink = {(li, h): allocation.sink[li][h] for li, h in heads}
    window = {(li, h): allocation.window[li][h] for li, h in heads}
    pairs = sorted({(sink[x], window[x]) for x in heads}, key=lambda p: (p[0] + p[1], p[0]))

    if len(pairs) <= classes:  # already serving-shaped: unchanged
        table = pairs
        cls_of = {x: pairs.index((sink[x], window[x])) for x in heads}
        new_sink, new_window = allocation.sink, allocation.window
    else:
        ctx = {x: sink[x] + window[x] for x in heads}
        values, counts = np.unique(np.array([ctx[x] for x in heads]), return_counts=True)
        bounds = _segments(values, counts, classes)
        members = [[x for x in heads if values[i] <= ctx[x] <= values[j - 1]] for i, j in bounds]
        means = [sum(ctx[x] for x in group) / len(group) for group in members]
        contexts = _round(means, [len(g) for g in members], sum(ctx.values()))
        table = []
        for group, c in zip(members, contexts, strict=True):
            sinks = {sink[x] for x in group}
            s = sinks.pop() if len(sinks) == 1 else math.floor(sum(sink[x] for x in group) / len(group) + 0.5)
            s = min(s, c - 1)
            table.append((s, c - s))
        cls_of = {x: k for k, group in enumerate(members) for x in group}
        new_sink = tuple(tuple(table[cls_of[(li, h)]][0] for h in range(n_heads)) for li in range(n_layers))
        new_window = tuple(tuple(table[cls_of[(li, h)]][1] for h in range(n_heads)) for li in range(n_layers))

    loss = math.sqrt(
        sum(math.log(sum(table[cls_of[x]]) / (sink[x] + window[x])) ** 2 for x in heads) / n
    )
    meta = {
        **allocation.meta,
        "policy": f"{allocation.name}_k{classes}",
        "quantized_from": {
            "policy": allocation.name,
            "digest": allocation.digest(),
            "eff_ctx": allocation.eff_ctx(),
        },
        "classes": [[int(s), int(w)] for s, w in table],
        "class_of": [[cls_of[(li, h)] for h in range(n_heads)] for li in range(n_layers)],
        "permutation": [
            sorted(range(n_heads), key=lambda h, li=li: (cls_of[(li, h)], h)) for li in range(n_layers)
        ],
        "quantize_loss": loss,
    }
    return Allocation(new_sink, new_window, allocation.model_id, allocation.q_per_kv, meta)
