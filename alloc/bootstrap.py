"""The one bootstrap of the project: whole token blocks resampled with replacement.

The evaluator keeps every block's NLL in chunk sums (``chunk_nll``, with ``chunk_tokens`` tokens each,
consecutive, the same number of chunks per block). Tokens of one block share their context, so chunks of a
block are correlated: resampling chunks would understate the spread. Every interval here resamples whole
blocks: :func:`block_sums` folds a row's chunks into per-block (NLL, tokens), :func:`resample_index` draws the
blocks (a fixed seed, so the same rows give the same interval) and every statistic is recomputed on each
resample -- for paired statistics, on the same resampled blocks for every row, so the noise the rows share
cancels. With a single block there is nothing to resample: every interval is then (nan, nan), never a fake
zero-width one.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

N_BOOT = 2000
SEED = 0
PERCENTILES = (2.5, 97.5)  # a 95% percentile interval
NAN2 = (float("nan"), float("nan"))

Row = Mapping[str, Any]


def block_sums(row: Row) -> tuple[np.ndarray, np.ndarray]:
    """Per-block (NLL sum, token count), each (n_blocks,), from a row's ``chunk_nll`` / ``chunk_tokens``.

    Block b is the contiguous slice of ``len(chunk_nll) // n_blocks`` chunks starting at b times that.
    """
    nll = np.asarray(row["chunk_nll"], dtype=np.float64)
    cnt = np.asarray(row["chunk_tokens"], dtype=np.float64)
    n = row.get("n_blocks")
    name = row.get("name", "row")
    if n is None:
        raise ValueError(f"{name}: no n_blocks: cannot group its chunks into blocks")
    n = int(n)
    if nll.shape != cnt.shape or nll.ndim != 1:
        raise ValueError(f"{name}: chunk_nll and chunk_tokens differ in length")
    if n < 1 or len(nll) % n:
        raise ValueError(f"{name}: {len(nll)} chunks do not split into {n} blocks of equal length")
    return nll.reshape(n, -1).sum(1), cnt.reshape(n, -1).sum(1)


def resample_index(n_blocks: int, seed: int = SEED, n_boot: int = N_BOOT) -> np.ndarray:
    """Block indices (n_boot, n_blocks) drawn with replacement, from a fixed seed."""
    return np.random.default_rng(seed).integers(0, n_blocks, size=(n_boot, n_blocks))


def same_tokens(*rows: Row) -> bool:
    """Whether rows were measured on the same tokens (same chunking and blocks), so they can be paired."""
    first = rows[0]
    return all(
        list(r["chunk_tokens"]) == list(first["chunk_tokens"]) and r.get("n_blocks") == first.get("n_blocks")
        for r in rows[1:]
    )


def boot_ppl(row: Row, idx: np.ndarray) -> np.ndarray:
    """The row's perplexity on every resample of ``idx`` (..., n_blocks) of its blocks: (...,)."""
    nll, cnt = block_sums(row)
    return np.exp(nll[idx].sum(-1) / cnt[idx].sum(-1))


def _interval(boot: np.ndarray) -> tuple[float, float]:
    lo, hi = np.percentile(boot, PERCENTILES)
    return float(lo), float(hi)


def ppl_interval(row: Row, seed: int = SEED) -> tuple[float, float]:
    """95% interval of one row's perplexity; (nan, nan) with a single block."""
    n = len(block_sums(row)[0])
    if n < 2:
        return NAN2
    return _interval(boot_ppl(row, resample_index(n, seed)))


def paired_log_ppl_interval(a: Row, b: Row, seed: int = SEED) -> tuple[float, float, float]:
    """log PPL(a) - log PPL(b) on the same tokens and its paired 95% interval ((nan, nan) for one block)."""
    if not same_tokens(a, b):
        raise ValueError("paired comparison needs results on the same tokens")
    na, cnt = block_sums(a)
    nb, _ = block_sums(b)
    d = float((na.sum() - nb.sum()) / cnt.sum())
    if len(cnt) < 2:
        return (d, *NAN2)
    idx = resample_index(len(cnt), seed)
    lo, hi = _interval((na[idx].sum(-1) - nb[idx].sum(-1)) / cnt[idx].sum(-1))
    return d, lo, hi


def paired_delta_interval(
    row: Row, refs: Sequence[Row], weights: Sequence[float], seed: int = SEED
) -> tuple[float, float]:
    """Paired 95% interval of PPL(row) - sum_k weights[k] * PPL(refs[k]) (the frontier interpolated at the
    row's Eff.Ctx) on the same resampled blocks; (nan, nan) for one block or rows on different tokens."""
    if not same_tokens(row, *refs):
        return NAN2
    n = len(block_sums(row)[0])
    if n < 2:
        return NAN2
    idx = resample_index(n, seed)
    ref = sum(w * boot_ppl(r, idx) for r, w in zip(refs, weights, strict=True))
    return _interval(boot_ppl(row, idx) - ref)
