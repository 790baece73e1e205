"""HeadProfile: each KV head's class (positional / mixed / gathering), confidence, score and raw statistics.

The classifier rule is stated once (:class:`ClassifierRule`): with sink 4 kept, a head is **positional**
when ``far_mass_16 <= tau``, **gathering** when ``far_mass_64 > tau``, **mixed** otherwise. Confidence is
the margin of the soft version of that rule; ``score`` = 0.5 p_mix + p_gat ranks heads by how much context
they need. GQA: a KV head's far masses are the **max** over its query heads (other statistics the mean).

Design: docs/design.md, section 'Head profiles'.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from headkv.classify import stats as st
from headkv.models.common import HeadkvError, atomic_write, load_json

log = logging.getLogger(__name__)

LABELS = ("positional", "mixed", "gathering")
FORMAT_VERSION = 1


class ProfileError(HeadkvError):
    """A head profile that is malformed or does not fit the model it is used with."""


@dataclass(frozen=True)
class ClassifierRule:
    sink: int = 4  # sink tokens every cut keeps (the study's sink)
    short: int = 16  # the positional window
    long: int = 64  # the mixed window; beyond it a head is gathering
    tau: float = 0.2  # attention mass a head may lose and still fit a window
    temperature: float = 1.0  # softness of the confidence, in log-odds units
    q_from: int = 128  # statistics use queries t >= q_from (enough keys beyond every window)
    gqa: str = "max"  # how query heads' far masses combine per KV head: max (default) or mean

    def __post_init__(self) -> None:
        if not 0 < self.tau < 1 or self.temperature <= 0 or not 0 < self.short < self.long:
            raise ProfileError("classifier rule needs 0 < tau < 1, temperature > 0 and 0 < short < long")
        if self.gqa not in ("max", "mean"):
            raise ProfileError(f"gqa rule must be 'max' or 'mean', got {self.gqa!r}")


def _logit(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 1e-4, 1 - 1e-4)
    return np.log(x / (1 - x))


def classify(far_short: np.ndarray, far_long: np.ndarray, rule: ClassifierRule) -> tuple[np.ndarray, ...]:
    """(labels, confidence, score) arrays of the shape of the inputs."""
    t = _logit(np.asarray(rule.tau))
    pos, gat = (t - _logit(far_short)) / rule.temperature, (_logit(far_long) - t) / rule.temperature
    logits = np.stack([pos, np.zeros_like(pos), gat], axis=-1)  # (..., 3) in LABELS order
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    idx = p.argmax(-1)
    labels = np.asarray(LABELS, dtype=object)[idx]
    top2 = np.sort(p, axis=-1)[..., -2:]
    confidence = top2[..., 1] - top2[..., 0]  # margin over the runner-up class
    score = 0.5 * p[..., 1] + p[..., 2]
    return labels, np.clip(confidence, 0.0, 1.0), score


def kv_reduce(query_stats: dict[str, np.ndarray], q_per_kv: int, gqa: str = "max") -> dict[str, np.ndarray]:
    """Per-KV-head statistics (L, KV) from per-query-head ones (L, Hq): far masses by ``gqa``, others mean."""
    out = {}
    for name, v in query_stats.items():
        grouped = v.reshape(v.shape[0], -1, q_per_kv)  # (L, KV, q_per_kv)
        out[name] = grouped.max(-1) if name.startswith("far_mass") and gqa == "max" else grouped.mean(-1)
    return out


@torch.no_grad()
def collect_query_stats(
    model: Any, blocks: torch.Tensor, rule: ClassifierRule, progress: Callable[[int, int], None] | None = None
) -> dict[str, np.ndarray]:
    """Mean over blocks of every statistic per (layer, query head), each (L, Hq)."""
    from headkv.models.attention import captured

    if blocks.shape[1] <= rule.q_from:
        raise ProfileError(f"blocks of {blocks.shape[1]} tokens leave no query at t >= {rule.q_from}")
    sums: dict[tuple[int, str], torch.Tensor] = {}

    def take(layer: int, probs: torch.Tensor) -> None:
        for name, v in st.head_stats(probs[0], rule.sink, (rule.short, rule.long), rule.q_from).items():
            sums[(layer, name)] = sums.get((layer, name), 0) + v.double().cpu()

    with captured(model, take):
        for i, block in enumerate(blocks):
            model(block.unsqueeze(0).to(model.device))
            if progress:
                progress(i + 1, len(blocks))
    layers = sorted({k[0] for k in sums})
    names = sorted({k[1] for k in sums})
    return {n: torch.stack([sums[(li, n)] for li in layers]).numpy() / len(blocks) for n in names}


def _grid(a: np.ndarray, cast: Callable = float) -> list[list[Any]]:
    return [[cast(x) for x in row] for row in a]


@dataclass(frozen=True)
class HeadProfile:
    """Per-(layer, KV head) classes and scores of one model; JSON round-trips."""

    labels: list[list[str]]
    confidence: list[list[float]]
    score: list[list[float]] | None = None
    model_id: str = ""
    q_per_kv: int = 1
    stats: dict[str, list[list[float]]] = field(default_factory=dict)  # per KV head, after the GQA rule
    query_stats: dict[str, list[list[float]]] = field(default_factory=dict)  # per query head
    sensitivity: list[list[float]] | None = None  # KL (nats/token) when only this head is cut
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        shape = np.shape(np.asarray(self.labels, dtype=object))
        if len(shape) != 2 or 0 in shape:
            raise ProfileError("'labels' must be a non-empty (layers x KV heads) grid")
        for name in ("confidence", "score", "sensitivity"):
            v = getattr(self, name)
            if v is not None and np.shape(v) != shape:
                raise ProfileError(f"'{name}' has shape {np.shape(v)}, labels have {shape}")
        bad = {x for row in self.labels for x in row} - set(LABELS)
        if bad:
            raise ProfileError(f"unknown head label(s) {sorted(bad)}; known: {', '.join(LABELS)}")
        if not all(0.0 <= c <= 1.0 for row in self.confidence for c in row):
            raise ProfileError("every confidence must lie in [0, 1]")

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.labels), len(self.labels[0])

    def counts(self) -> dict[str, int]:
        flat = [x for row in self.labels for x in row]
        return {k: flat.count(k) for k in LABELS}

    def check_model(self, shape: Any) -> None:
        """Refuse a profile made for a model of another shape (``shape`` is a ModelShape), in one line."""
        got = (shape.n_layers, shape.n_kv_heads)
        if self.shape != got or self.q_per_kv != shape.q_per_kv:
            raise ProfileError(
                f"head profile of '{self.model_id}' has {self.shape[0]}x{self.shape[1]} KV heads (q_per_kv "
                f"{self.q_per_kv}) but model '{shape.model_id}' has {got[0]}x{got[1]} "
                f"(q_per_kv {shape.q_per_kv})"
            )

    def histogram(self, bins: int = 10) -> dict[str, list[int]]:
        """Confidence counts per class in ``bins`` equal bins over [0, 1]."""
        conf = np.asarray(self.confidence)
        labels = np.asarray(self.labels, dtype=object)
        edges = np.linspace(0, 1, bins + 1)
        return {k: np.histogram(conf[labels == k], edges)[0].tolist() for k in LABELS}

    def to_dict(self) -> dict[str, Any]:
        return {"format_version": FORMAT_VERSION, "shape": list(self.shape), **asdict(self)}

    def save(self, path: str | Path) -> Path:
        """Write atomically: a reader never sees a half-written file."""
        return atomic_write(path, lambda tmp: tmp.write_text(json.dumps(self.to_dict())))
    @classmethod
    def load(cls, path: str | Path) -> HeadProfile:
        d = load_json(path, "head profile", ProfileError)
        if not isinstance(d, dict) or d.get("format_version") != FORMAT_VERSION:
            raise ProfileError(f"{path} is not a head profile (format_version {FORMAT_VERSION})")
        try:
            return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})
        except (TypeError, KeyError, ValueError) as e:
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ProfileError(f"{path}: malformed head profile ({why})") from None


def from_stats(
    query_stats: dict[str, np.ndarray],
    rule: ClassifierRule,
    model_id: str,
    q_per_kv: int,
    meta: dict[str, Any] | None = None,
) -> HeadProfile:
    """Classify KV heads from per-query-head statistics."""
    kv = kv_reduce(query_stats, q_per_kv, rule.gqa)
    labels, conf, score = classify(kv[f"far_mass_{rule.short}"], kv[f"far_mass_{rule.long}"], rule)
    return HeadProfile(
        labels=_grid(labels, str),
        confidence=_grid(conf),
        score=_grid(score),
        model_id=model_id,
        q_per_kv=q_per_kv,
        stats={k: _grid(v) for k, v in kv.items()},
        query_stats={k: _grid(v) for k, v in query_stats.items()},
        meta={"rule": asdict(rule), **(meta or {})},
    )
