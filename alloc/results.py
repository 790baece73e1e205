"""Results files: one JSON object per line, appended whole, read back tolerantly, keyed by what was measured.

Every resumable output (sweep, streaming, passkey) keys a row by :func:`measurement_key`: the allocation's
content digest plus everything that changes the number -- the model (name, revision, dtype, device), the
exact tokens scored (a digest of the token ids, which covers the corpus content, split, token count, block
length, tokenizer and BOS) and the kind's own settings. Labels are for display only: two files that share a
policy name never skip or show each other's rows.

A row is written with a single ``write`` of one complete line followed by ``fsync``, so a killed run
leaves at most the row in flight unwritten -- never half a line. A trailing partial line (from a crash
during the write itself) is ignored by ``read_rows`` and overwritten by the next append.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path
from typing import Any, Iterator

from headkv.models.common import HeadkvError


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


def _valid_prefix_len(path: Path) -> int:
    """Length in bytes of the file up to its last complete line."""
    data = path.read_bytes()
    return data.rfind(b"\n") + 1


def append_row(path: str | Path, row: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(row, sort_keys=True) + "\n").encode()
    if path.exists():
        keep = _valid_prefix_len(path)
        if keep != path.stat().st_size:  # drop a torn last line before appending
            os.truncate(path, keep)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


class ResultsError(HeadkvError):
    """A results file that is not headkv's JSON lines."""


def read_rows(path: str | Path) -> Iterator[dict[str, Any]]:
    """The complete rows of a results file (a torn last line is skipped); a damaged file is one error line."""
    path = Path(path)
    if not path.exists():
        return
    if not path.is_file():
        raise ResultsError(f"results file {path} is not a file")
    with path.open("rb") as f:
        for n, raw in enumerate(f, 1):
            if not raw.endswith(b"\n"):
                break  # torn last line
            try:
                row = json.loads(raw) if raw.strip() else None
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise ResultsError(f"results file {path}, line {n}: not a JSON row") from None
            if row is not None and not isinstance(row, dict):
                raise ResultsError(f"results file {path}, line {n}: a row must be a JSON object")
            if row is not None:
                yield row


def read_search(path: str | Path) -> dict[str, Any] | None:
    """The state a `headkv search` wrote (its search.json), or None when the file is not one -- told apart by
    content: one JSON object of ``"kind": "search"``. A search file that lacks its parts is one error line."""
    try:
        state = json.loads(Path(path).read_bytes())
    except (OSError, ValueError):  # not JSON as a whole (JSON lines, binary, empty): not a search file
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
