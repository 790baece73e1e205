"""headkv: head-aware KV-cache compression, as a library.

The public API (everything else is internal; the command line ``headkv`` is :mod:`headkv.cli`)::

    import headkv

    model, tokenizer = headkv.load_model("smollm2-135m")          # the offline default
    alloc = headkv.policy("B_streaming_128", model)               # a policy name -> an Allocation
    alloc = headkv.Allocation.load("runs/x/allocation.json")      # or a saved allocation
    dynamic = alloc.filled(headkv.Fill())                         # the same budgets, filled by content
    with headkv.apply(model, alloc) as cache:                     # the evicting per-head cache
        out = model.generate(ids, cache=cache, max_new_tokens=20)
    with headkv.apply(model, alloc, mode="mask"):                 # the masked forward (the evaluator's)
        logits = model(ids).logits
    result = headkv.evaluate(model, alloc, headkv.token_blocks(tokenizer, "austen", seq_len=256, n_blocks=2))
    learned = headkv.train(model, tokenizer, budget=64, max_steps=100, run_dir="runs/b64")

``import headkv`` imports neither torch nor transformers nor lightning nor wandb: each name below is
resolved on first use (torch and transformers then; lightning and wandb only by :func:`train`).

The package is this checkout's root (``pyproject.toml`` maps ``headkv`` to it): ``headkv.models`` (the
ground floor: attention, windows, caches, text), ``headkv.alloc`` (allocations, policies, the evaluator,
training), ``headkv.classify`` (head profiles) and ``headkv.cli``.
"""

from __future__ import annotations

from contextlib import contextmanager
from importlib import import_module
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:  # pragma: no cover
    from pathlib import Path

    from headkv.alloc.allocation import Allocation
    from headkv.alloc.evaluate import EvalResult

__version__ = "0.1.0"

# name -> (module, attribute): imported on first access (PEP 562), so `import headkv` stays light
_LAZY = {
    "Allocation": ("headkv.alloc.allocation", "Allocation"),
    "AllocationError": ("headkv.alloc.allocation", "AllocationError"),
    "EvalResult": ("headkv.alloc.evaluate", "EvalResult"),
    "Fill": ("headkv.models.dynamic", "Fill"),
    "GraphDecoder": ("headkv.models.static_cache", "GraphDecoder"),
    "HeadkvError": ("headkv.models.common", "HeadkvError"),
    "TrainConfig": ("headkv.alloc.config", "TrainConfig"),
    "load_model": ("headkv.models.loading", "load_model"),
    "model_shape": ("headkv.models.loading", "model_shape"),
    "token_blocks": ("headkv.models.text", "token_blocks"),
    "long_stream": ("headkv.models.text", "long_stream"),
}
MODES = ("evict", "mask", "static")

__all__ = ["MODES", "__version__", "apply", "evaluate", "policy", "train", *sorted(_LAZY)]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'headkv' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


def policy(name: str, model: Any, profile: Any = None) -> Allocation | None:
    """The allocation that policy ``name`` (e.g. ``B_streaming_128``; see ``headkv.alloc.policies``) builds
    for ``model``, bound to its native sliding windows; None for ``"full"`` (full attention).
    ``profile``: a head profile (a path or a ``HeadProfile``) for the policies that need one."""
    from headkv.alloc.policies import PolicyContext, needs_profile, resolve
    from headkv.models.loading import model_shape

    shape = model_shape(model)
    if isinstance(profile, (str, bytes)) or hasattr(profile, "__fspath__"):
        from headkv.classify.profile import HeadProfile

        profile = HeadProfile.load(profile)
    if profile is not None and name != "full" and needs_profile(name):
        profile.check_model(shape)
    ctx = PolicyContext(shape.shape, shape.q_per_kv, shape.model_id, profile, shape.native)
    return resolve(ctx, [name], [])[0].allocation


def _allocation(model: Any, allocation: Any) -> Allocation | None:
    """An Allocation, None (full attention), a policy name, or a path to an allocation JSON."""
    from pathlib import Path

    from headkv.alloc.allocation import Allocation

    if allocation is None or isinstance(allocation, Allocation):
        return allocation
    if isinstance(allocation, str) and not allocation.endswith(".json"):
        return policy(allocation, model)
    if isinstance(allocation, (str, Path)):
        return Allocation.load(allocation)
    raise TypeError(f"an allocation, a policy name or an allocation file, not {type(allocation).__name__}")


@contextmanager
def apply(
    model: Any, allocation: Any, *, mode: str = "evict", reindex: bool = False, backend: str = "dense",
    max_len: int | None = None,
) -> Iterator[Any]:
    """Run ``model`` under ``allocation`` (an Allocation, a policy name, an allocation file, or None = full
    attention) inside the block; everything is undone on exit (the one door:
    ``headkv.alloc.allocation.applied``).

    ``mode="evict"`` (default, for generation): yields the per-head evicting cache that holds only each
    head's sink + window; pass it to the model (``model.generate(ids, cache=cache)``). ``mode="mask"``: the
    masked forward over a full cache, exactly what :func:`evaluate` scores; yields None. ``reindex``:
    StreamingLLM's position re-indexing (evict only). ``backend``: the masked forward's kernel, dense, flex
    or auto. ``mode="static"`` (the GPU serving path): the fixed-capacity cache for at most ``max_len``
    tokens per sequence (one prefill, then one token per step), whose steps :class:`GraphDecoder` replays
    as a CUDA graph."""
    from headkv.alloc.allocation import applied
    from headkv.models.common import HeadkvError

    if mode not in MODES:
        raise HeadkvError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if (mode == "static") != (max_len is not None):
        raise HeadkvError("max_len goes with mode='static' (the most tokens a sequence will hold)")
    alloc = _allocation(model, allocation)
    evict = mode != "mask"
    with applied(model, alloc, evict=evict, reindex=reindex, backend=backend, static=max_len) as cache:
        yield cache


def evaluate(model: Any, allocation: Any, blocks: Any, *, name: str | None = None, backend: str = "dense",
             **options: Any) -> EvalResult:
    """Perplexity, accuracy, Eff.Ctx and KV bytes of ``model`` under ``allocation`` (as :func:`apply` takes
    it) on token ``blocks`` (N, T) (e.g. :func:`token_blocks`), with the one evaluator (masked forward)."""
    from headkv.alloc.evaluate import evaluate as run

    return run(model, _allocation(model, allocation), blocks, name=name, backend=backend, **options)


def train(
    model: Any,
    tokenizer: Any,
    budget: float,
    *,
    run_dir: str | Path | None = None,
    resume: str | Path | None = None,
    progress: bool = False,
    **options: Any,
) -> Allocation | None:
    """Learn per-head windows for ``model`` (frozen) under an average-context ``budget``; returns the exported
    allocation (None on a DDP worker process). ``options``: any ``TrainConfig`` field (``max_steps``,
    ``seq_len``, ``corpus``, ``wandb_mode``, ...; ``model`` defaults to the model's name). Writes a run
    directory (default ``runs/<run id>``): checkpoints, ``allocation.json``, a heatmap and the CSV log.
    ``resume``: a run directory or checkpoint to continue, read and checked as ``headkv train --resume``."""
    from headkv.alloc import runs
    from headkv.alloc.config import TrainConfig
    from headkv.alloc.train import fit

    options.setdefault("model", str(getattr(model, "name_or_path", "") or TrainConfig.model))
    cfg = TrainConfig.from_dict({**options, "budget": float(budget)})
    run = runs.open_run(cfg, run_dir, resume)
    return fit(model, tokenizer, run.cfg, run.dir, run.run_id, resume=run.checkpoint, progress=progress)
