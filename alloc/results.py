"""Results files: one JSON object per line, appended whole, read back tolerantly.

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


def read_rows(path: str | Path) -> Iterator[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        return
    with path.open() as f:
        for line in f:
            if not line.endswith("\n"):
                break  # torn last line
            line = line.strip()
            if line:
                yield json.loads(line)
