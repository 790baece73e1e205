"""Tokenization and the token cache: a split's token stream with its paragraph and document starts, cached per
(source, encoding, split, tokenizer) under ``$HEADKV_CACHE/tokens`` (see :mod:`headkv.models.text`)."""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from headkv.models import common
from headkv.models.common import atomic_write
from headkv.models.text.clean import PARAGRAPH_SEP as _PARAGRAPH_SEP
from headkv.models.text.sources import (
    NONFICTION_SOURCES,
    CorpusError,
    _canonical_split,
    _codec,
    _is_named,
    _local_files,
    _nonfiction_fingerprint,
    _resolve_path,
    describe,
    load_documents,
)

log = logging.getLogger(__name__)
_CACHE_FORMAT = 1  # bump when cleaning or tokenization changes, to invalidate token caches



@dataclass
class TokenizedSplit:
    """A split's token stream with the offsets where paragraphs and documents begin."""

    ids: torch.Tensor  # (n_tokens,) int64
    para_starts: torch.Tensor  # sorted offsets of each paragraph's first token
    doc_starts: torch.Tensor  # sorted offsets of each document's first token


_MEMO: dict[str, TokenizedSplit] = {}


def bos_id(tokenizer: Any) -> int | None:
    """The BOS token id when the model's tokenizer adds one (encode with special tokens and look: never
    guessed from the family), else None. Blocks, streams and prompts then start with it at position 0."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    return int(bos) if with_special[:1] == [bos] and plain[:1] != [bos] else None


def _encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _separator_ids(tokenizer: Any) -> list[int]:
    """Tokens of ``"\\n\\n"`` as they appear between two paragraphs (not at the end of a text)."""
    left, right, both = _encode(tokenizer, ["Alpha", "Beta", "Alpha" + _PARAGRAPH_SEP + "Beta"])
    if (
        both[: len(left)] == left
        and both[len(both) - len(right) :] == right
        and len(both) > len(left) + len(right)
    ):
        return both[len(left) : len(both) - len(right)]
    return _encode(tokenizer, [_PARAGRAPH_SEP])[0]


def tokenize_documents(tokenizer: Any, documents: list[str]) -> TokenizedSplit:
    """Tokenize paragraph by paragraph and join with the separator tokens (see module docstring)."""
    sep = _separator_ids(tokenizer)
    doc_paras = [[p for p in doc.split(_PARAGRAPH_SEP) if p.strip()] for doc in documents]
    encoded = iter(_encode(tokenizer, [p for paras in doc_paras for p in paras]))
    ids: list[int] = []
    para_starts: list[int] = []
    doc_starts: list[int] = []
    for paras in doc_paras:
        pieces = [piece for piece in (next(encoded) for _ in paras) if piece]
        if not pieces:
            continue
        if ids:
            ids.extend(sep)
        doc_starts.append(len(ids))
        for k, piece in enumerate(pieces):
            if k:
                ids.extend(sep)
            para_starts.append(len(ids))
            ids.extend(piece)
    return TokenizedSplit(*(torch.tensor(xs, dtype=torch.long) for xs in (ids, para_starts, doc_starts)))


def _tokenizer_fingerprint(tokenizer: Any) -> str:
    probe = "Head-aware KV caches: 12,345 tokens.\n\nÉmile's naïve café -- _really_?"
    digest = hashlib.sha1(str(_encode(tokenizer, [probe])[0]).encode()).hexdigest()[:12]
    name = getattr(tokenizer, "name_or_path", "") or ""
    return f"{type(tokenizer).__name__}|{name}|{len(tokenizer)}|{digest}"


def _source_fingerprint(source: str, codec: str = "utf-8") -> str:
    """The corpus identity in the token-cache key: the name (plus a content digest for ``pydoc`` and
    ``debian-reference``), or (local) path, encoding, file sizes/times."""
    if source in NONFICTION_SOURCES:
        return _nonfiction_fingerprint(source)
    if _is_named(source):
        return source
    path = _resolve_path(source)
    stats = []
    for f in _local_files(path):
        st = f.stat()
        stats.append(f"{f.relative_to(path) if path.is_dir() else f.name}:{st.st_size}:{st.st_mtime_ns}")
    return f"{path}|encoding={codec}|{';'.join(stats)}"


def _cache_file(source: str, split: str, key: str) -> Path:
    slug = re.sub(r"[^A-Za-z0-9.-]+", "_", Path(describe(source)).name)[:40] or "corpus"
    digest = hashlib.sha1(key.encode()).hexdigest()[:16]
    return common.cache_dir() / "tokens" / f"{slug}-{split}-{digest}.pt"


def _load_cached(path: Path, key: str) -> TokenizedSplit | None:
    if not path.is_file():
        return None
    try:
        data = torch.load(path, weights_only=True)
        if data.get("key") == key:
            return TokenizedSplit(data["ids"], data["para_starts"], data["doc_starts"])
    except Exception as exc:  # noqa: BLE001 - a corrupt cache is recomputed, never fatal
        log.warning("ignoring unreadable token cache %s: %s", path, exc)
    return None


def _save_cached(path: Path, key: str, split: TokenizedSplit) -> None:
    data = {"key": key, "ids": split.ids, "para_starts": split.para_starts, "doc_starts": split.doc_starts}
    try:
        atomic_write(path, lambda tmp: torch.save(data, tmp))
    except OSError as exc:
        log.warning("could not write token cache %s: %s", path, exc)


def tokenized_split(
    tokenizer: Any, source: str, split: str = "eval", *, encoding: str | None = None
) -> TokenizedSplit:
    """The (cached) token stream of one split; tokenizes the documents only on a cache miss."""
    split = _canonical_split(split)
    codec = _codec(encoding)
    key = "|".join(
        [f"v{_CACHE_FORMAT}", _source_fingerprint(source, codec), split, _tokenizer_fingerprint(tokenizer)]
    )
    if key in _MEMO:
        return _MEMO[key]
    path = _cache_file(source, split, key)
    result = _load_cached(path, key)
    if result is None:
        name = describe(source, encoding=encoding)
        log.info("tokenizing %s split of %s", split, name)
        result = tokenize_documents(tokenizer, load_documents(source, split, encoding=encoding))
        if result.ids.numel() == 0:
            raise CorpusError(f"split {split!r} of corpus {name} holds no tokens")
        _save_cached(path, key, result)
    if len(_MEMO) >= 8:
        _MEMO.clear()
    _MEMO[key] = result
    return result


