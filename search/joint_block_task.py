"""The ``joint`` kind on classifiers and encoders: depth (block) + sparsity (mask), one MACs budget.

Build: the model gets block gates (:func:`dipgo.supernets.block.apply_block_gates`) and, for the
Linear / Conv layers that :data:`dipgo.supernets.mask.DEFAULT_EXCLUDE` and ``supernet.mask_exclude``
leave, mask gates with Wanda saliency from ``supernet.mask_calib_items`` calibration items;
:class:`dipgo.supernets.joint_block.BlockMaskSuperNet` carries both, with per-layer and per-block
MACs counted on an unhooked copy. Data: the block kind's pools (digits training images,
tokenised training sentences). Plan: the split of the budget between the kinds is measured on
calibration data (:func:`split_search`): candidate density allocations (the learned one floored at
``supernet.mask_min_density``, uniform ones from ``supernet.split_densities``, and one uniform
density with every block kept) each get the blocks the block kind's exact-budget code chooses (and
refines) on the costs their sparsity leaves, are pruned with OBS reconstruction and scored with the
search's distortion; the best is pruned for good (OBS + distillation) on that copy. The SubNet
(:func:`subnet_of`): pruned weights, closed blocks removed; its evaluation against the full model
is the report's part (:mod:`dipgo.report.joint_eval`).

``supernet.kinds``: ``[block, mask]`` (joint), ``[block]`` or ``[mask]`` on the same code path.
"""

from __future__ import annotations

import copy
import math
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
    from dipgo.supernets.joint_block import BlockMaskSuperNet


def routes_here(cfg: DictConfig) -> bool:
    """Whether a ``supernet=joint`` config is the block + mask variant: ``block`` is searched, or
    ``mask`` alone on classifier / encoder data (``data.kind`` images or text)."""
    kinds = list(cfg.supernet.kinds)
    return "block" in kinds or ("reuse" not in kinds and cfg.data.kind in ("images", "text"))


def _floor(value: float, digits: int = 6) -> float:
    """Round down (a rounded density must never cost more than the fitted one)."""
    return math.floor(value * 10**digits) / 10**digits


def build_block_joint(loaded: LoadedModel, cfg: DictConfig) -> Any:
    """Block gates + mask gates on ``loaded.model`` (classifier or encoder) as one SuperNet."""
    from dipgo.errors import UnsupportedModelError
    from dipgo.models.io import output_fn_for
    from dipgo.search.block_task import _check_data, _example, calibration_pool
    from dipgo.search.mask_task import calibration_batches
    from dipgo.supernets.block import apply_block_gates
    from dipgo.supernets.joint_block import BlockMaskSuperNet, check_block_kinds, count_module_macs

    kinds = check_block_kinds(cfg.supernet.kinds)
    try:
        _check_data(loaded, cfg)
    except UnsupportedModelError as exc:
        raise UnsupportedModelError(str(exc).replace("kind=block", "kind=joint").replace("block search", "joint search")) from None
    pool = calibration_pool(loaded, cfg)
    fn = output_fn_for(loaded.kind)
    dense = copy.deepcopy(loaded.model).eval().requires_grad_(False)  # unhooked: MACs, norms, OBS run on it
    example = _example(pool)
    block = apply_block_gates(loaded.model, example, output_fn=fn)
    batches = calibration_batches(pool, cfg.data.batch_size, limit=cfg.supernet.mask_calib_items)
    mask, layers = None, []
    try:
        found = find_mask_layers(dense, cfg, batches, fn) if "mask" in kinds else None
        layers = found.layers if found is not None else []
        full, per = count_module_macs(dense, example, fn, [*block.blocks, *layers])
        block.set_costs([per[b] for b in block.blocks], full)  # same counter, same example as the layers
        if found is not None:
            mask = install_mask_gates(loaded.model, dense, found, [per[p] for p in layers], fn)
    except BaseException:
        block.remove()
        raise
    sn = BlockMaskSuperNet(block, mask, [per[p] for p in layers], kinds)
    sn.dense_model, sn.calibration_pool, sn.calibration_batches = dense, pool, batches
    sn.data_kind = loaded.kind
    floor = reachable_floor(sn)
    if float(cfg.search.target) < floor - 1e-9:
        sn.remove()
        raise PlanError(f"target {float(cfg.search.target):g} is unreachable with supernet.kinds={list(kinds)}: "
                        f"the cheapest plan keeps {floor:.3f} of the MACs (every removable block removed, every "
                        f"masked layer at the minimum density); the smallest reachable target is {floor:.3f}")
    return sn


def reachable_floor(sn: BlockMaskSuperNet) -> float:
    """Kept-MACs ratio of the cheapest plan the searched kinds can make."""
    keep = [("block" not in sn.kinds)] * len(sn.blocks)
    dens = []
    if sn.mask is not None:
        lo = torch.full((len(sn.layers),), sn.mask.config.min_density, dtype=torch.float64)
        dens = sn.mask.effective(lo).tolist()
    return sn.plan_cost(keep, dens)


def fit_densities(sn: BlockMaskSuperNet, densities: torch.Tensor, keep: list[bool], target: float) -> torch.Tensor | None:
    """The learned densities shifted by one constant (clamped, fixed layers untouched) so that the
    plan with blocks ``keep`` costs at most ``target``, as close to it as bisection gets; ``None``
    when even the minimum density does not reach it."""
    return shift_densities(densities, sn.mask.fixed_densities.to(densities) < 0, sn.mask.config.min_density,
                           lambda d: sn.plan_cost(keep, d), target)


def refine_blocks(keep: list[bool], probs: list[float], costs: list[float], total: float, target: float,
                  sn: BlockMaskSuperNet, cfg: DictConfig, densities: list[float]) -> tuple[list[bool], dict[str, Any]]:
    """The block part refined by measuring hard plans on calibration data: the block kind's swap
    search, seeded with the learned plan and its static baselines, on the costs the sparsity left.
    Layers compute with saliency masks at ``densities`` (the OBS prune comes once, at the end)."""
    from dipgo.losses.distortion import DistortionConfig, distortion
    from dipgo.postprocess.block_plan import (
        BLOCK_BASELINES,
        fill_budget,
        refine_block_keep,
        weight_norm_importance,
    )
    from dipgo.search.config import config_of

    dist_cfg = config_of(DistortionConfig, cfg.search.distortion)
    pool = sn.calibration_pool
    batch = {k: v for k, v in collate([pool[i] for i in range(min(cfg.search.refine.batch, len(pool)))]).items()
             if k != "index"}
    reference = sn.reference(batch)

    def score(k: list[bool]) -> float:
        out = sn.hard(batch, k, pruned=False, densities=densities or None)
        return float(distortion({"output": out}, reference, dist_cfg)["total"])

    seeds = {"learned": keep}
    importance = {"weight_norm": lambda: weight_norm_importance(sn.dense_model, sn.blocks),
                  "drop_last": lambda: [float(-i) for i in range(len(sn.blocks))]}
    for name in cfg.search.refine.seeds:
        if name in BLOCK_BASELINES and name in importance:
            seeds[name] = fill_budget(importance[name](), costs, total, target)
    return refine_block_keep(seeds, probs, costs, total, target, score, max_evals=cfg.search.refine.max_evals)


def choose_blocks(g_block: torch.Tensor, densities: list[float], sn: BlockMaskSuperNet, cfg: DictConfig,
                  meta: dict[str, Any]) -> list[bool]:
    """Kept blocks within ``search.target`` at fixed densities: the block kind's exact-budget code on
    the costs the sparsity left. With unit costs ``c_b(d)`` and ``T(d)`` the whole model at ``d``:
    ``(T - removed) / full <= target``  <=>  ``(T - removed) / T <= target * full / T``."""
    from dipgo.postprocess.block_plan import fill_budget

    if "block" not in sn.kinds:
        return [True] * len(sn.blocks)
    costs, total = sn.unit_costs(densities)
    block_target = float(cfg.search.target) * sn.full_cost() / total
    keep = fill_budget(g_block.tolist(), costs, total, block_target)
    if cfg.search.refine.enabled:
        keep, meta["refine"] = refine_blocks(keep, g_block.tolist(), costs, total, block_target, sn, cfg, densities)
    return keep


def relearned(sn: BlockMaskSuperNet, densities: torch.Tensor, learned_keep: list[bool], keep: list[bool]) -> torch.Tensor:
    """Densities of layers in blocks the search expected to remove but the plan keeps: the search
    had little reason to keep them dense (a closed gate hides their distortion, while their cost
    gradient stays), so they get the MACs-weighted mean density of the layers it did expect to run."""
    from dipgo.supernets.joint import layer_units

    owner = layer_units(sn.layers, sn.blocks)
    stale = torch.tensor([b >= 0 and keep[b] and not learned_keep[b] for b in owner])
    trusted = torch.tensor([b < 0 or learned_keep[b] for b in owner]) & (sn.mask.fixed_densities.to(densities) < 0)
    if not stale.any() or not trusted.any():
        return densities
    macs = sn.layer_macs.to(densities)
    mean = (densities * macs)[trusted].sum() / macs[trusted].sum()
    free = sn.mask.fixed_densities.to(densities) < 0
    return torch.where(stale & free, mean, densities)


def reopen_blocks(keep: list[bool], densities: torch.Tensor, learned_keep: list[bool], probs: list[float], sn: BlockMaskSuperNet,
                  cfg: DictConfig) -> tuple[list[bool], torch.Tensor, dict[str, Any]]:
    """Trade depth for sparsity where it measures better: re-open a removed block (most probable
    first) and pay for it with lower densities (one constant shift to the budget); keep the move
    when the distortion on calibration data (saliency masks at the densities) drops. Blocks cost
    a sixth of a small model each, so the block part alone is too coarse to spend a budget well."""
    from dipgo.losses.distortion import DistortionConfig, distortion
    from dipgo.search.config import config_of

    target = float(cfg.search.target)
    dist_cfg = config_of(DistortionConfig, cfg.search.distortion)
    pool = sn.calibration_pool
    batch = {k: v for k, v in collate([pool[i] for i in range(min(cfg.search.refine.batch, len(pool)))]).items()
             if k != "index"}
    reference = sn.reference(batch)

    def score(k: list[bool], d: torch.Tensor) -> float:
        return float(distortion({"output": sn.hard(batch, k, pruned=False, densities=d.tolist())}, reference,
                                dist_cfg)["total"])

    best, tried, accepted = score(keep, densities), 0, 0
    improved = True
    while improved and not all(keep):
        improved = False
        for i in sorted((i for i, k in enumerate(keep) if not k), key=lambda i: -probs[i]):
            cand = list(keep)
            cand[i] = True
            dens = fit_densities(sn, relearned(sn, densities, learned_keep, cand), cand, target)
            if dens is None:
                continue
            tried += 1
            value = score(cand, dens)
            if value < best:
                keep, densities, best, improved = cand, dens, value, True
                accepted += 1
                break
    return keep, densities, {"evaluations": tried + 1, "accepted_moves": accepted, "final_score": float(f"{best:.6g}")}


def mask_candidates(sn: BlockMaskSuperNet, learned: torch.Tensor, learned_keep: list[bool], cfg: DictConfig) -> dict[str, torch.Tensor]:
    """Density allocations whose split of the budget is measured (:func:`extract_block_joint_plan`).

    Joint search: the pruner's densities (``learned``, floored at ``supernet.mask_min_density``;
    shifted down to the budget when they overshoot it even with every removable block removed),
    and for each ``rho`` in ``supernet.split_densities`` the uniform density ``rho`` (1.0 = the whole
    budget to block removal, nothing pruned), left out when it cannot meet the budget even with
    every removable block removed; and ``uniform``: every block kept, one density fitted to the
    budget (the other end of the split; left out when even the minimum density overshoots). Mask alone: the learned and the uniform allocation, both shifted
    by one constant to the budget. Layers whose density the pattern fixes keep it throughout.
    """
    target = float(cfg.search.target)
    n_blocks = len(sn.blocks)
    fixed = sn.mask.fixed_densities.to(learned)
    learned = torch.where(fixed >= 0, fixed, learned.clamp(min=float(cfg.supernet.mask_min_density), max=1.0))
    ones = torch.where(fixed >= 0, fixed, torch.ones_like(learned))
    out: dict[str, torch.Tensor] = {}
    if "block" not in sn.kinds:
        for name, dens in (("learned", learned), ("uniform", ones)):
            fitted = fit_densities(sn, dens, [True] * n_blocks, target)
            if fitted is not None:
                out[name] = fitted
    else:
        none_kept = [False] * n_blocks
        fitted = learned
        if sn.plan_cost(none_kept, learned.tolist()) > target:
            fitted = fit_densities(sn, learned, learned_keep, target)
            fitted = fitted if fitted is not None else fit_densities(sn, learned, none_kept, target)
        if fitted is not None:
            out["learned"] = fitted
        # the other end of the split: every block kept, the whole budget to a uniform density (the
        # split densities pick blocks at a fixed density, and a block is a sixth of a small model, so
        # none of them need land on "no block removed")
        uniform = fit_densities(sn, ones, [True] * n_blocks, target)
        if uniform is not None:
            out["uniform"] = uniform
        for rho in cfg.supernet.split_densities:
            dens = torch.where(fixed >= 0, fixed, torch.full_like(learned, float(rho)))
            if sn.plan_cost(none_kept, dens.tolist()) <= target + 1e-12:
                out[f"uniform_{float(rho):g}"] = dens
    if not out:
        raise PlanError(f"target {target:g} is below what the searched kinds can reach ({reachable_floor(sn):.3f})")
    return out


def _scoring_batch(sn: BlockMaskSuperNet, cfg: DictConfig) -> dict[str, torch.Tensor]:
    """``search.refine.batch`` calibration items to score candidates on: the ones after the
    ``supernet.mask_calib_items`` that OBS reconstructs on, where the pool has them (a candidate's
    OBS fit would otherwise be scored on its own fitting data, which block removal never is)."""
    pool = sn.calibration_pool
    n = min(int(cfg.search.refine.batch), len(pool))
    start = max(0, min(int(cfg.supernet.mask_calib_items), len(pool) - n))
    return {k: v for k, v in collate([pool[i] for i in range(start, start + n)]).items() if k != "index"}


def _candidate_plan(name: str, dens: torch.Tensor, g_block: torch.Tensor, learned_keep: list[bool], sn: BlockMaskSuperNet,
                    cfg: DictConfig) -> tuple[list[bool], list[float], dict[str, Any]]:
    """The block plan of one density allocation: blocks chosen (and refined) within the budget the
    densities leave, the slack their coarse costs leave shifted back to the layers. The learned
    allocation then also gets the re-open moves (depth traded for a lower shift of its densities);
    a uniform one does not need them: re-opening a block there lands on a lower uniform density,
    which the other candidates measure."""
    target = float(cfg.search.target)
    meta: dict[str, Any] = {}
    keep = choose_blocks(g_block, dens.tolist(), sn, cfg, meta)
    dens = relearned(sn, dens, learned_keep, keep)
    filled = fit_densities(sn, dens, keep, target)  # the slack under the budget, back to the layers
    final = filled if filled is not None else dens
    if name == "learned" and "block" in sn.kinds and cfg.search.refine.enabled and not all(keep):
        keep, final, meta["reopen"] = reopen_blocks(keep, final, learned_keep, g_block.tolist(), sn, cfg)
    return keep, [_floor(float(d)) if d < 1.0 else 1.0 for d in final], meta


def _set_pruned(sn: BlockMaskSuperNet, densities: list[float], cfg: DictConfig, distill: bool) -> dict[str, Any]:
    """Prune the mask part at ``densities`` (nothing to prune when all are 1.0)."""
    if min(densities, default=1.0) >= 1.0:
        sn.pruned_model, sn.pruned_state = None, None
        return {"realised_density": [1.0] * len(sn.layers)}
    return prune_mask_part(sn, densities, cfg, distill=distill)


def split_search(g_block: torch.Tensor, learned: torch.Tensor, learned_keep: list[bool], sn: BlockMaskSuperNet,
                 cfg: DictConfig) -> tuple[str, list[bool], list[float], dict[str, Any], dict[str, Any]]:
    """Measure the split of the budget between depth and sparsity.

    Every candidate allocation (:func:`mask_candidates`) gets its block plan
    (:func:`_candidate_plan`), is pruned with OBS reconstruction (no distillation: the ranking is
    what matters, and it keeps a candidate to seconds), and is scored with the search's distortion
    (KL for classifiers, cosine for encoders) on calibration items, on the pruned weights with its
    closed blocks skipped. Returns ``(chosen, keep, densities, candidate meta, split_search meta)``;
    ties keep the earlier candidate (the learned one first).
    """
    import time

    from dipgo.losses.distortion import DistortionConfig, distortion
    from dipgo.search.config import config_of

    t0 = time.perf_counter()
    dist_cfg = config_of(DistortionConfig, cfg.search.distortion)
    batch = _scoring_batch(sn, cfg)
    reference = sn.reference(batch)
    macs = sn.layer_macs
    scores: dict[str, float] = {}
    plans: dict[str, dict[str, Any]] = {}
    seen: list[tuple[list[bool], list[float], str]] = []
    best: tuple[float, str, list[bool], list[float], dict[str, Any]] | None = None
    for name, dens in mask_candidates(sn, learned, learned_keep, cfg).items():
        keep, densities, meta = _candidate_plan(name, dens, g_block, learned_keep, sn, cfg)
        same = next((n for k, d, n in seen if k == keep and max((abs(a - b) for a, b in zip(d, densities)),
                                                                   default=0.0) < 1e-4), None)
        if same is not None:
            scores[name] = scores[same]  # the same plan as an earlier candidate: measured once
        else:
            _set_pruned(sn, densities, cfg, distill=False)
            out = sn.hard(batch, keep, pruned=True)
            scores[name] = float(f"{float(distortion({'output': out}, reference, dist_cfg)['total']):.6g}")
            seen.append((keep, densities, name))
        dens_t = torch.tensor(densities, dtype=torch.float64)
        plans[name] = {"removed_blocks": [b for b, k in zip(sn.blocks, keep) if not k],
                       "cost_ratio": round(sn.plan_cost(keep, densities), 6),
                       "mask_density_macs": round(float((macs * dens_t).sum() / macs.sum()), 4)}
        if same is not None:
            plans[name]["same_as"] = same
        if "reopen" in meta:
            plans[name]["reopen"] = meta["reopen"]
        if best is None or scores[name] < best[0]:
            best = (scores[name], name, keep, densities, meta)
    assert best is not None
    _, chosen, keep, densities, meta = best
    info = {"scores": scores, "chosen": chosen, "candidates": plans, "score_items": len(reference["output"]),
            "seconds": round(time.perf_counter() - t0, 2)}
    return chosen, keep, densities, meta, info


def extract_block_joint_plan(probs: torch.Tensor, sn: BlockMaskSuperNet, cfg: DictConfig) -> Plan:
    """Learned probabilities -> kept blocks (refined) + densities (pruned) within ``search.target``.

    Without a mask part: the blocks chosen (and refined) within the budget. With one, the split of
    the budget between the kinds is measured, not only predicted (:func:`split_search`): the
    learned allocation and uniform ones each get their block plan, are pruned (OBS) and scored on
    calibration data, and the best is kept: the pruner's per-layer densities are noisy on small
    models (single layers pushed far below the rest), which the measurement catches. The chosen
    allocation is then pruned for good: OBS reconstruction + distillation.
    """
    from dipgo.supernets.block import block_signatures

    target = float(cfg.search.target)
    sn.set_densities(None)  # the search leaves its last densities installed
    g_block, dens = sn.split(torch.as_tensor(probs, dtype=torch.float64))
    n_blocks = len(sn.blocks)
    meta: dict[str, Any] = {"kinds": list(sn.kinds), "model_source": cfg.model.name,
                            "block_signatures": block_signatures(sn.model, sn.blocks)}
    if "block" in sn.kinds:
        meta["keep_probs"] = [round(float(p), 4) for p in g_block]
    if sn.mask is None:
        keep = choose_blocks(g_block, [], sn, cfg, meta)
        densities: list[float] = []
    else:
        learned_keep = [bool(p >= 0.5) for p in g_block] if "block" in sn.kinds else [True] * n_blocks
        chosen, keep, densities, chosen_meta, meta["split_search"] = split_search(g_block, dens, learned_keep, sn, cfg)
        meta.update(chosen_meta)
        meta["mask"] = {"pattern": sn.mask.pattern.name, "layers": list(sn.layers), "density": densities,
                        "learned_density": [round(float(d), 4) for d in dens],
                        "layer_macs": sn.layer_macs.tolist(), **_set_pruned(sn, densities, cfg, distill=True)}
    meta["kept_blocks"] = [b for b, k in zip(sn.blocks, keep) if k]
    meta["removed_blocks"] = [b for b, k in zip(sn.blocks, keep) if not k]
    meta["cost_split"] = cost_split(sn, keep, densities)
    return Plan(kind="joint", model=type(sn.model).__name__, blocks=list(sn.blocks), compute=[list(keep)],
                target=target, cost_ratio=round(sn.plan_cost(keep, densities), 6), meta=meta)


def cost_split(sn: BlockMaskSuperNet, keep: list[bool], densities: list[float]) -> dict[str, float]:
    """Where the saving comes from: kept ratio with the block decisions alone, the densities alone, both."""
    return {"block_only": round(sn.plan_cost(keep, []), 4),
            "mask_only": round(sn.plan_cost([True] * len(sn.blocks), densities), 4),
            "both": round(sn.plan_cost(keep, densities), 4)}


def subnet_of(sn: BlockMaskSuperNet, plan: Plan) -> torch.nn.Module:
    """The SubNet a user would run: the pruned weights (or the dense ones) with the closed blocks
    physically removed (a closed gate is exactly the identity, so removal changes nothing else)."""
    from dipgo.postprocess.block_subnet import make_block_plan, remove_blocks

    base = getattr(sn, "pruned_model", None) if plan.payload.mask is not None else None
    base = sn.dense_model if base is None else base
    block_plan = make_block_plan(sn.block, plan.compute[0], plan.target)
    return remove_blocks(base, block_plan).eval().requires_grad_(False)


@register_task("joint", when=routes_here)
class BlockJointTask(JointTaskBase):
    """Block + mask gates of a classifier / encoder under one MACs budget (``supernet.kind=joint``
    with ``block`` among ``supernet.kinds``, or ``mask`` alone on images / text)."""

    variant = "block_mask"

    def build(self, loaded: LoadedModel, cfg: DictConfig) -> Any:
        return build_block_joint(loaded, cfg)

    def datamodule(self, loaded: LoadedModel, supernet: BlockMaskSuperNet, cfg: DictConfig) -> Any:
        return CalibrationDataModule(supernet.calibration_pool, cfg.data.batch_size, cfg.data.steps_per_epoch,
                                     cfg.seed, cfg.data.num_workers)

    def extract_plan(self, probs: torch.Tensor, supernet: BlockMaskSuperNet, cfg: DictConfig) -> Plan:
        return extract_block_joint_plan(probs, supernet, cfg)
