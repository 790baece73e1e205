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


def _load_tokens(path: Path) -> dict[str, Any]:
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        fail(f"cannot read tokens file {path}: {e.strerror or e}")
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, ValueError):
        fail(f"tokens file {path} is not JSON (write it with bench/peers/tokens.py)")
    if not isinstance(spec, dict):
        fail(f"tokens file {path} is not a tokens object (write it with bench/peers/tokens.py)")
    return spec


KINDS = ("nll", "passkey")


def kind_of(spec: dict[str, Any], path: Path) -> str:
    """A tokens file's kind: "nll" (no "kind" key: the files written before passkey existed) or "passkey"."""
    kind = spec.get("kind", "nll")
    if kind not in KINDS:
        fail(f"tokens file {path}: unknown kind {kind!r} (tokens.py writes {' or '.join(KINDS)})")
    return kind


def _ids(x: Any, length: int | None = None) -> bool:
    return (isinstance(x, list) and bool(x) and (length is None or len(x) == length)
            and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in x))


def read_tokens(path: Path, spec: dict[str, Any] | None = None) -> dict[str, Any]:
    """The NLL tokens file tokens.py writes: N, M, model_dir, and samples of N + M + 1 token ids."""
    spec = _load_tokens(path) if spec is None else spec
    if kind_of(spec, path) != "nll":
        fail(f"tokens file {path} holds {spec['kind']} tasks, not NLL samples (tokens.py without --passkey)")
    if not all(k in spec for k in ("N", "M", "ids", "model_dir", "model")):
        fail(f"tokens file {path} lacks N, M, ids, model or model_dir (write it with bench/peers/tokens.py)")
    n, m, ids = spec["N"], spec["M"], spec["ids"]
    if not (isinstance(n, int) and isinstance(m, int) and n >= 1 and m >= 1):
        fail(f"tokens file {path}: N and M must be integers >= 1")
    if not (isinstance(ids, list) and ids and all(_ids(s, n + m + 1) for s in ids)):
        fail(f"tokens file {path}: ids must be samples of N + M + 1 = {n + m + 1} token ids")
    return spec


TASK_KEYS = ("length", "depth", "key", "context", "question")


def read_passkey(path: Path, spec: dict[str, Any] | None = None) -> dict[str, Any]:
    """The passkey tokens file ``tokens.py --passkey`` writes: model, model_dir and tasks, each with its
    context ids (compressed), question ids (fed after), key (5 digits), length (context + question) and
    depth. Adds "N_min": the shortest context."""
    spec = _load_tokens(path) if spec is None else spec
    if kind_of(spec, path) != "passkey":
        fail(f"tokens file {path} holds NLL samples, not passkey tasks (tokens.py --passkey writes those)")
    if not all(k in spec for k in ("tasks", "model_dir", "model")):
        fail(f"tokens file {path} lacks tasks, model or model_dir (write it with bench/peers/tokens.py)")
    tasks = spec["tasks"]
    if not (isinstance(tasks, list) and tasks):
        fail(f"tokens file {path}: tasks must be a non-empty list")
    for i, t in enumerate(tasks):
        if not (isinstance(t, dict) and all(k in t for k in TASK_KEYS)):
            fail(f"tokens file {path}: task {i} lacks one of {', '.join(TASK_KEYS)}")
        ok = (_ids(t["context"]) and _ids(t["question"]) and isinstance(t["key"], str) and t["key"].isdigit()
              and isinstance(t["length"], int) and t["length"] == len(t["context"]) + len(t["question"])
              and isinstance(t["depth"], (int, float)) and 0 <= t["depth"] <= 1)
        if not ok:
            fail(f"tokens file {path}: task {i} must hold context and question token ids, a digit key, "
                 "length = len(context) + len(question) and a depth in [0, 1]")
    spec["N_min"] = min(len(t["context"]) for t in tasks)
    return spec


def read_any(path: Path) -> dict[str, Any]:
    """Either kind of tokens file, checked as its kind says (``spec["kind"]`` is set)."""
    spec = _load_tokens(path)
    kind = kind_of(spec, path)
    spec = read_passkey(path, spec) if kind == "passkey" else read_tokens(path, spec)
    spec["kind"] = kind
    return spec


def context_length(spec: dict[str, Any]) -> int:
    """The context every budget must fit: N (NLL) or the shortest task context (passkey)."""
    return spec["N_min"] if spec["kind"] == "passkey" else spec["N"]


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
