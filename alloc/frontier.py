"""The fair comparison: every configuration against StreamingLLM (family B) at the same Eff.Ctx.

The B rows of a sweep trace a frontier of PPL against Eff.Ctx. Between two B points PPL is interpolated
linearly in log Eff.Ctx (the study's reading: it gives 10.48 at 68 and 9.339 at 178.25 from its B rows);
outside the B range the nearest segment is extended and the row is flagged ``extrapolated``. The interval
of ``delta = PPL - PPL_B(Eff.Ctx)`` is a paired bootstrap over whole token blocks (:mod:`alloc.bootstrap`):
every resample recomputes the row's PPL and the B rows' PPLs on the same blocks, so the noise the rows share
cancels.

The saving factor at equal quality inverts the frontier: the B Eff.Ctx that reaches a row's PPL, over the
row's Eff.Ctx. Measured on a few blocks the B points need not fall with context (a rising tail, equal
neighbours), so the inverse is taken on a monotone fit (:func:`monotone_fit`: isotonic regression,
non-increasing in Eff.Ctx, ties broken by a relative 1e-9 so the inverse is defined). A PPL outside the
fitted range gives a bound, flagged extrapolated and printed as one (:func:`format_saving`: ``>8.00x``
when the row beats the best B point, ``<1.00x`` when it is worse than the worst).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from headkv.alloc.bootstrap import (
    N_BOOT,
    PERCENTILES,
    block_sums,
    boot_ppl,
    paired_delta_interval,
    resample_index,
)
from headkv.alloc.bootstrap import same_tokens as _same_tokens
from headkv.alloc.policies import family_of

__all__ = [
    "N_BOOT",
    "compare",
    "compare_all",
    "comparison_table",
    "equal_quality_ctx",
    "family",
    "format_saving",
    "frontier",
    "interpolate",
    "monotone_fit",
    "row_family",
    "saving_bounds",
    "saving_factor",
    "saving_interval",
    "verdict",
]

TIE_EPS = 1e-9  # relative step that makes the monotone fit strictly decreasing

family = family_of  # the one name parser (alloc.policies.family_of), under the name alloc.sweep imports


def row_family(row: dict[str, Any]) -> str:
    """A row's family: the one it states, else the one its name parses to."""
    return row.get("family") or family_of(row["name"])


def frontier(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The B rows sorted by Eff.Ctx (one per Eff.Ctx)."""
    by_ctx = {r["eff_ctx"]: r for r in rows if row_family(r) == "B"}
    return [by_ctx[c] for c in sorted(by_ctx)]


def _segment(ctx: float, xs: np.ndarray) -> tuple[int, float, bool]:
    """Index i of the segment [xs[i], xs[i+1]] used at ``ctx`` and the weight of xs[i+1] (log scale)."""
    i = int(np.clip(np.searchsorted(xs, ctx) - 1, 0, len(xs) - 2))
    f = (np.log(ctx) - np.log(xs[i])) / (np.log(xs[i + 1]) - np.log(xs[i]))
    return i, float(f), bool(ctx < xs[0] or ctx > xs[-1])


def interpolate(ctx: float, xs: list[float], ys: list[float]) -> tuple[float, bool]:
    """PPL of the frontier (xs, ys) at ``ctx``, linear in log ctx; and whether it was extrapolated."""
    x = np.asarray(xs, dtype=float)
    if len(x) < 2:
        raise ValueError("the StreamingLLM frontier needs at least two B rows")
    i, f, extra = _segment(ctx, x)
    return float((1 - f) * ys[i] + f * ys[i + 1]), extra


def monotone_fit(front: np.ndarray) -> np.ndarray:
    """The least-squares non-increasing fit (isotonic regression) of PPLs ``front`` (..., P) ordered by
    increasing Eff.Ctx, made strictly decreasing by a relative ``TIE_EPS`` step at ties.

    Vectorised with the min-max formula fit_i = min_{j<=i} max_{k>=i} mean(y_j..y_k) (P is a handful of B
    rows, so the (..., P, P) means are cheap). A frontier that already falls is returned unchanged.
    """
    y = np.asarray(front, dtype=np.float64)
    p = y.shape[-1]
    s = np.concatenate([np.zeros(y.shape[:-1] + (1,)), np.cumsum(y, -1)], -1)  # (..., P+1)
    j, k = np.arange(p)[:, None], np.arange(p)[None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = (s[..., None, 1:] - s[..., :-1, None]) / (k - j + 1)  # mean[..., j, k] of y_j..y_k
    mean = np.where(k >= j, mean, -np.inf)
    suffix_max = np.flip(np.maximum.accumulate(np.flip(mean, -1), -1), -1)  # [..., j, i] = max_{k>=i}
    fit = np.where(k >= j, suffix_max, np.inf).min(-2)  # min over j <= i
    for i in range(1, p):  # strict decrease: a tie steps down by a relative TIE_EPS
        fit[..., i] = np.minimum(fit[..., i], fit[..., i - 1] * (1 - TIE_EPS))
    # a frontier that already falls is its own fit, exactly (the cumulative sums above round its values)
    return np.where(np.all(np.diff(y, axis=-1) < 0, axis=-1, keepdims=True), y, fit)


def equal_quality_ctx(ppl: Any, ctx: Any, front: Any) -> tuple[np.ndarray, np.ndarray]:
    """Eff.Ctx where the B frontier reaches ``ppl`` (vectorised over a leading bootstrap axis).

    ctx: (P,) increasing Eff.Ctx of the B rows; front: (..., P) their PPLs; ppl: (...,) targets (broadcast).
    The frontier is replaced by its :func:`monotone_fit`, then inverted log-linearly on the segment that
    brackets the target. A target better than the best fitted point gives ctx[-1] (a lower bound of the
    true value), one worse than the worst gives ctx[0] (an upper bound); both are flagged extrapolated.
    Returns (ctx (...,), extrapolated (...,) bool): finite and > 0 for any finite target, and non-increasing
    in the target.
    """
    xs = np.asarray(ctx, dtype=np.float64)
    if xs.ndim != 1 or len(xs) < 2:
        raise ValueError("the StreamingLLM frontier needs at least two B rows")
    if np.any(np.diff(xs) <= 0) or xs[0] <= 0:
        raise ValueError("the frontier's Eff.Ctx must be positive and increasing")
    fit = monotone_fit(np.asarray(front, dtype=np.float64))
    t = np.asarray(ppl, dtype=np.float64)
    batch = np.broadcast_shapes(t.shape, fit.shape[:-1])
    fit = np.broadcast_to(fit, batch + (len(xs),))
    t = np.broadcast_to(t, batch)
    i = np.minimum((fit[..., 1:] > t[..., None]).sum(-1), len(xs) - 2)  # fit[i] >= t >= fit[i + 1] inside
    y0 = np.take_along_axis(fit, i[..., None], -1)[..., 0]
    y1 = np.take_along_axis(fit, i[..., None] + 1, -1)[..., 0]
    f = np.clip((y0 - t) / (y0 - y1), 0.0, 1.0)  # y0 > y1 strictly
    inside = np.where(f >= 1, xs[i + 1], xs[i] * (xs[i + 1] / xs[i]) ** f)  # log-linear, exact at the ends
    worse, better = t > fit[..., 0], t < fit[..., -1]
    return np.where(worse, xs[0], np.where(better, xs[-1], inside)), worse | better


def saving_factor(row: dict[str, Any], front: list[dict[str, Any]]) -> tuple[float, bool]:
    """KV saving at equal quality: the B Eff.Ctx that reaches the row's PPL, divided by the row's Eff.Ctx;
    and whether it is extrapolated (then it is a bound: see :func:`saving_bounds`, :func:`format_saving`)."""
    xs = np.asarray([b["eff_ctx"] for b in front], dtype=float)
    c, extra = equal_quality_ctx(row["ppl"], xs, [b["ppl"] for b in front])
    return float(c) / row["eff_ctx"], bool(extra)


def saving_bounds(row: dict[str, Any], front: list[dict[str, Any]]) -> tuple[float, float]:
    """The range of saving factors the measured B frontier can state for ``row``: (min B Eff.Ctx, max B
    Eff.Ctx) / the row's Eff.Ctx."""
    xs = [b["eff_ctx"] for b in front]
    return min(xs) / row["eff_ctx"], max(xs) / row["eff_ctx"]


def format_saving(value: float, extrapolated: bool, front_lo: float, front_hi: float) -> str:
    """A saving factor for a table: ``2.35x``; an extrapolated one as the bound it is (``>8.00x`` beyond the
    best B point, ``<1.00x`` beyond the worst; front_lo, front_hi from :func:`saving_bounds`); ``n/a`` for
    nan."""
    if value is None or not math.isfinite(value):
        return "n/a"
    if not extrapolated:
        return f"{value:.2f}x"
    if abs(value - front_hi) <= abs(value - front_lo):
        return f">{front_hi:.2f}x"
    return f"<{front_lo:.2f}x"


def saving_interval(row: dict[str, Any], front: list[dict[str, Any]], seed: int = 0) -> tuple[float, float]:
    """95% interval of the saving factor: every resample of blocks recomputes the row's and the B rows' PPLs,
    refits the frontier and inverts it. (nan, nan) for a single block or rows on different tokens. Bounds
    from extrapolated resamples are kept as bounds (the interval is then censored at saving_bounds)."""
    if not _same_tokens(row, *front):
        return float("nan"), float("nan")
    n = len(block_sums(row)[0])
    if n < 2:
        return float("nan"), float("nan")
    idx = resample_index(n, seed)
    xs = np.asarray([b["eff_ctx"] for b in front], dtype=float)
    front_boot = np.stack([boot_ppl(b, idx) for b in front], -1)  # (N_BOOT, P)
    c, _ = equal_quality_ctx(boot_ppl(row, idx), xs, front_boot)
    lo, hi = np.percentile(c / row["eff_ctx"], PERCENTILES)
    return float(lo), float(hi)


def compare(row: dict[str, Any], front: list[dict[str, Any]], seed: int = 0) -> dict[str, Any]:
    """PPL of ``row`` minus the B frontier's PPL at the row's Eff.Ctx, with a paired 95% block-bootstrap
    interval (nan where it is undefined: one block, or rows on other tokens); and the saving factor."""
    xs = np.asarray([b["eff_ctx"] for b in front], dtype=float)
    ref, extra = interpolate(row["eff_ctx"], list(xs), [b["ppl"] for b in front])
    i, f, _ = _segment(row["eff_ctx"], xs)
    saving, saving_extra = saving_factor(row, front)
    lo_b, hi_b = saving_bounds(row, front)
    delta_lo, delta_hi = paired_delta_interval(row, (front[i], front[i + 1]), (1 - f, f), seed)
    return {
        "name": row["name"],
        "eff_ctx": row["eff_ctx"],
        "ppl": row["ppl"],
        "b_ppl": ref,
        "delta": row["ppl"] - ref,
        "ratio": row["ppl"] / ref,
        "saving": saving,
        "saving_extrapolated": saving_extra,
        "saving_text": format_saving(saving, saving_extra, lo_b, hi_b),
        "extrapolated": extra,
        "delta_lo": delta_lo,
        "delta_hi": delta_hi,
    }


def verdict(cmp: dict[str, Any]) -> str:
    """better / worse when the 95% interval of delta excludes 0, else tie; n/a without an interval."""
    if not (np.isfinite(cmp["delta_lo"]) and np.isfinite(cmp["delta_hi"])):
        return "n/a"
    if cmp["delta_hi"] < 0:
        return "better"
    return "worse" if cmp["delta_lo"] > 0 else "tie"


def compare_all(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One comparison per row (B rows included: their delta is 0 by construction); [] without two B rows."""
    front = frontier(rows)
    if len(front) < 2:
        return []
    return [
        {**compare(r, front), "family": row_family(r), "acc": r.get("acc", float("nan"))} for r in rows
    ]


def _interval_text(lo: float, hi: float, fmt: str) -> str:
    if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
        return "n/a"
    return f"[{lo:{fmt}}, {hi:{fmt}}]"


TABLE_HEADER = (
    f"{'configuration':24s} {'Eff.Ctx':>8s} {'PPL':>8s} {'95% CI':>17s} {'acc':>7s} "
    f"{'B@ctx':>8s} {'dPPL':>7s} {'95% CI of dPPL':>18s} {'saving':>6s}  verdict"
)


def comparison_table(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The sweep's comparison table as text lines: a header, then one line per row -- its PPL with its
    interval, the B frontier's PPL at its Eff.Ctx, dPPL with its paired interval, the saving at equal
    quality (bounds of extrapolated ones as ``>x`` / ``<x``), and a verdict. 'n/a' where an interval is
    undefined (a single block). Without two B rows the B columns read '-' and the verdict 'no B frontier'."""
    rows = list(rows)
    lines = [TABLE_HEADER]
    cmps = compare_all(rows)
    if not cmps:
        for r in rows:
            ci = _interval_text(r.get("ppl_lo"), r.get("ppl_hi"), ".2f")
            lines.append(
                f"{r['name']:24s} {r['eff_ctx']:8.2f} {r['ppl']:8.3f} {ci:>17s} "
                f"{100 * r.get('acc', float('nan')):6.2f}% {'-':>8s} {'-':>7s} {'-':>18s} {'-':>6s}  "
                "no B frontier"
            )
        return lines
    by_name = {r["name"]: r for r in rows}
    for c in cmps:
        r = by_name[c["name"]]
        ci = _interval_text(r.get("ppl_lo"), r.get("ppl_hi"), ".2f")
        is_b = c["family"] == "B"
        dci = "-" if is_b else _interval_text(c["delta_lo"], c["delta_hi"], "+.2f")
        tag = "frontier" if is_b else verdict(c) + (" (extrap.)" if c["extrapolated"] else "")
        saving = "-" if c["family"] == "full" else c["saving_text"]  # full attention saves nothing
        lines.append(
            f"{c['name']:24s} {c['eff_ctx']:8.2f} {c['ppl']:8.3f} {ci:>17s} {100 * c['acc']:6.2f}% "
            f"{c['b_ppl']:8.3f} {c['delta']:+7.3f} {dci:>18s} {saving:>6s}  {tag}"
        )
    return lines
