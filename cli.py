"""headkv's command line: each command reads its config dataclass (defaults < YAML ``--config`` < flags; see
:mod:`alloc.config`), calls the library and writes one artifact.

| command  | library                                           | artifact                                      |
|----------|---------------------------------------------------|-----------------------------------------------|
| evaluate | alloc.evaluate.evaluate, alloc.streaming.run_streams | JSON lines in a results file               |
| classify | classify.sensitivity.classify_model               | head profile JSON                             |
| sweep    | alloc.sweep.run_sweep                             | JSON lines, one per configuration (resumable) |
| plot     | alloc.plots.plot_results                          | PNG figures (sweeps, passkey or search file)  |
| train    | alloc.runs.open_run, alloc.train.fit              | run dir: checkpoint, allocation.json, heatmap |
| export   | alloc.train.export_checkpoint                     | allocation JSON (learned, any budget)         |
| quantize | alloc.quantize.quantize                           | allocation JSON with K (sink, window) classes |
| fill     | models.dynamic.Fill, Allocation.filled            | allocation JSON with dynamic windows          |
| generate | alloc.generate.generate_rows                      | text + KV bytes held, or JSON lines per prompt |
| passkey  | alloc.passkey.run_passkey_file                    | JSON lines (resumable) + heatmaps             |
| search   | alloc.search.run_search                           | search.json (resumable), allocation.json, PNG |

Bad input ends with one ``error: ...`` line on stderr and exit code 2, never a traceback, before any compute.
"""

from __future__ import annotations

import inspect
import logging
import os
import sys
import time
import typing
from dataclasses import fields
from typing import Any, Callable, Optional

import typer

from headkv.alloc.config import (
    ClassifyConfig,
    ConfigError,
    EvaluateConfig,
    ExportConfig,
    FillConfig,
    GenerateConfig,
    PasskeyConfig,
    PlotConfig,
    QuantizeConfig,
    SearchConfig,
    SweepConfig,
    TrainConfig,
    check_device,
    check_out,
    check_output,
    load,
)
from headkv.models.common import HeadkvError, one_line

app = typer.Typer(help="Head-aware KV-cache compression: classify heads, evaluate, learn and deploy per-head "
                  "sink+window allocations.", no_args_is_help=True, add_completion=False,
                  pretty_exceptions_enable=False)
_RESUME = {"hint": "nothing was written"}  # what Ctrl-C reports: set by a command before its first write


@app.callback()
def _root() -> None:
    """headkv: head-aware KV-cache compression."""


def main() -> None:
    """Console entry point: bad input becomes one ``error:`` line and exit 2; Ctrl-C says what was kept."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        code = app(standalone_mode=False)
    except typer.TyperException as e:  # the option parser's usage errors (typer's own click)
        if type(e).__name__ == "NoArgsIsHelpError":
            sys.exit(typer.echo(e.format_message()) or 0)
        sys.exit(typer.echo(f"error: {one_line(e.format_message() or type(e).__name__)}", err=True) or 2)
    except (HeadkvError, OSError) as e:
        sys.exit(typer.echo(f"error: {one_line(str(e) or type(e).__name__)}", err=True) or 2)
    except (KeyboardInterrupt, typer.Abort):
        typer.echo(f"interrupted: {_RESUME['hint']}", err=True)
        sys.exit(130)
    except Exception as e:  # a bug, not bad input: still one line unless asked for the traceback
        if os.environ.get("HEADKV_DEBUG"):
            raise
        typer.echo(f"error: internal {type(e).__name__}: {one_line(str(e))} "
                   "(HEADKV_DEBUG=1 shows the traceback)", err=True)
        sys.exit(1)
    if code == 130:  # typer turns Ctrl-C into exit code 130
        typer.echo(f"interrupted: {_RESUME['hint']}", err=True)
    sys.exit(code if isinstance(code, int) else 0)


def command(cls: type, *, config_arg: bool = False, extra: Callable[..., Any] | None = None):
    """Register ``run(cfg)`` as a command whose flags are the fields of ``cls`` (help and default stated once,
    in the dataclass); ``--config`` (or a positional CONFIG) loads a YAML file of the same keys."""

    def deco(run: Callable[..., None]) -> Callable[..., None]:
        hints, params, kw_only = typing.get_type_hints(cls), [], inspect.Parameter.KEYWORD_ONLY
        for f in (f for f in fields(cls) if hints[f.name] is not dict):  # a dict (a sweep's grid): YAML only
            meta, tp = f.metadata, hints[f.name]
            shown = "" if f.default in (None, "") else f" [default: {f.default}]"
            flag = f"--{f.name.replace('_', '-')}"
            names = [f"{flag}/--no-{flag[2:]}"] if tp is bool else [flag, *([meta["flag"]] if "flag" in meta else [])]
            default = (typer.Argument(None, help=meta.get("help", ""), show_default=False) if meta.get("arg") else
                       typer.Option(None, *names, help=meta.get("help", "") + shown, show_default=False))
            params.append(inspect.Parameter(f.name, kw_only, default=default, annotation=Optional[tp]))
        cfg_help = "YAML file with any of these options; flags override it."
        if config_arg:  # `headkv sweep CONFIG` (or --config CONFIG)
            params.append(inspect.Parameter("config_file", kw_only, annotation=Optional[str],
                                            default=typer.Argument(None, help=cfg_help, show_default=False)))
        params.append(inspect.Parameter("config", kw_only, default=typer.Option(None, "--config", help=cfg_help),
                                        annotation=Optional[str]))
        extras = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY)  # extra(cls, config, given, run, **options)
                  for p in list(inspect.signature(extra).parameters.values())[4:]] if extra else []

        def cmd(**kw: Any) -> None:
            more = {p.name: kw.pop(p.name) for p in extras}
            config = kw.pop("config") or kw.pop("config_file", None)
            kw.pop("config_file", None)
            run(load(cls, config, kw), **more) if not extra else extra(cls, config, kw, run, **more)

        params += extras
        cmd.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        cmd.__annotations__ = {p.name: p.annotation for p in params}
        cmd.__doc__, cmd.__name__ = run.__doc__, run.__name__
        app.command(run.__name__)(cmd)
        return run

    return deco


# ---- shared steps -------------------------------------------------------------------------------------------
def _load_model(cfg: Any, seq_len: int | None = None):
    """Model + tokenizer, after the device is checked; refuse a block beyond the model's positions."""
    import torch

    from headkv.models.loading import load_model, model_shape

    check_device(cfg.device)
    lm, tok = load_model(cfg.model, cfg.device, getattr(torch, cfg.dtype) if cfg.dtype else None)
    limit = model_shape(lm).max_positions
    if seq_len is not None and seq_len > limit:
        raise ConfigError(f"--seq-len {seq_len} exceeds the model's {limit} positions")
    return lm, tok


def _entries(lm: Any, names: list[str], files: list[str], profile: Optional[str], controls=()) -> list[Any]:
    """Every policy name and allocation file (and its controls), resolved and checked against the model."""
    from headkv.alloc.policies import PolicyContext, needs_profile, resolve
    from headkv.models.loading import model_shape

    shape, prof = model_shape(lm), None
    if profile and any(n != "full" and needs_profile(n) for n in names):
        from headkv.classify.profile import HeadProfile

        prof = HeadProfile.load(profile)
        prof.check_model(shape)
    ctx = PolicyContext(shape.shape, shape.q_per_kv, shape.model_id, prof, shape.native)
    return resolve(ctx, names, files, controls)


def _bos(tokenizer: Any) -> bool:  # blocks, streams and prompts start with BOS: the tokenizer adds one
    from headkv.models.text import bos_id

    return bos_id(tokenizer) is not None


def _bar(label: str, length: int) -> Any:
    return typer.progressbar(length=length, label=f"{label:28s}", file=sys.stderr)


def _stage_bars() -> Callable[[str, int, int], None]:
    """``progress(stage, i, n)``: one progress bar per stage (i of n done), closed at its last step."""
    bars: dict[str, Any] = {}

    def progress(stage: str, i: int, n: int) -> None:
        if stage not in bars:
            bars[stage] = _bar(stage, n).__enter__()
        bars[stage].update(i - bars[stage].pos)
        if i == n:
            bars.pop(stage).__exit__(None, None, None)

    return progress


def _stamp() -> dict[str, Any]:
    from headkv.alloc.results import versions

    return {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "versions": versions()}


# ---- commands -----------------------------------------------------------------------------------------------
@command(EvaluateConfig)
def evaluate(cfg: EvaluateConfig) -> None:
    """Score full attention and per-head allocations with the one evaluator, print a table, append JSON lines."""
    from headkv.alloc.evaluate import blocks_for, result_table
    from headkv.alloc.evaluate import evaluate as run_eval
    from headkv.alloc.results import append_row, done_keys, measurement_key, model_identity, tokens_digest

    check_out(cfg, "results")
    lm, tok = _load_model(cfg, cfg.seq_len if cfg.mode == "masked" else None)
    entries = _entries(lm, list(cfg.policy) or ([] if cfg.allocation else ["full"]), cfg.allocation, cfg.profile)
    _RESUME["hint"] = f"finished rows are kept in {cfg.out}"
    if cfg.mode == "streaming":
        return _evaluate_streaming(cfg, lm, tok, entries)
    blocks = blocks_for(tok, cfg.corpus, cfg.split, cfg.tokens, cfg.seq_len, cfg.encoding)
    conditions = {"kind": "evaluate", **model_identity(lm), "tokens_digest": tokens_digest(blocks), "bos": _bos(tok)}
    results, done = [], done_keys(cfg.out, "evaluate")
    for e in entries:
        key = measurement_key(e.allocation, conditions)
        if key in done:  # a rerun resumes: the rows measured before are kept, not written twice
            typer.echo(f"{e.label}: already measured in {cfg.out}, skipped (use another --out to rerun)", err=True)
            continue
        with _bar(e.label, len(blocks)) as bar:
            res = run_eval(lm, e.allocation, blocks, name=e.label, progress=lambda i, n: bar.update(1),
                           backend=cfg.attention)
        results.append(res)
        append_row(cfg.out, {"model": cfg.model, "corpus": cfg.corpus, "split": cfg.split, **conditions,
                             "key": key, **e.source, **res.to_dict(),
                             **_stamp()})
    typer.echo("\n".join(result_table(results)))
    typer.echo(f"appended {len(results)} row(s) to {cfg.out}")


def _evaluate_streaming(cfg: EvaluateConfig, lm: Any, tok: Any, entries: list[Any]) -> None:
    """``evaluate --mode streaming``: the stream through each allocation's real cache, one row each."""
    from headkv.alloc.streaming import run_streams, stream_table
    from headkv.models.loading import model_shape
    from headkv.models.text import long_stream

    limit = model_shape(lm).max_positions
    if cfg.tokens + 1 > limit and not cfg.reindex:
        typer.echo(f"note: the stream ({cfg.tokens + 1} tokens) runs past the model's {limit} positions "
                   "without --reindex", err=True)
    stream = long_stream(tok, cfg.corpus, cfg.split, cfg.tokens + 1, encoding=cfg.encoding)
    settings = {"model": cfg.model, "corpus": cfg.corpus, "split": cfg.split, "bos": _bos(tok), "reindex": cfg.reindex,
                "chunk": cfg.chunk, "segment": cfg.segment}
    results, skipped = run_streams(lm, entries, stream, cfg.out, settings, _stage_bars())
    for label in skipped:
        typer.echo(f"{label}: already measured in {cfg.out}, skipped (use another --out to rerun)", err=True)
    typer.echo("\n".join(stream_table(results, cfg.segment)))
    typer.echo(f"appended {len(results)} row(s) to {cfg.out}")


@command(ClassifyConfig)
def classify(cfg: ClassifyConfig) -> None:
    """Classify every KV head (positional / mixed / gathering, with a confidence) and write a profile JSON."""
    from headkv.alloc.evaluate import blocks_for
    from headkv.classify.profile import ClassifierRule, HeadProfile
    from headkv.classify.sensitivity import classify_model, report

    rule = ClassifierRule(tau=cfg.tau, gqa=cfg.gqa)
    if cfg.seq_len <= rule.q_from:
        raise ConfigError(f"--seq-len must exceed {rule.q_from}")
    check_out(cfg, ("a head profile", HeadProfile.load))
    lm, tok = _load_model(cfg, max(cfg.seq_len, cfg.sens_seq_len))
    blocks = blocks_for(tok, cfg.corpus, cfg.split, cfg.tokens, cfg.seq_len, cfg.encoding)
    sens_blocks = (blocks_for(tok, cfg.corpus, cfg.split, cfg.sens_tokens, cfg.sens_seq_len, cfg.encoding)
                   if cfg.sensitivity else None)
    meta = {k: getattr(cfg, k) for k in ("model", "corpus", "split", "tokens", "seq_len")}
    prof = classify_model(lm, blocks, rule, meta, sens_blocks, cfg.sens_window, _stage_bars())
    prof.save(cfg.out)
    typer.echo("\n".join(report(prof)))
    typer.echo(f"wrote head profile to {cfg.out}")


def _sweep_load(cls: type, config: Optional[str], given: dict[str, Any], run: Callable[..., None]) -> None:
    if config is None:
        raise ConfigError("give the sweep's YAML config: headkv sweep CONFIG (e.g. configs/ablation.yaml)")
    run(load(cls, config, given))


@command(SweepConfig, config_arg=True, extra=_sweep_load)
def sweep(cfg: SweepConfig) -> None:
    """Run a grid of configurations (resumable), then print each against StreamingLLM at equal Eff.Ctx."""
    from headkv.alloc.evaluate import blocks_for
    from headkv.alloc.frontier import comparison_table
    from headkv.alloc.sweep import expand, run_sweep

    if not cfg.grid:
        raise ConfigError("'grid' must map policy-name templates to their values")
    names = expand(cfg.grid)
    check_out(cfg, "results")
    lm, tok = _load_model(cfg, cfg.seq_len)
    entries = _entries(lm, names, cfg.allocation, cfg.profile, cfg.controls)
    blocks = blocks_for(tok, cfg.corpus, cfg.split, cfg.tokens, cfg.seq_len, cfg.encoding)
    info = {**{k: getattr(cfg, k) for k in ("model", "corpus", "split", "tokens", "seq_len")}, "bos": _bos(tok)}
    _RESUME["hint"] = f"finished rows are kept in {cfg.out}; rerun the same command to resume"
    start = time.perf_counter()
    rows = run_sweep(lm, blocks, entries, cfg.out, info, _stage_bars(), cfg.attention)
    typer.echo("\n".join(comparison_table(rows)))
    typer.echo(f"{len(rows)} configuration(s) in {cfg.out}; this run took {time.perf_counter() - start:.0f} s")


@command(PlotConfig)
def plot(cfg: PlotConfig) -> None:
    """Draw the study's figures, passkey heatmaps or a `headkv search` walk from one results file; from several
    sweep files (one text at one length each), the KV saving by coverage B/N (coverage.png, .json, .md)."""
    from headkv.alloc.plots import plot_results

    for path in plot_results(cfg.results, cfg.out):
        typer.echo(f"wrote {path}")


def _train_load(cls: type, config: Optional[str], given: dict[str, Any], run: Callable[..., None],
                out_dir: Optional[str] = typer.Option(None, help="Run directory (default runs/<run id>)."),
                resume: Optional[str] = typer.Option(None, help="Continue a run: its directory or a checkpoint file.")) -> None:
    """Train options come from TrainConfig (alloc/config.py); a resumed run starts from its saved config."""
    from headkv.alloc.runs import load_checkpoint_meta

    base = load_checkpoint_meta(resume)[0]["config"] if resume is not None else None
    run(load(TrainConfig, config, given, base=base), out_dir=out_dir, resume=resume)


@command(TrainConfig, extra=_train_load)
def train(cfg: TrainConfig, out_dir: Optional[str] = None, resume: Optional[str] = None) -> None:
    """Learn per-head windows under an average-context budget; write a run directory with the checkpoint,
    the exported allocation.json and a window heatmap."""
    from headkv.alloc.runs import open_run
    from headkv.alloc.train import fit
    from headkv.models.loading import load_model, model_shape

    run = open_run(cfg, out_dir, resume)  # the one resume scheme (alloc/runs.py), before anything is written
    run_dir, run_id = run.dir, run.run_id
    check_output(run_dir, directory=True)
    lm, tok = load_model(cfg.model, dtype=cfg.torch_dtype)
    if cfg.seq_len > model_shape(lm).max_positions:
        raise ConfigError(f"--seq-len {cfg.seq_len} exceeds the model's {model_shape(lm).max_positions} positions")
    _RESUME["hint"] = f"checkpoints are kept in {run_dir / 'checkpoints'}; resume with --resume {run_dir}"
    alloc = fit(lm, tok, cfg, run_dir, run_id, resume=run.checkpoint)
    if alloc is None:  # a DDP worker: the main process reports
        return
    _, w = alloc.tensors()
    typer.echo(f"run {run_id}: {alloc.meta['steps']} steps, Eff.Ctx {alloc.eff_ctx():.2f} (budget {cfg.budget:g}); "
               f"windows min {int(w.min())} median {int(w.median())} max {int(w.max())}")
    typer.echo(f"wrote {run_dir / 'allocation.json'} and {run_dir / 'checkpoints' / 'last.ckpt'}")


@command(ExportConfig)
def export(cfg: ExportConfig) -> None:
    """Export learned gates as integer windows with mean Eff.Ctx <= budget (re-solved for that budget)."""
    from headkv.alloc.train import export_checkpoint

    if not cfg.checkpoint:
        raise ConfigError("give the checkpoint: headkv export CHECKPOINT -o FILE")
    check_out(cfg, "allocation")
    shape = None
    if cfg.model is not None:
        from headkv.models.loading import load_model, model_shape

        shape = model_shape(load_model(cfg.model)[0])
    alloc = export_checkpoint(cfg.checkpoint, cfg.budget, shape)
    alloc.save(cfg.out)
    _, w = alloc.tensors()
    typer.echo(f"{alloc.name}: Eff.Ctx {alloc.eff_ctx():.3f}, windows min {int(w.min())} "
               f"median {int(w.median())} max {int(w.max())}; wrote {cfg.out}")


@command(QuantizeConfig)
def quantize(cfg: QuantizeConfig) -> None:
    """Round a per-head allocation to at most K (sink, window) classes under the same budget, with the head
    permutation per layer that makes each class contiguous (a form per-layer/per-group engines can load)."""
    from headkv.alloc.allocation import Allocation
    from headkv.alloc.quantize import quantize as to_classes

    check_out(cfg, "allocation")
    alloc = Allocation.load(cfg.allocation)
    q = to_classes(alloc, cfg.classes)
    q.save(cfg.out)
    typer.echo(f"{q.name}: {len(q.meta['classes'])} classes {q.meta['classes']}, Eff.Ctx {q.eff_ctx():.3f} "
               f"(from {alloc.eff_ctx():.3f}); wrote {cfg.out}")


@command(FillConfig)
def fill(cfg: FillConfig) -> None:
    """Dynamic windows: the same per-head budgets (sink + window), filled by content -- each head keeps its
    sinks, its recent keys and, in the rest of its budget, the older keys its queries attended to most."""
    from headkv.alloc.allocation import Allocation
    from headkv.models.dynamic import Fill

    check_out(cfg, "allocation")
    filled = Allocation.load(cfg.allocation).filled(Fill(cfg.recent, cfg.chunk, cfg.decay))
    filled.save(cfg.out)
    typer.echo(f"{filled.name}: {filled.filled_heads()} of {filled.shape[0] * filled.shape[1]} heads filled by "
               f"content (window >= recent + chunk), Eff.Ctx {filled.eff_ctx():.3f}; wrote {cfg.out}")


@command(GenerateConfig)
def generate(cfg: GenerateConfig) -> None:
    """Greedy generation through the allocation's real per-head cache: one --prompt (prints the text and the KV
    bytes held) or a --prompts file in left-padded batches (one JSON row per prompt in --out)."""
    from headkv.alloc.generate import check_static, encode, generate_rows, read_prompts, save_rows, summary
    from headkv.models.kv_cache import DeployError
    from headkv.models.loading import model_shape

    prompts = [cfg.prompt] if cfg.prompt is not None else read_prompts(cfg.prompts)
    if cfg.out:
        check_out(cfg, "generate")
    lm, tok = _load_model(cfg)
    e = _entries(lm, [cfg.policy] if cfg.policy else [], [cfg.allocation] if cfg.allocation else [], cfg.profile)[0]
    if cfg.reindex and e.allocation is None:
        raise DeployError("--reindex needs an allocation: full attention holds every token")
    ids = encode(tok, prompts, None if cfg.reindex else model_shape(lm).max_positions, cfg.max_new_tokens)
    if cfg.static:
        check_static(ids, cfg.batch_size)
    with _bar("generate", len(ids)) as bar:
        rows = generate_rows(lm, tok, e.allocation, ids, cfg.max_new_tokens, cfg.batch_size, cfg.reindex, bar.update,
                             static=cfg.static)
    if cfg.out:
        return typer.echo(save_rows(cfg.out, prompts, rows, e.label, e.source))
    typer.echo(rows[0]["text"] + "\n" + summary(rows[0], e.label))


@command(PasskeyConfig)
def passkey(cfg: PasskeyConfig) -> None:
    """Passkey retrieval through each allocation's real cache: accuracy per depth x length, heatmaps."""
    from headkv.alloc.passkey import build_tasks, passkey_table, run_passkey_file
    from headkv.alloc.plots import passkey_heatmaps
    from headkv.models.text import long_stream

    check_out(cfg, "results")
    check_output(cfg.plots, directory=True)
    lm, tok = _load_model(cfg, max(cfg.length) + 8)
    entries = _entries(lm, list(cfg.policy) or ([] if cfg.allocation else ["full"]), cfg.allocation, cfg.profile)
    stream = long_stream(tok, cfg.corpus, cfg.split, 8 * max(cfg.length), encoding=cfg.encoding)
    tasks = build_tasks(tok, stream, cfg.length, cfg.depth, cfg.trials, cfg.seed)
    settings = {"model": cfg.model, "corpus": cfg.corpus, "split": cfg.split, "seed": cfg.seed, "bos": _bos(tok)}
    _RESUME["hint"] = f"finished cells are kept in {cfg.out}; rerun the same command to resume"
    rows = run_passkey_file(lm, tok, entries, tasks, cfg.out, settings, batch=cfg.batch, progress=_stage_bars())
    typer.echo("\n".join(passkey_table(rows, [e.label for e in entries], cfg.length)))
    for path in passkey_heatmaps(rows, cfg.plots):
        typer.echo(f"wrote {path}")


@command(SearchConfig)
def search(cfg: SearchConfig) -> None:
    """The smallest average budget whose learned allocation keeps perplexity within --max-ppl-increase of full
    attention's on the eval split: bisection over budgets, each probe trained warm from the nearest one;
    writes search.json (the curve walked), allocation.json and search.png (resumable)."""
    from headkv.alloc.search import prepare, run_search, summary

    plan = prepare(cfg)  # every check that needs no model: one error line, nothing written
    lm, tok = _load_model(cfg, cfg.seq_len)
    _RESUME["hint"] = f"finished probes are kept in {plan.out_dir}; rerun the same command to resume"
    typer.echo(summary(run_search(plan, lm, tok, typer.echo, _stage_bars(), bar=True)))


if __name__ == "__main__":
    main()
