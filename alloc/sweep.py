"""The study's ablation grid, run with the one evaluator, one JSON row per configuration, resumable.

A grid is a mapping from a policy-name template to the values of its placeholders, e.g.
``{"B_streaming_{C}": {"C": [64, 128]}, "full": None}``; :func:`expand` turns it into policy names.
Every row carries a ``sweep_key`` (a hash of model, corpus, split, tokens and block length) and the digest
of the allocation it measured: a rerun skips every configuration whose (name, allocation) is already in the
results file under the same key -- so a run that was interrupted (Ctrl-C or kill) and rerun ends with the same
rows as an uninterrupted one, none duplicated, and a new head profile reruns only the rows it changes.
Rows are appended whole (:func:`alloc.results.append_row`), so a kill loses at most the row in flight.
All allocations are built before the first evaluation: a bad name or profile fails before any output.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import string
import time
from pathlib import Path
from typing import Any, Callable

import torch

from alloc.allocation import AllocationError
from alloc.evaluate import evaluate
from alloc.frontier import family
from alloc.policies import PolicyContext, build
from alloc.results import append_row, read_rows, versions

log = logging.getLogger(__name__)


def expand(grid: dict[str, dict[str, list] | None]) -> list[str]:
    """Policy names of a grid, in grid order, without duplicates."""
    names: list[str] = []
    for template, values in grid.items():
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f]
        values = values or {}
        missing = sorted(set(fields) - set(values))
        if missing:
            raise AllocationError(f"grid entry '{template}' gives no values for {', '.join(missing)}")
        lists = [values[f] if isinstance(values[f], list) else [values[f]] for f in fields]
        for combo in itertools.product(*lists):
            name = template.format(**dict(zip(fields, combo, strict=True)))
            if name not in names:
                names.append(name)
    return names


def sweep_key(info: dict[str, Any]) -> str:
    """Identity of a sweep's measurement conditions: rows with the same key are interchangeable."""
    fields = ("model", "corpus", "split", "tokens", "seq_len")
    body = json.dumps({k: info.get(k) for k in fields}, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()[:16]


def _digest(alloc: Any) -> str | None:
    return alloc.digest()[:16] if alloc is not None else None


def finished(out: str | Path, key: str) -> set[tuple[str, str | None]]:
    """(name, allocation digest) of the rows already measured under ``key`` in the results file."""
    rows = read_rows(out)
    return {
        (r["name"], r.get("allocation_sha256"))
        for r in rows
        if r.get("kind") == "sweep" and r.get("sweep_key") == key
    }


def plan(names: list[str], ctx: PolicyContext) -> list[tuple[str, Any]]:
    """(name, allocation or None for full attention) for every name; raises before anything runs."""
    return [(n, None if n == "full" else build(n, ctx)) for n in names]


def run_sweep(
    model: Any,
    blocks: torch.Tensor,
    names: list[str],
    ctx: PolicyContext,
    out: str | Path,
    info: dict[str, Any],
    progress: Callable[[str, int, int], None] | None = None,
    files: list[tuple[str, Any]] = (),
) -> list[dict[str, Any]]:
    """Evaluate every configuration not yet in ``out``; return all rows of this sweep (old and new), in
    ``names`` order. ``files`` are (name, Allocation) pairs loaded from allocation files (learned ones,
    say): they run after the named policies and join the same table."""
    jobs = plan(names, ctx) + list(files)
    names = [name for name, _ in jobs]
    key = sweep_key(info)
    done = finished(out, key)
    todo = [(name, alloc) for name, alloc in jobs if (name, _digest(alloc)) not in done]
    if len(todo) < len(jobs):
        log.info("resuming: %d of %d configurations already in %s", len(jobs) - len(todo), len(jobs), out)
    for name, alloc in todo:
        res = evaluate(
            model,
            alloc,
            blocks,
            name=name,
            progress=(lambda i, n, _name=name: progress(_name, i, n)) if progress else None,
        )
        append_row(
            out,
            {
                "kind": "sweep",
                "sweep_key": key,
                "family": family(name),
                "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "allocation_sha256": _digest(alloc),
                **info,
                **res.to_dict(),
                "versions": versions(),
            },
        )
    return sweep_rows(out, key, names)


def sweep_rows(
    out: str | Path, key: str | None = None, names: list[str] | None = None
) -> list[dict[str, Any]]:
    """The sweep rows of a results file: the given key (default: the last row's), latest row per name."""
    rows = [r for r in read_rows(out) if r.get("kind") == "sweep"]
    if not rows:
        return []
    key = key or rows[-1]["sweep_key"]
    latest = {r["name"]: r for r in rows if r["sweep_key"] == key}
    order = names if names is not None else list(latest)
    return [latest[n] for n in order if n in latest]
