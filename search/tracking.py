"""Experiment tracking: W&B (offline unless the user opts in) and a CSV log, always.

W&B runs offline by default so a search never needs an account or a network: the run folder
lands in ``<run_dir>/wandb/`` and ``wandb sync`` uploads it later. It goes online when the user
sets the usual variables (``WANDB_MODE=online``, or ``WANDB_API_KEY`` without ``WANDB_MODE``),
or ``logger.wandb_mode=online``.

Runs of one sweep share a W&B group: ``logger.group`` (``dipgo search -m`` sets it to the sweep
folder), or the W&B sweep id when a ``wandb agent`` started the run (``configs/wandb_sweep.yaml``).
Under an agent the run id is the agent's, so the run lands in its sweep.
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
        agent = bool(os.environ.get("WANDB_SWEEP_ID"))  # started by `wandb agent`: its run id and sweep
        loggers.append(
            WandbLogger(
                name=run_name,
                project=cfg.logger.project,
                entity=cfg.logger.entity,
                group=wandb_group(cfg.logger.group),
                tags=list(cfg.logger.tags),
                save_dir=str(run_dir),
                offline=(mode == "offline"),
                config=OmegaConf.to_container(cfg, resolve=True),
                id=None if agent else _wandb_id(run_dir),
                resume=None if agent else "allow",
            )
        )
    return loggers


def wandb_group(configured: str | None, env: dict[str, str] | None = None) -> str | None:
    """The W&B group: ``logger.group``, else the W&B sweep of the agent that started this run."""
    env = dict(os.environ) if env is None else env
    if configured:
        return configured
    sweep = env.get("WANDB_SWEEP_ID")
    return f"sweep-{sweep}" if sweep else None


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


def log_artifacts(loggers: list[Logger], run_dir: Path, files: list[Path], name: str) -> None:
    """The run's report, plan and plots as one W&B artifact (type ``dipgo-run``)."""
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            import wandb

            artifact = wandb.Artifact(name="".join(c if c.isalnum() or c in "-_." else "-" for c in name)[:120],
                                      type="dipgo-run")
            for path in files:
                if path.is_file():
                    artifact.add_file(str(path), name=str(path.relative_to(run_dir)))
            logger.experiment.log_artifact(artifact)


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


def log_sweep_report(logger_cfg: DictConfig, sweep_dir: Path, group: str, outputs: dict[str, Path]) -> Path | None:
    """The sweep's Pareto table and plot as one more W&B run in the sweep's group (job type
    ``sweep-report``), offline under ``<sweep_dir>/wandb/`` unless W&B is online; returns its folder."""
    mode = wandb_mode(logger_cfg.wandb_mode) if logger_cfg.wandb else "disabled"
    if mode == "disabled":
        return None
    import json

    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    run = wandb.init(project=logger_cfg.project, entity=logger_cfg.entity, group=group, job_type="sweep-report",
                     name=f"{group}/pareto", dir=str(sweep_dir), mode=mode)
    rows = json.loads(Path(outputs["json"]).read_text())
    columns = ["run", "variant", "target", "macs_ratio", "speedup", "fidelity", "pareto"]
    run.log({
        "sweep/pareto": wandb.Image(str(outputs["plot"])),
        "sweep/table": wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in rows]),
    })
    artifact = wandb.Artifact(name="".join(c if c.isalnum() or c in "-_." else "-" for c in group)[:120],
                              type="dipgo-sweep")
    for path in outputs.values():
        artifact.add_file(str(path))
    if (sweep_dir / "sweep.json").is_file():
        artifact.add_file(str(sweep_dir / "sweep.json"))
    run.log_artifact(artifact)
    folder = Path(run.dir).parent
    run.finish()
    return folder
