"""The ``joint`` gate kind as a search task: reuse + mask on a diffusion denoiser, one MACs budget.

Build: the denoiser gets reuse gates (:func:`dipgo.supernets.reuse.apply_reuse`) and, for the
layers that ``supernet.mask_exclude`` leaves (by default the attention and MLP Linears of the
blocks, not the tiny per-sample conditioning layers), mask gates whose Wanda norms and MACs come
from full trajectories; :class:`dipgo.supernets.joint.JointSuperNet` carries both. Plan: the
learned densities (fitted to the budget when only ``mask`` is searched), the layers pruned with
OBS reconstruction on calibration trajectories, then the reuse grid extracted and refined on the
budget the sparsity left, scored on the pruned weights. Evaluation (held-out noise sampled by the
full model and by the SubNet: PSNR, SSIM, FD) is the report's part (:mod:`dipgo.report.joint_eval`).

``supernet.kinds`` picks what is searched: ``[reuse, mask]`` (joint), ``[reuse]`` or ``[mask]``:
the same code path alone, so a benchmark can compare the three at one budget.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import DictConfig

from dipgo.errors import PlanError
from dipgo.postprocess.plan import Plan
from dipgo.search.data import CalibrationDataModule, collate
from dipgo.search.joint_common import (
    JointTaskBase,
    find_mask_layers,
    install_mask_gates,
    prune_mask_part,
    shift_densities,
)
from dipgo.search.registry import register_task

if TYPE_CHECKING:
    from dipgo.models.registry import LoadedModel
    from dipgo.supernets.joint import JointSuperNet


def plain_sampler(model: torch.nn.Module, reuse: Any) -> Any:
    """``output_fn(model, batch)``: the full trajectory of a plain (unhooked) copy of the denoiser."""
    from dipgo.supernets.sampling import make_model_fn, make_scheduler, sample

    cfg = reuse.config

    def output_fn(m: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        scheduler = make_scheduler(cfg.scheduler, cfg.scheduler_config, cfg.num_train_timesteps)
        final, _ = sample(make_model_fn(m), scheduler, batch, cfg.num_steps, cfg.guidance_scale,
                          null_class=reuse.null_class)
        return final

    return output_fn


def build_joint(loaded: LoadedModel, cfg: DictConfig) -> Any:
    """Reuse gates + mask gates on ``loaded.model`` (a diffusion denoiser) as one SuperNet."""
    from dipgo.measure.macs import block_macs
    from dipgo.search.mask_task import calibration_batches
    from dipgo.search.reuse_task import build_reuse_supernet, calibration_pool
    from dipgo.supernets.joint import JointSuperNet, check_kinds
    from dipgo.supernets.reuse import _example_call

    kinds = check_kinds(cfg.supernet.kinds)
    dense = copy.deepcopy(loaded.model).eval()  # unhooked copy: norms, MACs and OBS run on it
    reuse = build_reuse_supernet(loaded, cfg)
    pool = calibration_pool(loaded, cfg)
    batches = calibration_batches(pool, cfg.data.batch_size, limit=cfg.supernet.mask_calib_items)
    output_fn = plain_sampler(dense, reuse)
    mask = None
    layer_macs: list[float] = []
    if "mask" in kinds:
        found = find_mask_layers(dense, cfg, batches, output_fn)
        example = collate([pool[0]])
        example.pop("index")
        x, kwargs = _example_call(example, reuse.config, reuse.null_class)
        _, per_layer = block_macs(dense, found.layers, x, **kwargs)
        layer_macs = [per_layer[p] for p in found.layers]
        mask = install_mask_gates(loaded.model, dense, found, layer_macs, output_fn)
    joint = JointSuperNet(reuse, mask, layer_macs, kinds, allocation=str(cfg.supernet.mask_allocation))
    joint.dense_model, joint.calibration_batches, joint.output_fn = dense, batches, output_fn
    return joint


def fit_densities(joint: Any, densities: torch.Tensor, target: float) -> torch.Tensor:
    """Shift the learned densities by one constant (clamped) so that the trajectory with every
    step computed costs ``target``: the mask-only plan, and the floor a joint plan needs."""
    full_grid = [[True] * len(joint.reuse.block_names)] * joint.reuse.num_steps
    lo_d = joint.mask.config.min_density
    fitted = shift_densities(densities, joint.mask.fixed_densities.to(densities) < 0, lo_d,
                             lambda d: joint.plan_cost(full_grid, d), target)
    if fitted is None:
        floor = torch.where(joint.mask.fixed_densities.to(densities) < 0, torch.full_like(densities, lo_d), densities)
        raise PlanError(f"target {target:.3f} is below what weight sparsity alone can reach "
                        f"({joint.plan_cost(full_grid, floor.tolist()):.3f} at the minimum density {lo_d})")
    return fitted


def mask_candidates(joint: Any, learned: torch.Tensor, cfg: DictConfig) -> dict[str, list[float]]:
    """Density allocations to measure: the pruner's (``learned``) and uniform ones.

    Joint search: uniform densities ``supernet.split_densities`` (1.0 = spend the whole budget on
    reuse) beside the learned allocation; mask alone: the learned and the uniform allocation,
    both fitted to the target. Allocations that cannot meet the budget are left out.
    """
    target = float(cfg.search.target)
    steps, blocks = joint.reuse.num_steps, len(joint.reuse.block_names)
    floor_grid = [[True] * blocks] + [[False] * blocks] * (steps - 1)
    fixed = joint.mask.fixed_densities.to(learned)
    learned = learned.clamp(min=float(cfg.supernet.mask_min_density))
    uniform = torch.ones_like(learned)
    if "reuse" not in joint.kinds:
        raw = {"learned": learned, "uniform": uniform}
        return {k: _rounded(fit_densities(joint, torch.where(fixed >= 0, fixed, v), target)) for k, v in raw.items()}
    out = {}
    if joint.plan_cost(floor_grid, learned.tolist()) > target:
        learned = fit_densities(joint, learned, target)  # overshoots even with maximal reuse
    out["learned"] = _rounded(learned)
    for rho in cfg.supernet.split_densities:
        dens = torch.where(fixed >= 0, fixed, torch.full_like(learned, float(rho)))
        if joint.plan_cost(floor_grid, dens.tolist()) <= target:
            out[f"uniform_{float(rho):g}"] = _rounded(dens)
    return out


def _rounded(dens: torch.Tensor) -> list[float]:
    return [round(float(d), 6) for d in dens]


def calibration_scorer(joint: Any, cfg: DictConfig) -> Any:
    """``score(grid) -> float``: mean per-item log10 MSE of a hard plan on the first
    ``search.refine.batch`` calibration items, on the current pruned weights (the refinement's score)."""
    from dipgo.search.reuse_task import calibration_pool

    pool = calibration_pool(joint.model, cfg)
    batch = collate([pool[i] for i in range(min(int(cfg.search.refine.batch), len(pool)))])
    batch.pop("index")
    reference = joint.reference(batch)["output"]

    def score(grid: Any) -> float:
        out = joint.sample(batch, grid, pruned=joint.pruned_state is not None)
        err = ((out - reference) ** 2).flatten(1).mean(1)  # (B,)
        return float(torch.log10(err.clamp_min(1e-20)).mean())

    return score


def _reuse_grid(joint: Any, g_reuse: torch.Tensor, densities: list[float], cfg: DictConfig, evals: int | None) -> Plan:
    """The reuse plan on the budget the densities leave: extracted, then refined with ``evals``
    local-search steps (0: the best seed only) on the current pruned weights."""
    from dipgo.postprocess.reuse_plan import extract_reuse_plan
    from dipgo.search.reuse_task import refine

    view = joint.view(densities)
    plan = extract_reuse_plan(g_reuse, view, float(cfg.search.target), meta={})
    if not cfg.search.refine.enabled:
        return plan
    local = copy.deepcopy(cfg)
    if evals is not None:
        local.search.refine.max_evals = evals

    def sample_fn(batch: dict[str, Any], grid: Any) -> torch.Tensor:
        return joint.sample(batch, grid, pruned=joint.pruned_state is not None)

    return refine(plan, g_reuse, view, local, sample_fn=sample_fn)


def extract_joint_plan(probs: torch.Tensor, joint: Any, cfg: DictConfig) -> Plan:
    """Learned probabilities -> densities (pruned) + reuse grid (refined) within ``search.target``.

    The split of the budget between the kinds is measured, not only predicted: every candidate
    allocation (:func:`mask_candidates`) is pruned (OBS), gets its best reuse plan for the budget
    it leaves, and is scored on calibration trajectories; the best one is refined. The pruner's
    densities are one candidate; on small models its per-layer densities are noisy (single
    layers pushed to the floor), which the measurement catches.
    """
    target = float(cfg.search.target)
    joint.set_densities(None)  # the search leaves its last densities installed
    g_reuse, learned = joint.split(torch.as_tensor(probs, dtype=torch.float64))
    meta: dict[str, Any] = {"kinds": list(joint.kinds), "model_source": cfg.model.name,
                            "scheduler": cfg.supernet.scheduler, "guidance_scale": cfg.supernet.guidance_scale}
    steps, blocks = joint.reuse.num_steps, len(joint.reuse.block_names)
    all_on = [[True] * blocks for _ in range(steps)]
    has_reuse = "reuse" in joint.kinds
    densities: list[float] = []
    if joint.mask is not None:
        score = calibration_scorer(joint, cfg)
        scores: dict[str, float] = {}
        best: tuple[float, str, list[float], Any, dict] | None = None
        for name, dens in mask_candidates(joint, learned, cfg).items():
            pruned = prune_mask_part(joint, dens, cfg, distill=False) if min(dens) < 1.0 else {"realised_density": [1.0] * len(dens)}
            if min(dens) >= 1.0:
                joint.pruned_state = None
            grid = _reuse_grid(joint, g_reuse, dens, cfg, evals=0).compute if has_reuse else all_on
            scores[name] = round(score(grid), 5)
            if best is None or scores[name] < best[0]:
                best = (scores[name], name, dens, joint.pruned_state, pruned)
        _, chosen, densities, joint.pruned_state, pruned_info = best
        meta["mask"] = {"pattern": joint.mask.pattern.name, "layers": list(joint.layers), "density": densities,
                        "learned_density": _rounded(learned), "layer_macs": joint.layer_macs.tolist(),
                        **pruned_info}
        meta["split_search"] = {"scores": scores, "chosen": chosen}
    if has_reuse:
        plan = _reuse_grid(joint, g_reuse, densities, cfg, evals=None)
        grid = plan.compute
        meta.update({k: v for k, v in plan.meta.items() if k not in meta})
    else:
        grid = all_on
    meta["cost_split"] = cost_split(joint, grid, densities)
    return Plan(kind="joint", model=type(joint.model).__name__, blocks=joint.reuse.block_names, compute=grid,
                target=target, cost_ratio=joint.plan_cost(grid, densities), num_steps=steps, meta=meta)


def cost_split(joint: Any, grid: Any, densities: list[float]) -> dict[str, float]:
    """Where the saving comes from: kept ratio with the grid alone, the densities alone, and both."""
    all_on = [[True] * len(joint.reuse.block_names)] * joint.reuse.num_steps
    dense = [1.0] * len(joint.layers)
    return {"reuse_only": round(joint.plan_cost(grid, dense), 4),
            "mask_only": round(joint.plan_cost(all_on, densities or dense), 4),
            "both": round(joint.plan_cost(grid, densities or dense), 4)}


@register_task("joint")
class JointTask(JointTaskBase):
    """Reuse + mask on a diffusion denoiser under one MACs budget: the default ``joint`` task. The
    block + mask variant for classifiers and encoders (:class:`dipgo.search.joint_block_task.BlockJointTask`)
    is registered for the configs :func:`~dipgo.search.joint_block_task.routes_here` accepts."""

    variant = None

    def build(self, loaded: LoadedModel, cfg: DictConfig) -> Any:
        return build_joint(loaded, cfg)

    def datamodule(self, loaded: LoadedModel, supernet: JointSuperNet, cfg: DictConfig) -> Any:
        from dipgo.search.reuse_task import calibration_pool

        return CalibrationDataModule(calibration_pool(loaded, cfg), cfg.data.batch_size, cfg.data.steps_per_epoch,
                                     cfg.seed, cfg.data.num_workers)

    def extract_plan(self, probs: torch.Tensor, supernet: JointSuperNet, cfg: DictConfig) -> Plan:
        return extract_joint_plan(probs, supernet, cfg)
