"""Per-head statistics of attention maps: pure functions of attention probability tensors.

Every function takes ``attn`` of shape (H, T, T): the causal attention probabilities of H heads on one
block of T tokens with a full cache (query t sees keys 0..t), and returns one value per head (H,), a mean
over the query positions ``t >= q_from`` (early queries see too few keys to tell heads apart).

- ``entropy``: attention entropy normalized by the entropy of uniform attention over the t + 1 visible
  keys (0 = one key, 1 = uniform);
- ``mean_distance``: expected distance t - k in tokens;
- ``sink_mass``: mass on the first ``sink`` keys;
- ``local_mass``: mass on the last ``window`` keys ``(t - window, t]`` (sinks not counted);
- ``kept_mass`` / ``far_mass``: the mass a head keeps / loses when cut to (sink, window), with exactly the
  semantics of :mod:`models.window`;
- ``offset_peak``: how concentrated attention is at one fixed relative offset: the largest mean mass any
  single offset d = t - k receives (1 for the diagonal or for a previous-token head), and that offset.
"""

from __future__ import annotations

import torch

from headkv.models import window as win


def _queries(attn: torch.Tensor, q_from: int) -> torch.Tensor:
    if attn.dim() != 3 or attn.shape[1] != attn.shape[2]:
        raise ValueError(f"expected causal attention maps (H, T, T), got shape {tuple(attn.shape)}")
    if not 0 <= q_from < attn.shape[1]:
        raise ValueError(f"q_from={q_from} leaves no query in a block of {attn.shape[1]} tokens")
    return torch.arange(q_from, attn.shape[1], device=attn.device)


def kept_mass(attn: torch.Tensor, sink: int, window: int, q_from: int = 0) -> torch.Tensor:
    """Mean over queries of the mass on the keys ``[0, sink) U (t - window, t]``; (H,)."""
    q = _queries(attn, q_from)
    k = torch.arange(attn.shape[2], device=attn.device)
    one = torch.ones(1, dtype=torch.long)
    mask = win.allowed(q, k, one * sink, one * window)  # (1, Q, K), the same for every head
    return attn[:, q_from:].masked_fill(~mask, 0.0).sum(-1).mean(-1)


def far_mass(attn: torch.Tensor, sink: int, window: int, q_from: int = 0) -> torch.Tensor:
    """The attention mass a cut to (sink, window) removes from each head; (H,)."""
    return (1.0 - kept_mass(attn, sink, window, q_from)).clamp(min=0.0)


def sink_mass(attn: torch.Tensor, sink: int = 4, q_from: int = 0) -> torch.Tensor:
    """Mass on the first ``sink`` keys; all mass on key 0 gives 1."""
    return kept_mass(attn, sink, 0, q_from)


def local_mass(attn: torch.Tensor, window: int, sink: int = 0, q_from: int = 0) -> torch.Tensor:
    """Mass on the last ``window`` keys that are not sinks; the diagonal gives 1."""
    return kept_mass(attn, sink, window, q_from) - kept_mass(attn, sink, 0, q_from)


def entropy(attn: torch.Tensor, q_from: int = 1) -> torch.Tensor:
    """Entropy over keys divided by log(t + 1) (the entropy of uniform attention at query t); (H,)."""
    q = _queries(attn, max(q_from, 1)).to(attn.dtype)
    a = attn[:, max(q_from, 1) :]  # (H, Q, K)
    ent = -(a * a.clamp(min=1e-30).log()).sum(-1)  # (H, Q)
    return (ent / (q + 1).log().view(1, -1)).mean(-1)


def mean_distance(attn: torch.Tensor, q_from: int = 0) -> torch.Tensor:
    """Expected distance t - k of the attended key, in tokens; (H,)."""
    q = _queries(attn, q_from)
    k = torch.arange(attn.shape[2], device=attn.device)
    dist = (q.view(-1, 1) - k.view(1, -1)).clamp(min=0).to(attn.dtype)  # (Q, K)
    return (attn[:, q_from:] * dist).sum(-1).mean(-1)


def offset_profile(attn: torch.Tensor, max_offset: int, q_from: int = 0) -> torch.Tensor:
    """Mean mass at each relative offset d = t - k for d < max_offset; (H, max_offset)."""
    q_from = max(q_from, max_offset - 1)  # every query must reach every offset
    q = _queries(attn, q_from)
    idx = q.view(-1, 1) - torch.arange(max_offset, device=attn.device).view(1, -1)  # (Q, D)
    rows = attn[:, q_from:]  # (H, Q, K)
    return rows.gather(2, idx.unsqueeze(0).expand(attn.shape[0], -1, -1)).mean(1)


def offset_peak(attn: torch.Tensor, max_offset: int = 64, q_from: int = 0) -> tuple[torch.Tensor, ...]:
    """(largest mean mass at one fixed offset, that offset) per head."""
    peak, where = offset_profile(attn, max_offset, q_from).max(-1)
    return peak, where


def head_stats(
    attn: torch.Tensor, sink: int, windows: tuple[int, ...], q_from: int
) -> dict[str, torch.Tensor]:
    """All statistics of one layer's maps (H, T, T), by name; each value is (H,)."""
    peak, where = offset_peak(attn, min(64, attn.shape[1]), q_from)
    on_sink = sink_mass(attn, sink, q_from)
    out = {
        "entropy": entropy(attn, q_from),
        "distance": mean_distance(attn, q_from),
        "sink_mass": on_sink,
        "offset_peak": peak,
        "peak_offset": where.to(attn.dtype),
    }
    for w in windows:  # one masked sum per window: local and far masses both derive from the kept mass
        kept = kept_mass(attn, sink, w, q_from)
        out[f"local_mass_{w}"] = kept - on_sink
        out[f"far_mass_{w}"] = (1.0 - kept).clamp(min=0.0)
    return out
