"""A learned solver schedule: K full denoiser calls at learned timesteps, against the forecast plan.

At small budgets a reuse plan computes few whole steps of the reference trajectory and forecasts
the model output across long gaps; on models nobody tuned a recipe for, that drifts from the
sampler's distribution (docs/RESULTS.md: FD 1.2-1.6x the full model's at 20 % of a DPM-Solver++-25
trajectory), while a multistep solver with that many *real* steps does not. A solver's own step
spacing (the model folder's ``timestep_spacing``) is not tuned to the model either. So at the
plan's MACs this module also searches the K timesteps a multistep solver (UniPC or DPM-Solver++)
runs, K = the whole denoiser calls the budget pays for, by coordinate descent on the same
calibration score as the refinement (mean per-item log10 MSE of the final sample to the full
reference trajectory), starting from the solver's own spacing. The schedule only replaces the
forecast plan when it samples the calibration batch closer to the full model; either way the
plan records both scores (``meta.schedule_search``), and a schedule plan keeps the forecast plan it
beat so the report can show it.

Why coordinate descent: the score is a black box of K integers (each evaluation is K full calls on
a small batch, a fraction of a second on the digits models), the objective is smooth in each
timestep, and moves of 64, 32, ... training timesteps reach a local optimum in a few dozen
evaluations. Like the refinement, the score sees only the calibration pool, never the report's
evaluation noise.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dipgo.postprocess.plan import Plan, ReusePayload, SolverSchedule
from dipgo.search.config import ScheduleConfig
from dipgo.supernets.reuse import ReuseSuperNet
from dipgo.supernets.sampling import make_scheduler

Score = Callable[[torch.Tensor], float]


@dataclass(frozen=True)
class ScheduleResult:
    """What the schedule search found: the timesteps, their score, and what it took."""

    timesteps: list[int]
    score: float
    start: list[int]
    start_score: float
    evaluations: int
    seconds: float


def calls_in_budget(target: float, num_steps: int) -> int:
    """Whole denoiser calls a kept-MACs ``target`` pays for on a ``num_steps`` trajectory (at least 1)."""
    return max(1, math.floor(target * num_steps + 1e-9))


def solver_spacing(solver: str, scheduler_config: Mapping[str, Any] | None, calls: int) -> list[int]:
    """The ``calls`` timesteps the solver itself would run (the model folder's spacing)."""
    scheduler = make_scheduler(solver, scheduler_config)
    scheduler.set_timesteps(calls)
    return [int(t) for t in scheduler.timesteps]


def coordinate_descent(score_of: Callable[[list[int]], float], start: Sequence[int], moves: Sequence[int],
                       num_train_timesteps: int,
                       progress: Callable[[int, float], None] | None = None) -> tuple[list[int], float, int]:
    """Move one timestep at a time by each of ``moves`` (largest first) while the score drops.

    Timesteps stay strictly decreasing inside ``[0, num_train_timesteps)``. A move is taken only
    when it lowers the score by more than 1e-4 (log10 units), so ties and noise end the search.
    Returns ``(timesteps, score, evaluations)``.
    """
    best = list(start)
    best_score, evaluations = score_of(best), 1
    for move in moves:
        improved = True
        while improved:
            improved = False
            for j in range(len(best)):
                for delta in (move, -move):
                    cand = list(best)
                    cand[j] = min(num_train_timesteps - 1, max(0, cand[j] + delta))
                    if cand == best or any(a <= b for a, b in zip(cand, cand[1:])):
                        continue
                    value = score_of(cand)
                    evaluations += 1
                    if value < best_score - 1e-4:
                        best, best_score, improved = cand, value, True
        if progress is not None:
            progress(move, best_score)
    return best, best_score, evaluations


def learn_schedule(supernet: ReuseSuperNet, batch: Mapping[str, Any], reference: torch.Tensor, calls: int,
                   config: ScheduleConfig, score: Score,
                   progress: Callable[[int, float], None] | None = None) -> ScheduleResult:
    """The ``calls``-step schedule of ``config.solver`` that best reproduces ``reference``."""
    t0 = time.perf_counter()
    start = solver_spacing(config.solver, supernet.config.scheduler_config, calls)

    def score_of(timesteps: list[int]) -> float:
        return score(supernet.sample_schedule(batch, config.solver, timesteps))

    num_train = int(make_scheduler(config.solver, supernet.config.scheduler_config).config.num_train_timesteps)
    start_score = score_of(start)
    timesteps, value, evaluations = coordinate_descent(score_of, start, [int(m) for m in config.moves], num_train,
                                                       progress)
    return ScheduleResult(timesteps, value, start, start_score, evaluations + 1, time.perf_counter() - t0)


def schedule_plan(plan: Plan, supernet: ReuseSuperNet, result: ScheduleResult, solver: str,
                  forecast_score: float) -> Plan:
    """The solver-schedule plan that replaces ``plan``; ``plan``'s grid and score stay in its meta."""
    calls = len(result.timesteps)
    reference = str(plan.meta.get("scheduler"))
    schedule = SolverSchedule(solver, result.timesteps, reference, supernet.num_steps)
    payload = ReusePayload.from_meta(plan.meta)
    meta = {k: v for k, v in plan.meta.items() if k not in ("keep_probs",)}
    meta.update(ReusePayload(payload.granularity, payload.mode, payload.modes, payload.forecast_order,
                             payload.whole_step_skip, schedule).to_meta())
    meta["scheduler"] = solver  # what the plan runs on; the reference is in solver_schedule
    meta["forecast_plan"] = {"compute": plan.compute, "cost_ratio": plan.cost_ratio, "score": round(forecast_score, 6),
                             "keep_probs": plan.meta.get("keep_probs")}
    return Plan(kind="reuse", model=plan.model, blocks=plan.blocks,
                compute=[[True] * len(plan.blocks) for _ in range(calls)], target=plan.target,
                cost_ratio=calls / supernet.num_steps, num_steps=calls, meta=meta)


def search_schedule(plan: Plan, supernet: ReuseSuperNet, batch: Mapping[str, Any], config: ScheduleConfig,
                    log: Callable[[str], None] = print) -> Plan:
    """``plan``, or the learned solver schedule at its MACs when that scores better on ``batch``.

    ``meta.schedule_search`` records both scores, the start and the timesteps either way.
    """
    reference = supernet.reference(batch)["output"]

    def score(out: torch.Tensor) -> float:
        err = ((out - reference) ** 2).flatten(1).mean(1)  # (B,)
        return float(torch.log10(err.clamp_min(1e-20)).mean())

    forecast_score = score(supernet.sample(batch, plan.compute))
    calls = calls_in_budget(plan.target, supernet.num_steps)
    log(f"solver schedule: {calls} {config.solver} steps for the {supernet.num_steps}-step reference "
        f"(forecast plan: calibration log10 MSE {forecast_score:.3f})")

    def progress(move: int, best: float) -> None:
        log(f"  moves of {move}: log10 MSE {best:.3f}")

    result = learn_schedule(supernet, batch, reference, calls, config, score, progress)
    chosen = result.score < forecast_score
    info = {"solver": config.solver, "calls": calls, "timesteps": result.timesteps, "score": round(result.score, 6),
            "start": result.start, "start_score": round(result.start_score, 6),
            "forecast_score": round(forecast_score, 6), "chosen": "schedule" if chosen else "forecast",
            "evaluations": result.evaluations, "seconds": round(result.seconds, 1), "batch": int(config.batch)}
    log(f"solver schedule {result.timesteps}: log10 MSE {result.score:.3f} against the forecast plan's "
        f"{forecast_score:.3f} -> the {info['chosen']} plan ({result.seconds:.0f} s)")
    if not chosen:
        plan.meta["schedule_search"] = info
        return plan
    out = schedule_plan(plan, supernet, result, config.solver, forecast_score)
    out.meta["schedule_search"] = info
    return out
