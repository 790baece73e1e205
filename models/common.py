"""The ground every room of headkv stands on: the cache folder, atomic writes, and one error base class.

``HeadkvError`` is the root of every error a user can cause (bad option, bad file, bad model): the CLI turns
any of them into one ``error: ...`` line and exit code 2. Subclasses name the room that raised them.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable


class HeadkvError(ValueError):
    """Bad input, said in one line (the CLI prints ``error: <message>`` and exits 2)."""


def cache_dir() -> Path:
    """``$HEADKV_CACHE`` if set, else ``~/.cache/headkv``."""
    return Path(os.environ.get("HEADKV_CACHE") or Path.home() / ".cache" / "headkv").expanduser()


def atomic_write(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """``write(tmp)`` into a temp file beside ``path``, then rename it over ``path``: a reader never sees a
    half-written file, and a failed write leaves no file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def emit_json(result: Any, out: str | Path | None = None) -> None:
    """Print ``result`` as JSON and, if ``out`` is given, write it there atomically (the benches' output)."""
    text = json.dumps(result, indent=1)
    print(text)
    if out:
        atomic_write(out, lambda tmp: tmp.write_text(text + "\n"))
