"""The FlexAttention path (models.flex) against a plain float32 reference built on models.window.

Every compiled call here shares D = 64 and float32, so the CPU kernel is compiled once and only re-specialized
per shape (a few seconds each); the cases are grouped so that few distinct shapes are compiled.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask

from headkv.models import flex
from headkv.models import window as win

D = 64
ROWS = [1, 7, 100, 10**9]  # windows, mixed over the heads


def setup_module() -> None:
    torch.set_num_threads(min(2, torch.get_num_threads()))


def qkv(n_q: int, n_kv: int, q_len: int, k_len: int, batch: int = 2, seed: int = 0, device: str = "cpu"):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, n_q, q_len, D, generator=g)
    k = torch.randn(batch, n_kv, k_len, D, generator=g)
    v = torch.randn(batch, n_kv, k_len, D, generator=g)
    return q.to(device), k.to(device), v.to(device)


def rows(n_kv: int, sink: int, shift: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    window = torch.tensor([ROWS[(h + shift) % len(ROWS)] for h in range(n_kv)])
    return torch.full((n_kv,), sink), window


def reference(q, k, v, bias, scaling=None, softcap=None):
    """Plain attention (float32, or float64 for float64 inputs) with a per-KV-head additive bias (Hkv, Q, K);
    returns (B, Q, Hq, D)."""
    r = q.shape[1] // k.shape[1]
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    up = torch.promote_types(q.dtype, torch.float32)
    q, k, v = q.to(up), k.to(up), v.to(up)
    scores = q @ k.repeat_interleave(r, 1).transpose(-1, -2) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    probs = (scores + bias.repeat_interleave(r, 0)).softmax(-1)
    return (probs @ v.repeat_interleave(r, 1)).transpose(1, 2)


def beyond_cap(q_pos, k_pos, cap, heads):
    """(H, Q, K) True where t - k >= cap: cap an int or (H,) tensor, None or <= 0 for none."""
    if cap is None:
        return torch.zeros(heads, len(q_pos), len(k_pos), dtype=torch.bool)
    c = torch.as_tensor(cap).reshape(-1).expand(heads).view(-1, 1, 1)
    return (c > 0) & (q_pos.view(1, -1, 1) - k_pos.view(1, 1, -1) >= c)


def hard_reference(q, k, v, sink, window, cap, scaling=None, softcap=None):
    q_len, k_len = q.shape[2], k.shape[2]
    q_pos, k_pos = torch.arange(k_len - q_len, k_len), torch.arange(k_len)
    bias = win.hard_bias(q_pos, k_pos, sink, window, torch.float32)
    bias = bias.masked_fill(beyond_cap(q_pos, k_pos, cap, k.shape[1]), float("-inf"))
    return reference(q, k, v, bias.to(q.device), scaling, softcap)


def close(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert out.shape == ref.shape
    torch.testing.assert_close(out.float(), ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


# ---- the block mask: exact tiles, cached by content (no compilation) --------------------------------------


@pytest.mark.parametrize("q_len,k_len", [(200, 200), (72, 200), (1, 300), (129, 129), (384, 1000)])
@pytest.mark.parametrize("cap", [None, 1, 16, 130, (0, 16, 1, 300)])
def test_tiles_equal_create_block_mask(q_len, k_len, cap):
    cap = torch.tensor(cap) if isinstance(cap, tuple) else cap
    g = torch.Generator().manual_seed(q_len * 7 + k_len)
    for sink, window in [rows(4, 0), rows(4, 4, 1),
                         (torch.randint(0, 300, (4,), generator=g), torch.randint(0, 400, (4,), generator=g)),
                         (torch.tensor([0, 3, 128, 129]), torch.tensor([0, 128, 127, 1]))]:
        ours = flex.block_mask(sink, window, cap, q_len, k_len, 8, "cpu")
        theirs = create_block_mask(ours.mask_mod, None, 8, q_len, k_len, device="cpu")
        for n, i, n_ref, i_ref in [
            (ours.kv_num_blocks, ours.kv_indices, theirs.kv_num_blocks, theirs.kv_indices),
            (ours.full_kv_num_blocks, ours.full_kv_indices,
             theirs.full_kv_num_blocks, theirs.full_kv_indices),
        ]:
            assert torch.equal(n, n_ref)
            listed = torch.arange(i.shape[-1]) < n.unsqueeze(-1)  # only the listed tiles count, in any order
            assert torch.equal(torch.where(listed, i, -1).sort(-1).values,
                               torch.where(listed, i_ref, -1).sort(-1).values)


def test_block_mask_cached_by_content():
    a = flex.block_mask(torch.tensor([4, 0]), torch.tensor([7, 100]), None, 200, 200, 4, "cpu")
    assert flex.block_mask(torch.tensor([4, 0]), torch.tensor([7, 100]), None, 200, 200, 4, "cpu") is a
    assert flex.block_mask(torch.tensor([4, 0]), torch.tensor([7, 101]), None, 200, 200, 4, "cpu") is not a
    assert flex.block_mask(torch.tensor([4, 0]), torch.tensor([7, 100]), 16, 200, 200, 4, "cpu") is not a


def test_long_streaming_mask_is_sparse():
    """B_streaming_128 at T = 8192: a query tile meets at most 3 key tiles (sink, two window tiles)."""
    mask = flex.block_mask(torch.full((3,), 4), torch.full((3,), 124), None, 8192, 8192, 9, "cpu")
    seen = mask.kv_num_blocks + mask.full_kv_num_blocks
    assert int(seen.max()) <= 3 and mask.sparsity() > 90


# ---- hard attention: compiled flex == dense reference ---------------------------------------------------


def test_available_on_cpu():
    assert flex.available("cpu")


@pytest.mark.parametrize("sink", [0, 4])
@pytest.mark.parametrize("cap", [None, 16, (40, 0, 16)])  # one for the layer, or per KV head (0: none)
def test_hard_gqa_square(sink, cap):  # 9 query heads on 3 KV heads, T = 200 (not a multiple of 128)
    cap = torch.tensor(cap) if isinstance(cap, tuple) else cap
    q, k, v = qkv(9, 3, 200, 200)
    for shift in (0, 1):
        s, w = rows(3, sink, shift)
        with torch.no_grad():
            out = flex.hard_attention(q, k, v, s, w, cap, None)
        close(out, hard_reference(q, k, v, s, w, cap))


@pytest.mark.parametrize("cap", [None, 16])
def test_hard_gqa_softcap(cap):
    q, k, v = qkv(9, 3, 200, 200, seed=1)
    q = q * 4  # large scores, so the soft cap matters
    s, w = torch.tensor([4, 0, 4]), torch.tensor([10**9, 7, 100])
    with torch.no_grad():
        out = flex.hard_attention(q, k, v, s, w, cap, 0.1, softcap=50.0)
    close(out, hard_reference(q, k, v, s, w, cap, 0.1, 50.0))


@pytest.mark.parametrize("sink,cap", [(0, None), (4, 16)])
def test_hard_mha_fewer_queries(sink, cap):  # 4 heads, the last 72 queries of 200 keys
    q, k, v = qkv(4, 4, 72, 200, seed=2)
    s, w = rows(4, sink)
    with torch.no_grad():
        out = flex.hard_attention(q, k, v, s, w, cap, None)
    close(out, hard_reference(q, k, v, s, w, cap))


@pytest.mark.parametrize("sink,cap,window", [(0, None, 10**9), (4, 16, 7), (4, None, 1)])
def test_hard_mqa_fewer_queries_softcap(sink, cap, window):  # 4 query heads on 1 KV head, 50 of 200
    q, k, v = qkv(4, 1, 50, 200, seed=3)
    s, w = torch.tensor([sink]), torch.tensor([window])
    with torch.no_grad():
        out = flex.hard_attention(q, k * 3, v, s, w, cap, None, softcap=50.0)
    close(out, hard_reference(q, k * 3, v, s, w, cap, None, 50.0))


# ---- soft attention ------------------------------------------------------------------------------------


def soft_reference(q, k, v, sink, window_float, tau, cap=None, kind="linear"):
    q_len, k_len = q.shape[2], k.shape[2]
    q_pos, k_pos = torch.arange(k_len - q_len, k_len), torch.arange(k_len)
    bias = win.soft_bias(q_pos.to(q.device), k_pos.to(q.device), sink.to(q.device), window_float, tau,
                         kind=kind)
    bias = bias.masked_fill(beyond_cap(q_pos, k_pos, cap, k.shape[1]).to(q.device), float("-inf"))
    return reference(q, k, v, bias)


def test_soft_forward_matches_soft_bias():
    q, k, v = qkv(9, 3, 200, 200, seed=4)
    sink, window = torch.tensor([0, 4, 4]), torch.tensor([3.3, 40.0, 150.7])
    caps = torch.tensor([0, 30, 16])
    for tau, cap, kind in [(0.5, None, "linear"), (4.0, 16, "linear"), (1.0, caps, "linear"),
                           (0.5, None, "log"), (0.2, caps, "log")]:
        with torch.no_grad():
            out = flex.soft_attention(q, k, v, sink, window, tau, cap, None, kind=kind)
        close(out, soft_reference(q, k, v, sink, window, tau, cap, kind))


def test_soft_backward_into_query_refused_on_cpu():
    q, k, v = qkv(9, 3, 200, 200)
    window = torch.tensor([3.0, 40.0, 150.0], requires_grad=True)
    with pytest.raises(NotImplementedError):
        flex.soft_attention(q.requires_grad_(), k, v, torch.zeros(3, dtype=torch.long), window, 1.0, None,
                            None)


@pytest.mark.parametrize("kind, cap, q_len, tau", [
    ("linear", None, 200, 2.0), ("log", None, 200, 0.5), ("linear", (0, 30, 16), 200, 8.0),
    ("linear", 64, 72, 0.5)])
def test_window_gradient_equals_the_dense_soft_bias_float64(kind, cap, q_len, tau):
    """The window's gradient of the flex path (two forwards, no flex backward: it runs on CPU) is the
    dense soft bias's, in float64, with sinks, a native cap and queries that are the last of the keys."""
    q, k, v = (t.double() for t in qkv(9, 3, q_len, 200, seed=7))
    sink = torch.tensor([0, 4, 4])
    cap = torch.tensor(cap) if isinstance(cap, tuple) else cap
    weight = torch.randn(2, q_len, 9, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = []
    for use_flex in (True, False):
        w = torch.tensor([3.3, 40.0, 150.7], dtype=torch.float64, requires_grad=True)
        out = (flex.soft_attention(q, k, v, sink, w, tau, cap, None, kind=kind) if use_flex
               else soft_reference(q, k, v, sink, w, tau, cap, kind))
        (out * weight).sum().backward()
        grads.append(w.grad)
    assert grads[1].abs().max() > 1e-3  # the gradient is not trivially zero
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-9, atol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention has no backward on CPU; CUDA only")
def test_soft_gradient_matches_soft_bias_cuda():
    q, k, v = qkv(9, 3, 200, 200, seed=5, device="cuda")
    sink = torch.tensor([0, 4, 4], device="cuda")
    grads = []
    for use_flex in (True, False):
        w = torch.tensor([3.3, 40.0, 150.7], device="cuda", requires_grad=True)
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        out = (flex.soft_attention(qq, kk, vv, sink, w, 2.0, 64, None) if use_flex
               else soft_reference(qq, kk, vv, sink, w, 2.0, 64))
        (out.float() * torch.linspace(-1, 1, out.shape[-1], device="cuda")).sum().backward()
        grads.append([w.grad, qq.grad, kk.grad, vv.grad])
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3 * float(want.abs().max()))


def test_a_linear_soft_window_skips_tiles_far_past_its_edge():
    """The block mask of a linear soft window stops BAND_TAUS x tau past w (whole tiles); the log edge and a
    reach beyond the keys see every causal key."""
    reach = flex._reach(torch.tensor([3.3, 200.0, 4000.0]), 0.5, "linear", 4096)
    assert reach.tolist() == [flex.BLOCK, 2 * flex.BLOCK, flex._NO_CAP]
    assert flex._reach(torch.tensor([3.3]), 0.5, "log", 4096).tolist() == [flex._NO_CAP]
    partial, full = flex.tiles(torch.tensor([0]), reach[:1], None, 4096, 4096)
    assert int((partial | full).sum()) < 3 * 4096 // flex.BLOCK  # a band, not the causal triangle
