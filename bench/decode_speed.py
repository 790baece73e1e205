"""Decode tokens per second through each allocation's real cache, as ratios to the full cache, in one run.

    python bench/decode_speed.py                                  # offline default, T = 256 1024 4096, CPU
    python bench/decode_speed.py --random-init pythia-2.8b --dtype bfloat16 --device cuda \
        --at 1024 --at 8192 --at 32768
    python bench/decode_speed.py --vs-sliding 128 --at 256 --at 4096   # + transformers' sliding-window cache
    python bench/decode_speed.py --at 256 --steps 64 --repeats 1 --profile      # + where a step's time goes
    python bench/decode_speed.py --at 4096 --batch 8 --steps 32                  # 8 sequences per step

For every context length T: each allocation's cache is filled with the same T tokens (chunked prefill, which
the tests show equals token-by-token), then ``--steps`` single-token decode steps are timed. The allocations
are timed round-robin, ``--repeats`` times, and the median is kept, so a load spike on a shared machine hits
all of them alike. ``ratio`` is tokens/s over the full cache's (transformers' DynamicCache) at the same T;
``cpu_ratio`` the same on the process's CPU time (the steadier clock on a shared CPU with one thread).
Same allocations as ``bench/kv_memory.py`` (full, ``--policy`` default B_streaming_128, ``--allocation``
files, the built per-head one). ``--vs-sliding W`` adds transformers' own sliding-window cache at window W
(``hf_sliding_W``: the same weights in a Mistral twin with ``sliding_window=W``, whose ``DynamicCache`` holds
``DynamicSlidingWindowLayer``s) beside our cache at the equal uniform window (``A_window_W``, no sink);
``vs_sliding`` is the ratio of the two. ``--batch B`` decodes B copies of the prompt per step (default 1).
Writes one JSON object (``--out``) and prints it.
"""

from __future__ import annotations

import cProfile
import pstats
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kv_memory import allocations, header, load, parse, prefill  # noqa: E402

from headkv.alloc.allocation import Allocation, applied  # noqa: E402
from headkv.models.common import emit_json  # noqa: E402
from headkv.models.loading import model_shape  # noqa: E402


class SlidingTwin:
    """transformers' own sliding-window attention and cache at window W, same weights (a Mistral twin)."""

    def __init__(self, model: torch.nn.Module, window: int) -> None:
        from transformers import MistralConfig, MistralForCausalLM

        d = {k: v for k, v in model.config.to_dict().items()
             if k not in ("architectures", "model_type", "transformers_version", "sliding_window")}
        twin = MistralForCausalLM(MistralConfig(**d, sliding_window=window))
        self.model = twin.to(model.device, model.dtype)
        self.model.load_state_dict(model.state_dict())
        self.model.eval().config._attn_implementation = "sdpa"

    def eff_ctx(self) -> float:
        return float(self.model.config.sliding_window)


def _sync(model: torch.nn.Module) -> None:
    if next(model.parameters()).is_cuda:
        torch.cuda.synchronize()


@torch.no_grad()
def decode_rate(
    model: torch.nn.Module, allocation, tokens: torch.Tensor, steps: int, profiler: Any = None, batch: int = 1
) -> tuple[float, float]:
    """Tokens per wall-clock second and per CPU second of ``steps`` greedy single-token steps after a prompt
    of ``tokens`` went through the allocation's real cache. On a shared CPU the process's CPU time is the
    steadier clock; on a GPU only wall time counts. A cProfile ``profiler`` runs over the decode steps."""
    nxt = torch.zeros(batch, 1, dtype=torch.long, device=model.device)
    if isinstance(allocation, SlidingTwin):
        model, door = allocation.model, nullcontext(DynamicCache(config=allocation.model.config))
    else:
        door = applied(model, allocation, evict=True)
    with door as cache:
        prefill(model, cache, tokens, batch=batch)
        model(nxt, cache=cache, use_cache=True)  # warm-up step
        _sync(model)
        start, cpu = time.perf_counter(), time.process_time()
        if profiler:
            profiler.enable()
        for _ in range(steps):
            logits = model(nxt, cache=cache, use_cache=True).logits
            nxt = logits[:, -1:].argmax(-1)
        _sync(model)
        if profiler:
            profiler.disable()
    return steps / (time.perf_counter() - start), steps / (time.process_time() - cpu)


def time_shares(model: torch.nn.Module, allocation, tokens: torch.Tensor, steps: int) -> dict[str, float]:
    """Where a decode step's time goes (cProfile over ``steps`` steps): the share in the linear layers, in
    SDPA, and in the cache's ``update`` (its bookkeeping and writes, with the torch calls it makes)."""
    prof = cProfile.Profile()
    decode_rate(model, allocation, tokens, steps, prof)
    stats = pstats.Stats(prof).stats  # (file, line, name) -> (calls, primitive, tottime, cumtime, callers)
    total = sum(v[2] for v in stats.values())

    def own(name: str) -> float:  # time inside one torch built-in
        return sum(v[2] for k, v in stats.items() if name in k[2]) / total

    caches = ("kv_cache.py", "cache_utils.py")
    update = [v[3] for k, v in stats.items() if k[2] == "update" and k[0].endswith(caches)]
    return {"linear": own("torch._C._nn.linear"), "sdpa": own("scaled_dot_product_attention"),
            "cache_update": max(update, default=0.0) / total}  # the outermost update: all the cache's work


def at_length(model, rows, tokens: torch.Tensor, steps: int, repeats: int, batch: int = 1) -> list[dict]:
    """Tokens/s of every row (sequences x steps / s), medians over ``repeats`` round-robin runs."""
    rates: dict[str, list[tuple[float, float]]] = {label: [] for label, _ in rows}
    for _ in range(repeats):
        for label, alloc in rows:  # round-robin: a load spike hits every allocation alike
            wall, cpu = decode_rate(model, alloc, tokens, steps, batch=batch)
            rates[label].append((wall * batch, cpu * batch))
    wall = {label: statistics.median(w for w, _ in r) for label, r in rates.items()}
    cpu = {label: statistics.median(c for _, c in r) for label, r in rates.items()}
    return [{"allocation": label, "tokens_per_s": wall[label], "ratio": wall[label] / wall["full"],
             "tokens_per_cpu_s": cpu[label], "cpu_ratio": cpu[label] / cpu["full"], "runs": r}
            for label, r in rates.items()]


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = {"--at": [], "--steps": 32, "--repeats": 3, "--vs-sliding": 0, "--profile": False, "--batch": 1}
    rest = []
    it = iter(argv)
    for a in it:
        if a == "--at":
            extra["--at"].append(int(next(it)))
        elif a in ("--steps", "--repeats", "--vs-sliding", "--batch"):
            extra[a] = int(next(it))
        elif a == "--profile":
            extra[a] = True
        else:
            rest.append(a)
    lengths = extra["--at"] or [256, 1024, 4096]
    args = parse(rest + ["--tokens", str(max(lengths))])
    model, tokens, tok = load(args)
    rows = allocations(args, model, tok)
    if extra["--vs-sliding"]:
        w, shape = extra["--vs-sliding"], model_shape(model)
        uniform = Allocation.uniform(shape.shape, 0, w, model_id=shape.model_id, q_per_kv=shape.q_per_kv)
        rows += [(f"A_window_{w}", uniform), (f"hf_sliding_{w}", SlidingTwin(model, w))]
    result = header(model, args, "decode_speed")
    result.update(steps=extra["--steps"], repeats=extra["--repeats"], batch=extra["--batch"],
                  eff_ctx={label: (a.eff_ctx() if a is not None else None) for label, a in rows})
    steps, repeats = extra["--steps"], extra["--repeats"]
    result["by_length"] = {str(t): at_length(model, rows, tokens[:t], steps, repeats, extra["--batch"])
                           for t in lengths}
    if extra["--vs-sliding"]:
        w = extra["--vs-sliding"]
        for t, rs in result["by_length"].items():
            ours, theirs = ({r["allocation"]: r for r in rs}[k] for k in (f"A_window_{w}", f"hf_sliding_{w}"))
            result.setdefault("vs_sliding", {})[t] = {
                "wall": ours["tokens_per_s"] / theirs["tokens_per_s"],
                "cpu": ours["tokens_per_cpu_s"] / theirs["tokens_per_cpu_s"]}
    if extra["--profile"]:
        result["time_shares"] = {str(t): {label: time_shares(model, a, tokens[:t], steps)
                                          for label, a in rows} for t in lengths}
    emit_json(result, args.out)


if __name__ == "__main__":
    main()
