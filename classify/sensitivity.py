"""Validate a classifier against the model itself: per-KV-head sensitivity to a small window.

A KV head's sensitivity is the mean KL divergence (nats per predicted token) from the full-attention
model's next-token distribution to the distribution of the same model in which **only that head** is cut to
``sink + window`` (every other head keeps full attention). Spearman's rank correlation between a classifier
score and the sensitivity says whether the classifier ranks heads by what cutting them costs.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable

import numpy as np
import torch
from scipy.stats import spearmanr

from headkv.alloc.allocation import Allocation, applied
from headkv.models import scoring
from headkv.models.loading import model_shape


def one_head_cut(shape: Any, layer: int, head: int, sink: int, window: int, seq_len: int) -> Allocation:
    """Full attention everywhere except (layer, head), which keeps ``[0, sink) U (t - window, t]``."""
    s = torch.zeros(shape.shape, dtype=torch.long)
    w = torch.full(shape.shape, seq_len, dtype=torch.long)
    s[layer, head], w[layer, head] = sink, window
    return Allocation.from_tensors(
        s, w, model_id=shape.model_id, q_per_kv=shape.q_per_kv, meta={"policy": f"cut_L{layer}_H{head}"}
    )


@torch.no_grad()
def head_sensitivity(
    model: Any,
    blocks: torch.Tensor,
    sink: int = 4,
    window: int = 16,
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """Mean KL per token (L, KV) when each KV head alone is cut to (sink, window)."""
    shape = model_shape(model)
    n_layers, n_heads = shape.shape
    kl = np.zeros(shape.shape)
    total, done = len(blocks) * n_layers * n_heads, 0
    for block in blocks:
        x = block.unsqueeze(0).to(model.device)
        full = scoring.hidden(model, x)  # (1, T, H): logits only a chunk of tokens at a time
        for layer in range(n_layers):
            for head in range(n_heads):
                cut = one_head_cut(shape, layer, head, sink, window, blocks.shape[1])
                with applied(model, cut):
                    kl[layer, head] += float(scoring.chunked_kl(model, scoring.hidden(model, x), full))
                done += 1
                if progress:
                    progress(done, total)
    return kl / blocks.numel()


def rank_report(profile: Any, sensitivity: np.ndarray) -> dict[str, dict[str, float]]:
    """Spearman rho (and p) of sensitivity against the profile's score and every raw KV-head statistic,
    plus the score recomputed under the other GQA rule."""
    from headkv.classify.profile import ClassifierRule, from_stats

    sens = np.asarray(sensitivity).ravel()
    columns = {"score": profile.score}
    columns.update({f"stat:{k}": v for k, v in profile.stats.items()})
    rule = ClassifierRule(**profile.meta["rule"]) if "rule" in profile.meta else None
    if rule is not None and profile.query_stats:
        other = replace(rule, gqa="mean" if rule.gqa == "max" else "max")
        q = {k: np.asarray(v) for k, v in profile.query_stats.items()}
        columns[f"score_gqa_{other.gqa}"] = from_stats(q, other, profile.model_id, profile.q_per_kv).score
    out = {}
    for name, v in columns.items():
        rho, p = spearmanr(np.asarray(v, dtype=float).ravel(), sens)
        out[name] = {"rho": float(rho), "p": float(p)}
    return out


def class_sensitivity(profile: Any, sensitivity: np.ndarray) -> dict[str, dict[str, float]]:
    """Mean and median sensitivity per class: do the classes order heads by what cutting them costs?"""
    labels = np.asarray(profile.labels, dtype=object)
    sens = np.asarray(sensitivity)
    return {
        k: {
            "n": int((labels == k).sum()),
            "mean": float(sens[labels == k].mean()),
            "median": float(np.median(sens[labels == k])),
        }
        for k in ("positional", "mixed", "gathering")
        if (labels == k).any()
    }


def classify_model(
    model: Any,
    blocks: torch.Tensor,
    rule: Any,
    meta: dict[str, Any],
    sens_blocks: torch.Tensor | None = None,
    sens_window: int = 16,
    progress: Callable[[str, int, int], None] | None = None,
) -> Any:
    """The head profile of ``model``: statistics of attention maps on ``blocks``, labels and confidences, and
    (with ``sens_blocks``) each KV head's measured sensitivity with the Spearman check against the scores."""
    from dataclasses import replace

    from headkv.classify.profile import collect_query_stats, from_stats
    from headkv.models.loading import model_shape

    shape = model_shape(model)
    tick = (lambda i, n: progress("attention statistics", i, n)) if progress else None
    qstats = collect_query_stats(model, blocks, rule, progress=tick)
    prof = from_stats(qstats, rule, shape.model_id, shape.q_per_kv, meta)
    if sens_blocks is None:
        return prof
    sens = head_sensitivity(model, sens_blocks, rule.sink, sens_window,
                            progress=(lambda i, n: progress("head sensitivity", i, n)) if progress else None)
    setup = {"sink": rule.sink, "window": sens_window, "tokens": int(sens_blocks[:, 1:].numel()),
             "seq_len": int(sens_blocks.shape[1]), "unit": "KL nats per predicted token"}
    extra = {"sensitivity_setup": setup, "spearman": rank_report(prof, sens),
             "class_sensitivity": class_sensitivity(prof, sens)}
    return replace(prof, sensitivity=sens.tolist(), meta={**prof.meta, **extra})


def report(prof: Any) -> list[str]:
    """The profile as printed lines: class counts, confidences, the Spearman check."""
    counts = prof.counts()
    total = sum(counts.values())
    lines = ["class        heads   share  mean conf  confidence histogram (10 bins over [0, 1])"]
    pairs = [(lab, c) for lr, cr in zip(prof.labels, prof.confidence, strict=True)
             for lab, c in zip(lr, cr, strict=True)]
    for k, hist in prof.histogram().items():
        conf = [c for lab, c in pairs if lab == k]
        mean = sum(conf) / len(conf) if conf else float("nan")
        lines.append(f"{k:12s} {counts[k]:5d} {100 * counts[k] / total:6.1f}%  {mean:9.3f}  {hist}")
    for name, r in (prof.meta.get("spearman") or {}).items():
        lines.append(f"  Spearman rho vs measured sensitivity, {name:28s} {r['rho']:+.3f}  (p={r['p']:.1e})")
    for k, v in (prof.meta.get("class_sensitivity") or {}).items():
        lines.append(f"  mean KL {k:12s} {v['mean']:.5f} nats/token (median {v['median']:.5f}, n={v['n']})")
    return lines
