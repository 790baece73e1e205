"""Long-context attention cost: the FlexAttention block-sparse path against the dense-bias SDPA path and plain
causal SDPA, one layer-shaped call at a time.

    python bench/long_context.py                                  # T = 1024 2048 4096 8192, CPU, 2 threads
    python bench/long_context.py --at 4096 --at 16384 --reps 5 --out results/long_context.json
    python bench/long_context.py --device cuda --dtype bfloat16 --at 8192 --at 32768
    python bench/long_context.py --part full_model --lengths 4096 \
        --allocation runs/learned_b128/allocation.json

Attention-only microbench, SmolLM2-135M's layer shape by default (9 query heads on 3 KV heads, head dim 64,
batch 1, the queries all T keys: a prefill / masked-evaluator forward). For every context length T and
allocation, each method runs in a fresh subprocess (so peaks are separate and one method's allocator state
never helps another):

* ``flex``: :func:`models.flex.hard_attention` (compiled FlexAttention, block mask of the allocation);
* ``dense``: what :mod:`models.attention` does for a hard mask today -- ``models.window.hard_bias`` per KV
  head, repeated to the query heads, clamped to a finite floor, added to SDPA through transformers'
  ``sdpa_attention_forward`` (which repeats K/V, since a mask rules out SDPA's GQA path);
* ``causal``: plain ``sdpa_attention_forward`` with no mask (``is_causal``), the full-attention baseline
  (allocation-independent: measured once per T).

Allocations: ``B_streaming_128`` (sink 4, window 124 on every head) and ``mixed`` (per KV head: (4, 124),
(4, 1020), (0, all): one streaming head, one 1K head, one full head).

Per row: ``first_call_s`` (compilation and block-mask build for flex, bias build for dense), ``median_s`` over
``--reps`` timed calls after one more warm-up call, and ``peak_rss_growth_mb``: the peak resident memory of
the timed calls above the resident memory just before them (``/proc/self/clear_refs`` resets the peak after
the warm-up; glibc's mmap threshold is pinned so freed big tensors go back to the system and each call's own
transient shows). On CUDA the peak is ``torch.cuda.max_memory_allocated`` growth instead. ``ratios`` holds
flex / dense and flex / causal of the medians, and the memory growth by T.

Full-model rows (:func:`full_model_rows`, JSON ``full_model``): the evaluator itself,
:func:`alloc.evaluate.evaluate` on ``--model`` (default the offline SmolLM2-135M) in ``--dtype``, on one
block of T tokens of the Austen eval split, for every T of ``--lengths`` (default 1024 2048 4096 8192), each
row in a fresh subprocess:

* ``B_streaming_128`` with ``backend="flex"`` and with ``backend="dense"``;
* a learned allocation (``--allocation FILE``, e.g. ``runs/learned_b128/allocation.json``), else a generated
  mixed one (``mixed_loguniform_128``, :func:`mixed_allocation`: sink 4, windows log-uniform 16..1020
  scaled to mean 124, Eff.Ctx 128), flex and dense; ``full_model.learned`` says which, with its Eff.Ctx;
* ``full``: allocation None, the stock model's plain SDPA (``is_causal``), the unmasked baseline.

Per row: ``first_s`` (the first ``evaluate``: flex compilation and block masks, or the dense biases),
``wall_s`` (a second, timed ``evaluate``), the PPL of both, ``flex_layer_calls`` (layers that took the
FlexAttention kernel in the timed run: all of them for flex, none otherwise), and memory: ``ru_maxrss_mb``
(``getrusage`` peak of the process), ``ru_maxrss_growth_mb`` (that peak above the RSS after model load, which
may hide a growth smaller than the load's own transient), ``peak_rss_growth_mb`` (peak of both runs above
the RSS after load, the peak reset after load) and ``timed_peak_rss_growth_mb`` (peak of the timed run above
the RSS just before it: the steady state, no compiler). Dense rows whose per-layer bias (``2 Hq T^2`` items)
exceeds ``--max-dense-gb`` are skipped with the reason; ``--skip-full T:BACKEND`` drops one by hand.
``full_model.summary``: dense / flex time and PPL difference per T, B_streaming_128 flex against full
attention at the largest T both ran, and the flex rows' memory growth by T (ratios, log-log slope, a linear
fit).
The on-disk inductor cache may hold flex's compiled kernel from an earlier process, which shortens
``first_s``.

Writes one JSON object (``--out``, atomically) and prints it; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from headkv.models import flex  # noqa: E402
from headkv.models import window as win  # noqa: E402
from headkv.models.common import emit_json  # noqa: E402

Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]
"""attend(query (B, Hq, Q, D), key (B, Hkv, K, D), value (B, Hkv, K, D), layer) -> (B, Q, Hq, D)"""

FULL = 10**9  # a window that never ends


def allocation_rows(label: str, n_kv: int) -> tuple[list[int], list[int]]:
    """(sink, window) per KV head of a named allocation."""
    if label == "B_streaming_128":
        return [4] * n_kv, [124] * n_kv
    if label == "mixed":
        base = [(4, 124), (4, 1020), (0, FULL)]
        rows = [base[h % len(base)] for h in range(n_kv)]
        return [s for s, _ in rows], [w for _, w in rows]
    raise ValueError(f"unknown allocation {label!r}")


# ---- the methods: each builds an ``attend`` for one allocation --------------------------------------------


def flex_attend(sink: list[int], window: list[int]) -> Attend:
    s, w = torch.tensor(sink), torch.tensor(window)

    def attend(query, key, value, layer):
        return flex.hard_attention(query, key, value, s, w, None, None)

    return attend


def dense_attend(sink: list[int], window: list[int]) -> Attend:
    """The dense path of models.attention for a hard mask over a full cache, no padding."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    s, w = torch.tensor(sink), torch.tensor(window)

    def attend(query, key, value, layer):
        q_len, k_len = query.shape[2], key.shape[2]
        k_pos = torch.arange(k_len, device=query.device)
        s_, w_ = s.to(query.device), w.to(query.device)
        bias = win.hard_bias(k_pos[k_len - q_len:], k_pos, s_, w_, torch.float32)  # (Hkv, Q, K)
        r = query.shape[1] // key.shape[1]
        bias = bias.repeat_interleave(r, dim=-3).unsqueeze(0).to(query.dtype)  # (1, Hq, Q, K)
        bias = bias.clamp(min=torch.finfo(query.dtype).min)
        module = SimpleNamespace(num_key_value_groups=r, is_causal=True)
        return sdpa_attention_forward(module, query, key, value, bias, 0.0, None, is_causal=False)[0]

    return attend


def causal_attend(sink: list[int], window: list[int]) -> Attend:
    """Plain full causal SDPA (the allocation is ignored)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def attend(query, key, value, layer):
        module = SimpleNamespace(num_key_value_groups=query.shape[1] // key.shape[1], is_causal=True)
        return sdpa_attention_forward(module, query, key, value, None, 0.0, None, is_causal=True)[0]

    return attend


METHODS: dict[str, Callable[[list[int], list[int]], Attend]] = {
    "flex": flex_attend, "dense": dense_attend, "causal": causal_attend}


# ---- one configuration, in a fresh process --------------------------------------------------------------


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM := VmRSS
        return True
    except OSError:
        return False


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(attend: Attend, spec: dict) -> dict:
    """Time ``attend`` on random layer-shaped tensors of one T and note its peak memory growth.

    The microbench's measuring loop, for any ``attend(query, key, value, layer)``: ``spec`` gives T, the
    shape (q_heads, kv_heads, head_dim, batch), dtype, device, reps and layers (calls per rep, cycling
    ``layer`` over 0..layers-1, each layer on its own K/V)."""
    torch.manual_seed(0)
    device, dtype = torch.device(spec["device"]), getattr(torch, spec["dtype"])
    t, b, d = spec["T"], spec["batch"], spec["head_dim"]
    layers = spec.get("layers", 1)
    q = torch.randn(b, spec["q_heads"], t, d, device=device, dtype=dtype)
    kv = [(torch.randn(b, spec["kv_heads"], t, d, device=device, dtype=dtype),
           torch.randn(b, spec["kv_heads"], t, d, device=device, dtype=dtype)) for _ in range(layers)]

    def call() -> None:
        for layer, (k, v) in enumerate(kv):
            out = attend(q, k, v, layer)
            del out
        _sync(device)

    with torch.no_grad():
        start = time.perf_counter()
        call()  # compiles (flex), builds the block masks or biases
        first = time.perf_counter() - start
        call()  # warm-up
        gc.collect()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        reset = _reset_peak()
        rss0 = _status_kb("VmRSS")
        runs = []
        for _ in range(spec["reps"]):
            start = time.perf_counter()
            call()
            runs.append(time.perf_counter() - start)
        hwm = _status_kb("VmHWM")
    row = {"first_call_s": first, "median_s": statistics.median(runs), "runs": runs,
           "base_rss_mb": rss0 / 1024 if rss0 else None}
    if device.type == "cuda":
        row["peak_mem_growth_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        row["peak_rss_growth_mb"] = (hwm - rss0) / 1024 if (reset and hwm and rss0) else None
    return row


def child(spec: dict) -> dict:
    torch.set_num_threads(spec["threads"])
    sink, window = allocation_rows(spec["allocation"], spec["kv_heads"])
    return measure(METHODS[spec["method"]](sink, window), spec)


def run_child(spec: dict) -> dict:
    """``child(spec)`` in a fresh interpreter; returns its row (or the error it died of)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072",
               OMP_NUM_THREADS=str(spec["threads"]))
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": f"exit {proc.returncode}: " + " | ".join(tail)}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- full-model rows: the evaluator, end to end ---------------------------------------------------------

CORPUS = "austen"  # the full-model rows' text: one block of T tokens of its eval split
MODEL_ALLOCATION = "B_streaming_128"  # the fixed policy of rows (a) and (b)
MIXED_NAME = "mixed_loguniform_128"  # the generated per-head allocation when no --allocation FILE is given
MIXED_SINK, MIXED_MEAN_WINDOW, MIXED_LO, MIXED_HI = 4, 124, 16, 1020
FULL_MODEL_ROWS = (  # (allocation, backend): "learned" is --allocation FILE or the generated mixed one
    (MODEL_ALLOCATION, "flex"), (MODEL_ALLOCATION, "dense"), ("learned", "flex"), ("learned", "dense"),
    ("full", "sdpa"))


def mixed_allocation(shape):
    """A deterministic mixed per-head allocation of mean Eff.Ctx 128 (sink 4 + mean window 124): the
    windows spread log-uniformly between 16 and 1020 (quantiles of one per (layer, KV head)), scaled to
    mean 124 (so about 8..523), the rounding remainder on the largest, dealt to the heads in a fixed
    seed-0 permutation so every layer mixes short and long heads."""
    from headkv.alloc.allocation import Allocation

    n_layers, n_kv = shape.shape
    n = n_layers * n_kv
    raw = [MIXED_LO * (MIXED_HI / MIXED_LO) ** (i / max(n - 1, 1)) for i in range(n)]
    scale = MIXED_MEAN_WINDOW / statistics.fmean(raw)
    windows = [max(1, round(x * scale)) for x in raw]
    windows[-1] += MIXED_MEAN_WINDOW * n - sum(windows)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0)).tolist()
    dealt = [windows[i] for i in order]
    grid = [dealt[li * n_kv:(li + 1) * n_kv] for li in range(n_layers)]
    meta = {"policy": MIXED_NAME, "budget": MIXED_SINK + MIXED_MEAN_WINDOW,
            "source": f"bench/long_context.py: windows log-uniform {MIXED_LO}..{MIXED_HI}, "
                      f"scaled x{scale:.4f} to mean {MIXED_MEAN_WINDOW}, sink {MIXED_SINK}, "
                      "seed-0 permutation"}
    return Allocation([[MIXED_SINK] * n_kv] * n_layers, grid, shape.model_id, shape.q_per_kv, meta)


def model_allocation(label: str, learned: str | None, shape):
    """The allocation of a full-model row: None for full attention."""
    from headkv.alloc.allocation import Allocation
    from headkv.alloc.policies import PolicyContext, build

    if label == "full":
        return None
    if label == "learned":
        return Allocation.load(learned) if learned else mixed_allocation(shape)
    return build(label, PolicyContext(shape.shape, shape.q_per_kv, shape.model_id, native=shape.native))


def _ru_maxrss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def full_model_child(spec: dict) -> dict:
    """One (T, allocation, backend) of the evaluator in this (fresh) process: load the model, take one block
    of T tokens, run :func:`alloc.evaluate.evaluate` twice (compile + first, then the timed run)."""
    torch.set_num_threads(spec["threads"])
    from headkv.alloc.evaluate import blocks_for, evaluate
    from headkv.models.loading import load_model, model_shape

    model, tok = load_model(spec["model"], device=spec["device"], dtype=getattr(torch, spec["dtype"]))
    shape = model_shape(model)
    allocation = model_allocation(spec["allocation"], spec.get("learned"), shape)
    t, backend = spec["T"], spec["backend"]
    row: dict = {"name": allocation.name if allocation is not None else "full"}
    if allocation is not None:
        bound = allocation.bound(shape.native)
        row["eff_ctx"] = bound.eff_ctx()
        if spec["allocation"] == "learned":
            windows = [w for r in allocation.window for w in r]
            sinks = [s for r in allocation.sink for s in r]
            row["allocation_info"] = {
                "name": allocation.name, "source": "file" if spec.get("learned") else "generated",
                "path": spec.get("learned"), "eff_ctx": bound.eff_ctx(), "digest": allocation.digest()[:16],
                "meta": allocation.meta, "sink": allocation.sink if len(set(sinks)) > 1 else sinks[0],
                "window_min": min(windows), "window_max": max(windows),
                "window_mean": statistics.fmean(windows), "window": allocation.window}
    if backend == "dense":  # the dense path's per-layer transient: the (Hq, T, T) bias, repeated then clamped
        itemsize = torch.empty((), dtype=model.dtype).element_size()
        bias_gb = 2 * shape.n_kv_heads * shape.q_per_kv * t * t * itemsize / 2**30
        row["bias_gb"] = bias_gb
        if bias_gb > spec["max_dense_gb"]:
            return {**row, "skipped": f"bias {bias_gb:.1f} GB > --max-dense-gb {spec['max_dense_gb']}"}
    blocks = blocks_for(tok, spec["corpus"], "eval", t, t)  # one block of T tokens (T - 1 predicted)
    from headkv.models import flex

    calls = [0]
    hard = flex.hard_attention

    def counted(*a, **kw):  # proves which path each layer took
        calls[0] += 1
        return hard(*a, **kw)

    flex.hard_attention = counted
    gc.collect()
    rss_load = _status_kb("VmRSS")
    maxrss_load = _ru_maxrss_mb()
    reset = _reset_peak()
    kw = {"backend": "dense" if backend == "sdpa" else backend}
    start = time.perf_counter()
    first = evaluate(model, allocation, blocks, **kw)  # compiles flex, builds block masks / biases
    first_s = time.perf_counter() - start
    hwm_all = _status_kb("VmHWM")
    first_calls, calls[0] = calls[0], 0
    gc.collect()
    rss_before = _status_kb("VmRSS")
    reset = _reset_peak() and reset
    start = time.perf_counter()
    timed = evaluate(model, allocation, blocks, **kw)
    wall_s = time.perf_counter() - start
    hwm_timed = _status_kb("VmHWM")
    hwm_all = max(hwm_all or 0, hwm_timed or 0)
    maxrss = _ru_maxrss_mb()
    return {
        **row,
        "first_s": first_s, "wall_s": wall_s, "ppl": timed.ppl, "ppl_first": first.ppl, "acc": timed.acc,
        "tokens": timed.tokens, "seq_len": timed.seq_len, "realized_ctx": timed.realized_ctx,
        "kv_bytes": timed.kv_bytes, "kv_bytes_full": timed.kv_bytes_full,
        "flex_layer_calls": calls[0], "flex_layer_calls_first": first_calls, "n_layers": shape.n_layers,
        "flex_available": flex.available(model.device, shape.head_dim, model.dtype),
        "ru_maxrss_mb": maxrss, "ru_maxrss_after_load_mb": maxrss_load,
        "rss_after_load_mb": rss_load / 1024 if rss_load else None,
        "ru_maxrss_growth_mb": maxrss - rss_load / 1024 if rss_load else None,
        "peak_rss_growth_mb": (hwm_all - rss_load) / 1024 if (reset and rss_load) else None,
        "timed_peak_rss_growth_mb": (hwm_timed - rss_before) / 1024 if (reset and hwm_timed and rss_before)
        else None,
    }


def _fit(ts: list[int], ys: list[float]) -> dict:
    """Growth vs T: consecutive ratios, the log-log slope (1 = linear) and a least-squares line."""
    import math

    steps = zip(ts, ys, ts[1:], ys[1:], strict=False)
    out: dict = {"T": ts, "mb": ys, "ratios": {f"{b}/{a}": yb / ya for a, ya, b, yb in steps if ya > 0}}
    if len(ts) >= 2 and all(y > 0 for y in ys):
        lx, ly = [math.log(t) for t in ts], [math.log(y) for y in ys]
        mx, my = statistics.fmean(lx), statistics.fmean(ly)
        out["loglog_slope"] = (sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True))
                               / sum((a - mx) ** 2 for a in lx))
        slope, icept = statistics.linear_regression(ts, ys)
        residual = max(abs(y - (icept + slope * t)) / y for t, y in zip(ts, ys, strict=True))
        out["linear_fit"] = {"mb_per_1k_tokens": 1024 * slope, "intercept_mb": icept,
                             "max_rel_residual": residual}
    return out


def full_model_summary(rows: list[dict]) -> dict:
    """The three questions: flex vs dense at 4096, flex B_streaming_128 vs full attention at 8192, and the
    flex rows' peak-memory growth by T."""
    by = {(r["T"], r["allocation"], r["backend"]): r for r in rows if "wall_s" in r}
    out: dict = {"flex_vs_dense": {}, "ppl_flex_vs_dense": {}, "memory_growth_flex": {}}
    for alloc in (MODEL_ALLOCATION, "learned"):
        for t in sorted({r["T"] for r in rows}):
            f, d = by.get((t, alloc, "flex")), by.get((t, alloc, "dense"))
            if f and d:
                out["flex_vs_dense"].setdefault(alloc, {})[str(t)] = {
                    "flex_s": f["wall_s"], "dense_s": d["wall_s"],
                    "dense_over_flex": d["wall_s"] / f["wall_s"],
                    "flex_at_least_3x_faster": d["wall_s"] >= 3 * f["wall_s"]}
                out["ppl_flex_vs_dense"].setdefault(alloc, {})[str(t)] = {
                    "flex": f["ppl"], "dense": d["ppl"], "rel_diff": abs(f["ppl"] - d["ppl"]) / d["ppl"]}
        flex_rows = sorted((t, r) for (t, a, b), r in by.items() if a == alloc and b == "flex")
        for key in ("timed_peak_rss_growth_mb", "peak_rss_growth_mb", "ru_maxrss_growth_mb"):
            pts = [(t, r[key]) for t, r in flex_rows if r.get(key) is not None]
            if pts:
                fit = _fit([t for t, _ in pts], [y for _, y in pts])
                out["memory_growth_flex"].setdefault(alloc, {})[key] = fit
    at = max((t for (t, a, b) in by if a == MODEL_ALLOCATION and b == "flex" and (t, "full", "sdpa") in by),
             default=None)
    if at is not None:
        f, full = by[(at, MODEL_ALLOCATION, "flex")], by[(at, "full", "sdpa")]
        out["streaming_flex_vs_full"] = {"T": at, "flex_s": f["wall_s"], "full_s": full["wall_s"],
                                         "full_over_flex": full["wall_s"] / f["wall_s"],
                                         "flex_faster": f["wall_s"] < full["wall_s"]}
    return out


def full_model_rows(args: argparse.Namespace) -> dict:
    """The evaluator end to end (:func:`alloc.evaluate.evaluate` on ``--model``, one block of T tokens of
    the Austen eval split) for every T of ``--lengths`` and row of :data:`FULL_MODEL_ROWS`, each in a fresh
    subprocess; the attention goes through the evaluator's own ``backend`` switch, full attention through
    the stock model's plain SDPA (``is_causal``).
    Returns ``{"rows": [...], "learned": ..., "summary": ...}``."""
    base = {"kind": "full_model", "model": args.model, "device": args.device, "dtype": args.dtype,
            "threads": args.threads,
            "corpus": CORPUS, "learned": args.learned, "max_dense_gb": args.max_dense_gb}
    rows, learned = [], None
    for t in args.lengths:
        for alloc, backend in FULL_MODEL_ROWS:
            if (t, backend) in args.skip_full:
                row = {"skipped": f"--skip-full {t}:{backend}"}
            else:
                print(f"[long_context] full model T={t} {alloc} {backend} ...", file=sys.stderr, flush=True)
                row = run_child(dict(base, T=t, allocation=alloc, backend=backend))
            learned = row.pop("allocation_info", None) or learned
            row = {"T": t, "allocation": alloc, "backend": backend, **row}
            print(f"[long_context]   {json.dumps(row)}", file=sys.stderr, flush=True)
            rows.append(row)
    return {"model": args.model, "corpus": f"{CORPUS} eval, one block of T tokens", "lengths": args.lengths,
            "learned": learned, "rows": rows, "summary": full_model_summary(rows)}


# ---- main -----------------------------------------------------------------------------------------------


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--at", type=int, action="append", default=None, help="context length T (repeatable)")
    p.add_argument("--allocation", action="append", default=None, metavar="NAME|FILE",
                   help="microbench allocation (B_streaming_128, mixed; repeatable), or an allocation JSON "
                        "file: the learned allocation of the full-model rows")
    p.add_argument("--method", action="append", default=None, choices=sorted(METHODS))
    p.add_argument("--q-heads", type=int, default=9)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--layers", type=int, default=1, help="calls per timed rep (each its own K/V)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--max-dense-gb", type=float, default=8.0,
                   help="skip dense rows whose (Hq, T, T) bias (twice: repeat, then clamp) exceeds this")
    p.add_argument("--part", action="append", default=None, choices=["attention", "full_model"],
                   help="what to run (repeatable; default both)")
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192],
                   help="full-model context lengths T")
    p.add_argument("--model", default=None, help="full-model rows' model (default: the offline default)")
    p.add_argument("--skip-full", action="append", default=[], metavar="T:BACKEND",
                   help="skip one full-model (T, backend) pair, e.g. 8192:dense (repeatable)")
    p.add_argument("--out", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.at = args.at or [1024, 2048, 4096, 8192]
    names = [a for a in args.allocation or [] if a in ("B_streaming_128", "mixed")]
    files = [a for a in args.allocation or [] if a not in names]
    for f in files:
        if not Path(f).is_file():
            p.error(f"--allocation {f}: neither B_streaming_128, mixed nor an allocation file")
    if len(files) > 1:
        p.error("--allocation: one allocation file at most")
    args.learned = str(Path(files[0]).resolve()) if files else None
    args.allocation = names or ["B_streaming_128", "mixed"]
    args.part = args.part or ["attention", "full_model"]
    if args.model is None:
        from headkv.models.loading import OFFLINE_DEFAULT

        args.model = OFFLINE_DEFAULT
    try:
        args.skip_full = {(int(t), b) for t, b in (s.split(":") for s in args.skip_full)}
    except ValueError:
        p.error("--skip-full takes T:BACKEND, e.g. 8192:dense")
    args.method = args.method or ["flex", "dense", "causal"]
    return args


def ratios(rows: list[dict]) -> dict:
    by = {(r["T"], r["allocation"], r["method"]): r for r in rows if "median_s" in r}
    mem_key = "peak_rss_growth_mb" if any("peak_rss_growth_mb" in r for r in rows) else "peak_mem_growth_mb"
    out: dict = {}
    for (t, alloc, method), r in sorted(by.items()):
        if method != "flex":
            continue
        entry = {"flex_s": r["median_s"], "flex_mem_mb": r.get(mem_key)}
        for other in ("dense", "causal"):
            o = by.get((t, alloc if other == "dense" else "-", other))
            if o:
                entry[f"flex_over_{other}"] = r["median_s"] / o["median_s"]
                entry[f"{other}_mem_mb"] = o.get(mem_key)
        out.setdefault(str(t), {})[alloc] = entry
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(full_model_child(spec) if spec.get("kind") == "full_model" else child(spec)))
        return
    shape = {"q_heads": args.q_heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim,
             "batch": args.batch}
    base = dict(shape, dtype=args.dtype, device=args.device, threads=args.threads, reps=args.reps,
                layers=args.layers)
    rows = []
    for t in (args.at if "attention" in args.part else []):
        for method in args.method:
            for alloc in (["-"] if method == "causal" else args.allocation):
                spec = dict(base, T=t, method=method, allocation=alloc if alloc != "-" else "B_streaming_128")
                itemsize = torch.empty((), dtype=getattr(torch, args.dtype)).element_size()
                bias_gb = 2 * args.q_heads * t * t * itemsize
                if method == "dense" and bias_gb / 2**30 > args.max_dense_gb:
                    row = {"skipped": f"bias {bias_gb / 2**30:.1f} GB > --max-dense-gb {args.max_dense_gb}"}
                else:
                    print(f"[long_context] T={t} {method} {alloc} ...", file=sys.stderr, flush=True)
                    row = run_child(spec)
                row = {"T": t, "method": method, "allocation": alloc, **row}
                print(f"[long_context]   {json.dumps(row)}", file=sys.stderr, flush=True)
                rows.append(row)
    result = {
        "bench": "long_context",
        "device": args.device,
        "dtype": args.dtype,
        "threads": args.threads,
        "device_name": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor(),
        "torch": torch.__version__,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "shape": shape,
        "reps": args.reps,
        "layers": args.layers,
        "allocations": {a: dict(zip(("sink", "window"), allocation_rows(a, args.kv_heads), strict=True))
                        for a in args.allocation},
        "attention": rows,
        "ratios": ratios(rows),
        "full_model": full_model_rows(args) if "full_model" in args.part else None,
    }
    emit_json(result, args.out)


if __name__ == "__main__":
    main()
