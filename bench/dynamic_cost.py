"""A dynamic (filled) allocation's costs beside its static allocation's, in one run, one JSON: the
evaluator's seconds for one block at each length, and decode tokens/s through each one's real cache after a
prompt, timed round-robin ``--repeats`` times (medians), so a load spike on a shared CPU hits both alike.

    python bench/dynamic_cost.py runs/learned_b64/allocation.json --lengths 1024 4096 \\
        --decode-at 1024 --out results/dynamic_cost.json

The static allocation is scored on the dense path and on the block-sparse one (``auto``: FlexAttention from
1024 queries on, what a sweep runs); the dynamic one (``Allocation.filled``, default rule unless
``--recent/--chunk/--decay``) on its own chunked path (:mod:`models.dynamic`). ``evaluator_ratio``:
dynamic / the faster static path; ``decode_ratio``: dynamic / static tokens/s (PerHeadCache vs FilledCache).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from decode_speed import decode_rate  # noqa: E402
from kv_memory import Parser, fail  # noqa: E402

from headkv.alloc.allocation import Allocation  # noqa: E402
from headkv.alloc.evaluate import evaluate  # noqa: E402
from headkv.models.common import HeadkvError, emit_json  # noqa: E402
from headkv.models.dynamic import Fill  # noqa: E402
from headkv.models.loading import load_model  # noqa: E402
from headkv.models.text import long_stream, token_blocks  # noqa: E402


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("allocation", type=Path, help="a static allocation JSON")
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--decode-at", type=int, default=1024, help="prompt length of the decode timing")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--recent", type=int, default=Fill().recent)
    p.add_argument("--chunk", type=int, default=Fill().chunk)
    p.add_argument("--decay", type=float, default=Fill().decay)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    if min(a.lengths) < 2 or a.decode_at < 2 or a.steps < 1 or a.repeats < 1 or a.threads < 1:
        fail("--lengths and --decode-at must be >= 2, --steps, --repeats and --threads >= 1")
    if a.out and Path(a.out).exists() and not Path(a.out).is_file():
        fail(f"--out {a.out} exists and is not a regular file")
    try:
        a.static = Allocation.load(a.allocation)
        a.dynamic = a.static.filled(Fill(a.recent, a.chunk, a.decay))
    except HeadkvError as e:
        fail(str(e))
    return a


def main(argv: list[str] | None = None) -> None:
    a = parse(argv)
    torch.set_num_threads(a.threads)
    model, tok = load_model("smollm2-135m")
    runs = [("static_dense", a.static, "dense"), ("static_auto", a.static, "auto"),
            ("dynamic", a.dynamic, "auto")]
    result = {"bench": "dynamic_cost", "static": a.static.name, "dynamic": a.dynamic.name,
              "fill": a.dynamic.fill.to_dict(), "threads": a.threads, "repeats": a.repeats, "evaluator": {}}
    for t in a.lengths:
        blocks = token_blocks(tok, "austen", "eval", seq_len=t, n_blocks=1)
        seconds: dict[str, list[float]] = {label: [] for label, _, _ in runs}
        ppl = {}
        for _ in range(a.repeats):
            for label, alloc, backend in runs:
                start = time.perf_counter()
                ppl[label] = evaluate(model, alloc, blocks, backend=backend).ppl
                seconds[label].append(time.perf_counter() - start)
        med = {label: statistics.median(s) for label, s in seconds.items()}
        result["evaluator"][str(t)] = {"median_s": med, "runs_s": seconds, "ppl": ppl,
                                      "evaluator_ratio": med["dynamic"] / min(med["static_dense"],
                                                                               med["static_auto"])}
        print(f"evaluator T={t}: " + ", ".join(f"{k} {v:.2f} s" for k, v in med.items()), flush=True)
    tokens = long_stream(tok, "austen", "eval", a.decode_at)
    rates: dict[str, list[float]] = {"static": [], "dynamic": []}
    for _ in range(a.repeats):
        for label, alloc in (("static", a.static), ("dynamic", a.dynamic)):
            rates[label].append(decode_rate(model, alloc, tokens, a.steps)[1])  # per CPU second
    med = {k: statistics.median(v) for k, v in rates.items()}
    result["decode"] = {"prompt": a.decode_at, "steps": a.steps, "tokens_per_cpu_s": med, "runs": rates,
                        "decode_ratio": med["dynamic"] / med["static"]}
    print(f"decode after {a.decode_at}: static {med['static']:.2f}, dynamic {med['dynamic']:.2f} tok/CPU-s "
          f"({result['decode']['decode_ratio']:.3f}x)", flush=True)
    emit_json(result, a.out)


if __name__ == "__main__":
    main()
