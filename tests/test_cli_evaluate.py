"""`headkv evaluate` end to end on the offline default, and its one-line errors on bad input."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_cli as run


@pytest.fixture
def offline(monkeypatch, smollm):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the unknown-model case must fail fast, without network


def test_help_explains_every_option(monkeypatch, capsys):
    code, out, _ = run(monkeypatch, capsys, "evaluate", "--help")
    assert code == 0
    from dataclasses import fields

    from headkv.alloc.config import EvaluateConfig

    for opt in (f.name for f in fields(EvaluateConfig)):
        assert "--" + opt.replace("_", "-") in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--allocation", "WRONG"], "has shape 2x2"),
        (["--allocation", "BAD"], "not valid JSON"),
        (["--policy", "Z_unknown"], "unknown policy 'Z_unknown'"),
        (["--corpus", "/nonexistent/text.txt"], "corpus path not found"),
        (["--model", "nobody/no-such-model-xyz"], "cannot load 'nobody/no-such-model-xyz'"),
        (["--config", "MISSINGKEY"], "unknown key(s) windows"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(monkeypatch, capsys, tmp_path, offline, args, message):
    (tmp_path / "wrong.json").write_text(json.dumps(
        {"format_version": 1, "shape": [2, 2], "sink": [[0, 0], [0, 0]], "window": [[1, 1], [1, 1]]}))
    (tmp_path / "bad.json").write_text("{ nope")
    (tmp_path / "cfg.yaml").write_text("windows: 3\n")
    subst = {"WRONG": "wrong.json", "BAD": "bad.json", "MISSINGKEY": "cfg.yaml"}
    args = [str(tmp_path / subst[a]) if a in subst else a for a in args]
    out_file = tmp_path / "rows.jsonl"
    code, _, err = run(monkeypatch, capsys, "evaluate", *args, "--tokens", "64", "--seq-len", "32",
                       "--out", str(out_file))
    assert code == 2
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert not out_file.exists()


def test_sink_effect_on_the_offline_default(monkeypatch, capsys, tmp_path, offline):
    out_file = tmp_path / "rows.jsonl"
    code, out, _ = run(
        monkeypatch, capsys, "evaluate", "--policy", "full", "--policy", "A_window_64",
        "--policy", "B_streaming_64", "--tokens", "1024", "--seq-len", "512", "--out", str(out_file),
    )
    assert code == 0, out
    rows = {r["name"]: r for r in map(json.loads, out_file.read_text().splitlines())}
    assert set(rows) == {"full", "A_window_64", "B_streaming_64"}
    for r in rows.values():
        assert r["model"] == "smollm2-135m" and r["corpus"] == "austen" and r["split"] == "eval"
        assert r["tokens"] == 2 * 511 and r["seq_len"] == 512 and "transformers" in r["versions"]
    # the study's sink effect: without sinks perplexity is far worse at the same Eff.Ctx
    assert rows["A_window_64"]["ppl"] > 1.5 * rows["B_streaming_64"]["ppl"]
    assert rows["B_streaming_64"]["ppl"] > rows["full"]["ppl"]
    assert rows["B_streaming_64"]["eff_ctx"] == rows["A_window_64"]["eff_ctx"] == 64
    assert "B_streaming_64" in out
