"""headkv's command line: each command reads its options (YAML config, then flags), calls one library
function and writes one artifact.

| command    | library function                        | artifact                       |
|------------|-----------------------------------------|--------------------------------|
| evaluate   | alloc.evaluate.evaluate                 | JSON lines in a results file   |

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
    from models.corpus import CorpusError
    from models.loading import ModelLoadError

    return (AllocationError, CorpusError, ModelLoadError, ConfigError)


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
        rows.append((alloc.meta.get("policy") or Path(f).stem, alloc, {"file": str(f), "file_sha256": file_hash(f)}))
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
    config: Optional[Path] = typer.Option(None, help="YAML file with any of these options; flags override it."),
) -> None:
    """Score full attention and per-head allocations with the one evaluator, print a table, append JSON lines."""
    import torch

    from alloc.evaluate import evaluate as run_eval
    from alloc.results import append_row, versions
    from models.loading import load_model

    s = settings(config, EVALUATE_DEFAULTS, model=model, corpus=corpus, split=split, policy=policy,
                 allocation=allocation, profile=profile, tokens=tokens, seq_len=seq_len, device=device,
                 dtype=dtype, out=out)
    if s["tokens"] < 2 or s["seq_len"] < 2:
        raise ConfigError("--tokens and --seq-len must be at least 2")
    torch_dtype = getattr(torch, s["dtype"]) if s["dtype"] else None
    lm, tok = load_model(s["model"], s["device"], torch_dtype)
    rows = _allocations(lm, list(s["policy"]) or ([] if s["allocation"] else ["full"]), list(s["allocation"]), s["profile"])
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


if __name__ == "__main__":
    main()
