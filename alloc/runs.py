"""Training runs on disk: run ids, run directories, checkpoints, and the one resume scheme.

A run directory holds ``checkpoints/`` (Lightning's, with headkv's run meta under ``CKPT_KEY``), the CSV log,
``allocation.json`` and ``heatmap.png``. A checkpoint is read only with ``torch.load(weights_only=True)``
(:func:`load_checkpoint_meta`). Resuming is one scheme, used by ``headkv train --resume``, by
:func:`headkv.train`, by :func:`alloc.train.fit` and by each probe of ``headkv search``: :func:`open_run`
picks (or continues) the run directory and run id, :func:`resume_point` reads the checkpoint, requires the
state Lightning needs to continue, and refuses a configuration that changes what the run learns
(:func:`check_resume`).
"""

from __future__ import annotations

import os
import pickle
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from headkv.alloc.config import TrainConfig, TrainError

CKPT_KEY = "headkv"
CKPT_VERSION = 1


def run_meta(cfg: TrainConfig, shape: Any, run_id: str) -> dict[str, Any]:
    """What headkv adds to a checkpoint: plain str/int/float/bool/None/list/dict only, so that it loads with
    ``torch.load(weights_only=True)`` (a path-like config value is stored as its string)."""
    config = {k: os.fspath(v) if isinstance(v, os.PathLike) else v for k, v in cfg.to_dict().items()}
    return {
        "version": CKPT_VERSION,
        "config": config,
        "run_id": str(run_id),
        "model_id": str(shape.model_id),
        "shape": [int(n) for n in shape.shape],
        "q_per_kv": int(shape.q_per_kv),
        "native": [int(c) for c in getattr(shape, "native", ())],
    }


def new_run_id(budget: float) -> str:
    """A run id shared by every DDP process of one run (children inherit it through the environment)."""
    return os.environ.setdefault(
        "HEADKV_RUN_ID", f"b{budget:g}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
    )


# Every TrainConfig field that changes what a run learns: a resume must keep them all (check_resume).
RESUME_KEYS = (
    "model",
    "corpus",
    "encoding",
    "budget",
    "sink",
    "sink_max",
    "seq_len",
    "batch_size",
    "max_steps",
    "lr",
    "lr_schedule",
    "lr_end_frac",
    "tau_start",
    "tau_end",
    "tau_schedule",
    "edge",
    "objective",
    "init",
    "n_blocks",
    "passkey_mix",
    "val_blocks",
    "dtype",
    "precision",
    "devices",
    "seed",
)


LIGHTNING_KEYS = ("optimizer_states", "lr_schedulers", "loops")  # what a resume needs beyond the gates


def _unpickling_reason(err: BaseException) -> str:
    """What the safe unpickler refused, from its long message (skipping torch's advice to load unsafely)."""
    skip = ("Weights only load failed", "Please file an issue", "Check the documentation")
    for line in str(err).splitlines():
        line = line.strip()
        if not line or line.startswith(skip):
            continue
        if "GLOBAL " in line:  # "Trying to load unsupported GLOBAL posix.system whose module ..."
            return f"it would call {line.split('GLOBAL ', 1)[1].split()[0]}"
        return line.rstrip(".")
    return "a pickle of objects"


def load_checkpoint_meta(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(run meta, gate state) of a training checkpoint (file or run directory), or one clear TrainError.

    The file is read with ``torch.load(weights_only=True)``: tensors and plain containers only, so no file
    a user passes can run code. Every way it can fail (missing, torn, not a checkpoint, a pickle with
    objects in it, missing keys, wrong types) is a TrainError of one line that names the file. The meta
    gains ``path`` (the checkpoint file), ``global_step`` and ``resumable`` (it also holds the optimizer,
    scheduler and loop state that Lightning needs to continue the run).
    """
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoints" / "last.ckpt"
    if not path.exists():
        raise TrainError(f"checkpoint {path} does not exist")
    if not path.is_file():
        raise TrainError(f"checkpoint {path} is not a file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # objects other than tensors and plain containers: never run them
        why = _unpickling_reason(e)
        raise TrainError(f"cannot read checkpoint {path}: not a plain-tensor checkpoint ({why})") from None
    except Exception as e:  # a torn or foreign file: say so in one line
        text = str(e).strip().splitlines()[0].split(". ")[0] if str(e).strip() else ""
        detail = f"{type(e).__name__}: {text}" if text else type(e).__name__
        why = f"not a torch checkpoint, or a torn one ({detail})"
        raise TrainError(f"cannot read checkpoint {path}: {why}") from None
    if not isinstance(ckpt, dict) or CKPT_KEY not in ckpt or "state_dict" not in ckpt:
        raise TrainError(f"{path} is not a headkv training checkpoint")
    meta, state = ckpt[CKPT_KEY], ckpt["state_dict"]
    if not isinstance(meta, dict) or not isinstance(state, dict):
        raise TrainError(f"{path} is not a headkv training checkpoint (malformed '{CKPT_KEY}' or state_dict)")
    missing = [k for k in ("config", "run_id", "model_id", "shape", "q_per_kv") if k not in meta]
    if "gates.logits" not in state:
        missing.append("gates.logits")
    if missing:
        raise TrainError(f"{path}: checkpoint lacks {', '.join(missing)}")
    shape, logits, step = meta["shape"], state["gates.logits"], ckpt.get("global_step", 0)
    bad = []
    if not isinstance(meta["config"], dict):
        bad.append("config")
    if not isinstance(meta["run_id"], str):
        bad.append("run_id")
    if not isinstance(meta["model_id"], str):
        bad.append("model_id")
    if not (
        isinstance(shape, (list, tuple))
        and len(shape) == 2
        and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape)
    ):
        bad.append("shape")
    if not isinstance(meta["q_per_kv"], int) or isinstance(meta["q_per_kv"], bool) or meta["q_per_kv"] < 1:
        bad.append("q_per_kv")
    if not (
        isinstance(logits, torch.Tensor)
        and logits.is_floating_point()
        and "shape" not in bad
        and tuple(logits.shape) == tuple(shape)
    ):
        bad.append("gates.logits")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        bad.append("global_step")
    sink_logits = state.get("gates.sink_logits")
    learned_sinks = isinstance(meta["config"], dict) and bool(meta["config"].get("sink_max"))
    if learned_sinks != (sink_logits is not None) or not (
        sink_logits is None or isinstance(sink_logits, torch.Tensor) and sink_logits.is_floating_point()
        and "shape" not in bad and tuple(sink_logits.shape) == tuple(shape)
    ):
        bad.append("gates.sink_logits")
    native = meta.get("native", [])
    if not (isinstance(native, list) and all(isinstance(c, int) and not isinstance(c, bool) and c >= 0
                                             for c in native)
            and (not native or "shape" in bad or len(native) == shape[0])):
        bad.append("native")
    if bad:
        raise TrainError(f"{path}: checkpoint has a malformed {', '.join(bad)}")
    try:
        TrainConfig.from_dict(meta["config"])
    except Exception as e:
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TrainError(f"{path}: checkpoint has a bad config: {why}") from None
    resumable = all(isinstance(ckpt.get(k), (dict, list)) for k in LIGHTNING_KEYS)
    meta = {**meta, "shape": list(shape), "path": str(path), "global_step": step, "resumable": resumable}
    return meta, state


def check_resume(saved_config: dict[str, Any], cfg: TrainConfig, path: str | Path = "the checkpoint") -> None:
    """Refuse to resume a run with a configuration that changes what it learns, in one line listing every
    changed key: ``cannot resume <path>: it was trained with batch_size=1, objective=kl; this run asks
    batch_size=2, objective=ce``.

    Compared (``RESUME_KEYS``): everything that changes the trajectory of the gates: the model, corpus,
    budget, sink and seq_len (what is learned), batch_size, max_steps, n_blocks, passkey_mix and val_blocks
    (which blocks are trained on, in which order; max_steps also sets where the tau and lr schedules end), lr,
    lr_schedule, lr_end_frac, tau_start, tau_end, tau_schedule, edge and objective (the optimisation),
    dtype and precision (the numerics), devices (the global batch is batch_size x devices, and the resumed
    data order counts blocks per process) and seed (block order and initialisation).

    Free to change on resume (logistics, not the result): accelerator and strategy (a run may move to
    another machine; only rounding differs), threads, eval_every, log_every and ckpt_every (when things are
    logged, evaluated or saved, never what the gates see), wandb_mode and wandb_project.

    A key missing from ``saved_config`` (a checkpoint older than the key) counts as its default.
    """
    defaults = TrainConfig().to_dict()
    now = cfg.to_dict()
    changed = [k for k in RESUME_KEYS if saved_config.get(k, defaults[k]) != now[k]]
    if changed:
        was = ", ".join(f"{k}={saved_config.get(k, defaults[k])}" for k in changed)
        asks = ", ".join(f"{k}={now[k]}" for k in changed)
        raise TrainError(f"cannot resume {path}: it was trained with {was}; this run asks {asks}")


def resume_run_dir(meta: dict[str, Any]) -> Path:
    """The run directory a checkpoint belongs to (``<run>/checkpoints/<name>.ckpt`` -> ``<run>``), so a
    resumed run writes its checkpoints, CSV, allocation and heatmap beside the ones it continues; a
    TrainError if the checkpoint does not lie in a run directory's checkpoints/ folder."""
    path = Path(os.path.normpath(str(meta.get("path", ""))))
    if path.parent.name != "checkpoints":
        raise TrainError(f"cannot resume {path}: it is not in a run directory (<run>/checkpoints/*.ckpt)")
    return path.parent.parent


def check_same_model(meta: dict[str, Any], shape: Any) -> None:
    if list(meta["shape"]) != list(shape.shape) or meta["q_per_kv"] != shape.q_per_kv:
        raise TrainError(
            f"checkpoint {meta['path']} is from model '{meta['model_id']}' "
            f"({meta['shape'][0]}x{meta['shape'][1]} KV heads), not '{shape.model_id}' "
            f"({shape.n_layers}x{shape.n_kv_heads})"
        )




def resume_point(resume: str | Path, cfg: TrainConfig) -> dict[str, Any]:
    """The run meta of the checkpoint ``resume`` (a file or run directory) that a run with ``cfg`` continues:
    read safely, holding the optimizer, scheduler and loop state, trained with the same configuration
    (:func:`check_resume`); one TrainError otherwise, before anything is written."""
    meta = load_checkpoint_meta(resume)[0]
    if not meta["resumable"]:
        raise TrainError(f"cannot resume {meta['path']}: it holds no optimizer, scheduler and loop state")
    check_resume(meta["config"], cfg, meta["path"])
    return meta


@dataclass
class Run:
    """Where a training run writes and what it continues: its config, directory, id and, when resumed, the
    run meta of the checkpoint it continues from (None for a fresh run)."""

    cfg: TrainConfig
    dir: Path
    run_id: str
    meta: dict[str, Any] | None = None

    @property
    def checkpoint(self) -> str | None:
        """The checkpoint file a resumed run continues from (None: a fresh run)."""
        return None if self.meta is None else self.meta["path"]

    @property
    def finished(self) -> bool:
        """The run reached its last step and exported its allocation (nothing left to train)."""
        return (self.meta is not None and self.meta["global_step"] >= self.cfg.max_steps
                and (self.dir / "allocation.json").is_file())


def open_run(
    cfg: TrainConfig, run_dir: str | Path | None = None, resume: str | Path | dict[str, Any] | None = None,
    run_id: str | None = None,
) -> Run:
    """The run a training call writes: ``resume`` (a checkpoint file, a run directory, or its already read
    run meta) continues that run in its own directory under its own id (:func:`resume_point`,
    :func:`resume_run_dir`); else a fresh run in ``run_dir`` (default ``runs/<run id>``), refused if that
    directory already holds a run. ``run_id`` names a fresh run (default :func:`new_run_id`; a DDP child
    process takes its parent's)."""
    if resume is not None:
        meta = resume if isinstance(resume, dict) else resume_point(resume, cfg)
        return Run(cfg, resume_run_dir(meta), meta["run_id"], meta)
    if run_id is None:
        if "LOCAL_RANK" in os.environ and os.environ.get("HEADKV_RUN_ID"):  # a DDP child: the parent's run
            run_id = os.environ["HEADKV_RUN_ID"]
            if not re.fullmatch(r"[\w.-]+", run_id) or set(run_id) == {"."}:
                raise TrainError(f"HEADKV_RUN_ID {run_id!r} is not a run name "
                                 "(letters, digits, '.', '_', '-')")
        else:
            os.environ.pop("HEADKV_RUN_ID", None)
            run_id = new_run_id(cfg.budget)
    path = Path(run_dir or Path("runs") / run_id)
    if (path / "allocation.json").exists() or (path / "checkpoints").exists():
        raise TrainError(f"{path} already holds a run: pass --resume {path} or another --out-dir")
    return Run(cfg, path, run_id)


def csv_version(run_dir: Path, step: int) -> str:
    """The CSV log's version: "" for the first run in ``run_dir``; a resumed (or crashed and restarted) run
    logs to a new file beside the old one, never into it."""
    if not (run_dir / "csv" / "metrics.csv").exists():
        return ""
    return f"from-step{step}-{time.strftime('%Y%m%d-%H%M%S')}"
