"""The block bootstrap, the one family parser, the monotone saving factor, the comparison table, and the
figures on any subset of a sweep's rows (synthetic rows, no model)."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch

from headkv.alloc import frontier as fr
from headkv.alloc.bootstrap import (
    N_BOOT,
    block_sums,
    boot_ppl,
    paired_delta_interval,
    paired_log_ppl_interval,
    ppl_interval,
    resample_index,
)
from headkv.alloc.evaluate import evaluate, paired_log_ppl_diff
from headkv.alloc.frontier import (
    compare,
    compare_all,
    comparison_table,
    equal_quality_ctx,
    format_saving,
    monotone_fit,
    saving_bounds,
    saving_factor,
    saving_interval,
    verdict,
)
from headkv.alloc.policies import family_of

CHUNK = 128


def _difficulty(n_blocks: int, chunks: int, seed: int = 0) -> np.ndarray:
    """Per-chunk NLL per token shared by all rows: a block effect (correlated chunks) plus chunk noise."""
    rng = np.random.default_rng(seed)
    block = rng.normal(3.5, 0.4, n_blocks)[:, None]
    return (block + rng.normal(0, 0.05, (n_blocks, chunks))).ravel()


def _row(name: str, ctx: float, shift: float, n_blocks: int = 6, chunks: int = 3, seed: int = 0) -> dict:
    per_tok = _difficulty(n_blocks, chunks, seed) + shift
    nll = per_tok * CHUNK
    cnt = [CHUNK] * len(nll)
    row = {
        "name": name,
        "family": family_of(name),
        "kind": "sweep",
        "eff_ctx": float(ctx),
        "ppl": float(np.exp(nll.sum() / sum(cnt))),
        "acc": 0.3,
        "chunk_nll": nll.tolist(),
        "chunk_tokens": cnt,
        "n_blocks": n_blocks,
    }
    row["ppl_lo"], row["ppl_hi"] = ppl_interval(row)
    return row


# ---- one family parser ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, fam",
    [
        ("A_window_64", "A"),
        ("B_streaming_128", "B"),
        ("G_conf0.55_base128", "G"),
        ("I_pos512_mix64_g128", "I"),
        ("J_pos8_mix8_g16", "J"),
        ("K_uniform60_aware", "K"),
        ("full", "full"),
        ("learned_b64", "learned_b64"),
        ("learned_b64@seed1", "learned_b64@seed1"),
        ("B_streaming_x", "B_streaming_x"),  # no registered pattern fully matches
        ("Z", "Z"),
    ],
)
def test_family_of_uses_the_registry(name, fam):
    assert family_of(name) == fam
    assert fr.family(name) == fam  # alloc.frontier.family is the same parser


def test_a_row_stating_its_family_wins():
    rows = [_row("B_streaming_8", 8, 0.3), _row("B_streaming_16", 16, 0.1), _row("custom", 32, 0.0)]
    assert [r["name"] for r in fr.frontier(rows)] == ["B_streaming_8", "B_streaming_16"]
    rows[2]["family"] = "B"
    assert [r["name"] for r in fr.frontier(rows)] == ["B_streaming_8", "B_streaming_16", "custom"]


# ---- the block bootstrap -------------------------------------------------------------------------------
def test_block_sums_group_consecutive_chunks():
    row = {"chunk_nll": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0], "chunk_tokens": [2, 2, 1, 2, 2, 1], "n_blocks": 2}
    nll, cnt = block_sums(row)
    np.testing.assert_allclose(nll, [6.0, 15.0])
    np.testing.assert_allclose(cnt, [5, 5])
    with pytest.raises(ValueError, match="do not split into 4 blocks"):
        block_sums({**row, "n_blocks": 4})
    with pytest.raises(ValueError, match="n_blocks"):
        block_sums({"chunk_nll": [1.0], "chunk_tokens": [1]})


def test_resample_index_is_fixed_and_over_blocks():
    idx = resample_index(5)
    assert idx.shape == (N_BOOT, 5) and idx.min() >= 0 and idx.max() == 4
    np.testing.assert_array_equal(idx, resample_index(5))


def test_whole_blocks_are_resampled():
    """The interval of a row equals the one of the same row folded into one chunk per block, and is wider
    than a chunk-level bootstrap would say when chunks of a block are correlated."""
    row = _row("B_streaming_8", 8, 0.0, n_blocks=6, chunks=4)
    nll, cnt = block_sums(row)
    folded = {"chunk_nll": nll, "chunk_tokens": cnt, "n_blocks": 6}
    assert ppl_interval(row) == ppl_interval(folded)
    chunk_level = ppl_interval({**row, "n_blocks": len(row["chunk_nll"])})
    assert ppl_interval(row)[1] - ppl_interval(row)[0] > 1.3 * (chunk_level[1] - chunk_level[0])
    lo, hi = ppl_interval(row)
    assert lo < row["ppl"] < hi
    boot = boot_ppl(row, resample_index(6))
    assert boot.shape == (N_BOOT,) and (lo, hi) == tuple(np.percentile(boot, [2.5, 97.5]))


def test_a_single_block_has_no_interval():
    one = _row("B_streaming_8", 8, 0.0, n_blocks=1, chunks=4)
    assert all(math.isnan(v) for v in ppl_interval(one))
    d, lo, hi = paired_log_ppl_interval(one, _row("A_window_8", 8, 0.2, n_blocks=1, chunks=4))
    assert d == pytest.approx(-0.2) and math.isnan(lo) and math.isnan(hi)
    assert all(math.isnan(v) for v in paired_delta_interval(one, [one, one], [0.5, 0.5]))


def test_paired_log_ppl_difference_over_blocks():
    a, b = _row("A_window_8", 8, 0.2), _row("B_streaming_8", 8, 0.0)
    assert paired_log_ppl_diff(a, a) == (0.0, 0.0, 0.0)
    d, lo, hi = paired_log_ppl_diff(a, b)
    assert d == pytest.approx(0.2) and lo == pytest.approx(0.2) and hi == pytest.approx(0.2)  # shared noise
    assert (d, lo, hi) == paired_log_ppl_interval(a, b)
    with pytest.raises(ValueError, match="same tokens"):
        paired_log_ppl_diff(a, _row("B_streaming_8", 8, 0.0, n_blocks=3))


def test_the_evaluator_interval_resamples_its_blocks(tiny):
    blocks = torch.randint(0, 97, (3, 40), generator=torch.Generator().manual_seed(1))
    res = evaluate(tiny, None, blocks, chunk=16).to_dict()  # 3 blocks of 39 targets: chunks 16, 16, 7
    assert len(res["chunk_tokens"]) == 9 and res["n_blocks"] == 3
    assert (res["ppl_lo"], res["ppl_hi"]) == ppl_interval(res) and res["ppl_lo"] < res["ppl"] < res["ppl_hi"]
    one = evaluate(tiny, None, blocks[:1], chunk=16)
    assert math.isnan(one.ppl_lo) and math.isnan(one.ppl_hi)  # one block: no interval, not a fake one


# ---- the monotone frontier and the saving factor ---------------------------------------------------------
XS = np.array([64.0, 128.0, 256.0, 512.0])
CLEAN = np.array([50.0, 45.0, 42.0, 40.0])
NOISY = {
    "rising tail": np.array([50.0, 45.0, 42.0, 43.0]),
    "equal neighbours": np.array([50.0, 45.0, 45.0, 40.0]),
    "single bump": np.array([50.0, 44.0, 46.0, 40.0]),
    "flat": np.array([45.0, 45.0, 45.0, 45.0]),
}


def test_clean_frontier_gives_the_exact_log_linear_inverse():
    np.testing.assert_array_equal(monotone_fit(CLEAN), CLEAN)
    c, extra = equal_quality_ctx(47.5, XS, CLEAN)
    assert float(c) == pytest.approx(64 * 2**0.5) and not extra
    c, _ = equal_quality_ctx(41.0, XS, CLEAN)
    assert float(c) == pytest.approx(256 * 2**0.5)
    for x, y in zip(XS, CLEAN, strict=True):  # every B point maps to itself
        assert float(equal_quality_ctx(y, XS, CLEAN)[0]) == pytest.approx(x)
    row = {"ppl": 45.0, "eff_ctx": 64.0}
    assert saving_factor(row, [{"eff_ctx": x, "ppl": y} for x, y in zip(XS, CLEAN, strict=True)]) == (
        pytest.approx(2.0),
        False,
    )


def test_monotone_fit_pools_violators():
    np.testing.assert_allclose(monotone_fit(NOISY["rising tail"]), [50, 45, 42.5, 42.5], rtol=1e-8)
    np.testing.assert_allclose(monotone_fit(NOISY["single bump"]), [50, 45, 45, 40], rtol=1e-8)
    for y in NOISY.values():
        assert np.all(np.diff(monotone_fit(y)) < 0)  # strictly decreasing: the inverse is defined


@pytest.mark.parametrize("case", list(NOISY))
def test_noisy_frontier_gives_a_finite_monotone_saving(case):
    front = NOISY[case]
    targets = np.linspace(35, 55, 401)
    c, extra = equal_quality_ctx(targets, XS, front)
    assert np.all(np.isfinite(c)) and np.all(c > 0)
    assert np.all(np.diff(c) <= 0)  # a worse target never needs more B context
    assert np.all((c >= XS[0]) & (c <= XS[-1]))
    fit = monotone_fit(front)
    inside = (targets >= fit[-1]) & (targets <= fit[0])
    assert not extra[inside].any() and extra[~inside].all()
    # a row between the B points at a small context saves more than 1x and less than the range allows
    rows = [{"eff_ctx": x, "ppl": y} for x, y in zip(XS, front, strict=True)]
    mid = {"name": "learned_b64", "eff_ctx": 64.0, "ppl": float(np.mean([front.min(), front.max()]))}
    s, ex = saving_factor(mid, rows)
    assert math.isfinite(s) and 1.0 <= s <= 8.0


def test_targets_beyond_the_frontier_are_bounds():
    rows = [{"eff_ctx": x, "ppl": y} for x, y in zip(XS, NOISY["rising tail"], strict=True)]
    best = {"name": "learned_b64", "eff_ctx": 64.0, "ppl": 41.0}  # better than every B point
    s, extra = saving_factor(best, rows)
    assert extra and s == pytest.approx(8.0)
    assert format_saving(s, extra, *saving_bounds(best, rows)) == ">8.00x"
    worst = {"name": "A_window_64", "eff_ctx": 64.0, "ppl": 80.0}  # worse than every B point
    s, extra = saving_factor(worst, rows)
    assert extra and s == pytest.approx(1.0)
    assert format_saving(s, extra, *saving_bounds(worst, rows)) == "<1.00x"
    assert format_saving(2.345, False, 1.0, 8.0) == "2.35x"
    assert format_saving(float("nan"), False, 1.0, 8.0) == "n/a"


def test_equal_quality_ctx_is_vectorised_over_a_bootstrap_axis():
    rng = np.random.default_rng(0)
    front = CLEAN * np.exp(rng.normal(0, 0.05, (500, 4)))  # noisy replicates, many with rising tails
    target = 44.0 * np.exp(rng.normal(0, 0.05, 500))
    c, extra = equal_quality_ctx(target, XS, front)
    assert c.shape == extra.shape == (500,)
    assert np.all(np.isfinite(c)) and np.all(c > 0)
    one = [equal_quality_ctx(t, XS, f) for t, f in zip(target[:20], front[:20], strict=True)]
    np.testing.assert_allclose(c[:20], [float(x) for x, _ in one])
    np.testing.assert_array_equal(extra[:20], [bool(e) for _, e in one])
    c2, _ = equal_quality_ctx(44.0, XS, front)  # one target, every replicate: broadcast
    assert c2.shape == (500,)


def test_saving_interval_and_comparison():
    front = [_row(f"B_streaming_{c}", c, s) for c, s in ((8, 0.3), (16, 0.15), (32, 0.05), (64, 0.0))]
    learned = _row("learned_b8", 8, 0.12)
    s, extra = saving_factor(learned, front)
    lo, hi = saving_interval(learned, front)
    assert not extra and lo <= s <= hi and 1 < lo
    cmp = compare(learned, front)
    assert cmp["delta"] < 0 and verdict(cmp) == "better" and cmp["saving_text"] == f"{s:.2f}x"
    one = [_row(r["name"], r["eff_ctx"], 0.1, n_blocks=1) for r in front]
    c1 = compare(_row("learned_b8", 8, 0.12, n_blocks=1), one)
    assert math.isnan(c1["delta_lo"]) and verdict(c1) == "n/a"
    assert all(math.isnan(v) for v in saving_interval(one[0], one))


# ---- the comparison table --------------------------------------------------------------------------------
def _sweep(n_blocks: int = 6) -> list[dict]:
    rows = [_row("full", 64, -0.05, n_blocks)]
    rows += [_row(f"A_window_{c}", c, 0.8 - 0.1 * k, n_blocks) for k, c in enumerate((8, 16, 32))]
    rows += [_row(f"B_streaming_{c}", c, 0.3 - 0.1 * k, n_blocks) for k, c in enumerate((8, 16, 32))]
    rows += [
        _row("G_conf0.1_base8", 10, 0.2, n_blocks),
        _row("G_conf0.6_base8", 11, 0.22, n_blocks),
        _row("G_conf0.1_base16", 18, 0.1, n_blocks),
        _row("I_pos16_mix8_g8", 12, 0.25, n_blocks),
        _row("I_pos32_mix8_g8", 20, 0.15, n_blocks),
        _row("J_pos8_mix8_g16", 13, 0.3, n_blocks),
        _row("K_uniform8_aware", 12, 0.21, n_blocks),
        _row("learned_b8", 8, 0.02, n_blocks),  # better than B_streaming_32: a bound
    ]
    return rows


def test_comparison_table_lines():
    rows = _sweep()
    lines = comparison_table(rows)
    assert len(lines) == len(rows) + 1 and lines[0].startswith("configuration") and "saving" in lines[0]
    by = {ln.split()[0]: ln for ln in lines[1:]}
    assert "frontier" in by["B_streaming_16"] and by["B_streaming_16"].split()[-2] == "1.00x"
    assert ">4.00x" in by["learned_b8"] and "better" in by["learned_b8"]
    assert "<" in by["A_window_8"] and "worse" in by["A_window_8"]
    assert "n/a" not in "".join(lines)
    single = comparison_table(_sweep(n_blocks=1))
    assert "n/a" in single[2]  # a single block: no PPL interval, no dPPL interval, no verdict
    assert all(ln.rstrip().endswith(("n/a", "(extrap.)", "frontier")) for ln in single[1:])
    no_b = comparison_table([r for r in rows if r["family"] != "B"])
    assert len(no_b) == len(rows) - 2 and all("no B frontier" in ln for ln in no_b[1:])
    assert compare_all([r for r in rows if r["family"] != "B"]) == []


# ---- figures on any subset of rows -----------------------------------------------------------------------
ALL_FIGS = ["ppl_vs_ctx", "sink_importance", "confidence_threshold", "best_configs", "inverse", "frontier"]
SUBSETS = {
    "study": (lambda r: True, ALL_FIGS),
    "one block each": (None, ALL_FIGS),
    "full, A and B": (lambda r: r["family"] in ("full", "A", "B"), [ALL_FIGS[i] for i in (0, 1, 3, 5)]),
    "B only": (lambda r: r["family"] == "B", ["ppl_vs_ctx", "frontier"]),
    "learned only": (lambda r: r["name"].startswith("learned"), ["ppl_vs_ctx"]),
    "no B": (lambda r: r["family"] != "B", ["ppl_vs_ctx"]),
    "full only": (lambda r: r["name"] == "full", ["ppl_vs_ctx"]),
    "one B row": (lambda r: r["name"] == "B_streaming_16", ["ppl_vs_ctx"]),
}


@pytest.mark.parametrize("subset", list(SUBSETS))
def test_plot_all_on_any_subset_of_rows(subset, tmp_path, caplog):
    from headkv.alloc.plots import plot_all

    keep, expected = SUBSETS[subset]
    rows = _sweep(n_blocks=1) if keep is None else [r for r in _sweep() if keep(r)]
    if subset == "learned only":  # a second seed, and a row that states no family
        rows.append({**rows[0], "name": "learned_b8@seed1", "ppl": rows[0]["ppl"] * 1.01, "family": None})
    with caplog.at_level(logging.INFO, logger="headkv.alloc.plots"):
        paths = plot_all(rows, tmp_path / "fig")
    assert [p.name for p in paths] == [f"{n}.png" for n in expected]
    assert all(p.exists() and p.read_bytes()[:4] == b"\x89PNG" for p in paths)
    written = sorted(p.name for p in (tmp_path / "fig").iterdir())
    assert written == sorted(p.name for p in paths)  # and no temporary files left
    skipped = [n for n in ALL_FIGS if n not in expected]
    assert all(any(f"skipping {n}.png" in m for m in caplog.messages) for n in skipped)
