"""The study's configuration families as pure functions -> Allocation, in one name registry.

A policy name is parsed by the first registered pattern that matches it; the pattern's named groups
are the policy's integer parameters. Families that read a head profile (G, I, J, K) get it as the
``profile`` argument; A and B ignore it. Every builder returns per-(layer, KV head) sink and window
for the given shape.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

from alloc.allocation import Allocation, AllocationError

STUDY_SINK = 4  # the study's sink count for every family except A


@dataclass(frozen=True)
class PolicyContext:
    """What a builder may use besides its parameters."""

    shape: tuple[int, int]  # (layers, KV heads)
    q_per_kv: int = 1
    model_id: str = ""
    profile: Any = None  # classify.profile.HeadProfile, for the families that need one


Builder = Callable[[PolicyContext, dict[str, float]], Allocation]
_REGISTRY: dict[str, tuple[re.Pattern[str], Builder, bool]] = {}


def register(family: str, pattern: str, needs_profile: bool = False) -> Callable[[Builder], Builder]:
    """Register ``builder`` for names that fully match ``pattern`` (named groups become parameters)."""

    def deco(builder: Builder) -> Builder:
        _REGISTRY[family] = (re.compile(pattern), builder, needs_profile)
        return builder

    return deco


def families() -> list[str]:
    return list(_REGISTRY)


def needs_profile(name: str) -> bool:
    return _match(name)[2]


def _match(name: str) -> tuple[Builder, dict[str, float], bool]:
    for pattern, builder, profile in _REGISTRY.values():
        m = pattern.fullmatch(name)
        if m:
            return builder, {k: float(v) for k, v in m.groupdict().items()}, profile
    known = ", ".join(p.pattern for p, _, _ in _REGISTRY.values())
    raise AllocationError(f"unknown policy '{name}' (known patterns: {known})")


def build(name: str, ctx: PolicyContext) -> Allocation:
    """The allocation that policy ``name`` gives a model of ``ctx.shape``."""
    builder, params, profile = _match(name)
    if profile and ctx.profile is None:
        raise AllocationError(f"policy '{name}' needs a head profile: run `headkv classify` and pass --profile")
    alloc = builder(ctx, params)
    return Allocation(alloc.sink, alloc.window, ctx.model_id, ctx.q_per_kv, {"policy": name, **alloc.meta})


def _uniform(ctx: PolicyContext, sink: int, window: int, **meta: Any) -> Allocation:
    return Allocation.uniform(ctx.shape, sink, window, meta=meta)


# A: window-only, no sink: every head keeps the last W tokens (the study's sink ablation).
@register("A", r"A_window_(?P<W>\d+)")
def window_only(ctx: PolicyContext, p: dict[str, float]) -> Allocation:
    return _uniform(ctx, 0, int(p["W"]), budget=int(p["W"]))


# B: StreamingLLM: sink 4 + window C - 4 for every head (Eff.Ctx = C).
@register("B", r"B_streaming_(?P<C>\d+)")
def streaming(ctx: PolicyContext, p: dict[str, float]) -> Allocation:
    c = int(p["C"])
    if c <= STUDY_SINK:
        raise AllocationError(f"B_streaming_{c}: the context must exceed the {STUDY_SINK} sink tokens")
    return _uniform(ctx, STUDY_SINK, c - STUDY_SINK, budget=c)
