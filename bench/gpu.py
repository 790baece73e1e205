"""Every GPU measurement of headkv in one run, one JSON: training step, decode, throughput at fixed memory,
attention alone.

    python bench/gpu.py --out results/gpu.json                     # one H200: pythia-2.8b shape, bf16
    python bench/gpu.py --random-init tiny --device cpu --lengths 64 256 --train-lengths 128 \
        --memory-gib 0.01 --steps 4 --out /tmp/gpu.json               # the same script, seconds on CPU

Sections, in this order (the JSON is rewritten after each, so a run stopped early keeps what it finished):

1. ``cuda_tests``: the CUDA tests of the suite (flex gradient, graph replay), run by pytest.
2. ``train``: at each ``--train-lengths`` T, a KL gate-training step (teacher forward included), a CE step
   and a plain forward+backward of the same model and block (every weight trainable): ``bench/train_step.py``
   with ``--attention auto``; ``flex_trains`` says whether the soft window took the FlexAttention path (the
   start probe) and with which kernel options. ``train_profile``: torch.profiler's top kernels of one KL
   step at the shortest length.
3. ``decode``: tokens/s of greedy single-token steps after a T-token prompt, at batch 1 and ``--batch``:
   transformers' DynamicCache (its own loop, eager), headkv's static full cache, B_streaming_128 and a
   per-head allocation at Eff.Ctx 128 (windows 32/64/128/272 with sink 4, ``spread_128``) in both storage
   layouts (``_padded``: every head at its layer's largest capacity; ``_flat``: the exact per-head
   segments), the static ones replayed as CUDA graphs. ``ratio``: over the faster of the two full caches.
   A batch holds copies of one prefilled prompt (a decode step's cost does not depend on the tokens).
4. ``fixed_memory``: at the longest length, the largest batch whose KV fits in ``--memory-gib`` for each
   cache, and its tokens/s (``ratio`` over the faster full cache's at its own largest batch).
5. ``attention``: one attention call (32 query / 32 KV heads, dim 80, bf16 on CUDA) at each length:
   FlexAttention under B_streaming_128 and spread_128 against causal SDPA.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from kv_memory import Parser, fail  # noqa: E402
from train_step import SHAPES, measure  # noqa: E402

from headkv.alloc.allocation import Allocation, applied  # noqa: E402
from headkv.models import flex  # noqa: E402
from headkv.models.common import atomic_write  # noqa: E402
from headkv.models.dynamic import Fill  # noqa: E402
from headkv.models.kv_cache import kv_bytes_of  # noqa: E402
from headkv.models.loading import freeze, model_shape  # noqa: E402
from headkv.models.static_cache import GraphDecoder  # noqa: E402

SINK, BUDGET = 4, 128


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = Parser(description=__doc__.splitlines()[0])
    ap.add_argument("--random-init", default="pythia-2.8b", choices=sorted(SHAPES))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 8192, 32768])
    ap.add_argument("--train-lengths", type=int, nargs="+", default=[2048, 8192])
    ap.add_argument("--batch", type=int, default=16, help="the large decode batch (at lengths < the longest)")
    ap.add_argument("--steps", type=int, default=32, help="timed decode steps")
    ap.add_argument("--memory-gib", type=float, default=64.0, help="KV memory for the fixed-memory section")
    ap.add_argument("--max-batch", type=int, default=2048)
    ap.add_argument("--dynamic-lengths", type=int, nargs="+", default=[1024, 8192],
                    help="prompt lengths of the dynamic section")
    ap.add_argument("--skip", nargs="*", default=[], choices=["cuda_tests", "train", "profile", "decode",
                                                              "fixed_memory", "attention", "dynamic"])
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    check(args)
    return args


def check(args: argparse.Namespace) -> None:
    """Bad values end in one ``error:`` line, exit 2, before a model is built or a file written."""
    if min(args.lengths + args.dynamic_lengths) < 2 or min(args.train_lengths) <= BUDGET:
        fail(f"--lengths must be >= 2 and --train-lengths > {BUDGET} (the gates' budget); got "
             f"{args.lengths} and {args.train_lengths}")
    if args.batch < 1 or args.steps < 1 or args.max_batch < 1:
        fail(f"--batch, --steps and --max-batch must be >= 1; got {args.batch}, {args.steps}, "
             f"{args.max_batch}")
    if not (0 < args.memory_gib < float("inf")):
        fail(f"--memory-gib must be a positive number of GiB, got {args.memory_gib}")
    if args.dtype not in ("float32", "bfloat16", "float16"):
        fail(f"--dtype must be float32, bfloat16 or float16, got {args.dtype!r}")
    if args.device not in ("cpu", "cuda") or (args.device == "cuda" and not torch.cuda.is_available()):
        fail(f"--device must be cpu or cuda (with a CUDA device present), got {args.device!r}")
    if args.out.exists() and not args.out.is_file():
        fail(f"--out {args.out} exists and is not a regular file")


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def build(args: argparse.Namespace, max_len: int) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, GPTNeoXConfig

    cfg = GPTNeoXConfig(max_position_embeddings=max(2048, max_len), **SHAPES[args.random_init])
    torch.manual_seed(0)
    with torch.device(args.device):
        lm = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa",
                                              dtype=getattr(torch, args.dtype))
    return freeze(lm)


def allocations(model: torch.nn.Module) -> dict[str, Allocation]:
    """B_streaming_128 and the per-head spread_128 (the one bench/kv_memory.py builds on random weights)."""
    s = model_shape(model)
    n = s.n_layers * s.n_kv_heads
    window = torch.tensor([(32, 64, 128, 272)[i % 4] for i in range(n)])
    window[0] += n * (BUDGET - SINK) - int(window.sum())
    kw = dict(model_id=s.model_id, q_per_kv=s.q_per_kv)
    spread = Allocation.from_tensors(torch.full(s.shape, SINK), window.view(s.shape), **kw)
    return {"B_streaming_128": Allocation.uniform(s.shape, SINK, BUDGET - SINK, **kw),
            "spread_128_padded": spread, "spread_128_flat": spread}


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@torch.no_grad()
def decode(model, label: str, alloc, prompt: torch.Tensor, steps: int, batch: int) -> dict:
    """Tokens/s of ``steps`` greedy steps of ``batch`` copies of ``prompt`` through one cache; and its KV
    bytes per sequence once the steps are done."""
    device = prompt.device.type
    ids = prompt.view(1, -1)
    t = ids.shape[1]
    layout = label.rsplit("_", 1)[-1] if label.endswith(("_flat", "_padded")) else "auto"
    eager = label == "dynamic_full" or label.endswith(("_evicting", "_filled"))
    door = (applied(model, alloc, evict=True) if eager
            else applied(model, alloc, evict=True, static=t + steps + 4, backend="auto", layout=layout))
    with door as cache:
        logits = model(ids, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
        if batch > 1:
            cache.batch_repeat_interleave(batch)
            logits = logits.expand(batch, -1)
        nxt = logits.argmax(-1, keepdim=True)
        decoder = None if eager else GraphDecoder(model, cache)

        def step(x):
            return decoder.step(x) if decoder else model(x, cache=cache, use_cache=True).logits[:, -1]

        for _ in range(3):  # warm-up (and, on CUDA, the graph capture)
            nxt = step(nxt).argmax(-1, keepdim=True)
        sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            nxt = step(nxt).argmax(-1, keepdim=True)
        sync(device)
        seconds = time.perf_counter() - start
        total = kv_bytes_of(cache)
    return {"cache": label, "batch": batch, "tokens_per_s": batch * steps / seconds,
            "step_ms": 1e3 * seconds / steps, "kv_bytes_per_seq": total // batch,
            "cuda_graph": bool(decoder and decoder.graphed)}


def ratios(rows: list[dict]) -> list[dict]:
    full = max(r["tokens_per_s"] for r in rows if r["cache"] in ("dynamic_full", "static_full"))
    return [dict(r, ratio=r["tokens_per_s"] / full) for r in rows]


def decode_section(model, args, allocs, tokens) -> dict:
    out = {}
    for t in args.lengths:
        for batch in sorted({1, args.batch if t < max(args.lengths) else 1}):
            rows = []
            for label in ("dynamic_full", "static_full", *allocs):
                rows.append(decode(model, label, allocs.get(label), tokens[:t], args.steps, batch))
                free()
            out[f"{t}x{batch}"] = ratios(rows)
            line = ", ".join(f"{r['cache']} {r['tokens_per_s']:.0f} tok/s ({r['ratio']:.2f}x)"
                             for r in out[f"{t}x{batch}"])
            print(f"decode T={t} batch={batch}: {line}", flush=True)
    return out


def dynamic_section(model, args, allocs, tokens) -> dict:
    """spread_128's budgets in three caches: the static cache (CUDA graph), the per-head evicting cache and
    the filled cache of dynamic windows (models.dynamic, default rule), both eager; ``vs_static``: the
    filled cache's tokens/s over the static cache's, ``vs_evicting`` over the evicting cache's."""
    spread = allocs["spread_128_padded"]
    caches = {"spread_128_static": spread, "spread_128_evicting": spread,
              "spread_128_filled": spread.filled(Fill())}
    out = {}
    for t in args.dynamic_lengths:
        for batch in sorted({1, args.batch}):
            rows = [decode(model, label, a, tokens[:t], args.steps, batch) for label, a in caches.items()]
            free()
            by = {r["cache"]: r for r in rows}
            filled = by["spread_128_filled"]["tokens_per_s"]
            out[f"{t}x{batch}"] = {"rows": rows,
                                   "vs_static": filled / by["spread_128_static"]["tokens_per_s"],
                                   "vs_evicting": filled / by["spread_128_evicting"]["tokens_per_s"]}
            print(f"dynamic T={t} batch={batch}: " + ", ".join(
                f"{r['cache']} {r['tokens_per_s']:.0f} tok/s" for r in rows), flush=True)
    return out


def fixed_memory_section(model, args, allocs, tokens) -> dict:
    t = max(args.lengths)
    budget = int(args.memory_gib * 2**30)
    rows = []
    for label in ("dynamic_full", "static_full", *allocs):
        per_seq = decode(model, label, allocs.get(label), tokens[:t], 2, 1)["kv_bytes_per_seq"]
        free()
        batch = min(args.max_batch, budget // per_seq)
        if batch < 1:
            rows.append({"cache": label, "batch": 0, "tokens_per_s": 0.0, "kv_bytes_per_seq": per_seq})
            continue
        rows.append(decode(model, label, allocs.get(label), tokens[:t], args.steps, batch))
        free()
        print(f"fixed memory T={t}: {label} batch {batch}: {rows[-1]['tokens_per_s']:.0f} tok/s", flush=True)
    return {"tokens": t, "memory_gib": args.memory_gib, "rows": ratios(rows)}


def timed_ms(fn, device: str, reps: int = 10) -> float:
    fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(device)
    return 1e3 * (time.perf_counter() - start) / reps


def attention_at(model, args, allocs, t: int) -> dict:
    """One attention call, (1, Hq, T, D) in the model's dtype: flex under each allocation vs causal SDPA."""
    s = model_shape(model)
    g = torch.Generator(device=args.device).manual_seed(t)
    q, k, v = (torch.randn(1, heads, t, s.head_dim, generator=g, device=args.device, dtype=model.dtype)
               for heads in (s.n_kv_heads * s.q_per_kv, s.n_kv_heads, s.n_kv_heads))
    row = {"causal_sdpa_ms": timed_ms(
        lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), args.device)}
    for label, a in allocs.items():
        if label.endswith("_flat"):
            continue  # the same mask as _padded: storage is no matter here
        sink, window = (x[0] for x in a.tensors(args.device))
        row[f"flex_{label.removesuffix('_padded')}_ms"] = timed_ms(
            lambda sink=sink, window=window: flex.hard_attention(q, k, v, sink, window, None, None),
            args.device)
    return row


def attention_section(model, args, allocs) -> dict:
    out = {}
    for t in args.lengths:
        out[str(t)] = attention_at(model, args, allocs, t)
        print(f"attention T={t}: " + ", ".join(f"{k} {v:.3f}" for k, v in out[str(t)].items()), flush=True)
    return out


def train_section(args, profiled: bool) -> tuple[dict, dict | None]:
    """Train-step ratios at each length; with ``profiled``, the profile of one KL step at the shortest one
    (on the same model, already warm)."""
    out, prof = {}, None
    for t in args.train_lengths:
        model = build(args, t)
        ns = argparse.Namespace(device=args.device, seq_len=t, budget=float(BUDGET), sink=SINK, warmup=1,
                                repeats=3, attention="auto")
        blocks = torch.randint(0, model.config.vocab_size, (1, t), device=args.device)
        start = time.perf_counter()
        row = measure(model, blocks, ns)
        s = model_shape(model)
        row.update(flex_trains=flex.trainable(args.device, s.head_dim, model.dtype),
                   kernel_options=flex.KERNEL_OPTIONS.get(torch.device(args.device).type),
                   probe_errors=list(flex.PROBE_ERRORS),
                   wall_s=time.perf_counter() - start)
        out[str(t)] = row
        print(f"train T={t}: KL {row['ratio_step_to_plain']:.2f}x CE {row['ratio_ce_step_to_plain']:.2f}x "
              f"of plain fwd+bwd; flex {row['flex_trains']}", flush=True)
        if profiled and t == min(args.train_lengths):
            prof = profile_step(model, blocks, args)
        del model
        free()
    return out, prof


def profile_step(model, blocks: torch.Tensor, args, top: int = 15) -> dict:
    """Where a KL training step's device time goes: torch.profiler's top kernels by self time."""
    from torch.profiler import ProfilerActivity, profile

    from headkv.alloc.gates import WindowGates
    from headkv.alloc.train import distill_loss

    t = blocks.shape[1]
    gates = WindowGates(model_shape(model).shape, float(BUDGET), t, SINK).to(args.device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    with profile(activities=activities) as prof:
        distill_loss(model, gates, blocks, tau=2.0, backend="auto").backward()
        sync(args.device)
    key = "self_device_time_total" if args.device == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key, 0), reverse=True)
    total = sum(getattr(e, key, 0) for e in events) or 1
    return {"tokens": t, "total_ms": total / 1e3, "top": [
        {"name": e.key[:120], "ms": getattr(e, key, 0) / 1e3, "share": getattr(e, key, 0) / total,
         "calls": e.count} for e in events[:top]]}


def cuda_tests() -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-k", "cuda", "tests/test_flex.py",
           "tests/test_static_cache.py", "tests/test_dynamic.py"]
    start = time.perf_counter()
    path = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180, env=env)
    except subprocess.TimeoutExpired:
        return {"returncode": None, "summary": "timed out after 180 s", "wall_s": time.perf_counter() - start}
    lines = proc.stdout.strip().splitlines()
    failed = [line for line in lines if line.startswith(("FAILED", "ERROR", "E "))][:20]
    return {"returncode": proc.returncode, "summary": (lines[-1:] or [""])[0], "failures": failed,
            "wall_s": time.perf_counter() - start}


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    result = {"bench": "gpu", "model": args.random_init, "random_init": True, "device": args.device,
              "device_name": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor(),
              "dtype": args.dtype, "torch": torch.__version__,
              "transformers": __import__("transformers").__version__,
              "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "steps": args.steps}
    started = time.perf_counter()

    def save(section: str, value) -> None:
        result[section] = value
        result["wall_s"] = time.perf_counter() - started
        args.out.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(result, indent=1) + "\n"
        atomic_write(args.out, lambda p: p.write_text(text))

    if "cuda_tests" not in args.skip and args.device == "cuda":
        save("cuda_tests", cuda_tests())
        print("cuda tests:", result["cuda_tests"]["summary"], flush=True)
    if "train" not in args.skip:
        train, prof = train_section(args, "profile" not in args.skip)
        save("train", train)
        if prof is not None:
            save("train_profile", prof)
    longest = max(args.lengths + ([] if "dynamic" in args.skip else args.dynamic_lengths))
    model = build(args, longest + args.steps + 16)
    tokens = torch.randint(0, model.config.vocab_size, (longest,), device=args.device)
    allocs = allocations(model)
    result["eff_ctx"] = {k: a.eff_ctx() for k, a in allocs.items()}
    if "decode" not in args.skip:
        save("decode", decode_section(model, args, allocs, tokens))
    if "fixed_memory" not in args.skip:
        save("fixed_memory", fixed_memory_section(model, args, allocs, tokens))
    if "attention" not in args.skip:
        save("attention", attention_section(model, args, allocs))
    if "dynamic" not in args.skip:
        save("dynamic", dynamic_section(model, args, allocs, tokens))
    if args.device == "cuda":
        result["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    save("done", True)
    print(json.dumps({k: result[k] for k in ("wall_s",)}))


if __name__ == "__main__":
    main()
