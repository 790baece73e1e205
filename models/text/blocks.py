"""Token blocks and streams of a split (see :mod:`headkv.models.text`): non-overlapping, paragraph-aligned,
evenly spread blocks of ``seq_len`` tokens, and a split's first ``n_tokens`` as one stream."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from headkv.models.text.sources import CorpusError, _canonical_split, describe
from headkv.models.text.tokens import TokenizedSplit, bos_id, tokenized_split

_GOLDEN = 0.6180339887498949



def _candidates(tokens: TokenizedSplit, seq_len: int) -> np.ndarray:
    starts = tokens.para_starts.numpy()
    return starts[starts + seq_len <= tokens.ids.numel()]


def _count_blocks(cands: np.ndarray, seq_len: int) -> int:
    """Most non-overlapping paragraph-aligned blocks: greedy earliest-first is optimal."""
    count, pos = 0, 0
    while True:
        j = int(np.searchsorted(cands, pos, side="left"))
        if j >= len(cands):
            return count
        count, pos = count + 1, int(cands[j]) + seq_len


def available_blocks(
    tokenizer: Any, source: str, split: str = "eval", seq_len: int = 1024, *, encoding: str | None = None
) -> int:
    """How many non-overlapping paragraph-aligned blocks of ``seq_len`` tokens the split holds."""
    if seq_len < 1:
        raise CorpusError(f"seq_len must be >= 1, got {seq_len}")
    tokens = tokenized_split(tokenizer, source, split, encoding=encoding)
    return _count_blocks(_candidates(tokens, seq_len), seq_len)


def _latest_starts(cands: np.ndarray, seq_len: int, n_blocks: int, total: int) -> list[int] | None:
    """Latest feasible start of each block (greedy from the end), or None if n_blocks do not fit."""
    latest = [0] * n_blocks
    limit = total
    for i in reversed(range(n_blocks)):
        j = int(np.searchsorted(cands, limit - seq_len, side="right")) - 1
        if j < 0:
            return None
        latest[i] = limit = int(cands[j])
    return latest


def select_block_starts(
    cands: np.ndarray, total: int, seq_len: int, n_blocks: int, seed: int = 0
) -> list[int]:
    """Evenly spread, non-overlapping starts from ``cands``; raises CorpusError if they do not fit."""
    latest = _latest_starts(cands, seq_len, n_blocks, total)
    if latest is None:
        raise CorpusError(
            f"only {_count_blocks(cands, seq_len)} non-overlapping blocks of {seq_len} tokens "
            f"available ({total} tokens), {n_blocks} requested"
        )
    phase = (0.5 + seed * _GOLDEN) % 1.0
    starts: list[int] = []
    prev_end = 0
    for i in range(n_blocks):
        target = max(prev_end, int((i + phase) * total / n_blocks - seq_len / 2))
        j = int(np.searchsorted(cands, target, side="left"))
        start = min(int(cands[j]) if j < len(cands) else latest[i], latest[i])
        starts.append(start)
        prev_end = start + seq_len
    return starts


def token_blocks(
    tokenizer: Any,
    source: str,
    split: str = "eval",
    seq_len: int = 1024,
    n_blocks: int = 8,
    seed: int = 0,
    *,
    encoding: str | None = None,
) -> torch.Tensor:
    """``(n_blocks, seq_len)`` int64 token ids: non-overlapping, paragraph-aligned, evenly spread. Where the
    tokenizer adds BOS (:func:`bos_id`) every block starts with it and ``seq_len`` counts it.

    ``encoding`` decodes a local ``.txt`` corpus (default: strict UTF-8); the named corpora ignore it."""
    bos = bos_id(tokenizer)
    body = seq_len - (bos is not None)
    if body < 1 or n_blocks < 1:
        raise CorpusError(f"seq_len and n_blocks must be >= 1 (BOS counted), got {seq_len} and {n_blocks}")
    tokens = tokenized_split(tokenizer, source, split, encoding=encoding)
    total = tokens.ids.numel()
    try:
        starts = select_block_starts(_candidates(tokens, body), total, body, n_blocks, seed)
    except CorpusError as exc:
        raise CorpusError(f"{describe(source, encoding=encoding)} {_canonical_split(split)}: {exc}") from None
    blocks = torch.stack([tokens.ids[s : s + body] for s in starts]).long()
    return blocks if bos is None else torch.cat([torch.full((n_blocks, 1), bos, dtype=torch.long), blocks], 1)


def long_stream(
    tokenizer: Any, source: str, split: str = "eval", n_tokens: int = 32768, *, encoding: str | None = None
) -> torch.Tensor:
    """The first ``n_tokens`` of the split's concatenated token stream (documents ``"\\n\\n"``-joined), after
    the BOS token where the tokenizer adds one (:func:`bos_id`; counted in ``n_tokens``).

    ``encoding`` decodes a local ``.txt`` corpus (default: strict UTF-8); the named corpora ignore it."""
    if n_tokens < 1:
        raise CorpusError(f"n_tokens must be >= 1, got {n_tokens}")
    bos = bos_id(tokenizer)
    body = n_tokens - (bos is not None)
    tokens = tokenized_split(tokenizer, source, split, encoding=encoding)
    if tokens.ids.numel() < body:
        raise CorpusError(
            f"{describe(source, encoding=encoding)} {_canonical_split(split)} holds only "
            f"{tokens.ids.numel()} tokens, {n_tokens} requested"
        )
    ids = tokens.ids[:body].clone()
    return ids if bos is None else torch.cat([torch.tensor([bos], dtype=ids.dtype), ids])
