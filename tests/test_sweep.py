"""The sweep (grid expansion, resume after Ctrl-C, kill or a torn line), the frontier comparison, figures."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from headkv.alloc.allocation import AllocationError
from headkv.alloc.frontier import compare, compare_all, interpolate, verdict
from headkv.alloc.policies import PolicyContext, resolve
from headkv.alloc.results import read_rows
from headkv.alloc.sweep import expand, run_sweep
from headkv.classify.profile import ClassifierRule, collect_query_stats, from_stats
from headkv.models.loading import model_shape

TESTS = Path(__file__).parent
NAMES = ["full", "A_window_8", "B_streaming_8", "B_streaming_16", "B_streaming_32", "K_uniform8_aware"]
INFO = {"model": "tiny-llama", "corpus": "random", "split": "eval", "tokens": 128, "seq_len": 64}


def test_expand_the_study_grid_from_its_config():
    cfg = yaml.safe_load((TESTS.parent / "configs" / "ablation.yaml").read_text())
    names = expand(cfg["grid"])
    assert len(names) == len(set(names)) == 37
    assert {"full", "A_window_512", "B_streaming_64", "G_conf0.55_base128", "I_pos512_mix64_g128"} <= set(
        names
    )
    assert sum(n.startswith("G_") for n in names) == 16 and sum(n.startswith("I_") for n in names) == 6
    with pytest.raises(AllocationError, match="gives no values for W"):
        expand({"A_window_{W}": None})


def _setup(tiny_model):
    model = tiny_model("llama")
    torch.manual_seed(1)
    blocks = torch.randint(0, 97, (2, 64))
    shape = model_shape(model)
    ctx = PolicyContext(shape.shape, shape.q_per_kv, shape.model_id, None)
    return model, blocks, (lambda names: resolve(ctx, names, []))


def _table(path: Path) -> list[tuple[str, float]]:
    rows = [r for r in read_rows(path) if r.get("kind") == "sweep"]
    return [(r["name"], r["ppl"]) for r in rows]


def test_interrupted_sweep_resumes_to_the_same_rows(tmp_path):
    from conftest import tiny_model

    model, blocks, ent = _setup(tiny_model)
    ref = tmp_path / "ref.jsonl"
    run_sweep(model, blocks, ent(NAMES), ref, INFO)
    out = tmp_path / "run.jsonl"
    seen = []

    def ctrl_c(name, i, n):
        seen.append(name)
        if len(set(seen)) == 3:  # Ctrl-C while the third configuration is in flight
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_sweep(model, blocks, ent(NAMES), out, INFO, ctrl_c)
    assert [n for n, _ in _table(out)] == NAMES[:2]
    with out.open("a") as f:  # and a kill during a write: a torn last line
        f.write('{"kind": "sweep", "name": "B_str')
    rows = run_sweep(model, blocks, ent(NAMES), out, INFO)
    assert _table(out) == _table(ref) and [r["name"] for r in rows] == NAMES
    run_sweep(model, blocks, ent(NAMES), out, INFO)  # a finished sweep adds nothing
    assert _table(out) == _table(ref)
    other = run_sweep(model, blocks[:1], ent(NAMES[:2]), out, INFO)  # other tokens: other keys, new rows
    assert len(_table(out)) == len(NAMES) + 2 and {r["key"] for r in other}.isdisjoint(r["key"] for r in rows)


def test_two_files_with_one_policy_name_never_collide(tmp_path):
    """Two seeds' learned_b64: same label, different content -> two rows, shown under distinct labels."""
    from conftest import tiny_model

    from headkv.alloc.allocation import Allocation

    model, blocks, _ = _setup(tiny_model)
    shape = model_shape(model)
    files = []
    for seed, w in ((0, 5), (1, 9)):
        path = tmp_path / f"run_s{seed}" / "allocation.json"
        Allocation.uniform(shape.shape, 2, w, model_id=shape.model_id, q_per_kv=shape.q_per_kv,
                           meta={"policy": "learned_b64"}).save(path)
        files.append(str(path))
    ctx = PolicyContext(shape.shape, shape.q_per_kv, shape.model_id, None)
    out = tmp_path / "r.jsonl"
    first = run_sweep(model, blocks, resolve(ctx, [], files[:1]), out, INFO)
    rows = run_sweep(model, blocks, resolve(ctx, [], files), out, INFO)
    assert [r["name"] for r in rows] == ["learned_b64@run_s0", "learned_b64@run_s1"]
    assert rows[0]["ppl"] == first[0]["ppl"] and rows[1]["ppl"] != rows[0]["ppl"]
    assert len(_table(out)) == 2  # the second file was measured, not skipped as done


KILLED_RUN = """
import sys, time, torch
sys.path.insert(0, {tests!r})
from conftest import tiny_model
from headkv.alloc.policies import PolicyContext, resolve
from headkv.alloc.sweep import run_sweep
from headkv.models.loading import model_shape
model = tiny_model("llama")
torch.manual_seed(1)
blocks = torch.randint(0, 97, (2, 64))
shape = model_shape(model)
ctx = PolicyContext(shape.shape, shape.q_per_kv, shape.model_id, None)
entries = resolve(ctx, {names!r}, [])
run_sweep(model, blocks, entries, sys.argv[1], {info!r}, lambda name, i, n: time.sleep(0.3))
"""


def test_killed_sweep_resumes_to_the_same_rows(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(KILLED_RUN.format(tests=str(TESTS), names=NAMES, info=INFO)))
    from conftest import tiny_model

    model, blocks, ent = _setup(tiny_model)
    out, ref = tmp_path / "killed.jsonl", tmp_path / "ref.jsonl"
    run_sweep(model, blocks, ent(NAMES), ref, INFO)  # the same model, blocks and names, uninterrupted
    proc = subprocess.Popen([sys.executable, str(script), str(out)], cwd=TESTS.parent)
    deadline = time.time() + 120
    while time.time() < deadline and len(_table(out)) < 2 and proc.poll() is None:
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 2 <= len(_table(out)) < len(NAMES)
    run_sweep(model, blocks, ent(NAMES), out, INFO)  # the rerun
    assert _table(out) == _table(ref) and len({n for n, _ in _table(out)}) == len(NAMES)


# ---- the frontier comparison ------------------------------------------------------------------------
STUDY_B = {64: 10.57, 128: 9.52, 256: 9.14, 512: 8.81}


def test_interpolation_reproduces_the_study_reading():
    xs, ys = list(STUDY_B), list(STUDY_B.values())
    assert interpolate(68, xs, ys)[0] == pytest.approx(10.48, abs=0.005)
    assert interpolate(178.25, xs, ys)[0] == pytest.approx(9.339, abs=0.001)
    assert interpolate(128, xs, ys) == (pytest.approx(9.52), False)
    assert interpolate(1024, xs, ys)[1] is True


def _row(name: str, ctx: float, nll: np.ndarray) -> dict:
    cnt = [128] * len(nll)
    return {
        "name": name,
        "eff_ctx": ctx,
        "ppl": float(np.exp(nll.sum() / sum(cnt))),
        "acc": 0.5,
        "chunk_nll": nll.tolist(),
        "chunk_tokens": cnt,
        "n_blocks": 8,  # 4 consecutive chunks per block
    }


def test_paired_interval_against_the_frontier():
    rng = np.random.default_rng(0)
    base = rng.normal(3.0, 0.3, 32) * 128  # shared per-chunk difficulty
    b64, b128 = _row("B_streaming_64", 64, base + 0.2 * 128), _row("B_streaming_128", 128, base)
    same = compare(_row("K_uniform60_aware", 64, base + 0.2 * 128), [b64, b128])
    assert same["delta"] == pytest.approx(0) and verdict(same) == "tie"
    good = compare(_row("G_x", 90, base + 0.01 * 128), [b64, b128])
    assert good["delta_lo"] <= good["delta"] <= good["delta_hi"] < 0 and verdict(good) == "better"
    worse = _row("A_window_64", 64, base + 0.5 * 128)
    bad = compare(worse, [b64, b128])
    assert verdict(bad) == "worse" and bad["ratio"] > 1
    assert [c["name"] for c in compare_all([b64, b128, worse])] == [
        "B_streaming_64",
        "B_streaming_128",
        "A_window_64",
    ]


# ---- figures ----------------------------------------------------------------------------------------
def test_plots_draw_six_figures_from_a_tiny_sweep(tmp_path):
    from conftest import tiny_model

    from headkv.alloc.plots import plot_all

    model, blocks, _ = _setup(tiny_model)
    rule = ClassifierRule(q_from=8, short=4, long=8)
    shape = model_shape(model)
    prof = from_stats(collect_query_stats(model, blocks, rule), rule, shape.model_id, shape.q_per_kv)
    ctx = PolicyContext(shape.shape, shape.q_per_kv, shape.model_id, prof)
    names = NAMES + [
        "A_window_16",
        "A_window_32",
        "G_conf0.1_base8",
        "G_conf0.6_base8",
        "G_conf0.1_base16",
        "I_pos16_mix8_g8",
        "I_pos32_mix8_g8",
        "J_pos8_mix8_g16",
    ]
    rows = run_sweep(model, blocks, resolve(ctx, names, []), tmp_path / "r.jsonl", INFO)
    paths = plot_all(rows, tmp_path / "fig")
    assert [p.name for p in paths] == [
        "ppl_vs_ctx.png",
        "sink_importance.png",
        "confidence_threshold.png",
        "best_configs.png",
        "inverse.png",
        "frontier.png",
    ]
    assert all(p.stat().st_size > 10_000 and p.read_bytes()[:4] == b"\x89PNG" for p in paths)
    assert not list((tmp_path / "fig").glob(".*"))  # no temporary files left
    json.dumps(rows)  # rows stay plain JSON
