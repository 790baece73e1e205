"""The coverage figure (`headkv plot A.jsonl B.jsonl ...`): the numbers it writes are
alloc.frontier.saving_factor on each file's own B frontier; which rows it takes, and its one-line refusals."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from headkv.alloc.config import ConfigError, SweepConfig, load
from headkv.alloc.coverage import coverage_bin, coverage_text, kind_of
from headkv.alloc.frontier import frontier, saving_factor
from headkv.alloc.plots import plot_results
from headkv.alloc.sweep import expand
from tests.test_passkey import cli_run

ROOT = Path(__file__).resolve().parents[1]
FILL = {"recent": 16, "chunk": 16, "decay": 0.5}


def _b_ppl(c: float, n: int, corpus: str) -> float:
    """A falling StreamingLLM frontier (each text its own level)."""
    level = {"austen": 9.0, "pydoc": 6.0, "debian-reference": 7.5}.get(corpus, 8.0)
    return level + 30 / math.sqrt(c) + n / 4096


def _row(name: str, eff_ctx: float, ppl: float, corpus: str, n: int, i: int, **extra) -> dict:
    log_ppl = math.log(ppl)
    return {"kind": "sweep", "key": f"{corpus}-{n}-{i}", "name": name, "family": extra.pop("family", name),
            "model": "smollm2-135m", "corpus": corpus, "split": "eval", "tokens": 2 * (n - 1), "seq_len": n,
            "eff_ctx": float(eff_ctx), "ppl": ppl, "ppl_lo": ppl * 0.98, "ppl_hi": ppl * 1.02, "acc": 0.3,
            "chunk_nll": [0.98 * 100 * log_ppl, 1.02 * 100 * log_ppl], "chunk_tokens": [100, 100],
            "n_blocks": 2, **extra}


def sweep_lines(corpus: str, n: int, *, b: tuple = (), learned: bool = True, one_coverage: bool = False,
                full: bool = True) -> str:
    """A sweep file's text: full attention, B_streaming at ``b`` (default 1/64 .. 1/2 of n) and learned
    allocations, static and dynamic, from budget n/64 up (a static one equal in PPL to B at twice its
    context: saving 2; a dynamic one to B at four times: saving 4; the largest dynamic one better than the
    best B point: a bound; a second seed of the smallest static one, worse)."""
    b = b or tuple(n * f for f in (1 / 64, 1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2))
    rows = [_row("full", n, _b_ppl(n, n, corpus) - 0.5, corpus, n, 0, family="full")] if full else []
    rows += [_row(f"B_streaming_{int(c)}", c, _b_ppl(c, n, corpus), corpus, n, 1 + k, family="B")
             for k, c in enumerate(b)]
    budgets = [n // 64] if one_coverage else [n // 64, n // 32, n // 16]
    for k, bud in enumerate(budgets if learned else []):
        run = f"runs/learned_b{bud}"
        rows.append(_row(f"learned_b{bud}", bud, _b_ppl(2 * bud, n, corpus), corpus, n, 20 + k,
                         file=f"{run}/allocation.json", file_sha256=f"s{k}"))
        dyn = _b_ppl(4 * bud, n, corpus) if k < len(budgets) - 1 else _b_ppl(n, n, corpus) - 0.2
        rows.append(_row(f"learned_b{bud}+fill", bud * 1.03, dyn, corpus, n, 40 + k,
                         file=f"{run}/dynamic.json", file_sha256=f"d{k}", fill=FILL))
    if learned:  # a second seed at the first budget, worse; and a control, never a point
        rows.append(_row(f"learned_b{n // 64}@seed1", n // 64 * 0.99, _b_ppl(1.5 * n / 64, n, corpus), corpus,
                         n, 60, file="runs/learned_s1/allocation.json", file_sha256="s9"))
        rows.append(_row("learned_shuffled", n // 64, _b_ppl(n / 64, n, corpus) + 1, corpus, n, 61,
                         file="runs/learned_b16/allocation.json", control="shuffled"))
    return "".join(json.dumps(r) + "\n" for r in rows)


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.fixture
def files(tmp_path):
    return [_write(tmp_path, f"cov_{c}_{n}.jsonl", sweep_lines(c, n))
            for c in ("austen", "pydoc", "debian-reference") for n in (1024, 4096)]


def test_the_numbers_are_saving_factor_on_each_files_own_frontier(files, tmp_path):
    out = tmp_path / "fig"
    paths = plot_results([str(f) for f in files], out)
    assert [p.name for p in paths] == ["coverage.png", "coverage.json", "coverage.md"]
    assert (out / "coverage.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in out.iterdir()) == ["coverage.json", "coverage.md", "coverage.png"]  # no tmp
    points = json.loads((out / "coverage.json").read_text())
    assert len(points) == len(files) * 7  # 3 static + 3 dynamic + a second seed; no B, no full, no control
    for f in files:
        rows = [json.loads(x) for x in f.read_text().splitlines()]
        front = frontier(rows)
        mine = [p for p in points if p["results"] == str(f)]
        for r in rows:
            if r["family"] in ("B", "full") or r.get("control"):
                assert r["name"] not in {p["name"] for p in mine}
                continue
            (p,) = [p for p in mine if p["name"] == r["name"]]
            saving, extra = saving_factor(r, front)
            assert p["saving"] == pytest.approx(saving, rel=1e-12) and p["extrapolated"] == extra
            assert p["coverage"] == pytest.approx(r["eff_ctx"] / r["seq_len"])
            assert p["seq_len"] == r["seq_len"] and p["text"] == r["corpus"]
            assert p["kind"] == ("dynamic" if r.get("fill") else "static") == kind_of(r)
    austen = {p["name"]: p for p in points if p["results"] == str(files[0])}  # austen at 1024
    assert austen["learned_b16"]["saving"] == pytest.approx(2.0) and not austen["learned_b16"]["extrapolated"]
    assert austen["learned_b32+fill"]["saving"] == pytest.approx(4.0 / 1.03)  # its metadata count
    big = austen["learned_b64+fill"]  # better than the best B point: a lower bound
    assert big["extrapolated"] and big["saving_text"] == f">{512 / big['eff_ctx']:.2f}x"
    # two static rows at 1/64: both points, the better one connected
    assert austen["learned_b16"]["best"] and not austen["learned_b16@seed1"]["best"]
    assert coverage_bin(austen["learned_b16@seed1"]["coverage"]) == coverage_bin(1 / 64)
    assert all(p["best"] for p in points if "seed1" not in p["name"])
    table = (out / "coverage.md").read_text()
    assert "| austen | 1024 | 1/64 | static | learned_b16 * |" in table and "| yes (a bound) |" in table
    assert table.count("\n| ") == len(points) + 1


def test_cli_draws_coverage_from_several_files_and_keeps_one_file_as_it_was(files, tmp_path):
    r = cli_run("plot", *map(str, files), "-o", str(tmp_path / "fig"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("wrote ") == 3 and "coverage.png" in r.stdout
    # one file: the study's figures as before, and the coverage figure of its allocation rows
    r = cli_run("plot", str(files[0]), "-o", str(tmp_path / "one"))
    assert r.returncode == 0, r.stderr
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert names == ["best_configs.png", "coverage.json", "coverage.md", "coverage.png", "frontier.png",
                     "ppl_vs_ctx.png"]
    # one file without allocation rows: exactly the figures it drew before
    bare = _write(tmp_path, "bare.jsonl", sweep_lines("austen", 1024, learned=False))
    assert plot_results(str(bare), tmp_path / "bare")[-1].name == "frontier.png"
    assert not (tmp_path / "bare" / "coverage.png").exists()


@pytest.mark.parametrize("case, message", [
    ("same text twice", "are both austen at 1024 tokens"),
    ("two lengths in a file", "several seq_len values"),
    ("one coverage", "two or more coverages"),
    ("no allocation rows", "holds no rows of allocation files"),
    ("one B row", "has 1 B_streaming row(s)"),
    ("a search file", "is a `headkv search` file"),
    ("given twice", "is given twice"),
])
def test_files_that_cannot_make_the_figure_are_one_error_and_nothing_written(tmp_path, case, message):
    good = _write(tmp_path, "good.jsonl", sweep_lines("austen", 1024))
    other = {
        "same text twice": lambda: sweep_lines("austen", 1024),
        "two lengths in a file": lambda: sweep_lines("pydoc", 1024) + sweep_lines("pydoc", 4096),
        "one coverage": lambda: sweep_lines("pydoc", 1024, one_coverage=True),
        "no allocation rows": lambda: sweep_lines("pydoc", 1024, learned=False),
        "one B row": lambda: sweep_lines("pydoc", 1024, b=(64,)),
        "a search file": lambda: json.dumps({"kind": "search", "settings": {}, "full": {"ppl": 9.0},
                                             "target_ppl": 9.2, "curve": []}),
        "given twice": None,
    }[case]
    if case == "one coverage":  # both files hold allocation rows at 1/64 only
        good = _write(tmp_path, "good.jsonl", sweep_lines("austen", 1024, one_coverage=True))
    second = good if other is None else _write(tmp_path, "second.jsonl", other())
    with pytest.raises(ConfigError) as e:
        plot_results([str(good), str(second)], tmp_path / "fig")
    assert message in str(e.value)
    assert not (tmp_path / "fig").exists()


def test_coverage_text():
    assert [coverage_text(x) for x in (1 / 64, 1 / 4, 1.0, 16.5 / 1024)] == ["1/64", "1/4", "1", "1/62.1"]
    assert coverage_bin(64 * 1.03 / 1024) == coverage_bin(1 / 16) != coverage_bin(1 / 32)


@pytest.mark.parametrize("config, n", [("configs/coverage.yaml", 1024), ("configs/coverage_4096.yaml", 4096)])
def test_the_coverage_configs(config, n):
    """Each config loads; --corpus/--out override it; its B grid spans B/N 1/64 .. 1/2 without a gap of more
    than an octave; its allocation files cover B/N 1/64 .. 1/4, each static one beside its dynamic version."""
    import re

    cfg = load(SweepConfig, ROOT / config, {"corpus": "pydoc", "out": "results/cov_pydoc.jsonl"})
    assert (cfg.corpus, cfg.out, cfg.seq_len) == ("pydoc", "results/cov_pydoc.jsonl", n)
    assert cfg.tokens % n == 0
    b = sorted(int(x.removeprefix("B_streaming_")) for x in expand(cfg.grid) if x.startswith("B_"))
    assert b[0] / n <= 1 / 64 and b[-1] / n == 1 / 2
    assert all(v <= 2 * u for u, v in zip(b, b[1:], strict=False))  # no gap of more than an octave
    assert {f"{n * f:g}" for f in (1 / 64, 1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2)} <= {str(v) for v in b}
    static = [f for f in cfg.allocation if f.endswith("/allocation.json")]
    dynamic = [f.replace("allocation.json", "dynamic.json") for f in static]
    assert sorted(cfg.allocation) == sorted(static + dynamic)
    budgets = {int(re.search(r"_b(\d+)/", f).group(1)) for f in static}
    assert budgets == {n // 64, n // 32, n // 16, n // 8, n // 4}
