"""The coverage curves: each allocation file's KV saving against its own sweep's StreamingLLM frontier, as a
function of coverage B/N (B: the row's Eff.Ctx, N: its sequence length), static vs dynamic, over several texts
and lengths. `headkv plot A.jsonl B.jsonl ...` draws them (``coverage.png``, :func:`alloc.plots.fig_coverage`)
and writes the numbers behind the figure (``coverage.json``, ``coverage.md``).

Each results file is one sweep: one text (its rows' ``corpus``) at one length (``seq_len``), with its own B
frontier (the ``B_streaming_{C}`` rows, two at least). The points are the rows of allocation files (a row
with a ``file``; not the shuffled / layer-mean controls, not B, not full attention): a row whose ``fill`` is
set is a DYNAMIC allocation (its per-head budgets filled by content; its Eff.Ctx already counts the bytes of
its scores and positions as keys), any other is STATIC. A point's saving is
:func:`alloc.frontier.saving_factor` on its file's frontier; an extrapolated one is a bound
(:func:`alloc.frontier.format_saving`: ``>x`` beyond the best B point, ``<x`` beyond the worst).

Rows "at one coverage" are those in one bin of a quarter octave of B/N (``round(4 log2(B/N))``: a learned
allocation exported at budget 64 and its dynamic version, whose metadata add a few per cent, stay in the
bin of 64/N). Every row is a point; per (file, kind, bin) the best saving is the one the curve connects.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Sequence

from headkv.alloc.frontier import format_saving, frontier, row_family, saving_bounds, saving_factor
from headkv.models.common import HeadkvError

__all__ = ["BINS_PER_OCTAVE", "CoverageError", "Sweep", "coverage_bin", "coverage_points", "coverage_table",
           "coverage_text", "kind_of", "read_sweep", "write_numbers"]

BINS_PER_OCTAVE = 4
KINDS = ("static", "dynamic")
IDENTITY = ("model", "corpus", "split", "seq_len", "tokens")  # what one sweep holds one of


class CoverageError(HeadkvError):
    """Results files that cannot make the coverage figure (the caller turns it into one error line)."""


@dataclass
class Sweep:
    """One results file: its text and length, its B frontier and its allocation-file rows."""

    path: str
    model: Any
    corpus: Any
    split: Any
    seq_len: int
    front: list[dict[str, Any]]
    rows: list[dict[str, Any]]
    label: str = field(default="")


def kind_of(row: dict[str, Any]) -> str:
    """``dynamic`` for a row with a fill (content-filled budgets), else ``static``."""
    return "dynamic" if row.get("fill") else "static"


def coverage_bin(coverage: float) -> int:
    """The quarter-octave bin of a coverage B/N: rows in one bin share a coverage."""
    return round(BINS_PER_OCTAVE * math.log2(coverage))


def coverage_text(coverage: float) -> str:
    """B/N as a fraction: ``1/64`` (exact powers of two and round reciprocals), else ``1/61.3``."""
    inv = 1 / coverage
    if abs(inv - round(inv)) < 1e-6 * inv:
        return str(Fraction(1, round(inv))) if round(inv) > 1 else "1"
    return f"1/{inv:.1f}" if inv >= 1 else f"{coverage:.3g}"


def _corpus_name(corpus: Any) -> str:
    """A corpus name as a legend shows it: a named corpus as it is, a path by its last part."""
    text = str(corpus)
    return Path(text).name or text if ("/" in text or "\\" in text) else text


def _usable(row: dict[str, Any]) -> bool:
    try:
        return all(math.isfinite(float(row[k])) and float(row[k]) > 0 for k in ("eff_ctx", "ppl", "seq_len"))
    except (KeyError, TypeError, ValueError):
        return False


def read_sweep(path: str | Path, rows: list[dict[str, Any]]) -> Sweep:
    """The coverage view of one results file's sweep rows, or a CoverageError saying what it lacks."""
    for key in IDENTITY:
        values = sorted({str(r.get(key)) for r in rows})
        if len(values) > 1:
            raise CoverageError(f"{path} holds sweep rows of several {key} values ({', '.join(values)}): the "
                                "coverage figure takes one sweep (one text at one length) per file")
    front = frontier([r for r in rows if _usable(r)])
    if len(front) < 2:
        raise CoverageError(f"{path} has {len(front)} B_streaming row(s): the coverage figure needs two or "
                            "more per file (its StreamingLLM frontier)")
    points = [r for r in rows if r.get("file") and not r.get("control")
              and row_family(r) not in ("B", "full") and _usable(r)]
    if not points:
        raise CoverageError(f"{path} holds no rows of allocation files (static or dynamic) to compare with "
                            "its B frontier: add them with `headkv sweep ... --allocation FILE`")
    first = rows[0]
    return Sweep(str(path), first.get("model"), first.get("corpus"), first.get("split"),
                 int(first["seq_len"]), front, points)


def coverage_points(sweeps: Sequence[Sweep]) -> list[dict[str, Any]]:
    """Every point of the figure, one per allocation row: its text, N, coverage, kind, saving (a bound when
    extrapolated) and whether its curve connects it (the best saving of its file, kind and coverage bin).
    Labels each sweep (its corpus; with the model or split where the files differ in them). A CoverageError
    when two files are the same text at the same length, or the rows hold fewer than two coverages."""
    seen: dict[tuple, str] = {}
    for s in sweeps:
        ident = (str(s.model), str(s.corpus), str(s.split), s.seq_len)
        if ident in seen:
            raise CoverageError(f"{seen[ident]} and {s.path} are both {_corpus_name(s.corpus)} at "
                                f"{s.seq_len} tokens: give one sweep file per text and length")
        seen[ident] = s.path
    several = {k: len({str(getattr(s, k)) for s in sweeps}) > 1 for k in ("model", "split")}
    short = {str(s.corpus): _corpus_name(s.corpus) for s in sweeps}
    clash = len(set(short.values())) < len(short)  # two corpus paths of one file name: say them whole
    for s in sweeps:
        s.label = ((str(s.corpus) if clash else short[str(s.corpus)]) + (f" ({s.model})" if several["model"]
                   else "") + (f" [{s.split}]" if several["split"] else ""))
    points = []
    for s in sweeps:
        for r in s.rows:
            saving, extra = saving_factor(r, s.front)
            lo, hi = saving_bounds(r, s.front)
            cov = float(r["eff_ctx"]) / s.seq_len
            points.append({
                "text": s.label, "corpus": s.corpus, "model": s.model, "seq_len": s.seq_len,
                "coverage": cov, "coverage_text": coverage_text(cov), "kind": kind_of(r), "name": r["name"],
                "eff_ctx": float(r["eff_ctx"]), "ppl": float(r["ppl"]), "saving": saving,
                "extrapolated": extra, "saving_text": format_saving(saving, extra, lo, hi), "best": False,
                "results": s.path, "allocation": r.get("file"), "fill": r.get("fill") or None,
            })
    bins = {coverage_bin(p["coverage"]) for p in points}
    if len(bins) < 2:
        shown = ", ".join(sorted({p["coverage_text"] for p in points})) or "none"
        raise CoverageError(f"the coverage figure needs allocation rows at two or more coverages B/N; these "
                            f"files hold them at one ({shown})")
    best: dict[tuple, dict[str, Any]] = {}
    for p in points:
        key = (p["results"], p["kind"], coverage_bin(p["coverage"]))
        if key not in best or p["saving"] > best[key]["saving"]:
            best[key] = p
    for p in best.values():
        p["best"] = True
    return sorted(points, key=lambda p: (p["seq_len"], p["text"], KINDS.index(p["kind"]), p["coverage"],
                                         -p["saving"]))


def coverage_table(points: Sequence[dict[str, Any]]) -> list[str]:
    """The numbers behind the figure as a markdown table (a ``*`` marks the points a curve connects)."""
    lines = ["| text | N | coverage B/N | kind | name | Eff.Ctx | PPL | saving | extrapolated |",
             "|---|---:|---:|---|---|---:|---:|---:|---|"]
    for p in points:
        lines.append(f"| {p['text']} | {p['seq_len']} | {p['coverage_text']} | {p['kind']} | "
                     f"{p['name']}{' *' if p['best'] else ''} | {p['eff_ctx']:.2f} | {p['ppl']:.3f} | "
                     f"{p['saving_text']} | {'yes (a bound)' if p['extrapolated'] else 'no'} |")
    return lines


def write_numbers(points: Sequence[dict[str, Any]], out: str | Path) -> list[Path]:
    """``coverage.json`` (the points) and ``coverage.md`` (:func:`coverage_table`) in ``out``, atomically."""
    from headkv.models.common import atomic_write

    out = Path(out)
    body = json.dumps(list(points), indent=1, default=str) + "\n"
    table = ("Saving factor at equal PPL against each file's StreamingLLM frontier, by coverage B/N "
             "(* = the point its curve connects; an extrapolated saving is a bound).\n\n"
             + "\n".join(coverage_table(points)) + "\n")
    return [atomic_write(out / "coverage.json", lambda tmp: tmp.write_text(body, encoding="utf-8")),
            atomic_write(out / "coverage.md", lambda tmp: tmp.write_text(table, encoding="utf-8"))]
