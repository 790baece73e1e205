"""The study's five figures, plus the frontier view, drawn from a sweep's rows (PNG).

1. ``ppl_vs_ctx.png``: PPL vs Eff.Ctx for every family (A red, B green, G blue, I purple, K cyan, J orange)
2. ``sink_importance.png``: A (no sink) vs B (sink 4) at the same context, and the PPL increase without sinks
3. ``confidence_threshold.png``: G, PPL vs confidence threshold, one panel per base window, StreamingLLM as
   reference (both the B row of the base window and B interpolated at each G row's own Eff.Ctx)
4. ``best_configs.png``: the best configurations, each beside StreamingLLM at its own Eff.Ctx
5. ``inverse.png``: the inverse experiment (I family)
6. ``frontier.png``: PPL vs Eff.Ctx with the B frontier, and every configuration's distance from it
7. ``coverage.png``: the KV saving of allocation files (static vs dynamic) against coverage B/N, one colour
   per text, one panel per length, from one or several sweep files (:mod:`alloc.coverage`; its numbers in
   ``coverage.json`` and ``coverage.md``)

Also: ``search.png`` from a `headkv search` file (:func:`search_figure`), a passkey heatmap per allocation.

Any subset of rows can be drawn: a figure whose families are missing (no A, no G, fewer than two B rows
for the frontier, ...) is skipped with a log message, and ``ppl_vs_ctx.png`` is always drawn. Several
results files draw the coverage figure only, and must all be able to (else one error line, nothing
written). Every PNG is written atomically (:func:`models.common.atomic_write`).
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter  # noqa: E402

from headkv.alloc.coverage import (  # noqa: E402
    CoverageError,
    coverage_points,
    coverage_text,
    read_sweep,
    write_numbers,
)
from headkv.alloc.frontier import compare_all, frontier, row_family  # noqa: E402
from headkv.models.common import atomic_write  # noqa: E402

log = logging.getLogger(__name__)

PLAIN = FuncFormatter(lambda v, _: f"{v:g}")

COLORS = {
    "A": "tab:red",
    "B": "tab:green",
    "G": "tab:blue",
    "I": "tab:purple",
    "K": "tab:cyan",
    "J": "tab:orange",
}
NAMES = {
    "A": "A window-only",
    "B": "B StreamingLLM",
    "G": "G confidence",
    "I": "I inverse",
    "J": "J small-gathering",
    "K": "K uniform-aware",
}


def _save(fig: plt.Figure, path: Path) -> Path:
    """Write atomically, then close the figure."""
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=130, bbox_inches="tight"))
    finally:
        plt.close(fig)


def _family(rows: list[dict], fam: str) -> list[dict]:
    return sorted((r for r in rows if r["family"] == fam), key=lambda r: r["eff_ctx"])


def _full_line(ax: plt.Axes, rows: list[dict]) -> None:
    full = [r for r in rows if r["name"] == "full"]
    if full:
        ax.axhline(
            full[0]["ppl"], color="grey", ls="--", lw=1, label=f"full attention ({full[0]['ppl']:.2f})"
        )


def _b_curve(ax: plt.Axes, rows: list[dict], label: str = "B StreamingLLM") -> None:
    b = frontier(rows)
    ax.plot([r["eff_ctx"] for r in b], [r["ppl"] for r in b], "o-", color=COLORS["B"], label=label, zorder=3)


def fig_ppl_vs_ctx(rows: list[dict], ax: plt.Axes) -> None:
    others = sorted({r["family"] for r in rows} - set(COLORS) - {"full"})  # learned allocations, files
    extra = plt.get_cmap("tab10")
    for n, fam in enumerate([*COLORS, *others]):
        rs = _family(rows, fam)
        if rs:
            style = "o-" if fam in ("A", "B") else "o" if fam in COLORS else "*"
            ax.plot(
                [r["eff_ctx"] for r in rs],
                [r["ppl"] for r in rs],
                style,
                color=COLORS.get(fam, extra((n - len(COLORS)) % 10)),
                label=NAMES.get(fam, fam),
                alpha=0.85,
                **({} if fam in COLORS else {"ms": 10}),
            )
    _full_line(ax, rows)
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="Eff.Ctx (sink + mean window)",
        ylabel="perplexity",
        title="PPL vs effective context, all families",
    )


def fig_sink(rows: list[dict], axes: Any) -> None:
    a = {r["eff_ctx"]: r for r in _family(rows, "A")}
    b = {r["eff_ctx"]: r for r in _family(rows, "B")}
    both = sorted(set(a) & set(b))
    for rs, fam in ((a, "A"), (b, "B")):
        xs = sorted(rs)
        axes[0].errorbar(
            xs,
            [rs[x]["ppl"] for x in xs],
            yerr=_bars([rs[x] for x in xs], "ppl"),
            fmt="o-",
            color=COLORS[fam],
            label=NAMES[fam] + (" (sink 4)" if fam == "B" else " (no sink)"),
        )
    _full_line(axes[0], rows)
    axes[0].set(xscale="log", xlabel="Eff.Ctx", ylabel="perplexity", title="Sinks: A vs B")
    rise = [100 * (a[x]["ppl"] / b[x]["ppl"] - 1) for x in both]
    axes[1].bar([str(int(x)) for x in both], rise, color=COLORS["A"])
    for i, v in enumerate(rise):
        axes[1].annotate(f"{v:+.0f}%", (i, v), ha="center", va="bottom")
    axes[1].set(
        xlabel="Eff.Ctx", ylabel="PPL increase without sinks (%)", title="Cost of dropping the 4 sinks"
    )


def _bars(rs: list[dict], key: str) -> np.ndarray:
    """Asymmetric error bars (2, N) of the 95% interval ``key_lo``..``key_hi`` around ``key`` (zero where
    there is none). On a few chunks of tokens a bootstrap percentile interval of a ratio estimate need not
    contain the point estimate; the side it misses is drawn as zero rather than rejected by matplotlib."""
    lo = [r[key] - r[key + "_lo"] if np.isfinite(r[key + "_lo"]) else 0.0 for r in rs]
    hi = [r[key + "_hi"] - r[key] if np.isfinite(r[key + "_hi"]) else 0.0 for r in rs]
    return np.maximum(np.array([lo, hi], dtype=float), 0.0)


def _is_g_name(name: str) -> bool:
    try:
        _g_params(name)
    except ValueError:
        return False
    return True


def _g_params(name: str) -> tuple[float, int]:
    t, b = name.removeprefix("G_conf").split("_base")
    return float(t), int(b)


def fig_threshold(rows: list[dict], axes: Any, bases: list[int]) -> None:
    cmp = {c["name"]: c for c in compare_all(rows)}
    b_rows = {int(r["eff_ctx"]): r for r in _family(rows, "B")}
    for ax, base in zip(axes, bases, strict=True):
        rs = sorted(
            (r for r in _family(rows, "G") if _g_params(r["name"])[1] == base),
            key=lambda r: _g_params(r["name"])[0],
        )
        ts = [_g_params(r["name"])[0] for r in rs]
        ax.plot(ts, [r["ppl"] for r in rs], "o-", color=COLORS["G"], label="G (this base window)")
        ax.plot(
            ts,
            [cmp[r["name"]]["b_ppl"] for r in rs],
            "s--",
            color=COLORS["B"],
            label="StreamingLLM at the same Eff.Ctx",
        )
        ref = b_rows.get(base + 4) or b_rows.get(base)
        if ref:
            ax.axhline(ref["ppl"], color=COLORS["B"], lw=1, ls=":", label=f"{ref['name']} ({ref['ppl']:.2f})")
        twin = ax.twinx()
        twin.plot(ts, [r["eff_ctx"] for r in rs], "x:", color="grey")
        twin.set_ylabel("Eff.Ctx of the G row (grey x)", color="grey")
        ax.set(xlabel="confidence threshold t", ylabel="perplexity", title=f"G_conf{{t}}_base{base}")
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)


def fig_best(rows: list[dict], ax: plt.Axes, n: int = 12) -> None:
    cmps = [c for c in compare_all(rows) if c["family"] not in ("B", "full") and not c["extrapolated"]]
    best = sorted(cmps, key=lambda c: c["ratio"])[:n][::-1]
    y = np.arange(len(best))
    colors = [COLORS.get(c["family"], "grey") for c in best]
    ax.barh(y, [c["delta"] for c in best], color=colors, alpha=0.85)
    ax.errorbar([c["delta"] for c in best], y, xerr=_bars(best, "delta"), fmt="none", ecolor="black",
                capsize=3)
    ax.axvline(0, color=COLORS["B"], lw=1.5, label="StreamingLLM at the same Eff.Ctx")
    labels = [f"{c['name']}  (ctx {c['eff_ctx']:.1f}, PPL {c['ppl']:.2f} vs {c['b_ppl']:.2f})" for c in best]
    ax.set_yticks(y, labels, fontsize=7)
    ax.set(
        xlabel="PPL - StreamingLLM PPL at the same Eff.Ctx (paired 95% CI)",
        title=f"Best {len(best)} configurations against StreamingLLM at equal context",
    )


def fig_inverse(rows: list[dict], axes: Any) -> None:
    rs = _family(rows, "I")
    cmp = {c["name"]: c for c in compare_all(rows)}
    _b_curve(axes[0], rows)
    axes[0].plot(
        [r["eff_ctx"] for r in rs], [r["ppl"] for r in rs], "o", color=COLORS["I"], label="I inverse"
    )
    if rs:
        lo, hi = rs[0]["eff_ctx"], rs[-1]["eff_ctx"]
        axes[0].set_xlim(lo / 1.3, hi * 1.3)
        near = [r["ppl"] for r in rs] + [
            b["ppl"] for b in frontier(rows) if lo / 1.3 <= b["eff_ctx"] <= hi * 1.3
        ]
        axes[0].set_ylim(min(near) * 0.98, max(near) * 1.02)
    axes[0].set(xscale="log", xlabel="Eff.Ctx", ylabel="perplexity", title="I family on the B frontier")
    cs = [cmp[r["name"]] for r in rs]
    x = np.arange(len(cs))
    axes[1].bar(x, [c["delta"] for c in cs], color=COLORS["I"], alpha=0.85)
    axes[1].errorbar(x, [c["delta"] for c in cs], yerr=_bars(cs, "delta"), fmt="none", ecolor="black",
                     capsize=3)
    axes[1].axhline(0, color=COLORS["B"], lw=1.5)
    axes[1].set_xticks(
        x,
        [c["name"].removeprefix("I_").replace("_", "\n") + f"\nctx {c['eff_ctx']:.0f}" for c in cs],
        fontsize=7,
    )
    axes[1].set(
        ylabel="PPL - B(Eff.Ctx)  (paired 95% CI)",
        title="Inverse experiment: long windows to positional heads",
    )


def fig_frontier(rows: list[dict], axes: Any) -> None:
    cmps = [c for c in compare_all(rows) if c["family"] != "B"]
    _b_curve(axes[0], rows, "B frontier (StreamingLLM)")
    shown = [c for c in cmps if c["family"] != "A"]  # A (no sink) is far off this scale: see sink_importance
    for c in cmps:
        axes[0].plot(c["eff_ctx"], c["ppl"], "o", color=COLORS.get(c["family"], "grey"), alpha=0.8)
    for c in shown:
        color = COLORS.get(c["family"], "grey")
        axes[1].errorbar(
            c["eff_ctx"],
            100 * (c["ratio"] - 1),
            yerr=100 * _bars([c], "delta") / c["b_ppl"],
            fmt="o",
            color=color,
            alpha=0.8,
            mfc="none" if c["extrapolated"] else color,
            capsize=2,
        )
    for fam in sorted({c["family"] for c in cmps}):
        axes[1].plot([], [], "o", color=COLORS.get(fam, "grey"), label=NAMES.get(fam, fam))
    axes[1].axhline(0, color=COLORS["B"], lw=1.5)
    worst_a = max((100 * (c["ratio"] - 1) for c in cmps if c["family"] == "A"), default=None)
    note = f"A (no sink) is off this scale: up to +{worst_a:.0f}%; " if worst_a is not None else ""
    axes[0].set(xscale="log", yscale="log", ylabel="perplexity", title="The frontier view")
    axes[1].set(xscale="log", xlabel="Eff.Ctx", ylabel="PPL vs B at the same Eff.Ctx (%, paired 95% CI)")
    if cmps:
        axes[1].legend(
            fontsize=7, ncol=3, title=note + "open marker: extrapolated beyond the B range", title_fontsize=7
        )


def _missing(rows: list[dict], needs: tuple[str, ...]) -> str | None:
    """What a figure that needs ``needs`` lacks in ``rows``, or None. A need is a family, "frontier" (two B
    rows) or "others" (a row that is neither B nor full attention)."""
    fams = {r["family"] for r in rows}
    have = {
        "frontier": (len(frontier(rows)) >= 2, "two B rows (the StreamingLLM frontier)"),
        "others": (bool(fams - {"B", "full"}), "a configuration other than B and full attention"),
    }
    lacking = [have[n][1] if n in have else f"{n} rows" for n in needs if not have.get(n, (n in fams,))[0]]
    return ", ".join(lacking) or None


def plot_all(rows: list[dict[str, Any]], out: str | Path) -> list[Path]:
    """Draw the six figures into ``out`` (those the rows' families allow); returns their paths."""
    out = Path(out)
    rows = [{**r, "family": row_family(r)} for r in rows]
    # a row that says G but is not named G_conf{t}_base{b} has no threshold: it is its own family here
    rows = [r if r["family"] != "G" or _is_g_name(r["name"]) else {**r, "family": r["name"]} for r in rows]
    bases = sorted({_g_params(r["name"])[1] for r in rows if r["family"] == "G"})
    figures: list[tuple[str, tuple, tuple[str, ...], Callable[[Any], None]]] = [
        ("ppl_vs_ctx", (1, 1, (8, 5.5)), (), lambda ax: fig_ppl_vs_ctx(rows, ax)),
        ("sink_importance", (1, 2, (12, 4.5)), ("A", "B"), lambda ax: fig_sink(rows, ax)),
        (
            "confidence_threshold",
            (1, max(len(bases), 1), (6 * max(len(bases), 1), 4.5)),
            ("G", "frontier"),
            lambda ax: fig_threshold(rows, np.atleast_1d(ax), bases),
        ),
        ("best_configs", (1, 1, (9, 6)), ("frontier", "others"), lambda ax: fig_best(rows, ax)),
        ("inverse", (1, 2, (13, 5)), ("I", "frontier"), lambda ax: fig_inverse(rows, ax)),
        ("frontier", (2, 1, (9, 8)), ("frontier",), lambda ax: fig_frontier(rows, ax)),
    ]
    paths = []
    for name, (nr, nc, size), needs, draw in figures:
        lacking = _missing(rows, needs)
        if lacking:
            log.info("skipping %s.png: it needs %s", name, lacking)
            continue
        fig, ax = plt.subplots(nr, nc, figsize=size, squeeze=True, layout="constrained")
        draw(ax)
        for a in np.atleast_1d(ax):
            a.grid(True, which="both", alpha=0.3)
            if a.get_yscale() == "log":  # plain numbers, not 9.8 x 10^1
                a.yaxis.set_major_formatter(PLAIN)
                a.yaxis.set_minor_formatter(PLAIN)
            if a.get_xscale() == "log":  # contexts are powers of two: tick them so
                a.xaxis.set_major_locator(LogLocator(base=2))
                a.xaxis.set_major_formatter(PLAIN)
                a.xaxis.set_minor_formatter(NullFormatter())
            if a.get_legend() is None and a.get_legend_handles_labels()[0]:
                a.legend(fontsize=8)
        paths.append(_save(fig, out / f"{name}.png"))
    return paths


def passkey_heatmaps(rows: Iterable[dict[str, Any]], out_dir: str | Path) -> list[Path]:
    """One PNG per allocation: exact-match accuracy over depth (rows) x length (columns).

    ``rows`` are results-file rows of ``"kind": "passkey"`` (other kinds are ignored); a later row for the
    same (allocation, length, depth) replaces an earlier one.
    """
    cells: dict[str, dict[tuple[int, float], float]] = {}
    for row in rows:
        if row.get("kind") == "passkey":
            cells.setdefault(str(row["allocation"]), {})[(int(row["length"]), float(row["depth"]))] = row[
                "accuracy"
            ]
    out_dir = Path(out_dir)
    paths = []
    for name, acc in sorted(cells.items()):
        lengths = sorted({n for n, _ in acc})
        depths = sorted({d for _, d in acc})
        grid = np.full((len(depths), len(lengths)), np.nan)
        for (n, d), a in acc.items():
            grid[depths.index(d), lengths.index(n)] = 100 * a
        fig, ax = plt.subplots(figsize=(1.2 * len(lengths) + 2.5, 0.55 * len(depths) + 1.8))
        im = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
        for (r, c), v in np.ndenumerate(grid):
            if not np.isnan(v):
                ax.text(c, r, f"{v:.0f}", ha="center", va="center", fontsize=9)
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.2f}" for d in depths])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("needle depth (0 = start)")
        ax.set_title(f"passkey exact match (%): {name}", fontsize=10)
        fig.colorbar(im, ax=ax, label="accuracy %")
        fig.tight_layout()
        path = out_dir / f"passkey_{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}.png"
        paths.append(_save(fig, path))
    return paths


def window_heatmap(alloc: Any, path: str | Path, title: str = "") -> Path:
    """An allocation's windows (layer x KV head), log colour scale, each cell annotated with its window."""
    from matplotlib.colors import LogNorm

    _, w = alloc.tensors()
    n_layers, n_heads = w.shape
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * n_heads, 1.2 + 0.26 * n_layers))
    im = ax.imshow(w.numpy(), aspect="auto", cmap="viridis", norm=LogNorm(vmin=1, vmax=max(int(w.max()), 2)))
    for i in range(n_layers):
        for j in range(n_heads):
            v = int(w[i, j])
            colour = "w" if v < w.max() ** 0.5 else "k"
            ax.text(j, i, str(v), ha="center", va="center", fontsize=6, color=colour)
    ax.set(xlabel="KV head", ylabel="layer", title=title or alloc.name, xticks=range(n_heads))
    fig.colorbar(im, ax=ax, label="window (tokens)")
    fig.tight_layout()
    return _save(fig, Path(path))


def search_figure(state: dict[str, Any], path: str | Path) -> Path:
    """`headkv search`'s walk: PPL vs average budget of every probe, numbered in the order walked (green:
    meets the target, red: misses it), the target and full attention's PPL as lines, the chosen budget marked.
    Error bars: the paired 95% interval of each probe's increase over full attention (same blocks resampled),
    as PPL; the unpaired interval of a PPL is mostly the blocks' spread that every probe shares."""
    rows = sorted(state["curve"], key=lambda r: r["budget"])
    s, full, target = state.get("settings", {}), state["full"]["ppl"], state["target_ppl"]
    fig, ax = plt.subplots(figsize=(8, 5), layout="constrained")
    if rows:
        ax.plot([r["budget"] for r in rows], [r["ppl"] for r in rows], "-", color="grey", lw=1, zorder=1)
    for n, r in enumerate(state["curve"], 1):
        colour = "tab:green" if r["passes"] else "tab:red"
        lo, hi = r.get("increase_lo"), r.get("increase_hi")
        err = None if lo is None or hi is None else [[max(r["ppl"] - full * (1 + lo), 0)],
                                                     [max(full * (1 + hi) - r["ppl"], 0)]]
        ax.errorbar(r["budget"], r["ppl"], yerr=err, fmt="o", color=colour, capsize=3, zorder=3)
        ax.annotate(str(n), (r["budget"], r["ppl"]), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.axhline(full, color="grey", ls="--", lw=1, label=f"full attention ({full:.3f})")
    ax.axhline(target, color="tab:orange", ls=":", lw=1.5,
               label=f"target ({target:.3f}: +{s.get('max_ppl_increase', target / full - 1):.1%})")
    chosen = state.get("chosen")
    if chosen:
        ax.axvline(chosen["budget"], color="tab:blue", lw=1, alpha=0.6)
        ax.plot(chosen["budget"], chosen["ppl"], "*", ms=16, color="tab:blue", zorder=4,
                label=f"chosen: budget {chosen['budget']} (Eff.Ctx {chosen['eff_ctx']:.1f})")
    ax.plot([], [], "o", color="tab:green", label="meets the target")
    ax.plot([], [], "o", color="tab:red", label="misses it (bars: paired 95% interval vs full)")
    where = f"{s.get('model', '?')} on {s.get('corpus', '?')}, {s.get('seq_len', '?')} tokens"
    ax.set(xscale="log", xlabel="average budget (Eff.Ctx of the learned allocation)",
           ylabel="perplexity (eval split)", title=f"headkv search: {where} (probes numbered in order)")
    ax.xaxis.set_major_locator(LogLocator(base=2))
    ax.xaxis.set_major_formatter(PLAIN)
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, Path(path))


def fig_coverage(points: list[dict[str, Any]], axes: Any) -> None:
    """The coverage curves (:mod:`alloc.coverage`): one panel per sequence length N, one colour per text,
    solid = dynamic, dashed = static; every point a marker, the best per coverage bin connected; an
    extrapolated saving (a bound) an open marker; 1x (no saving over StreamingLLM) a grey line."""
    lengths = sorted({p["seq_len"] for p in points})
    texts = list(dict.fromkeys(p["text"] for p in sorted(points, key=lambda p: p["text"])))
    colour = {t: plt.get_cmap("tab10")(i % 10) for i, t in enumerate(texts)}
    style = {"dynamic": ("-", "o"), "static": ("--", "s")}
    for ax, n in zip(np.atleast_1d(axes), lengths, strict=True):
        here = [p for p in points if p["seq_len"] == n]
        for text in texts:
            for kind, (ls, marker) in style.items():
                ps = sorted((p for p in here if p["text"] == text and p["kind"] == kind),
                            key=lambda p: p["coverage"])
                line = [p for p in ps if p["best"]]
                if len(line) > 1:
                    ax.plot([p["coverage"] for p in line], [p["saving"] for p in line], ls,
                            color=colour[text], lw=1.6, alpha=0.9, zorder=2)
                for p in ps:
                    ax.plot(p["coverage"], p["saving"], marker, color=colour[text], zorder=3,
                            ms=7 if p["best"] else 5, alpha=1.0 if p["best"] else 0.55,
                            mfc="white" if p["extrapolated"] else colour[text], mew=1.4)
        ax.axhline(1.0, color="grey", lw=1, zorder=1)
        ax.set_title(f"N = {n} tokens", fontsize=10)
        ax.set_xlabel("coverage B/N (Eff.Ctx / sequence length)")
    xs = [p["coverage"] for p in points]
    left, right = min(xs) / 2**0.35, max(xs) * 2**0.35  # a third of an octave beyond the points
    ticks = [2.0**k for k in range(math.ceil(math.log2(left)), math.floor(math.log2(right)) + 1)]
    ys = [p["saving"] for p in points] + [1.0]
    for ax in np.atleast_1d(axes):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_xlim(left, right)
        ax.set_ylim(min(ys) / 1.25, max(ys) * 1.25)
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: coverage_text(v)))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.grid(True, which="major", alpha=0.3)
    first = np.atleast_1d(axes)[0]
    first.set_ylabel("KV saving at equal PPL vs StreamingLLM\n(B Eff.Ctx of equal PPL / Eff.Ctx)")
    handles = [Line2D([], [], color=colour[t], lw=2.5, label=t) for t in texts] + [
        Line2D([], [], color="black", ls="-", marker="o", label="dynamic (budgets filled by content)"),
        Line2D([], [], color="black", ls="--", marker="s", label="static (learned windows)"),
        Line2D([], [], color="black", ls="", marker="o", mfc="white",
               label="open: a bound (beyond the B frontier)"),
        Line2D([], [], color="grey", lw=1, label="1x: StreamingLLM"),
    ]
    first.figure.legend(handles=handles, fontsize=8, loc="outside lower center", ncol=min(len(handles), 4))


def _coverage(sweeps: list[tuple[str, list[dict[str, Any]]]]) -> list[dict[str, Any]]:
    """The coverage figure's points from (results file, sweep rows) pairs, or a CoverageError."""
    return coverage_points([read_sweep(path, rows) for path, rows in sweeps])


def draw_coverage(points: list[dict[str, Any]], out: str | Path) -> list[Path]:
    """``coverage.png`` (:func:`fig_coverage`) and the numbers behind it (``coverage.json``, ``.md``)."""
    n = len({p["seq_len"] for p in points})
    fig, axes = plt.subplots(1, n, figsize=(5.2 * n + 1, 5.4), sharex=True, sharey=True, squeeze=False,
                             layout="constrained")
    fig_coverage(points, axes[0])
    fig.suptitle("KV saving of allocation files over StreamingLLM at equal perplexity, by coverage",
                 fontsize=11)
    return [_save(fig, Path(out) / "coverage.png"), *write_numbers(points, out)]


def plot_results(results: str | Path | Sequence[str | Path], out: str | Path) -> list[Path]:
    """`headkv plot RESULTS [RESULTS ...]`. One file: the study's figures from a sweep's rows (and
    ``coverage.png`` when its allocation rows allow it), a passkey heatmap per allocation from `headkv
    passkey` rows, or the search figure (``search.png``) from a `headkv search` file (told apart by content).
    Several files: each one sweep (one text at one length), the coverage figure and its numbers only. One
    ConfigError line, and nothing written, when the files cannot make what they are asked for."""
    from headkv.alloc.config import ConfigError, check_output
    from headkv.alloc.results import read_rows, read_search
    from headkv.alloc.sweep import sweep_rows

    files = [results] if isinstance(results, (str, Path)) else list(results)
    if not files or any(not str(f) for f in files):
        raise ConfigError("give the results file: headkv plot RESULTS.jsonl [MORE.jsonl ...]")
    for f in files:
        if not Path(f).is_file():
            raise ConfigError(f"results file {f} does not exist")
    for i, f in enumerate(files):
        if any(Path(f).samefile(g) for g in files[:i]):
            raise ConfigError(f"results file {f} is given twice")
    check_output(out, directory=True)
    if len(files) > 1:
        sweeps = []
        for f in files:
            if read_search(f) is not None:
                raise ConfigError(f"{f} is a `headkv search` file: plot it alone (several files draw the "
                                  "coverage figure from sweeps)")
            rows = sweep_rows(f)
            if not rows:
                raise ConfigError(f"{f} holds no sweep rows: several files draw the coverage figure from "
                                  "`headkv sweep` files")
            sweeps.append((str(f), rows))
        try:
            points = _coverage(sweeps)
        except CoverageError as e:
            raise ConfigError(str(e)) from None
        return draw_coverage(points, out)
    results = files[0]
    state = read_search(results)
    if state is not None:
        return [search_figure(state, Path(out) / "search.png")]
    rows = sweep_rows(results)
    passkey_rows = [r for r in read_rows(results) if r.get("kind") == "passkey"]
    if not rows and not passkey_rows:
        raise ConfigError(f"{results} holds no sweep or passkey rows: run `headkv sweep` or `headkv passkey` "
                          "first")
    points = None
    if rows:
        try:
            points = _coverage([(str(results), rows)])
        except CoverageError as e:
            log.info("skipping coverage.png: %s", e)
    paths = plot_all(rows, out) if rows else []
    paths += passkey_heatmaps(passkey_rows, out) if passkey_rows else []
    return paths + (draw_coverage(points, out) if points else [])
