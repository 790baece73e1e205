"""Exactness across the decoder families the attention patch claims (tiny random configs, no download).

For each family: full attention through the patch == the stock model's logits; the masked forward of a
mixed per-head allocation == token-by-token decoding with the evicting cache; natively sliding layers keep
their window (a head sees its allocation within the native cap, and the cache holds exactly those keys);
MQA, GQA, partial rotary, attention and final logit soft-capping are all among the configs. A family the
patch does not serve is refused in one line.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from headkv.alloc.allocation import Allocation, applied, kv_bytes
from headkv.models import window as win
from headkv.models.common import HeadkvError
from headkv.models.families import FAMILIES, check_family, native_caps
from headkv.models.loading import freeze, model_shape

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

T = 24  # longer than every native window below, so caps bind and sinks leave them
SLIDE = 7
COMMON = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
              max_position_embeddings=128)
CONFIGS = {
    "gpt_neox": dict(num_attention_heads=4, rotary_pct=0.25),  # MHA, partial rotary (Pythia)
    "llama": dict(num_attention_heads=4, num_key_value_heads=2),  # GQA
    # every layer slides
    "mistral": dict(num_attention_heads=4, num_key_value_heads=2, sliding_window=SLIDE),
    # MQA; layers 1-2 slide
    "qwen2": dict(num_attention_heads=4, num_key_value_heads=1, use_sliding_window=True,
                  sliding_window=SLIDE, max_window_layers=1),
    "qwen3": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16, use_sliding_window=True,
                  sliding_window=SLIDE, max_window_layers=2),
    "gemma": dict(num_attention_heads=4, num_key_value_heads=1, head_dim=16),  # Gemma 1: MQA, no sliding
    # attention and final logit soft-capping
    "gemma2": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=SLIDE,
                   attn_logit_softcapping=2.0, final_logit_softcapping=3.0, query_pre_attn_scalar=16),
    # MQA, two sliding layers
    "gemma3_text": dict(num_attention_heads=4, num_key_value_heads=1, head_dim=16, sliding_window=SLIDE,
                        layer_types=["sliding_attention", "sliding_attention", "full_attention"]),
    "phi3": dict(num_attention_heads=4, num_key_value_heads=2, partial_rotary_factor=0.5,
                 sliding_window=SLIDE, pad_token_id=0),
}


def tiny(family: str, seed: int = 0):
    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(family, **COMMON, **CONFIGS[family])
    model = AutoModelForCausalLM.from_config(cfg).float()
    with torch.no_grad():  # attention scores of order 1-10, so that soft-capping and masks change the result
        for name, p in model.named_parameters():
            if any(k in name for k in ("q_proj", "k_proj", "query_key_value", "qkv_proj")):
                p.mul_(8.0)
    return freeze(model)


def mixed(model, seed: int = 3) -> Allocation:
    """Sinks 0-3 and windows 1-11 (some beyond the native window) in every (layer, KV head)."""
    s = model_shape(model)
    g = torch.Generator().manual_seed(seed)
    sink, window = torch.randint(0, 4, s.shape, generator=g), torch.randint(1, 12, s.shape, generator=g)
    return Allocation.from_tensors(sink, window, model_id=s.model_id, q_per_kv=s.q_per_kv)


def test_every_claimed_family_is_covered():
    assert set(CONFIGS) == set(FAMILIES)  # every family the patch claims is tested here
    assert {"gpt_neox", "llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3"} <= set(CONFIGS)


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_family_exactness(family):
    model = tiny(family)
    x = torch.randint(1, 97, (1, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        stock = model(x).logits
        shape = model_shape(model)
        full = Allocation.uniform(shape.shape, 0, T, model_id=shape.model_id, q_per_kv=shape.q_per_kv)
        with applied(model, full):
            patched = model(x).logits
        torch.testing.assert_close(patched, stock, rtol=1e-4, atol=1e-4)

        alloc = mixed(model)
        with applied(model, alloc):
            masked = model(x).logits
        steps = []
        with applied(model, alloc, evict=True) as cache:
            for i in range(T):
                steps.append(model(x[:, i : i + 1], past_key_values=cache, use_cache=True).logits)
                # the cache holds exactly the keys the last query saw, within the native cap
                bound = alloc.bound(shape.native)
                sink, window, cap = bound.effective()
                for li, layer in enumerate(cache.layers):
                    pos = layer.padded_pos()
                    c = None if cap is None else cap[li]
                    ok = win.allowed(torch.tensor([i]), torch.arange(i + 1), sink[li], window[li], c)[:, 0]
                    for h in range(pos.shape[0]):
                        held = sorted(p for p in pos[h].tolist() if p >= 0)
                        assert held == ok[h].nonzero().flatten().tolist()
            held = cache.bytes_held()
        torch.testing.assert_close(torch.cat(steps, 1), masked, rtol=1e-4, atol=1e-4)
        assert held == kv_bytes(alloc, shape, T, model.dtype)  # measured == predicted, caps included
    assert model.config._attn_implementation != "headkv"


def test_native_sliding_layers_are_accounted():
    model = tiny("gemma3_text")
    shape = model_shape(model)
    assert shape.native == (SLIDE, SLIDE, 0) == native_caps(model.config)
    full = kv_bytes(None, shape, T, torch.float32)
    per_token = 2 * shape.n_kv_heads * shape.head_dim * 4
    assert full == per_token * (SLIDE + SLIDE + T)  # the "full" row keeps what the sliding layers keep
    b = Allocation.uniform(shape.shape, 4, 100).bound(shape.native)
    assert b.eff_ctx() == pytest.approx((SLIDE + SLIDE + 104) / 3)  # the sinks of a sliding layer fall out
    assert win.native(torch.tensor([4]), torch.tensor([100]), torch.tensor([SLIDE])) == (
        torch.tensor([0]), torch.tensor([SLIDE]))
    assert not any(native_caps(tiny("llama").config))


def test_unsupported_family_is_refused_in_one_line():
    cfg = AutoConfig.for_model("gpt2", n_layer=1, n_head=2, n_embd=16, vocab_size=97)
    with pytest.raises(HeadkvError, match="model family 'gpt2' is not supported") as e:
        check_family(cfg)
    assert "\n" not in str(e.value)
    model = freeze(AutoModelForCausalLM.from_config(cfg))
    alloc = Allocation.uniform((1, 2), 0, 4)
    with pytest.raises(HeadkvError, match="gpt2"), applied(model, alloc):
        pass


def test_learned_gates_spend_no_budget_beyond_a_native_window():
    from headkv.alloc.gates import WindowGates

    native = (SLIDE, 0, SLIDE)
    gates = WindowGates((3, 2), 10.0, 32, sink=4, native=native)
    with torch.no_grad():
        gates.logits.copy_(torch.tensor([[3.0, -1.0], [0.5, 2.0], [-2.0, 4.0]]))
    assert gates.eff_ctx() == pytest.approx(10.0)
    w = gates.windows()
    assert float(w[0].max()) <= SLIDE and float(w[2].max()) <= SLIDE  # no window beyond the native one
    alloc = gates.export()
    assert alloc.native == native and alloc.eff_ctx() <= 10.0 + 1e-9 and alloc.eff_ctx() > 9.5
    assert max(alloc.window[0] + alloc.window[2]) <= SLIDE
    with pytest.raises(Exception, match="infeasible"):
        WindowGates((3, 2), 4 / 3 + (2 * SLIDE + 32) / 3 + 1, 32, sink=4, native=native)


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_block_sparse_path_equals_dense(family):
    """FlexAttention's block mask (native caps and soft-capping composed) == the dense reference, fp32."""
    from headkv.models import flex

    if not flex.available("cpu", 16):
        pytest.skip("FlexAttention does not compile on this machine")
    model = tiny(family)
    x = torch.randint(1, 97, (1, T), generator=torch.Generator().manual_seed(2))
    alloc = mixed(model, seed=5)
    with torch.no_grad():
        with applied(model, alloc, backend="dense"):
            dense = model(x).logits
        with applied(model, alloc, backend="flex"):
            sparse = model(x).logits
    torch.testing.assert_close(sparse, dense, rtol=1e-4, atol=1e-5)
