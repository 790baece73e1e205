"""The one evaluator: independent perplexity check, full attention as a row, intervals and pairing."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from headkv.alloc.allocation import Allocation, applied
from headkv.alloc.evaluate import evaluate, paired_log_ppl_diff
from headkv.models.loading import model_shape
from tests.conftest import VOCAB


def _blocks(n=3, t=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, t), generator=g)


def test_full_attention_matches_an_independent_computation(tiny):
    blocks = _blocks()
    res = evaluate(tiny, None, blocks, chunk=16)
    with torch.no_grad():
        logits = tiny(blocks).logits[:, :-1]
    nll = F.cross_entropy(logits.reshape(-1, VOCAB), blocks[:, 1:].reshape(-1))
    acc = (logits.argmax(-1) == blocks[:, 1:]).float().mean()
    assert res.ppl == pytest.approx(math.exp(float(nll)), rel=1e-5)
    assert res.acc == pytest.approx(float(acc))
    assert res.tokens == 3 * 63 and res.name == "full" and res.kv_bytes == res.kv_bytes_full
    assert res.ppl_lo <= res.ppl <= res.ppl_hi
    assert sum(res.chunk_tokens) == res.tokens and len(res.chunk_tokens) == 3 * 4


def test_allocation_rows_use_the_masked_forward(tiny):
    s = model_shape(tiny)
    blocks = _blocks()
    cover = Allocation.uniform(s.shape, 0, 64, q_per_kv=s.q_per_kv, meta={"policy": "cover"})
    small = Allocation.uniform(s.shape, 4, 4, q_per_kv=s.q_per_kv, meta={"policy": "small"})
    full, c, sm = evaluate(tiny, None, blocks), evaluate(tiny, cover, blocks), evaluate(tiny, small, blocks)
    assert c.ppl == pytest.approx(full.ppl, rel=1e-5)
    with applied(tiny, small), torch.no_grad():
        logits = tiny(blocks).logits[:, :-1]
    nll = F.cross_entropy(logits.reshape(-1, VOCAB), blocks[:, 1:].reshape(-1))
    assert sm.ppl == pytest.approx(math.exp(float(nll)), rel=1e-5)
    assert sm.eff_ctx == 8 and sm.kv_bytes == small.kv_bytes(64, s.head_dim, torch.float32)
    assert sm.kv_bytes < full.kv_bytes_full


def test_paired_difference(tiny):
    s = model_shape(tiny)
    blocks = _blocks(n=4)
    a = evaluate(tiny, None, blocks)
    b = evaluate(tiny, Allocation.uniform(s.shape, 0, 2, q_per_kv=s.q_per_kv), blocks)
    d, lo, hi = paired_log_ppl_diff(a, a)
    assert d == lo == hi == 0
    d, lo, hi = paired_log_ppl_diff(b, a)
    assert d == pytest.approx(math.log(b.ppl / a.ppl)) and lo <= d <= hi
    with pytest.raises(ValueError, match="same tokens"):
        paired_log_ppl_diff(a, evaluate(tiny, None, blocks[:2]))
