"""Refine a hard reuse plan by measuring it: seeds, then a local search on calibration distortion.

The pruner is trained on a relaxation (soft or straight-through gates, expected cost); the plan
extracted from its probabilities is good but not locally optimal for the *hard* trajectory it
will run. This step closes that gap with the real thing: it samples the calibration batch with
hard plans (reused blocks really skipped, about 0.3 s per plan for the digits UNet) and keeps
what lowers the distortion to the full model's samples, without ever exceeding the budget.

1. Seeds. The learned plan, plus static schedules of the same budget that the relaxation cannot
   easily express: FORA-style uniform reuse, and "whole steps", which computes every block at K
   evenly spaced steps (for DDIM this is exactly a K-step sampler on a subset of the S
   timesteps, since a reused noise prediction composes DDIM steps exactly). Each seed's leftover
   budget is spent re-opening the slots the pruner rates most likely kept. The best seed wins.
2. Local search. Cost-neutral moves: swap two neighbouring step rows, or move one block's
   computation to a neighbouring step; a move is kept when the calibration distortion drops and
   the cost stays within the target, after which any slack is re-filled. The seeds race first:
   each distinct seed gets an equal share of half the evaluations, then the seed whose descendant
   scores best gets the rest (the best seed is not always the best basin). Moves are drawn from
   generators seeded by the run's seed, so the refinement is reproducible.
3. Resumed runs. A move changes a step or two, so a candidate runs exactly like the plan it came
   from up to the first changed step: :class:`PlanSampler` keeps the last few hard trajectories
   step by step and resumes each candidate from the one that shares the most leading steps. The
   scores are those of full runs; about half of the denoiser steps are skipped.

The result is never worse on the calibration batch than the best seed, and the plan's
``meta.refine`` says which seed won the race and how much the search gained, so users can see what the pruner contributed.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from dipgo.postprocess.settings import RefineConfig
from dipgo.supernets.reuse import whole_steps_rows

if TYPE_CHECKING:
    from collections.abc import Mapping

    from dipgo.supernets.reuse import ReuseSuperNet, Trace

Grid = list[list[bool]]

TRACE_BUDGET_BYTES = 1 << 30
"""Memory the refinement may keep in stored trajectories (a few hundred MB for the digits models)."""
MAX_TRACES = 4
"""Trajectories kept at most: the current plan of the search and the last candidates."""


class PlanSampler:
    """Samples hard plans of one calibration batch, resuming from stored trajectories.

    Each call stores its trace (most recent last, at most :data:`MAX_TRACES` and
    :data:`TRACE_BUDGET_BYTES`, judged from the first trace's size) and resumes the next plan from
    the stored trace sharing the most leading steps with it. ``steps_run / steps_total`` says how
    much of the denoiser work was actually done.
    """

    def __init__(self, supernet: ReuseSuperNet, batch: Mapping[str, Any],
                 budget_bytes: int = TRACE_BUDGET_BYTES, max_traces: int = MAX_TRACES) -> None:
        self.supernet, self.batch = supernet, batch
        self.budget_bytes, self.max_traces = budget_bytes, max_traces
        self._traces: list[Trace] = []
        self._keep: int | None = None  # decided from the first trace
        self.steps_run = self.steps_total = 0

    def __call__(self, grid: Grid) -> torch.Tensor:
        """The final sample ``(B, C, H, W)`` of the hard plan ``grid``."""
        rows = (self.supernet.effective(torch.tensor(grid, dtype=torch.float32)) > 0.5).tolist()
        base = max(reversed(self._traces), key=lambda t: t.shared_steps(rows), default=None)  # ties: the newest
        shared = 0 if base is None else base.shared_steps(rows)
        trace = self.supernet.trace(self.batch, grid, base)
        self.steps_total += len(rows)
        self.steps_run += len(rows) - shared
        if self._keep is None:
            self._keep = min(self.max_traces, self.budget_bytes // max(trace.nbytes(), 1))
        self._traces = [t for t in self._traces if t is not trace] + [trace]  # most recent last
        del self._traces[: max(len(self._traces) - self._keep, 0)]
        return trace.final


def whole_steps_grid(supernet: ReuseSuperNet, target: float) -> Grid:
    """Every block computed at K evenly spaced steps, K = round(target * S) (may exceed the budget
    slightly: :func:`refine_grid` repairs seeds before scoring them)."""
    rows = whole_steps_rows(supernet.num_steps, target)  # as many steps as a K-step sampler at this budget
    return [[s in rows] * len(supernet.block_names) for s in range(supernet.num_steps)]


def repair(supernet: ReuseSuperNet, grid: Grid, probs: torch.Tensor, target: float) -> Grid:
    """Close open slots, least likely kept first, until the plan fits the budget.

    Lets a static schedule that lands a hair over the target (10 whole steps of 50 cost 20.2%
    of the MACs, not 20%, because the stem runs at every computed step) still seed the search.
    """
    grid = [row[:] for row in grid]
    order = sorted(
        ((s, b) for s in range(1, len(grid)) for b in range(len(grid[0])) if grid[s][b]),
        key=lambda sb: float(probs[sb[0] - 1, sb[1]]),
    )
    for s, b in order:
        if supernet.plan_cost(grid) <= target + 1e-12:
            break
        grid[s][b] = False
    return grid


def fill_slack(supernet: ReuseSuperNet, grid: Grid, probs: torch.Tensor, target: float) -> Grid:
    """Re-open closed slots, most likely kept first, wherever the budget still holds."""
    grid = [row[:] for row in grid]
    order = sorted(
        ((s, b) for s in range(1, len(grid)) for b in range(len(grid[0])) if not grid[s][b]),
        key=lambda sb: -float(probs[sb[0] - 1, sb[1]]),
    )
    for s, b in order:
        grid[s][b] = True
        if supernet.plan_cost(grid) > target + 1e-12:
            grid[s][b] = False
    return grid


def _moves(grid: Grid, rng: random.Random) -> Grid | None:
    """One random cost-neutral move: swap two neighbouring rows, or shift one block's compute by a step."""
    steps, blocks = len(grid), len(grid[0])
    new = [row[:] for row in grid]
    if rng.random() < 0.3:
        s = rng.randrange(1, steps - 1)
        if new[s] == new[s + 1]:
            return None
        new[s], new[s + 1] = new[s + 1], new[s]
        return new
    s, b = rng.randrange(1, steps), rng.randrange(blocks)
    t = s + rng.choice((-1, 1))
    if not 1 <= t < steps or new[s][b] == new[t][b]:
        return None
    new[s][b], new[t][b] = new[t][b], new[s][b]
    return new


def _local_search(supernet: ReuseSuperNet, grid: Grid, best: float, probs: torch.Tensor, target: float,
                  score: Callable[[Grid], float], evals: int, rng: random.Random,
                  progress: Callable[[float], None] | None = None) -> tuple[Grid, float, int, int]:
    """First-improvement local search for ``evals`` scored moves; ``(grid, score, evaluations, accepted)``."""
    used = accepted = tries = 0
    while used < evals and tries < 20 * max(evals, 1):
        tries += 1
        cand = _moves(grid, rng)
        if cand is None or supernet.plan_cost(cand) > target + 1e-12:
            continue
        used += 1
        value = score(cand)
        if value < best:
            grid, best = cand, value
            accepted += 1
            filled_cand = fill_slack(supernet, cand, probs, target)
            if filled_cand != cand:  # a move can free budget (cascade): spend it if that helps
                used += 1
                if (v := score(filled_cand)) < best:
                    grid, best = filled_cand, v
        if progress is not None:
            progress(best)
    return grid, best, used, accepted


def refine_grid(
    supernet: ReuseSuperNet, seeds: dict[str, Grid], probs: torch.Tensor, target: float,
    score: Callable[[Grid], float], config: RefineConfig, seed: int = 0,
    progress: Callable[[int, float], None] | None = None,
) -> tuple[Grid, dict[str, Any]]:
    """Race the seeds, then keep searching from the leader; returns the grid and what happened.

    The best-scoring seed is not always the best place to search from: on the digits DiT with the
    DPM-Solver++-25 reference at 0.20, the whole-steps seed scored 0.05 (log10 MSE) better than
    the learned plan, yet 150 moves from the learned plan reached -3.03 against -2.83 from the
    whole-steps seed (docs/RESULTS.md). So every distinct seed first gets an equal share of half
    the evaluations, and the seed whose descendant then scores best gets the rest.

    ``score(grid)`` is the calibration distortion of a hard plan (lower is better); ``probs`` the
    learned keep probabilities ``(S-1, B)`` that order the slack filling.
    """
    filled: dict[str, Grid] = {}
    for name, g in seeds.items():
        grid = fill_slack(supernet, repair(supernet, g, probs, target), probs, target)
        if grid not in filled.values():  # identical seeds (e.g. uniform = whole steps) race once
            filled[name] = grid
    seed_scores = {name: score(grid) for name, grid in filled.items()}
    done = 0

    def tick(best: float) -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, best)

    share = config.max_evals // (2 * len(filled)) if len(filled) > 1 else 0
    raced: dict[str, tuple[Grid, float, random.Random]] = {}
    evals = accepted = 0
    for i, (name, grid) in enumerate(filled.items()):
        rng = random.Random(seed * 1000 + i)
        g, best, used, acc = _local_search(supernet, grid, seed_scores[name], probs, target, score, share, rng, tick)
        raced[name] = (g, best, rng)
        evals, accepted = evals + used, accepted + acc
    start = min(raced, key=lambda n: raced[n][1])
    grid, best, rng = raced[start]
    grid, best, used, acc = _local_search(supernet, grid, best, probs, target, score, config.max_evals - evals, rng, tick)
    info = {
        "seed_scores": {k: _round(v) for k, v in seed_scores.items()},
        "race_scores": {k: _round(v[1]) for k, v in raced.items()} if share else {},
        "start": start,
        "final_score": _round(best),
        "evaluations": evals + used,
        "accepted_moves": accepted + acc,
    }
    return grid, info


def _round(x: float) -> float:
    return float(f"{x:.6g}") if math.isfinite(x) else x
