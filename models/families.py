"""Model-family facts: which decoder families headkv's attention patch serves, and each layer's native
sliding window as transformers applies it."""

from __future__ import annotations

from headkv.models.common import HeadkvError

# decoder families whose attention runs through transformers' attention interface with the standard
# (query, key, value, mask) contract, tested in tests/test_families.py; anything else is refused
FAMILIES = ("gpt_neox", "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3")


def check_family(config) -> None:
    """Refuse, in one line and before any compute, a model family the patch does not serve."""
    family = getattr(config, "model_type", "?")
    if family not in FAMILIES:
        raise HeadkvError(
            f"model family '{family}' is not supported by headkv's attention patch "
            f"(supported: {', '.join(FAMILIES)})"
        )
    types = getattr(config, "layer_types", None)
    unknown = sorted({t for t in types or () if t not in ("full_attention", "sliding_attention")})
    if unknown:
        raise HeadkvError(
            f"model family '{family}' has layer types headkv does not serve: {', '.join(unknown)}"
        )


def native_caps(config) -> tuple[int, ...]:
    """Each layer's native sliding window (0: full attention), exactly as transformers' mask functions apply
    it: ``layer_types`` names the sliding layers (Gemma-2/3, Qwen2/3); without it a set ``sliding_window``
    applies to every layer (Mistral, Phi-3)."""
    n_layers, window = config.num_hidden_layers, getattr(config, "sliding_window", None) or 0
    types = getattr(config, "layer_types", None)
    if types is not None:
        return tuple(int(window) if t == "sliding_attention" else 0 for t in types[:n_layers])
    return (int(window),) * n_layers
