"""Head statistics on hand-built maps, the classifier rule, attention capture, profiles and sensitivity."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from headkv.classify import stats as st
from headkv.classify.profile import (
    LABELS,
    ClassifierRule,
    HeadProfile,
    ProfileError,
    classify,
    collect_query_stats,
    from_stats,
    kv_reduce,
)
from headkv.classify.sensitivity import class_sensitivity, head_sensitivity, one_head_cut, rank_report
from headkv.models.attention import captured, is_clean
from headkv.models.loading import model_shape

T = 40


def _causal_uniform(t: int = T) -> torch.Tensor:
    a = torch.ones(t, t).tril()
    return a / a.sum(-1, keepdim=True)


def test_all_mass_on_key0_is_a_sink_head():
    a = torch.zeros(1, T, T)
    a[..., 0] = 1.0
    assert st.sink_mass(a, sink=4).item() == pytest.approx(1.0)
    assert st.sink_mass(a, sink=1).item() == pytest.approx(1.0)
    assert st.local_mass(a, 8, sink=4, q_from=10).item() == pytest.approx(0.0)
    assert st.far_mass(a, 4, 8).item() == pytest.approx(0.0)
    assert st.entropy(a).item() == pytest.approx(0.0, abs=1e-6)


def test_diagonal_is_a_local_head():
    a = torch.eye(T).unsqueeze(0)
    assert st.local_mass(a, 1, sink=0).item() == pytest.approx(1.0)
    assert st.local_mass(a, 16, sink=4, q_from=4).item() == pytest.approx(1.0)
    assert st.mean_distance(a).item() == pytest.approx(0.0)
    peak, where = st.offset_peak(a, 8)
    assert peak.item() == pytest.approx(1.0) and where.item() == 0


def test_previous_token_head_peaks_at_offset_one():
    a = torch.zeros(1, T, T)
    a[0, 0, 0] = 1.0
    a[0, torch.arange(1, T), torch.arange(T - 1)] = 1.0
    peak, where = st.offset_peak(a, 8)
    assert peak.item() == pytest.approx(1.0) and where.item() == 1
    assert st.mean_distance(a, q_from=1).item() == pytest.approx(1.0)


def test_uniform_attention_has_entropy_one_and_known_masses():
    a = _causal_uniform().unsqueeze(0)
    assert st.entropy(a).item() == pytest.approx(1.0, abs=1e-5)
    t = torch.arange(20, T, dtype=torch.float64)
    assert st.far_mass(a, 4, 8, q_from=20).item() == pytest.approx(float((1 - 12 / (t + 1)).mean()), abs=1e-5)
    assert st.mean_distance(a, q_from=20).item() == pytest.approx(float((t / 2).mean()), abs=1e-4)


def test_masses_decompose_and_follow_window_semantics():
    torch.manual_seed(0)
    a = torch.rand(3, T, T).tril()
    a = a / a.sum(-1, keepdim=True)
    s = st.head_stats(a, sink=4, windows=(4, 16), q_from=24)
    for w in (4, 16):
        total = s["sink_mass"] + s[f"local_mass_{w}"] + s[f"far_mass_{w}"]
        assert torch.allclose(total, torch.ones(3), atol=1e-5)
    assert (s["far_mass_16"] <= s["far_mass_4"] + 1e-6).all()
    with pytest.raises(ValueError):
        st.entropy(torch.rand(2, 4, 5))


def test_classifier_labels_follow_the_hard_rule_and_confidence_is_informative():
    rule = ClassifierRule(tau=0.2)
    rng = np.random.default_rng(0)
    short = rng.uniform(0, 1, 500)
    long = short * rng.uniform(0, 1, 500)  # far mass can only shrink as the window grows
    labels, conf, score = classify(short, long, rule)
    hard = np.where(long > 0.2, "gathering", np.where(short <= 0.2, "positional", "mixed"))
    assert (labels == hard).mean() > 0.99  # equal except for ties exactly on the boundary
    assert ((conf >= 0) & (conf <= 1)).all()
    assert len(np.unique(conf.round(6))) > 450  # no pile-up at one value
    for k in LABELS:  # every class has a spread of confidences, not one constant
        assert conf[labels == k].std() > 0.05
    # on a boundary the confidence is ~0; deep inside a class it is high
    _, c_edge, _ = classify(np.array([0.2]), np.array([0.01]), rule)
    _, c_deep, _ = classify(np.array([0.001]), np.array([0.0005]), rule)
    assert c_edge[0] < 0.05 and c_deep[0] > 0.9
    assert np.corrcoef(score, long)[0, 1] > 0.5  # the score ranks heads by how much they need


def test_gqa_rule_takes_the_most_demanding_query_head():
    q = {"far_mass_16": np.array([[0.1, 0.9, 0.2, 0.3]]), "entropy": np.array([[0.2, 0.4, 0.6, 0.8]])}
    kv = kv_reduce(q, q_per_kv=2, gqa="max")
    assert kv["far_mass_16"].tolist() == [[0.9, 0.3]]
    assert np.allclose(kv["entropy"], [[0.3, 0.7]])
    assert np.allclose(kv_reduce(q, 2, "mean")["far_mass_16"], [[0.5, 0.25]])


def test_capture_matches_eager_attention_and_cleans_up(tiny):
    x = torch.randint(0, 97, (1, 24))
    ref = tiny(x).logits
    got = {}
    with captured(tiny, lambda layer, p: got.__setitem__(layer, p)):
        out = tiny(x).logits
    assert torch.equal(out, ref) and is_clean(tiny)
    tiny.set_attn_implementation("eager")
    eager = tiny(x, output_attentions=True).attentions
    tiny.set_attn_implementation("sdpa")
    for layer, probs in got.items():
        assert torch.allclose(probs, eager[layer], atol=1e-5)


def _tiny_profile(model, tau: float = 0.2) -> HeadProfile:
    rule = ClassifierRule(tau=tau, q_from=8, short=4, long=8)
    q = collect_query_stats(model, torch.randint(0, 97, (2, 32)), rule)
    shape = model_shape(model)
    return from_stats(q, rule, shape.model_id, shape.q_per_kv)


def test_profile_from_a_model_round_trips_and_refuses_another_shape(tiny, tmp_path):
    prof = _tiny_profile(tiny)
    shape = model_shape(tiny)
    assert prof.shape == shape.shape and sum(prof.counts().values()) == shape.n_layers * shape.n_kv_heads
    assert np.shape(prof.query_stats["entropy"]) == (shape.n_layers, shape.n_kv_heads * shape.q_per_kv)
    back = HeadProfile.load(prof.save(tmp_path / "p.json"))
    assert back == prof
    prof.check_model(shape)
    other = HeadProfile([["mixed"] * 3] * 5, [[0.5] * 3] * 5)
    with pytest.raises(ProfileError, match="5x3 KV heads") as e:
        other.check_model(shape)
    assert "\n" not in str(e.value)
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ProfileError, match="not valid JSON"):
        HeadProfile.load(tmp_path / "bad.json")
    with pytest.raises(ProfileError, match="unknown head label"):
        HeadProfile([["wide"]], [[0.5]])


def test_sensitivity_measures_one_head_at_a_time(tiny):
    shape = model_shape(tiny)
    cut = one_head_cut(shape, 1, 0, sink=2, window=3, seq_len=32)
    s, w = cut.tensors()
    assert (w == 32).sum() == s.numel() - 1 and (s[1, 0], w[1, 0]) == (2, 3)
    blocks = torch.randint(0, 97, (1, 32))
    sens = head_sensitivity(tiny, blocks, sink=2, window=3)
    assert sens.shape == shape.shape and (sens >= -1e-7).all() and sens.max() > 0
    assert np.allclose(head_sensitivity(tiny, blocks, sink=0, window=32), 0, atol=1e-6)  # no cut, no change
    prof = _tiny_profile(tiny)
    report = rank_report(prof, sens)
    assert {"score", "stat:entropy", "stat:far_mass_8"} <= set(report)
    assert all(-1 <= v["rho"] <= 1 for v in report.values() if not np.isnan(v["rho"]))
    assert sum(v["n"] for v in class_sensitivity(prof, sens).values()) == sens.size
