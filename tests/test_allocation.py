"""Allocation value type: JSON round trip, validation, and its three measures."""

from __future__ import annotations

import json

import pytest
import torch

from headkv.alloc.allocation import Allocation, AllocationError
from headkv.alloc.policies import PolicyContext, build
from headkv.models import window as win


def _varied() -> Allocation:
    return Allocation(
        ((4, 0, 2), (1, 4, 4)), ((60, 8, 100), (3, 124, 1)), "m", 3, {"policy": "x", "budget": 70}
    )


def test_json_round_trip(tmp_path):
    a = _varied()
    path = a.save(tmp_path / "a.json")
    b = Allocation.load(path)
    assert b == a and b.meta == a.meta and b.model_id == "m" and b.q_per_kv == 3
    assert json.loads(path.read_text())["format_version"] == 1
    assert not list(tmp_path.glob(".*tmp"))  # atomic write leaves no temp file


def test_eff_ctx_is_sink_plus_mean_window():
    a = _varied()
    assert a.eff_ctx() == pytest.approx((4 + 0 + 2 + 1 + 4 + 4 + 60 + 8 + 100 + 3 + 124 + 1) / 6)


def test_realized_context_matches_brute_force():
    a = _varied()
    T = 50
    s, w = a.tensors()
    q = torch.arange(T)
    visible = win.allowed(q, q, s.flatten(), w.flatten()).sum(-1).double()  # (H, T)
    assert a.realized_context(T) == pytest.approx(float(visible.mean()))


def test_kv_bytes_counts_kept_keys():
    a = _varied()
    T, hd = 64, 16
    pairs = zip(sum(a.sink, ()), sum(a.window, ()), strict=True)
    kept = [min(T, s + w) for s, w in pairs]
    assert a.kv_bytes(T, hd, torch.float16) == 2 * sum(kept) * hd * 2
    assert a.kv_bytes(T, hd, torch.float32) == 2 * a.kv_bytes(T, hd, torch.float16)


@pytest.mark.parametrize(
    "body, message",
    [
        ({"format_version": 1, "shape": [2, 2], "sink": [[0, 0], [0, 0]], "window": [[1, 1]]}, "shape"),
        ({"format_version": 1, "shape": [1, 2], "sink": [[0, -1]], "window": [[1, 1]]}, "negative"),
        ({"format_version": 1, "shape": [1, 2], "sink": [[0, 0]], "window": [[1, 1.5]]}, "non-integer"),
        ({"format_version": 1, "shape": [1, 2], "sink": [[0, 0]], "window": [[0, 1]]}, "at least 1"),
        ({"format_version": 9, "shape": [1, 1], "sink": [[0]], "window": [[1]]}, "format_version"),
        ({"format_version": 1, "shape": [1, 1], "sink": [[0]]}, "lacks window"),
        ([1, 2], "JSON object"),
    ],
)
def test_validation_messages(tmp_path, body, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(body))
    with pytest.raises(AllocationError, match=message):
        Allocation.load(path)


def test_malformed_json_and_missing_file(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("{ not json")
    with pytest.raises(AllocationError, match="not valid JSON"):
        Allocation.load(path)
    with pytest.raises(AllocationError, match="cannot read"):
        Allocation.load(tmp_path / "missing.json")


def test_check_model_refuses_other_shapes():
    a = Allocation.uniform((2, 3), 4, 10, q_per_kv=3)
    a.check_model("m", (2, 3), 3)
    with pytest.raises(AllocationError, match="has shape 2x3"):
        a.check_model("m", (30, 3), 3)


@pytest.mark.parametrize("c", [64, 128, 256, 512])
def test_study_families_a_and_b(c):
    ctx = PolicyContext((30, 3), 3, "m")
    a, b = build(f"A_window_{c}", ctx), build(f"B_streaming_{c}", ctx)
    assert a.eff_ctx() == c and b.eff_ctx() == c
    assert set(sum(a.sink, ())) == {0} and set(sum(b.sink, ())) == {4}
    assert b.meta["policy"] == f"B_streaming_{c}" and b.q_per_kv == 3


def test_unknown_policy_is_refused():
    with pytest.raises(AllocationError, match="unknown policy 'Z_nope'"):
        build("Z_nope", PolicyContext((2, 2)))
