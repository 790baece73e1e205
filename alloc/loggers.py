"""A training run's loggers: the CSV log always, wandb unless disabled (online, or offline when no server
is reachable; a run never fails for wandb), the window heatmap and the exported allocation as an artifact."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from headkv.alloc.allocation import Allocation
from headkv.alloc.config import TrainConfig

log = logging.getLogger(__name__)


def log_heatmap(loggers: list[Any], alloc: Allocation, root: str | Path, step: int) -> Path:
    from headkv.alloc.plots import window_heatmap

    path = window_heatmap(
        alloc, Path(root) / "heatmap.png", f"{alloc.name} step {step}: Eff.Ctx {alloc.eff_ctx():.2f}"
    )
    for logger in loggers:
        if hasattr(logger, "log_image"):
            logger.log_image(key="windows/heatmap", images=[str(path)], step=step)
    return path


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


