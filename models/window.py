"""The one definition of headkv's window semantics.

From query position t, a head with (sink, window) attends to keys at positions
``[0, sink) U (t - window, t]`` (never to the future); on a layer with a native sliding window ``cap``,
``([0, sink) U (t - window, t]) & (t - cap, t]``. Everything else in headkv calls into this module:
``allowed`` / ``hard_bias`` (which keys a query sees), ``keep`` / ``slot`` / ``kept_tokens`` (which keys a
cache holds, where, how many), ``positions`` (a padded batch's positions), ``kv_bytes`` and ``soft_bias``
(the differentiable relaxation for the learnable gates; as ``tau -> 0`` exactly the hard mask).

Design: docs/design.md, section 'The window rule'.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def edge(window: torch.Tensor, distance: torch.Tensor, kind: str = "linear") -> torch.Tensor:
    """The soft window's signed edge (before the temperature): > 0 exactly at the distances a window keeps
    (``distance <= window - 1``), 0 halfway to the first one it drops. ``kind``: "linear" or "log"."""
    if kind == "log":  # distance 0 (the query itself) is always inside: clamped, not log(0)
        return torch.log(window - 0.5) - torch.log(distance.clamp_min(1e-3))
    return window - 0.5 - distance


def native(
    sink: torch.Tensor, window: torch.Tensor, cap: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same keys with nothing held in vain: a window is cut to the native cap, and a head whose window
    reaches the cap needs no sinks (every key it could see is inside the cap). ``cap`` broadcasts against
    sink and window; a cap <= 0 or None means no native window."""
    if cap is None:
        return sink, window
    capped = cap > 0
    cut = capped & (window >= cap)
    return torch.where(cut, 0, sink), torch.where(capped, torch.minimum(window, cap.clamp(min=1)), window)


def _cap(cap: torch.Tensor | None) -> torch.Tensor | None:
    """A cap tensor with 'no cap' (<= 0) made infinite, or None."""
    if cap is None:
        return None
    return torch.where(cap > 0, cap, torch.iinfo(torch.int64).max // 4)


def allowed(
    q_pos: torch.Tensor, k_pos: torch.Tensor, sink: torch.Tensor, window: torch.Tensor,
    cap: torch.Tensor | None = None,
) -> torch.Tensor:
    """Boolean mask of the keys each head may attend to.

    q_pos: (Q,) absolute query positions; k_pos: (K,) or (H, K) absolute key positions, where a
    negative position marks an empty cache slot (or padding); sink, window: (H,) integer tensors.
    Returns (H, Q, K).

    Batched (each sequence of a padded batch has its own positions, see :func:`positions`): q_pos (B, Q)
    and k_pos (B, K) or (B, H, K); returns (B, H, Q, K). A negative query position (padding) sees nothing.
    ``cap`` (H,): the layer's native window (see the module docstring), None or <= 0 for none.
    """
    if q_pos.dim() == 2:  # batched: (B, Q) queries, (B, K) or (B, H, K) keys
        q = q_pos.unsqueeze(1).unsqueeze(-1)  # (B, 1, Q, 1)
        k = k_pos.unsqueeze(1) if k_pos.dim() == 2 else k_pos  # (B, 1|H, K)
    else:
        q = q_pos.view(1, -1, 1)  # (1, Q, 1)
        k = k_pos.view(1, -1) if k_pos.dim() == 1 else k_pos  # (1|H, K)
    k = k.unsqueeze(-2)  # (..., 1|H, 1, K)
    s = sink.view(-1, 1, 1)
    w = window.view(-1, 1, 1)
    causal = (k >= 0) & (k <= q)
    if cap is not None:
        causal = causal & (k > q - _cap(cap).view(-1, 1, 1))
    return causal & ((k < s) | (k > q - w))  # (H, Q, K) or (B, H, Q, K)


def hard_bias(
    q_pos: torch.Tensor, k_pos: torch.Tensor, sink: torch.Tensor, window: torch.Tensor, dtype: torch.dtype,
    cap: torch.Tensor | None = None,
) -> torch.Tensor:
    """Additive bias (H, Q, K), or (B, H, Q, K) for batched positions: 0 where ``allowed``, -inf elsewhere."""
    mask = allowed(q_pos, k_pos, sink, window, cap)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def soft_bias(
    q_pos: torch.Tensor, k_pos: torch.Tensor, sink: torch.Tensor, window: torch.Tensor, tau: float,
    cap: torch.Tensor | None = None, kind: str = "linear",
) -> torch.Tensor:
    """Differentiable bias (H, Q, K); ``window`` may be a float tensor that requires grad; ``kind``: the
    :func:`edge`.

    Sinks, the causal limit and the native cap stay hard; only the window edge is soft -- unless ``sink``
    is a float tensor (learned sinks): then key k is a sink with the soft edge ``sigmoid((sink - 0.5 - k) /
    tau)`` (linear whatever ``kind``: the training config refuses the log edge with learned sinks) and the
    bias is the log of the probability that the sinks or the window keep it. When queries and keys are the
    same positions 0..T-1 (a training block) the bias depends on the distance q - k only, so
    it is computed once per distance and laid out by index (:class:`_DistanceBias`: the same values and
    gradient, fewer passes over (H, T, T), and nothing that size kept for the backward).
    """
    t = q_pos.shape[-1]
    if (q_pos.dim() == 1 and k_pos.dim() == 1 and k_pos.shape[0] == t and not sink.is_floating_point()
            and _is_range(q_pos) and _is_range(k_pos)):
        return _DistanceBias.apply(window, sink, cap, t, float(tau), kind)
    return _soft_bias_dense(q_pos, k_pos, sink, window, tau, cap, kind)


def _is_range(p: torch.Tensor) -> bool:
    return len(p) > 0 and bool(p[0] == 0) and bool((p == torch.arange(len(p), device=p.device)).all())


_DISTANCE: dict[tuple[int, str], torch.Tensor] = {}


def _distances(t: int, device: torch.device) -> torch.Tensor:
    """(T, T) long: q - k where k <= q, else T (the index of the 'not causal' slot)."""
    key = (t, str(device))
    if key not in _DISTANCE:
        if len(_DISTANCE) > 8:
            _DISTANCE.clear()
        i = torch.arange(t, device=device)
        d = i.view(-1, 1) - i.view(1, -1)
        _DISTANCE[key] = torch.where(d >= 0, d, t)
    return _DISTANCE[key]


class _DistanceBias(torch.autograd.Function):
    """``soft_bias`` for queries and keys at 0..T-1: per-head values by distance, gathered to (H, T, T)."""

    @staticmethod
    def _layout(per_distance: torch.Tensor, sink: torch.Tensor, outside: float) -> torch.Tensor:
        """(H, T) values by distance -> (H, T, T), ``outside`` where k > q; a head's sink columns are 0
        wherever their value is finite (a sink is seen, free, by every query that may see the key at all:
        -inf marks the future and keys beyond the native cap)."""
        h, t = per_distance.shape
        ext = torch.cat([per_distance, per_distance.new_full((h, 1), outside)], 1)
        out = ext[:, _distances(t, per_distance.device)]  # (H, T, T)
        for head, s in enumerate(sink.tolist()):
            if s > 0:
                cols = out[head, :, :s]
                out[head, :, :s] = torch.where(torch.isfinite(cols), 0.0, cols)
        return out

    @staticmethod
    def forward(ctx, window, sink, cap, t, tau, kind):  # noqa: ANN001 -- autograd.Function's signature
        d = torch.arange(t, device=window.device, dtype=window.dtype)
        w = window.view(-1, 1)
        x = edge(w, d, kind) / tau  # (H, T)
        inside = torch.ones_like(x, dtype=torch.bool)
        if cap is not None:
            inside = d < _cap(cap).view(-1, 1).to(x.dtype)
        ctx.save_for_backward(x, sink, inside, w)
        ctx.tau, ctx.kind = tau, kind
        g = F.logsigmoid(x).masked_fill(~inside, float("-inf"))
        return _DistanceBias._layout(g, sink, float("-inf"))

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001
        x, sink, inside, w = ctx.saved_tensors
        dx = 1 / (w - 0.5) if ctx.kind == "log" else 1.0  # d edge / d window
        slope = (torch.sigmoid(-x) * dx / ctx.tau).masked_fill(~inside, 0.0)  # d logsigmoid(x) / d window
        per_key = _DistanceBias._layout(slope, sink, 0.0)  # (H, T, T): sink columns 0
        h = x.shape[0]
        g = torch.bmm(grad.reshape(h, 1, -1).to(per_key.dtype), per_key.reshape(h, -1, 1)).view(h)
        return g, None, None, None, None, None


def _soft_bias_dense(
    q_pos: torch.Tensor, k_pos: torch.Tensor, sink: torch.Tensor, window: torch.Tensor, tau: float,
    cap: torch.Tensor | None = None, kind: str = "linear",
) -> torch.Tensor:
    """``soft_bias`` for any positions, elementwise over (H, Q, K) (the reference)."""
    q = q_pos.view(1, -1, 1).to(window.dtype)
    k = k_pos.view(1, 1, -1).to(window.dtype) if k_pos.dim() == 1 else k_pos.unsqueeze(1).to(window.dtype)
    w = window.view(-1, 1, 1)
    x = edge(w, q - k, kind) / tau
    if sink.is_floating_point():  # learned sinks, soft too: a key is seen if in the sinks OR the window
        xs = (sink.view(-1, 1, 1).to(window.dtype) - 0.5 - k) / tau
        gate = torch.logaddexp(F.logsigmoid(x), F.logsigmoid(xs) + F.logsigmoid(-x))  # log(pw + ps - pw ps)
    else:
        gate = F.logsigmoid(x)  # (H, Q, K)
        is_sink = k < sink.view(-1, 1, 1).to(window.dtype)
        gate = torch.where(is_sink, torch.zeros_like(gate), gate)
    causal = (k >= 0) & (k <= q)
    if cap is not None:
        causal = causal & (k > q - _cap(cap).view(-1, 1, 1).to(window.dtype))
    return gate.masked_fill(~causal, float("-inf"))


def keep(
    p: torch.Tensor, seen: int | torch.Tensor, sink: torch.Tensor, window: torch.Tensor,
    cap: torch.Tensor | None = None,
) -> torch.Tensor:
    """Which absolute positions ``p`` (P,) each head (H,) still holds once ``seen`` tokens were written:
    exactly the keys ``allowed`` gives the next query (position ``seen``). Returns (H, P). A negative
    position (padding) is never held.

    Batched: ``p`` (B, P) and ``seen`` (B,) (each sequence's own count); returns (B, H, P)."""
    if p.dim() == 2:  # batched
        p = p.unsqueeze(1)  # (B, 1, P)
        seen = torch.as_tensor(seen, device=p.device).view(-1, 1, 1)  # (B, 1, 1)
    else:
        p = p.view(1, -1)
    held = (p >= 0) & ((p < sink.view(-1, 1)) | (p > seen - 1 - window.view(-1, 1)))
    return held if cap is None else held & (p > seen - 1 - _cap(cap).view(-1, 1))


def slot(p: torch.Tensor | int, sink: torch.Tensor | int, window: torch.Tensor | int) -> torch.Tensor | int:
    """Where a held key of absolute position ``p`` lives in its head's storage: the sinks at 0..sink-1, then
    a ring of ``window`` slots (position p overwrites p - window, which no later query may see).
    Elementwise: ``p`` broadcasts against ``sink`` and ``window`` (e.g. p (B, 1) of a padded batch's
    sequences against (H,) heads gives (B, H)); plain ints give an int (a decode step's host-side index)."""
    if isinstance(p, int) and isinstance(sink, int) and isinstance(window, int):
        return p if p < sink else sink + (p - sink) % window
    return torch.where(sink > p, p, sink + (p - sink) % window)


def slot_positions(seen: int, sink: torch.Tensor, window: torch.Tensor, slots: int) -> torch.Tensor:
    """The inverse of :func:`slot`: the position each of a head's first ``slots`` storage slots holds once
    ``seen`` tokens were written (each key at its ``slot``, later keys overwriting earlier ones), -1 where a
    slot is empty or beyond the head's ``sink + window``. sink, window: (H,); returns (H, slots). Every
    position :func:`keep` holds appears once, in its slot (sinks past a native cap are still listed: a
    cache masks them by distance)."""
    j = torch.arange(slots, device=sink.device).view(1, -1)  # (1, C)
    s, w = sink.view(-1, 1), window.view(-1, 1)
    last = seen - 1
    ring = last - torch.remainder(last - j, w.clamp(min=1))  # the latest p <= last with slot(p) == j
    p = torch.where(j < s, j, torch.where(ring >= s, ring, -1))
    return torch.where((j < s + w) & (p <= last), p, -1)


def positions(real: torch.Tensor, start: torch.Tensor | int = 0) -> torch.Tensor:
    """Positions (B, T) of a padded batch's tokens: a real token's position is its index among its own
    sequence's real tokens, counted from ``start`` (B,) tokens already seen -- what transformers' ``generate``
    derives ``position_ids`` from the attention mask -- and padding (``real`` False) is -1, so it is never
    held (:func:`keep`) nor seen (:func:`allowed`). ``real``: (B, T) bool, the attention mask."""
    start = torch.as_tensor(start, device=real.device).view(-1, 1)
    return torch.where(real, start + real.long().cumsum(-1) - 1, -1)


def kept_tokens(
    seq_len: int | torch.Tensor, sink: torch.Tensor, window: torch.Tensor, cap: torch.Tensor | None = None
) -> torch.Tensor:
    """How many distinct keys each head holds after ``seq_len`` tokens (what the next query sees):
    min(T, sink + window) without a native cap; with one, the last min(T, window, cap) tokens plus the sinks
    still inside the cap. ``seq_len`` may be a tensor broadcasting against the heads."""
    if cap is None:
        return torch.clamp(sink + window, max=seq_len) if isinstance(seq_len, int) else \
            torch.minimum(sink + window, seq_len)
    c = _cap(cap)
    recent = torch.minimum(torch.minimum(window, c), torch.as_tensor(seq_len))  # the window part
    sinks = torch.minimum(sink, seq_len - recent) - torch.clamp(seq_len - c, min=0)
    return recent + sinks.clamp(min=0)


def kv_bytes(slots: int, head_dim: int, dtype: torch.dtype) -> int:
    """Bytes of K and V for ``slots`` held (sequence, layer, KV head, token) entries of ``head_dim``."""
    return 2 * int(slots) * head_dim * torch.empty((), dtype=dtype).element_size()


def steady_context(sink: torch.Tensor, window: torch.Tensor, cap: torch.Tensor | None = None) -> torch.Tensor:
    """Keys each head sees once the sequence is long: sink + window, or min(window, cap) under a native cap
    (its sinks are out of reach by then). The study's Eff.Ctx is its mean over heads."""
    return kept_tokens(2**40, sink, window, cap)


def realized_context(
    seq_len: int, sink: torch.Tensor, window: torch.Tensor, cap: torch.Tensor | None = None
) -> float:
    """Mean over heads and query positions t < T of the keys query t sees (``kept_tokens(t + 1)``):
    min(t + 1, sink + window) without a native cap."""
    t = torch.arange(1, seq_len + 1, dtype=torch.long).view(1, -1)  # (1, T)
    col = lambda x: None if x is None else x.reshape(-1, 1)  # noqa: E731 -- (H, 1)
    return float(kept_tokens(t, col(sink), col(window), col(cap)).double().mean())
