"""headkv's command line: each command reads its options (YAML config, then flags), calls one library
function and writes one artifact.

| command    | library function                        | artifact                       |
|------------|-----------------------------------------|--------------------------------|
| evaluate   | alloc.evaluate.evaluate                 | JSON lines in a results file   |
| classify   | classify.profile.from_stats (+ classify.sensitivity) | head profile JSON |
| sweep      | alloc.sweep.run_sweep                   | JSON lines, one per configuration (resumable) |
| plot       | alloc.plots.plot_all                    | six PNG figures                |
| train      | alloc.train.fit                         | run dir: checkpoint, allocation.json, heatmap |
| export     | alloc.train.export_checkpoint           | allocation JSON (learned, any budget) |
| evaluate --mode streaming | models.streaming.stream_nll  | JSON lines (kind streaming), PPL per segment |
| generate   | models.passkey.greedy_with_cache        | continuation + KV bytes held, on stdout |
| passkey    | models.passkey.run_passkey              | JSON lines (kind passkey, resumable) + heatmaps |

Bad input ends with one ``error: ...`` line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any, Optional

import typer
import yaml

app = typer.Typer(
    help="Head-aware KV-cache compression: classify heads, evaluate, learn and deploy per-head "
    "sink+window allocations.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """headkv: head-aware KV-cache compression."""


class ConfigError(ValueError):
    """A config file that cannot be used."""


def _known_errors() -> tuple[type[BaseException], ...]:
    from alloc.allocation import AllocationError
    from alloc.gates import GateError
    from alloc.train import TrainError
    from classify.profile import ProfileError
    from models.corpus import CorpusError
    from models.kv_cache import DeployError
    from models.loading import ModelLoadError

    return (AllocationError, CorpusError, ModelLoadError, ConfigError, ProfileError, GateError, TrainError,
            DeployError)


def main() -> None:
    """Console entry point: known errors become one line and exit code 2."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress bars only; errors stay one line
    try:
        app()
    except _known_errors() as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted: finished rows are kept; rerun the same command to resume", err=True)
        sys.exit(130)


def settings(config: Optional[Path], defaults: dict[str, Any], **given: Any) -> dict[str, Any]:
    """Defaults, overridden by the YAML config, overridden by flags given on the command line."""
    cfg: dict[str, Any] = {}
    if config is not None:
        try:
            cfg = yaml.safe_load(config.read_text()) or {}
        except OSError as e:
            raise ConfigError(f"cannot read config {config}: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config {config} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(cfg, dict):
            raise ConfigError(f"config {config} must be a mapping of option names to values")
        unknown = sorted(set(cfg) - set(defaults))
        if unknown:
            raise ConfigError(f"config {config}: unknown key(s) {', '.join(unknown)}")
    out = {**defaults, **cfg}
    out.update({k: v for k, v in given.items() if v is not None and v != []})
    return out


def _blocks_for(tokenizer: Any, corpus: str, split: str, tokens: int, seq_len: int):
    """Evaluation blocks: ``tokens`` input tokens in blocks of ``seq_len``; fewer than one block gives one
    block of ``tokens + 1`` inputs, so exactly ``tokens`` are predicted (the study's 1000-token protocol)."""
    from models.corpus import token_blocks

    if tokens < seq_len:
        seq_len, n_blocks = tokens + 1, 1
    else:
        n_blocks = tokens // seq_len
    return token_blocks(tokenizer, corpus, split=split, seq_len=seq_len, n_blocks=n_blocks)


def _allocations(model: Any, policies: list[str], files: list[str], profile: Optional[str]) -> list[tuple]:
    """(label, allocation or None, provenance) for every requested row; 'full' is full attention."""
    from alloc.allocation import Allocation
    from alloc.policies import PolicyContext, build
    from alloc.results import file_hash
    from models.loading import model_shape

    shape = model_shape(model)
    prof = None
    if profile:
        from classify.profile import HeadProfile

        prof = HeadProfile.load(profile)
        prof.check_model(shape)
    ctx = PolicyContext(shape.shape, shape.q_per_kv, shape.model_id, prof)
    rows: list[tuple] = []
    for name in policies:
        rows.append((name, None, {"policy": "full"}) if name == "full" else (name, build(name, ctx), {"policy": name}))
    for f in files:
        alloc = Allocation.load(f)
        alloc.check_model(shape.model_id, shape.shape, shape.q_per_kv)
        label = alloc.meta.get("policy") or Path(f).stem
        if any(label == r[0] for r in rows):  # e.g. learned_b64 of two seeds: results are keyed by label
            label = f"{label}@{alloc.meta.get('run_id') or Path(f).parent.name or Path(f).stem}"
        rows.append((label, alloc, {"file": str(f), "file_sha256": file_hash(f)}))
    return rows


def _print_table(results: list[Any]) -> None:
    typer.echo(f"{'allocation':28s} {'PPL':>8s} {'95% CI':>17s} {'acc':>7s} {'Eff.Ctx':>8s} {'real':>7s} {'KV':>6s}")
    for r in results:
        ci = f"[{r.ppl_lo:.2f}, {r.ppl_hi:.2f}]"
        kv = r.kv_bytes / r.kv_bytes_full
        typer.echo(
            f"{r.name:28s} {r.ppl:8.3f} {ci:>17s} {100 * r.acc:6.2f}% {r.eff_ctx:8.2f} "
            f"{r.realized_ctx:7.1f} {100 * kv:5.1f}%"
        )


EVALUATE_DEFAULTS = {
    "model": "smollm2-135m",
    "corpus": "austen",
    "split": "eval",
    "policy": [],
    "allocation": [],
    "profile": None,
    "tokens": 8192,
    "seq_len": 1024,
    "device": "cpu",
    "dtype": None,
    "out": "results/evaluate.jsonl",
    "mode": "masked",
    "reindex": False,
    "chunk": 1,
    "segment": 2048,
}


@app.command()
def evaluate(
    model: Optional[str] = typer.Option(None, help="Hub name, local model directory, or smollm2-135m (offline default)."),
    corpus: Optional[str] = typer.Option(None, help="austen (offline default), a .txt file or directory, wikitext-2-raw-v1 or pg19."),
    split: Optional[str] = typer.Option(None, help="Corpus split: eval (default, never used for training) or train."),
    policy: Optional[list[str]] = typer.Option(None, help="Policy name, e.g. B_streaming_128, A_window_64 or full. Repeatable."),
    allocation: Optional[list[str]] = typer.Option(None, help="Allocation JSON file (fixed or learned). Repeatable."),
    profile: Optional[str] = typer.Option(None, help="Head profile JSON from `headkv classify`, for the G/I/J/K families."),
    tokens: Optional[int] = typer.Option(None, help="Input tokens to score (default 8192 = 8 blocks of 1024); 1000 reproduces the study's protocol."),
    seq_len: Optional[int] = typer.Option(None, help="Tokens per block (default 1024)."),
    device: Optional[str] = typer.Option(None, help="cpu (default) or cuda."),
    dtype: Optional[str] = typer.Option(None, help="float32 (CPU default), bfloat16 (GPU default) or float16."),
    out: Optional[Path] = typer.Option(None, help="Results file; one JSON line is appended per evaluation (default results/evaluate.jsonl)."),
    mode: Optional[str] = typer.Option(None, help="masked (default: blocks, masked forward) or streaming (one long stream of --tokens through the real evicting cache)."),
    reindex: Optional[bool] = typer.Option(None, "--reindex/--no-reindex", help="Streaming: StreamingLLM position re-indexing (default off)."),
    chunk: Optional[int] = typer.Option(None, help="Streaming: tokens per forward (default 1 = token by token; any chunk computes the same)."),
    segment: Optional[int] = typer.Option(None, help="Streaming: report PPL per segment of this many tokens (default 2048)."),
    config: Optional[Path] = typer.Option(None, help="YAML file with any of these options; flags override it."),
) -> None:
    """Score full attention and per-head allocations with the one evaluator, print a table, append JSON lines."""
    import torch

    from alloc.evaluate import evaluate as run_eval
    from alloc.results import append_row, versions
    from models.loading import load_model

    s = settings(config, EVALUATE_DEFAULTS, model=model, corpus=corpus, split=split, policy=policy,
                 allocation=allocation, profile=profile, tokens=tokens, seq_len=seq_len, device=device,
                 dtype=dtype, out=out, mode=mode, reindex=reindex, chunk=chunk, segment=segment)
    if s["tokens"] < 2 or s["seq_len"] < 2:
        raise ConfigError("--tokens and --seq-len must be at least 2")
    if s["mode"] not in ("masked", "streaming") or s["chunk"] < 1 or s["segment"] < 1:
        raise ConfigError("--mode must be masked or streaming, --chunk and --segment at least 1")
    if s["reindex"] and s["mode"] != "streaming":
        raise ConfigError("--reindex applies to --mode streaming (the masked evaluator keeps true positions)")
    torch_dtype = getattr(torch, s["dtype"]) if s["dtype"] else None
    lm, tok = load_model(s["model"], s["device"], torch_dtype)
    rows = _allocations(lm, list(s["policy"]) or ([] if s["allocation"] else ["full"]), list(s["allocation"]), s["profile"])
    if s["mode"] == "streaming":
        return _evaluate_streaming(s, lm, tok, rows)
    blocks = _blocks_for(tok, s["corpus"], s["split"], s["tokens"], s["seq_len"])
    results = []
    for label, alloc, provenance in rows:
        with typer.progressbar(length=len(blocks), label=f"{label:28s}", file=sys.stderr) as bar:
            res = run_eval(lm, alloc, blocks, name=label, progress=lambda i, n: bar.update(1))
        results.append(res)
        append_row(s["out"], {
            "kind": "evaluate", "model": s["model"], "corpus": s["corpus"], "split": s["split"],
            "dtype": str(lm.dtype).removeprefix("torch."), "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            **provenance, **res.to_dict(), "versions": versions(),
        })
    _print_table(results)
    typer.echo(f"appended {len(results)} row(s) to {s['out']}")


CLASSIFY_DEFAULTS = {
    "model": "smollm2-135m",
    "corpus": "austen",
    "split": "train",
    "tokens": 4096,
    "seq_len": 1024,
    "tau": 0.2,
    "gqa": "max",
    "sensitivity": True,
    "sens_tokens": 512,
    "sens_seq_len": 256,
    "sens_window": 16,
    "device": "cpu",
    "dtype": None,
    "out": "results/profile.json",
}


def _print_profile(prof: Any) -> None:
    counts = prof.counts()
    total = sum(counts.values())
    typer.echo("class        heads   share  mean conf  confidence histogram (10 bins over [0, 1])")
    pairs = [(lab, c) for lr, cr in zip(prof.labels, prof.confidence, strict=True)
             for lab, c in zip(lr, cr, strict=True)]
    conf = {k: [c for lab, c in pairs if lab == k] for k in counts}
    for k, hist in prof.histogram().items():
        mean = sum(conf[k]) / len(conf[k]) if conf[k] else float("nan")
        typer.echo(f"{k:12s} {counts[k]:5d} {100 * counts[k] / total:6.1f}%  {mean:9.3f}  {hist}")
    rank = prof.meta.get("spearman")
    if rank:
        typer.echo("Spearman rho vs measured head sensitivity (KL when only that KV head is cut):")
        for name, r in rank.items():
            typer.echo(f"  {name:28s} {r['rho']:+.3f}  (p={r['p']:.1e})")
        for k, v in prof.meta["class_sensitivity"].items():
            typer.echo(f"  mean KL {k:12s} {v['mean']:.5f} nats/token (median {v['median']:.5f}, n={v['n']})")


@app.command()
def classify(
    model: Optional[str] = typer.Option(None, help="Hub name, local model directory, or smollm2-135m (offline default)."),
    corpus: Optional[str] = typer.Option(None, help="austen (offline default), a .txt file or directory, wikitext-2-raw-v1 or pg19."),
    split: Optional[str] = typer.Option(None, help="Corpus split for the attention maps (default train)."),
    tokens: Optional[int] = typer.Option(None, help="Tokens of attention maps (default 4096 = 4 blocks of 1024)."),
    seq_len: Optional[int] = typer.Option(None, help="Tokens per block for the attention maps (default 1024)."),
    tau: Optional[float] = typer.Option(None, help="Attention mass a head may lose and still fit its window (default 0.2)."),
    gqa: Optional[str] = typer.Option(None, help="How query heads combine per KV head: max (default) or mean."),
    sensitivity: Optional[bool] = typer.Option(None, "--sensitivity/--no-sensitivity", help="Measure each KV head's sensitivity and the Spearman check (default on)."),
    sens_tokens: Optional[int] = typer.Option(None, help="Tokens for the sensitivity check (default 512)."),
    sens_seq_len: Optional[int] = typer.Option(None, help="Block length for the sensitivity check (default 256)."),
    sens_window: Optional[int] = typer.Option(None, help="Window a head is cut to in the sensitivity check (default 16, sink 4)."),
    device: Optional[str] = typer.Option(None, help="cpu (default) or cuda."),
    dtype: Optional[str] = typer.Option(None, help="float32 (CPU default), bfloat16 or float16."),
    out: Optional[Path] = typer.Option(None, help="Profile JSON to write (default results/profile.json)."),
    config: Optional[Path] = typer.Option(None, help="YAML file with any of these options; flags override it."),
) -> None:
    """Classify every KV head (positional / mixed / gathering, with a confidence) and write a profile JSON."""
    from dataclasses import replace

    import torch

    from classify.profile import ClassifierRule, collect_query_stats, from_stats
    from classify.sensitivity import class_sensitivity, head_sensitivity, rank_report
    from models.loading import load_model, model_shape

    s = settings(config, CLASSIFY_DEFAULTS, model=model, corpus=corpus, split=split, tokens=tokens,
                 seq_len=seq_len, tau=tau, gqa=gqa, sensitivity=sensitivity, sens_tokens=sens_tokens,
                 sens_seq_len=sens_seq_len, sens_window=sens_window, device=device, dtype=dtype, out=out)
    rule = ClassifierRule(tau=float(s["tau"]), gqa=s["gqa"])
    if s["seq_len"] <= rule.q_from or s["tokens"] < s["seq_len"]:
        raise ConfigError(f"--seq-len must exceed {rule.q_from} and --tokens must be at least --seq-len")
    lm, tok = load_model(s["model"], s["device"], getattr(torch, s["dtype"]) if s["dtype"] else None)
    shape = model_shape(lm)
    blocks = _blocks_for(tok, s["corpus"], s["split"], s["tokens"], s["seq_len"])
    with typer.progressbar(length=len(blocks), label=f"{'attention statistics':28s}", file=sys.stderr) as bar:
        qstats = collect_query_stats(lm, blocks, rule, progress=lambda i, n: bar.update(1))
    meta = {k: s[k] for k in ("model", "corpus", "split", "tokens", "seq_len")}
    prof = from_stats(qstats, rule, shape.model_id, shape.q_per_kv, meta)
    if s["sensitivity"]:
        sens_blocks = _blocks_for(tok, s["corpus"], s["split"], s["sens_tokens"], s["sens_seq_len"])
        total = len(sens_blocks) * shape.n_layers * shape.n_kv_heads
        with typer.progressbar(length=total, label=f"{'head sensitivity':28s}", file=sys.stderr) as bar:
            sens = head_sensitivity(lm, sens_blocks, rule.sink, s["sens_window"],
                                    progress=lambda i, n: bar.update(1))
        setup = {"sink": rule.sink, "window": s["sens_window"], "tokens": s["sens_tokens"],
                 "seq_len": s["sens_seq_len"], "unit": "KL nats per predicted token"}
        meta_sens = {"sensitivity_setup": setup, "spearman": rank_report(prof, sens),
                     "class_sensitivity": class_sensitivity(prof, sens)}
        prof = replace(prof, sensitivity=sens.tolist(), meta={**prof.meta, **meta_sens})
    prof.save(s["out"])
    _print_profile(prof)
    typer.echo(f"wrote head profile to {s['out']}")


SWEEP_DEFAULTS = {
    "model": "smollm2-135m",
    "corpus": "austen",
    "split": "eval",
    "tokens": 4096,
    "seq_len": 1024,
    "profile": "results/profile.json",
    "device": "cpu",
    "dtype": None,
    "out": "results/ablation.jsonl",
    "grid": {"full": None},
    "allocations": [],
}


def _print_comparison(rows: list[dict[str, Any]]) -> None:
    from alloc.frontier import compare_all, verdict

    typer.echo(f"{'configuration':24s} {'Eff.Ctx':>8s} {'PPL':>8s} {'95% CI':>17s} {'acc':>7s} "
               f"{'B@ctx':>8s} {'dPPL':>7s} {'95% CI of dPPL':>18s} {'saving':>6s}  verdict")
    by_name = {r["name"]: r for r in rows}
    for c in compare_all(rows):
        r = by_name[c["name"]]
        ci = f"[{r['ppl_lo']:.2f}, {r['ppl_hi']:.2f}]"
        dci = "-" if c["family"] == "B" else f"[{c['delta_lo']:+.2f}, {c['delta_hi']:+.2f}]"
        tag = "frontier" if c["family"] == "B" else verdict(c) + (" (extrap.)" if c["extrapolated"] else "")
        typer.echo(f"{c['name']:24s} {c['eff_ctx']:8.2f} {c['ppl']:8.3f} {ci:>17s} {100 * c['acc']:6.2f}% "
                   f"{c['b_ppl']:8.3f} {c['delta']:+7.3f} {dci:>18s} {c['saving']:5.2f}x  {tag}")


@app.command()
def sweep(
    config: Path = typer.Argument(..., help="YAML: model, corpus, split, tokens, seq_len, profile, out, grid."),
    out: Optional[Path] = typer.Option(None, help="Results JSONL (overrides the config's out)."),
    tokens: Optional[int] = typer.Option(None, help="Input tokens per configuration (overrides the config)."),
    profile: Optional[str] = typer.Option(None, help="Head profile JSON (overrides the config)."),
    model: Optional[str] = typer.Option(None, help="Model (overrides the config)."),
    corpus: Optional[str] = typer.Option(None, help="Corpus (overrides the config)."),
    device: Optional[str] = typer.Option(None, help="cpu (default) or cuda."),
    allocation: Optional[list[str]] = typer.Option(
        None, help="Allocation JSON file (e.g. learned) to add to the grid's rows. Repeatable."),
) -> None:
    """Run a grid of configurations (resumable), then print each against StreamingLLM at equal Eff.Ctx."""
    import torch

    from alloc.policies import PolicyContext, needs_profile
    from alloc.results import file_hash
    from alloc.sweep import expand, run_sweep
    from models.loading import load_model, model_shape

    s = settings(config, SWEEP_DEFAULTS, out=out, tokens=tokens, profile=profile, model=model, corpus=corpus,
                 device=device, allocations=allocation)
    if not isinstance(s["grid"], dict) or not s["grid"]:
        raise ConfigError(f"config {config}: 'grid' must map policy-name templates to their values")
    names = expand(s["grid"])
    prof, prof_sha = None, None
    if any(n != "full" and needs_profile(n) for n in names):
        from classify.profile import HeadProfile

        prof, prof_sha = HeadProfile.load(s["profile"]), file_hash(s["profile"])
    lm, tok = load_model(s["model"], s["device"], getattr(torch, s["dtype"]) if s["dtype"] else None)
    shape = model_shape(lm)
    if prof is not None:
        prof.check_model(shape)
    ctx = PolicyContext(shape.shape, shape.q_per_kv, shape.model_id, prof)
    files = [(label, alloc) for label, alloc, _ in _allocations(lm, [], list(s["allocations"]), None)]
    blocks = _blocks_for(tok, s["corpus"], s["split"], s["tokens"], s["seq_len"])
    info = {k: s[k] for k in ("model", "corpus", "split", "tokens", "seq_len")}
    info.update(profile=s["profile"] if prof else None, profile_sha256=prof_sha,
                dtype=str(lm.dtype).removeprefix("torch."))
    bars: dict[str, Any] = {}

    def progress(name: str, i: int, n: int) -> None:
        if name not in bars:
            bars[name] = typer.progressbar(length=n, label=f"{name:28s}", file=sys.stderr).__enter__()
        bars[name].update(1)
        if i == n:
            bars.pop(name).__exit__(None, None, None)

    start = time.perf_counter()
    rows = run_sweep(lm, blocks, names, ctx, s["out"], info, progress, files)
    _print_comparison(rows)
    took = time.perf_counter() - start
    typer.echo(f"{len(rows)} configuration(s) in {s['out']}; this run took {took:.0f} s")


@app.command()
def plot(
    results: Path = typer.Argument(..., help="Results JSONL written by `headkv sweep`."),
    out: Path = typer.Option(Path("results/figures"), "-o", "--out", help="Folder for the PNG figures."),
) -> None:
    """Draw the study's five figures and the frontier view from a sweep's results, and a passkey accuracy
    heatmap (depth x length) per allocation from `headkv passkey` rows."""
    from alloc.plots import plot_all
    from alloc.results import read_rows
    from alloc.sweep import sweep_rows
    from models.passkey import passkey_heatmaps

    if not results.exists():
        raise ConfigError(f"results file {results} does not exist")
    rows = sweep_rows(results)
    passkey_rows = [r for r in read_rows(results) if r.get("kind") == "passkey"]
    if not rows and not passkey_rows:
        raise ConfigError(f"{results} holds no sweep or passkey rows: run `headkv sweep` or `headkv passkey` first")
    paths = (plot_all(rows, out) if rows else []) + (passkey_heatmaps(passkey_rows, out) if passkey_rows else [])
    for path in paths:
        typer.echo(f"wrote {path}")


TRAIN_FLAGS = ("model", "corpus", "budget", "sink", "seq_len", "batch_size", "max_steps", "lr", "lr_schedule", "tau_start",
               "tau_end", "tau_schedule", "objective", "dtype", "precision", "accelerator", "devices", "strategy",
               "wandb_mode", "threads", "seed")


def _train_run(
    resume: Optional[Path], config: Optional[Path], out_dir: Optional[Path], flags: dict[str, Any]
) -> tuple:
    """(config, run id, run dir, checkpoint meta or None), all checked before anything is written."""
    import os

    from alloc.train import TrainConfig, TrainError, load_checkpoint_meta, new_run_id

    meta, base = None, TrainConfig().to_dict()
    if resume is not None:
        meta, _ = load_checkpoint_meta(resume)
        base = {**base, **meta["config"]}
    cfg = TrainConfig.from_dict(settings(config, base, **flags))
    if meta is not None:
        fixed = ("model", "budget", "sink", "seq_len")
        changed = [k for k in fixed if meta["config"].get(k) != getattr(cfg, k)]
        if changed:
            raise TrainError(f"cannot resume {meta['path']} with a different {', '.join(changed)}")
        run_id = meta["run_id"]
        out_dir = out_dir or Path(meta["path"]).parent.parent
    elif "LOCAL_RANK" in os.environ and os.environ.get("HEADKV_RUN_ID"):  # a DDP child: the parent's run
        run_id = os.environ["HEADKV_RUN_ID"]
    else:
        os.environ.pop("HEADKV_RUN_ID", None)
        run_id = new_run_id(cfg.budget)
    run_dir = out_dir or Path("runs") / run_id
    if meta is None and ((run_dir / "allocation.json").exists() or (run_dir / "checkpoints").exists()):
        raise TrainError(f"{run_dir} already holds a run: pass --resume {run_dir} or another --out-dir")
    return cfg, run_id, run_dir, meta


@app.command()
def train(
    model: Optional[str] = typer.Option(
        None, help="Hub name, local model directory, or smollm2-135m (offline default).",
    ),
    corpus: Optional[str] = typer.Option(
        None, help="Training text (its TRAIN split only): austen (default), a path, ...",
    ),
    budget: Optional[float] = typer.Option(
        None, help="Average Eff.Ctx (sink + mean window) to learn under, e.g. 64.",
    ),
    config: Optional[Path] = typer.Option(
        None, help="YAML with any training option (configs/train.yaml); flags override it.",
    ),
    out_dir: Optional[Path] = typer.Option(None, help="Run directory (default runs/<run id>)."),
    resume: Optional[Path] = typer.Option(None, help="Continue a run: its directory or a checkpoint file."),
    sink: Optional[int] = typer.Option(None, help="Fixed sink tokens of every head (default 4)."),
    seq_len: Optional[int] = typer.Option(None, help="Tokens per training block; also the largest window."),
    batch_size: Optional[int] = typer.Option(None, help="Blocks per device per step."),
    max_steps: Optional[int] = typer.Option(None, help="Optimizer steps."),
    lr: Optional[float] = typer.Option(None, help="Adam learning rate on the gate logits."),
    lr_schedule: Optional[str] = typer.Option(None, help="const or cosine (decays to lr_end_frac x lr)."),
    tau_start: Optional[float] = typer.Option(None, help="Soft-edge temperature at the first step."),
    tau_end: Optional[float] = typer.Option(None, help="Soft-edge temperature at the last step."),
    tau_schedule: Optional[str] = typer.Option(None, help="exp, linear or const."),
    objective: Optional[str] = typer.Option(None, help="kl (distil full attention, default) or ce."),
    dtype: Optional[str] = typer.Option(None, help="The frozen model's dtype in training: float32, bfloat16 or float16 (gates stay float32)."),
    precision: Optional[str] = typer.Option(None, help="Lightning precision, e.g. 32-true or bf16-mixed."),
    accelerator: Optional[str] = typer.Option(None, help="Lightning accelerator: cpu (default), gpu, auto."),
    devices: Optional[int] = typer.Option(None, help="Processes/devices (2 on CPU = DDP over gloo)."),
    strategy: Optional[str] = typer.Option(None, help="Lightning strategy: auto, ddp, ..."),
    wandb_mode: Optional[str] = typer.Option(
        None, help="online, offline or disabled (default: online with WANDB_API_KEY, else offline).",
    ),
    threads: Optional[int] = typer.Option(None, help="torch threads per process (default: torch's choice)."),
    seed: Optional[int] = typer.Option(None, help="Seed for block order and initialisation."),
) -> None:
    """Learn per-head windows under an average-context budget; write a run directory with the checkpoint,
    the exported allocation.json and a window heatmap."""
    from alloc.train import check_same_model, fit
    from models.loading import load_model, model_shape

    flags = {k: v for k, v in locals().items() if k in TRAIN_FLAGS}
    cfg, run_id, run_dir, meta = _train_run(resume, config, out_dir, flags)
    lm, tok = load_model(cfg.model, dtype=cfg.torch_dtype)
    if meta is not None:
        check_same_model(meta, model_shape(lm))
    alloc = fit(lm, tok, cfg, run_dir, run_id, resume=meta["path"] if meta else None)
    if alloc is None:  # a DDP worker: the main process reports
        return
    _, w = alloc.tensors()
    typer.echo(f"run {run_id}: {alloc.meta['steps']} steps, Eff.Ctx {alloc.eff_ctx():.2f} "
               f"(budget {cfg.budget:g}); "
               f"windows min {int(w.min())} median {int(w.median())} max {int(w.max())}")
    typer.echo(f"wrote {run_dir / 'allocation.json'} and {run_dir / 'checkpoints' / 'last.ckpt'}")


@app.command()
def export(
    checkpoint: Path = typer.Argument(..., help="Training checkpoint or run directory of `headkv train`."),
    budget: Optional[float] = typer.Option(
        None, help="Average Eff.Ctx to export at (default: the training budget).",
    ),
    out: Path = typer.Option(..., "-o", "--out", help="Allocation JSON to write."),
    model: Optional[str] = typer.Option(None, help="Also check the checkpoint against this model."),
) -> None:
    """Export learned gates as integer windows with mean Eff.Ctx <= budget (re-solved for that budget)."""
    from alloc.train import export_checkpoint

    shape = None
    if model is not None:
        from models.loading import load_model, model_shape

        shape = model_shape(load_model(model)[0])
    alloc = export_checkpoint(checkpoint, budget, shape)
    alloc.save(out)
    _, w = alloc.tensors()
    typer.echo(f"{alloc.name}: Eff.Ctx {alloc.eff_ctx():.3f}, windows min {int(w.min())} "
               f"median {int(w.median())} max {int(w.max())}; wrote {out}")


# ---- deployment: real evicting cache (issue 5) ---------------------------------------------------


def _stream_key(row: dict[str, Any]) -> tuple:
    keys = ("model", "corpus", "split", "tokens", "name", "reindex", "chunk", "dtype")
    return tuple(row.get(k) for k in keys)


def _evaluate_streaming(s: dict[str, Any], lm: Any, tok: Any, rows: list[tuple]) -> None:
    """``evaluate --mode streaming``: the stream through each allocation's real cache, one row each."""
    from alloc.results import append_row, read_rows, versions
    from models.corpus import long_stream
    from models.loading import model_shape
    from models.streaming import stream_nll

    limit = model_shape(lm).max_positions
    if s["tokens"] + 1 > limit and not s["reindex"]:
        typer.echo(f"note: the stream ({s['tokens'] + 1} tokens) runs past the model's {limit} positions "
                   "without --reindex", err=True)
    stream = long_stream(tok, s["corpus"], s["split"], s["tokens"] + 1)
    dtype = str(lm.dtype).removeprefix("torch.")
    base = {"kind": "streaming", "model": s["model"], "corpus": s["corpus"], "split": s["split"],
            "dtype": dtype, "tokens": s["tokens"], "chunk": s["chunk"]}
    done = {_stream_key(r) for r in read_rows(s["out"])} if Path(s["out"]).exists() else set()
    results = []
    for label, alloc, provenance in rows:
        reindex = bool(s["reindex"]) and alloc is not None  # full attention holds all: nothing to re-index
        if _stream_key({**base, "name": label, "reindex": reindex}) in done:
            typer.echo(f"{label}: already in {s['out']}, skipped (use another --out to rerun)", err=True)
            continue
        with typer.progressbar(length=s["tokens"], label=f"{label:28s}", file=sys.stderr) as bar:
            res = stream_nll(lm, alloc, stream, reindex=reindex, chunk=s["chunk"], segment=s["segment"],
                             name=label, progress=lambda i, n: bar.update(i - bar.pos))
        results.append(res)
        append_row(s["out"], {**base, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **provenance,
                              **res.to_dict(), "versions": versions()})
    typer.echo(f"{'allocation':28s} {'reindex':>7s} {'PPL':>8s} {'acc':>7s} {'KV held':>10s} "
               f"{'predicted':>10s} {'full':>10s}  PPL per {s['segment']}-token segment")
    for r in results:
        segs = " ".join(f"{p:.1f}" for p in r.segment_ppl)
        typer.echo(f"{r.name:28s} {str(r.reindex):>7s} {r.ppl:8.3f} {100 * r.acc:6.2f}% {r.kv_bytes:10d} "
                   f"{r.kv_bytes_predicted:10d} {r.kv_bytes_full:10d}  {segs}")
    typer.echo(f"appended {len(results)} row(s) to {s['out']}")


def _one_allocation(lm: Any, policy: Optional[str], allocation: Optional[str], profile: Optional[str]):
    """(label, allocation or None, provenance) from exactly one of --policy / --allocation."""
    if (policy is None) == (allocation is None):
        raise ConfigError("give exactly one of --allocation FILE or --policy NAME (full = full attention)")
    return _allocations(lm, [policy] if policy else [], [allocation] if allocation else [], profile)[0]


GENERATE_DEFAULTS = {
    "model": "smollm2-135m",
    "policy": None,
    "allocation": None,
    "profile": None,
    "prompt": None,
    "max_new_tokens": 48,
    "reindex": False,
    "device": "cpu",
    "dtype": None,
}


@app.command()
def generate(
    model: Optional[str] = typer.Option(None, help="Hub name, local model directory, or smollm2-135m (offline default)."),
    allocation: Optional[str] = typer.Option(None, help="Allocation JSON file (fixed or learned)."),
    policy: Optional[str] = typer.Option(None, help="Policy name, e.g. B_streaming_128, or full."),
    profile: Optional[str] = typer.Option(None, help="Head profile JSON, for the G/I/J/K families."),
    prompt: Optional[str] = typer.Option(None, help="Text to continue."),
    max_new_tokens: Optional[int] = typer.Option(None, help="Tokens to generate greedily (default 48)."),
    reindex: Optional[bool] = typer.Option(None, "--reindex/--no-reindex", help="StreamingLLM position re-indexing: lets prompts run past the model's context."),
    device: Optional[str] = typer.Option(None, help="cpu (default) or cuda."),
    dtype: Optional[str] = typer.Option(None, help="float32 (CPU default), bfloat16 (GPU default) or float16."),
    config: Optional[Path] = typer.Option(None, help="YAML file with any of these options; flags override it."),
) -> None:
    """Greedy generation through the allocation's real per-head cache; prints the text and KV bytes held."""
    import torch

    from models.kv_cache import DeployError, kv_bytes_of
    from models.loading import load_model, model_shape
    from models.passkey import greedy_with_cache

    s = settings(config, GENERATE_DEFAULTS, model=model, allocation=allocation, policy=policy,
                 profile=profile, prompt=prompt, max_new_tokens=max_new_tokens, reindex=reindex,
                 device=device, dtype=dtype)
    if not s["prompt"]:
        raise ConfigError("--prompt is required")
    if s["max_new_tokens"] < 1:
        raise ConfigError("--max-new-tokens must be at least 1")
    lm, tok = load_model(s["model"], s["device"], getattr(torch, s["dtype"]) if s["dtype"] else None)
    label, alloc, _ = _one_allocation(lm, s["policy"], s["allocation"], s["profile"])
    ids = tok(s["prompt"], return_tensors="pt", add_special_tokens=False)["input_ids"]
    shape = model_shape(lm)
    total = ids.shape[1] + s["max_new_tokens"]
    if s["reindex"] and alloc is None:
        raise DeployError("--reindex needs an allocation: full attention holds every token")
    if total > shape.max_positions and not s["reindex"]:
        raise DeployError(f"prompt ({ids.shape[1]} tokens) + {s['max_new_tokens']} new tokens exceeds the "
                          f"model's {shape.max_positions} positions; shorten it or pass --reindex with an "
                          "allocation")
    new, cache = greedy_with_cache(lm, alloc, ids, s["max_new_tokens"], reindex=bool(s["reindex"]))
    typer.echo(tok.decode(new[0], skip_special_tokens=True))
    held, seen = kv_bytes_of(cache), cache.get_seq_length()
    elt = torch.empty((), dtype=lm.dtype).element_size()
    full = 2 * shape.n_layers * shape.n_kv_heads * seen * shape.head_dim * elt
    predicted = full if alloc is None else alloc.kv_bytes(seen, shape.head_dim, lm.dtype)
    typer.echo(f"[{label}] KV held after {seen} tokens: {held} bytes ({held / 2**20:.2f} MiB; allocation "
               f"predicts {predicted}) vs full attention {full} bytes ({full / 2**20:.2f} MiB): "
               f"{100 * held / full:.1f}%")


PASSKEY_DEFAULTS = {
    "model": "smollm2-135m",
    "corpus": "austen",
    "split": "eval",
    "policy": [],
    "allocation": [],
    "profile": None,
    "lengths": [512, 1024, 2048],
    "depths": [0.0, 0.25, 0.5, 0.75, 1.0],
    "trials": 5,
    "seed": 0,
    "batch": 8,
    "device": "cpu",
    "dtype": None,
    "out": "results/evaluate.jsonl",
    "plots": "results/plots",
}


def _passkey_table(rows: list[dict[str, Any]], labels: list[str], lengths: list[int]) -> None:
    typer.echo(f"{'allocation':28s} " + " ".join(f"{n:>7d}" for n in lengths) + f" {'all':>7s}")
    for label in labels:
        mine = [r for r in rows if r["allocation"] == label and r["length"] in lengths]
        cols = []
        for n in lengths + [None]:
            sel = [r for r in mine if n is None or r["length"] == n]
            ok, tot = sum(r["correct"] for r in sel), sum(r["trials"] for r in sel)
            cols.append(f"{100 * ok / tot:6.1f}%" if tot else f"{'-':>7s}")
        typer.echo(f"{label:28s} " + " ".join(cols))


@app.command()
def passkey(
    model: Optional[str] = typer.Option(None, help="Hub name, local model directory, or smollm2-135m (offline default)."),
    corpus: Optional[str] = typer.Option(None, help="Filler text source (default austen)."),
    split: Optional[str] = typer.Option(None, help="Corpus split for the filler (default eval)."),
    policy: Optional[list[str]] = typer.Option(None, help="Policy name, e.g. B_streaming_128 or full. Repeatable."),
    allocation: Optional[list[str]] = typer.Option(None, help="Allocation JSON file. Repeatable."),
    profile: Optional[str] = typer.Option(None, help="Head profile JSON, for the G/I/J/K families."),
    lengths: Optional[list[int]] = typer.Option(None, "--length", help="Prompt length in tokens. Repeatable (default 512 1024 2048)."),
    depths: Optional[list[float]] = typer.Option(None, "--depth", help="Needle depth in [0, 1]. Repeatable (default 0 .25 .5 .75 1)."),
    trials: Optional[int] = typer.Option(None, help="Tasks per (length, depth) cell (default 5)."),
    seed: Optional[int] = typer.Option(None, help="Seed of the task generator (default 0)."),
    batch: Optional[int] = typer.Option(None, help="Tasks per forward (default 8)."),
    device: Optional[str] = typer.Option(None, help="cpu (default) or cuda."),
    dtype: Optional[str] = typer.Option(None, help="float32 (CPU default), bfloat16 (GPU default) or float16."),
    out: Optional[Path] = typer.Option(None, help="Results file; one JSON line per (allocation, length, depth)."),
    plots: Optional[Path] = typer.Option(None, help="Folder for the accuracy heatmaps (default results/plots)."),
    config: Optional[Path] = typer.Option(None, help="YAML file with any of these options; flags override it."),
) -> None:
    """Passkey retrieval through each allocation's real cache: accuracy per depth x length, heatmaps."""
    import torch

    from alloc.results import append_row, read_rows, versions
    from models.corpus import long_stream
    from models.kv_cache import DeployError
    from models.loading import load_model, model_shape
    from models.passkey import build_tasks, passkey_heatmaps, run_passkey

    s = settings(config, PASSKEY_DEFAULTS, model=model, corpus=corpus, split=split, policy=policy,
                 allocation=allocation, profile=profile, lengths=lengths, depths=depths, trials=trials,
                 seed=seed, batch=batch, device=device, dtype=dtype, out=out, plots=plots)
    if s["trials"] < 1 or s["batch"] < 1 or any(not 0 <= d <= 1 for d in s["depths"]):
        raise ConfigError("--trials and --batch must be >= 1 and every --depth in [0, 1]")
    lm, tok = load_model(s["model"], s["device"], getattr(torch, s["dtype"]) if s["dtype"] else None)
    limit = model_shape(lm).max_positions
    if max(s["lengths"]) + 8 > limit:
        raise DeployError(f"--length {max(s['lengths'])} + 8 answer tokens exceeds the model's {limit} "
                          "positions")
    policies = list(s["policy"]) or ([] if s["allocation"] else ["full"])
    rows = _allocations(lm, policies, list(s["allocation"]), s["profile"])
    tasks = build_tasks(tok, long_stream(tok, s["corpus"], s["split"], 8 * max(s["lengths"])),
                        s["lengths"], s["depths"], s["trials"], s["seed"])
    base = {"kind": "passkey", "model": s["model"], "corpus": s["corpus"], "split": s["split"],
            "seed": s["seed"], "dtype": str(lm.dtype).removeprefix("torch.")}
    old = [r for r in read_rows(s["out"])] if Path(s["out"]).exists() else []
    key = ("model", "corpus", "split", "seed", "dtype", "allocation", "trials")
    for label, alloc, provenance in rows:
        mine = {**base, "allocation": label, "trials": s["trials"]}
        skip = {(r["length"], r["depth"]) for r in old if all(r.get(k) == mine[k] for k in key)}
        extra = {"eff_ctx": alloc.eff_ctx() if alloc is not None else None, **provenance}
        todo = len(tasks) - len(skip & set(tasks))
        with typer.progressbar(length=todo, label=f"{label:28s}", file=sys.stderr) as bar:
            def save(row: dict[str, Any], mine=mine, extra=extra, bar=bar) -> None:
                append_row(s["out"], {**mine, **extra, **row, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                      "versions": versions()})
                bar.update(1)

            run_passkey(lm, tok, alloc, tasks, batch=s["batch"], skip=skip, on_row=save)
    latest = {(r["allocation"], r["length"], r["depth"]): r for r in read_rows(s["out"])
              if r.get("kind") == "passkey" and r.get("model") == s["model"] and r.get("seed") == s["seed"]
              and r.get("trials") == s["trials"]}  # a rerun's row replaces an earlier one
    every = list(latest.values())
    _passkey_table(every, [label for label, _, _ in rows], list(s["lengths"]))
    for path in passkey_heatmaps(every, s["plots"]):
        typer.echo(f"wrote {path}")


if __name__ == "__main__":
    main()
