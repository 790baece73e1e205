"""The peer protocol's cross-check without kvpress (its venv is not part of CI): headkv's compress-once
protocol (bench/peers/protocol.py) under B_streaming_B equals StreamingLLM as kvpress's StreamingLLMPress runs
it -- a full-attention prefill into a DynamicCache cut to its 4 sinks and last B - 4 entries per layer, then
the continuation fed one token at a time at its true positions -- on tiny GPT-NeoX and Llama models; and a
dynamic allocation's kept set (the fill rule once, at N) holds exactly each head's budget."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model
from test_dynamic import budgets
from transformers import DynamicCache

import headkv
from headkv.models.dynamic import Fill

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench" / "peers"))

import protocol  # noqa: E402


def streaming_press_nll(model, ids: torch.Tensor, n: int, m: int, b: int) -> float:
    """StreamingLLMPress(n_sink=4) at B kept entries, written out: prefill, cut every layer, decode."""
    cache = DynamicCache()
    with torch.no_grad():
        model(ids[None, :n], cache=cache, use_cache=True)
        for layer in cache.layers:
            keep = torch.cat([torch.arange(4), torch.arange(n - (b - 4), n)])
            layer.keys, layer.values = layer.keys[:, :, keep], layer.values[:, :, keep]
        nll = []
        for p in range(n, n + m):
            out = model(ids[None, p : p + 1], cache=cache, use_cache=True, position_ids=torch.tensor([[p]]),
                        cache_position=torch.tensor([p]))
            nll.append(F.cross_entropy(out.logits[:, -1].double(), ids[p + 1 : p + 2]).item())
    return sum(nll) / m


@pytest.mark.parametrize("arch", ["neox", "llama"])
def test_streaming_cross_check(arch):
    model = tiny_model(arch).double()
    n, m, b = 40, 8, 12
    ids = torch.randint(0, 97, (n + m + 1,), generator=torch.Generator().manual_seed(3))
    kept = protocol.kept_static(headkv.policy(f"B_streaming_{b}", model), model, n)
    assert protocol.kept_mean(kept) == b
    ours = protocol.protocol_nll(model, kept, ids, n, m)
    assert abs(ours - streaming_press_nll(model, ids, n, m, b)) < 1e-6  # the protocol scores in float32
    assert abs(ours - protocol.protocol_nll(model, None, ids, n, m)) > 1e-4  # compression changed it


def test_dynamic_kept_once_holds_the_budget():
    model = tiny_model("llama")
    alloc = budgets(model, lo=10, hi=30).filled(Fill(3, 4, 0.5))
    ids = torch.randint(0, 97, (50,), generator=torch.Generator().manual_seed(4))
    kept = protocol.kept_of(alloc, model, ids)
    sink, window = alloc.tensors()
    assert torch.equal(kept.sum(-1), (sink + window).clamp(max=50))
    assert not torch.equal(kept, protocol.kept_of(alloc.filled(None), model, ids))  # content chose
