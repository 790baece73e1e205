"""The fixed-capacity static cache (the GPU decode path) == the masked forward == the evicting cache.

A static cache's decode step over its ring buffers gives the logits of the masked full forward at every
position, for uniform layers (StreamingLLM, full attention) and ragged ones (heads of unequal capacity, the
flat buffer), on MHA with partial rotary (GPT-NeoX), GQA (Llama) and natively sliding layers (Gemma-3), in
batches; its bytes are the allocation's. The CUDA-graph replay is checked where a GPU exists.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from test_families import mixed
from test_families import tiny as family_model

from headkv.alloc.allocation import Allocation, AllocationError, applied
from headkv.models.kv_cache import kv_bytes_of
from headkv.models.loading import model_shape
from headkv.models.static_cache import GraphDecoder, StaticError


def varied(model, seed: int = 0) -> Allocation:
    s = model_shape(model)
    g = torch.Generator().manual_seed(seed)
    sink = torch.randint(0, 4, s.shape, generator=g)
    window = torch.randint(1, 12, s.shape, generator=g)
    return Allocation.from_tensors(sink, window, model_id=s.model_id, q_per_kv=s.q_per_kv)


def evicting_logits(model, alloc, ids, prompt: int):
    """The same steps through the per-head evicting cache (PerHeadCache; a DynamicCache for full)."""
    out = []
    with torch.no_grad(), applied(model, alloc, evict=True) as cache:
        out.append(model(ids[:, :prompt], cache=cache, use_cache=True).logits)
        for t in range(prompt, ids.shape[1]):
            out.append(model(ids[:, t : t + 1], cache=cache, use_cache=True).logits)
    return torch.cat(out, 1)


def masked_logits(model, alloc, ids):
    with torch.no_grad(), applied(model, alloc):
        return model(ids).logits


def static_logits(model, alloc, ids, prompt: int, max_len: int, graph: bool = False, layout: str = "auto"):
    """Logits of every position from `prompt` on: one prefill, then one token per step."""
    out = []
    with torch.no_grad(), applied(model, alloc, evict=True, static=max_len, layout=layout) as cache:
        out.append(model(ids[:, :prompt], cache=cache, use_cache=True).logits)
        dec = GraphDecoder(model, cache) if graph else None
        for t in range(prompt, ids.shape[1]):
            if dec is not None:
                out.append(dec.step(ids[:, t : t + 1]).unsqueeze(1).clone())
            else:
                pos = torch.full((ids.shape[0], 1), t, device=ids.device)
                out.append(model(ids[:, t : t + 1], position_ids=pos, cache=cache, use_cache=True).logits)
        held = kv_bytes_of(cache)
    return torch.cat(out, 1), held


@pytest.mark.parametrize("arch", ["neox", "llama"])
@pytest.mark.parametrize("kind", ["varied", "streaming", "full"])
@pytest.mark.parametrize("prompt", [1, 9])
@pytest.mark.parametrize("layout", ["padded", "flat"])
def test_static_decode_equals_masked_forward(arch, kind, prompt, layout):
    model = tiny_model(arch)
    s = model_shape(model)
    alloc = {"varied": varied(model), "full": None,
             "streaming": Allocation.uniform(s.shape, 2, 5, model_id=s.model_id, q_per_kv=s.q_per_kv)}[kind]
    ids = torch.randint(0, 97, (3, 30), generator=torch.Generator().manual_seed(2))  # a batch of 3
    want = masked_logits(model, alloc, ids)
    got, _ = static_logits(model, alloc, ids, prompt, max_len=40, layout=layout)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got, evicting_logits(model, alloc, ids, prompt), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layout", ["padded", "flat"])
def test_static_bytes_are_the_allocations(layout):
    """Flat: exactly the allocation's slots plus one trash slot per layer; padded: every head of a layer
    at the layer's largest capacity, plus one trash slot per head."""
    model = tiny_model("llama")
    alloc = varied(model)
    ids = torch.randint(0, 97, (2, 30), generator=torch.Generator().manual_seed(3))
    _, held = static_logits(model, alloc, ids, 5, max_len=40, layout=layout)
    s = model_shape(model)
    capacity = torch.clamp(torch.tensor(alloc.sink) + torch.tensor(alloc.window), max=40)  # (L, Hkv)
    if layout == "flat":
        slots = int(capacity.sum()) + s.n_layers
    else:
        slots = int(((capacity.max(1).values + 1) * s.n_kv_heads).sum())
    assert held == 2 * 2 * slots * s.head_dim * 4  # batch 2, K and V, float32


def test_static_decode_on_native_sliding_layers_equals_masked_forward():
    model = family_model("gemma3_text")
    alloc = mixed(model)
    ids = torch.randint(1, 97, (2, 40), generator=torch.Generator().manual_seed(4))
    want = masked_logits(model, alloc, ids)
    for layout in ("padded", "flat"):
        got, _ = static_logits(model, alloc, ids, 6, max_len=48, layout=layout)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got, evicting_logits(model, alloc, ids, 6), rtol=1e-4, atol=1e-4)


def test_static_cache_refuses_what_it_does_not_serve():
    model = tiny_model("llama")
    ids = torch.randint(0, 97, (1, 12))
    with torch.no_grad(), applied(model, None, evict=True, static=8) as cache:
        with pytest.raises(StaticError, match="exceeds the static cache's max_len 8"):
            model(ids, cache=cache, use_cache=True)
    with torch.no_grad(), applied(model, None, evict=True, static=16) as cache:
        model(ids[:, :4], cache=cache, use_cache=True)
        with pytest.raises(StaticError, match="one prefill"):
            model(ids[:, 4:8], cache=cache, use_cache=True)
    with pytest.raises(AllocationError, match="evict=True"):
        with applied(model, None, static=16):
            pass


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("kind, layout", [("varied", "padded"), ("varied", "flat"), ("full", "auto")])
def test_graph_replay_equals_eager_cuda(kind, layout):
    model = tiny_model("llama").cuda()
    alloc = varied(model) if kind == "varied" else None
    ids = torch.randint(0, 97, (2, 30), generator=torch.Generator().manual_seed(5)).cuda()
    want, _ = static_logits(model, alloc, ids, 9, max_len=40, layout=layout)
    got, _ = static_logits(model, alloc, ids, 9, max_len=40, graph=True, layout=layout)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
