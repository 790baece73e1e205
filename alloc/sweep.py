"""The study's ablation grid, run with the one evaluator, one JSON row per configuration, resumable.

A grid is a mapping from a policy-name template to the values of its placeholders, e.g.
``{"B_streaming_{C}": {"C": [64, 128]}, "full": None}``; :func:`expand` turns it into policy names.
Every row carries its measurement key (:func:`alloc.results.measurement_key`: the allocation's content and
everything that changes the number): a rerun skips exactly the configurations already measured -- so a run
that was interrupted (Ctrl-C or kill) and rerun ends with the same rows as an uninterrupted one, none
duplicated; a new head profile reruns only the rows it changes; two files named alike never collide.
Rows are appended whole (:func:`alloc.results.append_row`), so a kill loses at most the row in flight.
All allocations are built before the first evaluation: a bad name or profile fails before any output.
"""

from __future__ import annotations

import itertools
import logging
import string
import time
from pathlib import Path
from typing import Any, Callable

import torch

from headkv.alloc.allocation import AllocationError
from headkv.alloc.evaluate import evaluate
from headkv.alloc.policies import Entry, family_of, unique_labels
from headkv.alloc.results import (
    ResultsError,
    append_row,
    measurement_key,
    model_identity,
    read_rows,
    tokens_digest,
    versions,
)

log = logging.getLogger(__name__)


def expand(grid: dict[str, dict[str, list] | None]) -> list[str]:
    """Policy names of a grid, in grid order, without duplicates. A template is a string whose ``{NAME}``
    fields its values (a mapping of NAME to a value or a list of values; null for none) fill; anything else
    is one error line."""
    names: list[str] = []
    for template, values in grid.items():
        if not isinstance(template, str) or not (values is None or isinstance(values, dict)):
            raise AllocationError(f"grid entry {template!r}: a policy-name template (a string) must map to "
                                  "its fields' values (a mapping, or null)")
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
            if not all(f.isidentifier() for f in fields):
                raise ValueError("a field must be a name, as in {W}")
            values = values or {}
            missing = sorted(set(fields) - set(values))
            if missing:
                raise AllocationError(f"grid entry '{template}' gives no values for {', '.join(missing)}")
            lists = [values[f] if isinstance(values[f], list) else [values[f]] for f in fields]
            for combo in itertools.product(*lists):
                name = template.format(**dict(zip(fields, combo, strict=True)))
                if name not in names:
                    names.append(name)
        except (ValueError, IndexError, KeyError, AttributeError) as e:
            if isinstance(e, AllocationError):
                raise
            raise AllocationError(f"grid entry {template!r} is not a template of {{NAME}} fields: "
                                  f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return names


def run_sweep(
    model: Any,
    blocks: torch.Tensor,
    entries: list[Entry],
    out: str | Path,
    info: dict[str, Any],
    progress: Callable[[str, int, int], None] | None = None,
    backend: str = "dense",
) -> list[dict[str, Any]]:
    """Evaluate every entry not yet in ``out`` (by measurement key); return this sweep's rows (old and new)
    in ``entries`` order, labelled as this run labels them."""
    conditions = {"kind": "sweep", **info, **model_identity(model), "tokens_digest": tokens_digest(blocks)}
    keys = [measurement_key(e.allocation, conditions) for e in entries]
    done = {r["key"]: r for r in read_rows(out) if r.get("kind") == "sweep" and "key" in r}
    origin = lambda r: r.get("policy") or r.get("file_sha256")  # noqa: E731 (a policy name or a file)
    named = {(r["key"], origin(r)) for r in read_rows(out) if r.get("kind") == "sweep" and "key" in r}
    if set(done) & set(keys):
        log.info("resuming: %d of %d already in %s", len(set(done) & set(keys)), len(keys), out)
    for e, key in zip(entries, keys, strict=True):
        if key in done:  # measured already; another policy of equal content gets a row of its own
            if (key, origin(e.source)) not in named:
                append_row(out, {**done[key], "name": e.label, "family": family_of(e.label), **e.source})
            continue
        res = evaluate(model, e.allocation, blocks, name=e.label, backend=backend,
                       progress=(lambda i, n, _name=e.label: progress(_name, i, n)) if progress else None)
        row = {"kind": "sweep", "key": key, "family": family_of(e.label),
               "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
               "allocation_sha256": e.allocation.digest()[:16] if e.allocation else None,
               **info, **e.source, **res.to_dict(), **model_identity(model), "versions": versions()}
        append_row(out, row)
        done[key] = row
    return [{**done[k], "name": e.label, "family": family_of(e.label)}
            for e, k in zip(entries, keys, strict=True)]


def sweep_rows(out: str | Path) -> list[dict[str, Any]]:
    """Every sweep row of a results file (the latest per measurement key and name), display labels unique."""
    rows = [r for r in read_rows(out) if r.get("kind") == "sweep"]
    for r in rows:
        lacking = [k for k in ("name", "eff_ctx", "ppl", "ppl_lo", "ppl_hi", "acc") if k not in r]
        if lacking:
            raise ResultsError(f"{out}: a sweep row lacks {', '.join(lacking)}")
    latest = {(r.get("key") or id(r), r["name"]): r for r in rows}
    rows = list(latest.values())
    labels = unique_labels([r["name"] for r in rows], [r.get("file") for r in rows])
    return [{**r, "name": lab} for r, lab in zip(rows, labels, strict=True)]
