"""The fair comparison: every configuration against StreamingLLM (family B) at the same Eff.Ctx.

The B rows of a sweep trace a frontier of PPL against Eff.Ctx. Between two B points PPL is interpolated
linearly in log Eff.Ctx (the study's reading: it gives 10.48 at 68 and 9.339 at 178.25 from its B rows);
outside the B range the nearest segment is extended and the row is flagged ``extrapolated``. The interval
of ``delta = PPL - PPL_B(Eff.Ctx)`` is a paired bootstrap over the evaluator's chunks: every resample
recomputes the row's PPL and the B rows' PPLs on the same chunks, so the noise the rows share cancels.
"""

from __future__ import annotations

from typing import Any

import numpy as np

N_BOOT = 2000


def family(name: str) -> str:
    """The family letter of a policy name (A_window_64 -> A); 'full' and files keep their name."""
    head = name.split("_", 1)[0]
    return head if len(head) == 1 and head.isupper() else name


def frontier(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The B rows sorted by Eff.Ctx (one per Eff.Ctx)."""
    by_ctx = {r["eff_ctx"]: r for r in rows if family(r["name"]) == "B"}
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


def _boot_ppl(row: dict[str, Any], idx: np.ndarray) -> np.ndarray:
    nll = np.asarray(row["chunk_nll"])[idx].sum(-1)
    cnt = np.asarray(row["chunk_tokens"], dtype=float)[idx].sum(-1)
    return np.exp(nll / cnt)  # (N_BOOT,)


def equal_quality_ctx(ppl: np.ndarray, ctx: np.ndarray, front: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eff.Ctx where the frontier reaches ``ppl`` (vectorised over a leading bootstrap axis).

    ctx: (P,) increasing Eff.Ctx of the B rows; front: (..., P) their PPLs; ppl: (...,) targets.
    Log-linear inverse interpolation on the segment that brackets the target, else the nearest end segment.
    Returns (ctx (...,), extrapolated (...,) bool).
    """
    logc = np.log(ctx)
    best, worst = front[..., -1], front[..., 0]
    # segment index: first i with front[i + 1] <= ppl (the frontier falls with context)
    below = front[..., 1:] <= ppl[..., None]  # (..., P-1)
    i = np.where(below.any(-1), below.argmax(-1), len(ctx) - 2)
    i = np.where(ppl >= worst, 0, i)
    y0 = np.take_along_axis(front, i[..., None], -1)[..., 0]
    y1 = np.take_along_axis(front, i[..., None] + 1, -1)[..., 0]
    f = (y0 - ppl) / (y0 - y1)
    return np.exp(logc[i] + f * (logc[i + 1] - logc[i])), (ppl < best) | (ppl > worst)


def saving_factor(row: dict[str, Any], front: list[dict[str, Any]]) -> tuple[float, bool]:
    """KV saving at equal quality: the B Eff.Ctx that reaches the row's PPL, divided by the row's Eff.Ctx."""
    xs = np.asarray([b["eff_ctx"] for b in front], dtype=float)
    c, extra = equal_quality_ctx(np.asarray(row["ppl"]), xs, np.asarray([b["ppl"] for b in front]))
    return float(c) / row["eff_ctx"], bool(extra)


def compare(row: dict[str, Any], front: list[dict[str, Any]], seed: int = 0) -> dict[str, Any]:
    """PPL of ``row`` minus the B frontier's PPL at the row's Eff.Ctx, with a paired 95% interval."""
    xs = np.asarray([b["eff_ctx"] for b in front], dtype=float)
    ref, extra = interpolate(row["eff_ctx"], list(xs), [b["ppl"] for b in front])
    i, f, _ = _segment(row["eff_ctx"], xs)
    out = {
        "name": row["name"],
        "eff_ctx": row["eff_ctx"],
        "ppl": row["ppl"],
        "b_ppl": ref,
        "delta": row["ppl"] - ref,
        "ratio": row["ppl"] / ref,
        "saving": saving_factor(row, front)[0],
        "extrapolated": extra,
        "delta_lo": float("nan"),
        "delta_hi": float("nan"),
    }
    pair = (front[i], front[i + 1])
    if all(b["chunk_tokens"] == row["chunk_tokens"] for b in pair):
        rng = np.random.default_rng(seed)
        idx = rng.integers(0, len(row["chunk_tokens"]), size=(N_BOOT, len(row["chunk_tokens"])))
        boot_ref = (1 - f) * _boot_ppl(pair[0], idx) + f * _boot_ppl(pair[1], idx)
        lo, hi = np.percentile(_boot_ppl(row, idx) - boot_ref, [2.5, 97.5])
        out["delta_lo"], out["delta_hi"] = float(lo), float(hi)
    return out


def verdict(cmp: dict[str, Any]) -> str:
    """better / worse when the 95% interval of delta excludes 0, else tie."""
    if np.isnan(cmp["delta_lo"]):
        return "n/a"
    if cmp["delta_hi"] < 0:
        return "better"
    return "worse" if cmp["delta_lo"] > 0 else "tie"


def compare_all(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One comparison per row (B rows included: their delta is 0 by construction)."""
    front = frontier(rows)
    if len(front) < 2:
        return []
    return [{**compare(r, front), "family": family(r["name"]), "acc": r["acc"]} for r in rows]
