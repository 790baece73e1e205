"""Learn per-head windows on a frozen model: a thin LightningModule + DataModule around ``WindowGates``.

Objective ``kl`` (default: KL from the full-attention teacher, the same frozen model, to the student under
the gates' soft mask), ``ce`` or ``mix``. Only the gate logits are parameters of the module: the frozen
model is held outside the module tree, so checkpoints (and DDP) see the gates only. Data: blocks of the
corpus's TRAIN split (a few held out for the periodic hard-export evaluation); the eval split is never read.
Logging: to wandb (online, offline, or disabled) and always to a CSV file in the run directory.

Design: docs/design.md, section 'Training'; why KL is the default: docs/results.md, section
'Does it transfer to other text?'.
"""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Iterator

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from headkv.alloc.allocation import Allocation
from headkv.alloc.config import OBJECTIVES, TrainConfig, TrainError
from headkv.alloc.gates import WindowGates
from headkv.alloc.loggers import log_artifact, log_heatmap, make_loggers
from headkv.alloc.runs import (
    CKPT_KEY,
    check_same_model,
    csv_version,
    load_checkpoint_meta,
    resume_point,
    run_meta,
)
from headkv.models import scoring
from headkv.models.attention import is_clean, soft_trains_on_flex, windowed
from headkv.models.loading import model_shape

log = logging.getLogger(__name__)


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
    if checkpoint is None:  # the flex path keeps no scores: nothing to recompute
        shape = model_shape(lm)
        checkpoint = _kept_scores(lm, tokens) > CHECKPOINT_ABOVE and not soft_trains_on_flex(
            backend, tokens.shape[1], tokens.device, shape.head_dim, next(lm.parameters()).dtype)
    recompute = lambda: _rewindowed(lm, masks, backend)  # noqa: E731
    layers = scoring.checkpointed_layers(lm, recompute) if checkpoint else nullcontext()
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
        shape = self.model_shape
        return export_gates(self.gates, self.cfg, self.run_id, int(self.global_step), shape.model_id,
                            shape.q_per_kv, budget)

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
    return export_gates(gates, cfg, meta["run_id"], meta["global_step"], meta["model_id"], meta["q_per_kv"],
                        budget, trained_budget=cfg.budget, checkpoint=meta["path"])


def export_gates(
    gates: WindowGates, cfg: TrainConfig, run_id: str, steps: int, model_id: str, q_per_kv: int,
    budget: float | None = None, **extra: Any,
) -> Allocation:
    """The gates as an allocation at ``budget`` (default: the training budget), with the run's meta: the one
    place it is built, for the live run (:meth:`GateModule.export`) and a checkpoint
    (:func:`export_checkpoint`)."""
    return gates.export(budget, model_id=model_id, q_per_kv=q_per_kv, model=cfg.model, steps=int(steps),
                        run_id=run_id, objective=cfg.objective, corpus=cfg.corpus, **extra)


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
        meta = resume_point(resume, cfg)
        check_same_model(meta, model_shape(lm))
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
    loggers = make_loggers(cfg, run_dir, run_id, csv_version=csv_version(run_dir, step))
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
