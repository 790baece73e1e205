"""The attention patch: exact when windows cover the sequence, per-head when they do not, gone on exit."""

from __future__ import annotations

import pytest
import torch

from headkv.alloc.allocation import Allocation, AllocationError, applied
from headkv.models.attention import is_clean
from headkv.models.loading import model_shape
from tests.conftest import VOCAB, tiny_model


def _alloc(model, sink, window):
    s = model_shape(model)
    return Allocation.uniform(s.shape, sink, window, q_per_kv=s.q_per_kv)


def test_covering_windows_reproduce_stock_logits(tiny):
    x = torch.randint(0, VOCAB, (2, 48))
    ref = tiny(x).logits
    for sink, window in [(0, 48), (4, 44), (0, 1000)]:
        with applied(tiny, _alloc(tiny, sink, window)):
            out = tiny(x).logits
        assert (out - ref).abs().max() <= 1e-4
    assert is_clean(tiny)


def test_nothing_remains_after_exit_even_on_error(tiny):
    impl = tiny.config._attn_implementation
    with pytest.raises(RuntimeError, match="boom"):
        with applied(tiny, _alloc(tiny, 0, 4)):
            assert not is_clean(tiny)
            raise RuntimeError("boom")
    assert is_clean(tiny) and tiny.config._attn_implementation == impl
    x = torch.randint(0, VOCAB, (1, 16))
    torch.testing.assert_close(tiny(x).logits, tiny_model(_arch(tiny))(x).logits)


def _arch(model) -> str:
    return "llama" if model.config.model_type == "llama" else "neox"


def test_small_windows_change_logits_and_only_after_the_window(tiny):
    x = torch.randint(0, VOCAB, (1, 40))
    ref = tiny(x).logits
    with applied(tiny, _alloc(tiny, 2, 6)):
        out = tiny(x).logits
    # positions t < sink + window see every earlier token, so they are unchanged
    assert (out[:, :8] - ref[:, :8]).abs().max() <= 1e-4
    assert (out[:, 8:] - ref[:, 8:]).abs().max() > 1e-3


def test_per_head_windows_act_per_kv_head(tiny):
    """Cutting one KV head changes the output only through that head (GQA heads share it)."""
    s = model_shape(tiny)
    x = torch.randint(0, VOCAB, (1, 40))
    full = [[40] * s.n_kv_heads for _ in range(s.n_layers)]
    cut = [row[:] for row in full]
    cut[1][0] = 3
    a = Allocation(
        tuple(map(tuple, [[0] * s.n_kv_heads] * s.n_layers)), tuple(map(tuple, cut)), q_per_kv=s.q_per_kv
    )
    captured = {}

    def hook(module, args, kwargs, output):
        captured[module.layer_idx] = output[0].detach()

    attn = [
        m
        for n, m in tiny.named_modules()
        if n.endswith(("self_attn", "attention")) and hasattr(m, "layer_idx")
    ]
    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in attn]
    try:
        ref_out = tiny(x).logits
        ref = {k: v.clone() for k, v in captured.items()}
        with applied(tiny, a):
            out = tiny(x).logits
    finally:
        for h in handles:
            h.remove()
    assert torch.allclose(captured[0], ref[0], atol=1e-5)  # layer 0 untouched
    assert not torch.allclose(out, ref_out, atol=1e-4)


def test_allocation_for_another_model_is_refused(tiny):
    with pytest.raises(AllocationError, match="has shape"):
        with applied(tiny, Allocation.uniform((5, 7), 0, 8)):
            pass
    assert is_clean(tiny)


def test_attention_maps_match_eager_attention(tiny):
    from headkv.models.attention import attention_maps

    x = torch.randint(0, VOCAB, (1, 24))
    maps = attention_maps(tiny, x)
    tiny.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            ref = tiny(x, output_attentions=True).attentions
    finally:
        tiny.set_attn_implementation("sdpa")
    assert len(maps) == len(ref)
    for m, r in zip(maps, ref, strict=True):
        torch.testing.assert_close(m, r, atol=1e-5, rtol=1e-4)
    assert is_clean(tiny)


def test_every_cache_implements_the_cache_attention_contract():
    """The patch reads a cache only through PositionSource; FullCache, the evicting and the static cache
    implement it."""
    from headkv.models.attention import FullCache, PositionSource
    from headkv.models.kv_cache import PerHeadCache
    from headkv.models.static_cache import StaticHeadCache

    sink, window = torch.zeros(1, 2, dtype=torch.long), torch.full((1, 2), 4, dtype=torch.long)
    evicting = PerHeadCache(sink, window)
    static = StaticHeadCache(sink, window, None, 16, q_heads=2)
    for cache in (FullCache(), FullCache(reindex=True), evicting, static):
        assert isinstance(cache, PositionSource)
    assert evicting.evicting and static.evicting and not FullCache().evicting
    assert FullCache().prefix and not evicting.prefix
