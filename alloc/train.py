"""Learn per-head windows on a frozen model: a thin LightningModule + DataModule around ``WindowGates``.

Objective (default ``kl``): KL(teacher || student) per next-token distribution, where the teacher is the
same frozen model with full attention (outside ``windowed``; no grad, computed once per block: every
training block is distinct by default) and the student is that model under the gates' soft mask. ``ce``
trains on the language-model loss instead (no teacher forward), ``mix`` on the mean of the two (per token).
CE saves slightly more KV on the training novels' held-out one, KL clearly more on text of other kinds
(README, issue 14), so KL is the default. Only the gate logits are parameters of the module: the frozen model
is held outside the module tree, so checkpoints (and DDP) see the gates only.

Data: blocks of the corpus's TRAIN split (``token_blocks(split="train")``). A few of them, spread over
the split and disjoint from the training blocks, are held out for the periodic hard-export evaluation;
the eval split is never read here. ``passkey_mix`` > 0 replaces that fraction of the training blocks (spread
evenly over the run) with synthetic passkey blocks whose filler is the same TRAIN split and whose question is
followed by its answer (:func:`alloc.passkey.training_blocks`), as DuoAttention trains its retrieval heads.

Logging: loss, tau, Eff.Ctx and its violation of the budget, per-layer window statistics, a window
heatmap (layer x KV head) and the held-out perplexity of the exported allocation; to wandb (online,
offline, or disabled) and always to a CSV file in the run directory.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import secrets
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Iterator

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from headkv.alloc.allocation import Allocation
from headkv.alloc.config import OBJECTIVES, TrainConfig, TrainError
from headkv.alloc.gates import WindowGates
from headkv.models import scoring
from headkv.models.attention import is_clean, windowed
from headkv.models.loading import model_shape

log = logging.getLogger(__name__)
CKPT_KEY = "headkv"
CKPT_VERSION = 1


def tau_at(cfg: TrainConfig, step: int) -> float:
    """The soft-edge temperature at a step: annealed from tau_start to tau_end over max_steps."""
    frac = min(step / max(cfg.max_steps - 1, 1), 1.0)
    if cfg.tau_schedule == "const":
        return cfg.tau_start
    if cfg.tau_schedule == "linear":
        return cfg.tau_start + frac * (cfg.tau_end - cfg.tau_start)
    return cfg.tau_start * (cfg.tau_end / cfg.tau_start) ** frac


def lr_factor(cfg: TrainConfig, step: int) -> float:
    """The learning rate at a step as a fraction of ``lr``: 1 (const) or a cosine from 1 to lr_end_frac."""
    if cfg.lr_schedule == "const":
        return 1.0
    frac = min(step / max(cfg.max_steps - 1, 1), 1.0)
    return cfg.lr_end_frac + (1 - cfg.lr_end_frac) * 0.5 * (1 + math.cos(math.pi * frac))


# The student's decoder layers are recomputed in the backward when the attention scores they would keep,
# estimated as layers x query heads x B x T^2 x 4 bytes, pass this (see distill_loss).
CHECKPOINT_ABOVE = 2 * 2**30


def distill_loss(
    lm: Any,
    gates: WindowGates,
    tokens: torch.Tensor,
    tau: float,
    objective: str = "kl",
    checkpoint: bool | None = None,
    backend: str = "dense",
    edge: str = "linear",
) -> torch.Tensor:
    """Mean per-token loss of the gated model on ``tokens`` (B, T) under the gates' soft mask at ``tau``
    with that :func:`models.window.edge`; gradients reach the gates only.

    Teacher and student are kept as final hidden states; their logits exist ``scoring.CHUNK`` tokens at a
    time, forward and backward (:mod:`models.scoring`), never (B, T, vocab). ``checkpoint`` recomputes each
    decoder layer of the student in the backward instead of keeping its soft-masked attention scores and
    bias (heads x T x T per layer), re-entering ``windowed`` there: about 1.3x the step time, and the step's
    memory no longer grows with T^2 x layers. Default (None): on when those scores would pass
    ``CHECKPOINT_ABOVE`` (SmolLM2-135M: from 2048 tokens at batch 1; 1024 tokens fit in 6 GB without).
    ``backend``: the student's attention kernel (:func:`models.attention.windowed`); "auto"/"flex" take
    FlexAttention with the soft window as a score_mod on CUDA, the dense soft bias on CPU (no backward there).
    """
    if objective not in OBJECTIVES:
        raise TrainError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    if objective in ("kl", "mix"):
        with torch.no_grad():  # the teacher: the same frozen model, full attention
            teacher = scoring.hidden(lm, tokens)  # (B, T, H)
    masks = gates.mask(tau, edge)
    remat = _kept_scores(lm, tokens) > CHECKPOINT_ABOVE if checkpoint is None else checkpoint
    recompute = lambda: _rewindowed(lm, masks, backend)  # noqa: E731
    layers = scoring.checkpointed_layers(lm, recompute) if remat else nullcontext()
    with windowed(lm, masks, backend=backend), layers:
        student = scoring.hidden(lm, tokens)  # (B, T, H)
    if objective == "ce":
        return scoring.chunked_ce(lm, student, tokens)
    kl = scoring.chunked_kl(lm, student, teacher) / (tokens.shape[0] * tokens.shape[1])
    return kl if objective == "kl" else 0.5 * (kl + scoring.chunked_ce(lm, student, tokens))


def _kept_scores(lm: Any, tokens: torch.Tensor) -> int:
    """Bytes of attention scores a student forward keeps for its backward: layers x heads x B x T^2 x 4."""
    shape = model_shape(lm)
    b, t = tokens.shape
    return shape.n_layers * shape.n_kv_heads * shape.q_per_kv * b * t * t * 4


@contextmanager
def _rewindowed(lm: Any, masks: Any, backend: str = "dense") -> Iterator[None]:
    """A checkpointed student layer's recompute: under the same soft mask. The backward usually runs after
    ``windowed`` has exited (Lightning calls it), so it is re-entered for the recompute; inside it (a
    backward within the block) nothing changes."""
    if is_clean(lm):
        with windowed(lm, masks, backend=backend):
            yield
    else:
        yield


class _Blocks(Dataset):
    def __init__(self, blocks: torch.Tensor) -> None:
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.blocks[i]


class TrainBlocks(L.LightningDataModule):
    """Token blocks of the corpus's TRAIN split; a spread-out few are held out for validation.

    Training order is a seeded permutation, read sequentially (rank r of a DDP run takes blocks r, r + n,
    ...), so global batch k is the same blocks whatever the number of processes, and a resumed run
    continues at the first block it has not seen.
    """

    def __init__(self, tokenizer: Any, cfg: TrainConfig, world_size: int = 1) -> None:
        super().__init__()
        self.tokenizer, self.cfg, self.world_size = tokenizer, cfg, world_size
        self.train: torch.Tensor | None = None
        self.val: torch.Tensor | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train is not None:
            return
        from headkv.models.text import token_blocks

        cfg = self.cfg
        n_train = cfg.n_blocks or cfg.max_steps * cfg.batch_size * self.world_size
        blocks = token_blocks(
            self.tokenizer,
            cfg.corpus,
            split="train",
            seq_len=cfg.seq_len,
            n_blocks=n_train + cfg.val_blocks,
            seed=cfg.seed,
            encoding=cfg.encoding,
        )
        n = len(blocks)
        held = {int((i + 0.5) * n / cfg.val_blocks) for i in range(cfg.val_blocks)}
        self.val = blocks[sorted(held)]
        train = blocks[[i for i in range(n) if i not in held]]
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed))
        self.train = train[order]
        n_passkey = round(cfg.passkey_mix * len(train))
        if n_passkey:  # spread evenly over the run, in place of text blocks
            from headkv.alloc.passkey import training_blocks
            from headkv.models.text import tokenized_split

            stream = tokenized_split(self.tokenizer, cfg.corpus, "train", encoding=cfg.encoding).ids
            at = [int((i + 0.5) * len(train) / n_passkey) for i in range(n_passkey)]
            self.train[at] = training_blocks(self.tokenizer, stream, cfg.seq_len, n_passkey, cfg.seed)

    def train_dataloader(self) -> DataLoader:
        # A resumed run restarts the epoch at the restored batch index without skipping data, so rotate the
        # order to begin at the next unseen block (reloaded every epoch; the offset is 0 on a fresh epoch).
        seen = self.trainer.global_step * self.cfg.batch_size * self.world_size if self.trainer else 0
        data = _Blocks(self.train.roll(-(seen % len(self.train)), dims=0))
        sampler = None
        if self.trainer is not None and self.trainer.world_size > 1:  # Lightning's own would shuffle
            sampler = DistributedSampler(
                data, self.trainer.world_size, self.trainer.global_rank, shuffle=False
            )
        return DataLoader(data, batch_size=self.cfg.batch_size, shuffle=False, sampler=sampler)


class GateModule(L.LightningModule):
    """The gates (the only parameters) around a frozen model held outside the module tree."""

    def __init__(
        self, lm: Any, cfg: TrainConfig, run_id: str, val_blocks: torch.Tensor | None = None,
        init: Allocation | None = None,
    ) -> None:
        super().__init__()
        shape = model_shape(lm)
        self.cfg, self.run_id, self.model_shape = cfg, run_id, shape
        object.__setattr__(self, "lm", lm)  # not a submodule: never checkpointed, never wrapped by DDP
        self.gates = WindowGates(shape.shape, float(cfg.budget), cfg.seq_len, cfg.sink, shape.native,
                                 cfg.sink_max)
        if init is not None:  # warm start (cfg.init, loaded by fit; a resume loads its logits over these)
            self.gates.warm_start(init)
        self.val_blocks = val_blocks
        self.history: list[dict[str, float]] = []

    def on_fit_start(self) -> None:
        self.lm.to(self.device)
        if self.global_step == 0:
            self._hard_eval()  # step 0 is StreamingLLM at the budget: the reference the run must beat

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        tau = tau_at(self.cfg, self.global_step)
        loss = distill_loss(self.lm, self.gates, batch, tau, self.cfg.objective, backend=self.cfg.attention,
                            edge=self.cfg.edge)
        eff = self.gates.eff_ctx()
        self.log_dict(
            {
                "train/loss": loss.detach(),
                "train/tau": tau,
                "train/lr": self.cfg.lr * lr_factor(self.cfg, self.global_step),
                "budget/eff_ctx": eff,
                "budget/violation": eff - self.gates.budget,
            },
            prog_bar=True,
            batch_size=batch.shape[0],
        )
        if self.global_step % self.cfg.log_every == 0:
            self._log_windows()
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.global_step % self.cfg.eval_every == 0 or self.global_step >= self.cfg.max_steps:
            self._hard_eval()

    def configure_optimizers(self) -> dict[str, Any]:
        opt = torch.optim.Adam(self.gates.parameters(), lr=self.cfg.lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(self.cfg, step))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CKPT_KEY] = run_meta(self.cfg, self.model_shape, self.run_id)

    def export(self, budget: float | None = None) -> Allocation:
        return self.gates.export(
            budget,
            model_id=self.model_shape.model_id,
            q_per_kv=self.model_shape.q_per_kv,
            model=self.cfg.model,
            steps=int(self.global_step),
            run_id=self.run_id,
            objective=self.cfg.objective,
            corpus=self.cfg.corpus,
        )

    def _log_windows(self) -> None:
        w = self.gates.windows().detach()  # (L, H)
        stats = {f"windows/layer{i:02d}_mean": float(row.mean()) for i, row in enumerate(w)}
        stats.update({f"windows/layer{i:02d}_max": float(row.max()) for i, row in enumerate(w)})
        stats.update(
            {
                "windows/min": float(w.min()),
                "windows/median": float(w.median()),
                "windows/max": float(w.max()),
            }
        )
        if self.gates.sink_max:
            s = self.gates.sinks().detach()
            stats.update({"sinks/mean": float(s.double().mean()), "sinks/max": float(s.max())})
        self.log_dict(stats, batch_size=1)

    def _hard_eval(self) -> None:
        """Export at the budget and score the held-out TRAIN-split blocks with the one evaluator."""
        if self.val_blocks is None or not len(self.val_blocks) or not self.trainer.is_global_zero:
            return
        from headkv.alloc.evaluate import evaluate

        alloc = self.export()
        res = evaluate(self.lm, alloc, self.val_blocks)
        row = {"step": int(self.global_step), "val/ppl": res.ppl, "val/eff_ctx": res.eff_ctx}
        self.history.append(row)
        log.info("step %d: held-out PPL %.3f at Eff.Ctx %.2f", row["step"], res.ppl, res.eff_ctx)
        for logger in self.loggers:
            logger.log_metrics({k: v for k, v in row.items() if k != "step"}, step=row["step"])
        log_heatmap(self.loggers, alloc, self.trainer.default_root_dir, row["step"])


def load_init(path: str | Path, shape: Any) -> Allocation:
    """The allocation a run warm-starts from, checked against the model: one TrainError line otherwise."""
    from headkv.alloc.allocation import AllocationError

    try:
        alloc = Allocation.load(path)
        alloc.check_model(shape.model_id, shape.shape, shape.q_per_kv)
    except AllocationError as e:
        raise TrainError(f"--init: {e}") from None
    return alloc


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


def log_heatmap(loggers: list[Any], alloc: Allocation, root: str | Path, step: int) -> Path:
    from headkv.alloc.plots import window_heatmap

    path = window_heatmap(
        alloc, Path(root) / "heatmap.png", f"{alloc.name} step {step}: Eff.Ctx {alloc.eff_ctx():.2f}"
    )
    for logger in loggers:
        if hasattr(logger, "log_image"):
            logger.log_image(key="windows/heatmap", images=[str(path)], step=step)
    return path


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


def export_checkpoint(path: str | Path, budget: float | None = None, model_shape_: Any = None) -> Allocation:
    """Export a checkpoint's gates at ``budget`` (default: the training budget) without the model."""
    meta, state = load_checkpoint_meta(path)
    if model_shape_ is not None:
        check_same_model(meta, model_shape_)
    cfg = TrainConfig.from_dict(meta["config"])
    budget = float(cfg.budget if budget is None else budget)
    native = tuple(int(c) for c in meta.get("native") or ())
    gates = WindowGates(tuple(meta["shape"]), float(cfg.budget), cfg.seq_len, cfg.sink, native, cfg.sink_max)
    gates.load_state_dict({k.removeprefix("gates."): v for k, v in state.items() if k.startswith("gates.")})
    return gates.export(
        budget,
        model_id=meta["model_id"],
        q_per_kv=meta["q_per_kv"],
        model=cfg.model,
        steps=meta["global_step"],
        run_id=meta["run_id"],
        objective=cfg.objective,
        corpus=cfg.corpus,
        trained_budget=cfg.budget,
        checkpoint=meta["path"],
    )


def make_loggers(cfg: TrainConfig, run_dir: Path, run_id: str, csv_version: str = "") -> list[Any]:
    """CSV always (a resumed run writes a new file beside the old one); wandb unless disabled.
    Online without a reachable server falls back to offline."""
    from lightning.pytorch.loggers import CSVLogger

    csv = CSVLogger(run_dir, name="csv", version=csv_version, flush_logs_every_n_steps=cfg.log_every)
    loggers: list[Any] = [csv]
    mode = cfg.wandb_mode
    if mode == "auto":
        mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
    if mode == "disabled":
        return loggers
    kw = dict(
        project=cfg.wandb_project,
        name=run_id,
        id=run_id,
        save_dir=str(run_dir),
        resume="allow",
        config=cfg.to_dict(),
    )
    os.environ.setdefault("WANDB_SILENT", "true")
    if mode == "online":
        wl = _wandb_logger("online", kw)
        if wl is not None:
            return [*loggers, wl]
        log.warning("wandb cannot reach its server: logging offline instead (`wandb sync` later)")
    wl = _wandb_logger("offline", kw)
    return [*loggers, wl] if wl is not None else loggers


def _wandb_logger(mode: str, kw: dict[str, Any]) -> Any:
    """A started WandbLogger, or None (after cleaning up) if wandb cannot start: a run never fails for it."""
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    try:
        settings = wandb.Settings(init_timeout=60) if mode == "online" else None
        wl = WandbLogger(mode=mode, settings=settings, **kw)
        _ = wl.experiment  # start now, so a dead server is found here and not mid-run
        return wl
    except Exception as e:
        log.warning("wandb %s failed: %s", mode, str(e).splitlines()[0] if str(e) else type(e).__name__)
        try:
            wandb.teardown()  # the failed run keeps its id reserved in wandb's service otherwise
        except Exception:
            pass
        return None


def log_artifact(loggers: list[Any], path: Path, alloc: Allocation) -> None:
    """Store the exported allocation as a wandb artifact (offline runs keep it for a later sync)."""
    for logger in loggers:
        if type(logger).__name__ != "WandbLogger":
            continue
        try:
            import wandb

            art = wandb.Artifact(
                f"allocation-{alloc.meta.get('run_id', 'run')}",
                type="allocation",
                metadata={k: v for k, v in alloc.meta.items() if isinstance(v, (int, float, str))},
            )
            art.add_file(str(path))
            logger.experiment.log_artifact(art)
        except Exception as e:
            log.warning("could not log the allocation artifact to wandb: %s", str(e).splitlines()[0])


def _trainer(cfg: TrainConfig, run_dir: Path, loggers: list[Any], callbacks: list[Any], progress: bool):
    from lightning.pytorch.callbacks import ModelCheckpoint

    ckpt = ModelCheckpoint(
        dirpath=run_dir / "checkpoints",
        filename="step{step}",
        save_last=True,
        auto_insert_metric_name=False,
        every_n_train_steps=cfg.ckpt_every,
        save_top_k=1,
    )
    return L.Trainer(
        max_steps=cfg.max_steps,
        accelerator=cfg.accelerator,
        devices=cfg.devices,
        strategy=cfg.strategy,
        precision=cfg.precision,
        logger=loggers,
        callbacks=[ckpt, *callbacks],
        default_root_dir=str(run_dir),
        log_every_n_steps=cfg.log_every,
        enable_progress_bar=progress,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        use_distributed_sampler=False,  # TrainBlocks shards itself, without shuffling
        reload_dataloaders_every_n_epochs=1,  # so a resumed epoch starts at the next unseen block
    )


def fit(
    lm: Any,
    tokenizer: Any,
    cfg: TrainConfig,
    run_dir: str | Path,
    run_id: str,
    resume: str | Path | None = None,
    progress: bool = True,
    callbacks: list[Any] | None = None,
) -> Allocation | None:
    """Train the gates and export them; returns the allocation on the main process (None elsewhere).

    Writes ``run_dir/checkpoints/last.ckpt``, ``run_dir/allocation.json`` and ``run_dir/heatmap.png``.
    ``resume`` (a checkpoint file or run directory) is read safely (``weights_only=True``, here and by
    Lightning) and must have been trained with the same configuration (``check_resume``).
    """
    run_dir = Path(run_dir)
    step = 0
    if resume is not None:  # before anything is written: a bad checkpoint is one TrainError
        meta = load_checkpoint_meta(resume)[0]
        if not meta["resumable"]:
            raise TrainError(f"cannot resume {meta['path']}: it holds no optimizer, scheduler and loop state")
        check_resume(meta["config"], cfg, meta["path"])
        resume, step = meta["path"], meta["global_step"]
    init = load_init(cfg.init, model_shape(lm)) if cfg.init else None  # before anything is written
    if lm.dtype != cfg.torch_dtype:
        have = str(lm.dtype).removeprefix("torch.")
        raise TrainError(f"the model is {have} but the run's dtype is {cfg.dtype}")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    data = TrainBlocks(tokenizer, cfg, world_size=cfg.devices)
    data.setup()
    module = GateModule(lm, cfg, run_id, data.val, init)
    # a resumed (or crashed and restarted) run logs to a new CSV beside the old one, never into it
    fresh = not (run_dir / "csv" / "metrics.csv").exists()
    csv_version = "" if fresh else f"from-step{step}-{time.strftime('%Y%m%d-%H%M%S')}"
    loggers = make_loggers(cfg, run_dir, run_id, csv_version=csv_version)
    trainer = _trainer(cfg, run_dir, loggers, list(callbacks or []), progress)
    trainer.fit(module, datamodule=data, ckpt_path=resume, weights_only=True)
    trainer.save_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    if not trainer.is_global_zero:
        return None
    alloc = module.export()
    path = alloc.save(run_dir / "allocation.json")
    log_heatmap(loggers, alloc, run_dir, int(module.global_step))
    log_artifact(loggers, path, alloc)
    for logger in loggers:
        logger.finalize("success")
    return alloc
