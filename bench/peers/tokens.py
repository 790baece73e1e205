"""Write the peer protocol's token ids and model folder to a JSON file (headkv's venv).

NLL (the default): K samples of N + M + 1 tokens from headkv's Austen eval split (``headkv.token_blocks``:
non-overlapping, paragraph-aligned blocks, BOS first where the tokenizer adds one): the first N tokens of a
sample are the context that is prefilled and compressed; the next M tokens (positions N .. N+M-1) are fed
after it and the M tokens they predict (positions N+1 .. N+M) are scored, so every scored prediction is made
by a query that reads the compressed cache (the prefill's own last prediction, made before any compression,
is not scored).

Passkey (``--passkey``): ``--trials`` tasks per (length, depth) cell, built exactly as ``headkv passkey``
builds them (``headkv.alloc.passkey.build_tasks`` over ``headkv.long_stream`` of the eval split, 8 x the
longest length, one generator seeded with ``--seed``: the same lengths, depths, trials and seed give the
same tasks as ``headkv passkey``). A task of ``length`` tokens is split into its context (BOS where the
tokenizer adds one, filler, the needle sentence at ``depth``, filler: what gets compressed) and its question
(the ``QUESTION`` tokens, fed after compression: query-agnostic compression); the file keeps both, the key,
the length and the depth.

The model folder is the plain float32 transformers copy of the offline default
(``headkv.models.loading._resolve``), so that kvpress's venv loads the very same weights with plain
``AutoModelForCausalLM.from_pretrained``.

    /work/main/.venv/bin/python bench/peers/tokens.py --out results/peers/tokens.json
    /work/main/.venv/bin/python bench/peers/tokens.py --passkey --lengths 1024 2048 4096 --trials 10 \\
        --out results/peers/passkey_tokens.json
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from args import Parser, check_out, fail, positive, write_atomic
from transformers import AutoTokenizer

import headkv
from headkv.models.loading import OFFLINE_DEFAULT, _resolve

NLL_DEFAULTS = {"context": 1024, "score": 128, "samples": 2}
PASSKEY_DEFAULTS = {"lengths": [1024, 2048, 4096], "depths": [0.1, 0.5, 0.9], "trials": 10}
MIN_LENGTH = 64  # as `headkv passkey --length`: room for the needle, the question and some filler


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = Parser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=OFFLINE_DEFAULT, help="offline name or local model folder")
    ap.add_argument("--context", "-N", type=int, default=None,
                    help=f"NLL: context tokens, prefilled and compressed (default {NLL_DEFAULTS['context']})")
    ap.add_argument("--score", "-M", type=int, default=None,
                    help="NLL: continuation tokens fed after the context, M predictions scored "
                         f"(default {NLL_DEFAULTS['score']})")
    ap.add_argument("--samples", "-K", type=int, default=None,
                    help=f"NLL: samples (default {NLL_DEFAULTS['samples']})")
    ap.add_argument("--passkey", action="store_true", help="write passkey retrieval tasks instead")
    ap.add_argument("--lengths", type=int, nargs="+", default=None,
                    help="passkey: prompt tokens, context + question "
                         f"(default {PASSKEY_DEFAULTS['lengths']})")
    ap.add_argument("--depths", type=float, nargs="+", default=None,
                    help=f"passkey: needle depths in [0, 1] (default {PASSKEY_DEFAULTS['depths']})")
    ap.add_argument("--trials", type=int, default=None,
                    help=f"passkey: tasks per (length, depth) (default {PASSKEY_DEFAULTS['trials']})")
    ap.add_argument("--source", default="austen")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("results/peers/tokens.json"))
    a = ap.parse_args(argv)
    mine, other = (PASSKEY_DEFAULTS, NLL_DEFAULTS) if a.passkey else (NLL_DEFAULTS, PASSKEY_DEFAULTS)
    given = [f"--{k}" for k in other if getattr(a, k) is not None]
    if given:
        fail(f"{', '.join(given)} {'do' if len(given) > 1 else 'does'} not apply "
             f"{'with' if a.passkey else 'without'} --passkey")
    for k, v in mine.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    if a.passkey:
        positive("--trials", a.trials)
        short = [n for n in a.lengths if n < MIN_LENGTH]
        if short:
            fail(f"--lengths must be >= {MIN_LENGTH}, got {short}")
        bad = [d for d in a.depths if not (math.isfinite(d) and 0 <= d <= 1)]
        if bad:
            fail(f"--depths must lie in [0, 1], got {bad}")
    else:
        for name in ("context", "score", "samples"):
            positive(f"--{name}", getattr(a, name))
    if a.seed < 0:
        fail(f"--seed must be >= 0, got {a.seed}")
    check_out(a.out)
    return a


def passkey_tasks(tok, a: argparse.Namespace) -> list[dict]:
    """The tasks of ``headkv passkey`` for these lengths, depths, trials and seed, split at the question."""
    from headkv.alloc.passkey import QUESTION, build_tasks

    question = tok(QUESTION, add_special_tokens=False)["input_ids"]
    try:
        stream = headkv.long_stream(tok, a.source, "eval", 8 * max(a.lengths))
        cells = build_tasks(tok, stream, a.lengths, a.depths, a.trials, a.seed)
    except (headkv.HeadkvError, ValueError) as e:
        fail(str(e))
    tasks = []
    for (length, depth), cell in cells.items():
        for trial, t in enumerate(cell):
            ids = t.ids.tolist()
            cut = len(ids) - len(question)
            if ids[cut:] != question:  # build_task appends the QUESTION tokens last: never expected
                fail(f"a {length}-token task does not end with the question's tokens")
            tasks.append({"length": length, "depth": depth, "trial": trial, "key": t.key,
                          "needle": list(t.needle), "context": ids[:cut], "question": ids[cut:]})
    return tasks


def main(argv: list[str] | None = None) -> None:
    a = parse(argv)
    folder = Path(_resolve(a.model)).resolve()
    if not (folder / "config.json").exists():
        fail(f"{folder} holds no config.json: pass a local model folder")
    tok = AutoTokenizer.from_pretrained(folder)
    base = {"model_dir": str(folder), "model": a.model, "source": a.source, "split": "eval", "seed": a.seed}
    if a.passkey:
        tasks = passkey_tasks(tok, a)
        write_atomic(a.out, json.dumps({"kind": "passkey", **base, "lengths": a.lengths, "depths": a.depths,
                                        "trials": a.trials, "tasks": tasks}))
        ctx = [len(t["context"]) for t in tasks]
        print(f"{a.out}: {len(tasks)} passkey tasks ({a.trials} per length x depth; lengths {a.lengths}, "
              f"depths {a.depths}; context {min(ctx)} .. {max(ctx)} tokens + a "
              f"{len(tasks[0]['question'])}-token question) from {a.source} eval; model {folder}")
        return
    try:
        blocks = headkv.token_blocks(tok, a.source, "eval", a.context + a.score + 1, a.samples, a.seed)
    except headkv.HeadkvError as e:
        fail(str(e))
    write_atomic(a.out, json.dumps({
        "kind": "nll", **base, "N": a.context, "M": a.score, "ids": blocks.tolist(),
    }))
    print(f"{a.out}: {a.samples} samples of {a.context} + {a.score} + 1 tokens from {a.source} eval; "
          f"model {folder}")


if __name__ == "__main__":
    main()
