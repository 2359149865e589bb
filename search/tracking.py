"""Experiment tracking: W&B (offline unless the user opts in) and a CSV log, always.

W&B runs offline by default so a search never needs an account or a network: the run folder
lands in ``<run_dir>/wandb/`` and ``wandb sync`` uploads it later. It goes online when the user
sets the usual variables (``WANDB_MODE=online``, or ``WANDB_API_KEY`` without ``WANDB_MODE``),
or ``logger.wandb_mode=online``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import CSVLogger, Logger, WandbLogger


def wandb_mode(requested: str, env: dict[str, str] | None = None) -> str:
    """Resolve ``auto`` to ``offline`` or ``online`` from the environment; pass others through."""
    env = dict(os.environ) if env is None else env
    if requested != "auto":
        return requested
    mode = env.get("WANDB_MODE", "").lower()
    if mode in ("online", "run"):
        return "online"
    if mode in ("offline", "dryrun", "disabled"):
        return "offline" if mode != "disabled" else "disabled"
    return "online" if env.get("WANDB_API_KEY") else "offline"


def make_loggers(cfg: DictConfig, run_dir: Path, run_name: str) -> list[Logger]:
    """CSV logger (``<run_dir>/logs/metrics.csv``) plus W&B unless disabled."""
    loggers: list[Logger] = []
    if cfg.logger.csv:
        loggers.append(CSVLogger(save_dir=str(run_dir), name="logs", version=""))
    mode = wandb_mode(cfg.logger.wandb_mode) if cfg.logger.wandb else "disabled"
    if mode != "disabled":
        os.environ.setdefault("WANDB_SILENT", "true")
        loggers.append(
            WandbLogger(
                name=run_name,
                project=cfg.logger.project,
                entity=cfg.logger.entity,
                group=cfg.logger.group,
                tags=list(cfg.logger.tags),
                save_dir=str(run_dir),
                offline=(mode == "offline"),
                config=OmegaConf.to_container(cfg, resolve=True),
                id=_wandb_id(run_dir),
                resume="allow",
            )
        )
    return loggers


def _wandb_id(run_dir: Path) -> str:
    """A W&B run id derived from the run folder, so a resumed search continues the same W&B run."""
    name = f"{run_dir.parent.name}-{run_dir.name}"
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in name)[:120]


def log_images(loggers: list[Logger], images: dict[str, Path]) -> None:
    """Log PNG plots as images to every logger that can take them (W&B)."""
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            for key, path in images.items():
                logger.log_image(key=f"plots/{key}", images=[str(path)])


def log_summary(loggers: list[Logger], summary: dict[str, Any]) -> None:
    """Final scalar metrics (speedup, fidelity...) into the W&B run summary."""
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            for key, value in summary.items():
                if isinstance(value, (int, float)):
                    logger.experiment.summary[key] = value


def finish(loggers: list[Logger]) -> None:
    for logger in loggers:
        logger.finalize("success")
        if isinstance(logger, WandbLogger):
            import wandb

            wandb.finish()
