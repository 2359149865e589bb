"""TeaCache-style baseline: skip a whole step while the modulated input has barely changed.

TeaCache (Liu et al., CVPR 2025) decides *at run time*: before each denoiser call it measures the
relative L1 change of the timestep-embedding-modulated input against the previous step's,
accumulates it over skipped steps, and reuses the last computed step's output (residual) while
the sum stays below a threshold; otherwise it computes the step and resets the sum. The first and
the last step are always computed. Here it runs on dipgo's reuse units, so a skipped step is
exactly a row of closed units in a plan: on a DiT every block replays its cached residual
(``x + sum of residuals`` = TeaCache's cached residual of the whole stack), on a UNet every block
returns its cached output (the last noise prediction).

What is simplified, and why: TeaCache fits a polynomial per model that rescales the input change
to the output change; that fit needs reference runs of each model and is a calibration dipgo's
search replaces, so the raw relative L1 change is used and the threshold alone is chosen (by
bisection on calibration noise) to meet the plan's MACs. The indicator is the first block's
modulated input on DiTs (``transformer_blocks[0].norm1``, AdaLayerNormZero) and, for UNets (which
modulate inside every resnet), the stem's features next to the time(+class) embedding.

The decisions depend on the batch, so the MACs are those of the decisions really taken
(:attr:`TeaCacheHandle.grids`, costed by the SuperNet's cascade-aware ``plan_cost``; the indicator
is charged as part of the always-paid stem and head).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from diffusers.hooks.hooks import CacheContext
from torch import nn

from dipgo.errors import PlanError
from dipgo.postprocess.plan import Plan, ReusePayload
from dipgo.postprocess.reuse_subnet import ReusePlanHandle
from dipgo.supernets.adapters import ConsumerGraph, get_reuse_adapter
from dipgo.supernets.reuse import ReuseHooks, StepState

Indicator = Callable[[tuple[Any, ...], dict[str, Any]], torch.Tensor]


def _arg(args: tuple[Any, ...], kwargs: dict[str, Any], name: str) -> Any:
    return args[0] if args else kwargs[name]


def _unet_indicator(model: nn.Module) -> Indicator:
    def indicator(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
        x = _arg(args, kwargs, "sample")
        t = torch.as_tensor(kwargs["timestep"], device=x.device).reshape(-1).expand(x.shape[0])
        emb = model.time_embedding(model.time_proj(t).to(x.dtype))
        labels = kwargs.get("class_labels")
        if getattr(model, "class_embedding", None) is not None and labels is not None:
            emb = emb + model.class_embedding(labels).to(x.dtype)
        return torch.cat([model.conv_in(x).flatten(1), emb.flatten(1)], dim=1)

    return indicator


def _dit_indicator(model: nn.Module) -> Indicator:
    def indicator(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
        x = model.pos_embed(_arg(args, kwargs, "hidden_states"))
        out = model.transformer_blocks[0].norm1(x, kwargs["timestep"], kwargs.get("class_labels"), hidden_dtype=x.dtype)
        return (out[0] if isinstance(out, tuple) else out).flatten(1)

    return indicator


def teacache_indicator(model: nn.Module) -> Indicator:
    """The modulated-input function of ``model``; ``PlanError`` for classes it is not defined on."""
    name = type(model).__name__
    if name in ("UNet2DModel", "UNet2DConditionModel"):
        return _unet_indicator(model)
    if name == "DiTTransformer2DModel":
        return _dit_indicator(model)
    raise PlanError(f"the TeaCache-style baseline knows the modulated input of UNet2DModel, "
                    f"UNet2DConditionModel and DiTTransformer2DModel, not {name}")


def _rel_l1(new: torch.Tensor, old: torch.Tensor) -> float:
    return float((new - old).abs().mean() / old.abs().mean().clamp_min(1e-12))


class TeaCacheHandle(ReusePlanHandle):
    """An installed TeaCache schedule; :attr:`grids` holds the decisions of every trajectory run."""

    def __init__(self, model: nn.Module, plan: Plan, hooks: ReuseHooks, graph: ConsumerGraph,
                 threshold: float, indicator: Indicator) -> None:
        self.threshold = float(threshold)
        self._indicator = indicator
        self.grids: list[list[list[bool]]] = []
        self._previous: torch.Tensor | None = None
        self._accumulated = 0.0
        self._width = len(plan.blocks)
        super().__init__(model, plan, hooks, graph, 0)  # rows are decided call by call

    def reset(self) -> None:
        super().reset()
        self._previous, self._accumulated = None, 0.0

    def _before_call(self, args: tuple[Any, ...], kwargs: dict[str, Any], context: CacheContext | None) -> None:
        super()._before_call(args, kwargs, context)
        if self.current_step == 0 and self._pass == 0:  # a new trajectory
            self.grids.append([])
        with torch.no_grad():
            current = self._indicator(args, kwargs)
        last = self.current_step in (0, len(self._compute) - 1)
        if self._previous is not None:
            self._accumulated += _rel_l1(current, self._previous)
        compute = last or self._previous is None or self._accumulated >= self.threshold
        if compute:
            self._accumulated = 0.0
        self._previous = current
        row = tuple([compute] * self._width)
        self._compute[self.current_step] = row
        self.grids[-1].append(list(row))
        self._hooks.runtime.state = StepState(hard=True, compute=row, caches=self._caches, step=self.current_step,
                                              order=0)


def install_teacache(model: nn.Module, num_steps: int, threshold: float, granularity: str = "block",
                     mode: str = "auto") -> TeaCacheHandle:
    """Run ``model`` with TeaCache-style step skipping until ``handle.remove()``."""
    indicator = teacache_indicator(model)
    adapter = get_reuse_adapter(model)
    units = adapter.units(model, granularity, mode)
    width = len(units)
    plan = Plan(kind="reuse", model=type(model).__name__, blocks=[u.name for u in units],
                compute=[[True] * width for _ in range(num_steps)], target=1.0, cost_ratio=1.0,
                num_steps=num_steps, meta=ReusePayload(granularity, mode, [u.mode for u in units]).to_meta())
    hooks = ReuseHooks(model, units)
    return TeaCacheHandle(model, plan, hooks, adapter.graph(model, units, granularity), threshold, indicator)


def calibrate_threshold(
    cost: Callable[[float], float], target: float, *, high: float = 8.0, iterations: int = 14,
) -> tuple[float, float]:
    """``(threshold, cost)``: the largest threshold found whose cost is at most ``target``.

    ``cost(threshold)`` runs the schedule on calibration data and returns its kept-MACs ratio; it
    falls (not always strictly) as the threshold grows, so a bisection over ``[0, high]`` finds the
    budget's edge. ``PlanError`` when even ``high`` skips too little.
    """
    lo, hi = 0.0, float(high)
    hi_cost = cost(hi)
    if hi_cost > target:
        raise PlanError(f"teacache: even threshold {hi:g} keeps {hi_cost:.3f} of the MACs, above the target {target:.3f}")
    best = (hi, hi_cost)
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        c = cost(mid)
        if c <= target:
            hi, best = mid, (mid, c)
        else:
            lo = mid
    return best


def mean_cost(grids: Sequence[list[list[bool]]], plan_cost: Callable[[list[list[bool]]], float]) -> float:
    """Mean kept-MACs ratio of the trajectories a handle ran."""
    if not grids:
        raise PlanError("teacache: no trajectory was run, so there is no cost to report")
    return sum(plan_cost(g) for g in grids) / len(grids)
