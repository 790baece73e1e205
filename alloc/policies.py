"""The study's configuration families as pure functions -> Allocation, in one name registry.

A policy name is parsed by the first registered pattern that matches it; the pattern's named groups
are the policy's integer parameters. Families that read a head profile (G, I, J, K) get it as the
``profile`` argument; A and B ignore it. Every builder returns per-(layer, KV head) sink and window
for the given shape.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from headkv.alloc.allocation import Allocation, AllocationError
from headkv.models.common import printable

STUDY_SINK = 4  # the study's sink count for every family except A


@dataclass(frozen=True)
class PolicyContext:
    """What a builder may use besides its parameters."""

    shape: tuple[int, int]  # (layers, KV heads)
    q_per_kv: int = 1
    model_id: str = ""
    profile: Any = None  # classify.profile.HeadProfile, for the families that need one
    native: tuple[int, ...] = ()  # the model's native sliding windows per layer (ModelShape.native)


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


def family_of(name: str) -> str:
    """The family of a configuration name: the registered family whose pattern fully matches it first
    (A_window_64 -> A, G_conf0.55_base128 -> G); any other name ('full', a learned allocation's label such
    as learned_b64, a file label) is its own family."""
    for fam, (pattern, _, _) in _REGISTRY.items():
        if pattern.fullmatch(name):
            return fam
    return name


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
        raise AllocationError(
            f"policy '{name}' needs a head profile: run `headkv classify` and pass --profile"
        )
    try:
        alloc = builder(ctx, params)
    except AllocationError as e:
        raise AllocationError(f"policy '{name}': {e}") from None
    except (OverflowError, ValueError):  # a parameter beyond any float or int (inf, 4300+ digits)
        raise AllocationError(f"policy '{name}': a parameter is out of range") from None
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
        raise AllocationError(f"the context must exceed the {STUDY_SINK} sink tokens")
    return _uniform(ctx, STUDY_SINK, c - STUDY_SINK, budget=c)


# ---- families that read a head profile (classify.profile.HeadProfile) ----------------------------------
# G: the window a confidently typed head gets
TYPE_WINDOWS = {"positional": 16, "mixed": 64, "gathering": 256}


def _labels(ctx: PolicyContext) -> tuple[list[list[str]], list[list[float]]]:
    prof = ctx.profile
    if prof is None:
        raise AllocationError("this policy needs a head profile: run `headkv classify` and pass --profile")
    if tuple(prof.shape) != tuple(ctx.shape):
        raise AllocationError(
            f"head profile has {prof.shape[0]}x{prof.shape[1]} KV heads but the model has "
            f"{ctx.shape[0]}x{ctx.shape[1]}"
        )
    return prof.labels, prof.confidence


def _by_type(ctx: PolicyContext, window_of: Callable[[str, float], int], **meta: Any) -> Allocation:
    """Sink 4 everywhere; each head's window from its (label, confidence)."""
    labels, conf = _labels(ctx)
    rows = zip(labels, conf, strict=True)
    window = tuple(tuple(window_of(lab, c) for lab, c in zip(lr, cr, strict=True)) for lr, cr in rows)
    sink = tuple((STUDY_SINK,) * len(r) for r in window)
    alloc = Allocation(sink, window, meta=meta)
    return alloc.with_meta(budget=alloc.eff_ctx())  # these families state no budget: theirs is what they use


# G: confidence-based: a head with confidence >= t gets its type's window (16/64/256), every other head b.
@register("G", r"G_conf(?P<t>\d+(?:\.\d+)?)_base(?P<b>\d+)", needs_profile=True)
def confidence_based(ctx: PolicyContext, p: dict[str, float]) -> Allocation:
    t, b = p["t"], int(p["b"])
    return _by_type(ctx, lambda lab, c: TYPE_WINDOWS[lab] if c >= t else b, threshold=t, base=b)


def _type_windows(p: dict[str, float]) -> dict[str, int]:
    return {"positional": int(p["p"]), "mixed": int(p["m"]), "gathering": int(p["g"])}


# I: inverse: window by type, positional p, mixed m, gathering g (long windows to positional heads).
@register("I", r"I_pos(?P<p>\d+)_mix(?P<m>\d+)_g(?P<g>\d+)", needs_profile=True)
def inverse(ctx: PolicyContext, p: dict[str, float]) -> Allocation:
    w = _type_windows(p)
    return _by_type(ctx, lambda lab, c: w[lab], type_windows=w)


# J: small-gathering: window by type as I, with the gathering heads kept small.
@register("J", r"J_pos(?P<p>\d+)_mix(?P<m>\d+)_g(?P<g>\d+)", needs_profile=True)
def small_gathering(ctx: PolicyContext, p: dict[str, float]) -> Allocation:
    w = _type_windows(p)
    return _by_type(ctx, lambda lab, c: w[lab], type_windows=w)


# K: uniform-aware: every head window W (sink 4) through the per-head mechanism; Eff.Ctx = W + 4.
@register("K", r"K_uniform(?P<W>\d+)_aware")
def uniform_aware(ctx: PolicyContext, p: dict[str, float]) -> Allocation:
    w = int(p["W"])
    return _uniform(ctx, STUDY_SINK, w, budget=w + STUDY_SINK)


# ---- controls of a (learned) allocation: the same budget, its structure destroyed -----------------------
CONTROLS = ("shuffled", "layer_mean")


def control(alloc: Allocation, kind: str, seed: int = 0) -> Allocation:
    """A control of ``alloc`` with exactly its Eff.Ctx: ``shuffled`` permutes the (sink, window) pairs across
    all heads (seeded; only among heads of layers with the same native cap, so no head is given keys its
    layer never sees); ``layer_mean`` gives every head of a layer that layer's mean window (integers, the
    total kept exactly by largest remainder, each window within its cap). Which head gets the context is
    what the first tests; how much each layer gets, the second."""
    import torch

    from headkv.alloc.gates import round_to_budget

    if kind not in CONTROLS:
        raise AllocationError(f"unknown control '{kind}' (one of {', '.join(CONTROLS)})")
    sink, window, caps = alloc.effective()  # what each head really keeps under its layer's cap
    caps = torch.zeros_like(window) if caps is None else caps
    if kind == "shuffled":
        gen = torch.Generator().manual_seed(seed)
        s, w, c = sink.flatten().clone(), window.flatten().clone(), caps.flatten()
        for cap in c.unique():
            idx = (c == cap).nonzero().flatten()
            perm = idx[torch.randperm(len(idx), generator=gen)]
            s[idx], w[idx] = sink.flatten()[perm], window.flatten()[perm]
        sink, window = s.view_as(sink), w.view_as(window)
    else:
        means = window.double().mean(1, keepdim=True).expand_as(window)
        top = window.max(1, keepdim=True).values.expand_as(window)  # <= the cap, and above any mean's floor
        window = round_to_budget(means, int(window.sum()), top)
    meta = {**alloc.meta, "policy": f"{alloc.name}~{kind}", "control": kind, "control_of": alloc.name}
    return Allocation.from_tensors(sink, window, model_id=alloc.model_id, q_per_kv=alloc.q_per_kv,
                                   meta=meta, native=alloc.native)


# ---- the one resolver: policy names and allocation files -> rows to measure ---------------------------
@dataclass(frozen=True)
class Entry:
    """One row to measure: a display label, the allocation (None = full attention) and where it came from."""

    label: str
    allocation: Allocation | None
    source: dict[str, Any]


def resolve(ctx: PolicyContext, names: list[str], files: list[str], controls: Any = ()) -> list[Entry]:
    """Every policy name and allocation file as an Entry, all checked against the model before anything
    runs, each file followed by its ``controls`` (:func:`control`). Labels are for display only (results
    are keyed by content) and are made unique here."""
    from headkv.alloc.results import file_hash

    entries = [Entry(n, None, {"policy": "full"}) if n == "full"
               else Entry(n, build(n, ctx).bound(ctx.native), {"policy": n}) for n in names]
    for f in files:
        alloc = Allocation.load(f)
        alloc.check_model(ctx.model_id, ctx.shape, ctx.q_per_kv)
        alloc = alloc.bound(ctx.native)
        label = printable(str(alloc.meta.get("policy") or Path(f).stem))  # from a file: no raw escapes
        source = {"file": str(f), "file_sha256": file_hash(f)}
        entries.append(Entry(label, alloc, source))
        for kind in controls:
            derived = control(alloc.with_meta(policy=label), kind)
            entries.append(Entry(derived.name, derived, {**source, "control": kind}))
    labels = unique_labels([e.label for e in entries], [e.source.get("file") for e in entries])
    return [Entry(lab, e.allocation, e.source) for lab, e in zip(labels, entries, strict=True)]


def unique_labels(labels: list[str], files: list[str | None] | None = None) -> list[str]:
    """``labels`` with repeats told apart: ``name@<run folder>`` for files, else ``name#2``, ``name#3``."""
    files = files or [None] * len(labels)
    out: list[str] = []
    for label, f in zip(labels, files, strict=True):
        new = label
        if labels.count(label) > 1 and f is not None:
            new = f"{label}@{Path(f).parent.name or Path(f).stem}"
        k = 2
        while new in out:
            new, k = f"{label}#{k}", k + 1
        out.append(new)
    return out
