"""The search entry point: config -> model -> SuperNet -> Lightning -> plan -> report.

Order matters for safety: everything that can be refused (config, model, adapter, resume
folder) is checked before a run directory is claimed, so a refused run never creates or touches
a folder; the plan and report are written atomically at the very end, so a crashed run never
leaves a half-written plan.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import Callback, ModelCheckpoint

from dipgo.errors import ConfigError
from dipgo.files import write_bytes_atomic, write_json_atomic
from dipgo.models.configured import load_configured_model
from dipgo.models.lora import lora_summary
from dipgo.postprocess.plan import Plan
from dipgo.report.kinds import get_reporter
from dipgo.search.budget import budget_plans
from dipgo.search.compose import check_plain_name, load_saved_config, validate_config
from dipgo.search.module import SearchModule
from dipgo.search.progress import FirstStepEstimate, StepProgressBar, describe_search, format_duration
from dipgo.search.tasks import get_task
from dipgo.search.tracking import finish, log_artifacts, log_images, log_summary, make_loggers

RUN_DIR_ENV = "DIPGO_RUN_DIR"
CHECKPOINT_DIR = "checkpoints"
LAST_CKPT = "last.ckpt"


@dataclass
class RunResult:
    """What a finished search leaves behind (all of it also on disk in ``run_dir``)."""

    run_dir: Path
    plan: Plan
    report: dict[str, Any]
    summary: list[str] = field(default_factory=list)


def claim_run_dir(cfg: DictConfig, job_dir: Path | None = None) -> Path:
    """Create a fresh ``<runs_root>/<recipe>/<timestamp>/`` (or ``cfg.run_dir``); never reuse one.

    ``job_dir`` is a folder a launcher created for this run (a point of a Hydra multirun, holding
    only Hydra's ``.hydra/`` and log): it is adopted unless a run was already written into it.
    """
    if job_dir is not None:
        if (job_dir / "config.yaml").exists():
            raise ConfigError(f"{job_dir} already holds a run; a sweep point never overwrites one")
        job_dir.mkdir(parents=True, exist_ok=True)
        return job_dir
    if cfg.run_dir:
        path = Path(cfg.run_dir)
        if path.exists():
            raise ConfigError(f"run_dir {path} already exists; choose a new folder or use resume={path}")
        path.mkdir(parents=True)
        return path
    check_plain_name("recipe_name", cfg.recipe_name)  # also for configs that skipped compose_config
    parent = Path(cfg.runs_root) / cfg.recipe_name
    parent.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    for suffix in [""] + [f"-{i}" for i in range(1, 1000)]:
        path = parent / f"{stamp}{suffix}"
        try:
            path.mkdir()  # atomic claim: two searches started in the same second get different folders
            return path
        except FileExistsError:
            continue
    raise RuntimeError(f"could not claim a run directory under {parent}")


def _spawned_rank_dir() -> Path | None:
    """The run folder of rank 0 when this process is a DDP worker that Lightning launched."""
    rank = int(os.environ.get("LOCAL_RANK", "0") or 0) + int(os.environ.get("NODE_RANK", "0") or 0)
    shared = os.environ.get(RUN_DIR_ENV)
    return Path(shared) if rank > 0 and shared else None


def _check_global_batch(cfg: DictConfig) -> None:
    """Under DDP ``data.batch_size`` is the global batch, split evenly across the processes."""
    devices = cfg.trainer.devices
    count = len(devices) if isinstance(devices, (list, tuple)) or OmegaConf.is_list(devices) else devices
    if "ddp" in str(cfg.trainer.strategy) and isinstance(count, int) and count > 0:
        world = count * int(cfg.trainer.num_nodes)
        if cfg.data.batch_size % world:
            raise ConfigError(
                f"data.batch_size={cfg.data.batch_size} is the global batch and must be divisible by the {world} "
                "DDP processes (trainer.devices x trainer.num_nodes)"
            )


def _launched_rank() -> int:
    """The global rank a cluster scheduler gave this process (Slurm's tasks_per_node > 1), else 0."""
    for key in ("RANK", "SLURM_PROCID"):
        value = os.environ.get(key, "")
        if value.isdigit():
            return int(value)
    return 0


def load_resume(resume: str | Path) -> tuple[DictConfig, Path, Path]:
    """Config, run folder and last checkpoint of a run to continue."""
    run_dir = Path(resume)
    cfg_path, ckpt = run_dir / "config.yaml", run_dir / CHECKPOINT_DIR / LAST_CKPT
    if not cfg_path.is_file():
        raise ConfigError(f"resume={run_dir} is not a dipgo run directory (no config.yaml in it)")
    if not ckpt.is_file():
        raise ConfigError(f"resume={run_dir} has no checkpoint to continue from ({CHECKPOINT_DIR}/{LAST_CKPT} is missing)")
    from dipgo.search.compose import compose_config

    base, _ = compose_config()
    cfg = OmegaConf.merge(base, load_saved_config(cfg_path))
    cfg.resume = None
    validate_config(cfg)
    return cfg, run_dir, ckpt


def run_search(
    cfg: DictConfig,
    *,
    callbacks: Sequence[Callback] = (),
    quiet: bool = False,
    job_dir: Path | None = None,
) -> RunResult:
    """Run one search end to end and return its plan and report.

    ``cfg`` is a composed config (see :func:`dipgo.search.compose.compose_config`); when
    ``cfg.resume`` names a run directory, that run continues from its last checkpoint in place.
    ``job_dir``: the folder a launcher made for this run (see :func:`claim_run_dir`).
    """
    ckpt_path: Path | None = None
    if cfg.resume:
        cfg, run_dir, ckpt_path = load_resume(cfg.resume)
    _check_global_batch(cfg)
    task = get_task(cfg.supernet.kind, cfg)
    loaded = load_configured_model(cfg)
    if cfg.supernet.kind in ("reuse", "joint"):  # the report's FD judge must fit the model: refuse before any work
        from dipgo.report.reuse_eval import check_fd_judge

        check_fd_judge(loaded, cfg.report.get("fd_judge", "auto"))
    supernet = task.build(loaded, cfg)
    prepare = getattr(task, "prepare", None)  # optional: work before the pruner trains (reuse: the learned placement)
    if prepare is not None:
        prepare(supernet, cfg)
    datamodule = task.datamodule(loaded, supernet, cfg)
    if ckpt_path is None and _spawned_rank_dir() is not None:
        run_dir = _spawned_rank_dir()  # a DDP worker re-running the command: join rank 0's run
    elif ckpt_path is None and job_dir is not None and _launched_rank() > 0:
        run_dir = job_dir  # one of N tasks a cluster started for this point (Slurm): rank 0 owns the folder
    elif ckpt_path is None:
        run_dir = claim_run_dir(cfg, job_dir)
        write_bytes_atomic(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True).encode())
    os.environ[RUN_DIR_ENV] = str(run_dir)  # inherited by the DDP workers Lightning launches

    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    module = SearchModule(
        supernet,
        cfg.search,
        seed=cfg.seed,
        max_steps=cfg.trainer.max_steps,
        pool=getattr(datamodule, "pool", None),
        ref_chunk=cfg.data.batch_size,
    )
    talk = cfg.trainer.enable_progress_bar and not quiet and _launched_rank() == 0 and _spawned_rank_dir() is None
    if talk:
        print(describe_search(cfg, loaded, supernet), flush=True)
    loggers = make_loggers(cfg, run_dir, run_name=f"{cfg.recipe_name}/{run_dir.name}")
    checkpoint = ModelCheckpoint(
        dirpath=str(run_dir / CHECKPOINT_DIR),
        save_last=True,
        save_top_k=1,
        every_n_train_steps=cfg.trainer.checkpoint_every_n_steps,
    )
    trainer = pl.Trainer(
        max_steps=cfg.trainer.max_steps,
        max_epochs=-1,
        accelerator=cfg.trainer.accelerator,
        devices=cfg.trainer.devices,
        strategy=cfg.trainer.strategy,
        num_nodes=cfg.trainer.num_nodes,
        precision=cfg.trainer.precision,
        log_every_n_steps=min(cfg.trainer.log_every_n_steps, cfg.data.steps_per_epoch),
        gradient_clip_val=cfg.trainer.gradient_clip_val,
        enable_progress_bar=cfg.trainer.enable_progress_bar and not quiet,
        enable_model_summary=False,
        logger=loggers or False,
        callbacks=[checkpoint, *([StepProgressBar(), FirstStepEstimate()] if talk else []), *callbacks],
        default_root_dir=str(run_dir),
        num_sanity_val_steps=0,
        # the DataModule's StepSampler gives each DDP rank its slice of the global batch itself, so the
        # DDP plan equals the one-process plan for the same data.batch_size and seed
        use_distributed_sampler=False,
    )
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt_path) if ckpt_path else None)
    search_s = time.perf_counter() - t0

    say = print if talk and trainer.is_global_zero else (lambda *_a, **_k: None)
    say(f"dipgo search: pruner done in {format_duration(search_s)}; extracting the plan"
        + (f" and refining it on calibration data (up to {cfg.search.refine.max_evals} hard-plan evaluations)"
           if cfg.search.refine.enabled else ""), flush=True)
    t1 = time.perf_counter()
    probs = module.keep_probabilities()
    plan = task.extract_plan(probs, supernet, cfg)
    # search_seconds: the pruner's training; plan_seconds: extraction + refinement (the rest of a search)
    plan.meta.update({"recipe": cfg.recipe_name, "seed": cfg.seed, "search_seconds": round(search_s, 2),
                      "plan_seconds": round(time.perf_counter() - t1, 2)})
    if loaded.extra.get("lora") is not None:
        plan.meta["lora"] = lora_summary(loaded.extra["lora"])  # what the plan was searched on
    if not trainer.is_global_zero:
        return RunResult(run_dir, plan, {})
    plan.save(run_dir / "plan.json")
    extra = budget_plans(module, task, supernet, cfg, run_dir)  # budget-conditioned pruners only
    say(f"dipgo search: plan written in {format_duration(time.perf_counter() - t1)} ({plan.cost_ratio:.1%} kept); "
        f"measuring it against the full model and {len(cfg.report.baselines)} baseline kinds for the report", flush=True)
    t2 = time.perf_counter()
    reporter = get_reporter(cfg.supernet.kind, task.variant)
    report, plots = reporter.evaluate(loaded, supernet, plan, cfg, run_dir)
    say(f"dipgo search: report done in {format_duration(time.perf_counter() - t2)}", flush=True)
    report = {"recipe": cfg.recipe_name, "run_dir": str(run_dir), "search_seconds": round(search_s, 2),
              "plan_seconds": plan.meta["plan_seconds"], "lora": lora_summary(loaded.extra.get("lora")), **report}
    if extra:
        report["budget_plans"] = {f"{t:g}": {"cost_ratio": p.cost_ratio, "path": f"plans/target_{t:g}.json"} for t, p in extra.items()}
    report["plots"] = {k: str(Path(p).relative_to(run_dir)) for k, p in plots.items()}
    write_json_atomic(run_dir / "report.json", report)
    log_images(loggers, plots)
    log_summary(loggers, {**_flat(report), **_headline(report)})
    log_artifacts(loggers, run_dir, [run_dir / "report.json", run_dir / "plan.json", *map(Path, plots.values())],
                  name=f"{cfg.recipe_name}-{run_dir.parent.name}-{run_dir.name}")
    finish(loggers)
    return RunResult(run_dir, plan, report, reporter.summary_lines(report))


def _headline(report: dict[str, Any]) -> dict[str, Any]:
    """``dipgo/speedup``, ``dipgo/fidelity``...: the plan's numbers, the metrics a W&B sweep optimises."""
    row = next((v for v in report.get("variants", []) if v.get("name") == "dipgo"), {})
    metric = report.get("fidelity_metric", "psnr")
    out = {f"dipgo/{k}": v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if isinstance(row.get(metric), (int, float)):
        out["dipgo/fidelity"] = row[metric]
    return out


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "/"))
        else:
            out[key] = v
    return out
