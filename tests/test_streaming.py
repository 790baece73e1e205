"""Streaming evaluation through the real cache equals the masked evaluator; the CLI runs end to end."""

from __future__ import annotations

import math

import pytest
import torch

from headkv.alloc.allocation import Allocation, applied
from headkv.alloc.evaluate import evaluate
from headkv.alloc.results import read_rows
from headkv.alloc.streaming import stream_nll
from headkv.models.loading import model_shape
from tests.conftest import VOCAB
from tests.test_kv_cache import random_alloc
from tests.test_passkey import cli_run as _cli
from tests.test_passkey import make_tiny_dir


def _masked_log_ppl(model, alloc, x: torch.Tensor, reindex: bool) -> float:
    with applied(model, alloc, reindex=reindex), torch.no_grad():
        logits = model(x.view(1, -1)).logits[0, :-1]
    return float(torch.nn.functional.cross_entropy(logits, x[1:]))


@pytest.mark.parametrize("chunk", [1, 16])
def test_streaming_nll_equals_masked_evaluator(tiny, chunk):
    alloc = random_alloc(tiny, seed=21)
    x = torch.randint(0, VOCAB, (90,), generator=torch.Generator().manual_seed(22))
    ref = evaluate(tiny, alloc, x.view(1, -1))
    res = stream_nll(tiny, alloc, x, chunk=chunk, segment=32)
    assert abs(math.log(res.ppl) - math.log(ref.ppl)) < 1e-4
    assert res.tokens == ref.tokens == 89 and res.segment_tokens == [32, 32, 25]
    assert abs(res.acc - ref.acc) < 1e-9
    assert res.kv_bytes == res.kv_bytes_predicted < res.kv_bytes_full
    full = stream_nll(tiny, None, x, chunk=chunk)  # full attention streams through a DynamicCache
    assert abs(math.log(full.ppl) - math.log(evaluate(tiny, None, x.view(1, -1)).ppl)) < 1e-4
    assert full.kv_bytes == full.kv_bytes_full


def test_reindexed_stream_equals_reindexed_masked_forward(tiny):
    alloc = random_alloc(tiny, seed=23)
    x = torch.randint(0, VOCAB, (80,), generator=torch.Generator().manual_seed(24))
    res = stream_nll(tiny, alloc, x, reindex=True, chunk=5)
    assert abs(math.log(res.ppl) - _masked_log_ppl(tiny, alloc, x, True)) < 1e-4


def test_offline_default_streaming_equals_masked_evaluator(smollm):
    """Token by token through the real cache of a per-head allocation that evicts, inside the context."""
    model, tok = smollm
    s = model_shape(model)
    g = torch.Generator().manual_seed(25)
    window = torch.randint(6, 32, s.shape, generator=g)
    alloc = Allocation.from_tensors(torch.full(s.shape, 4), window, model_id=s.model_id, q_per_kv=s.q_per_kv)
    from headkv.models.text import token_blocks

    x = token_blocks(tok, "austen", "eval", seq_len=65, n_blocks=1)[0]
    ref = evaluate(model, alloc, x.view(1, -1))
    res = stream_nll(model, alloc, x, chunk=1)
    assert abs(math.log(res.ppl) - math.log(ref.ppl)) < 1e-4
    assert res.kv_bytes == alloc.kv_bytes(64, s.head_dim, model.dtype)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smollm):
    return make_tiny_dir(tmp_path_factory.mktemp("streaming"), smollm[1])


def test_cli_evaluate_streaming(tiny_dir):
    out = tiny_dir / "res.jsonl"
    common = [
        "evaluate",
        "--mode",
        "streaming",
        "--model",
        str(tiny_dir / "model"),
        "--corpus",
        str(tiny_dir / "text.txt"),
        "--tokens",
        "120",
        "--chunk",
        "8",
        "--segment",
        "50",
        "--out",
        str(out),
    ]
    r = _cli(*common, "--policy", "B_streaming_16", "--policy", "full", "--reindex")
    assert r.returncode == 0, r.stderr
    rows = [row for row in read_rows(out) if row["kind"] == "streaming"]
    assert [(row["name"], row["reindex"]) for row in rows] == [("B_streaming_16", True), ("full", False)]
    assert rows[0]["kv_bytes"] == rows[0]["kv_bytes_predicted"] and len(rows[0]["segment_ppl"]) == 3
    again = _cli(*common, "--policy", "B_streaming_16", "--reindex")  # resumable: a finished row is skipped
    assert again.returncode == 0 and "skipped" in again.stderr and len(list(read_rows(out))) == 2


def test_cli_generate_prints_text_and_bytes_and_refuses_bad_input(tiny_dir, tmp_path):
    model = str(tiny_dir / "model")
    r = _cli(
        "generate",
        "--model",
        model,
        "--policy",
        "B_streaming_16",
        "--prompt",
        "the a of to and in was",
        "--max-new-tokens",
        "12",
    )
    assert r.returncode == 0, r.stderr
    assert "KV held after 18 tokens" in r.stdout and "allocation predicts" in r.stdout
    long_prompt = " ".join(["the"] * 600)
    bad = _cli("generate", "--model", model, "--policy", "B_streaming_16", "--prompt", long_prompt)
    assert (
        bad.returncode == 2
        and bad.stderr.strip().startswith("error:")
        and len(bad.stderr.strip().splitlines()) == 1
    )
    ok = _cli(
        "generate",
        "--model",
        model,
        "--policy",
        "B_streaming_16",
        "--prompt",
        long_prompt,
        "--reindex",
        "--max-new-tokens",
        "4",
    )
    assert ok.returncode == 0, ok.stderr
    other = Allocation.uniform((3, 2), 4, 12, model_id="other", q_per_kv=2)
    other.save(tmp_path / "other.json")
    wrong = _cli(
        "generate", "--model", model, "--allocation", str(tmp_path / "other.json"), "--prompt", "the a"
    )
    assert wrong.returncode == 2 and "error:" in wrong.stderr and len(wrong.stderr.strip().splitlines()) == 1
