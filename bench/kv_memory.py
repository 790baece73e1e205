"""KV bytes really held after a T-token stream, against each allocation's own prediction.

    python bench/kv_memory.py                                     # offline default, T = 4096, CPU
    python bench/kv_memory.py --allocation runs/learned_b128/allocation.json
    python bench/kv_memory.py --random-init pythia-2.8b --dtype bfloat16 --device cuda --tokens 32768

Rows: full attention (transformers' DynamicCache), the policies given (default ``B_streaming_128``), every
``--allocation`` file and, unless ``--no-varied``, a fixed per-head allocation at Eff.Ctx 128 built here
(:func:`far_heads_allocation`: the ``n_long`` KV heads that attend furthest on a 512-token calibration block
from the train split keep a long window, every other head shares the rest of the budget; random-init models,
which have no meaningful attention, get windows 32/64/128/272 in turn instead, ``spread_128``).

For each: ``held`` = bytes of the K/V tensors the cache holds after the stream (measured on the tensors),
``predicted`` = ``Allocation.kv_bytes(T)`` (or 2 x layers x KV heads x T x head_dim x bytes for full),
``padded`` = what a per-layer padded layout would hold, ``index`` = the per-slot position bookkeeping, and
on CUDA ``cuda_delta`` = growth of ``torch.cuda.memory_allocated`` across the stream. Writes one JSON
object (``--out``) and prints it.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path
from typing import NoReturn

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from headkv.alloc.allocation import Allocation, applied, kv_bytes  # noqa: E402
from headkv.alloc.policies import PolicyContext, build  # noqa: E402
from headkv.models.common import emit_json  # noqa: E402
from headkv.models.kv_cache import PerHeadCache, kv_bytes_of  # noqa: E402
from headkv.models.loading import freeze, model_shape  # noqa: E402

SINK = 4


def load(args: argparse.Namespace) -> tuple[torch.nn.Module, torch.Tensor, object]:
    """(model, a token stream of args.tokens ids, tokenizer or None)."""
    dtype = getattr(torch, args.dtype) if args.dtype else None
    if args.random_init:
        from train_step import SHAPES
        from transformers import AutoModelForCausalLM, GPTNeoXConfig

        cfg = GPTNeoXConfig(max_position_embeddings=max(2048, args.tokens + 64), **SHAPES[args.random_init])
        torch.manual_seed(0)
        with torch.device(args.device):
            lm = freeze(AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=dtype))
        lm.headkv_id = f"random-init:{args.random_init}"
        return lm, torch.randint(0, cfg.vocab_size, (args.tokens,)), None
    from headkv.models.loading import load_model
    from headkv.models.text import long_stream

    lm, tok = load_model(args.model, args.device, dtype)
    return lm, long_stream(tok, args.corpus, "eval", args.tokens), tok


@torch.no_grad()
def far_heads_allocation(
    model: torch.nn.Module,
    tokenizer: object,
    budget: int = 128,
    n_long: int = 4,
    long_window: int = 2044,
    corpus: str = "austen",
) -> Allocation:
    """Eff.Ctx ``budget``: the ``n_long`` KV heads with the most attention beyond distance ``budget`` (sink
    excluded) on one 512-token train block get ``long_window``; the others share the remaining windows."""
    from headkv.models.attention import attention_maps
    from headkv.models.text import token_blocks

    shape = model_shape(model)
    block = token_blocks(tokenizer, corpus, split="train", seq_len=512, n_blocks=1)[0].to(model.device)
    maps = attention_maps(model, block.unsqueeze(0))  # layers x (1, Hq, T, T)
    t = torch.arange(block.numel(), device=model.device)
    far = ((t.view(-1, 1) - t.view(1, -1)) > budget) & (t.view(1, -1) >= SINK)  # (T, T)
    score = torch.stack([(m[0].float() * far).sum(-1).mean(-1) for m in maps])  # (layers, Hq)
    score = score.view(shape.n_layers, shape.n_kv_heads, shape.q_per_kv).mean(-1).flatten()
    return _spread(shape, budget, score.argsort(descending=True)[:n_long].tolist(), long_window, "far-heads")


@torch.no_grad()
def retrieval_heads_allocation(
    model: torch.nn.Module,
    tokenizer: object,
    budget: int = 128,
    n_long: int = 4,
    long_window: int = 2044,
    corpus: str = "austen",
) -> Allocation:
    """Eff.Ctx ``budget``: the ``n_long`` KV heads that look hardest at the needle of passkey tasks built from
    the *train* split (:func:`alloc.passkey.retrieval_scores`) get ``long_window``; the others share the
    rest."""
    from headkv.alloc.passkey import build_tasks, retrieval_scores
    from headkv.models.text import long_stream

    stream = long_stream(tokenizer, corpus, "train", 20000)
    tasks = [
        t
        for cell in build_tasks(tokenizer, stream, [768], [0.2, 0.5, 0.8], 2, seed=123).values()
        for t in cell
    ]
    score = retrieval_scores(model, tasks).flatten()
    return _spread(
        model_shape(model),
        budget,
        score.argsort(descending=True)[:n_long].tolist(),
        long_window,
        "retrieval-heads",
    )


def _spread(shape, budget: int, long_heads: list[int], long_window: int, rule: str) -> Allocation:
    """Sink 4 everywhere; ``long_heads`` (flat indices) get ``long_window``; mean window = budget - 4."""
    n = shape.n_layers * shape.n_kv_heads
    rest = n * (budget - SINK) - len(long_heads) * long_window
    others = n - len(long_heads)
    if rest < others:
        fail(f"{len(long_heads)} long heads of window {long_window} leave less than one token of window to "
             f"the other {others} heads at Eff.Ctx {budget}: lower --long-heads or --long-window, or raise "
             f"--varied-budget")
    window = torch.full((n,), rest // others, dtype=torch.long)
    short = [i for i in range(n) if i not in long_heads]
    window[short[: rest % others]] += 1  # repair the budget exactly
    window[long_heads] = long_window
    return Allocation.from_tensors(
        torch.full((shape.n_layers, shape.n_kv_heads), SINK),
        window.view(shape.shape),
        model_id=shape.model_id,
        q_per_kv=shape.q_per_kv,
        meta={
            "policy": f"{rule}{len(long_heads)}_{budget}",
            "budget": budget,
            "long_heads": long_heads,
            "long_window": long_window,
        },
    )


def allocations(args: argparse.Namespace, model: torch.nn.Module, tok: object) -> list[tuple[str, object]]:
    """(label, allocation or None) rows: full, policies, files, and the varied per-head one."""
    shape = model_shape(model)
    ctx = PolicyContext(shape.shape, shape.q_per_kv, shape.model_id)
    rows: list[tuple[str, object]] = [("full", None)]
    rows += [(p, build(p, ctx)) for p in args.policy]
    for f in args.allocation:
        a = Allocation.load(f)
        a.check_model(shape.model_id, shape.shape, shape.q_per_kv)
        rows.append((a.name, a))
    if args.varied:
        n = shape.n_layers * shape.n_kv_heads
        if tok is None:  # random weights: no attention worth measuring; windows 32/64/128/272 in turn
            window = torch.tensor([(32, 64, 128, 272)[i % 4] for i in range(n)])
            window[0] += n * (128 - SINK) - int(window.sum())  # mean window exactly 124
            a = Allocation.from_tensors(
                torch.full(shape.shape, SINK),
                window.view(shape.shape),
                model_id=shape.model_id,
                q_per_kv=shape.q_per_kv,
                meta={"policy": "spread_128", "budget": 128},
            )
        else:
            rule = retrieval_heads_allocation if args.varied_rule == "retrieval" else far_heads_allocation
            a = rule(model, tok, args.varied_budget, args.long_heads, args.long_window)
        rows.append((a.name, a))
    return rows


@torch.no_grad()
def stream(model: torch.nn.Module, allocation: Allocation | None, tokens: torch.Tensor, chunk: int = 512):
    """Feed ``tokens`` through the allocation's real cache (chunked: the same result as token by token)."""
    with applied(model, allocation, evict=True) as cache:
        prefill(model, cache, tokens, chunk)
    return cache


def prefill(model: torch.nn.Module, cache, tokens: torch.Tensor, chunk: int = 512, batch: int = 1) -> None:
    """Write ``batch`` copies of ``tokens`` into ``cache`` (inside ``applied``), ``chunk`` per forward."""
    ids = tokens.to(model.device).view(1, -1).expand(batch, -1)
    for lo in range(0, ids.shape[1], chunk):
        model(ids[:, lo : lo + chunk], cache=cache, use_cache=True)


def measure(model: torch.nn.Module, label: str, allocation: Allocation | None, tokens: torch.Tensor) -> dict:
    shape = model_shape(model)
    t = tokens.numel()
    cuda = tokens.device.type == "cuda" or next(model.parameters()).is_cuda
    before = torch.cuda.memory_allocated() if cuda else 0
    cache = stream(model, allocation, tokens)
    full = kv_bytes(None, shape, t, model.dtype)
    row = {
        "allocation": label,
        "eff_ctx": allocation.eff_ctx() if allocation is not None else float(t),
        "held": kv_bytes_of(cache),
        "predicted": kv_bytes(allocation, shape, t, model.dtype),
        "full": full,
    }
    if isinstance(cache, PerHeadCache):
        row.update(padded=cache.padded_bytes(), index=cache.index_bytes(), transient=cache.transient_bytes())
    if cuda:
        torch.cuda.synchronize()
        row["cuda_delta"] = torch.cuda.memory_allocated() - before
    row["agree"] = row["held"] == row["predicted"]
    row["held_vs_full"] = row["held"] / full
    del cache
    return row


def parse(argv: list[str] | None = None, tokens: int = 4096) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--random-init", choices=["tiny", "pythia-2.8b"], default=None)
    p.add_argument("--corpus", default="austen")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="float32 (CPU default), bfloat16, float16")
    p.add_argument("--tokens", type=int, default=tokens, help="stream length T")
    p.add_argument("--policy", action="append", default=None, help="default: B_streaming_128")
    p.add_argument("--allocation", action="append", default=[], help="allocation JSON (repeatable)")
    p.add_argument(
        "--no-varied", dest="varied", action="store_false", help="skip the built per-head allocation"
    )
    p.add_argument(
        "--varied-rule",
        choices=["far", "retrieval"],
        default="far",
        help="far: heads attending furthest on text; retrieval: heads looking at passkey needles",
    )
    p.add_argument("--varied-budget", type=int, default=128, help="Eff.Ctx of the built allocation")
    p.add_argument("--long-heads", type=int, default=4, help="KV heads the rule gives --long-window")
    p.add_argument(
        "--long-window", type=int, default=2044, help="their window (T - 4 for the whole stream)"
    )
    p.add_argument("--save-varied", default=None, help="write the built per-head allocation JSON here")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    args.policy = args.policy or ["B_streaming_128"]
    if args.varied_budget <= SINK or args.long_heads < 0 or args.long_window < 1:
        fail(
            f"--varied-budget must exceed the sink ({SINK}), --long-heads be >= 0 and --long-window >= 1; "
            f"got {args.varied_budget}, {args.long_heads} and {args.long_window}"
        )
    return args


def fail(message: str) -> NoReturn:
    """Bad input: one ``error:`` line on stderr, exit 2 (before anything is written)."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


class Parser(argparse.ArgumentParser):
    """argparse whose own errors (a bad value, a missing argument) are one ``error:`` line too."""

    def error(self, message: str) -> NoReturn:
        fail(message)


def header(model: torch.nn.Module, args: argparse.Namespace, bench: str) -> dict:
    return {
        "bench": bench,
        "model": args.random_init or args.model,
        "random_init": bool(args.random_init),
        "device": args.device,
        "dtype": str(model.dtype).removeprefix("torch."),
        "device_name": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor(),
        "torch": torch.__version__,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    model, tokens, tok = load(args)
    rows = allocations(args, model, tok)
    if args.save_varied and args.varied:
        rows[-1][1].save(args.save_varied)
    result = header(model, args, "kv_memory")
    result.update(tokens=args.tokens, rows=[measure(model, label, a, tokens) for label, a in rows])
    emit_json(result, args.out)


if __name__ == "__main__":
    main()
