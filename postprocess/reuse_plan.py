"""Keep probabilities of a reuse search -> a hard Plan that meets the MACs budget.

The pruner's probabilities rank the slots; the budget decides how many close. Costs are always
the SuperNet's cascade-aware hard cost, so closing ``up_blocks.0`` also frees the mid block and the
deepest down block when nothing else reads them. The plan stores the *effective* grid: a unit that
nobody needs is marked closed, because the SubNet will not run it.

How close to the target a plan can land is bounded by the granularity: the finest step is one
slot's MACs (one unit at one step), or a whole cascade when a unit drags its producers along. With
block granularity on a small UNet at 20 steps one slot is well under 1% of the trajectory.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from dipgo.errors import PlanError
from dipgo.postprocess.plan import Plan, ReusePayload
from dipgo.supernets.reuse import ReuseSuperNet


def _as_grid(keep_probs: Any, supernet: ReuseSuperNet) -> torch.Tensor:
    """``(N,)`` slot or ``(S-1, B)`` unit probabilities -> ``(S-1, B)`` float64 on CPU.

    With step gates a unit's probability is its own times its step's (what the SuperNet
    samples), so a closed step ranks all its units as closed.
    """
    probs = torch.as_tensor(keep_probs).detach().to("cpu", torch.float64)
    if tuple(probs.shape) == supernet.grid_shape:
        return probs
    if probs.numel() != len(supernet.slots):
        steps = " plus one gate per step" if supernet.config.step_gates else ""
        raise PlanError(
            f"got {probs.numel()} keep probabilities but the SuperNet has {len(supernet.slots)} slots "
            f"({supernet.grid_shape[0]} steps x {supernet.grid_shape[1]} blocks{steps})"
        )
    return supernet.gate_grid(probs.reshape(-1))[1:]


class _GridCost:
    """Hard cost of a compute grid, updated one step row at a time (only that row changes)."""

    def __init__(self, supernet: ReuseSuperNet, grid: list[list[bool]]) -> None:
        self.supernet = supernet
        self.grid = grid  # (S, B), row 0 all True
        self.full = supernet.full_cost()
        self.rows = [supernet.step_macs(row) for row in grid]

    @property
    def ratio(self) -> float:
        return sum(self.rows) / self.full

    def set(self, s: int, b: int, value: bool) -> None:
        self.grid[s][b] = value
        self.rows[s] = self.supernet.step_macs(self.grid[s])


def _close_until(cost: _GridCost, order: list[tuple[int, int]], target: float) -> list[tuple[int, int]]:
    """Close slots from the least likely kept until the budget holds; returns the closed ones."""
    closed: list[tuple[int, int]] = []
    for s, b in order:
        if cost.ratio <= target:
            break
        cost.set(s, b, False)
        closed.append((s, b))
    return closed


def _reopen(cost: _GridCost, closed: list[tuple[int, int]], target: float) -> None:
    """Re-open closed slots, most likely kept first, whenever the budget still holds.

    Every closed slot is tried once, so the final gap to the target is smaller than the cost of
    any slot still closed (cascade included).
    """
    for s, b in closed:
        cost.set(s, b, True)
        if cost.ratio > target:
            cost.set(s, b, False)


def check_reachable(supernet: ReuseSuperNet, target: float) -> None:
    """Refuse targets outside (0, 1] or below the cost of reusing everything after step 0."""
    if not 0.0 < target <= 1.0:
        raise PlanError(f"target must be a kept-cost ratio in (0, 1], got {target}")
    steps, blocks = supernet.num_steps, len(supernet.block_names)
    floor = supernet.plan_cost([[True] * blocks] + [[False] * blocks] * (steps - 1))
    if floor > target:
        raise PlanError(
            f"target {target:.3f} is below the smallest reachable cost {floor:.3f} of {supernet.model_class} at "
            f"{steps} steps (step 0 and the ungated stem/head always run)"
        )


def extract_reuse_plan(keep_probs: Any, supernet: ReuseSuperNet, target: float,
                       meta: dict[str, Any] | None = None) -> Plan:
    """Hard plan from keep probabilities ``(N,)`` or ``(S-1, B)`` with kept-cost ratio <= ``target``.

    Step 0 is always computed. Slots close greedily from the lowest keep probability, with the
    cascade-aware cost recomputed after each change, until the cost is within budget; then the
    most probable closed slots are re-opened while the budget still holds, so the plan lands just
    below the target. Raises :class:`PlanError` when even closing everything cannot reach it.
    """
    check_reachable(supernet, target)
    probs = _as_grid(keep_probs, supernet)  # (S-1, B)
    steps, blocks = supernet.num_steps, len(supernet.block_names)
    flat = probs.flatten().tolist()
    order = sorted(range(len(flat)), key=lambda k: (flat[k], k))  # least likely kept first
    slots = [(k // blocks + 1, k % blocks) for k in order]
    cost = _GridCost(supernet, [[True] * blocks for _ in range(steps)])
    closed = _close_until(cost, slots, target)
    _reopen(cost, closed[::-1], target)
    compute = (supernet.effective(torch.tensor(cost.grid, dtype=torch.float64)) > 0.5).tolist()
    return Plan(
        kind="reuse", model=supernet.model_class, blocks=supernet.block_names, compute=compute,
        target=float(target), cost_ratio=supernet.plan_cost(compute), num_steps=steps,
        meta=_plan_meta(supernet, probs, meta),
    )


def _plan_meta(supernet: ReuseSuperNet, probs: torch.Tensor, meta: dict[str, Any] | None) -> dict[str, Any]:
    """What ``install_plan`` needs to rebuild the units, the probabilities (for heatmaps), the caller's provenance."""
    cfg = supernet.config
    return {
        **ReusePayload(cfg.granularity, cfg.mode, supernet.modes, cfg.forecast_order, cfg.whole_step_skip).to_meta(),
        "scheduler": cfg.scheduler,
        "guidance_scale": cfg.guidance_scale,
        "keep_probs": [[round(p, 4) for p in row] for row in probs.tolist()],  # (S-1, B)
        **(meta or {}),
    }


def check_plan_fits(plan: Plan, model_class: str, blocks: list[str], num_steps: int | None,
                    scheduler: str | None = None) -> None:
    """Refuse (with :class:`PlanError`) a reuse plan made for another model, block list, step count
    or sampler (``scheduler``, checked against the one the plan records; plans that record none pass).

    A plan is a schedule over one sampler's trajectory: the steps where a DDIM trajectory can
    coast are not those of a DPM-Solver++ one, so running it elsewhere is silently worse.
    """
    if plan.kind != "reuse":
        raise PlanError(f"expected a reuse plan, got a {plan.kind!r} plan")
    if plan.model != model_class:
        raise PlanError(f"plan was made for {plan.model} but the model is {model_class}")
    if plan.blocks != blocks:
        missing = sorted(set(plan.blocks) ^ set(blocks))[:3]
        raise PlanError(
            f"plan blocks do not match the model's {len(blocks)} gated blocks "
            f"(plan has {len(plan.blocks)}; first differences: {', '.join(missing) or 'order'})"
        )
    schedule = plan.payload.schedule  # a solver schedule is checked against the reference it was searched for
    made_for = schedule.reference_steps if schedule is not None else plan.num_steps
    if num_steps is not None and made_for != num_steps:
        raise PlanError(f"plan was made for {made_for} sampling steps but {num_steps} are used")
    searched = schedule.reference_scheduler if schedule is not None else (plan.meta or {}).get("scheduler")
    if scheduler is not None and searched is not None and searched != scheduler:
        raise PlanError(
            f"plan was searched on the {searched} sampler but {scheduler} is used: sample with "
            f"supernet.scheduler={searched} or search a plan for {scheduler}"
        )


def resample_grid(compute: Sequence[Sequence[bool]], num_steps: int) -> list[list[bool]]:
    """A plan's ``steps x units`` grid stretched or shrunk to ``num_steps`` rows.

    Step ``i`` of the new trajectory takes the row of the plan's step at the same fraction of the
    trajectory (``round(i * (S - 1) / (N - 1))``), so early / late compute stays early / late;
    step 0 stays all-compute. This is an approximation the user asks for (``resample=True``):
    a plan searched for the step count in use is better, and the kept MACs change with the rows.
    """
    if num_steps < 1:
        raise PlanError(f"cannot resample a plan to {num_steps} sampling steps")
    rows = [list(r) for r in compute]
    if num_steps == len(rows):
        return rows
    last = len(rows) - 1
    grid = [rows[round(i * last / (num_steps - 1))] if num_steps > 1 else rows[0] for i in range(num_steps)]
    grid[0] = [True] * len(rows[0])
    return [list(r) for r in grid]


def validate_plan(plan: Plan, supernet: ReuseSuperNet) -> None:
    """Check that ``plan`` fits ``supernet`` (model class, blocks, step count, sampler; a solver
    schedule: the reference's); raises PlanError."""
    check_plan_fits(plan, supernet.model_class, supernet.block_names, supernet.num_steps, supernet.config.scheduler)


def grid_plan(plan: Plan) -> Plan:
    """The plan on the reference's ``steps x blocks`` grid: the plan itself, or for a solver
    schedule the forecast plan it beat (``meta.forecast_plan``), which the report still shows."""
    if plan.payload.schedule is None:
        return plan
    kept = plan.meta.get("forecast_plan")
    if kept is None:
        raise PlanError("this solver-schedule plan does not record the forecast plan it was compared with")
    meta = {k: v for k, v in plan.meta.items() if k not in ("solver_schedule", "forecast_plan")}
    meta["scheduler"] = plan.payload.schedule.reference_scheduler
    if kept.get("keep_probs") is not None:
        meta["keep_probs"] = kept["keep_probs"]
    return Plan(kind="reuse", model=plan.model, blocks=plan.blocks, compute=kept["compute"], target=plan.target,
                cost_ratio=float(kept["cost_ratio"]), num_steps=len(kept["compute"]), meta=meta)
