"""kvpress's presses on the peer protocol (runs in bench/peers/.venv, made by setup.sh; imports no headkv).

The protocol (shared with protocol.py): a context of N tokens is prefilled under ``with press(model):`` --
kvpress hooks each attention layer's forward and, after the prefill's attention has run with every key,
compresses that layer's DynamicCache to an average of B entries per KV head (compression ratio
r = 1 - B/N) -- then the next M tokens are fed one at a time with ``past_key_values=cache`` at positions
N, N+1, ... (no further compression: kvpress compresses the prefill only), and the mean NLL of the M tokens
they predict is scored. Token-by-token feeding is how kvpress's own pipeline decodes; it also keeps the
continuation exact for every press (a multi-token forward over a compressed cache would get a causal mask
laid out by cache index, which is wrong once the cache is shorter than the positions, and PyramidKV's
per-layer lengths differ).

On a passkey tokens file (``tokens.py --passkey``) the same, per task: its context (N tokens, N of that task)
is prefilled under the press at r = 1 - B/N, then its question tokens are fed one at a time at positions
N, N+1, ... (query-agnostic compression: the press never sees the question), then 8 tokens are
decoded greedily one at a time (exactly 8, as ``headkv.alloc.passkey.greedy`` decodes); the trial is
correct when the first number in their text is the key (``headkv.alloc.passkey.is_correct``'s rule).

    bench/peers/.venv/bin/python bench/peers/run_kvpress.py --tokens results/peers/tokens.json \\
        --budget 64 --out results/peers/kvpress.jsonl

One JSON row per (press, B, sample): {"source": "kvpress", "method", "B", "sample", "nll", "kept_mean", ...};
passkey: one per (press, B, task): {"task": "passkey", "method", "B", "length", "depth", "trial", "key",
"correct", "answer", "kept_mean", ...} ("full" once per task, "B" null). A press that cannot run here writes
one row per B with "skipped": the reason.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import re
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing from the hub: the model is a local folder

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
from args import Parser, check_budgets, check_out, context_length, positive, read_any, write_atomic  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache  # noqa: E402

# name -> a press at compression ratio r (defaults as kvpress ships them unless the name says otherwise)
PRESS_NAMES = (
    "full", "StreamingLLMPress", "SnapKVPress", "TOVAPress", "KnormPress", "ExpectedAttentionPress",
    "PyramidKVPress", "PyramidKVPress(window_size=3)", "AdaKVPress(SnapKVPress)",
    "SnapKVPress(window_size=16)", "AdaKVPress(SnapKVPress(window_size=16))",
)


def presses() -> dict:
    """The press constructors by name (kvpress is imported here, after the arguments are checked)."""
    from kvpress import (
        AdaKVPress,
        ExpectedAttentionPress,
        KnormPress,
        PyramidKVPress,
        SnapKVPress,
        StreamingLLMPress,
        TOVAPress,
    )

    return {
        "full": None,  # no press: the uncompressed reference (kept = N)
        "StreamingLLMPress": lambda r: StreamingLLMPress(compression_ratio=r, n_sink=4),
        "SnapKVPress": lambda r: SnapKVPress(compression_ratio=r),
        "TOVAPress": lambda r: TOVAPress(compression_ratio=r),
        "KnormPress": lambda r: KnormPress(compression_ratio=r),
        "ExpectedAttentionPress": lambda r: ExpectedAttentionPress(compression_ratio=r),
        "PyramidKVPress": lambda r: PyramidKVPress(compression_ratio=r),
        # kvpress's PyramidKV falls back to SnapKV unless B / beta >= window_size (see README): a window of 3
        # query tokens lets the pyramid engage at B = 64 with the default beta = 20
        "PyramidKVPress(window_size=3)": lambda r: PyramidKVPress(compression_ratio=r, window_size=3),
        "AdaKVPress(SnapKVPress)": lambda r: AdaKVPress(SnapKVPress(compression_ratio=r)),
        # SnapKV pads its observation window's scores to the top, so with the default window_size = 64 >= B it
        # keeps just the last B tokens (no sink); a 16-token window leaves B - 16 entries to its scores
        "SnapKVPress(window_size=16)": lambda r: SnapKVPress(compression_ratio=r, window_size=16),
        "AdaKVPress(SnapKVPress(window_size=16))":
            lambda r: AdaKVPress(SnapKVPress(compression_ratio=r, window_size=16)),
    }


SKIPPED = {
    "DuoAttentionPress": "needs the hub: its head patterns are downloaded from the DuoAttention GitHub repo "
    "(and only for six 7-8B checkpoints, not SmolLM2); on_the_fly_scoring loads kmfoda/booksum from the "
    "Hugging Face hub and the tokenizer by config.name_or_path",
}
DEFAULT = list(PRESS_NAMES)


def ratio(n: int, b: int) -> float:
    """r = 1 - B/N, checked against kvpress's own rounding (int(N * (1 - r)) kept per head)."""
    from kvpress.utils import compute_n_kept

    r = 1 - b / n
    if compute_n_kept(n, r) != b:  # float truncation: nudge half a token up, which int() floors back to B
        r = 1 - (b + 0.5) / n
    assert compute_n_kept(n, r) == b, (n, b, r)
    return r


def kept_per_head(model, cache: DynamicCache, n: int) -> float:
    """Mean KV entries per (layer, KV head) the compressed cache holds for the context: the cache length,
    less the keys a head-wise press (AdaKV) masks out in place (``module.masked_key_indices``)."""
    total, heads = 0, 0
    for i, layer in enumerate(model.model.layers):
        k = cache.layers[i].keys  # (1, Hkv, L, D)
        h, length = k.shape[1], k.shape[2]
        masked = getattr(layer.self_attn, "masked_key_indices", None)
        total += h * length - (0 if masked is None else len(masked[0]))
        heads += h
    return total / heads


def prefill(model, press, context: torch.Tensor) -> tuple[DynamicCache, float, torch.Tensor]:
    """The context (1, n) prefilled under ``press`` (None: none): (cache, mean kept entries per head, logits
    of the last position)."""
    cache = DynamicCache()
    ctx = press(model) if press is not None else contextlib.nullcontext()
    with ctx:
        out = model(input_ids=context, past_key_values=cache, use_cache=True)
    return cache, kept_per_head(model, cache, context.shape[1]), out.logits[:, -1]


def step(model, cache: DynamicCache, token: int, p: int) -> torch.Tensor:
    """One token at position ``p`` after the (compressed) cache: the next-token logits (1, V)."""
    out = model(input_ids=torch.tensor([[token]]), past_key_values=cache, use_cache=True,
                position_ids=torch.tensor([[p]]), cache_position=torch.tensor([p]))
    return out.logits[:, -1]


@torch.no_grad()
def run_one(model, press, ids: torch.Tensor, n: int, m: int) -> tuple[float, float]:
    """(mean NLL of ids[n+1 : n+m+1], mean kept entries per head) under the protocol."""
    cache, kept, _ = prefill(model, press, ids[:, :n])
    nll = []
    for i in range(m):
        p = n + i
        logits = step(model, cache, int(ids[0, p]), p)
        nll.append(F.cross_entropy(logits.float(), ids[:, p + 1]).item())
    return sum(nll) / len(nll), kept


NEW_TOKENS = 8  # as headkv.alloc.passkey.score_cell


def is_correct(text: str, key: str) -> bool:
    """headkv.alloc.passkey.is_correct's rule (copied: no headkv here): the first number is the key."""
    found = re.search(r"\d+", text)
    return found is not None and found.group() == key


@torch.no_grad()
def run_passkey(model, press, context: list[int], question: list[int],
                new_tokens: int = NEW_TOKENS) -> tuple[list[int], float]:
    """(greedy continuation of ``new_tokens`` ids, mean kept context entries per head): the context
    prefilled and compressed under ``press``, then the question and each generated token one at a time."""
    n = len(context)
    cache, kept, _ = prefill(model, press, torch.tensor([context]))
    for i, t in enumerate(question):
        logits = step(model, cache, t, n + i)
    out: list[int] = []
    for i in range(new_tokens):
        out.append(int(logits[0].argmax()))
        if i + 1 < new_tokens:
            logits = step(model, cache, out[-1], n + len(question) + i)
    return out, kept


@torch.no_grad()
def reference_greedy(model, prompt: list[int], new_tokens: int = NEW_TOKENS) -> list[int]:
    """Full attention the plain way (the whole prompt in one forward, then a cached decode): checks the
    token-by-token path's "full" answers."""
    cache = DynamicCache()
    logits = model(input_ids=torch.tensor([prompt]), past_key_values=cache, use_cache=True).logits[:, -1]
    out: list[int] = []
    for _ in range(new_tokens):
        out.append(int(logits[0].argmax()))
        if len(out) < new_tokens:
            x = torch.tensor([[out[-1]]])
            logits = model(input_ids=x, past_key_values=cache, use_cache=True).logits[:, -1]
    return out


@torch.no_grad()
def dense_nll(model, ids: torch.Tensor, n: int, m: int) -> float:
    """The uncompressed reference in one forward over n + m tokens (checks the token-by-token path)."""
    logits = model(input_ids=ids[:, : n + m], use_cache=False).logits[0, n : n + m].float()
    return F.cross_entropy(logits, ids[0, n + 1 : n + m + 1]).item()


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = Parser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=Path, default=Path("results/peers/tokens.json"))
    ap.add_argument("--budget", "-B", type=int, nargs="+", default=[64], help="average KV entries per head")
    ap.add_argument("--press", nargs="+", default=DEFAULT + list(SKIPPED), choices=DEFAULT + list(SKIPPED),
                    metavar="PRESS", help=f"of {DEFAULT + list(SKIPPED)}")
    ap.add_argument("--attn", default="sdpa", choices=("sdpa", "eager"),
                    help="attention implementation (AdaKV refuses eager)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("results/peers/kvpress.jsonl"))
    a = ap.parse_args(argv)
    positive("--threads", a.threads)
    a.spec = read_any(a.tokens)
    check_budgets(a.budget, context_length(a.spec), low=5)  # StreamingLLMPress keeps its 4 sinks inside B
    check_out(a.out, a.tokens)
    return a


def main(argv: list[str] | None = None) -> None:
    a = parse(argv)
    press_of = presses()
    torch.set_num_threads(a.threads)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    spec = a.spec
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32,
                                                 attn_implementation=a.attn).eval()
    meta = {"source": "kvpress", "kvpress": importlib.metadata.version("kvpress"),
            "transformers": transformers.__version__, "torch": torch.__version__, "attn": a.attn}
    lines = (passkey_rows if spec["kind"] == "passkey" else nll_rows)(a, model, press_of, meta)
    write_atomic(a.out, "".join(json.dumps(row) + "\n" for row in lines))
    print(f"wrote {a.out}")


def nll_rows(a: argparse.Namespace, model, press_of: dict, meta: dict) -> list[dict]:
    spec = a.spec
    n, m = spec["N"], spec["M"]
    samples = torch.tensor(spec["ids"], dtype=torch.long)
    meta = {**meta, "N": n, "M": m}
    lines = []
    for k, ids in enumerate(samples):
        ref = dense_nll(model, ids[None], n, m)
        print(f"sample {k}: full attention, one forward: NLL {ref:.6f}", flush=True)
    for name in a.press:
        for b in a.budget:
            if name in SKIPPED:
                lines.append({**meta, "method": name, "B": b, "skipped": SKIPPED[name]})
                print(f"{name}: skipped: {SKIPPED[name]}", flush=True)
                continue
            r = ratio(n, b)
            for k, ids in enumerate(samples):
                t0 = time.perf_counter()
                press = press_of[name](r) if press_of[name] else None
                nll, kept = run_one(model, press, ids[None], n, m)
                row = {**meta, "method": name, "B": b if press else n, "budget": b, "ratio": r, "sample": k,
                       "nll": nll, "kept_mean": kept, "seconds": round(time.perf_counter() - t0, 2)}
                lines.append(row)
                print(f"{name} B={b} sample {k}: NLL {nll:.6f}, kept/head {kept:.2f}, "
                      f"{row['seconds']} s", flush=True)
            if press is None:
                break  # "full" does not depend on B
    return lines


def passkey_rows(a: argparse.Namespace, model, press_of: dict, meta: dict) -> list[dict]:
    tok = AutoTokenizer.from_pretrained(a.spec["model_dir"])
    meta = {**meta, "task": "passkey", "new_tokens": NEW_TOKENS}
    lines = []
    for name in a.press:
        full = name not in SKIPPED and press_of[name] is None
        for b in [None] if full else a.budget:  # "full" does not depend on B: once per task
            if name in SKIPPED:
                lines.append({**meta, "method": name, "B": b, "skipped": SKIPPED[name]})
                print(f"{name}: skipped: {SKIPPED[name]}", flush=True)
                continue
            for t in a.spec["tasks"]:
                n = len(t["context"])
                r = None if b is None else ratio(n, b)
                t0 = time.perf_counter()
                gen, kept = run_passkey(model, None if r is None else press_of[name](r), t["context"],
                                        t["question"])
                answer = tok.decode(gen, skip_special_tokens=True)
                row = {**meta, "method": name, "B": b, "budget": b, "ratio": r, "N": n, "length": t["length"],
                       "depth": t["depth"], "trial": t.get("trial"), "key": t["key"],
                       "correct": is_correct(answer, t["key"]), "answer": answer, "kept_mean": kept}
                if b is None:  # full attention: the token-by-token path against the plain one
                    row["matches_one_forward"] = reference_greedy(model, t["context"] + t["question"]) == gen
                row["seconds"] = round(time.perf_counter() - t0, 2)
                lines.append(row)
                check = "" if b is not None else f", one-forward check {row['matches_one_forward']}"
                print(f"{name} B={b} length {t['length']} depth {t['depth']} key {t['key']}: {answer!r} "
                      f"{'ok' if row['correct'] else 'wrong'}, kept/head {kept:.2f}{check}, "
                      f"{row['seconds']} s", flush=True)
    return lines


if __name__ == "__main__":
    main()
