"""Learned allocations against the StreamingLLM frontier, from `headkv evaluate` rows on the same tokens.

    headkv evaluate --allocation runs/learned_b64/allocation.json --policy B_streaming_64 \\
        --policy B_streaming_128 --policy B_streaming_256 --out results/learned/evaluate_learned.jsonl
    python bench/learned_vs_streaming.py results/learned/evaluate_learned.jsonl \\
        --out results/learned/summary.json

For every learned row (policy ``learned_*``):
* its PPL with the evaluator's 95% interval;
* paired log-PPL differences against every B row (``alloc.evaluate.paired_log_ppl_diff``, same chunks);
* the KV saving factor at equal quality: the Eff.Ctx at which the StreamingLLM frontier (B rows, PPL
  linear in log Eff.Ctx between neighbours, the nearest segment extended outside) reaches the learned
  PPL, divided by the learned Eff.Ctx; with a 95% interval from the same chunk bootstrap (every resample
  recomputes all PPLs on the same chunks). ``extrapolated`` says when the learned PPL lies outside the
  frontier's range.
Rows must share tokens (``chunk_tokens``); the newest row of each name is used.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from headkv.alloc.allocation import Allocation  # noqa: E402
from headkv.alloc.evaluate import paired_log_ppl_diff  # noqa: E402
from headkv.alloc.frontier import format_saving, saving_bounds, saving_factor, saving_interval  # noqa: E402
from headkv.alloc.policies import family_of  # noqa: E402
from headkv.alloc.results import read_rows  # noqa: E402
from headkv.models.common import atomic_write  # noqa: E402


def summarize(rows: list[dict]) -> list[dict]:
    newest = {r["name"]: r for r in rows if r.get("kind") == "evaluate"}
    front = sorted((r for n, r in newest.items() if family_of(n) == "B"), key=lambda r: r["eff_ctx"])
    if len(front) < 2:
        raise SystemExit("need at least two B_streaming rows on the same tokens")
    out = []
    for name, row in sorted(newest.items()):
        if not name.startswith("learned_"):
            continue
        if any(b["chunk_tokens"] != row["chunk_tokens"] for b in front):
            raise SystemExit(f"{name} and the B rows are not on the same tokens")
        factor, extra = saving_factor(row, front)
        lo, hi = saving_interval(row, front)
        diffs = {}
        for b in front:
            d, dlo, dhi = paired_log_ppl_diff(row, b)
            diffs[b["name"]] = {"log_ppl_diff": d, "lo": dlo, "hi": dhi, "better": dhi < 0}
        out.append(
            {
                "name": name,
                "eff_ctx": row["eff_ctx"],
                "ppl": row["ppl"],
                "ppl_lo": row["ppl_lo"],
                "ppl_hi": row["ppl_hi"],
                "equal_quality_ctx": factor * row["eff_ctx"],
                "saving_factor": factor,
                "saving_text": format_saving(factor, extra, *saving_bounds(row, front)),
                "saving_factor_lo": float(lo),
                "saving_factor_hi": float(hi),
                "extrapolated": bool(extra),
                "paired_vs_B": diffs,
                "frontier": {b["name"]: [b["eff_ctx"], b["ppl"], b["ppl_lo"], b["ppl_hi"]] for b in front},
            }
        )
    return out


def relate_to_profile(allocation: Path, profile: Path) -> dict:
    """How learned windows line up with a head profile (``headkv classify``): windows per label, and the
    Spearman rank correlation of the windows with the profile's score, statistics and sensitivity."""
    from scipy.stats import spearmanr

    window = np.asarray(Allocation.load(allocation).window, dtype=float).ravel()
    prof = json.loads(profile.read_text())
    labels = np.asarray(prof["labels"]).ravel()
    per_label = {
        str(lab): {
            "heads": int((labels == lab).sum()),
            "median_window": float(np.median(window[labels == lab])),
            "mean_window": float(window[labels == lab].mean()),
        }
        for lab in sorted(set(labels.tolist()))
    }
    grids = {
        "score": prof["score"],
        "sensitivity": prof.get("sensitivity"),
        **{f"stat:{k}": v for k, v in prof.get("stats", {}).items()},
    }
    rho = {}
    for key, grid in grids.items():
        if grid is not None:
            r = spearmanr(window, np.asarray(grid, dtype=float).ravel())
            rho[key] = {"rho": float(r.statistic), "p": float(r.pvalue)}
    return {"allocation": str(allocation), "profile": str(profile), "per_label": per_label, "spearman": rho}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", type=Path, help="JSONL written by `headkv evaluate`")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--profile", type=Path, help="head profile JSON to relate the learned windows to")
    ap.add_argument(
        "--allocation", type=Path, action="append", default=[], help="learned allocation (repeat)"
    )
    args = ap.parse_args()
    summary = summarize(read_rows(args.results))
    for path in args.allocation if args.profile else []:
        rel = relate_to_profile(path, args.profile)
        name = Allocation.load(path).name
        for row in summary:
            if row["name"] == name:
                row["profile"] = rel
        print(
            f"{name} vs {args.profile}: "
            + ", ".join(
                f"{lab} {v['heads']} heads median window {v['median_window']:.0f}"
                for lab, v in rel["per_label"].items()
            )
        )
        print(
            "    Spearman rho of window with "
            + ", ".join(f"{k} {v['rho']:+.2f} (p {v['p']:.1g})" for k, v in rel["spearman"].items())
        )
    for s in summary:
        extra = " (extrapolated)" if s["extrapolated"] else ""
        print(
            f"{s['name']}: PPL {s['ppl']:.3f} [{s['ppl_lo']:.2f}, {s['ppl_hi']:.2f}] at Eff.Ctx "
            f"{s['eff_ctx']:.2f}; StreamingLLM needs {s['equal_quality_ctx']:.1f} -> saving "
            f"x{s['saving_factor']:.2f} [{s['saving_factor_lo']:.2f}, {s['saving_factor_hi']:.2f}]{extra}"
        )
        for b, d in s["paired_vs_B"].items():
            print(f"    vs {b:18s} log PPL diff {d['log_ppl_diff']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}]")
    if args.out:
        atomic_write(args.out, lambda tmp: tmp.write_text(json.dumps(summary, indent=1) + "\n"))


if __name__ == "__main__":
    main()
