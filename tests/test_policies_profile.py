"""Families G, I, J, K: the study's Eff.Ctx values, their budgets, and their refusals."""

from __future__ import annotations

import random

import pytest
import torch

from headkv.alloc.allocation import Allocation, AllocationError
from headkv.alloc.policies import TYPE_WINDOWS, PolicyContext, build, families
from headkv.classify.profile import HeadProfile

STUDY_COUNTS = {"positional": 370, "mixed": 566, "gathering": 88}


def study_profile(seed: int = 0) -> HeadProfile:
    """A synthetic 32x32 profile (Pythia-2.8b's shape) with the study's class counts, shuffled."""
    labels = [k for k, n in STUDY_COUNTS.items() for _ in range(n)]
    rng = random.Random(seed)
    rng.shuffle(labels)
    conf = [rng.random() for _ in labels]
    grid = lambda xs: [xs[i * 32 : (i + 1) * 32] for i in range(32)]  # noqa: E731
    return HeadProfile(grid(labels), grid(conf), model_id="pythia-2.8b")


@pytest.fixture
def ctx():
    return PolicyContext((32, 32), 1, "pythia-2.8b", study_profile())


@pytest.mark.parametrize(
    "name, eff",
    [
        ("I_pos256_mix128_g128", 178.25),
        ("I_pos512_mix64_g128", 235.375),
        ("I_pos256_mix64_g128", 142.875),
        ("J_pos64_mix64_g128", 73.5),
        ("K_uniform64_aware", 68.0),
        ("K_uniform128_aware", 132.0),
    ],
)
def test_study_eff_ctx(ctx, name, eff):
    assert build(name, ctx).eff_ctx() == pytest.approx(eff, abs=1e-9)


def test_registry_has_every_family():
    assert {"A", "B", "G", "I", "J", "K"} <= set(families())


@pytest.mark.parametrize("t", [0.3, 0.55, 0.8])
@pytest.mark.parametrize("base", [64, 128])
def test_g_gives_confident_heads_their_type_window(ctx, t, base):
    alloc = build(f"G_conf{t}_base{base}", ctx)
    prof = ctx.profile
    expect = [
        TYPE_WINDOWS[lab] if c >= t else base
        for lr, cr in zip(prof.labels, prof.confidence, strict=True)
        for lab, c in zip(lr, cr, strict=True)
    ]
    assert [w for row in alloc.window for w in row] == expect
    assert {s for row in alloc.sink for s in row} == {4}
    assert alloc.eff_ctx() == pytest.approx(4 + sum(expect) / len(expect))


NAMES = [
    "A_window_64",
    "B_streaming_128",
    "G_conf0.6_base64",
    "G_conf0.4_base128",
    "I_pos128_mix64_g128",
    "J_pos64_mix64_g128",
    "K_uniform64_aware",
]


@pytest.mark.parametrize("name", NAMES)
def test_every_policy_respects_its_stated_budget(ctx, name):
    alloc = build(name, ctx)
    assert alloc.shape == (32, 32) and alloc.meta["policy"] == name
    assert alloc.eff_ctx() <= alloc.meta["budget"] + 1e-9
    assert alloc.eff_ctx() == pytest.approx(alloc.meta["budget"])


def test_profile_families_refuse_a_missing_or_misshapen_profile():
    with pytest.raises(AllocationError, match="needs a head profile"):
        build("I_pos256_mix128_g128", PolicyContext((32, 32)))
    with pytest.raises(AllocationError, match="32x32 KV heads but the model has 30x3"):
        build("G_conf0.5_base64", PolicyContext((30, 3), 3, "smollm2", study_profile()))
    assert build("K_uniform64_aware", PolicyContext((30, 3))).eff_ctx() == 68.0  # K reads no profile


def test_controls_keep_the_budget_and_destroy_the_structure():
    """shuffled: the same multiset of (sink, window) pairs, moved across heads (only among layers of the
    same native cap); layer_mean: every layer flat (within one token), the total window kept exactly."""
    from headkv.alloc.policies import CONTROLS, control

    gen = torch.Generator().manual_seed(1)
    window = torch.randint(1, 200, (6, 3), generator=gen)
    alloc = Allocation.from_tensors(torch.full((6, 3), 4), window, q_per_kv=3, meta={"policy": "learned_b64"},
                                    native=(0, 64, 0, 64, 0, 0))
    for kind in CONTROLS:
        c = control(alloc, kind)
        assert c.eff_ctx() == pytest.approx(alloc.eff_ctx()) and c.name == f"learned_b64~{kind}"
        assert c.native == alloc.native and c.meta["control_of"] == "learned_b64"
    window = alloc.effective()[1]  # what each head keeps: windows of the capped layers cut to 64
    s = control(alloc, "shuffled").tensors()[1]
    assert not torch.equal(s, window)
    for rows in ([0, 2, 4, 5], [1, 3]):  # permuted only within the heads of one cap
        assert sorted(s[rows].flatten().tolist()) == sorted(window[rows].flatten().tolist())
    flat = control(alloc, "layer_mean").tensors()[1]
    assert int((flat.max(1).values - flat.min(1).values).max()) <= 1
    assert int(flat.sum()) == int(window.sum())
    assert torch.equal(control(alloc, "shuffled").tensors()[1], s)  # seeded: the same control every time
    with pytest.raises(AllocationError, match="unknown control"):
        control(alloc, "reversed")
