"""Decode tokens per second through each allocation's real cache, as ratios to the full cache, in one run.

    python bench/decode_speed.py                                  # offline default, T = 256 1024 4096, CPU
    python bench/decode_speed.py --random-init pythia-2.8b --dtype bfloat16 --device cuda \
        --at 1024 --at 8192 --at 32768

For every context length T: each allocation's cache is filled with the same T tokens (chunked prefill, which
the tests show equals token-by-token), then ``--steps`` single-token decode steps are timed. The allocations
are timed round-robin, ``--repeats`` times, and the median is kept, so a load spike on a shared machine hits
all of them alike. ``ratio`` is tokens/s over the full cache's (transformers' DynamicCache) at the same T;
``cpu_ratio`` the same on the process's CPU time (the steadier clock on a shared CPU with one thread).
Same allocations as ``bench/kv_memory.py`` (full, ``--policy`` default B_streaming_128, ``--allocation``
files, the built per-head one). Writes one JSON object (``--out``) and prints it.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kv_memory import allocations, header, load, parse, prefill, write  # noqa: E402

from alloc.allocation import applied  # noqa: E402


def _sync(model: torch.nn.Module) -> None:
    if next(model.parameters()).is_cuda:
        torch.cuda.synchronize()


@torch.no_grad()
def decode_rate(model: torch.nn.Module, allocation, tokens: torch.Tensor, steps: int) -> tuple[float, float]:
    """Tokens per wall-clock second and per CPU second of ``steps`` greedy single-token steps after a prompt
    of ``tokens`` went through the allocation's real cache. On a shared CPU the process's CPU time is the
    steadier clock; on a GPU only wall time counts."""
    nxt = torch.zeros(1, 1, dtype=torch.long, device=model.device)
    with applied(model, allocation, evict=True) as cache:
        prefill(model, cache, tokens)
        model(nxt, cache=cache, use_cache=True)  # warm-up step
        _sync(model)
        start, cpu = time.perf_counter(), time.process_time()
        for _ in range(steps):
            logits = model(nxt, cache=cache, use_cache=True).logits
            nxt = logits[:, -1:].argmax(-1)
        _sync(model)
    return steps / (time.perf_counter() - start), steps / (time.process_time() - cpu)


def at_length(model, rows, tokens: torch.Tensor, steps: int, repeats: int) -> list[dict]:
    rates: dict[str, list[tuple[float, float]]] = {label: [] for label, _ in rows}
    for _ in range(repeats):
        for label, alloc in rows:  # round-robin: a load spike hits every allocation alike
            rates[label].append(decode_rate(model, alloc, tokens, steps))
    wall = {label: statistics.median(w for w, _ in r) for label, r in rates.items()}
    cpu = {label: statistics.median(c for _, c in r) for label, r in rates.items()}
    return [{"allocation": label, "tokens_per_s": wall[label], "ratio": wall[label] / wall["full"],
             "tokens_per_cpu_s": cpu[label], "cpu_ratio": cpu[label] / cpu["full"], "runs": r}
            for label, r in rates.items()]


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = {"--at": [], "--steps": 32, "--repeats": 3}
    rest = []
    it = iter(argv)
    for a in it:
        if a == "--at":
            extra["--at"].append(int(next(it)))
        elif a in ("--steps", "--repeats"):
            extra[a] = int(next(it))
        else:
            rest.append(a)
    lengths = extra["--at"] or [256, 1024, 4096]
    args = parse(rest + ["--tokens", str(max(lengths))])
    model, tokens, tok = load(args)
    rows = allocations(args, model, tok)
    result = header(model, args, "decode_speed")
    result.update(steps=extra["--steps"], repeats=extra["--repeats"],
                  eff_ctx={label: (a.eff_ctx() if a is not None else None) for label, a in rows})
    result["by_length"] = {str(t): at_length(model, rows, tokens[:t], extra["--steps"], extra["--repeats"])
                           for t in lengths}
    write(result, args.out)


if __name__ == "__main__":
    main()
