"""THE evaluator: (model, allocation, token blocks) -> perplexity, accuracy, context and KV measures.

It never asks where an allocation came from: fixed policies, learned-and-exported gates and full
attention (``allocation=None``) all go through the same masked forward. Every predicted token's NLL is
kept in chunk sums (``chunk`` consecutive targets of one block); the perplexity interval and every paired
comparison resample whole blocks (:mod:`alloc.bootstrap`; tokens within a block are correlated).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from transformers import PreTrainedModel

from headkv.alloc.allocation import Allocation, applied, full_allocation, kv_bytes
from headkv.alloc.bootstrap import ppl_interval
from headkv.models import scoring
from headkv.models import window as win
from headkv.models.dynamic import meta_bytes
from headkv.models.loading import model_shape

N_BOOT = 2000


@dataclass
class EvalResult:
    name: str
    ppl: float
    ppl_lo: float  # 95% bootstrap interval over whole blocks (nan for a single block)
    ppl_hi: float
    acc: float  # next-token top-1 accuracy
    eff_ctx: float  # the study's Eff.Ctx (sink + mean window); seq_len for full attention; see evaluate()
    realized_ctx: float  # mean over heads and positions of min(t + 1, sink + window)
    kv_bytes: int  # K and V bytes held after seq_len tokens, batch 1, in the model's dtype
    kv_bytes_full: int
    tokens: int  # predicted tokens
    seq_len: int
    n_blocks: int
    wall_s: float
    chunk_nll: list[float] = field(repr=False)  # NLL sum per chunk, same order for the same blocks
    chunk_tokens: list[int] = field(repr=False)
    fill: dict | None = None  # a dynamic allocation's fill rule (models.dynamic.Fill), None: static windows

    def to_dict(self) -> dict:
        return asdict(self)


def paired_log_ppl_diff(
    a: EvalResult | dict, b: EvalResult | dict, seed: int = 0
) -> tuple[float, float, float]:
    """log PPL(a) - log PPL(b) on the same tokens, with a 95% paired bootstrap interval over whole blocks
    ((nan, nan) for a single block)."""
    from headkv.alloc.bootstrap import paired_log_ppl_interval

    ga = a if isinstance(a, dict) else a.to_dict()
    gb = b if isinstance(b, dict) else b.to_dict()
    return paired_log_ppl_interval(ga, gb, seed)


def _block_stats(
    model: PreTrainedModel, hidden: torch.Tensor, block: torch.Tensor, chunk: int
) -> tuple[list, list, int]:
    """Per-chunk NLL sums and token counts for one block, plus its number of correct top-1 guesses, from
    the block's final hidden states (1, T, H) (logits a few hundred tokens at a time, never (T, V))."""
    nll, correct = scoring.chunked_nll(model, hidden, block.unsqueeze(0))  # (1, T-1) float64, (1,)
    nll = nll[0]
    sums = [float(c.sum()) for c in nll.split(chunk)]
    counts = [len(c) for c in nll.split(chunk)]
    return sums, counts, int(correct.sum())


@torch.no_grad()
def evaluate(
    model: PreTrainedModel,
    allocation: Allocation | None,
    blocks: torch.Tensor,
    *,
    name: str | None = None,
    chunk: int = 128,
    progress: Callable[[int, int], None] | None = None,
    backend: str = "dense",
) -> EvalResult:
    """Score ``blocks`` (N, T) under ``allocation`` (None = full attention: the stock model). ``backend``:
    the masked forward's attention kernel (:func:`alloc.allocation.applied`); results agree to float
    tolerance, so it is not part of a measurement's key."""
    start = time.perf_counter()
    n_blocks, seq_len = blocks.shape
    sums: list[float] = []
    counts: list[int] = []
    correct = 0
    with applied(model, allocation, backend=backend):
        for i, block in enumerate(blocks):
            block = block.to(model.device)
            hidden = scoring.hidden(model, block.unsqueeze(0))  # (1, T, H)
            s, c, k = _block_stats(model, hidden, block, chunk)
            sums.extend(s)
            counts.extend(c)
            correct += k
            if progress:
                progress(i + 1, n_blocks)
    nll, cnt = np.asarray(sums), np.asarray(counts, dtype=np.float64)
    lo, hi = ppl_interval({"chunk_nll": nll, "chunk_tokens": cnt, "n_blocks": n_blocks})
    shape = model_shape(model)
    measured = (allocation or full_allocation(shape, seq_len)).bound(shape.native)  # within native caps
    # a dynamic allocation's keys also carry a score and a position: its contexts count them, in keys' worth
    # of K and V bytes, so every comparison (the frontier's saving factor) is at equal bytes
    over = 1.0 if measured.fill is None else 1 + meta_bytes(1) / win.kv_bytes(1, shape.head_dim, model.dtype)
    eff, real = measured.eff_ctx() * over, measured.realized_context(seq_len) * over
    label = name or (allocation.name if allocation is not None else "full")
    return EvalResult(
        name=label,
        ppl=math.exp(nll.sum() / cnt.sum()),
        ppl_lo=lo,
        ppl_hi=hi,
        acc=correct / cnt.sum(),
        eff_ctx=eff,
        realized_ctx=real,
        kv_bytes=kv_bytes(allocation, shape, seq_len, model.dtype),
        kv_bytes_full=kv_bytes(None, shape, seq_len, model.dtype),
        tokens=int(cnt.sum()),
        seq_len=seq_len,
        n_blocks=n_blocks,
        wall_s=time.perf_counter() - start,
        chunk_nll=[float(x) for x in nll],
        chunk_tokens=[int(x) for x in cnt],
        fill=None if measured.fill is None else measured.fill.to_dict(),
    )


def blocks_for(
    tokenizer: Any, corpus: str, split: str, tokens: int, seq_len: int, encoding: str | None = None
) -> torch.Tensor:
    """Evaluation blocks: ``tokens`` input tokens in whole blocks of ``seq_len`` (fewer than one block is one
    error line: :func:`alloc.config.check_blocks`)."""
    from headkv.alloc.config import check_blocks
    from headkv.models.text import token_blocks

    check_blocks(tokens, seq_len)
    return token_blocks(tokenizer, corpus, split=split, seq_len=seq_len, n_blocks=tokens // seq_len,
                        encoding=encoding)


def result_table(results: list[EvalResult]) -> list[str]:
    """The evaluator's results as printed lines."""
    lines = [f"{'allocation':28s} {'PPL':>8s} {'95% CI':>17s} {'acc':>7s} {'Eff.Ctx':>8s} "
             f"{'real':>7s} {'KV':>6s}"]
    for r in results:
        ci = "n/a (1 block)" if math.isnan(r.ppl_lo) else f"[{r.ppl_lo:.2f}, {r.ppl_hi:.2f}]"
        lines.append(f"{r.name:28s} {r.ppl:8.3f} {ci:>17s} {100 * r.acc:6.2f}% {r.eff_ctx:8.2f} "
                     f"{r.realized_ctx:7.1f} {100 * r.kv_bytes / r.kv_bytes_full:5.1f}%")
    return lines
