"""`headkv search`: the smallest average budget whose learned allocation keeps perplexity within a relative
increase of full attention's on the eval split.

Everything checkable without the model is checked before it loads (one ``error:`` line, nothing written).
``budget_max`` is probed first, then ``budget_min``, then bisection in log space on integers between the
largest failing and the smallest passing budget; each probe is one training run (:func:`alloc.train.fit`)
in ``probes/b<B>/``, warm-started from the nearest trained budget, scored with the one evaluator. Files in
``out_dir``: ``search.json`` (rewritten atomically after every probe), ``allocation.json``, ``search.png``.
The same command resumes; changed settings are refused.

Design: docs/design.md, section 'Budget search'.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch

from headkv.alloc.allocation import Allocation
from headkv.alloc.config import ConfigError, SearchConfig, TrainConfig, TrainError, check_output, load
from headkv.alloc.evaluate import blocks_for, evaluate, paired_log_ppl_diff
from headkv.alloc.gates import GateError, check_budget
from headkv.alloc.results import model_identity, read_search, tokens_digest, versions
from headkv.alloc.runs import RESUME_KEYS, open_run
from headkv.alloc.train import TrainBlocks, fit
from headkv.models.common import HeadkvError, atomic_write
from headkv.models.loading import load_model

DEFAULT_TRAIN_CONFIG = "configs/train.yaml"
# the search's options that change a number (the probes' train config is compared too, key by key)
SETTINGS = ("model", "corpus", "encoding", "seq_len", "max_ppl_increase", "budget_min", "budget_max",
            "tolerance", "n_blocks", "seed", "dtype")
FULL_KEYS = ("ppl", "eff_ctx", "kv_bytes", "tokens", "seq_len", "n_blocks", "wall_s", "chunk_nll",
             "chunk_tokens")


class SearchError(HeadkvError):
    """A search that cannot run as asked, or whose budget range cannot reach the target, in one line."""


@dataclass
class Plan:
    """A checked search: its options, the probes' train config (at budget_max), where it writes, and the
    state of an earlier run of it (None for a new search)."""

    cfg: SearchConfig
    train: TrainConfig
    train_config: str | None
    out_dir: Path
    settings: dict[str, Any]
    state: dict[str, Any] | None


def default_out_dir(cfg: SearchConfig) -> Path:
    """runs/search-<model>-<corpus>-<seq_len>-<increase>: the same command finds its own folder again."""
    name = lambda s: re.sub(r"[^A-Za-z0-9_.-]+", "_", re.sub(r"\.txt$", "", Path(str(s)).name) or "x")  # noqa: E731
    tail = f"{cfg.seq_len}-{cfg.max_ppl_increase:g}"
    return Path("runs") / f"search-{name(cfg.model)}-{name(cfg.corpus)}-{tail}"


def prepare(cfg: SearchConfig) -> Plan:
    """Every check that needs no model: the probes' train config, both budget ends feasible, a single-process
    run, the output folder, and the settings of an earlier run in it. Writes nothing."""
    path = cfg.train_config
    if path is None and Path(DEFAULT_TRAIN_CONFIG).is_file():
        path = DEFAULT_TRAIN_CONFIG
    given = {"model": cfg.model, "corpus": cfg.corpus, "seq_len": cfg.seq_len, "seed": cfg.seed,
             "threads": cfg.threads, "wandb_mode": cfg.wandb_mode, "max_steps": cfg.max_steps,
             "objective": cfg.objective,
             "budget": float(cfg.seq_len)}  # a feasible placeholder: the ends are checked below, by name
    train = replace(load(TrainConfig, path, given), encoding=cfg.encoding)
    for flag, budget in (("--budget-min", cfg.budget_min), ("--budget-max", cfg.budget_max)):
        try:
            check_budget(float(budget), train.sink, cfg.seq_len)
        except GateError:
            raise ConfigError(f"{flag} {budget} is infeasible: with sink {train.sink} and --seq-len "
                              f"{cfg.seq_len} a budget must lie in [{train.sink + 1}, {cfg.seq_len}]"
                              ) from None
        try:  # whatever else the train config asks of a budget (e.g. learned sinks: sink_max < budget)
            replace(train, budget=float(budget)).validate()
        except TrainError as e:
            raise ConfigError(f"{flag} {budget}: {e}") from None
    if train.devices != 1:
        raise SearchError(f"the train config asks devices={train.devices}: a search trains each probe in one "
                          "process (use `headkv train` for DDP)")
    train = replace(train, budget=float(cfg.budget_max))
    train.validate()
    out_dir = Path(cfg.out_dir) if cfg.out_dir else default_out_dir(cfg)
    check_output(out_dir, directory=True)
    settings = json.loads(json.dumps({**{k: getattr(cfg, k) for k in SETTINGS},
                                      "train": {k: getattr(train, k) for k in RESUME_KEYS if k != "budget"}}))
    state = read_search(out_dir / "search.json") if (out_dir / "search.json").exists() else None
    if (out_dir / "search.json").exists() and state is None:
        raise SearchError(f"{out_dir / 'search.json'} is not a search file: pass another --out-dir")
    if state is not None:
        _same(out_dir, "searched with", state.get("settings", {}), settings)
    return Plan(cfg, train, path, out_dir, settings, state)


def _same(out_dir: Path, what: str, was: dict[str, Any], now: dict[str, Any]) -> None:
    """Refuse to continue a search whose saved ``was`` differs from ``now``, naming every changed key."""
    flat = lambda d: {**{k: v for k, v in d.items() if k != "train"},  # noqa: E731
                      **{f"train.{k}": v for k, v in (d.get("train") or {}).items()}}
    a, b = flat(was), flat(now)
    changed = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    if changed:
        was, asks = (", ".join(f"{k}={d.get(k)}" for k in changed) for d in (a, b))
        raise SearchError(f"cannot resume {out_dir}: it was {what} {was}; this run asks {asks} "
                          "(pass another --out-dir)")


def next_budget(lo: int, hi: int, tolerance: float) -> int | None:
    """The next budget to probe between a failing ``lo`` and a passing ``hi``: their geometric mean rounded to
    an integer strictly inside (lo, hi); None when the bracket is within the tolerance (or adjacent)."""
    if hi - lo <= 1 or hi / lo <= 1 + tolerance:
        return None
    return min(max(round(math.sqrt(lo * hi)), lo + 1), hi - 1)


def nearest(budget: int, trained: list[int]) -> int | None:
    """The trained budget nearest ``budget`` in log space (the larger one on a tie); None if none."""
    if not trained:
        return None
    return min(trained, key=lambda b: (abs(math.log(b / budget)), -b))


def _num(x: float) -> float | None:
    return None if x is None or math.isnan(x) else float(x)


def _write(plan: Plan, state: dict[str, Any]) -> None:
    text = json.dumps(state, indent=1)
    atomic_write(plan.out_dir / "search.json", lambda tmp: tmp.write_text(text + "\n"))


def _train(
    lm: Any, tok: Any, cfg: TrainConfig, run_dir: Path, run_id: str, bar: bool
) -> tuple[Allocation, bool]:
    """(the probe's allocation, whether it was trained now): read back from a run that finished with this
    config, else trained (an interrupted run continues from its last checkpoint)."""
    last = run_dir / "checkpoints" / "last.ckpt"
    run = open_run(cfg, run_dir, run_dir if last.is_file() else None, run_id)  # the one resume scheme
    if run.finished:
        return Allocation.load(run.dir / "allocation.json"), False
    lightning_log = logging.getLogger("lightning.pytorch")
    level = lightning_log.level
    lightning_log.setLevel(logging.WARNING)  # one line per probe, not Lightning's banner per probe
    try:
        return fit(lm, tok, cfg, run.dir, run.run_id, resume=run.checkpoint, progress=bar), True
    except SystemExit as e:  # Lightning answers Ctrl-C with a graceful shutdown and exit(1): it is a Ctrl-C
        raise KeyboardInterrupt from e
    finally:
        lightning_log.setLevel(level)


def run_search(
    plan: Plan,
    lm: Any,
    tok: Any,
    report: Callable[[str], None] = print,
    progress: Callable[[str, int, int], None] | None = None,
    bar: bool = False,
) -> dict[str, Any]:
    """Run (or continue) the search of ``plan`` with ``lm`` as the evaluation model; returns search.json's
    state. ``report`` gets one line per probe; ``progress(stage, i, n)`` the evaluation's blocks; ``bar``
    shows Lightning's progress bar while a probe trains. A SearchError when even budget_max misses the
    target (after search.json and search.png are written)."""
    cfg, start = plan.cfg, time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    blocks = blocks_for(tok, cfg.corpus, "eval", cfg.n_blocks * cfg.seq_len, cfg.seq_len, cfg.encoding)
    TrainBlocks(tok, plan.train).setup()  # the probes' TRAIN-split blocks exist: a corpus error now
    identity = {k: v for k, v in model_identity(lm).items() if k != "device"}
    conditions = json.loads(json.dumps({"tokens_digest": tokens_digest(blocks), **identity}))
    state = plan.state
    if state is not None:
        _same(plan.out_dir, "measured on", state.get("conditions", {}), conditions)
    train_lm = _train_model(plan, lm)
    evaluate_ = lambda alloc, label: evaluate(  # noqa: E731
        lm, alloc, blocks, name=label, backend=cfg.attention,
        progress=(lambda i, n: progress(f"eval {label}", i, n)) if progress else None)
    if state is None:
        full = evaluate_(None, "full")
        state = {"kind": "search", "settings": plan.settings, "conditions": conditions,
                 "train_config": plan.train_config, "out_dir": str(plan.out_dir),
                 "full": {**{k: getattr(full, k) for k in FULL_KEYS},
                          "ppl_lo": _num(full.ppl_lo), "ppl_hi": _num(full.ppl_hi)},
                 "target_ppl": full.ppl * (1 + cfg.max_ppl_increase), "curve": [], "chosen": None,
                 "status": "running", "wall_s": 0.0}
    prior_wall = float(state.get("wall_s") or 0.0)
    state.update(status="running", time=time.strftime("%Y-%m-%dT%H:%M:%S"), versions=versions())
    target = state["target_ppl"]
    report(f"full attention: PPL {state['full']['ppl']:.3f} on {cfg.n_blocks} eval blocks of {cfg.seq_len} "
           f"tokens; target PPL <= {target:.3f} (+{cfg.max_ppl_increase:.1%}); probes train "
           f"{plan.train.max_steps} steps each ({plan.train_config or 'TrainConfig defaults'})")
    done = {int(r["budget"]): r for r in state["curve"]}

    def save() -> None:
        state["wall_s"] = prior_wall + time.perf_counter() - start
        _write(plan, state)

    save()

    def probe(budget: int) -> dict[str, Any]:
        if budget in done:
            report(_line(done[budget], target, "read back from search.json"))
            return done[budget]
        run_dir = plan.out_dir / "probes" / f"b{budget}"
        warm = nearest(budget, list(done))
        init = done[warm]["allocation"] if warm is not None else plan.train.init
        t0 = time.perf_counter()
        alloc, trained = _train(train_lm, tok, replace(plan.train, budget=float(budget), init=init), run_dir,
                                f"{plan.out_dir.name}-b{budget}", bar)
        t1 = time.perf_counter()
        res = evaluate_(alloc, f"b{budget}")
        inc = [math.expm1(x) for x in paired_log_ppl_diff(res, {**state["full"], "name": "full"})]
        row = {"budget": budget, "eff_ctx": res.eff_ctx, "ppl": res.ppl, "ppl_lo": _num(res.ppl_lo),
               "ppl_hi": _num(res.ppl_hi), "increase": inc[0], "increase_lo": _num(inc[1]),
               "increase_hi": _num(inc[2]), "passes": res.ppl <= target,
               "steps": int(alloc.meta.get("steps", 0)), "trained": trained, "train_s": t1 - t0,
               "eval_s": res.wall_s, "wall_s": time.perf_counter() - t0,
               "init": init, "init_budget": warm, "run_dir": str(run_dir),
               "allocation": str(run_dir / "allocation.json"), "kv_bytes": res.kv_bytes,
               "kv_bytes_full": res.kv_bytes_full}
        state["curve"].append(row)
        done[budget] = row
        save()
        how = f"warm from b{warm}" if warm is not None else "from " + (init or "StreamingLLM")
        report(_line(row, target, f"{how}, {'trained' if trained else 'read back from its run'}"))
        return row

    if not probe(cfg.budget_max)["passes"]:
        top = done[cfg.budget_max]
        msg = (f"even --budget-max {cfg.budget_max} misses the target: PPL {top['ppl']:.3f} > {target:.3f} "
               f"(full attention {state['full']['ppl']:.3f} x {1 + cfg.max_ppl_increase:g}); raise "
               f"--budget-max (at most --seq-len {cfg.seq_len}), --max-ppl-increase or the training steps")
        state.update(status="target-missed", message=msg)
        save()
        _figure(state, plan.out_dir)
        raise SearchError(msg)
    lo, hi = cfg.budget_min, cfg.budget_max
    if probe(lo)["passes"]:
        hi = lo
    else:
        while (mid := next_budget(lo, hi, cfg.tolerance)) is not None:
            lo, hi = (lo, mid) if probe(mid)["passes"] else (mid, hi)
    best = done[hi]
    meta = {"target_ppl": target, "full_ppl": state["full"]["ppl"], "max_ppl_increase": cfg.max_ppl_increase,
            "ppl": best["ppl"], "corpus": cfg.corpus, "split": "eval", "seq_len": cfg.seq_len,
            "search": str(plan.out_dir / "search.json")}
    path = Allocation.load(best["allocation"]).with_meta(search=meta).save(plan.out_dir / "allocation.json")
    state["chosen"] = {**{k: best[k] for k in ("budget", "eff_ctx", "ppl", "ppl_lo", "ppl_hi", "increase",
                                              "increase_lo", "increase_hi", "kv_bytes", "kv_bytes_full")},
                       "allocation": str(path), "failing_below": lo if lo < hi else None,
                       "at_budget_min": hi == cfg.budget_min}
    state.update(status="done", message=None)
    save()
    _figure(state, plan.out_dir)
    return state


def _train_model(plan: Plan, lm: Any) -> Any:
    """The model the probes train: the evaluation model itself where dtype and device agree, else a second
    copy in the train config's dtype (Lightning moves it to its accelerator)."""
    t = plan.train
    if lm.dtype == t.torch_dtype and lm.device.type == "cpu" and t.accelerator == "cpu":
        return lm
    return load_model(plan.cfg.model, dtype=t.torch_dtype)[0]


def _increase(row: dict[str, Any]) -> str:
    """'+1.23% [+0.80%, +1.70%]': the increase over full attention and its paired 95% interval."""
    lo, hi = row.get("increase_lo"), row.get("increase_hi")
    return f"{row['increase']:+.2%}" + ("" if lo is None or hi is None else f" [{lo:+.2%}, {hi:+.2%}]")


def _line(row: dict[str, Any], target: float, how: str) -> str:
    verdict = "passes" if row["passes"] else "fails"
    return (f"budget {row['budget']:>5d} ({how}): PPL {row['ppl']:.3f} ({_increase(row)} vs full) "
            f"{'<=' if row['passes'] else '>'} {target:.3f}: {verdict}; Eff.Ctx {row['eff_ctx']:.2f}, "
            f"{row['steps']} steps, {row['wall_s']:.0f} s")


def _figure(state: dict[str, Any], out_dir: Path) -> Path:
    from headkv.alloc.plots import search_figure

    return search_figure(state, out_dir / "search.png")


def summary(state: dict[str, Any]) -> str:
    """The search's result as printed lines: the chosen budget, its Eff.Ctx, PPL against the target, KV bytes
    at seq_len against full attention's, the walk and the wall time, the files."""
    c, s = state["chosen"], state["settings"]
    size = lambda n: f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"  # noqa: E731
    walked = sorted(state["curve"], key=lambda r: r["budget"])
    lines = [
        f"chosen budget {c['budget']}: Eff.Ctx {c['eff_ctx']:.2f}, PPL {c['ppl']:.3f} "
        f"({_increase(c)}) <= target {state['target_ppl']:.3f} "
        f"(full attention {state['full']['ppl']:.3f} x {1 + s['max_ppl_increase']:g})",
        f"KV at {s['seq_len']} tokens: {size(c['kv_bytes'])} vs {size(c['kv_bytes_full'])} for full "
        f"attention ({c['kv_bytes'] / c['kv_bytes_full']:.1%})",
        "curve walked: " + ", ".join(f"b{r['budget']} {r['ppl']:.3f}{'' if r['passes'] else ' x'}"
                                     for r in walked) + " (x: misses the target)",
    ]
    if c.get("at_budget_min"):
        lines.append(f"note: --budget-min {s['budget_min']} already passes; a smaller budget may too "
                     "(lower --budget-min to look)")
    out = Path(state["out_dir"])
    lines += [f"{len(walked)} probes, total wall time {state['wall_s']:.0f} s",
              f"wrote {c['allocation']}, {out / 'search.json'} and {out / 'search.png'}"]
    return "\n".join(lines)
