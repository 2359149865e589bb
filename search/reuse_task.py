"""The ``reuse`` gate kind as a search task: DiP-GO timestep feature reuse for diffusers denoisers.

Build: wrap the denoiser into a :class:`~dipgo.supernets.reuse.ReuseSuperNet`. Data: a pool of
noises (+ class labels), or of noises + prompt embeddings for text-to-image pipelines
(``data.kind=prompts``, :mod:`dipgo.search.prompts`). Plan: exact-budget extraction with
dependency repair, refined on calibration data. Export: the plan beside the model source, run on
the plain diffusers model (reused blocks really skipped). Evaluation is the report's part
(:mod:`dipgo.report.reuse_eval`).
"""

from __future__ import annotations

import weakref
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import DictConfig
from torch.utils.data import Dataset

from dipgo.models.configured import load_configured_model
from dipgo.models.io import sample_spec, text_conditioned
from dipgo.postprocess.plan import Plan
from dipgo.search.config import PlacementConfig, ScheduleConfig, config_of
from dipgo.search.data import CalibrationDataModule, NoisePool, collate, map_tensors
from dipgo.search.registry import register_task

if TYPE_CHECKING:
    from dipgo.models.registry import LoadedModel
    from dipgo.supernets.reuse import ReuseSuperNet

# The pool of the last search per denoiser: refine() only sees the SuperNet, and the prompt
# embeddings are worth computing once (weak keys: a dropped model frees its pool).
_POOLS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def calibration_pool(loaded_or_model: Any, cfg: DictConfig) -> Dataset:
    """The search's calibration pool: ``NoisePool`` (``data.kind=diffusion``) or ``PromptPool``
    (``data.kind=prompts``, which needs the ``LoadedModel`` the first time: its text encoders).

    ``ReuseTask.build``/``datamodule`` pass the ``LoadedModel``; ``refine`` passes the denoiser
    and gets the same pool object back.
    """
    is_model = isinstance(loaded_or_model, torch.nn.Module)
    model = loaded_or_model if is_model else loaded_or_model.model
    key = (cfg.data.kind, cfg.data.pool_size, cfg.seed, cfg.data.num_classes, cfg.data.get("prompts_file"))
    cached = _POOLS.get(model)
    if cached is not None and cached[0] == key:
        return cached[1]
    if cfg.data.kind == "prompts":
        from dipgo.search.prompts import prompt_pool

        if is_model:
            raise ValueError("the prompt pool is built from the loaded pipeline (its text encoders): pass the LoadedModel")
        pool: Dataset = prompt_pool(loaded_or_model, cfg.data.pool_size, cfg.seed, prompts_file=cfg.data.prompts_file)
    else:
        shape, num_classes = sample_spec(model)
        if cfg.data.num_classes is not None:
            num_classes = cfg.data.num_classes
        pool = NoisePool(cfg.data.pool_size, shape, cfg.seed, num_classes)
    _POOLS[model] = (key, pool)
    return pool


def reuse_config(cfg: DictConfig, loaded: LoadedModel) -> Any:
    from dipgo.supernets.reuse import ReuseConfig

    scheduler_config = dict(loaded.scheduler.config) if getattr(loaded, "scheduler", None) is not None else None
    return ReuseConfig(
        num_steps=cfg.supernet.num_steps,
        granularity=cfg.supernet.granularity,
        mode=cfg.supernet.mode,
        guidance_scale=cfg.supernet.guidance_scale,
        scheduler=cfg.supernet.scheduler,
        scheduler_config=scheduler_config,
        checkpointing=cfg.supernet.checkpointing,
        truncate_steps=cfg.supernet.truncate_steps,
        forecast_order=cfg.supernet.forecast_order,
        step_gates=cfg.supernet.step_gates,
        whole_step_skip=cfg.supernet.whole_step_skip,
    )


def build_reuse_supernet(loaded: LoadedModel, cfg: DictConfig) -> Any:
    """Reuse gates on ``loaded.model`` (a diffusers UNet or DiT), checked against the data kind;
    no budget check (a joint search spends the budget across kinds)."""
    from dipgo.errors import UnsupportedModelError
    from dipgo.supernets.reuse import apply_reuse

    if loaded.kind not in ("diffusion_unet", "diffusion_dit"):
        raise UnsupportedModelError(
            f"supernet.kind=reuse needs a diffusion denoiser (a diffusers UNet or DiT), but {loaded.source} "
            f"is a {loaded.kind} ({type(loaded.model).__name__})"
        )
    if cfg.data.kind not in ("diffusion", "prompts"):
        raise UnsupportedModelError(
            f"supernet.kind=reuse calibrates on data.kind=diffusion (noise + labels) or prompts (noise + text), not {cfg.data.kind!r}"
        )
    if cfg.data.kind == "diffusion" and text_conditioned(loaded.model):
        raise UnsupportedModelError(
            f"{loaded.source} is a text-conditioned {type(loaded.model).__name__}: use data=prompts (noise + prompt embeddings)"
        )
    try:
        example = collate([calibration_pool(loaded, cfg)[0]])  # one item: the shapes MACs are counted at
    except ValueError as e:  # no text encoders, a bad prompts file: one sentence
        raise UnsupportedModelError(str(e)) from e
    example.pop("index")
    return apply_reuse(loaded.model, reuse_config(cfg, loaded), example)


@register_task("reuse")
class ReuseTask:
    """Timestep feature reuse: one gate per (sampling step, block)."""

    kind = "reuse"
    variant = None

    def validate(self, cfg: DictConfig) -> None:
        """The learned placement is the pruner's start: it needs ``init=prior`` and one budget."""
        from dipgo.errors import ConfigError

        if not cfg.search.placement.enabled:
            return
        if cfg.search.pruner.init != "prior":
            raise ConfigError(f"search.placement.enabled=true learns where the pruner starts, which needs "
                              f"search.pruner.init=prior (got {cfg.search.pruner.init!r})")
        if cfg.search.pruner.budget_conditioned:
            raise ConfigError("search.placement.enabled=true learns one budget's start; "
                              "a budget-conditioned pruner (search.pruner.budget_conditioned=true) has many")

    def build(self, loaded: LoadedModel, cfg: DictConfig) -> Any:
        """The reuse SuperNet, refused before training (so before any run folder exists) when a
        target cannot be reached: the floor (every block reused after step 0) is known once the
        per-block MACs are counted."""
        from dipgo.errors import PlanError
        from dipgo.postprocess.reuse_plan import check_reachable

        supernet = build_reuse_supernet(loaded, cfg)
        try:
            for target in [cfg.search.target, *(cfg.search.get("plan_targets") or [])]:
                check_reachable(supernet, float(target))
        except PlanError:
            supernet.remove()
            raise
        return supernet

    def prepare(self, supernet: ReuseSuperNet, cfg: DictConfig) -> None:
        """Before the pruner trains (not when a report or bench rebuilds the SuperNet): the
        learned placement of the full steps, if ``search.placement.enabled``."""
        if cfg.search.placement.enabled:
            place_steps(supernet, cfg)

    def datamodule(self, loaded: LoadedModel, supernet: ReuseSuperNet, cfg: DictConfig) -> Any:
        return CalibrationDataModule(calibration_pool(loaded, cfg), cfg.data.batch_size, cfg.data.steps_per_epoch,
                                     cfg.seed, cfg.data.num_workers)

    def extract_plan(self, probs: torch.Tensor, supernet: ReuseSuperNet, cfg: DictConfig) -> Plan:
        from dipgo.postprocess.reuse_plan import extract_reuse_plan

        meta = {"scheduler": cfg.supernet.scheduler, "guidance_scale": cfg.supernet.guidance_scale,
                "model_source": cfg.model.name}
        grid = supernet.gate_grid(probs)  # (S, B), row 0 = 1
        meta["keep_probs"] = [[round(float(p), 4) for p in row] for row in grid]
        placement = getattr(supernet, "placement", None)
        if placement is not None:
            meta["placement"] = placement.to_meta()
        plan = extract_reuse_plan(probs, supernet, cfg.search.target, meta=meta)
        if cfg.search.refine.enabled:
            plan = refine(plan, probs, supernet, cfg)
        if cfg.search.schedule.enabled:
            plan = schedule(plan, supernet, cfg)
        return plan

    def export(self, cfg: DictConfig, plan: Plan, out: Path) -> Path:
        from dipgo.postprocess.reuse_subnet import ReuseSubNet

        loaded = load_configured_model(cfg)
        subnet = ReuseSubNet(
            model=loaded.model,
            plan=plan,
            scheduler=cfg.supernet.scheduler,
            scheduler_config=dict(loaded.scheduler.config) if loaded.scheduler is not None else None,
            guidance_scale=cfg.supernet.guidance_scale,
            source=cfg.model.name,
        )
        return subnet.save(out)


def schedule(plan: Plan, supernet: ReuseSuperNet, cfg: DictConfig) -> Plan:
    """The plan, or a learned solver schedule at its MACs when that samples the calibration batch
    closer to the full model (``search.schedule``, see :mod:`dipgo.search.reuse_schedule`)."""
    from dipgo.search.reuse_schedule import search_schedule

    config = config_of(ScheduleConfig, cfg.search.schedule)
    pool = calibration_pool(supernet.model, cfg)
    batch = collate([pool[i] for i in range(min(config.batch, len(pool)))])
    batch.pop("index")
    device = next(supernet.model.parameters()).device
    return search_schedule(plan, supernet, map_tensors(lambda t: t.to(device), batch), config,
                           log=lambda m: print(m, flush=True))


def refine(plan: Plan, probs: torch.Tensor, supernet: ReuseSuperNet, cfg: DictConfig,
           sample_fn: Any = None) -> Plan:
    """The extracted plan refined on calibration data (see :mod:`dipgo.postprocess.reuse_refine`).

    ``sample_fn(batch, grid)``: how a hard plan is sampled (default ``supernet.sample``); a joint
    search passes one that runs the plan on its sparse weights, while the reference stays dense.
    """
    from dipgo.postprocess.reuse_baselines import PLAN_BASELINES, baseline_plans
    from dipgo.postprocess.reuse_refine import (
        PlanSampler,
        RefineConfig,
        fill_slack,
        refine_grid,
        repair,
        whole_steps_grid,
    )
    from dipgo.search.reuse_placement import grid_of

    rc = cfg.search.refine
    config = replace(config_of(RefineConfig, rc), enabled=True)
    pool = calibration_pool(supernet.model, cfg)
    batch = collate([pool[i] for i in range(min(config.batch, len(pool)))])
    batch.pop("index")
    device = next(supernet.model.parameters()).device  # where the search left the model (a GPU)
    batch = map_tensors(lambda t: t.to(device), batch)
    reference = supernet.reference(batch)["output"]
    resumed = PlanSampler(supernet, batch) if sample_fn is None else None  # a joint plan runs other weights

    def score(grid: list[list[bool]]) -> float:
        """Mean per-item log MSE (= minus the mean PSNR, up to constants): the report's metric,
        and less dominated by one hard item than the pooled MSE."""
        out = resumed(grid) if resumed is not None else sample_fn(batch, grid)
        err = ((out - reference) ** 2).flatten(1).mean(1)  # (B,)
        return float(torch.log10(err.clamp_min(1e-20)).mean())

    target = plan.target
    slot_probs = supernet.gate_grid(torch.as_tensor(probs, dtype=torch.float64).reshape(-1))[1:]  # (S-1, B)
    pruner_compute, stage = plan.compute, {}
    placement = getattr(supernet, "placement", None)
    if placement is not None and placement.target == target:
        # the pruner's two stages each give a plan: the learned placement (whole steps) and the
        # gates trained from it; the gates can undo a good placement (docs/RESULTS.md), so the
        # pruner's plan is the one that samples the calibration batch closer to the full model
        placed = fill_slack(supernet, repair(supernet, grid_of(placement.rows, supernet.num_steps, len(supernet.units)),
                                             slot_probs, target), slot_probs, target)
        stage = {"gates": score(plan.compute), "placement": score(placed)}
        if stage["placement"] < stage["gates"]:
            pruner_compute = (supernet.effective(torch.tensor(placed, dtype=torch.float64)) > 0.5).tolist()
    seeds = {"learned": pruner_compute}
    if "whole_steps" in config.seeds:
        seeds["whole_steps"] = whole_steps_grid(supernet, target)
    static = [n for n in config.seeds if n in PLAN_BASELINES]  # other kinds' seed names are ignored
    if static:
        plans, _ = baseline_plans(supernet, target, static, calib_batch=batch, seed=cfg.seed)
        seeds.update({n: p.compute for n, p in plans.items()})  # refine_grid repairs any over budget
    grid, info = refine_grid(supernet, seeds, slot_probs, target, score, config, seed=cfg.seed)
    # the pruner's own plan, kept so the report can show what the refinement added
    info["pruner_compute"], info["pruner_cost_ratio"] = pruner_compute, supernet.plan_cost(pruner_compute)
    if stage:
        info["pruner_stage_scores"] = {k: round(v, 6) for k, v in stage.items()}
        info["pruner_stage"] = min(stage, key=stage.get)
    if resumed is not None and resumed.steps_total:  # how much of the plans' steps really ran
        info["steps_run_fraction"] = round(resumed.steps_run / resumed.steps_total, 4)
    plan.compute = (supernet.effective(torch.tensor(grid, dtype=torch.float64)) > 0.5).tolist()
    plan.cost_ratio = supernet.plan_cost(plan.compute)
    plan.meta["refine"] = info
    return plan


def place_steps(supernet: ReuseSuperNet, cfg: DictConfig) -> None:
    """Learn where the pruner's start schedule puts its full steps (``search.placement``, see
    :mod:`dipgo.search.reuse_placement`) and make it the ``init=prior`` start of the target."""
    from dipgo.search.reuse_placement import learn_placement

    config = config_of(PlacementConfig, cfg.search.placement)
    pool = calibration_pool(supernet.model, cfg)
    batch = collate([pool[i] for i in range(min(config.batch, len(pool)))])
    batch.pop("index")
    device = next(supernet.model.parameters()).device
    batch = map_tensors(lambda t: t.to(device), batch)
    target = float(cfg.search.target)
    talk = bool(cfg.trainer.enable_progress_bar)
    if talk:
        print(f"dipgo search: learning where the full steps go ({config.iterations} steps x {config.samples} "
              f"hard trajectories of {batch_size(batch)} calibration items)", flush=True)

    def progress(it: int, mean: float) -> None:
        if talk and ((it + 1) % 10 == 0 or it + 1 == config.iterations):
            print(f"  placement {it + 1}/{config.iterations}: mean calibration log10 MSE {mean:.3f}", flush=True)

    placement = learn_placement(supernet, batch, target, config, seed=cfg.seed, progress=progress)
    supernet.placed_rows[target] = placement.rows
    supernet.placement = placement
    if talk:
        print(f"dipgo search: full steps {placement.rows} (log10 MSE {placement.score:.3f}; evenly spaced "
              f"{placement.start_score:.3f}) in {placement.seconds:.0f} s", flush=True)


def batch_size(batch: dict[str, Any]) -> int:
    return int(next(v for v in batch.values() if isinstance(v, torch.Tensor)).shape[0])
