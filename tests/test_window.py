"""The one definition of the window semantics, and its soft relaxation."""

from __future__ import annotations

import torch

from models import window as win


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
