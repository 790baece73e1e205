"""The per-head evicting cache: exact against the masked forward, holds sink + window, honest bytes."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from headkv.alloc.allocation import Allocation, AllocationError, applied
from headkv.models import window as win
from headkv.models.attention import is_clean
from headkv.models.kv_cache import RESERVE, PerHeadCache
from headkv.models.loading import freeze, model_shape
from tests.conftest import VOCAB, tiny_config, tiny_model

pytestmark = pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")


def random_alloc(model, seed: int = 1, max_sink: int = 4, max_window: int = 12) -> Allocation:
    """Different sink and window in every (layer, KV head), so layers are ragged."""
    s = model_shape(model)
    g = torch.Generator().manual_seed(seed)
    sink = torch.randint(0, max_sink, s.shape, generator=g)
    window = torch.randint(1, max_window, s.shape, generator=g)
    return Allocation.from_tensors(sink, window, model_id=s.model_id, q_per_kv=s.q_per_kv)


def masked_logits(model, alloc, x, reindex: bool = False) -> torch.Tensor:
    with applied(model, alloc, reindex=reindex), torch.no_grad():
        return model(x).logits


def streamed_logits(model, alloc, x, chunk: int = 1, reindex: bool = False, check=None) -> torch.Tensor:
    out = []
    with applied(model, alloc, evict=True, reindex=reindex) as cache, torch.no_grad():
        for lo in range(0, x.shape[1], chunk):
            out.append(model(x[:, lo : lo + chunk], cache=cache, use_cache=True).logits)
            if check:
                check(cache)
    return torch.cat(out, 1)


def held_equals_allowed(alloc: Allocation):
    """After t tokens each head holds exactly the keys the last query (t - 1) saw: min(t, sink + window)."""
    sink, window = alloc.tensors()

    def check(cache: PerHeadCache) -> None:
        t = cache.get_seq_length()
        for li, layer in enumerate(cache.layers):
            _, _, pos = layer.padded()
            ok = win.allowed(torch.tensor([t - 1]), torch.arange(t), sink[li], window[li])[:, 0]  # (Hkv, t)
            for h in range(pos.shape[0]):
                held = sorted(p for p in pos[h].tolist() if p >= 0)
                assert held == ok[h].nonzero().flatten().tolist(), (li, h, t)
                assert len(held) <= layer.lengths[h] <= len(held) + RESERVE  # laid out ahead while filling
            if t >= int((sink[li] + window[li]).max()):
                assert layer.pos.min() >= 0  # ragged storage: once every head is full, no slot is empty

    return check


@pytest.mark.parametrize("arch", ["neox", "llama"])
def test_masked_forward_equals_evicting_decode(arch):
    model = tiny_model(arch)
    alloc = random_alloc(model)
    x = torch.randint(0, VOCAB, (1, 60), generator=torch.Generator().manual_seed(2))
    ref = masked_logits(model, alloc, x)
    out = streamed_logits(model, alloc, x, check=held_equals_allowed(alloc))
    assert (out - ref).abs().max() <= 1e-4
    assert is_clean(model)


def test_flat_decode_equals_the_padded_copy(tiny, monkeypatch):
    """A ragged layer of few KV heads decodes over its flat buffer (every head's segment, each head masked
    to its own); with that path off it gathers a padded copy. Both equal the masked forward."""
    import headkv.models.attention as attention
    import headkv.models.kv_cache as kv_cache

    alloc = random_alloc(tiny, seed=5)
    x = torch.randint(0, VOCAB, (2, 60), generator=torch.Generator().manual_seed(6))
    ref = masked_logits(tiny, alloc, x)
    calls = []
    monkeypatch.setattr(attention, "_flat_attention",
                        lambda *a, f=attention._flat_attention: calls.append(1) or f(*a))
    flat = streamed_logits(tiny, alloc, x, check=held_equals_allowed(alloc))
    assert calls  # the flat path ran
    monkeypatch.setattr(kv_cache, "FLAT_MAX_KV_HEADS", 0)
    n = len(calls)
    padded = streamed_logits(tiny, alloc, x, check=held_equals_allowed(alloc))
    assert len(calls) == n  # and now it did not
    assert (flat - ref).abs().max() <= 1e-4 and (padded - ref).abs().max() <= 1e-4


@pytest.mark.parametrize("chunk", [7, 60])
def test_chunked_forward_equals_token_by_token(tiny, chunk):
    alloc = random_alloc(tiny, seed=3)
    x = torch.randint(0, VOCAB, (2, 60), generator=torch.Generator().manual_seed(4))  # batch 2, no padding
    ref = masked_logits(tiny, alloc, x)
    assert (
        streamed_logits(tiny, alloc, x, chunk=chunk, check=held_equals_allowed(alloc)) - ref
    ).abs().max() <= 1e-4


def _masked_greedy(model, alloc, prompt, n):
    seq = prompt
    with applied(model, alloc), torch.no_grad():
        for _ in range(n):
            seq = torch.cat([seq, model(seq).logits[:, -1:].argmax(-1)], 1)
    return seq


def test_generate_and_decode_loop_match_masked_recompute(tiny):
    alloc = random_alloc(tiny, seed=5)
    prompt = torch.randint(0, VOCAB, (1, 20), generator=torch.Generator().manual_seed(6))
    ref = _masked_greedy(tiny, alloc, prompt, 40)
    with applied(tiny, alloc, evict=True) as cache:
        out = tiny.generate(
            prompt,
            past_key_values=cache,
            max_new_tokens=40,
            do_sample=False,
            attention_mask=torch.ones_like(prompt),
            pad_token_id=0,
        )
    assert torch.equal(out, ref)
    assert cache.bytes_held() == alloc.kv_bytes(
        cache.get_seq_length(), model_shape(tiny).head_dim, torch.float32
    )
    from headkv.alloc.passkey import greedy

    assert torch.equal(greedy(tiny, alloc, prompt, 40, prefill_chunk=8), ref[:, 20:])
    assert is_clean(tiny)


def test_bytes_held_are_the_allocations_and_padding_is_reported_separately(tiny):
    s = model_shape(tiny)
    ragged = random_alloc(tiny, seed=7, max_window=30)
    uniform = Allocation.uniform(s.shape, 4, 12, q_per_kv=s.q_per_kv)
    x = torch.randint(0, VOCAB, (1, 50))
    for alloc in (ragged, uniform):
        for t in (5, 50):  # while heads fill, and after they evict
            with applied(tiny, alloc, evict=True) as cache, torch.no_grad():
                tiny(x[:, :t], cache=cache)
            assert cache.bytes_held() == alloc.kv_bytes(t, s.head_dim, torch.float32)
            assert cache.kept_tokens() == alloc.kv_tokens(t)
            assert cache.padded_bytes() >= cache.bytes_held()
    assert cache.padded_bytes() == cache.bytes_held() and cache.transient_bytes() == 0  # uniform: no padding


def test_reindex_is_streamingllm_on_a_one_layer_model():
    """One layer: re-indexed attention of the last token == a plain forward over sinks + window at 0..n-1."""
    for arch in ("neox", "llama"):
        cfg = tiny_config(arch)
        cfg.num_hidden_layers = 1
        torch.manual_seed(0)
        model = freeze(AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa"))
        s = model_shape(model)
        sink, window, t = 3, 9, 40
        alloc = Allocation.uniform(s.shape, sink, window, q_per_kv=s.q_per_kv)
        x = torch.randint(0, VOCAB, (1, t), generator=torch.Generator().manual_seed(8))
        out = streamed_logits(model, alloc, x, reindex=True)[:, -1]
        kept = torch.cat([x[:, :sink], x[:, t - window :]], 1)
        with torch.no_grad():
            ref = model(kept).logits[:, -1]
        assert (out - ref).abs().max() <= 1e-4, arch
        assert (streamed_logits(model, alloc, x)[:, -1] - ref).abs().max() > 1e-3  # without it: not the same


def test_reindexed_decode_equals_reindexed_masked_forward(tiny):
    alloc = random_alloc(tiny, seed=9)
    x = torch.randint(0, VOCAB, (1, 60), generator=torch.Generator().manual_seed(10))
    ref = masked_logits(tiny, alloc, x, reindex=True)
    for chunk in (1, 13):
        assert (streamed_logits(tiny, alloc, x, chunk=chunk, reindex=True) - ref).abs().max() <= 1e-4
    # before any eviction (t < sink + window everywhere) re-indexing changes nothing
    early = int(min(a + b for a, b in zip(*(t.flatten().tolist() for t in alloc.tensors()), strict=True)))
    assert (ref[:, :early] - masked_logits(tiny, alloc, x)[:, :early]).abs().max() <= 1e-5


def test_misuse_is_refused(tiny):
    alloc = random_alloc(tiny)
    x = torch.randint(0, VOCAB, (1, 8))
    cache = PerHeadCache(*alloc.tensors())
    with pytest.raises(RuntimeError, match="inside applied"):
        tiny(x, cache=cache)
    # padded batches are served (tests/test_batch_cache.py); a mask that does not cover the new tokens is not
    with pytest.raises(ValueError, match="attention mask"):
        with applied(tiny, alloc, evict=True) as cache:
            short = torch.tensor([[0, 1, 1], [1, 1, 1]])  # 3 columns for 8 new tokens
            tiny(torch.randint(0, VOCAB, (2, 8)), attention_mask=short, cache=cache)
    wrong = Allocation.uniform((model_shape(tiny).n_layers, 5), 0, 4, q_per_kv=model_shape(tiny).q_per_kv)
    with pytest.raises(AllocationError, match="has shape"):
        with applied(tiny, wrong, evict=True):
            pass
    assert is_clean(tiny)


def test_offline_default_greedy_tokens_match_masked_recompute(smollm):
    model, tok = smollm
    s = model_shape(model)
    g = torch.Generator().manual_seed(12)
    window = torch.randint(4, 40, s.shape, generator=g)  # per head, evicting within the prompt
    alloc = Allocation.from_tensors(torch.full(s.shape, 4), window, model_id=s.model_id, q_per_kv=s.q_per_kv)
    prompt = tok(
        "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
        "must be in want of a wife. However little known the feelings or views of such a man may be",
        return_tensors="pt",
    )["input_ids"]
    ref = _masked_greedy(model, alloc, prompt, 16)
    with applied(model, alloc, evict=True) as cache:
        out = model.generate(
            prompt, cache=cache, max_new_tokens=16, do_sample=False, attention_mask=torch.ones_like(prompt)
        )
    assert torch.equal(out, ref)
    assert cache.bytes_held() == alloc.kv_bytes(cache.get_seq_length(), s.head_dim, model.dtype)
