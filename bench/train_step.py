"""Time one gate-training step against a plain forward+backward of the same model on the same blocks.

    python bench/train_step.py                                   # offline default, 1 block x 1024 tokens
    python bench/train_step.py --random-init tiny                # tiny random GPT-NeoX, seconds on CPU
    python bench/train_step.py --random-init pythia-2.8b --dtype bfloat16 --device cuda

* ``train_step``: what ``alloc.train`` does per step: teacher forward (full attention, no grad), student
  forward under the soft gates, KL, backward into the gate logits only, Adam step. ``train_step_ce``: the
  same with the cross-entropy objective (no teacher).
* ``plain_fwd_bwd``: the same model and blocks, stock attention, language-model loss, backward into
  every weight (weights made trainable for this measurement only) -- the cost of an ordinary training step.
* ``teacher_fwd``: the no-grad full-attention forward alone.

Prints one JSON object (median seconds over ``--repeats`` after ``--warmup``) and, with ``--out``, writes
it there too.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from headkv.alloc.gates import WindowGates  # noqa: E402
from headkv.alloc.train import distill_loss  # noqa: E402
from headkv.models.common import emit_json  # noqa: E402
from headkv.models.loading import freeze, model_shape  # noqa: E402

SHAPES = {  # random-init GPT-NeoX shapes (no download)
    "tiny": dict(
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=512,
        rotary_pct=0.25,
    ),
    "pythia-2.8b": dict(
        hidden_size=2560,
        intermediate_size=10240,
        num_hidden_layers=32,
        num_attention_heads=32,
        vocab_size=50304,
        rotary_pct=0.25,
    ),
}


def build(args: argparse.Namespace) -> tuple[torch.nn.Module, torch.Tensor]:
    dtype = getattr(torch, args.dtype)
    if args.random_init:
        from transformers import AutoModelForCausalLM, GPTNeoXConfig

        cfg = GPTNeoXConfig(max_position_embeddings=max(2048, args.seq_len), **SHAPES[args.random_init])
        torch.manual_seed(0)
        with torch.device(args.device):  # initialise in place: a 2.8B model is slow to build on CPU
            lm = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=dtype)
        lm = freeze(lm)
        blocks = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len))
    else:
        from headkv.models.loading import load_model
        from headkv.models.text import token_blocks

        lm, tok = load_model(args.model, args.device, dtype)
        blocks = token_blocks(tok, args.corpus, split="train", seq_len=args.seq_len, n_blocks=args.batch)
    return lm, blocks.to(args.device)


def timed(fn, args: argparse.Namespace) -> float:
    times = []
    for i in range(args.warmup + args.repeats):
        if args.device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if args.device == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure(lm: torch.nn.Module, blocks: torch.Tensor, args: argparse.Namespace) -> dict[str, float]:
    shape = model_shape(lm)
    gates = WindowGates(shape.shape, args.budget, args.seq_len, args.sink).to(args.device)
    opt = torch.optim.Adam(gates.parameters(), lr=0.05)

    def train_step(objective: str = "kl") -> None:
        opt.zero_grad()
        distill_loss(lm, gates, blocks, tau=2.0, objective=objective, backend=args.attention).backward()
        opt.step()

    def teacher_fwd() -> None:
        with torch.no_grad():
            lm(blocks)

    def plain_fwd_bwd() -> None:
        logits = lm(blocks).logits.float()
        F.cross_entropy(logits[:, :-1].flatten(0, 1), blocks[:, 1:].flatten()).backward()
        lm.zero_grad(set_to_none=True)

    out = {
        "train_step_s": timed(train_step, args),
        "train_step_ce_s": timed(lambda: train_step("ce"), args),
        "teacher_fwd_s": timed(teacher_fwd, args),
    }
    for p in lm.parameters():
        p.requires_grad_(True)
    try:
        out["plain_fwd_bwd_s"] = timed(plain_fwd_bwd, args)
    finally:
        freeze(lm)
    out["ratio_step_to_plain"] = out["train_step_s"] / out["plain_fwd_bwd_s"]
    out["ratio_ce_step_to_plain"] = out["train_step_ce_s"] / out["plain_fwd_bwd_s"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument(
        "--random-init", choices=sorted(SHAPES), help="random-init GPT-NeoX of this shape instead"
    )
    ap.add_argument("--corpus", default="austen")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--budget", type=float, default=64)
    ap.add_argument("--sink", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--attention", default="auto", choices=("auto", "flex", "dense"),
                    help="the student's attention kernel, as train's config (auto: flex where it trains)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lm, blocks = build(args)
    result = {
        "bench": "train_step",
        "model": args.random_init or args.model,
        "random_init": bool(args.random_init),
        "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor(),
        "dtype": args.dtype,
        "batch": args.batch,
        "seq_len": args.seq_len,
        "budget": args.budget,
        "attention": args.attention,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        **measure(lm, blocks, args),
    }
    if args.device == "cuda":
        result["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    emit_json(result, args.out)


if __name__ == "__main__":
    main()
