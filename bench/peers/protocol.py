"""headkv allocations on the peer protocol (headkv's venv), the same protocol as run_kvpress.py.

A context of N tokens is prefilled with full attention and compressed exactly once, at position N: a head
keeps the context keys ``headkv.models.window.keep(arange(N), N, sink, window)`` says it holds after N
tokens. The next M tokens are fed after it; each sees the keys its head kept at N plus every continuation
key up to itself (appended, never evicted), and the mean NLL of the M tokens they predict (positions
N+1 .. N+M) is scored. Implemented as one masked forward over the N + M tokens through headkv's attention
patch (``headkv.models.attention.windowed``, dense backend) with a per-head additive bias from
:class:`CompressedOnce`: a context query (position < N) sees its causal prefix -- the prefill, before any
compression -- and a continuation query the kept-at-N keys and the continuation keys <= itself.

    /work/main/.venv/bin/python bench/peers/protocol.py --tokens results/peers/tokens.json \\
        --budget 64 [--allocation FILE ...] --out results/peers/headkv.jsonl

Rows as run_kvpress.py's, with "source": "headkv": "B_streaming_B" for each B (sink 4 + window B - 4, as
kvpress's StreamingLLMPress with n_sink=4 keeps at compression ratio 1 - B/N), "full", and one row per
``--allocation`` file (its "B" is the mean kept context entries per head at N, its own budget).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from args import Parser, check_budgets, check_out, fail, positive, read_tokens, write_atomic

import headkv
from headkv.alloc.allocation import Allocation
from headkv.models import window as win
from headkv.models.attention import FullCache, windowed
from headkv.models.common import HeadkvError
from headkv.models.loading import _resolve, model_shape


class CompressedOnce:
    """Mask provider for ``windowed``: the cache compressed once at position ``n`` under (sink, window, cap)
    ((layers, KV heads) long tensors), then grown by every continuation key.

    ``bias(layer, q_pos, k_pos)`` -> (KV heads, Q, K): 0 where a query may read the key, -inf elsewhere. A
    query at t < n reads what the model's own attention reads (its causal prefix, within a native cap); a
    query at t >= n reads the context keys ``win.keep`` holds after n tokens and the keys n .. t. The
    attributes the patch may read (sink, window, cap) are set; the patch's block-sparse path is kept off by
    the dense backend, so only ``bias`` is used."""

    def __init__(self, sink: torch.Tensor, window: torch.Tensor, cap: torch.Tensor | None, n: int) -> None:
        self.sink, self.window, self.cap, self.n = sink, window, cap, n

    def bias(self, layer: int, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        sink, window = self.sink[layer], self.window[layer]
        cap = None if self.cap is None else self.cap[layer]
        h = sink.shape[0]
        # the prefill: the model's own attention (no sink needed, a window as long as the sequence)
        everything = torch.full_like(window, int(k_pos.max()) + 1)
        prefill = win.allowed(q_pos, k_pos, torch.zeros_like(sink), everything, cap)  # (H, Q, K)
        kept = win.keep(k_pos, self.n, sink, window, cap) & (k_pos < self.n)  # (H, K): held at n
        grown = (k_pos >= self.n).view(1, 1, -1) & (k_pos.view(1, 1, -1) <= q_pos.view(1, -1, 1))  # (1, Q, K)
        after = kept.unsqueeze(1) | grown  # (H, Q, K)
        late = (q_pos >= self.n).view(1, -1, 1).expand(h, -1, -1)
        mask = torch.where(late, after, prefill)
        return torch.zeros(mask.shape, dtype=torch.float32).masked_fill_(~mask, float("-inf"))


@torch.no_grad()
def protocol_nll(model, allocation: Allocation | None, ids: torch.Tensor, n: int, m: int) -> float:
    """Mean NLL of ids[n+1 : n+m+1] with the context compressed once at n (None: full attention)."""
    x = ids[None, : n + m]
    if allocation is None:
        logits = model(input_ids=x, use_cache=False).logits
    else:
        shape = model_shape(model)
        sink, window, cap = allocation.bound(shape.native).effective(model.device)
        with windowed(model, CompressedOnce(sink, window, cap, n), FullCache(), backend="dense"):
            logits = model(input_ids=x, use_cache=False).logits
    return F.cross_entropy(logits[0, n : n + m].float(), ids[n + 1 : n + m + 1]).item()


def kept_mean(model, allocation: Allocation | None, n: int) -> float:
    """Mean context entries per (layer, KV head) held at n: what B counts."""
    if allocation is None:
        return float(n)
    sink, window, cap = allocation.bound(model_shape(model).native).effective("cpu")
    return float(win.kept_tokens(n, sink, window, cap).double().mean())


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = Parser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=Path, default=Path("results/peers/tokens.json"))
    ap.add_argument("--budget", "-B", type=int, nargs="+", default=[64], help="B_streaming_B for each B")
    ap.add_argument("--allocation", type=Path, nargs="*", default=[], help="allocation JSON files")
    ap.add_argument("--no-full", action="store_true", help="skip the full-attention row")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("results/peers/headkv.jsonl"))
    a = ap.parse_args(argv)
    positive("--threads", a.threads)
    a.spec = read_tokens(a.tokens)
    check_budgets(a.budget, a.spec["N"], low=5)  # B_streaming_B: sink 4 + a window of at least one
    check_out(a.out, a.tokens, *a.allocation)
    try:
        a.allocations = [Allocation.load(p) for p in a.allocation]
    except HeadkvError as e:
        fail(str(e))
    return a


def main(argv: list[str] | None = None) -> None:
    a = parse(argv)
    torch.set_num_threads(a.threads)
    spec = a.spec
    n, m = spec["N"], spec["M"]
    folder = Path(_resolve(spec["model"])).resolve()
    if str(folder) != spec["model_dir"]:
        fail(f"{spec['model']} resolves to {folder}, not the tokens file's {spec['model_dir']}")
    model, _ = headkv.load_model(spec["model"], dtype=torch.float32)
    runs: list[tuple[str, Allocation | None]] = [] if a.no_full else [("full", None)]
    runs += [(f"B_streaming_{b}", headkv.policy(f"B_streaming_{b}", model)) for b in a.budget]
    shape = model_shape(model)
    for p, allocation in zip(a.allocation, a.allocations, strict=True):
        try:
            allocation.check_model(shape.model_id, shape.shape, shape.q_per_kv)
        except HeadkvError as e:
            fail(str(e))
        runs.append((allocation.meta.get("policy") or p.stem, allocation))
    meta = {"source": "headkv", "transformers": __import__("transformers").__version__,
            "torch": torch.__version__, "N": n, "M": m}
    lines = []
    for name, allocation in runs:
        kept = kept_mean(model, allocation, n)
        for k, ids in enumerate(torch.tensor(spec["ids"], dtype=torch.long)):
            t0 = time.perf_counter()
            nll = protocol_nll(model, allocation, ids, n, m)
            row = {**meta, "method": name, "B": round(kept), "sample": k, "nll": nll, "kept_mean": kept,
                   "seconds": round(time.perf_counter() - t0, 2)}
            lines.append(json.dumps(row) + "\n")
            print(f"{name} (B {kept:.2f}) sample {k}: NLL {nll:.6f}, {row['seconds']} s", flush=True)
    write_atomic(a.out, "".join(lines))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
