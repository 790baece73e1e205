"""The peer scripts' shared bad-input rules (standard library only: both venvs import it).

Every script parses with :class:`Parser` and checks its inputs with the functions here before any model is
loaded or any file written; bad input ends in one ``error:`` line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, NoReturn


def fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # argparse's own errors: one line, not usage + error
        fail(message)


def positive(name: str, value: int) -> None:
    if value < 1:
        fail(f"{name} must be >= 1, got {value}")


def read_tokens(path: Path) -> dict[str, Any]:
    """The tokens file tokens.py writes: N, M, model_dir, and samples of N + M + 1 token ids."""
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        fail(f"cannot read tokens file {path}: {e.strerror or e}")
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, ValueError):
        fail(f"tokens file {path} is not JSON (write it with bench/peers/tokens.py)")
    if not isinstance(spec, dict) or not all(k in spec for k in ("N", "M", "ids", "model_dir", "model")):
        fail(f"tokens file {path} lacks N, M, ids, model or model_dir (write it with bench/peers/tokens.py)")
    n, m, ids = spec["N"], spec["M"], spec["ids"]
    if not (isinstance(n, int) and isinstance(m, int) and n >= 1 and m >= 1):
        fail(f"tokens file {path}: N and M must be integers >= 1")
    if not (isinstance(ids, list) and ids and all(
            isinstance(s, list) and len(s) == n + m + 1 and all(isinstance(t, int) and t >= 0 for t in s)
            for s in ids)):
        fail(f"tokens file {path}: ids must be samples of N + M + 1 = {n + m + 1} token ids")
    return spec


def check_budgets(budgets: list[int], n: int, low: int = 1) -> None:
    """Average kept entries per head: between ``low`` and the context N."""
    bad = [b for b in budgets if not low <= b <= n]
    if bad:
        fail(f"--budget must lie in [{low}, N = {n}], got {bad}")


def check_out(out: Path, *inputs: Path) -> None:
    """An output that is no folder, device or input (refused before any work)."""
    if out.exists() and not out.is_file():
        fail(f"--out {out} exists and is not a regular file")
    for p in inputs:
        if out.exists() and p.exists() and os.path.samefile(out, p):
            fail(f"--out {out} is also an input")


def write_atomic(path: Path, text: str) -> None:
    """All or nothing: a temporary file beside ``path``, then renamed over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
