"""Passkey retrieval: exact reproducible tasks, exact-match scoring, heatmaps, a CLI that resumes."""

from __future__ import annotations

import io
import sys
from contextlib import redirect_stderr, redirect_stdout
from types import SimpleNamespace
from unittest import mock

import numpy as np
import pytest
import torch

from headkv.alloc.passkey import NEEDLE, QUESTION, build_tasks, is_correct
from headkv.alloc.plots import passkey_heatmaps
from headkv.alloc.results import read_rows


def cli_run(*args: str) -> SimpleNamespace:
    """``headkv ARGS`` through the console entry point, in process (no interpreter start-up per call)."""
    from headkv import cli

    out, err, code = io.StringIO(), io.StringIO(), 0
    with redirect_stdout(out), redirect_stderr(err), mock.patch.object(sys, "argv", ["headkv", *args]):
        try:
            cli.main()
        except SystemExit as e:
            code = e.code or 0
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def make_tiny_dir(root, tok):
    """A tiny random Llama saved with the offline default's tokenizer (so the CLI can load it by path), and a
    small text corpus (a .txt source: its last 20% of paragraphs are the eval split)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    AutoModelForCausalLM.from_config(cfg).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    words = "the a of to and in was her she he it that had his with for as not be at".split()
    rng = torch.Generator().manual_seed(0)
    paras = [
        " ".join(words[i] for i in torch.randint(0, len(words), (120,), generator=rng).tolist()) + "."
        for _ in range(60)
    ]
    (root / "text.txt").write_text("\n\n".join(paras))
    return root


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smollm):
    return make_tiny_dir(tmp_path_factory.mktemp("passkey"), smollm[1])


def test_tasks_have_exact_length_one_needle_at_its_depth_and_are_reproducible(smollm):
    _, tok = smollm
    stream = torch.arange(1000, 4000)  # distinct filler ids, so the needle is easy to find
    tasks = build_tasks(tok, stream, [100, 300], [0.0, 0.5, 1.0], trials=3, seed=7)
    again = build_tasks(tok, stream, [100, 300], [0.0, 0.5, 1.0], trials=3, seed=7)
    question = tok(QUESTION, add_special_tokens=False)["input_ids"]
    for (length, depth), cell in tasks.items():
        assert len({t.key for t in cell}) > 1  # different keys per trial
        for t, u in zip(cell, again[(length, depth)], strict=True):
            assert torch.equal(t.ids, u.ids) and t.key == u.key and len(t.key) == 5
            assert t.ids.numel() == length and t.ids[-len(question) :].tolist() == question
            needle = tok(NEEDLE.format(key=t.key), add_special_tokens=False)["input_ids"]
            body = t.ids[: -len(question)].tolist()
            at = [i for i in range(len(body)) if body[i : i + len(needle)] == needle]
            assert len(at) == 1
            n_fill = len(body) - len(needle)
            assert at[0] == round(depth * n_fill)
            assert tok.decode(t.ids).count(t.key) == 2  # stated in the needle, twice, and nowhere else


def test_exact_match_scoring():
    assert is_correct(" 12345. Remember", "12345")
    assert not is_correct(" 1234. 12345", "12345") and not is_correct(" 123456", "12345")
    assert not is_correct(" no number", "12345")


def test_heatmaps_one_png_per_allocation(tmp_path):
    rows = [
        {"kind": "passkey", "allocation": a, "length": n, "depth": d, "accuracy": float(np.random.rand())}
        for a in ("full", "B_streaming_128")
        for n in (512, 1024)
        for d in (0.0, 0.5, 1.0)
    ]
    rows.append({"kind": "evaluate", "name": "full"})
    paths = passkey_heatmaps(rows, tmp_path)
    assert [p.name for p in paths] == ["passkey_B_streaming_128.png", "passkey_full.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000


def test_cli_passkey_runs_resumes_and_refuses_too_long(tiny_dir):
    out, plots = tiny_dir / "pk.jsonl", tiny_dir / "plots"
    args = [
        "passkey",
        "--model",
        str(tiny_dir / "model"),
        "--corpus",
        str(tiny_dir / "text.txt"),
        "--length",
        "64",
        "--length",
        "96",
        "--depth",
        "0",
        "--depth",
        "1",
        "--trials",
        "2",
        "--batch",
        "2",
        "--policy",
        "full",
        "--policy",
        "B_streaming_16",
        "--out",
        str(out),
        "--plots",
        str(plots),
    ]
    r = cli_run(*args)
    assert r.returncode == 0, r.stderr
    rows = list(read_rows(out))
    assert len(rows) == 8 and {row["kind"] for row in rows} == {"passkey"}
    assert all(row["trials"] == 2 and 0 <= row["accuracy"] <= 1 for row in rows)
    assert sorted(p.name for p in plots.iterdir()) == ["passkey_B_streaming_16.png", "passkey_full.png"]
    assert cli_run(*args).returncode == 0 and len(list(read_rows(out))) == 8  # nothing left to do
    bad = cli_run(*args[:-4], "--length", "600")
    assert (
        bad.returncode == 2 and bad.stderr.startswith("error:") and len(bad.stderr.strip().splitlines()) == 1
    )


def test_retrieval_scores_are_attention_mass_on_the_needle(tiny):
    from headkv.alloc.passkey import PasskeyTask, retrieval_scores
    from headkv.models.loading import model_shape

    ids = torch.randint(0, 97, (30,))
    whole = retrieval_scores(tiny, [PasskeyTask(ids, "12345", 0.5, 30, (0, 30))])
    none = retrieval_scores(tiny, [PasskeyTask(ids, "12345", 0.5, 30, (10, 10))])
    part = retrieval_scores(tiny, [PasskeyTask(ids, "12345", 0.5, 30, (3, 12))])
    s = model_shape(tiny)
    assert whole.shape == (s.n_layers, s.n_kv_heads) and torch.allclose(
        whole, torch.ones_like(whole), atol=1e-5
    )
    assert torch.equal(none, torch.zeros_like(none)) and bool(((part > 0) & (part < 1)).all())
    assert tiny.config._attn_implementation == "sdpa"  # restored
