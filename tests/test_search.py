"""`headkv search` on a tiny Llama: the bisection's walk is consistent with its curve whatever the curve's
shape (a scripted PPL curve), warm starts go to the nearest trained budget, a resumed search retrains nothing
it finished, an unreachable target is one error line, and the CLI end to end with real training."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import headkv.alloc.search as search
from headkv.alloc.allocation import Allocation
from headkv.alloc.config import SearchConfig, load
from headkv.alloc.runs import load_checkpoint_meta
from headkv.alloc.search import SearchError, nearest, next_budget, prepare, run_search, summary
from headkv.models.loading import load_model, model_shape
from tests.test_passkey import cli_run, make_tiny_dir

TRAIN_YAML = ("max_steps: 2\nval_blocks: 1\neval_every: 1\nlog_every: 1\nckpt_every: 1\nlr: 0.3\n"
              "dtype: float32\n")


@pytest.fixture(scope="module")
def world(tmp_path_factory, smollm):
    root = make_tiny_dir(tmp_path_factory.mktemp("search"), smollm[1])
    (root / "train.yaml").write_text(TRAIN_YAML)
    torch.set_num_threads(1)
    return root


@pytest.fixture(scope="module")
def tiny(world):
    return load_model(str(world / "model"))


def _cfg(world: Path, out: Path, **kw) -> SearchConfig:
    given = {"model": str(world / "model"), "corpus": str(world / "text.txt"), "seq_len": 64, "n_blocks": 4,
             "budget_min": 5, "budget_max": 64, "max_ppl_increase": 0.02, "tolerance": 0.0, "threads": 1,
             "train_config": str(world / "train.yaml"), "out_dir": str(out), **kw}
    return load(SearchConfig, None, given)


class Scripted:
    """Stand-ins for training and evaluation: ``fit`` exports StreamingLLM at the budget (and records its
    budget and warm start); ``evaluate`` gives each budget the PPL ``full x (1 + increase(budget))`` (the
    full-attention blocks' NLL scaled, so the paired increase agrees with it)."""

    def __init__(self, monkeypatch, increase, stop_after: int | None = None,
                 stop: BaseException = KeyboardInterrupt()) -> None:
        self.increase, self.stop_after, self.stop, self.calls = increase, stop_after, stop, []
        self.real_evaluate, self.full = search.evaluate, None
        monkeypatch.setattr(search, "fit", self.fit)
        monkeypatch.setattr(search, "evaluate", self.evaluate)

    def fit(self, lm, tok, cfg, run_dir, run_id, resume=None, progress=True):
        if self.stop_after is not None and len(self.calls) == self.stop_after:
            raise self.stop
        self.calls.append((int(cfg.budget), cfg.init))
        shape = model_shape(lm)
        meta = {"budget": cfg.budget, "steps": cfg.max_steps}
        alloc = Allocation.uniform(shape.shape, cfg.sink, int(cfg.budget) - cfg.sink, q_per_kv=shape.q_per_kv,
                                   model_id=shape.model_id, meta=meta)
        alloc.save(Path(run_dir) / "allocation.json")
        return alloc

    def evaluate(self, lm, alloc, blocks, **kw):
        full = self.real_evaluate(lm, None, blocks, **kw)
        if alloc is None:
            return full
        k = math.log(full.ppl * (1 + self.increase(int(alloc.meta["budget"])))) / math.log(full.ppl)
        nll = [x * k for x in full.chunk_nll]
        return replace(full, ppl=full.ppl**k, chunk_nll=nll, eff_ctx=alloc.eff_ctx())


def _search(world, tiny, out, **kw):
    lines: list[str] = []
    state = run_search(prepare(_cfg(world, out, **kw)), *tiny, report=lines.append)
    return state, lines


def _check_walk(state: dict, tolerance: float) -> None:
    """The chosen budget agrees with the curve walked: every passing budget >= it, every failing one below
    it, the largest failing one within the tolerance (or next to it)."""
    chosen = state["chosen"]["budget"]
    passing = [r["budget"] for r in state["curve"] if r["passes"]]
    failing = [r["budget"] for r in state["curve"] if not r["passes"]]
    assert chosen == min(passing) and all(b >= chosen for b in passing)
    assert all(b < chosen for b in failing)
    if failing:
        lo = max(failing)
        assert chosen / lo <= 1 + tolerance or chosen - lo <= 1


@pytest.mark.parametrize("tolerance", [0.0, 0.25])
def test_bisection_finds_the_smallest_passing_budget_of_a_monotone_curve(world, tiny, tmp_path, monkeypatch,
                                                                         tolerance):
    fake = Scripted(monkeypatch, lambda b: 0.03 * 25 / b)  # passes (<= 0.02) from budget 38 on
    state, lines = _search(world, tiny, tmp_path / "s", tolerance=tolerance)
    _check_walk(state, tolerance)
    budgets = [r["budget"] for r in state["curve"]]
    assert budgets[:2] == [64, 5]  # budget_max first, then budget_min
    if tolerance == 0:
        assert state["chosen"]["budget"] == 38 and 37 in budgets  # exact: 37 fails, 38 passes
    assert len(budgets) <= 2 + math.ceil(math.log2(math.log(64 / 5) / math.log(1 + max(tolerance, 0.02))))
    # warm starts: the first probe from StreamingLLM, each later one from the nearest budget trained before it
    assert fake.calls[0] == (64, None) and state["curve"][0]["init"] is None
    for i, row in enumerate(state["curve"][1:], 1):
        warm = nearest(row["budget"], budgets[:i])
        assert row["init_budget"] == warm and row["init"] == str(tmp_path / "s" / "probes" / f"b{warm}" /
                                                                 "allocation.json")
        assert fake.calls[i] == (row["budget"], row["init"])
    # the files: search.json is the state returned, allocation.json the chosen probe's, the figure
    assert json.loads((tmp_path / "s" / "search.json").read_text()) == json.loads(json.dumps(state))
    alloc = Allocation.load(tmp_path / "s" / "allocation.json")
    assert alloc.meta["budget"] == state["chosen"]["budget"] and alloc.meta["search"]["target_ppl"] > 0
    assert (tmp_path / "s" / "search.png").stat().st_size > 0
    assert len(lines) == 1 + len(budgets)  # the target, then one line per probe
    text = summary(state)
    assert f"chosen budget {state['chosen']['budget']}" in text and "KV at 64 tokens" in text


def test_any_curve_shape_keeps_the_walk_consistent(world, tiny, tmp_path, monkeypatch):
    bumpy = lambda b: 0.0 if 9 <= b <= 12 or b >= 30 else 0.05  # noqa: E731  (not monotone)
    Scripted(monkeypatch, bumpy)
    state, _ = _search(world, tiny, tmp_path / "s")
    _check_walk(state, 0.0)


def test_budget_min_that_passes_is_chosen_and_said(world, tiny, tmp_path, monkeypatch):
    Scripted(monkeypatch, lambda b: 0.0)
    state, _ = _search(world, tiny, tmp_path / "s", budget_min=8)
    assert [r["budget"] for r in state["curve"]] == [64, 8]
    assert state["chosen"]["budget"] == 8 and state["chosen"]["at_budget_min"]
    assert "--budget-min 8 already passes" in summary(state)


def test_a_target_even_budget_max_misses_is_one_error_with_the_numbers(world, tiny, tmp_path, monkeypatch):
    fake = Scripted(monkeypatch, lambda b: 0.5)
    with pytest.raises(SearchError, match=r"even --budget-max 64 misses the target: PPL [\d.]+ > [\d.]+"):
        _search(world, tiny, tmp_path / "s")
    saved = json.loads((tmp_path / "s" / "search.json").read_text())
    assert saved["status"] == "target-missed" and [r["budget"] for r in saved["curve"]] == [64]
    assert saved["chosen"] is None and (tmp_path / "s" / "search.png").exists()
    assert len(fake.calls) == 1
    with pytest.raises(SearchError, match="misses the target"):  # rerun: read back, not retrained
        _search(world, tiny, tmp_path / "s")
    assert len(fake.calls) == 1


def test_an_interrupted_search_resumes_without_retraining(world, tiny, tmp_path, monkeypatch):
    curve = lambda b: 0.03 * 25 / b  # noqa: E731
    Scripted(monkeypatch, curve)
    whole, _ = _search(world, tiny, tmp_path / "whole")
    fake = Scripted(monkeypatch, curve, stop_after=3)  # Ctrl-C while the 4th probe trains
    with pytest.raises(KeyboardInterrupt):
        _search(world, tiny, tmp_path / "s")
    assert len(json.loads((tmp_path / "s" / "search.json").read_text())["curve"]) == 3
    fake.stop_after = None
    state, lines = _search(world, tiny, tmp_path / "s")
    walked = [r["budget"] for r in state["curve"]]
    assert walked == [r["budget"] for r in whole["curve"]] and state["chosen"]["budget"] == 38
    assert [b for b, _ in fake.calls] == walked  # each budget trained once, over both runs
    assert sum("read back from search.json" in line for line in lines) == 3
    _search(world, tiny, tmp_path / "s")  # finished: a rerun trains nothing
    assert len(fake.calls) == len(walked)


def test_ctrl_c_in_the_cli_keeps_finished_probes_and_says_so(world, tmp_path, monkeypatch):
    Scripted(monkeypatch, lambda b: 0.0, stop_after=1, stop=SystemExit(1))  # Lightning's answer to Ctrl-C
    out = tmp_path / "s"
    r = cli_run("search", "--model", str(world / "model"), "--corpus", str(world / "text.txt"),
                "--seq-len", "64", "--n-blocks", "4", "--train-config", str(world / "train.yaml"),
                "--budget-min", "8", "--budget-max", "64", "--out-dir", str(out))
    assert r.returncode == 130 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert f"interrupted: finished probes are kept in {out}; rerun the same command to resume" in r.stderr
    assert [row["budget"] for row in json.loads((out / "search.json").read_text())["curve"]] == [64]


def test_changed_settings_are_refused_in_one_line(world, tiny, tmp_path, monkeypatch):
    Scripted(monkeypatch, lambda b: 0.0)
    _search(world, tiny, tmp_path / "s", budget_min=8)
    with pytest.raises(SearchError, match=r"cannot resume .*tolerance=0.0; this run asks tolerance=0.5"):
        prepare(_cfg(world, tmp_path / "s", budget_min=8, tolerance=0.5))
    other = tmp_path / "train.yaml"
    other.write_text(TRAIN_YAML.replace("lr: 0.3", "lr: 0.1"))
    with pytest.raises(SearchError, match=r"train\.lr=0.3; this run asks train\.lr=0.1"):
        prepare(_cfg(world, tmp_path / "s", budget_min=8, train_config=str(other)))
    prepare(_cfg(world, tmp_path / "s", budget_min=8, threads=2))  # logistics may change


def test_next_budget_and_nearest():
    assert next_budget(6, 32, 0.25) == 14 and next_budget(6, 7, 0.0) is None and next_budget(6, 8, 0.0) == 7
    assert next_budget(100, 110, 0.1) is None and next_budget(100, 111, 0.1) == 105
    assert nearest(16, [8, 32]) == 32 and nearest(16, [8, 33]) == 8 and nearest(5, []) is None


def test_cli_search_end_to_end_with_training_then_resume_and_plot(world, tmp_path, monkeypatch):
    out = tmp_path / "s"
    args = ["search", "--model", str(world / "model"), "--corpus", str(world / "text.txt"), "--seq-len", "64",
            "--n-blocks", "4", "--budget-min", "6", "--budget-max", "64", "--tolerance", "0.3",
            "--max-ppl-increase", "0.001", "--train-config", str(world / "train.yaml"), "--threads", "1",
            "--out-dir", str(out)]
    r = cli_run(*args)
    assert r.returncode == 0, r.stderr[-2000:]
    state = json.loads((out / "search.json").read_text())
    _check_walk(state, 0.3)
    assert len(state["curve"]) >= 3 and state["status"] == "done"
    assert f"chosen budget {state['chosen']['budget']}" in r.stdout and "KV at 64 tokens" in r.stdout
    for row in state["curve"]:  # each probe trained its steps, warm-started as recorded
        meta = load_checkpoint_meta(row["run_dir"])[0]
        assert meta["global_step"] == 2 and meta["config"]["init"] == row["init"] and row["trained"]
    assert all(r["init"] for r in state["curve"][1:])
    chosen = Allocation.load(out / "allocation.json")
    probe = Allocation.load(Path(state["curve"][0]["run_dir"]).parent / f"b{state['chosen']['budget']}" /
                            "allocation.json")
    assert chosen.window == probe.window and abs(chosen.eff_ctx() - state["chosen"]["eff_ctx"]) < 1e-9
    # a probe trained but not yet in search.json (killed before its row was written): read back from its run
    saved = json.loads((out / "search.json").read_text())
    last = saved["curve"].pop()
    (out / "search.json").write_text(json.dumps(saved))
    calls = []
    real_fit = search.fit
    monkeypatch.setattr(search, "fit", lambda *a, **k: calls.append(1) or real_fit(*a, **k))
    r2 = cli_run(*args)
    assert r2.returncode == 0 and not calls, r2.stderr[-2000:]
    how = f"warm from b{last['init_budget']}, read back from its run"
    assert f"budget {last['budget']:>5d} ({how})" in r2.stdout
    again = json.loads((out / "search.json").read_text())
    assert [r["ppl"] for r in again["curve"]] == [r["ppl"] for r in state["curve"]]
    assert again["chosen"]["budget"] == state["chosen"]["budget"]
    r3 = cli_run("plot", str(out / "search.json"), "-o", str(tmp_path / "fig"))
    assert r3.returncode == 0 and (tmp_path / "fig" / "search.png").stat().st_size > 0, r3.stderr
