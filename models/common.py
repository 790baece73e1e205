"""The ground every room of headkv stands on: the cache folder, atomic writes, and one error base class.

``HeadkvError`` is the root of every error a user can cause (bad option, bad file, bad model): the CLI turns
any of them into one ``error: ...`` line and exit code 2. Subclasses name the room that raised them.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import stat
from pathlib import Path
from typing import Any, Callable


class HeadkvError(ValueError):
    """Bad input, said in one line (the CLI prints ``error: <message>`` and exits 2)."""


def cache_dir() -> Path:
    """``$HEADKV_CACHE`` if set, else ``~/.cache/headkv``."""
    return Path(os.environ.get("HEADKV_CACHE") or Path.home() / ".cache" / "headkv").expanduser()


def atomic_write(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """``write(tmp)`` into a temp file beside ``path``, then rename it over ``path``: a reader never sees a
    half-written file, and a failed write leaves no file behind. A symlinked ``path`` writes its target; a
    replaced file keeps its mode, a new one gets the umask's."""
    path = Path(os.path.realpath(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = stat.S_IMODE(path.stat().st_mode) if path.exists() else None
    tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # 0o666 less the umask
    try:
        write(tmp)
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def parse_json(text: str | bytes, where: str, error: type[HeadkvError] = HeadkvError) -> Any:
    """``json.loads(text)``, or one ``error`` line naming ``where``: not JSON, a number beyond the parser's
    digits, or nesting too deep to read."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{where} is not valid JSON: {e.msg} at line {e.lineno}") from None
    except (ValueError, RecursionError) as e:  # 4300+ digit integers; nesting past the recursion limit
        why = "nested too deeply" if isinstance(e, RecursionError) else str(e).splitlines()[0]
        raise error(f"{where} is not valid JSON: {why}") from None


def read_text(path: str | Path, what: str, error: type[HeadkvError] = HeadkvError) -> str:
    """The UTF-8 text of the file ``path`` (a ``what``, e.g. "prompts file"), or one ``error`` line."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise error(f"cannot read {what} {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise error(f"{what} {path} is not UTF-8 text") from None


def load_json(path: str | Path, what: str, error: type[HeadkvError] = HeadkvError) -> Any:
    """The JSON value of the file ``path`` (a ``what``, e.g. "allocation file"), or one ``error`` line."""
    return parse_json(read_text(path, what, error), str(path), error)


def printable(text: str) -> str:
    """``text`` with control characters (terminal escape codes) shown as ``\\xNN``: safe to print."""
    return re.sub(r"[\x00-\x1f\x7f-\x9f]", lambda m: f"\\x{ord(m.group()):02x}", text)


def one_line(message: str) -> str:
    """The first line of ``message``, printable (an error line may quote a name from any file)."""
    return printable(message.splitlines()[0] if message else "")


def emit_json(result: Any, out: str | Path | None = None) -> None:
    """Print ``result`` as JSON and, if ``out`` is given, write it there atomically (the benches' output)."""
    text = json.dumps(result, indent=1)
    print(text)
    if out:
        atomic_write(out, lambda tmp: tmp.write_text(text + "\n"))
