"""Mask plans: per-layer densities whose weighted mean is exactly the global target.

``plan.blocks`` are the layer paths, ``plan.compute[0][i]`` is ``True`` when layer ``i`` stays
dense (a refused pattern, or density 1), ``plan.payload.density`` (``meta["density"]``) the kept fraction per layer,
``plan.meta["refused"]`` the one-sentence reason per layer left dense. ``plan.target`` and
``plan.cost_ratio`` are global densities (1 - sparsity), weighted by the slots' costs.

The learned densities are projected onto the budget by one shift in logit space (bisection), so
their order and spread are kept; then each layer's density is rounded to what its pattern can
represent (a whole number of weights or blocks; for ``rowblock`` a whole number of column blocks
per block-row, the same in every row) and the rounding error is repaid one unit at a time over
the layers (least moved and largest first), which lands the global density within one block (one
block column for ``rowblock``) of the target. The density recorded per layer is then exactly what
its mask keeps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from dipgo.errors import PlanError
from dipgo.postprocess.plan import MaskPayload, Plan
from dipgo.supernets.mask import Pattern, weight_matrix

if TYPE_CHECKING:
    from dipgo.supernets.mask import MaskSuperNet


def check_mask_target(target: float) -> float:
    """A global density target in (0, 1) (sparsity 1 - target)."""
    t = float(target)
    if not 0.0 < t < 1.0:
        raise PlanError(f"mask target {t:g} is outside (0, 1): search.target is the kept density "
                        f"(1 - sparsity; 0.5 = 50% sparse, 0.3 = 70% sparse)")
    return t


def project_densities(densities: Sequence[float], costs: Sequence[float], fixed: Sequence[float | None],
                      target: float, lo: float = 0.02) -> list[float]:
    """Shift the free densities in logit space so that ``sum(d c) / sum(c) == target``."""
    check_mask_target(target)
    total = sum(costs)
    fixed_part = sum(c * f for c, f in zip(costs, fixed) if f is not None)
    free = [i for i, f in enumerate(fixed) if f is None]
    if not free:
        return [float(f) for f in fixed]
    free_cost = sum(costs[i] for i in free)
    need = (target * total - fixed_part) / free_cost
    if not lo <= need <= 1.0:
        raise PlanError(f"target {target:g} is unreachable: the layers left dense or fixed (N:M / refused) already "
                        f"give a density of {fixed_part / total:.3f} of the total, so the free layers would need {need:.3f}")
    logit = [math.log(max(min(densities[i], 1 - 1e-6), 1e-6) / (1 - max(min(densities[i], 1 - 1e-6), 1e-6)))
             for i in free]

    def mean_at(shift: float) -> float:
        return sum(costs[i] * min(max(1 / (1 + math.exp(-(lg + shift))), lo), 1.0) for i, lg in zip(free, logit)) / free_cost

    a, b = -50.0, 50.0
    for _ in range(200):
        mid = (a + b) / 2
        a, b = (mid, b) if mean_at(mid) < need else (a, mid)
    out = [float(f) if f is not None else 0.0 for f in fixed]
    for i, lg in zip(free, logit):
        out[i] = min(max(1 / (1 + math.exp(-(lg + (a + b) / 2))), lo), 1.0)
    return out


def quantise(densities: list[float], units: Sequence[int], costs: Sequence[float], fixed: Sequence[float | None],
             target: float) -> list[float]:
    """Round each free density to ``k / units_i`` and repay the error one unit at a time.

    Each repayment moves one layer by one unit, taking the layers moved least so far first and the
    largest among them, so the error is spread over many layers rather than dumped on one (this
    matters for coarse units: a ``rowblock32`` layer with 384 inputs has 12 density steps).
    """
    out = list(densities)
    for i, f in enumerate(fixed):
        if f is None:
            out[i] = max(round(out[i] * units[i]), 1) / units[i]
    total = sum(costs)
    free = [i for i, f in enumerate(fixed) if f is None]
    moves = dict.fromkeys(free, 0)
    for _ in range(16 * len(free) + 16):
        gap = target - sum(d * c for d, c in zip(out, costs)) / total
        if abs(gap) < 1e-9 or not free:
            break
        moved = False
        for i in sorted(free, key=lambda j: (moves[j], -costs[j])):
            step = costs[i] / units[i] / total
            if step > abs(gap) * 2:
                continue
            room = (1.0 - out[i]) if gap > 0 else (out[i] - 1.0 / units[i])  # density this layer can still move
            if round(room * units[i]) >= 1:
                out[i] += math.copysign(1 / units[i], gap)
                moves[i] += 1
                moved = True
                break
        if not moved:
            break
    return out


def layer_units(supernet: MaskSuperNet) -> list[int]:
    """Density steps per layer: weights (unstructured), blocks (block), or column blocks per
    block-row (rowblock: every block-row keeps the same count ``k``, so the density is ``k / (in/b)``)."""
    p: Pattern = supernet.pattern
    units = []
    for path in supernet.layers:
        w = weight_matrix(supernet.model.get_submodule(path))
        if p.kind == "rowblock":
            units.append(max(w.shape[1] // p.block, 1))
        elif p.kind == "block":
            units.append(w.numel() // (p.block * p.block))
        else:
            units.append(w.numel())
    return units


def make_mask_plan(supernet: MaskSuperNet, densities: list[float], target: float, meta: dict[str, Any] | None = None) -> Plan:
    costs = [s.cost for s in supernet.slots]
    ratio = sum(d * c for d, c in zip(densities, costs)) / sum(costs)
    info = {**MaskPayload(supernet.pattern.name, [round(float(d), 6) for d in densities]).to_meta(),
            "saliency": supernet.config.saliency, "cost_weighting": supernet.config.cost_weighting,
            "refused": dict(supernet.refused), **(meta or {})}
    return Plan(kind="mask", model=type(supernet.model).__name__, blocks=list(supernet.layers),
                compute=[[d >= 1.0 for d in densities]], target=float(target), cost_ratio=float(ratio), meta=info)


def extract_mask_plan(probs: torch.Tensor, supernet: MaskSuperNet, target: float, meta: dict[str, Any] | None = None,
                      selection: str = "dipgo") -> Plan:
    """Learned densities ``(N,)`` -> a plan whose global density is the target (within one block)."""
    check_mask_target(target)
    costs = [s.cost for s in supernet.slots]
    fixed = [supernet.fixed_density(p) for p in supernet.layers]
    dens = project_densities([float(p) for p in probs], costs, fixed, target, lo=supernet.config.min_density)
    dens = quantise(dens, layer_units(supernet), costs, fixed, target)
    info = {"keep_probs": [round(float(p), 4) for p in probs], "selection": selection, **(meta or {})}
    return make_mask_plan(supernet, dens, target, info)


def uniform_plan(supernet: MaskSuperNet, target: float, selection: str = "uniform") -> Plan:
    """Every free layer at the same density (the one-shot baselines' allocation)."""
    return extract_mask_plan(torch.full((len(supernet.layers),), float(target)), supernet, target,
                             selection=selection)
