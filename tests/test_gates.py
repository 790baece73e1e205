"""Learnable window gates: soft -> hard agreement, the budget by construction, exact export."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from headkv.alloc.allocation import Allocation, applied
from headkv.alloc.gates import GateError, SoftMask, WindowGates, budget_windows, round_to_budget
from headkv.alloc.policies import PolicyContext, build
from headkv.models.attention import windowed
from headkv.models.loading import model_shape

SEQ = 64


def spread_gates(shape=(3, 5), budget=20.0, seq_len=SEQ, sink=4, scale=3.0, seed=0) -> WindowGates:
    gates = WindowGates(shape, budget, seq_len, sink)
    with torch.no_grad():
        gates.logits.copy_(scale * torch.randn(shape, generator=torch.Generator().manual_seed(seed)))
    return gates


@pytest.mark.parametrize("arch", ["neox", "llama"])
def test_soft_mask_becomes_the_hard_mask_as_tau_goes_to_zero(arch):
    lm = tiny_model(arch)
    shape = model_shape(lm)
    alloc = spread_gates(shape.shape, budget=12, seq_len=48).export(
        q_per_kv=shape.q_per_kv, model_id=shape.model_id
    )
    sink, window = alloc.tensors()
    assert len(set(window.flatten().tolist())) > 1  # heads really differ
    tokens = torch.randint(0, lm.config.vocab_size, (1, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), applied(lm, alloc):
        hard = lm(tokens).logits
    errors = []
    for tau in (4.0, 0.3, 0.02):
        with torch.no_grad(), windowed(lm, SoftMask(sink, window.float(), tau)):
            errors.append(float((lm(tokens).logits - hard).abs().max()))
    with torch.no_grad():
        full = lm(tokens).logits
    assert errors[-1] < 1e-4 * float(hard.abs().max())
    assert errors[0] > errors[-1]  # the soft edge matters at a large tau
    assert float((full - hard).abs().max()) > 100 * errors[-1]  # and the windows do mask something


@pytest.mark.parametrize("budget", [5.0, 6.5, 20.0, 37.25, 63.0, 64.0])
def test_mean_eff_ctx_equals_the_budget_and_windows_stay_in_range(budget):
    gates = spread_gates(budget=budget, scale=6.0)
    w = gates.windows().detach().double()
    assert abs(gates.sink_count + float(w.mean()) - budget) < 1e-4
    assert float(w.min()) >= 1.0 and float(w.max()) <= SEQ
    assert abs(gates.eff_ctx() - budget) < 1e-4


def test_uniform_start_is_streaming_llm():
    ctx = PolicyContext((3, 5), 1, "m")
    for budget in (16, 33, 64):
        gates = WindowGates((3, 5), budget, SEQ, sink=4)
        assert gates.export().window == build(f"B_streaming_{budget}", ctx).window


def test_implicit_gradient_matches_finite_differences():
    gates = spread_gates(budget=20.0)
    weights = torch.randn(gates.shape, generator=torch.Generator().manual_seed(3)).double()

    def f(z: torch.Tensor) -> torch.Tensor:
        return (budget_windows(z, 16.0, SEQ).double() ** 2 * weights).sum()

    z = gates.logits.detach().double().clone().requires_grad_(True)
    f(z).backward()
    numeric = torch.zeros_like(z)
    eps = 1e-5
    for i in range(z.numel()):
        dz = torch.zeros_like(z).view(-1)
        dz[i] = eps
        numeric.view(-1)[i] = (f(z.detach() + dz.view_as(z)) - f(z.detach() - dz.view_as(z))) / (2 * eps)
    assert torch.allclose(z.grad, numeric, rtol=1e-4, atol=1e-4)
    assert abs(float(z.grad.sum())) > 0  # not the trivial zero gradient


def test_a_training_step_moves_windows_but_keeps_the_budget():
    gates = WindowGates((3, 5), 20.0, SEQ, sink=4)
    opt = torch.optim.Adam(gates.parameters(), lr=0.5)
    target = torch.linspace(1, 40, 15).view(3, 5)
    for _ in range(5):
        opt.zero_grad()
        ((gates.windows() - target) ** 2).mean().backward()
        opt.step()
    w = gates.windows().detach()
    assert float(w.max() - w.min()) > 5
    assert abs(gates.eff_ctx() - 20.0) < 1e-4


@pytest.mark.parametrize("budget", [5.0, 20.0, 20.4, 47.0, 64.0])
def test_export_is_integer_in_range_and_repairs_the_budget(budget):
    gates = spread_gates(budget=budget, scale=5.0)
    alloc = gates.export(model_id="m", q_per_kv=2)
    _, w = alloc.tensors()
    n = w.numel()
    assert int(w.min()) >= 1 and int(w.max()) <= SEQ
    assert alloc.eff_ctx() <= budget + 1e-9
    assert alloc.eff_ctx() > budget - 1.0 / n  # as close as integer windows allow
    if float(n * (budget - 4)).is_integer():
        assert alloc.eff_ctx() == pytest.approx(budget, abs=1e-9)
    assert alloc.meta["policy"] == f"learned_b{budget:g}" and alloc.meta["budget"] == budget
    # rounding keeps the learned order of windows (no head jumps past another by more than one token)
    soft = gates.windows().detach().flatten()
    order = torch.argsort(soft)
    assert bool((w.flatten()[order].diff() >= -1).all())
    assert Allocation.from_dict(alloc.to_dict()) == alloc


def test_export_at_another_budget_re_solves_the_shift():
    gates = spread_gates(budget=20.0)
    for budget in (10.0, 40.0):
        alloc = gates.export(budget)
        assert alloc.eff_ctx() == pytest.approx(budget)
    low, high = gates.export(10.0).tensors()[1], gates.export(40.0).tensors()[1]
    assert bool((high >= low).all())  # the learned ranking of heads is kept


@pytest.mark.parametrize("budget", [4.0, 4.9, 64.5, 1000.0, float("nan")])
def test_infeasible_budget_is_refused(budget):
    with pytest.raises(GateError, match="infeasible"):
        WindowGates((3, 5), budget, SEQ, sink=4)
    gates = WindowGates((3, 5), 20.0, SEQ, sink=4)
    with pytest.raises(GateError, match="infeasible"):
        gates.export(budget)


def test_round_to_budget_refuses_an_impossible_total():
    with pytest.raises(GateError):
        round_to_budget(torch.tensor([2.5, 3.5]), 9, cap=SEQ)
    assert round_to_budget(torch.tensor([2.5, 3.6]), 6, cap=SEQ).tolist() == [2, 4]


@pytest.mark.parametrize("arch", ["neox", "llama"])
def test_the_training_attention_path_equals_sdpa_with_the_repeated_bias(arch):
    """Learnable gates (bias requires grad) take models.attention's broadcast-GQA path; the same soft bias
    without grad takes SDPA with the bias repeated per query head. Same logits, also with a padded row."""
    lm = tiny_model(arch)
    shape = model_shape(lm)
    gates = spread_gates(shape.shape, budget=12, seq_len=40)
    gen = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, lm.config.vocab_size, (2, 40), generator=gen)
    padding = torch.ones(2, 40, dtype=torch.long)
    padding[1, :7] = 0  # left padding on the second row
    for kw in ({}, {"attention_mask": padding}):
        mask = gates.mask(tau=2.0)
        with windowed(lm, mask):
            trained = lm(tokens, **kw).logits
        assert trained.requires_grad  # the gates' path: gradients reach the logits
        frozen = SoftMask(mask.sink, mask.window.detach(), mask.tau)
        with torch.no_grad(), windowed(lm, frozen):
            reference = lm(tokens, **kw).logits
        keep = (padding.bool() if kw else torch.ones_like(padding, dtype=torch.bool)).unsqueeze(-1)
        assert torch.allclose(trained.detach() * keep, reference * keep, atol=1e-5, rtol=1e-4)


def test_broadcast_gqa_attention_has_sdpa_gradients():
    """The broadcast path's value and bias gradient equal SDPA's with the bias repeated per query head."""
    from types import SimpleNamespace

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from headkv.models.attention import _gqa_attention

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 16, 8, generator=gen, dtype=torch.float64) for h in (6, 2, 2))
    bias = torch.randn(2, 16, 16, generator=gen, dtype=torch.float64).tril().requires_grad_(True)
    out = _gqa_attention(q, k, v, bias, None, 0.0, None)
    (g_fast,) = torch.autograd.grad((out * torch.arange(8.0).double()).sum(), bias)
    module = SimpleNamespace(num_key_value_groups=3, is_causal=True)
    repeated = bias.repeat_interleave(3, 0).unsqueeze(0)  # (1, Hq, Q, K)
    ref, _ = sdpa_attention_forward(module, q, k, v, repeated, is_causal=False)
    (g_ref,) = torch.autograd.grad((ref * torch.arange(8.0).double()).sum(), bias)
    assert torch.allclose(out, ref, atol=1e-12) and torch.allclose(g_fast, g_ref, atol=1e-12)
    assert float(g_fast.abs().max()) > 0


def test_warm_start_reproduces_an_allocation_and_scales_it_to_another_budget():
    """``init``: gates started from an exported allocation export the same windows at its budget (the
    shift re-solved is ~0), and at another budget keep its ranking of heads."""
    source = spread_gates(budget=20.0, scale=2.0).export()
    gates = WindowGates((3, 5), 20.0, SEQ, 4)
    gates.warm_start(source)
    again = gates.export()
    assert (again.tensors()[1] - source.tensors()[1]).abs().max() <= 1
    assert again.eff_ctx() == pytest.approx(source.eff_ctx())
    wider = WindowGates((3, 5), 40.0, SEQ, 4)
    wider.warm_start(source)
    w40, w20 = wider.export().tensors()[1].flatten(), source.tensors()[1].flatten()
    assert wider.export().eff_ctx() == pytest.approx(40.0)
    assert bool((w40[torch.argsort(w20)].diff() >= -1).all())  # the source's order of heads is kept


def test_learned_sinks_count_in_the_budget_and_get_gradients():
    """sink_max: each head's sinks are learned too; Eff.Ctx (sinks + windows) is the budget exactly, more
    sink in one head means less window for all (the shift's gradient reaches the sink logits), and the
    export has integer sinks in [0, sink_max] with mean Eff.Ctx <= budget, as close as rounding allows."""
    gates = spread_gates(budget=24.0)
    learned = WindowGates((3, 5), 24.0, SEQ, 4, sink_max=12)
    with torch.no_grad():
        learned.logits.copy_(gates.logits)
        learned.sink_logits.copy_(torch.randn(3, 5, generator=torch.Generator().manual_seed(2)))
    sinks, windows = learned.sinks(), learned.windows()
    assert float((sinks + windows).double().mean()) == pytest.approx(24.0, abs=1e-5)  # float32 windows
    assert learned.eff_ctx() == pytest.approx(24.0, abs=1e-5)
    windows.sum().backward()  # the windows' total is budget - sinks: d/d(sink logit) = -d sink
    ds = 12 * torch.sigmoid(learned.sink_logits) * (1 - torch.sigmoid(learned.sink_logits))
    assert torch.allclose(learned.sink_logits.grad, -ds.detach(), rtol=1e-6, atol=1e-8)
    alloc = learned.export()
    s, w = alloc.tensors()
    assert s.min() >= 0 and s.max() <= 12 and len(set(s.flatten().tolist())) > 1
    assert 24.0 - 1 / 15 < alloc.eff_ctx() <= 24.0 + 1e-9
    assert alloc.meta["sink_max"] == 12 and alloc.meta["policy"] == "learned_sinks_b24"
    start = WindowGates((3, 5), 24.0, SEQ, 4, sink_max=12)  # started at the fixed sinks
    assert torch.allclose(start.sinks(), torch.full((3, 5), 4.0)) and start.export() == \
        WindowGates((3, 5), 24.0, SEQ, 4).export().with_meta(sink_max=12, policy="learned_sinks_b24")
    with pytest.raises(GateError, match="sink <= sink_max < budget"):
        WindowGates((3, 5), 10.0, SEQ, 4, sink_max=12)


def test_soft_sinks_become_the_hard_sinks_as_tau_goes_to_zero():
    from headkv.models import window as win

    t = torch.arange(40)
    sink, window = torch.tensor([0, 3, 9]), torch.tensor([5, 2, 11])
    hard = win.hard_bias(t, t, sink, window, torch.float32)
    soft = win.soft_bias(t, t, sink.float(), window.float(), 1e-3)
    assert torch.equal(torch.isinf(soft), (t.view(-1, 1) < t.view(1, -1)).expand_as(soft))  # only the future
    assert torch.equal(soft.exp() > 0.5, hard == 0)
    fixed = win.soft_bias(t, t, sink, window.float(), 2.0)  # far from the sinks both agree
    learned = win.soft_bias(t, t, sink.float(), window.float(), 2.0)
    far = torch.isfinite(fixed) & (t >= 30)
    assert torch.allclose(learned[far], fixed[far], atol=1e-3)
