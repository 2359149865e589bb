"""Learned step placement: where a reuse plan's full steps go, learned on hard trajectories.

Why this stage exists. The pruner (:mod:`dipgo.search.module`) learns every slot with
straight-through Gumbel gates. That relaxation cannot move a *whole* step: moving the full step 5
of a schedule to step 4 closes every unit of one step and opens every unit of another at once, a
joint move that independent slot samples almost never draw, and the first-order gradient that
would have to predict it is often of the wrong sign (measured on the digits UNet, DPM-Solver++-25
at 0.20: the straight-through gradient says closing the full step 15 *lowers* the distortion; run
for real it raises it; docs/RESULTS.md). So the pruner started at the evenly spaced whole-steps
schedule stays on it.

What it does. The K full steps of the start are a draw of K steps without replacement from a
Plackett-Luce distribution over steps ``1 .. S-1`` (step 0 always computes), sampled with the
Gumbel-top-k trick. Every draw costs the same MACs, so no cost term is needed: the policy only
learns *where* the steps go. Each iteration draws ``samples`` placements, runs each as a hard
trajectory on a fixed calibration batch (reused blocks really skipped, resumed from stored
trajectories like the refinement), and takes a score-function (REINFORCE) step with a
leave-one-out baseline: an unbiased gradient of the expected calibration distortion that needs
no derivative of the trajectory, so the nonlinearity of forecasting over the chosen steps does
not mislead it. The placement is the policy's most likely draw (its K highest-scoring steps), or
the best draw it ran if that scored better on the calibration batch, so it is never worse there
than the evenly spaced start. The pruner's gates then start at it (``search.pruner.init=prior``)
and learn per-unit deviations; the refinement scores both stages' plans on its calibration batch
and takes the better as the pruner's plan, because the gates can undo a good placement
(docs/RESULTS.md). One draw is scored on a few calibration items, and the policy can end in
different schedules for different seeds; the recipes that use it say why.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from dipgo.postprocess.reuse_refine import PlanSampler
from dipgo.search.config import PlacementConfig

if TYPE_CHECKING:
    from dipgo.supernets.reuse import ReuseSuperNet


@dataclass
class Placement:
    """The learned full steps of one target and how they were found (recorded in the plan's meta)."""

    target: float
    rows: list[int]
    """Full steps, sorted, step 0 first."""
    start_rows: list[int]
    """The evenly spaced schedule it started from."""
    start_score: float
    """Calibration score (mean per-item log10 MSE to the full model) of the start."""
    score: float
    """Calibration score of ``rows``."""
    evaluations: int
    seconds: float
    mean_score: list[float] = field(default_factory=list)
    """Mean score of each iteration's draws (the learning curve)."""
    mode_rows: list[int] = field(default_factory=list)
    """The policy's most likely placement (its top-K steps) when learning stopped."""
    mode_score: float = math.nan

    def to_meta(self) -> dict[str, Any]:
        return {"rows": self.rows, "start_rows": self.start_rows, "start_score": _round(self.start_score),
                "score": _round(self.score), "evaluations": self.evaluations, "seconds": round(self.seconds, 2),
                "mean_score": [_round(v) for v in self.mean_score], "mode_rows": self.mode_rows,
                "mode_score": _round(self.mode_score)}


def grid_of(rows: list[int] | set[int], num_steps: int, num_units: int) -> list[list[bool]]:
    """The hard ``(S, B)`` plan computing every unit at ``rows`` and nothing elsewhere."""
    chosen = set(rows)
    return [[s in chosen] * num_units for s in range(num_steps)]


def plackett_luce_log_prob(scores: torch.Tensor, order: list[int]) -> torch.Tensor:
    """Log probability of drawing ``order`` (an ordered list of indices, without replacement)
    from the Plackett-Luce distribution with logits ``scores`` ``(N,)``; differentiable in ``scores``."""
    taken = torch.zeros_like(scores, dtype=torch.bool)
    total = scores.new_zeros(())
    for i in order:
        total = total + scores[i] - torch.logsumexp(scores.masked_fill(taken, -math.inf), dim=0)
        taken = taken.clone()
        taken[i] = True
    return total


def calibration_score(supernet: ReuseSuperNet, batch: Mapping[str, Any]) -> Callable[[list[int]], float]:
    """``rows -> mean per-item log10 MSE`` of the whole-steps plan at ``rows`` against the full
    model on ``batch`` (the refinement's score), sampled with resumed hard trajectories."""
    with torch.no_grad():
        reference = supernet.reference(batch)["output"]
    sampler = PlanSampler(supernet, batch)

    def score(rows: list[int]) -> float:
        out = sampler(grid_of(rows, supernet.num_steps, len(supernet.units)))
        err = ((out - reference) ** 2).flatten(1).mean(1)  # (B,)
        return float(torch.log10(err.clamp_min(1e-20)).mean())

    return score


def learn_placement(
    supernet: ReuseSuperNet,
    batch: Mapping[str, Any],
    target: float,
    config: PlacementConfig,
    seed: int = 0,
    progress: Callable[[int, float], None] | None = None,
    score: Callable[[list[int]], float] | None = None,
) -> Placement:
    """Learn where the start schedule's full steps go (see the module docstring).

    ``batch``: calibration inputs (the first ``config.batch`` pool items); ``target`` the budget,
    which fixes K through :meth:`ReuseSuperNet.prior_keep`'s evenly spaced start. ``progress``
    is called with ``(iteration, mean score)`` after each iteration. ``score(rows)`` (lower is
    better) replaces the calibration distortion of the whole-steps plan at ``rows`` (tests).
    """
    t0 = time.perf_counter()
    num_steps = supernet.num_steps
    start = sorted(supernet.evenly_spaced_start(target))
    k = len(start) - 1  # step 0 always computes
    if score is None:
        score = calibration_score(supernet, batch)

    start_score = score(start)
    logits = torch.zeros(num_steps - 1, dtype=torch.float64)  # index i = step i + 1
    logits[[s - 1 for s in start[1:]]] = config.init_gap
    logits.requires_grad_(True)
    optimizer = torch.optim.Adam([logits], lr=config.lr)
    gen = torch.Generator().manual_seed(seed * 7919 + 31)
    curve: list[float] = []
    evaluations = 1
    best_seen = (start_score, start)
    for it in range(config.iterations if k > 0 else 0):
        u = torch.rand((config.samples, num_steps - 1), generator=gen, dtype=torch.float64)
        gumbel = -torch.log(-torch.log(u.clamp(1e-12, 1 - 1e-12)))  # (samples, S-1)
        orders = torch.argsort(logits.detach() + gumbel, dim=1, descending=True)[:, :k].tolist()
        drawn = [sorted([0, *(i + 1 for i in o)]) for o in orders]
        scores = torch.tensor([score(rows) for rows in drawn], dtype=torch.float64)
        evaluations += len(orders)
        i_best = int(scores.argmin())
        if float(scores[i_best]) < best_seen[0]:
            best_seen = (float(scores[i_best]), drawn[i_best])
        baseline = (scores.sum() - scores) / (len(orders) - 1)  # leave-one-out, (samples,)
        log_probs = torch.stack([plackett_luce_log_prob(logits, o) for o in orders])
        loss = ((scores - baseline) * log_probs).mean()  # minimise the expected score
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        curve.append(float(scores.mean()))
        if progress is not None:
            progress(it, curve[-1])
    top = torch.topk(logits.detach(), k).indices.tolist() if k > 0 else []
    mode = sorted([0, *(i + 1 for i in top)])
    mode_score = score(mode)
    rows, final = (mode, mode_score) if mode_score <= best_seen[0] else (best_seen[1], best_seen[0])
    return Placement(target=target, rows=rows, start_rows=start, start_score=start_score, score=final,
                     evaluations=evaluations + 1, seconds=time.perf_counter() - t0, mean_score=curve,
                     mode_rows=mode, mode_score=mode_score)


def _round(x: float) -> float:
    return float(f"{x:.6g}") if math.isfinite(x) else x
