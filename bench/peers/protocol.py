"""headkv allocations on the peer protocol (headkv's venv), the same protocol as run_kvpress.py.

A context of N tokens is prefilled with full attention and compressed exactly once, at position N: each
(layer, KV head) keeps a set of context positions, a boolean tensor ``kept`` (layers, KV heads, N). For a
static allocation it is :func:`kept_static`: the keys ``headkv.models.window.keep(arange(N), N, sink,
window, cap)`` says the head holds after N tokens (a dynamic allocation only needs another way of computing
the tensor). The tokens after the context each see the keys their head kept plus every later key up to
themselves (appended, never evicted). Implemented as masked forwards through headkv's attention patch
(``headkv.models.attention.windowed``, dense backend) with a per-head additive bias from
:class:`CompressedOnce`: a context query (position < N) sees its causal prefix -- the prefill, before any
compression -- and a later query the kept context keys and the later keys <= itself.

NLL tokens file: one masked forward over the N + M tokens; the mean NLL of the M tokens the continuation
predicts (positions N+1 .. N+M) is scored. Passkey tokens file (``tokens.py --passkey``): per task, its
context (N of that task) is what gets compressed; the question and each generated token are scored by a
masked forward over context + question + generated-so-far (one forward per generated token), 8 tokens
decoded greedily, correct when the first number in their text is the key (``headkv.alloc.passkey``). The
"full" row there runs the same masked path with every context key kept, and checks its answer against a plain
(unpatched) forward and cached decode of the model ("matches_one_forward").

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
from args import Parser, check_budgets, check_out, context_length, fail, positive, read_any, write_atomic
from transformers import DynamicCache

import headkv
from headkv.alloc.allocation import Allocation
from headkv.alloc.passkey import is_correct
from headkv.models import window as win
from headkv.models.attention import FullCache, windowed
from headkv.models.common import HeadkvError
from headkv.models.dynamic import kept_once
from headkv.models.loading import _resolve, model_shape

NEW_TOKENS = 8  # as headkv.alloc.passkey.score_cell


class CompressedOnce:
    """Mask provider for ``windowed``: the context (``kept.shape[-1]`` = n tokens) compressed once at
    position n to the context positions ``kept`` (layers, KV heads, n) marks per head, then grown by every
    later key.

    ``bias(layer, q_pos, k_pos)`` -> (KV heads, Q, K): 0 where a query may read the key, -inf elsewhere. A
    query at t < n reads what the model's own attention reads (its causal prefix, within the native ``cap``
    (layers, KV heads), None for none); a query at t >= n reads the kept context keys and the keys n .. t.
    Only ``bias`` is used: the dense backend keeps the patch's block-sparse path off."""

    def __init__(self, kept: torch.Tensor, cap: torch.Tensor | None = None) -> None:
        if kept.dim() != 3 or kept.dtype != torch.bool:
            raise ValueError(f"kept must be a (layers, KV heads, n) bool tensor, got {kept.dtype} "
                             f"{tuple(kept.shape)}")
        self.kept, self.cap, self.n = kept, cap, kept.shape[-1]

    def bias(self, layer: int, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        kept = self.kept[layer].to(k_pos.device)  # (H, n)
        h = kept.shape[0]
        cap = None if self.cap is None else self.cap[layer].to(k_pos.device)
        # the prefill: the model's own attention (no sink needed, a window as long as the sequence)
        zeros = torch.zeros(h, dtype=torch.long, device=k_pos.device)
        prefill = win.allowed(q_pos, k_pos, zeros, zeros + int(k_pos.max()) + 1, cap)  # (H, Q, K)
        ctx = (k_pos >= 0) & (k_pos < self.n)
        held = torch.zeros(h, k_pos.numel(), dtype=torch.bool, device=k_pos.device)
        held[:, ctx] = kept[:, k_pos[ctx]]  # (H, K): the context keys kept at n
        grown = (k_pos >= self.n).view(1, 1, -1) & (k_pos.view(1, 1, -1) <= q_pos.view(1, -1, 1))  # (1, Q, K)
        after = held.unsqueeze(1) | grown  # (H, Q, K)
        late = (q_pos >= self.n).view(1, -1, 1).expand(h, -1, -1)
        mask = torch.where(late, after, prefill)
        return torch.zeros(mask.shape, dtype=torch.float32).masked_fill_(~mask, float("-inf"))


def native_cap(model) -> torch.Tensor | None:
    """The layers' native sliding windows as (layers, KV heads) (0: none), None when no layer slides."""
    shape = model_shape(model)
    if not any(shape.native):
        return None
    return torch.tensor(shape.native, dtype=torch.long).view(-1, 1).expand(*shape.shape)


def kept_static(allocation: Allocation | None, model, n: int) -> torch.Tensor:
    """(layers, KV heads, n) bool: the context positions each head of a static allocation holds after n
    tokens, ``win.keep(arange(n), n, sink, window, cap)``. None: full attention (every position, within the
    native caps)."""
    shape = model_shape(model)
    if allocation is None:
        cap = native_cap(model)
        sink = torch.zeros(shape.shape, dtype=torch.long)
        window = torch.full(shape.shape, n, dtype=torch.long)
    else:
        sink, window, cap = allocation.bound(shape.native).effective("cpu")
    cap = None if cap is None else cap.flatten()
    return win.keep(torch.arange(n), n, sink.flatten(), window.flatten(), cap).view(*shape.shape, n)


@torch.no_grad()
def protocol_nll(model, kept: torch.Tensor | None, ids: torch.Tensor, n: int, m: int) -> float:
    """Mean NLL of ids[n+1 : n+m+1] with the context compressed once at n to ``kept`` (None: full
    attention, the plain forward)."""
    x = ids[None, : n + m]
    if kept is None:
        logits = model(input_ids=x, use_cache=False).logits
    else:
        with windowed(model, CompressedOnce(kept, native_cap(model)), FullCache(), backend="dense"):
            logits = model(input_ids=x, use_cache=False).logits
    return F.cross_entropy(logits[0, n : n + m].float(), ids[n + 1 : n + m + 1]).item()


@torch.no_grad()
def masked_greedy(model, kept: torch.Tensor, cache: DynamicCache, question: list[int],
                  new_tokens: int = NEW_TOKENS) -> list[int]:
    """Greedy continuation (``new_tokens`` ids) of context + question, the context compressed once to
    ``kept``: ``cache`` holds the context's full-attention prefill (cropped back to it on return); the
    question is one masked forward over it, then one masked step per generated token."""
    n = cache.get_seq_length()
    out: list[int] = []
    x = torch.tensor([question])
    try:
        with windowed(model, CompressedOnce(kept, native_cap(model)), FullCache(), backend="dense"):
            for _ in range(new_tokens):
                logits = model(input_ids=x, cache=cache, use_cache=True, logits_to_keep=1).logits
                out.append(int(logits[0, -1].argmax()))
                x = torch.tensor([[out[-1]]])
    finally:
        extra = cache.get_seq_length() - n
        if extra:
            cache.crop(-extra)  # transformers 5.24: a negative count removes that many tokens
    return out


@torch.no_grad()
def plain_greedy(model, prompt: list[int], new_tokens: int = NEW_TOKENS) -> list[int]:
    """The unpatched model: the prompt in one forward, then a cached greedy decode (checks "full")."""
    cache = DynamicCache()
    logits = model(input_ids=torch.tensor([prompt]), cache=cache, use_cache=True, logits_to_keep=1).logits
    out = [int(logits[0, -1].argmax())]
    while len(out) < new_tokens:
        logits = model(input_ids=torch.tensor([[out[-1]]]), cache=cache, use_cache=True).logits
        out.append(int(logits[0, -1].argmax()))
    return out


def kept_of(allocation: Allocation | None, model, ids: torch.Tensor) -> torch.Tensor:
    """(layers, KV heads, n) bool kept at n = len(ids): :func:`kept_static`, or for a dynamic (filled)
    allocation its fill rule applied once after a full-attention prefill (``headkv.models.dynamic.kept_once``,
    the same scores and ranking as the streaming rule)."""
    if allocation is None or allocation.fill is None:
        return kept_static(allocation, model, ids.shape[-1])
    shape = model_shape(model)
    sink, window, cap = allocation.bound(shape.native).effective("cpu")
    return kept_once(model, ids.view(1, -1), sink, window, cap, allocation.fill)


def kept_mean(kept: torch.Tensor) -> float:
    """Mean context entries per (layer, KV head) held at n: what B counts."""
    return float(kept.double().sum(-1).mean())


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = Parser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=Path, default=Path("results/peers/tokens.json"),
                    help="an NLL or a passkey tokens file (tokens.py)")
    ap.add_argument("--budget", "-B", type=int, nargs="+", default=[64], help="B_streaming_B for each B")
    ap.add_argument("--allocation", type=Path, nargs="*", default=[], help="allocation JSON files")
    ap.add_argument("--no-full", action="store_true", help="skip the full-attention row")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("results/peers/headkv.jsonl"))
    a = ap.parse_args(argv)
    positive("--threads", a.threads)
    a.spec = read_any(a.tokens)
    check_budgets(a.budget, context_length(a.spec), low=5)  # B_streaming_B: sink 4 + a window of at least one
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
    folder = Path(_resolve(spec["model"])).resolve()
    if str(folder) != spec["model_dir"]:
        fail(f"{spec['model']} resolves to {folder}, not the tokens file's {spec['model_dir']}")
    model, tok = headkv.load_model(spec["model"], dtype=torch.float32)
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
            "torch": torch.__version__}
    rows = (passkey_rows if spec["kind"] == "passkey" else nll_rows)(spec, model, tok, runs, meta)
    write_atomic(a.out, "".join(json.dumps(row) + "\n" for row in rows))
    print(f"wrote {a.out}")


def nll_rows(spec: dict, model, tok, runs: list, meta: dict) -> list[dict]:
    n, m = spec["N"], spec["M"]
    meta = {**meta, "N": n, "M": m}
    rows = []
    for name, allocation in runs:
        for k, ids in enumerate(torch.tensor(spec["ids"], dtype=torch.long)):
            t0 = time.perf_counter()
            kept = kept_of(allocation, model, ids[:n])
            mean = kept_mean(kept)
            nll = protocol_nll(model, None if allocation is None else kept, ids, n, m)
            row = {**meta, "method": name, "B": round(mean), "sample": k, "nll": nll, "kept_mean": mean,
                   "seconds": round(time.perf_counter() - t0, 2)}
            rows.append(row)
            print(f"{name} (B {mean:.2f}) sample {k}: NLL {nll:.6f}, {row['seconds']} s", flush=True)
    return rows


def passkey_rows(spec: dict, model, tok, runs: list, meta: dict) -> list[dict]:
    """Per task: one full-attention prefill of its context (shared by every method: the context's keys do
    not depend on the compression), then each method's kept set and its masked question and decode."""
    meta = {**meta, "task": "passkey", "new_tokens": NEW_TOKENS}
    rows = []
    for t in spec["tasks"]:
        n = len(t["context"])
        cache = DynamicCache()
        with torch.no_grad():
            model(input_ids=torch.tensor([t["context"]]), cache=cache, use_cache=True, logits_to_keep=1)
        for name, allocation in runs:
            t0 = time.perf_counter()
            kept = kept_of(allocation, model, torch.tensor(t["context"]))
            gen = masked_greedy(model, kept, cache, t["question"])
            answer = tok.decode(gen, skip_special_tokens=True)
            mean = kept_mean(kept)
            row = {**meta, "method": name, "B": None if allocation is None else round(mean), "N": n,
                   "length": t["length"], "depth": t["depth"], "trial": t.get("trial"), "key": t["key"],
                   "correct": is_correct(answer, t["key"]), "answer": answer, "kept_mean": mean}
            if allocation is None:  # the masked path with everything kept against the plain model
                row["matches_one_forward"] = plain_greedy(model, t["context"] + t["question"]) == gen
            row["seconds"] = round(time.perf_counter() - t0, 2)
            rows.append(row)
            check = "" if allocation is not None else f", one-forward check {row['matches_one_forward']}"
            print(f"{name} (B {mean:.2f}) length {t['length']} depth {t['depth']} key {t['key']}: {answer!r} "
                  f"{'ok' if row['correct'] else 'wrong'}{check}, {row['seconds']} s", flush=True)
    return rows


if __name__ == "__main__":
    main()
