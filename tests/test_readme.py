"""The README's Python section runs as written (on the offline default model)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def python_block() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Python\n") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_readme_python_block_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HEADKV_RUN_ID", raising=False)
    exec(compile(python_block(), "README.md (Python)", "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out
    assert re.search(r"B_streaming_128: PPL \d+\.\d+ at Eff.Ctx 128", out), out
