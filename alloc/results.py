"""Results files: one JSON object per line, appended whole, read back tolerantly, keyed by what was measured.

Every resumable output (evaluate, sweep, streaming, passkey) keys a row by :func:`measurement_key`: the
allocation's content digest plus everything that changes the number -- the model (name, revision, dtype,
device), the exact tokens scored (a digest of the token ids, which covers the corpus content, split, token
count, block length, tokenizer and BOS) and the kind's own settings. Labels are for display only: two files
that share a policy name never skip or show each other's rows.

A row is appended under an exclusive lock on the file (``flock``) with a single ``write`` of one complete
line followed by ``fsync``: concurrent writers never lose or interleave rows, and a killed run leaves at
most the row in flight unwritten. A last line without its newline is read as a row when it is one (a file
edited by hand) and dropped when it is a torn row (a crash during the write itself); the next append
repairs either. A file whose lines are not rows is refused (:func:`check_results`), never truncated.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import platform
from pathlib import Path
from typing import Any, Iterator

from headkv.models.common import HeadkvError, parse_json

RESULT_KINDS = ("evaluate", "streaming", "sweep", "passkey")  # the rows a results file may hold


def versions() -> dict[str, str]:
    import lightning
    import numpy
    import torch
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "lightning": lightning.__version__,
        "numpy": numpy.__version__,
    }


def tokens_digest(tokens: Any) -> str:
    """Digest of token ids (a tensor or a list of tensors): the exact text a number was measured on."""
    h = hashlib.sha256()
    for t in tokens if isinstance(tokens, (list, tuple)) else [tokens]:
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().long().numpy().tobytes())
    return h.hexdigest()[:16]


def model_identity(model: Any) -> dict[str, Any]:
    """What of a loaded model changes a measurement: its name or path, revision, dtype and device."""
    cfg = model.config
    return {
        "model_path": str(getattr(cfg, "_name_or_path", "")),
        "revision": getattr(cfg, "_commit_hash", None),
        "dtype": str(model.dtype).removeprefix("torch."),
        "device": str(model.device),
    }


def measurement_key(allocation: Any, conditions: dict[str, Any]) -> str:
    """The resume key of one row: the allocation's content (None = full attention) + the conditions."""
    body = {"allocation": allocation.digest() if allocation is not None else "full", **conditions}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_hash(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


class ResultsError(HeadkvError):
    """A results file that is not headkv's JSON lines."""


def _row(raw: bytes, where: str) -> dict[str, Any] | None:
    """One line as a row (None for a blank line), or one ResultsError line."""
    if not raw.strip():
        return None
    try:
        row = parse_json(raw, where, ResultsError)
    except ResultsError:
        raise ResultsError(f"{where}: not a JSON row") from None
    if not isinstance(row, dict):
        raise ResultsError(f"{where}: a row must be a JSON object")
    return row


def _tail(fd: int, size: int) -> int:
    """Offset of the last line of the open file (just past its last newline; 0 if it has none)."""
    end = size
    while end > 0:
        start = max(0, end - 65536)
        cut = os.pread(fd, end - start, start).rfind(b"\n")
        if cut >= 0:
            return start + cut + 1
        end = start
    return 0


def _unterminated(raw: bytes, where: str) -> dict[str, Any] | None:
    """A last line without its newline: the row it is, None for a torn row, or one ResultsError line."""
    try:
        return _row(raw, where)
    except ResultsError:
        if raw.lstrip().startswith(b"{"):  # rows are JSON objects: the start of one, cut by a crash
            return None
        raise


def append_row(path: str | Path, row: dict[str, Any]) -> None:
    """Append ``row`` as one line, under an exclusive lock: a torn last row is dropped and an unterminated
    whole row ended first; a last line that is not a row is refused, the file left as it is."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(row, sort_keys=True) + "\n").encode()
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # released by close
        size = os.fstat(fd).st_size
        start = _tail(fd, size)
        if start != size:
            if _unterminated(os.pread(fd, size - start, start), f"results file {path}, last line") is None:
                os.ftruncate(fd, start)
            else:
                line = b"\n" + line
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_rows(path: str | Path) -> Iterator[dict[str, Any]]:
    """The complete rows of a results file (a torn last row is skipped); a damaged file is one error line."""
    path = Path(path)
    if not path.exists():
        return
    if not path.is_file():
        raise ResultsError(f"results file {path} is not a file")
    with path.open("rb") as f:
        for n, raw in enumerate(f, 1):
            where = f"results file {path}, line {n}"
            row = _row(raw, where) if raw.endswith(b"\n") else _unterminated(raw, where)
            if row is not None:
                yield row


def check_results(path: str | Path, kinds: tuple[str, ...] = RESULT_KINDS) -> None:
    """Refuse, in one line, a file that is not results rows of ``kinds`` (an output about to be appended to
    or replaced must hold nothing else)."""
    for n, row in enumerate(read_rows(path), 1):
        if row.get("kind") not in kinds:
            raise ResultsError(f"results file {path}: row {n} is not a {'/'.join(kinds)} row")


def done_keys(path: str | Path, kind: str) -> set[Any]:
    """The measurement keys of the ``kind`` rows already in a results file: what a rerun skips."""
    return {r.get("key") for r in read_rows(path) if r.get("kind") == kind}


def read_search(path: str | Path) -> dict[str, Any] | None:
    """The state a `headkv search` wrote (its search.json), or None when the file is not one -- told apart by
    content: one JSON object of ``"kind": "search"``. A search file that lacks its parts is one error line."""
    try:
        state = json.loads(Path(path).read_bytes())
    except (OSError, ValueError, RecursionError):  # not JSON as a whole (JSON lines, binary, empty, too deep)
        return None
    if not isinstance(state, dict) or state.get("kind") != "search":
        return None
    rows = state.get("curve")
    ok = {
        "settings": isinstance(state.get("settings"), dict),
        "full": isinstance(state.get("full"), dict) and isinstance(state["full"].get("ppl"), (int, float)),
        "target_ppl": isinstance(state.get("target_ppl"), (int, float)),
        "curve": isinstance(rows, list) and all(isinstance(r, dict) and {"budget", "ppl", "passes"} <= set(r)
                                                for r in rows),
    }
    lacking = [k for k, good in ok.items() if not good]
    if lacking:
        raise ResultsError(f"{path}: a search file with a missing or malformed {', '.join(lacking)}")
    return state
