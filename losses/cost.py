"""The cost term: drive the expected kept-cost ratio to the user's target.

``SuperNet.expected_cost(gates)`` gives a differentiable ratio in [0, 1] (cost of the gated
computation / cost of the full one). The user asks for a ``target`` in (0, 1], the fraction of
MACs to keep. The cost term must make the learned gates *land on* that target (within ~1%), not
merely push costs down until some early stop fires, because post-processing only repairs small
gaps and the quality/speed trade-off is read off the target.

Two pieces do that:

* :func:`cost_loss`, a penalty on the log ratio ``x = log(expected / target)``. It is a
  pseudo-Huber ``sqrt(x^2 + delta^2) - delta``: away from the target its gradient has constant
  magnitude (an *exact* penalty: with a large enough weight the optimum sits on the target
  instead of at an offset that shrinks only as 1/weight, as with a squared error), and inside
  a band of about ``delta`` it is quadratic, so Adam does not chatter across the target.
  The log makes it relative: 0.20 vs 0.10 is as wrong as 0.80 vs 0.40.
* :class:`CostController`, a Lagrange-multiplier style controller that raises the weight of
  the penalty while the constraint is violated and lets it decay when it is met, so the
  multiplier finds the price the distortion puts on the constraint.

Scale. The penalty is O(1) per unit of log ratio, so the controller copes with distortions of
roughly 0.1x to 10x that size within a few hundred steps (measured on a toy knapsack:
budget within 1% over 0.3x..3x; at 100x some runs never leave "compute everything", at 0.01x
the budget is met but the choice of gates is poor). Keep the distortion's ``total`` O(0.1-1)
where the search ends, e.g. divide it by the distortion of random hard gates at the target
(keep each slot with probability ``target``), measured once before the search.

Search-loop recipe (what the tests run)::

    logits = pruner()                                          # (N, 2)
    gates = gumbel_gates(logits, tau, hard=True, generator=g)  # distortion sees hard samples
    expected = supernet.expected_cost(keep_probs(logits))      # cost sees keep probabilities
    loss = distortion(...)["total"] + controller.loss(expected, target) + pruner.regularizer(logits)
    ...backward, optimiser step (Adam, cosine-decayed lr)...
    controller.update(expected.detach(), target)
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from dipgo.losses.config import CostConfig, check_cost_mode

# The dual controller holds its multiplier while the (smoothed) violation shrinks by at least
# this fraction per step: the penalty is already working, raising it would only wind up.
_MIN_PROGRESS = 0.01
# Decay runs at a quarter of the rise speed: the multiplier drifts down toward the constraint's
# price slowly, so that late in the search (small learning rate) it is not caught too low by a
# sudden jump of the gates, which it could then not correct in time.
_DECAY_SPEED = 0.25


def check_target(target: float) -> float:
    """Return ``target`` as a float, or raise the one-sentence error the CLI shows."""
    try:
        value = float(target)
    except (TypeError, ValueError):
        value = float("nan")
    if not 0.0 < value <= 1.0:  # also rejects NaN
        raise ValueError(f"search.target must be in (0, 1] (the fraction of MACs to keep); got {target!r}")
    return value

def _violation(log_ratio: float, mode: str) -> float:
    """How far off the constraint is, in log-ratio units (0 when satisfied)."""
    return abs(log_ratio) if mode == "two_sided" else max(log_ratio, 0.0)


def cost_loss(
    expected: Tensor,
    target: float,
    weight: float,
    mode: str = "two_sided",
    *,
    delta: float = 0.01,
) -> Tensor:
    """Weighted pseudo-Huber penalty on ``log(expected / target)``; a scalar tensor.

    Zero at the target, grows with the relative error (for ``hinge``, only above the target).
    ``expected`` is the differentiable kept-cost ratio from ``SuperNet.expected_cost``,
    computed from keep probabilities (see ``dipgo.search.pruner.keep_probs``).
    """
    target = check_target(target)
    check_cost_mode(mode)
    x = torch.log(expected.clamp(min=1e-6) / target)  # log ratio, scalar
    if mode == "hinge":
        x = torch.relu(x)
    return weight * (torch.sqrt(x * x + delta * delta) - delta)


class CostController:
    """Multiplier of the cost penalty, adapted from the constraint violation after each step.

    Update rule (multiplicative dual ascent with smoothing and anti-windup)::

        x      = log(expected / target)
        m      = smoothing * m + (1 - smoothing) * x          # m starts at the first x
        v      = |m|   (two_sided)      max(m, 0)   (hinge)
        signal = clip(v / tolerance - 1, -1, 1)              # -1 on target, +1 beyond 2 * tolerance
        if signal < 0: signal = signal / 4                   # decay 4x slower than the rise
        if signal > 0 and |x| (or max(x, 0)) shrank by >= 1% since the last step:  keep lambda
        else: lambda = clip(lambda * exp(lr_lambda * signal), lambda_min, lambda_max)

    Why each piece:

    * multiplicative: scale-free, it reaches a multiplier of 0.05 or of 50 at the same relative
      speed, so the same config works for any distortion magnitude; at most a factor
      ``exp(lr_lambda)`` per step, so one noisy step cannot swing it;
    * smoothing the *signed* ratio: an oscillation around the target (Adam's steps make the
      gates chatter) averages out and does not read as a violation; a persistent bias does;
    * anti-windup: while the penalty is visibly pulling the cost toward the target (the first
      tens of steps, from "compute everything" down to the budget) raising it would only
      overshoot, so the multiplier waits until progress stalls;
    * decay while on target, down to ``lambda_min``: the multiplier settles near the price the
      distortion puts on the constraint instead of staying at the largest value ever needed,
      which would drown the distortion's gradient under the penalty's. The decay is slow, so a
      late jump of the gates (small learning rate, little time left) meets a multiplier that
      is still high enough to pull the cost straight back.

    With the ``fixed`` controller the multiplier stays ``weight`` (the statistics still update,
    for logging). State is plain floats, so ``state_dict``/``load_state_dict`` restore it exactly.

    Use::

        loss = distortion + controller.loss(expected, target)   # current multiplier
        ...optimiser step...
        controller.update(expected.item(), target)               # multiplier for the next step
    """

    def __init__(self, config: CostConfig) -> None:
        self.config = config
        self.value: float = float(config.weight)
        self.smoothed: float | None = None
        self.last_violation: float | None = None
        self.steps: int = 0

    def update(self, expected: float | Tensor, target: float) -> float:
        """Adapt the multiplier from this step's expected cost; returns the new multiplier."""
        target = check_target(target)
        cfg = self.config
        self.steps += 1
        if isinstance(expected, Tensor):
            expected = expected.detach().item()
        log_ratio = math.log(max(float(expected), 1e-6) / target)
        if self.smoothed is None:
            self.smoothed = log_ratio
        self.smoothed = cfg.smoothing * self.smoothed + (1.0 - cfg.smoothing) * log_ratio
        v = _violation(self.smoothed, cfg.mode)
        # Progress is judged on this step's ratio (the smoothed one lags by design); the first
        # step has nothing to compare with and counts as progress.
        raw = _violation(log_ratio, cfg.mode)
        last = self.last_violation
        approaching = last is None or raw < (1.0 - _MIN_PROGRESS) * last
        self.last_violation = raw
        if cfg.controller == "fixed":
            return self.value
        signal = min(max(v / cfg.tolerance - 1.0, -1.0), 1.0)
        if signal < 0:
            signal *= _DECAY_SPEED
        if signal > 0 and approaching:
            return self.value  # on its way to the target: raising now would only wind up
        self.value = min(max(self.value * math.exp(cfg.lr_lambda * signal), cfg.lambda_min), cfg.lambda_max)
        return self.value

    def loss(self, expected: Tensor, target: float) -> Tensor:
        """:func:`cost_loss` with the current multiplier and the config's mode and delta."""
        return cost_loss(expected, target, self.value, self.config.mode, delta=self.config.delta)

    def state_dict(self) -> dict[str, Any]:
        return {
            "value": self.value,
            "smoothed": self.smoothed,
            "last_violation": self.last_violation,
            "steps": self.steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])
        self.smoothed = None if state["smoothed"] is None else float(state["smoothed"])
        last = state["last_violation"]
        self.last_violation = None if last is None else float(last)
        self.steps = int(state["steps"])
