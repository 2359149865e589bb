"""Static cache baselines at the same MACs as a dipgo plan, and diffusers' own cache hooks.

A learned reuse plan is only worth something if it beats the simple schedules at equal cost.
Every static baseline here is a dipgo :class:`~dipgo.postprocess.plan.Plan` (kind ``reuse``, a
``steps x blocks`` grid, ``True`` = compute) for the same :class:`ReuseSuperNet`, so it runs through
the same ``install_plan`` SubNet, is timed by the same loop and gets its MACs from the same
cascade-aware ``supernet.plan_cost``: any difference to dipgo comes from the schedule, never from
the measurement.

* ``deepcache`` (DeepCache, Ma et al. 2024): every ``interval``-th step is full; in between only the
  shallow branch runs, the first ``branch`` down blocks and the last ``branch`` up blocks. The up
  block that reads the shallow skip tensors is computed; its deeper input (the previous up block's
  output) comes from the cache, and the deeper down blocks and the mid block are reused (the
  cascade would skip them anyway: nobody computed reads them). UNets only.
* ``uniform`` (FORA style, Selvaraju et al. 2024): every ``interval``-th step is full, every gated
  unit is reused in between (residual replay for transformer blocks). Any model.
* ``static_per_block`` (Learning-to-Cache style, Ma et al. 2024, without training): each unit gets
  its own reuse interval; units whose cached quantity changes least between adjacent steps (measured
  on a calibration trajectory, :func:`block_change_scores`) get the longest intervals.
* ``random``: random slots closed until the budget holds, then re-opened greedily, the same
  procedure as ``extract_reuse_plan`` with random instead of learned probabilities: what the pruner
  adds over chance. It runs with the SuperNet's forecast order (the same closed-slot behaviour as
  the dipgo plan), so it isolates the schedule.
* ``taylorseer1`` / ``taylorseer2`` (TaylorSeer, Liu et al. ICCV 2025, training-free forecasting):
  the ``uniform`` schedule, but a closed unit *forecasts* its output (or residual) by a first /
  second order extrapolation from its computed steps instead of copying it
  (:mod:`dipgo.supernets.forecast`).

The published schedules above (DeepCache, FORA, Learning-to-Cache) copy: their plans record
forecast order 0, whatever the SuperNet's.

``fewer_steps`` is not a plan (it changes the step count); the report builds it.

diffusers' cache hooks (diffusers 0.42.1, ``diffusers.hooks``), checked on ``DiTTransformer2DModel``
and ``UNet2DModel``:

* ``first_block_cache`` (``FirstBlockCacheConfig`` / ``apply_first_block_cache``): looks for direct
  children of the model that are ``nn.ModuleList`` named one of diffusers'
  ``_ALL_TRANSFORMER_BLOCK_IDENTIFIERS`` (``blocks``, ``transformer_blocks``, ``layers``, ...) whose
  block class is registered in ``diffusers.hooks._helpers.TransformerBlockRegistry``, and its
  stateful hooks need a cache context (``CacheMixin.cache_context``). DiT applies: its
  ``transformer_blocks`` are ``BasicTransformerBlock``, which is registered; ``DiTTransformer2DModel``
  is not a ``CacheMixin``, so we set the context ourselves before every call. ``UNet2DModel`` does
  not: its children are ``down_blocks`` / ``up_blocks`` (not identifiers) and ``DownBlock2D`` etc. are
  not registered, so ``apply_first_block_cache`` fails with ``IndexError: pop from empty list``.
* ``pyramid_attention_broadcast`` (``PyramidAttentionBroadcastConfig`` /
  ``apply_pyramid_attention_broadcast``): hooks every diffusers ``Attention`` whose module path
  matches a block identifier by ``re.search`` and reuses its whole output every
  ``spatial_attention_block_skip_range`` calls within a timestep range. DiT applies
  (``transformer_blocks.*.attn1``); ``UNet2DModel`` applies too, to the attentions of its Attn blocks
  (the identifier ``"blocks"`` matches inside ``"down_blocks.1.attentions.0"``). Only attention is
  cached, so its MACs saving is bounded by the attention share.
* ``faster_cache`` (``FasterCacheConfig`` / ``apply_faster_cache``): a denoiser hook that
  approximates the unconditional CFG half in the frequency domain plus attention hooks on paths
  matching ``^blocks.*attn`` / ``^transformer_blocks.*attn`` / ... DiT applies
  (``transformer_blocks.*.attn1``; ``class_labels`` must be added to the kwargs it splits, which we
  do, and without CFG it must run as ``is_guidance_distilled``, which we set from
  ``guidance_scale``). ``UNet2DModel`` does not: none of its attentions match those anchored
  patterns, so only the CFG-branch approximation would run, which is not a feature cache; we refuse
  it rather than report it as one.

:func:`diffusers_cache_variant` applies one of them for the duration of a ``with`` block (the model
is restored exactly afterwards), so the report samples and times it through the same loop;
:func:`measure_cache_variant` measures its executed fraction and MACs ratio over one trajectory by
counting what really ran (forward hooks and torch's FLOP counter), never from a formula: these
methods decide at run time (First Block Cache's threshold) or change the batch (FasterCache).
"""

from __future__ import annotations

import inspect
import logging
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from dipgo.errors import PlanError
from dipgo.postprocess.plan import Plan, ReusePayload
from dipgo.postprocess.reuse_plan import check_reachable, extract_reuse_plan
from dipgo.supernets.reuse import ReuseSuperNet

log = logging.getLogger(__name__)

PLAN_BASELINES: tuple[str, ...] = ("deepcache", "uniform", "static_per_block", "random", "taylorseer1", "taylorseer2")
# what a closed unit of each baseline returns: 0 = a copy (as published); None = the SuperNet's order
BASELINE_ORDERS: dict[str, int | None] = {
    "deepcache": 0, "uniform": 0, "static_per_block": 0, "random": None, "taylorseer1": 1, "taylorseer2": 2,
}
DIFFUSERS_CACHES: tuple[str, ...] = ("first_block_cache", "pyramid_attention_broadcast", "faster_cache")
DEFAULT_INTERVALS: tuple[int, ...] = tuple(range(2, 11))
# kwargs holding the batched [uncond, cond] halves that FasterCache must split (diffusers' default
# list lacks class_labels, which class-conditional DiTs need)
FASTER_CACHE_SPLIT_KWARGS: tuple[str, ...] = (
    "hidden_states", "encoder_hidden_states", "timestep", "attention_mask", "encoder_attention_mask", "class_labels",
)

Grid = list[list[bool]]


class BaselineNotApplicable(ValueError):
    """The baseline cannot be built for this model or budget (the message says why)."""


# ----------------------------------------------------------------------------- shared helpers


def _meta(supernet: ReuseSuperNet, name: str, label: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """What ``install_plan`` needs to rebuild the units, plus the baseline's name and parameters."""
    cfg = supernet.config
    order = BASELINE_ORDERS.get(name)
    return {
        "baseline": name,
        "label": label,
        "params": dict(params),
        **ReusePayload(cfg.granularity, cfg.mode, supernet.modes, cfg.forecast_order if order is None else order,
                     cfg.whole_step_skip).to_meta(),
        "scheduler": cfg.scheduler,
        "guidance_scale": cfg.guidance_scale,
    }


def _make_plan(supernet: ReuseSuperNet, grid: Grid, target: float | None, name: str, label: str,
               params: Mapping[str, Any]) -> Plan:
    """A reuse Plan from a raw grid: the cascade is applied so the grid says what really runs."""
    compute = (supernet.effective(torch.tensor(grid, dtype=torch.float64)) > 0.5).tolist()
    cost = supernet.plan_cost(compute)
    meta = _meta(supernet, name, label, params) | {"cost_ratio": cost}
    return Plan(kind="reuse", model=supernet.model_class, blocks=supernet.block_names, compute=compute,
                target=float(cost if target is None else target), cost_ratio=cost,
                num_steps=supernet.num_steps, meta=meta)


def _grid_costs(supernet: ReuseSuperNet, grids: torch.Tensor) -> torch.Tensor:
    """Kept-cost ratios of ``(C, S, B)`` hard grids in one cascade pass, ``-> (C,)``.

    The cascade acts within a step, so stacking candidates along the step axis evaluates all of
    them with one call of ``supernet.effective`` (searches try hundreds of grids).
    """
    c, s, b = grids.shape
    eff = supernet.effective(grids.reshape(c * s, b).to(torch.float64)).reshape(c, s, b)
    eff = (eff > 0.5).to(torch.float64)
    macs = torch.tensor(supernet.unit_macs, dtype=torch.float64)  # (B,)
    total = supernet.paid_steps(eff) * supernet.always_paid_macs + (eff * macs).sum(dim=(1, 2))
    return total / supernet.full_cost()


def _interval_grid(num_steps: int, interval: int, partial: Sequence[bool]) -> Grid:
    """Full rows at steps ``0, interval, 2 * interval, ...``; ``partial`` in between."""
    width = len(partial)
    return [[True] * width if s % interval == 0 else list(partial) for s in range(num_steps)]


def _check_interval(interval: int) -> None:
    if not isinstance(interval, int) or interval < 1:
        raise ValueError(f"interval must be a positive integer (1 = every step full), got {interval!r}")


def _check_target(supernet: ReuseSuperNet, target: float) -> None:
    """Refuse targets outside (0, 1]; a target below the reachable floor does not apply here."""
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target must be a kept-cost ratio in (0, 1], got {target}")
    try:
        check_reachable(supernet, target)
    except PlanError as exc:
        raise BaselineNotApplicable(str(exc)) from None


# ----------------------------------------------------------------------------- DeepCache

_UNET_UNIT = re.compile(r"^(?:down_blocks\.(?P<down>\d+)|(?P<mid>mid_block)|up_blocks\.(?P<up>\d+))(?:\.|$)")


def _unet_stages(supernet: ReuseSuperNet) -> list[tuple[str, int]]:
    """``("down", i)`` / ``("mid", 0)`` / ``("up", j)`` of every unit (blocks or their layers).

    Raises :class:`BaselineNotApplicable` for models whose units are not UNet blocks, because the
    shallow branch is only defined by the down/up pairing of a UNet.
    """
    stages: list[tuple[str, int]] = []
    for name in supernet.block_names:
        m = _UNET_UNIT.match(name)
        if m is None:
            raise BaselineNotApplicable(
                f"deepcache needs a UNet whose gated units are down_blocks.i / mid_block / up_blocks.j, but "
                f"{supernet.model_class} has {', '.join(supernet.block_names[:3])}...: "
                "use 'uniform' or 'static_per_block' for transformer denoisers"
            )
        kind = "down" if m["down"] is not None else "mid" if m["mid"] else "up"
        stages.append((kind, int(m["down"] or m["up"] or 0)))
    if not any(k == "down" for k, _ in stages) or not any(k == "up" for k, _ in stages):
        raise BaselineNotApplicable(f"deepcache needs both down and up blocks; {supernet.model_class} lacks one side")
    return stages


def _num_down(stages: Sequence[tuple[str, int]]) -> int:
    return 1 + max(i for k, i in stages if k == "down")


def _shallow_row(stages: Sequence[tuple[str, int]], branch: int) -> list[bool]:
    """Units of the skip branch at depth ``branch``: down blocks ``< branch``, the last ``branch`` up blocks."""
    n_up = 1 + max(i for k, i in stages if k == "up")
    return [(k == "down" and i < branch) or (k == "up" and i >= n_up - branch) for k, i in stages]


def deepcache_plan(supernet: ReuseSuperNet, interval: int, branch: int) -> Plan:
    """DeepCache's uniform schedule: full steps every ``interval``, the shallow branch in between.

    ``branch`` counts UNet levels from the top: 1 computes ``down_blocks.0`` and the last up block
    (which reads ``down_blocks.0``'s skip tensors fresh and the previous up block's output from the
    cache), ``len(down_blocks)`` reuses only the mid block. Deeper down blocks, the mid block and
    deeper up blocks are closed; the stored grid is the cascade-applied one. Raises
    :class:`BaselineNotApplicable` (a ``ValueError``) for non-UNet models.
    """
    _check_interval(interval)
    stages = _unet_stages(supernet)
    n_down = _num_down(stages)
    if not isinstance(branch, int) or not 1 <= branch <= n_down:
        raise ValueError(f"branch must be an integer in 1..{n_down} (the UNet's down blocks), got {branch!r}")
    grid = _interval_grid(supernet.num_steps, interval, _shallow_row(stages, branch))
    return _make_plan(supernet, grid, None, "deepcache", f"DeepCache N={interval} b={branch}",
                      {"interval": interval, "branch": branch})


# ----------------------------------------------------------------------------- uniform (FORA)


def uniform_reuse_plan(supernet: ReuseSuperNet, interval: int, forecast_order: int = 0) -> Plan:
    """FORA-style schedule: every ``interval``-th step full, every unit reused in between.

    Valid for any model; on transformer blocks in residual mode a reused block replays its cached
    residual on the current input (FORA), on UNet blocks the cached outputs. With
    ``forecast_order`` 1 or 2 the reused units extrapolate instead (TaylorSeer).
    """
    _check_interval(interval)
    grid = _interval_grid(supernet.num_steps, interval, [False] * len(supernet.block_names))
    if forecast_order == 0:
        return _make_plan(supernet, grid, None, "uniform", f"uniform reuse N={interval}", {"interval": interval})
    name = f"taylorseer{forecast_order}"
    return _make_plan(supernet, grid, None, name, f"TaylorSeer o{forecast_order} N={interval}", {"interval": interval})


# ----------------------------------------------------------------------------- change scores


def _tensor_leaves(value: Any) -> torch.Tensor:
    leaves = [v.detach().float().flatten() for v in pytree.tree_leaves(value) if isinstance(v, torch.Tensor)]
    return torch.cat(leaves)


def _first_tensor(value: Any) -> torch.Tensor:
    return value[0] if isinstance(value, (tuple, list)) else value


class _ChangeMeter:
    """Mean relative change between adjacent steps of what a unit's cache would hold.

    Output-mode units cache their whole output; residual-mode units cache ``unit(x) - x`` and replay
    it on the current input, so the error of reusing them is the change of that residual.
    """

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.prev: torch.Tensor | None = None
        self.total = 0.0
        self.count = 0

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        if self.mode == "residual":
            x = args[0] if args else kwargs["hidden_states"]
            value = (_first_tensor(output) - x).detach().float().flatten()
        else:
            value = _tensor_leaves(output)
        if self.prev is not None:
            self.total += float((value - self.prev).norm() / (self.prev.norm() + 1e-12))
            self.count += 1
        self.prev = value

    @property
    def score(self) -> float:
        return self.total / max(1, self.count)


def block_change_scores(supernet: ReuseSuperNet, batch: Mapping[str, Any]) -> dict[str, float]:
    """``{unit: mean_s ||c_s - c_{s-1}|| / ||c_{s-1}||}`` over one full trajectory of ``batch``.

    ``c_s`` is what the unit's reuse cache would hold at step ``s`` (its output, or its residual in
    residual mode). Low scores mark units that are cheap to reuse. Runs the plain model (every unit
    computed) through the SuperNet's reference path, with forward hooks that are removed afterwards.
    """
    meters = {u.name: _ChangeMeter(u.mode) for u in supernet.units}
    handles = [u.module.register_forward_hook(meters[u.name], with_kwargs=True) for u in supernet.units]
    try:
        supernet.reference(batch)
    finally:
        for h in handles:
            h.remove()
    return {name: m.score for name, m in meters.items()}


# ----------------------------------------------------------------------------- static per block


def _periodic_grid(num_steps: int, intervals: Sequence[int]) -> Grid:
    """Unit ``b`` computed at steps ``0, k_b, 2 k_b, ...`` (phases aligned, so a deep block is
    computed at the same steps as its consumers and the cascade can free it in between)."""
    return [[s % k == 0 for k in intervals] for s in range(num_steps)]


def _next_interval(num_steps: int, k: int) -> int | None:
    """Smallest interval longer than ``k`` that computes fewer steps (``None``: only step 0 left)."""
    fewer = math.ceil(num_steps / k) - 1
    return None if fewer < 1 else math.ceil(num_steps / fewer)


def _score_vector(supernet: ReuseSuperNet, scores: Mapping[str, float] | None) -> list[float]:
    if scores is None:
        return [1.0] * len(supernet.block_names)
    missing = [b for b in supernet.block_names if b not in scores]
    if missing:
        raise ValueError(f"change scores are missing for {', '.join(missing[:3])}: pass one score per gated unit")
    return [max(float(scores[b]), 1e-12) for b in supernet.block_names]


def _allocate_intervals(supernet: ReuseSuperNet, target: float,
                        score: Sequence[float]) -> tuple[list[int], list[int] | None]:
    """Greedy: lengthen the interval with the best (MACs saved / change score) until cost <= target.

    Savings are cascade-aware (lengthening ``up_blocks.0`` also frees what only it reads). Returns
    the final intervals and those before the last move (``None`` when no move was needed), whose
    cost is still above the target: the slot-level refinement starts from there.
    """
    steps = supernet.num_steps
    k, before = [1] * len(score), None
    cost = float(_grid_costs(supernet, torch.tensor([_periodic_grid(steps, k)]))[0])
    while cost > target + 1e-12:
        moves = [(b, nk) for b, kb in enumerate(k) if (nk := _next_interval(steps, kb)) is not None]
        if not moves:
            break
        trial = [k[:b] + [nk] + k[b + 1:] for b, nk in moves]
        costs = _grid_costs(supernet, torch.tensor([_periodic_grid(steps, t) for t in trial])).tolist()
        pick = _pick_move(cost, costs, [score[b] for b, _ in moves], target)
        before, k, cost = k, trial[pick], costs[pick]
    return k, before


def _pick_move(cost: float, costs: Sequence[float], scores: Sequence[float], target: float) -> int:
    """Index of the next move: the best (MACs saved / change score) while above budget.

    Once some move reaches the budget, the one landing closest below it wins (the last item of a
    budgeted greedy: overshooting wastes budget the learned plan gets to use). With no saving at
    all, the least-changing unit moves (its next lengthening may free a cascade), so the loop
    always progresses and ends after at most ``B * S`` moves.
    """
    n = range(len(costs))
    landing = [i for i in n if costs[i] <= target + 1e-12]
    if landing:
        return max(landing, key=lambda i: (costs[i], -scores[i], -i))
    saved = [cost - c for c in costs]
    if max(saved) > 1e-12:
        return max(n, key=lambda i: (saved[i] / scores[i], -i))
    return min(n, key=lambda i: (scores[i], i))


def _reopen(supernet: ReuseSuperNet, grid: Grid, slots: Sequence[tuple[int, int]], target: float) -> Grid:
    """Re-open closed slots in order while the cascade-aware cost stays within ``target``."""
    rows = [supernet.step_macs(row) for row in grid]
    full, total = supernet.full_cost(), sum(rows)
    for s, b in slots:
        if grid[s][b]:
            continue
        grid[s][b] = True
        new = supernet.step_macs(grid[s])
        if (total - rows[s] + new) / full <= target + 1e-12:
            total, rows[s] = total - rows[s] + new, new
        else:
            grid[s][b] = False
    return grid


def _close_slots(supernet: ReuseSuperNet, intervals: Sequence[int], score: Sequence[float], target: float) -> Grid:
    """From a schedule still above budget, close single slots of the least-changing units first.

    Runs ``extract_reuse_plan`` with keep probabilities that close the schedule's reused slots
    first and then whole units in order of increasing change score (earlier steps first), so the
    plan lands within one slot of the target where whole interval moves jump past it.
    """
    grid = _periodic_grid(supernet.num_steps, intervals)
    rank = {b: r for r, b in enumerate(sorted(range(len(score)), key=lambda b: (score[b], b)))}
    probs = [[(1 + rank[b]) / (1 + len(score)) if grid[s][b] else 0.0 for b in range(len(score))]
             for s in range(1, supernet.num_steps)]  # (S-1, B)
    return extract_reuse_plan(torch.tensor(probs, dtype=torch.float64), supernet, target).compute


def static_per_block_plan(supernet: ReuseSuperNet, target: float,
                          scores: Mapping[str, float] | None = None) -> Plan:
    """Learning-to-Cache-style static schedule: one reuse interval per unit, cost <= ``target``.

    ``scores`` (from :func:`block_change_scores`) rank how much each unit's cache goes stale per
    step; ``None`` treats all units alike (intervals then follow MACs only). Intervals come from a
    greedy (:func:`_allocate_intervals`). Whole interval moves are coarse (one move can free a
    whole cascade at many steps), so two landings are compared and the one closer to the target
    kept: the final intervals with slots of the most-changing units re-opened while the budget
    holds, or the intervals before the last move with single slots of the least-changing units
    closed. ``plan.meta["params"]`` holds the intervals, the landing used and the scores.
    """
    _check_target(supernet, target)
    score = _score_vector(supernet, scores)
    final, before = _allocate_intervals(supernet, target, score)
    order = sorted(range(len(score)), key=lambda b: (-score[b], b))  # most changing first
    slots = [(s, b) for b in order for s in range(1, supernet.num_steps)]
    options = [(final, "reopen", _reopen(supernet, _periodic_grid(supernet.num_steps, final), slots, target))]
    if before is not None:
        options.append((before, "close_slots", _close_slots(supernet, before, score, target)))
    intervals, landing, grid = max(options, key=lambda o: supernet.plan_cost(o[2]))
    params = {"intervals": dict(zip(supernet.block_names, intervals)), "landing": landing,
              "scores": None if scores is None else {b: round(v, 6) for b, v in zip(supernet.block_names, score)}}
    return _make_plan(supernet, grid, target, "static_per_block", "static per-block intervals", params)


# ----------------------------------------------------------------------------- random


def random_plan(supernet: ReuseSuperNet, target: float, seed: int) -> Plan:
    """Random slots closed until cost <= ``target`` (cascade-aware), then re-opened greedily.

    Exactly ``extract_reuse_plan`` fed with uniform random keep probabilities from ``seed``: the
    same budget procedure as the learned plan, so the gap between them is what the pruner learned.
    """
    _check_target(supernet, target)
    probs = torch.rand(supernet.grid_shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    compute = extract_reuse_plan(probs, supernet, target).compute
    return _make_plan(supernet, compute, target, "random", f"random (seed {seed})", {"seed": seed})


# ----------------------------------------------------------------------------- dispatcher


def _closest(costs: Sequence[float], target: float, tolerance: float) -> int | None:
    """Index of the cost closest to ``target`` among those <= ``target * (1 + tolerance)``."""
    ok = [i for i, c in enumerate(costs) if c <= target * (1 + tolerance) + 1e-12]
    return min(ok, key=lambda i: (abs(costs[i] - target), i)) if ok else None


def _search(supernet: ReuseSuperNet, target: float, name: str, candidates: list[dict[str, int]],
            rows: list[list[bool]], build: Callable[..., Plan], tolerance: float) -> Plan:
    """Pick the interval-schedule parameters whose cost is closest to ``target`` (see :func:`_closest`)."""
    grids = torch.tensor([_interval_grid(supernet.num_steps, c["interval"], r) for c, r in zip(candidates, rows)])
    costs = _grid_costs(supernet, grids).tolist()
    best = _closest(costs, target, tolerance)
    if best is None:
        raise BaselineNotApplicable(
            f"{name}: no schedule in the searched grid costs at most {target * (1 + tolerance):.3f} "
            f"(cheapest {min(costs):.3f})"
        )
    plan = build(supernet, **candidates[best])
    plan.target = float(target)
    plan.meta["searched"] = len(candidates)
    return plan


def _deepcache_search(supernet: ReuseSuperNet, target: float, intervals: Sequence[int], tolerance: float) -> Plan:
    stages = _unet_stages(supernet)
    cands = [{"interval": n, "branch": b} for n in intervals for b in range(1, _num_down(stages) + 1)]
    rows = [_shallow_row(stages, c["branch"]) for c in cands]
    return _search(supernet, target, "deepcache", cands, rows, deepcache_plan, tolerance)


def _uniform_search(supernet: ReuseSuperNet, target: float, intervals: Sequence[int], tolerance: float,
                    forecast_order: int = 0) -> Plan:
    cands = [{"interval": n, "forecast_order": forecast_order} for n in intervals]
    rows = [[False] * len(supernet.block_names)] * len(cands)
    name = "uniform" if forecast_order == 0 else f"taylorseer{forecast_order}"
    return _search(supernet, target, name, cands, rows, uniform_reuse_plan, tolerance)


def _one_baseline(name: str, supernet: ReuseSuperNet, target: float, calib_batch: Mapping[str, Any] | None,
                  seed: int, intervals: Sequence[int], tolerance: float) -> Plan:
    if name == "deepcache":
        return _deepcache_search(supernet, target, intervals, tolerance)
    if name == "uniform":
        return _uniform_search(supernet, target, intervals, tolerance)
    if name in ("taylorseer1", "taylorseer2"):
        return _uniform_search(supernet, target, intervals, tolerance, int(name[-1]))
    if name == "static_per_block":
        if calib_batch is None:
            raise ValueError("static_per_block needs calib_batch= (a batch with 'noise') to measure block change scores")
        return static_per_block_plan(supernet, target, block_change_scores(supernet, calib_batch))
    return random_plan(supernet, target, seed)


def baseline_plans(
    supernet: ReuseSuperNet, target: float, names: Sequence[str], *,
    calib_batch: Mapping[str, Any] | None = None, seed: int = 0,
    intervals: Sequence[int] = DEFAULT_INTERVALS, tolerance: float = 0.02,
) -> tuple[dict[str, Plan], dict[str, str]]:
    """Build the named static baselines at (about) ``target`` kept-cost; ``-> (plans, skipped)``.

    Interval baselines (``deepcache``, ``uniform``) search ``intervals`` (and DeepCache branches
    ``1..len(down_blocks)``) for the cost closest to ``target`` but at most ``target * (1 +
    tolerance)``; ``static_per_block`` and ``random`` land just below ``target``. Each plan's
    ``meta`` holds ``baseline``, ``label``, ``params`` and the exact ``cost_ratio``. Baselines that do
    not apply (DeepCache on a DiT, a target out of reach) are left out and ``skipped[name]`` says why.
    Unknown names raise ``ValueError``. Needs the SuperNet still installed (costs, cascade, change
    scores), so call it before ``supernet.remove()``.
    """
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target must be a kept-cost ratio in (0, 1], got {target}")
    unknown = [n for n in names if n not in PLAN_BASELINES]
    if unknown:
        raise ValueError(f"unknown plan baseline(s) {', '.join(map(repr, unknown))}: "
                         f"expected any of {', '.join(PLAN_BASELINES)}")
    # intervals past the step count all mean "only step 0 is full": keep one of them
    searched = [n for n in dict.fromkeys(intervals) if 2 <= n <= supernet.num_steps] or [supernet.num_steps]
    plans: dict[str, Plan] = {}
    skipped: dict[str, str] = {}
    for name in dict.fromkeys(names):
        try:
            plans[name] = _one_baseline(name, supernet, target, calib_batch, seed, searched, tolerance)
        except (BaselineNotApplicable, PlanError) as exc:
            skipped[name] = str(exc)
            log.info("baseline %s skipped: %s", name, exc)
    return plans, skipped


# ----------------------------------------------------------------------------- diffusers hooks


@dataclass
class CacheVariant:
    """A diffusers cache hook installed by :func:`diffusers_cache_variant`.

    Attributes:
        name: the technique (one of ``DIFFUSERS_CACHES``).
        params: the config fields it was built with.
        units: module paths the technique can skip (transformer blocks or attention layers).
        calls: per unit, how often it was called since installation.
        executed: per unit, how often its original forward really ran (a parameterised layer inside
            it executed during the call).
    """

    name: str
    params: dict[str, Any]
    units: list[str]
    calls: dict[str, int] = field(default_factory=dict)
    executed: dict[str, int] = field(default_factory=dict)

    @property
    def executed_fraction(self) -> float:
        """Executed unit calls / unit calls (1.0 when nothing was counted)."""
        total = sum(self.calls.values())
        return sum(self.executed.values()) / total if total else 1.0

    @property
    def label(self) -> str:
        shown = {k: v for k, v in self.params.items() if isinstance(v, (int, float, str, tuple))}
        return f"{self.name} " + " ".join(f"{k}={v}" for k, v in shown.items())


_MISSING = object()


class _ModelSnapshot:
    """The forwards and diffusers hook registries of every module, to undo a cache hook exactly.

    diffusers' ``remove_hook`` leaves an instance ``forward`` attribute and empty registries behind;
    restoring both keeps the model identical to the plain one (and dipgo's own forward patches,
    which check that their closure is still in place, removable).
    """

    def __init__(self, model: nn.Module) -> None:
        self.modules = dict(model.named_modules())
        self.forwards = {n: m.__dict__.get("forward", _MISSING) for n, m in self.modules.items()}
        self.registries = {n: m.__dict__.get("_diffusers_hook", _MISSING) for n, m in self.modules.items()}
        self.hook_names = {n: list(r.hooks) for n, r in self.registries.items() if r is not _MISSING}

    def new_hooks(self) -> dict[str, list[str]]:
        """Module path -> names of hooks added since the snapshot."""
        out: dict[str, list[str]] = {}
        for n, m in self.modules.items():
            reg = m.__dict__.get("_diffusers_hook")
            added = [h for h in (reg.hooks if reg is not None else {}) if h not in self.hook_names.get(n, [])]
            if added:
                out[n] = added
        return out

    def restore(self) -> None:
        for n, added in self.new_hooks().items():
            for hook in reversed(added):
                self.modules[n]._diffusers_hook.remove_hook(hook, recurse=False)
        for n, m in self.modules.items():
            _restore_attr(m, "forward", self.forwards[n])
            _restore_attr(m, "_diffusers_hook", self.registries[n])
        root = self.modules[""].__dict__.get("_diffusers_hook")
        if root is not None:  # a registry the model had before: its child list went stale
            root.invalidate_child_registries_cache()


def _restore_attr(module: nn.Module, attr: str, value: Any) -> None:
    if value is _MISSING:
        module.__dict__.pop(attr, None)
    else:
        module.__dict__[attr] = value


def _timestep_index(model: nn.Module) -> int | None:
    names = [p.name for p in inspect.signature(model.forward).parameters.values()
             if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return names.index("timestep") if "timestep" in names else None


class _DenoiserClock:
    """A forward pre-hook on the denoiser: current timestep, trajectory resets, cache context.

    diffusers' hooks expect a pipeline to provide three things our sampling loop does not: a
    ``current_timestep_callback`` (PAB, FasterCache), a reset of their state between generations,
    and a cache context around each call (First Block Cache). The clock reads the timestep of each
    call, resets the stateful hooks when it stops decreasing (a new trajectory, as
    ``install_plan`` does), and sets the context ``"cond"`` (CFG halves are batched in one call).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.timestep = 1000.0
        self.step = -1
        self._last: float | None = None
        self._index = _timestep_index(model)
        self._handle = model.register_forward_pre_hook(self._before, with_kwargs=True)

    def __call__(self) -> float:
        return self.timestep

    def _before(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        from diffusers.hooks import HookRegistry
        from diffusers.hooks.hooks import CacheContext, _set_cache_context

        t = kwargs.get("timestep")
        if t is None and self._index is not None and len(args) > self._index:
            t = args[self._index]
        if t is None:
            raise ValueError("the denoiser was called without a timestep: diffusers' cache hooks need one")
        t = float(t.flatten()[0]) if isinstance(t, torch.Tensor) else float(t)
        registry = HookRegistry.check_if_exists_or_initialize(self.model)
        if self._last is None or t >= self._last:
            registry.reset_stateful_hooks(recurse=True)
            self.step = -1
        self.step, self._last, self.timestep = self.step + 1, t, t
        _set_cache_context(self.model, CacheContext("cond", step_index=self.step, timestep=t))

    def remove(self) -> None:
        self._handle.remove()


class _ExecutionCounter:
    """Counts calls of each unit and calls in which its own layers really ran.

    A diffusers hook replaces a skipped unit's forward, but ``nn.Module`` hooks on the unit still
    fire; a pre-hook on its parameterised leaf layers fires only when the original forward runs.
    Leaf calls outside the unit's call (DiT computes ``transformer_blocks.0.norm1.emb`` from the
    model's forward) are ignored.
    """

    def __init__(self, model: nn.Module, variant: CacheVariant) -> None:
        self.variant = variant
        self._active: dict[str, bool] = {}
        self._ran: dict[str, bool] = {}
        self._handles: list[Any] = []
        for name in variant.units:
            variant.calls[name], variant.executed[name] = 0, 0
            unit = model.get_submodule(name)
            self._handles.append(unit.register_forward_pre_hook(lambda *_, n=name: self._start(n)))
            self._handles.append(unit.register_forward_hook(lambda *_, n=name: self._stop(n)))
            for leaf in _leaves(unit):
                self._handles.append(leaf.register_forward_pre_hook(lambda *_, n=name: self._mark(n)))

    def _start(self, name: str) -> None:
        self._active[name], self._ran[name] = True, False

    def _mark(self, name: str) -> None:
        if self._active.get(name):
            self._ran[name] = True

    def _stop(self, name: str) -> None:
        self._active[name] = False
        self.variant.calls[name] += 1
        self.variant.executed[name] += int(self._ran[name])

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def _leaves(unit: nn.Module) -> list[nn.Module]:
    """Leaf submodules that own parameters (they run whenever the unit's forward does)."""
    return [m for m in unit.modules() if m is not unit and not any(True for _ in m.children())
            and any(True for _ in m.parameters(recurse=False))]


def _cache_config(name: str, params: dict[str, Any], clock: _DenoiserClock) -> Any:
    """The diffusers config dataclass of ``name``, with the callbacks our loop must provide."""
    from diffusers.hooks import FasterCacheConfig, FirstBlockCacheConfig, PyramidAttentionBroadcastConfig

    params = dict(params)
    if name == "first_block_cache":
        cls, extra = FirstBlockCacheConfig, {}
    elif name == "pyramid_attention_broadcast":
        cls = PyramidAttentionBroadcastConfig
        extra = {"spatial_attention_block_skip_range": 2, "current_timestep_callback": clock}
    else:
        cls = FasterCacheConfig
        guided = float(params.pop("guidance_scale", 1.0)) > 1.0
        extra = {"tensor_format": "BCHW", "is_guidance_distilled": not guided, "current_timestep_callback": clock,
                 "attention_weight_callback": lambda _: 0.5,
                 "_unconditional_conditional_input_kwargs_identifiers": list(FASTER_CACHE_SPLIT_KWARGS)}
    try:
        return cls(**(extra | params))
    except TypeError:
        fields = ", ".join(f for f in cls.__dataclass_fields__ if not f.startswith("_"))
        raise ValueError(f"unknown {name} parameter in {sorted(params)}: {cls.__name__} accepts {fields}") from None


def _first_block_cache_reason(model: nn.Module) -> str | None:
    """Why ``apply_first_block_cache`` cannot work on ``model`` (``None``: it can)."""
    from diffusers.hooks._common import _ALL_TRANSFORMER_BLOCK_IDENTIFIERS
    from diffusers.hooks._helpers import TransformerBlockRegistry

    blocks = [b for n, c in model.named_children()
              if n in _ALL_TRANSFORMER_BLOCK_IDENTIFIERS and isinstance(c, nn.ModuleList) for b in c]
    if len(blocks) < 2:
        return (f"first_block_cache needs at least 2 blocks in child ModuleLists named one of "
                f"{sorted(_ALL_TRANSFORMER_BLOCK_IDENTIFIERS)}; {type(model).__name__}'s children are "
                f"{', '.join(n for n, _ in model.named_children())}")
    for block in blocks:
        try:
            TransformerBlockRegistry.get(type(block))
        except ValueError:
            return f"first_block_cache: block class {type(block).__name__} is not in diffusers' TransformerBlockRegistry"
    return None


def _apply(model: nn.Module, name: str, config: Any) -> None:
    from diffusers.hooks import apply_faster_cache, apply_first_block_cache, apply_pyramid_attention_broadcast

    if name == "first_block_cache":
        reason = _first_block_cache_reason(model)
        if reason is not None:
            raise BaselineNotApplicable(reason)
        apply_first_block_cache(model, config)
    elif name == "pyramid_attention_broadcast":
        apply_pyramid_attention_broadcast(model, config)
    else:
        apply_faster_cache(model, config)


def _targets(name: str, model: nn.Module, added: Mapping[str, list[str]]) -> list[str]:
    """Units the technique can skip: hooked submodules (the root's denoiser hook is not a unit)."""
    units = [path for path in added if path]
    if not units:
        where = "transformer blocks" if name == "first_block_cache" else "attention layers"
        raise BaselineNotApplicable(
            f"{name} found no {where} to cache in {type(model).__name__} (diffusers matches attention module "
            "paths against its block identifiers, e.g. ^transformer_blocks.*attn for FasterCache)"
        )
    return units


@contextmanager
def diffusers_cache_variant(model: nn.Module, name: str, *, count_executions: bool = True,
                            **params: Any) -> Iterator[CacheVariant]:
    """Apply one of diffusers' cache hooks to ``model`` inside a ``with`` block; restore it after.

    ``params`` are fields of the technique's diffusers config (``threshold`` for
    ``first_block_cache``; ``spatial_attention_block_skip_range``,
    ``spatial_attention_timestep_skip_range`` for ``pyramid_attention_broadcast``; for
    ``faster_cache`` its config fields plus ``guidance_scale``, which must match the sampling loop's
    so the CFG halves are split correctly). The timestep callback and the per-trajectory resets come
    from a pre-hook on the model, so any caller of the model (dipgo's sampling loop) gets the cached
    variant. The yielded :class:`CacheVariant` counts unit calls and real executions; time it with
    ``count_executions=False`` (the counting hooks cost Python overhead per layer). Raises
    :class:`BaselineNotApplicable` when the technique finds nothing to cache in this model.
    """
    from diffusers.hooks import HookRegistry

    if name not in DIFFUSERS_CACHES:
        raise ValueError(f"unknown diffusers cache {name!r}: expected one of {', '.join(DIFFUSERS_CACHES)}")
    snapshot = _ModelSnapshot(model)
    clock = _DenoiserClock(model)
    counter: _ExecutionCounter | None = None
    try:
        _apply(model, name, _cache_config(name, params, clock))
        HookRegistry.check_if_exists_or_initialize(model).invalidate_child_registries_cache()
        variant = CacheVariant(name=name, params=dict(params), units=_targets(name, model, snapshot.new_hooks()))
        counter = _ExecutionCounter(model, variant) if count_executions else None
        yield variant
    finally:
        if counter is not None:
            counter.remove()
        clock.remove()
        snapshot.restore()


def diffusers_cache_reason(model: nn.Module, name: str, **params: Any) -> str | None:
    """Why ``name`` does not apply to ``model`` (``None``: it does); applies and removes it to check."""
    try:
        with diffusers_cache_variant(model, name, count_executions=False, **params):
            return None
    except BaselineNotApplicable as exc:
        return str(exc)


def measure_cache_variant(model: nn.Module, name: str, trajectory: Callable[[], Any],
                          **params: Any) -> dict[str, Any]:
    """Executed fraction and MACs ratio of a diffusers cache over one trajectory, as measured.

    ``trajectory()`` samples one full trajectory with ``model`` (e.g. the report's
    ``lambda: run(batch, steps)``). It runs twice under torch's FLOP counter, plain and with the
    hook: ``macs_ratio`` is the ratio of what really ran (FasterCache's halved CFG batches included;
    its FFT approximation is elementwise and uncounted, as in every MAC table), and
    ``executed_fraction`` is executed unit calls / unit calls from forward hooks.
    """
    from dipgo.measure.macs import count_macs

    full, _ = count_macs(trajectory)
    with diffusers_cache_variant(model, name, **params) as variant:
        cached, _ = count_macs(trajectory)
    return {
        "name": name,
        "label": variant.label,
        "params": variant.params,
        "units": variant.units,
        "unit_calls": sum(variant.calls.values()),
        "unit_executions": sum(variant.executed.values()),
        "executed_fraction": variant.executed_fraction,
        "macs_ratio": cached / full if full else 1.0,
    }
