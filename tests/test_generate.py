"""`headkv generate --prompts`: left-padded batches give each prompt what it gets alone, with honest bytes."""

from __future__ import annotations

import json

import pytest

from tests.test_passkey import cli_run, make_tiny_dir


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smollm):
    return make_tiny_dir(tmp_path_factory.mktemp("generate"), smollm[1])


PROMPTS = ["the a of", "to and in was her she he it that had his with for as not be at the a of to and in",
           "her", "she he it that had his with for as not be at the a of to and in was her she he it had"]


@pytest.mark.parametrize("policy", ["B_streaming_16", "full"])
def test_batched_rows_equal_each_prompt_alone(tiny_dir, tmp_path, policy):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    outs = {}
    for batch in (1, 3):
        out = tmp_path / f"b{batch}.jsonl"
        r = cli_run("generate", "--model", str(tiny_dir / "model"), "--policy", policy, "--prompts",
                    str(prompts), "--batch-size", str(batch), "--out", str(out), "--max-new-tokens", "20")
        assert r.returncode == 0, r.stderr
        outs[batch] = [json.loads(x) for x in out.read_text().splitlines()]
    alone, batched = outs[1], outs[3]
    assert [r["prompt"] for r in batched] == PROMPTS
    assert [r["text"] for r in batched] == [r["text"] for r in alone]
    assert [r["kv_bytes"] for r in batched] == [r["kv_bytes"] for r in alone]
    for rows in (alone, batched):  # measured == predicted, per batch
        for b in {r["batch"] for r in rows}:
            mine = [r for r in rows if r["batch"] == b]
            held, predicted = mine[0]["batch_kv_bytes_held"], sum(r["kv_bytes"] for r in mine)
            if policy == "full" and len(mine) > 1:  # transformers' DynamicCache also holds the padding
                assert held == len(mine) * max(r["kv_bytes"] for r in mine) > predicted
            else:
                assert held == predicted
    assert all(r["tokens_per_s"] > 0 and r["tokens"] >= 1 for r in batched)


@pytest.mark.parametrize("policy", ["B_streaming_16", "full"])
def test_static_generation_writes_the_evicting_caches_text(tiny_dir, tmp_path, policy):
    """--static (fixed capacity, CUDA-graph decode on a GPU) continues each prompt as the evicting cache
    does; a batch of unequal prompts is refused in one line."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    texts = {}
    for static in (False, True):
        out = tmp_path / f"s{static}.jsonl"
        flags = ["--static"] if static else []
        r = cli_run("generate", "--model", str(tiny_dir / "model"), "--policy", policy, "--prompts",
                    str(prompts), "--out", str(out), "--max-new-tokens", "20", *flags)
        assert r.returncode == 0, r.stderr
        texts[static] = [json.loads(x)["text"] for x in out.read_text().splitlines()]
    assert texts[True] == texts[False]
    out = tmp_path / "refused.jsonl"
    r = cli_run("generate", "--model", str(tiny_dir / "model"), "--policy", policy, "--prompts", str(prompts),
                "--out", str(out), "--batch-size", "2", "--static")
    assert r.returncode == 2 and "one length" in r.stderr and not out.exists()
