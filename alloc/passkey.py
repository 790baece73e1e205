"""Passkey retrieval: can generation through an evicting cache still find a number stated once, long ago?

A task is ``length`` tokens: corpus text (eval split) with one needle sentence stating a random 5-digit pass
key inserted at ``depth`` (0 = start, 1 = just before the question), then a question asking for it. The
prompt goes through the real cache of the allocation (prefill in chunks, then a hand-written greedy decode
loop), and a trial is correct when the first number in the continuation is exactly the key. Trials of one
(length, depth) cell have equal lengths, so they run as one batch without padding. Everything is drawn from
one seeded generator, so a rerun builds the same tasks.

The accuracy heatmaps are drawn by :func:`alloc.plots.passkey_heatmaps`.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from transformers import PreTrainedModel

from headkv.alloc.allocation import Allocation, applied
from headkv.alloc.results import (
    append_row,
    measurement_key,
    model_identity,
    read_rows,
    tokens_digest,
    versions,
)
from headkv.models import window as win
from headkv.models.text import bos_id

log = logging.getLogger(__name__)

NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "\n\nWhat is the pass key? The pass key is"


@dataclass(frozen=True)
class PasskeyTask:
    ids: torch.Tensor  # (length,) prompt token ids
    key: str  # the 5-digit answer
    depth: float
    length: int
    needle: tuple[int, int] = (0, 0)  # [start, end) of the needle sentence in ids


def _encode(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def build_task(
    tokenizer: Any, stream: torch.Tensor, length: int, depth: float, rng: np.random.Generator,
    answer: bool = False,
) -> PasskeyTask:
    """One task of exactly ``length`` tokens cut from the corpus ``stream`` (1-D token ids); it starts with
    BOS where the tokenizer adds one (``length`` counts it). ``answer``: the question is followed by its
    answer (" 12345."), as in a training block (:func:`training_blocks`)."""
    bos = bos_id(tokenizer)
    head = [] if bos is None else [bos]
    if bos is not None:
        stream = stream[stream != bos]
    key = str(int(rng.integers(10000, 100000)))
    needle = _encode(tokenizer, NEEDLE.format(key=key))
    question = _encode(tokenizer, QUESTION) + (_encode(tokenizer, f" {key}.") if answer else [])
    n_fill = length - len(needle) - len(question) - len(head)
    if n_fill < 1 or not 0.0 <= depth <= 1.0:
        raise ValueError(
            f"a passkey task of {length} tokens cannot hold the needle and question at depth {depth}"
        )
    if stream.numel() <= n_fill:
        raise ValueError(f"the corpus stream ({stream.numel()} tokens) is shorter than the filler ({n_fill})")
    start = int(rng.integers(0, stream.numel() - n_fill))
    filler = stream[start : start + n_fill].tolist()
    cut = round(depth * n_fill)
    ids = head + filler[:cut] + needle + filler[cut:] + question
    span = (len(head) + cut, len(head) + cut + len(needle))
    return PasskeyTask(torch.tensor(ids, dtype=torch.long), key, depth, length, span)


def build_tasks(
    tokenizer: Any,
    stream: torch.Tensor,
    lengths: Iterable[int],
    depths: Iterable[float],
    trials: int,
    seed: int = 0,
) -> dict[tuple[int, float], list[PasskeyTask]]:
    """``trials`` tasks per (length, depth) cell, all from one generator seeded with ``seed``."""
    rng = np.random.default_rng(seed)
    return {
        (n, d): [build_task(tokenizer, stream, n, d, rng) for _ in range(trials)]
        for n in lengths
        for d in depths
    }


def training_blocks(
    tokenizer: Any, stream: torch.Tensor, seq_len: int, n: int, seed: int = 0
) -> torch.Tensor:
    """``n`` synthetic retrieval blocks (n, seq_len) for training (``headkv train --passkey-mix``): a needle
    at a uniformly drawn depth in ``stream`` filler, then the question and its answer, so a student that
    cannot see the needle is penalised on the answer's tokens. Its generator is seeded apart from
    :func:`build_tasks`' (``(seed, 1)``, not ``seed``), and training passes its TRAIN split as the filler
    while evaluation reads the eval split: no evaluated task is trained on."""
    rng = np.random.default_rng((seed, 1))
    blocks = [build_task(tokenizer, stream, seq_len, float(rng.uniform()), rng, answer=True).ids
              for _ in range(n)]
    return torch.stack(blocks) if blocks else torch.empty(0, seq_len, dtype=torch.long)


@torch.no_grad()
def greedy(
    model: PreTrainedModel,
    allocation: Allocation | None,
    ids: torch.Tensor,
    new_tokens: int,
    prefill_chunk: int = 256,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Greedy continuation (B, new_tokens) of prompts ``ids`` (B, T) through the allocation's real cache;
    ``attention_mask`` (B, T) marks left padding (each sequence then has its own positions)."""
    ids = ids.to(model.device)
    mask = None if attention_mask is None else attention_mask.to(model.device)
    pos = None if mask is None else win.positions(mask.bool()).clamp(min=0)  # generate's position ids
    kw: dict[str, torch.Tensor] = {}
    out = []
    with applied(model, allocation, evict=True) as cache:
        for lo in range(0, ids.shape[1], prefill_chunk):
            if mask is not None:  # the mask covers every token seen so far
                hi = lo + prefill_chunk
                kw = {"attention_mask": mask[:, :hi], "position_ids": pos[:, lo:hi]}
            # only the last position's logits are needed (a 262k vocabulary makes the others gigabytes)
            logits = model(ids[:, lo : lo + prefill_chunk], cache=cache, use_cache=True, logits_to_keep=1,
                           **kw).logits
        for _ in range(new_tokens):
            nxt = logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
            out.append(nxt)
            if mask is not None:
                mask, pos = torch.cat([mask, torch.ones_like(mask[:, :1])], 1), pos[:, -1:] + 1
                kw = {"attention_mask": mask, "position_ids": pos}
            logits = model(nxt, cache=cache, use_cache=True, **kw).logits
    return torch.cat(out, 1)


def is_correct(text: str, key: str) -> bool:
    """Exact match: the first number in the continuation is the key."""
    found = re.search(r"\d+", text)
    return found is not None and found.group() == key


def score_cell(
    model: PreTrainedModel,
    tokenizer: Any,
    allocation: Allocation | None,
    tasks: list[PasskeyTask],
    batch: int = 8,
    new_tokens: int = 8,
) -> tuple[int, list[str]]:
    """Correct answers among ``tasks`` (all of one length) and the decoded continuations."""
    texts: list[str] = []
    for i in range(0, len(tasks), batch):
        group = tasks[i : i + batch]
        gen = greedy(model, allocation, torch.stack([t.ids for t in group]), new_tokens)
        texts.extend(tokenizer.decode(row, skip_special_tokens=True) for row in gen.tolist())
    return sum(is_correct(t, task.key) for t, task in zip(texts, tasks, strict=True)), texts


def run_passkey(
    model: PreTrainedModel,
    tokenizer: Any,
    allocation: Allocation | None,
    tasks: dict[tuple[int, float], list[PasskeyTask]],
    *,
    batch: int = 8,
    skip: set[tuple[int, float]] = frozenset(),
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """One result per (length, depth) cell not in ``skip``: correct, trials, accuracy and two sample answers.

    ``on_row`` gets each cell's result as soon as it is scored (the CLI appends it, so a rerun resumes).
    """
    rows = []
    for (length, depth), cell in sorted(tasks.items()):
        if (length, depth) in skip:
            continue
        correct, texts = score_cell(model, tokenizer, allocation, cell, batch)
        row = {
            "length": length,
            "depth": depth,
            "correct": correct,
            "trials": len(cell),
            "accuracy": correct / len(cell),
            "samples": [[t.key, x] for t, x in zip(cell[:2], texts[:2], strict=True)],
        }
        rows.append(row)
        if on_row:
            on_row(row)
    return rows


@torch.no_grad()
def retrieval_scores(model: PreTrainedModel, tasks: Iterable[PasskeyTask]) -> torch.Tensor:
    """Per (layer, KV head): attention mass the prompt's last query puts on the needle, under full attention,
    averaged over tasks and the query heads of each KV head -- DuoAttention's idea of finding retrieval
    heads on synthetic passkey data. Returns (layers, KV heads)."""
    from headkv.models.attention import attention_maps
    from headkv.models.loading import model_shape

    shape = model_shape(model)
    total, n = torch.zeros(shape.n_layers, shape.n_kv_heads), 0
    for task in tasks:
        maps = attention_maps(model, task.ids.view(1, -1).to(model.device))
        lo, hi = task.needle
        mass = torch.stack([m[0, :, -1, lo:hi].float().sum(-1).cpu() for m in maps])  # (layers, Hq)
        total += mass.view(shape.n_layers, shape.n_kv_heads, shape.q_per_kv).mean(-1)
        n += 1
    return total / max(n, 1)


def run_passkey_file(
    model: PreTrainedModel,
    tokenizer: Any,
    entries: list[Any],
    tasks: dict[tuple[int, float], list[PasskeyTask]],
    out: str | Path,
    settings: dict[str, Any],
    *,
    batch: int = 8,
    progress: Callable[[str, int, int], None] | None = None,
) -> list[dict[str, Any]]:
    """Every entry over every (length, depth) cell, one results row per cell, resumable: a cell is skipped
    when a row with its measurement key (the allocation's content, the model, the exact task tokens) is in
    ``out``. Returns this run's rows (old and new), labelled as this run labels them."""
    base = {"kind": "passkey", **model_identity(model)}
    cell_keys = {cell: tokens_digest([t.ids for t in group]) for cell, group in tasks.items()}
    latest = {r.get("key"): r for r in read_rows(out) if r.get("kind") == "passkey"}
    rows = []
    for e in entries:
        keys = {cell: measurement_key(e.allocation, {**base, "tasks": d}) for cell, d in cell_keys.items()}
        todo = {cell for cell, k in keys.items() if k not in latest}
        done = [0]

        def save(row: dict[str, Any], e=e, keys=keys, todo=todo, done=done) -> None:
            key = keys[(row["length"], row["depth"])]
            eff = e.allocation.eff_ctx() if e.allocation is not None else None
            full = {**settings, **base, "key": key, "allocation": e.label, "eff_ctx": eff, **e.source, **row,
                    "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "versions": versions()}
            append_row(out, full)
            latest[key] = full
            done[0] += 1
            if progress:
                progress(e.label, done[0], len(todo))

        run_passkey(model, tokenizer, e.allocation, tasks, batch=batch, skip=set(tasks) - todo, on_row=save)
        rows.extend({**latest[k], "allocation": e.label} for k in keys.values() if k in latest)
    return rows


def passkey_table(rows: list[dict[str, Any]], labels: list[str], lengths: list[int]) -> list[str]:
    """Exact-match accuracy per allocation and prompt length (and over all), as printed lines."""
    lines = [f"{'allocation':28s} " + " ".join(f"{n:>7d}" for n in lengths) + f" {'all':>7s}"]
    for label in labels:
        mine = [r for r in rows if r["allocation"] == label]
        cols = []
        for n in [*lengths, None]:
            sel = [r for r in mine if n is None or r["length"] == n]
            ok, tot = sum(r["correct"] for r in sel), sum(r["trials"] for r in sel)
            cols.append(f"{100 * ok / tot:6.1f}%" if tot else f"{'-':>7s}")
        lines.append(f"{label:28s} " + " ".join(cols))
    return lines
