"""The one definition of the window semantics, and its soft relaxation."""

from __future__ import annotations

import torch

from headkv.models import window as win


def test_allowed_matches_definition():
    T = 20
    q = torch.arange(T)
    sink, window = torch.tensor([0, 3, 2]), torch.tensor([1, 5, 30])
    mask = win.allowed(q, q, sink, window)  # (H, T, T)
    for h in range(3):
        for t in range(T):
            want = {j for j in range(T) if j <= t and (j < sink[h] or j > t - window[h])}
            assert set(torch.nonzero(mask[h, t]).flatten().tolist()) == want


def test_empty_slots_are_never_attended():
    k_pos = torch.tensor([[0, 1, -1, 5]])  # one head; slot 2 is empty
    mask = win.allowed(torch.tensor([5]), k_pos, torch.tensor([2]), torch.tensor([4]))
    assert mask[0, 0].tolist() == [True, True, False, True]


def test_soft_bias_tends_to_hard_mask():
    T = 24
    q = torch.arange(T)
    sink, window = torch.tensor([4, 0]), torch.tensor([7, 12])
    hard = win.hard_bias(q, q, sink, window, torch.float32)
    for tau in (1.0, 0.1, 0.01):
        soft = win.soft_bias(q, q, sink, window.float(), tau)
        finite = torch.isfinite(hard)
        future = q.view(1, -1, 1) < q.view(1, 1, -1)
        assert torch.equal(torch.isinf(soft), future.expand_as(soft))  # causality stays hard
        gap = (soft[finite] - hard[finite]).abs().max()
        dropped = soft[~finite & torch.isfinite(soft)]
        assert dropped.numel() == 0 or dropped.max() < -0.4 / tau
    assert gap < 1e-6  # at tau = 0.01 the kept keys carry no penalty
    assert torch.equal(torch.exp(win.soft_bias(q, q, sink, window.float(), 1e-3)) > 0.5, hard == 0)


def test_log_edge_tends_to_the_hard_mask_and_reaches_far_keys():
    """The log edge (tau in log-distance) has the same hard limit; unlike the linear edge, a key five
    windows back keeps a share of its weight (``(w / d) ** (1 / tau)``) and so a gradient on the window."""
    T = 120
    q = torch.arange(T)
    sink, window = torch.tensor([4, 0]), torch.tensor([7, 20])
    hard = win.hard_bias(q, q, sink, window, torch.float32)
    soft = win.soft_bias(q, q, sink, window.float(), 1e-3, kind="log")
    assert torch.equal(torch.isinf(soft), (q.view(1, -1, 1) < q.view(1, 1, -1)).expand_as(soft))
    assert torch.equal(torch.exp(soft) > 0.5, hard == 0)
    assert (soft[hard == 0]).abs().max() < 1e-6
    weight = {}
    for kind, tau in (("linear", 2.0), ("log", 0.5)):
        w = torch.tensor([20.0], dtype=torch.float64, requires_grad=True)
        kept = torch.exp(win.soft_bias(q, q, torch.tensor([0]), w, tau, kind=kind))[0, 110, 10]  # 100 back
        weight[kind] = (float(kept.detach()), float(torch.autograd.grad(kept, w)[0]))
    assert weight["linear"][0] < 1e-15 and weight["linear"][1] < 1e-15
    assert abs(weight["log"][0] - 1 / (1 + (100 / 19.5) ** 2)) < 1e-9 and weight["log"][1] > 1e-3


def test_soft_bias_by_distance_equals_the_elementwise_reference():
    """A training block (queries = keys = 0..T-1) takes the per-distance path: the same values, the same
    -inf pattern (causal, native cap, sinks beyond the cap) and the same window gradient as the
    elementwise definition, for sinks 0..7, with and without caps, for both edges."""
    torch.manual_seed(0)
    for t, cap in ((64, None), (64, torch.tensor([16, 16, 16, 16])), (37, torch.tensor([0, 0, 0, 0]))):
        q = torch.arange(t)
        sink = torch.tensor([4, 0, 2, 7])
        window = (torch.rand(4, dtype=torch.float64) * t).requires_grad_(True)  # float64: sums in any order
        for tau, kind in ((2.0, "linear"), (0.3, "linear"), (0.5, "log"), (0.1, "log")):
            fast = win.soft_bias(q, q, sink, window, tau, cap, kind)
            ref = win._soft_bias_dense(q, q, sink, window, tau, cap, kind)
            finite = torch.isfinite(ref)
            assert torch.equal(torch.isfinite(fast), finite)
            assert torch.equal(fast[finite], ref[finite])
            upstream = torch.randn(4, t, t, dtype=torch.float64).masked_fill(~finite, 0)
            g_fast, = torch.autograd.grad((fast.masked_fill(~finite, 0) * upstream).sum(), window)
            g_ref, = torch.autograd.grad((ref.masked_fill(~finite, 0) * upstream).sum(), window)
            assert torch.allclose(g_fast, g_ref, rtol=1e-10, atol=1e-12)
    shifted = torch.arange(5, 5 + 32)  # other positions: the elementwise path, unchanged
    w = torch.full((2,), 9.0)
    assert torch.equal(win.soft_bias(shifted, shifted, torch.tensor([4, 4]), w, 1.0),
                       win._soft_bias_dense(shifted, shifted, torch.tensor([4, 4]), w, 1.0))


def test_slot_positions_invert_slot_for_every_kept_key():
    """Each kept position sits in its slot, each slot holds a kept position or nothing (-1)."""
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        h = 3
        sink = torch.randint(0, 5, (h,), generator=g)
        window = torch.randint(1, 9, (h,), generator=g)
        seen = int(torch.randint(0, 30, (1,), generator=g))
        slots = int((sink + window).max()) + 2
        got = win.slot_positions(seen, sink, window, slots)  # (H, C)
        p = torch.arange(seen)
        held = win.keep(p, seen, sink, window)  # (H, T)
        for head in range(h):
            want = torch.full((slots,), -1)
            for pos in p[held[head]].tolist():
                want[win.slot(pos, int(sink[head]), int(window[head]))] = pos
            assert torch.equal(got[head], want), (seen, sink[head], window[head])
