"""Peak memory and time of ONE gate-training step per sequence length, each in a fresh process.

    python bench/train_memory.py                                  # offline default, 1024 2048 4096 tokens
    python bench/train_memory.py --seq-len 1024 --checkpoint on   # force layer checkpointing on (or off)
    python bench/train_memory.py --random-init tiny --seq-len 256 # tiny random GPT-NeoX, seconds

One step is what ``alloc.train`` does per step (``distill_loss`` + backward into the gate logits + Adam),
batch 1, in the model dtype of ``configs/train.yaml`` (bfloat16) unless ``--dtype``. Each length runs in a
child process (``--child``), so ``ru_maxrss`` (peak resident set of that process) is the step's alone:
model load + one block + ``--warmup`` untimed steps + one timed step. ``base_rss_gib`` is the peak before
the first step (model and block loaded). A watchdog in the parent kills a child whose resident set passes
``--max-rss-gib`` (recorded as ``exceeded``), so a path that would exhaust the machine is measured safely.

``--checkpoint auto|on|off`` is passed to ``distill_loss`` (``auto`` passes nothing: its default; an older
``distill_loss`` without the option runs as it is). Writes one JSON (``--out``, atomically) and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from headkv.models.common import emit_json  # noqa: E402

GIB = 2**30


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # ru_maxrss is KiB on Linux


def child(args: argparse.Namespace) -> dict:
    """One length, in this (fresh) process."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from train_step import build  # the same models and blocks as bench/train_step.py

    from headkv.alloc.gates import WindowGates
    from headkv.alloc.train import distill_loss
    from headkv.models.loading import model_shape

    args.device, args.batch = "cpu", 1
    lm, blocks = build(args)
    shape = model_shape(lm)
    gates = WindowGates(shape.shape, args.budget, args.seq_len, args.sink)
    opt = torch.optim.Adam(gates.parameters(), lr=0.05)
    kw = {} if args.checkpoint == "auto" else {"checkpoint": args.checkpoint == "on"}
    base = peak_rss_gib()
    times = []
    for _ in range(args.warmup + 1):
        t = time.perf_counter()
        opt.zero_grad()
        loss = distill_loss(lm, gates, blocks, tau=2.0, objective=args.objective, **kw)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t)
    return {
        "seq_len": args.seq_len,
        "peak_rss_gib": round(peak_rss_gib(), 3),
        "base_rss_gib": round(base, 3),
        "step_s": round(times[-1], 3),
        "loss": float(loss),
    }


def run_child(argv: list[str], seq_len: int, max_rss_gib: float) -> dict:
    """Run one length in a fresh process, killing it if its resident set passes ``max_rss_gib``."""
    cmd = [sys.executable, __file__, *argv, "--child", "--seq-len", str(seq_len)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen, exceeded = 0.0, False
    while proc.poll() is None:
        try:
            rss_kib = next(int(line.split()[1]) for line in open(f"/proc/{proc.pid}/status")
                           if line.startswith("VmRSS:"))
            seen = max(seen, rss_kib / 2**20)
        except (OSError, StopIteration, ValueError):
            pass
        if seen > max_rss_gib:
            proc.kill()
            exceeded = True
            break
        time.sleep(0.05)
    out, err = proc.communicate()
    if exceeded:
        return {"seq_len": seq_len, "exceeded": True, "peak_rss_gib": f">{max_rss_gib:g}"}
    if proc.returncode != 0:
        tail = (err.strip().splitlines() or ["?"])[-1]
        return {"seq_len": seq_len, "error": f"exit {proc.returncode}: {tail}"}
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--random-init", help="random-init GPT-NeoX of this bench/train_step.py shape instead")
    ap.add_argument("--corpus", default="austen")
    ap.add_argument("--seq-len", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--budget", type=float, default=64)
    ap.add_argument("--sink", type=int, default=4)
    ap.add_argument("--dtype", default="bfloat16", help="the frozen model's dtype (configs/train.yaml)")
    ap.add_argument("--objective", default="kl", choices=["kl", "ce"])
    ap.add_argument("--checkpoint", default="auto", choices=["auto", "on", "off"])
    ap.add_argument("--warmup", type=int, default=0, help="untimed steps before the timed one")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-rss-gib", type=float, default=16.0)
    ap.add_argument("--label", default="", help="a free-form tag stored in the JSON (e.g. before/after)")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        args.seq_len = args.seq_len[0]
        print(json.dumps(child(args)))
        return
    argv = [a for a in sys.argv[1:]]
    if "--seq-len" in argv:  # the parent's lengths are replaced by one per child
        i = argv.index("--seq-len")
        j = i + 1
        while j < len(argv) and not argv[j].startswith("--"):
            j += 1
        del argv[i:j]
    argv = [a for a in argv if not a.startswith("--seq-len=")]
    rows = [run_child(argv, n, args.max_rss_gib) for n in args.seq_len]
    result = {
        "bench": "train_memory",
        "label": args.label,
        "model": args.random_init or args.model,
        "dtype": args.dtype,
        "objective": args.objective,
        "checkpoint": args.checkpoint,
        "batch": 1,
        "warmup": args.warmup,
        "threads": args.threads,
        "device_name": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "rows": rows,
    }
    emit_json(result, args.out)


if __name__ == "__main__":
    main()
