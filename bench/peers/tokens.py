"""Write the peer protocol's token ids and model folder to a JSON file (headkv's venv).

K samples of N + M + 1 tokens from headkv's Austen eval split (``headkv.token_blocks``: non-overlapping,
paragraph-aligned blocks, BOS first where the tokenizer adds one): the first N tokens of a sample are the
context that is prefilled and compressed; the next M tokens (positions N .. N+M-1) are fed after it and the
M tokens they predict (positions N+1 .. N+M) are scored, so every scored prediction is made by a query that
reads the compressed cache (the prefill's own last prediction, made before any compression, is not scored).
The model folder is the plain float32 transformers copy of the offline default
(``headkv.models.loading._resolve``), so that kvpress's venv loads the very same weights with plain
``AutoModelForCausalLM.from_pretrained``.

    /work/main/.venv/bin/python bench/peers/tokens.py --out results/peers/tokens.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from args import Parser, check_out, fail, positive, write_atomic
from transformers import AutoTokenizer

import headkv
from headkv.models.loading import OFFLINE_DEFAULT, _resolve


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = Parser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=OFFLINE_DEFAULT, help="offline name or local model folder")
    ap.add_argument("--context", "-N", type=int, default=1024,
                    help="N: context tokens, prefilled and compressed")
    ap.add_argument("--score", "-M", type=int, default=128,
                    help="M: continuation tokens fed after the context (M predictions scored)")
    ap.add_argument("--samples", "-K", type=int, default=2)
    ap.add_argument("--source", default="austen")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("results/peers/tokens.json"))
    a = ap.parse_args(argv)
    for name, value in (("--context", a.context), ("--score", a.score), ("--samples", a.samples)):
        positive(name, value)
    check_out(a.out)
    return a


def main(argv: list[str] | None = None) -> None:
    a = parse(argv)
    folder = Path(_resolve(a.model)).resolve()
    if not (folder / "config.json").exists():
        fail(f"{folder} holds no config.json: pass a local model folder")
    tok = AutoTokenizer.from_pretrained(folder)
    try:
        blocks = headkv.token_blocks(tok, a.source, "eval", a.context + a.score + 1, a.samples, a.seed)
    except headkv.HeadkvError as e:
        fail(str(e))
    write_atomic(a.out, json.dumps({
        "model_dir": str(folder), "model": a.model, "source": a.source, "split": "eval", "seed": a.seed,
        "N": a.context, "M": a.score, "ids": blocks.tolist(),
    }))
    print(f"{a.out}: {a.samples} samples of {a.context} + {a.score} + 1 tokens from {a.source} eval; "
          f"model {folder}")


if __name__ == "__main__":
    main()
