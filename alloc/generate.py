"""Batched greedy generation through an allocation's real per-head cache (``headkv generate --prompts``).

Prompts are tokenized as the model's tokenizer does (its special tokens included: BOS where it adds one),
left-padded into batches of ``batch_size`` and generated with plain ``model.generate`` on the cache that
:func:`alloc.allocation.applied` builds. Padding never takes a head's sink or window (each sequence has its
own positions), so a prompt gets the same tokens in a batch as alone. Each prompt's row says what it cost:
the KV bytes its sequence holds (the allocation's figure for its length; the batch's measured total is
checked against their sum) and the batch's tokens per second.
"""

from __future__ import annotations

import json
import time
from typing import Any, Callable

import torch
from transformers import PreTrainedModel

from headkv.alloc.allocation import Allocation, applied, kv_bytes
from headkv.models import window as win
from headkv.models.common import atomic_write, parse_json, read_text
from headkv.models.kv_cache import DeployError, kv_bytes_of
from headkv.models.loading import model_shape
from headkv.models.static_cache import GraphDecoder


def encode(tokenizer: Any, prompts: list[str], positions: int | None, new_tokens: int) -> list[list[int]]:
    """Token ids of every prompt; an empty prompt, or one that with ``new_tokens`` runs past the model's
    ``positions`` (None: no limit, StreamingLLM re-indexing), is one DeployError line."""
    if positions is not None and new_tokens >= positions:
        raise DeployError(f"{new_tokens} new tokens exceed the model's {positions} positions")
    limit = positions - new_tokens if positions is not None else 10**12
    out = []
    for i, text in enumerate(prompts):
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        if not text or not ids:
            raise DeployError(f"prompt {i + 1} is empty")
        if len(ids) > limit:
            raise DeployError(f"prompt {i + 1} has {len(ids)} tokens, beyond the {limit} that the model's "
                              "positions leave for new ones (shorten it, or --reindex with an allocation)")
        out.append(ids)
    return out


def left_pad(batch: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention_mask), both (B, longest), padded on the left."""
    width = max(map(len, batch))
    ids = torch.tensor([[pad_id] * (width - len(x)) + x for x in batch])
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in batch])
    return ids, mask


@torch.no_grad()
def generate_rows(
    model: PreTrainedModel,
    tokenizer: Any,
    allocation: Allocation | None,
    prompts: list[list[int]],
    max_new_tokens: int,
    batch_size: int = 1,
    reindex: bool = False,
    on_batch: Callable[[int], None] | None = None,
    prefill_chunk: int = 512,
    static: bool = False,
) -> list[dict[str, Any]]:
    """Greedy continuations of the token-id ``prompts``, ``batch_size`` at a time; one row per prompt.

    All but the last prompt token are prefilled ``prefill_chunk`` at a time (a long prompt never needs a
    quadratic mask), then ``generate`` continues from the filled cache. ``static``: the fixed-capacity cache
    instead (:mod:`models.static_cache`: one prefill, then decode steps replayed as a CUDA graph on a GPU;
    the prompts of a batch must have one length); its KV bytes held are the tensors it allocated."""
    if static:
        check_static(prompts, batch_size)
    shape = model_shape(model)
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = model.generation_config.eos_token_id or 0
        pad = pad[0] if isinstance(pad, list) else pad
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    rows = []
    for lo in range(0, len(prompts), batch_size):
        batch = prompts[lo : lo + batch_size]
        ids, mask = left_pad(batch, pad)
        start = time.perf_counter()
        ids, mask = ids.to(model.device), mask.to(model.device)
        pos = win.positions(mask.bool()).clamp(min=0)  # generate's position ids (padding at 0)
        if static:
            out, cache = _static_greedy(model, allocation, ids, max_new_tokens)
        else:
            with applied(model, allocation, evict=True, reindex=reindex) as cache:
                for a in range(0, ids.shape[1] - 1, prefill_chunk):
                    b = min(a + prefill_chunk, ids.shape[1] - 1)
                    model(ids[:, a:b], attention_mask=mask[:, :b], position_ids=pos[:, a:b], cache=cache,
                          use_cache=True)
                out = model.generate(ids, attention_mask=mask, cache=cache, max_new_tokens=max_new_tokens,
                                     do_sample=False, pad_token_id=pad)
        wall = time.perf_counter() - start
        new = out[:, ids.shape[1] :].tolist()
        lengths = [next((i + 1 for i, t in enumerate(seq) if t in eos), len(seq)) for seq in new]
        predicted = []
        for x, seq in zip(batch, new, strict=True):  # the last new token is never written to the cache
            predicted.append(kv_bytes(allocation, shape, len(x) + len(seq) - 1, model.dtype))
        held = kv_bytes_of(cache)
        for x, seq, n, kv in zip(batch, new, lengths, predicted, strict=True):
            text = tokenizer.decode(seq[:n], skip_special_tokens=True)
            seen = len(x) + len(seq) - 1
            rows.append({"prompt_tokens": len(x), "tokens": n, "text": text, "cache_tokens": seen,
                         "kv_bytes": kv, "kv_bytes_full": kv_bytes(None, shape, seen, model.dtype),
                         "batch_kv_bytes_held": held, "batch_kv_bytes_predicted": sum(predicted),
                         "tokens_per_s": sum(lengths) / wall, "batch": lo // batch_size,
                         "batch_size": len(batch)})
        if on_batch:
            on_batch(len(batch))
    return rows


def check_static(prompts: list[list[int]], batch_size: int) -> None:
    """The static cache serves unpadded batches: refuse, before any compute, a batch of unequal prompts."""
    for lo in range(0, len(prompts), batch_size):
        if len({len(x) for x in prompts[lo : lo + batch_size]}) > 1:
            raise DeployError("--static needs the prompts of a batch to have one length (use --batch-size 1)")


def _static_greedy(
    model: PreTrainedModel, allocation: Allocation | None, ids: torch.Tensor, max_new_tokens: int
) -> tuple[torch.Tensor, Any]:
    """Greedy tokens through the static cache: (prompt + new ids, the cache after them)."""
    max_len = ids.shape[1] + max_new_tokens
    with applied(model, allocation, evict=True, static=max_len, backend="auto") as cache:
        nxt = model(ids, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1].argmax(-1, keepdim=True)
        new, step = [nxt], GraphDecoder(model, cache).step
        while len(new) < max_new_tokens:  # the last new token is never written to the cache
            new.append(step(new[-1]).argmax(-1, keepdim=True))
    return torch.cat([ids, *new], 1), cache


def read_prompts(path: str) -> list[str]:
    """The prompts of a JSON-lines file (one object with a "prompt" string per line), or one error line."""
    text = read_text(path, "prompts file", DeployError)
    prompts = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = parse_json(line, f"prompts file {path}, line {n}", DeployError)
        except DeployError:
            raise DeployError(f"prompts file {path}, line {n}: not JSON (one object per line)") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise DeployError(f"prompts file {path}, line {n}: needs an object with a \"prompt\" string")
        prompts.append(row["prompt"])
    if not prompts:
        raise DeployError(f"prompts file {path} holds no prompts")
    return prompts


def save_rows(out: str, prompts: list[str], rows: list[dict[str, Any]], label: str, source: dict) -> str:
    """Write one JSON row per prompt (atomically: all or nothing) and return the summary line."""
    lines = [json.dumps({"kind": "generate", "prompt": p, "allocation": label, **source, **r})
             for p, r in zip(prompts, rows, strict=True)]
    atomic_write(out, lambda tmp: tmp.write_text("\n".join(lines) + "\n"))
    held = sum({r["batch"]: r["batch_kv_bytes_held"] for r in rows}.values())
    size, predicted = max(r["batch_size"] for r in rows), sum(r["kv_bytes"] for r in rows)
    return (f"[{label}] {len(rows)} prompt(s), batches of up to {size}: KV held {held} bytes "
            f"(allocation predicts {predicted}); wrote {out}")


def summary(row: dict[str, Any], label: str) -> str:
    """One prompt's KV line: bytes held after its tokens, the allocation's figure, full attention's."""
    held, full = row["batch_kv_bytes_held"], row["kv_bytes_full"]
    return (f"[{label}] KV held after {row['cache_tokens']} tokens: {held} bytes ({held / 2**20:.2f} MiB; "
            f"allocation predicts {row['kv_bytes']}) vs full attention {full} bytes: "
            f"{100 * held / full:.1f}%")
