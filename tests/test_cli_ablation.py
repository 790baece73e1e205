"""`headkv classify`, `headkv sweep` and `headkv plot` end to end on the offline default (tiny token counts),
and their one-line refusals."""

from __future__ import annotations

import json

import numpy as np
import yaml

from headkv.classify.profile import HeadProfile
from tests.conftest import run_cli as run


def _one_error_line(err: str, message: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err


def test_classify_sweep_plot_end_to_end(monkeypatch, capsys, tmp_path, smollm):
    prof = tmp_path / "profile.json"
    code, out, _ = run(monkeypatch, capsys, "classify", "--tokens", "160", "--seq-len", "160",
                       "--no-sensitivity", "--out", str(prof))
    assert code == 0 and "positional" in out and "gathering" in out
    p = HeadProfile.load(prof)
    assert p.shape == (30, 3) and sum(p.counts().values()) == 90 and p.meta["rule"]["gqa"] == "max"
    cfg = tmp_path / "grid.yaml"
    cfg.write_text(yaml.safe_dump({
        "tokens": 49, "seq_len": 49, "profile": str(prof), "out": str(tmp_path / "rows.jsonl"),
        "grid": {"full": None, "B_streaming_{C}": {"C": [8, 16, 32]}, "A_window_{W}": {"W": [16]},
                 "G_conf{t}_base{b}": {"t": [0.5], "b": [8]}, "K_uniform{W}_aware": {"W": [12]}},
    }))
    code, out, _ = run(monkeypatch, capsys, "sweep", str(cfg))
    assert code == 0 and "A_window_16" in out and "B@ctx" in out
    rows = [json.loads(x) for x in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert len(rows) == 7 and all(r["kind"] == "sweep" and r["tokens"] == 48 for r in rows)
    code, out, _ = run(monkeypatch, capsys, "sweep", str(cfg))  # finished: nothing is added
    assert code == 0 and len((tmp_path / "rows.jsonl").read_text().splitlines()) == 7
    code, out, _ = run(monkeypatch, capsys, "plot", str(tmp_path / "rows.jsonl"), "-o", str(tmp_path / "fig"))
    assert code == 0 and len(list((tmp_path / "fig").glob("*.png"))) == 5  # no I rows: no inverse.png


def test_misshapen_or_missing_profile_is_refused_in_one_line(monkeypatch, capsys, tmp_path, smollm):
    small = tmp_path / "small.json"
    HeadProfile([["mixed", "gathering"]] * 2, [[0.5, 0.7]] * 2, model_id="tiny").save(small)
    out_file = tmp_path / "rows.jsonl"
    cases = ((small, "has 2x2 KV heads"), (tmp_path / "none.json", "cannot read head profile"))
    for profile, message in cases:
        cfg = tmp_path / "grid.yaml"
        cfg.write_text(yaml.safe_dump({"tokens": 32, "seq_len": 32, "profile": str(profile),
                                       "out": str(out_file), "grid": {"I_pos{p}_mix64_g128": {"p": [256]}}}))
        code, _, err = run(monkeypatch, capsys, "sweep", str(cfg))
        assert code == 2
        _one_error_line(err, message)
        assert not out_file.exists()
    cfg.write_text(yaml.safe_dump({"grid": {"Z_nope": None}, "out": str(out_file)}))
    code, _, err = run(monkeypatch, capsys, "sweep", str(cfg))
    assert code == 2 and not out_file.exists()
    _one_error_line(err, "unknown policy 'Z_nope'")
    code, _, err = run(monkeypatch, capsys, "plot", str(tmp_path / "missing.jsonl"))
    assert code == 2
    _one_error_line(err, "does not exist")


def test_two_allocation_files_with_one_policy_name_stay_two_rows(tmp_path):
    """Two seeds of learned_b64 must not collapse into one row of a sweep or an evaluation."""
    from headkv.alloc.allocation import Allocation
    from headkv.models.loading import model_shape
    from tests.conftest import tiny_model

    lm = tiny_model("llama")
    shape = model_shape(lm)
    paths = []
    for run_id in ("seed0", "seed1"):
        alloc = Allocation.uniform(shape.shape, 4, 12, model_id=shape.model_id, q_per_kv=shape.q_per_kv,
                                   meta={"policy": "learned_b64", "run_id": run_id})
        paths.append(str(alloc.save(tmp_path / run_id / "allocation.json")))
    from headkv.alloc.policies import PolicyContext, resolve

    ctx = PolicyContext(shape.shape, shape.q_per_kv, shape.model_id)
    assert [e.label for e in resolve(ctx, [], paths)] == ["learned_b64@seed0", "learned_b64@seed1"]


def test_error_bars_never_negative_when_an_interval_misses_its_point():
    from headkv.alloc.plots import _bars

    rows = [{"ppl": 10.0, "ppl_lo": 9.0, "ppl_hi": 12.0}, {"ppl": 10.0, "ppl_lo": 10.5, "ppl_hi": 11.0},
            {"ppl": 5.0, "ppl_lo": float("nan"), "ppl_hi": 4.0}]
    np.testing.assert_allclose(_bars(rows, "ppl"), [[1.0, 0.0, 0.0], [2.0, 1.0, 0.0]])
