"""Learnable per-(layer, KV head) windows under an average-context budget, and their export.

Every (layer, KV head) has a free logit ``z``; its window is ``w = 1 + (cap - 1) * sigmoid(z + b)``, the
shift ``b`` solved so that the mean Eff.Ctx is exactly the budget at every step (``z = 0`` is
StreamingLLM). The soft mask is :func:`models.window.soft_bias`, fed through ``SoftMask``. Export rounds
the windows to integers with the budget repaired exactly (largest remainder), at the trained budget or
another one (same logits, no retraining).

Design: docs/design.md, section 'Learnable gates'.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from headkv.alloc.allocation import Allocation
from headkv.models.common import HeadkvError
from headkv.models.masks import SoftMask


class GateError(HeadkvError):
    """Gates that cannot be built or exported as asked (e.g. an infeasible budget)."""


def check_budget(budget: float, sink: int, cap: int) -> None:
    """A budget is feasible when every head can keep its sinks plus at least one recent token, and the
    mean context does not exceed the sequence length."""
    if not math.isfinite(budget) or budget < sink + 1 or budget > cap:
        raise GateError(
            f"budget {budget:g} is infeasible: with sink {sink} and sequence length {cap} it must lie in "
            f"[{sink + 1}, {cap}]"
        )


def solve_shift(
    z: torch.Tensor, mean_window: float, cap: int | torch.Tensor, iters: int = 100
) -> torch.Tensor:
    """The scalar b with mean(1 + (cap - 1) * sigmoid(z + b)) == mean_window (bisection in float64);
    ``cap`` is an int or a tensor shaped like z (each head's largest window)."""
    span = (torch.as_tensor(cap, dtype=torch.float64, device=z.device) - 1).expand(z.shape).flatten()
    z = z.detach().double().flatten()
    target = mean_window - 1.0  # mean of span * sigmoid we need, in [0, mean(span)]
    if target <= 0.0:
        return torch.tensor(-1e4, dtype=torch.float64)
    if target >= float(span.mean()):
        return torch.tensor(1e4, dtype=torch.float64)
    lo, hi = -float(z.max()) - 60.0, -float(z.min()) + 60.0
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if float((span * torch.sigmoid(z + mid)).mean()) < target:
            lo = mid
        else:
            hi = mid
    return torch.tensor(0.5 * (lo + hi), dtype=torch.float64)


def budget_windows(
    z: torch.Tensor, mean_window: float | torch.Tensor, cap: int | torch.Tensor
) -> torch.Tensor:
    """Float windows (same shape as z, each in [1, cap]) with the exact mean ``mean_window``,
    differentiable in z (and in ``mean_window`` when it is a tensor that requires grad, e.g. the budget
    left by learned sinks); ``cap`` an int or a tensor shaped like z."""
    span = torch.as_tensor(cap, dtype=torch.float64, device=z.device).expand(z.shape) - 1
    m = torch.as_tensor(mean_window, dtype=torch.float64, device=z.device)
    b_star = solve_shift(z, float(m), span + 1).to(z.device)
    zd = z.double()
    with torch.no_grad():
        s = torch.sigmoid(zd + b_star)
        slope = span * s * (1 - s)  # d window / d(z + b), (L, H)
    # value b*, gradient -sum_j slope_j dz_j / sum_j slope_j and n / sum_j slope_j dm (implicit function)
    total = slope.sum().clamp_min(1e-300)
    b = b_star - (slope * (zd - zd.detach())).sum() / total + (m - m.detach()) * z.numel() / total
    w = 1.0 + span * torch.sigmoid(zd + b)
    return w.to(z.dtype)


def round_to_budget(windows: torch.Tensor, total: int, cap: int | torch.Tensor) -> torch.Tensor:
    """Integer windows in [1, cap] summing to ``total`` (<= windows.sum()): floor, then +1 to the largest
    fractional parts. ``cap``: an int or a tensor shaped like the windows."""
    cap = torch.as_tensor(cap, dtype=torch.float64).expand(windows.shape)
    w = torch.minimum(windows.detach().double().clamp(min=1), cap)
    base = w.floor()
    need = total - int(base.sum())
    if need < 0 or need > int((base < cap).sum()):
        raise GateError(f"cannot round windows summing to {float(w.sum()):.3f} to an integer total {total}")
    frac = torch.where(base < cap, w - base, torch.full_like(w, -1.0)).flatten()
    if need:
        base.view(-1)[torch.topk(frac, need).indices] += 1
    return base.long()


class WindowGates(nn.Module):
    """One learnable window per (layer, KV head), mean Eff.Ctx == budget by construction. Sinks are fixed
    (``sink``), or with ``sink_max`` > 0 learned per head too: ``sink_max * sigmoid(y)``, started at
    ``sink``, a soft edge like the window's (:func:`models.window.soft_bias`), counted in Eff.Ctx, so a
    head that keeps more sinks leaves less window to all (the shift is solved for ``budget - mean sink``,
    its gradient reaching the sink logits). Heads of natively sliding layers keep the fixed sinks (they
    expire there and are not counted)."""

    def __init__(
        self, shape: tuple[int, int], budget: float, seq_len: int, sink: int = 4,
        native: tuple[int, ...] = (), sink_max: int = 0,
    ) -> None:
        super().__init__()
        if sink < 0:
            raise GateError(f"sink must be >= 0, got {sink}")
        if sink_max and not sink <= sink_max < budget:
            raise GateError(f"learned sinks need sink <= sink_max < budget, got sink {sink}, sink_max "
                            f"{sink_max}, budget {budget:g}")
        self.shape = tuple(shape)
        self.budget = float(budget)
        self.seq_len = int(seq_len)
        self.sink_count = int(sink)
        self.native = tuple(native or ())
        caps = torch.tensor(self.native or (0,) * shape[0], dtype=torch.long).view(-1, 1).expand(shape)
        self.logits = nn.Parameter(torch.zeros(shape))  # uniform start = StreamingLLM
        self.register_buffer("sink", torch.full(shape, sink, dtype=torch.long), persistent=False)
        self.register_buffer("cap", caps.clone(), persistent=False)  # native windows, 0 = none
        # each head's largest useful window, and the sinks the budget counts (none on a sliding layer)
        self.register_buffer("max_window", torch.where(caps > 0, caps.clamp(max=seq_len), seq_len),
                             persistent=False)
        self.counted_sink = float(torch.where(caps > 0, 0, sink).double().mean())
        self.sink_max = int(sink_max)
        if self.sink_max:  # the learned sinks' logits, started at `sink`
            frac = min(max(sink / self.sink_max, 1e-3), 1 - 1e-3)
            self.sink_logits = nn.Parameter(torch.full(shape, math.log(frac / (1 - frac))))
        self._check(self.budget)

    def _check(self, budget: float) -> None:
        ceiling = torch.where(self.cap > 0, self.max_window, self.seq_len).double().mean()  # keys <= T
        top = min(self.counted_sink + float(self.max_window.double().mean()), float(ceiling))
        if not math.isfinite(budget) or budget < self.counted_sink + 1 or budget > top + 1e-9:
            raise GateError(
                f"budget {budget:g} is infeasible: with sink {self.sink_count} and sequence length "
                f"{self.seq_len}{' (within the native windows)' if self.native else ''} it must lie in "
                f"[{self.counted_sink + 1:g}, {top:g}]"
            )

    def sinks(self) -> torch.Tensor:
        """Sinks (L, H): the fixed long tensor, or the learned float ones (differentiable)."""
        if not self.sink_max:
            return self.sink
        learned = self.sink_max * torch.sigmoid(self.sink_logits)
        return torch.where(self.cap > 0, self.sink.to(learned.dtype), learned)

    def _counted(self) -> float | torch.Tensor:
        """The mean sink Eff.Ctx counts (none on natively sliding layers): a tensor when learned."""
        if not self.sink_max:
            return self.counted_sink
        return torch.where(self.cap > 0, 0.0, self.sinks()).double().mean()

    def warm_start(self, alloc: Allocation) -> None:
        """Start from an allocation's windows instead of StreamingLLM: each logit is set so that the head's
        window, at shift 0, is the allocation's (cut to the head's largest window); the budget's shift is
        then solved as always, so another budget (or sequence length) scales them to this run's budget."""
        s, w = alloc.tensors()
        top = self.max_window.double()
        frac = ((torch.minimum(w.double(), top) - 1) / (top - 1).clamp(min=1)).clamp(1e-4, 1 - 1e-4)
        with torch.no_grad():
            self.logits.copy_(torch.logit(frac).to(self.logits.dtype))
            if self.sink_max:  # learned sinks start at the allocation's too (fixed ones stay `sink`)
                s = (s.double() / self.sink_max).clamp(1e-3, 1 - 1e-3)
                self.sink_logits.copy_(torch.logit(s).to(self.sink_logits.dtype))

    def windows(self, budget: float | None = None) -> torch.Tensor:
        """Float windows (L, H) in [1, max_window], mean Eff.Ctx = budget; differentiable in the logits."""
        budget = self.budget if budget is None else float(budget)
        self._check(budget)
        return budget_windows(self.logits, budget - self._counted(), self.max_window)

    def eff_ctx(self) -> float:
        return float(self._counted()) + float(self.windows().detach().double().mean())

    def mask(self, tau: float, edge: str = "linear") -> SoftMask:
        """The soft mask at temperature ``tau`` with that :func:`models.window.edge` (windows computed once
        for all layers)."""
        return SoftMask(self.sinks(), self.windows(), float(tau), self.cap if self.native else None, edge)

    def export(
        self, budget: float | None = None, model_id: str = "", q_per_kv: int = 1, **meta: Any
    ) -> Allocation:
        """Integer windows, mean Eff.Ctx <= budget, as close as rounding allows."""
        budget = self.budget if budget is None else float(budget)
        sink, counted = self.sink.cpu(), self.counted_sink
        with torch.no_grad():
            if self.sink_max:  # integer sinks first, then the windows re-solved for what they leave
                sink = self.sinks().round().long().cpu()
                counted = float(torch.where(self.cap.cpu() > 0, 0, sink).double().mean())
            self._check(budget)
            w = budget_windows(self.logits, budget - counted, self.max_window).cpu()
        total = math.floor(w.numel() * (budget - counted) + 1e-6)
        windows = round_to_budget(w, total, self.max_window.cpu())
        meta = {
            "policy": learned_name(budget, meta.get("objective", "kl")),
            "budget": budget,
            "sink": self.sink_count,
            "seq_len": self.seq_len,
            **meta,
        }
        if self.sink_max:  # learned_sinks_b64: told apart from the fixed-sink runs in a sweep's table
            meta["sink_max"] = self.sink_max
            meta["policy"] = meta["policy"].replace("learned_", "learned_sinks_", 1)
        return Allocation.from_tensors(
            sink, windows, model_id=model_id, q_per_kv=q_per_kv, meta=meta, native=self.native
        )


def learned_name(budget: float, objective: str = "kl") -> str:
    """The policy name of an exported allocation: learned_b64 (KL, the default), learned_ce_b64 (CE)."""
    return f"learned_b{budget:g}" if objective == "kl" else f"learned_{objective}_b{budget:g}"
