"""Forecasting a closed unit's output from the steps where it was computed (TaylorSeer-style).

Copy-reuse (DeepCache, DiP-GO's backup connection) returns a unit's output of the last computed
step unchanged. A unit's output drifts smoothly along a sampling trajectory, so extrapolating it
from the last few computed steps is much closer to what the unit would have returned: TaylorSeer
(ICCV 2025) does this with finite differences in the step index. Here the extrapolation is the
Newton form of the polynomial through the last ``order + 1`` computed points ``(s_i, y_i)``:

    p(s) = y0 + d1 * (s - s0) + d2 * (s - s0) * (s - s1)

with ``y0`` the newest value at step ``s0``, ``s1`` the step before it, ``d1`` / ``d2`` the first
and second divided differences. Unlike Taylor factors this is exact for unequal spacings, which a
learned plan has (it computes a unit at irregular steps). Order 0 is the plain copy.

The state is a :class:`History` of pytrees (a UNet block returns ``(hidden, (res, ...))``; every
tensor leaf is extrapolated, other leaves are kept). For the SuperNet's soft training a slot with
keep probability ``g`` updates the history to ``g * computed + (1 - g) * old`` for every field
(the steps ``s0``, ``s1`` and the point count too), so the soft mix is differentiable in ``g``
and exactly the hard behaviour when ``g`` is 0 or 1: the pruner optimises what the SubNet runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils import _pytree as pytree

FORECAST_ORDERS: tuple[int, ...] = (0, 1, 2)

Number = float | torch.Tensor  # a plain float in hard mode, a 0-d tensor (carries grad) in soft mode


def check_order(order: int) -> int:
    """``order`` if it is a supported forecast order, else ``ValueError`` with the choices."""
    if isinstance(order, bool) or not isinstance(order, int) or order not in FORECAST_ORDERS:
        raise ValueError(
            f"forecast order must be one of {', '.join(map(str, FORECAST_ORDERS))} "
            f"(0 = copy the last computed output, 1 = linear, 2 = quadratic extrapolation), got {order!r}"
        )
    return order


@dataclass
class History:
    """What a unit remembers of its computed steps.

    Attributes:
        order: extrapolation order (0, 1 or 2).
        value: the newest value ``y0`` (a pytree of tensors).
        d1: first divided difference (same structure), ``None`` at order 0.
        d2: second divided difference, ``None`` below order 2.
        s0: step of ``y0``.
        s1: step of the point before ``y0`` (meaningless while ``points < 2``; ``d2`` is 0 then).
        points: how many computed points the history holds (soft in training).
    """

    order: int
    value: Any
    d1: Any | None
    d2: Any | None
    s0: Number
    s1: Number
    points: Number

    def nbytes(self) -> int:
        """Bytes held by the tensors of the history (the memory cost of forecasting)."""
        leaves = [x for part in (self.value, self.d1, self.d2) if part is not None for x in pytree.tree_leaves(part)]
        return sum(x.numel() * x.element_size() for x in leaves if isinstance(x, torch.Tensor))


def _map(fn: Callable[..., Any], *trees: Any) -> Any:
    """``fn`` over the tensor leaves of same-structured pytrees; other leaves from the first tree."""
    if isinstance(trees[0], torch.Tensor):  # the common case: skip flattening (called per unit per step)
        return fn(*trees)
    flat = [pytree.tree_flatten(t)[0] for t in trees]
    spec = pytree.tree_flatten(trees[0])[1]
    out = [fn(*xs) if isinstance(xs[0], torch.Tensor) else xs[0] for xs in zip(*flat)]
    return pytree.tree_unflatten(out, spec)


def _zeros(tree: Any) -> Any:
    return _map(torch.zeros_like, tree)


def start(value: Any, step: int, order: int) -> History:
    """The history after the first computed step (nothing to extrapolate yet: a copy)."""
    check_order(order)
    return History(
        order=order, value=value,
        d1=_zeros(value) if order >= 1 else None,
        d2=_zeros(value) if order >= 2 else None,
        s0=float(step), s1=float(step) - 1.0, points=1.0,
    )


def predict(history: History, step: int) -> Any:
    """The extrapolated value at ``step`` (order 0 returns the stored value itself, untouched)."""
    if history.order == 0:
        return history.value
    a = step - history.s0
    if history.order == 1:
        return _map(lambda y, d1: y + a * d1, history.value, history.d1)
    b = a * (step - history.s1)
    return _map(lambda y, d1, d2: y + a * d1 + b * d2, history.value, history.d1, history.d2)


def _clamp01(x: Number) -> Number:
    return x.clamp(0.0, 1.0) if isinstance(x, torch.Tensor) else min(max(x, 0.0), 1.0)


def _computed(history: History, value: Any, step: int) -> History:
    """The history if ``value`` was computed at ``step`` (hard update)."""
    if history.order == 0:
        return History(0, value, None, None, float(step), history.s0, history.points + 1)
    h0 = step - history.s0
    d1 = _map(lambda y, y0: (y - y0) / h0, value, history.value)
    d2 = None
    if history.order >= 2:
        # a second difference needs two earlier points; with one, d2 stays 0 (soft: partly)
        valid = _clamp01(history.points - 1)
        h1 = step - history.s1
        d2 = _map(lambda n, o: valid * (n - o) / h1, d1, history.d1)
    return History(history.order, value, d1, d2, float(step), history.s0, history.points + 1)


def _mix_number(g: torch.Tensor, new: Number, old: Number) -> Number:
    return g * new + (1 - g) * old


def update(history: History, value: Any, step: int, gate: torch.Tensor | None = None) -> History:
    """The history after step ``step`` where the unit returned ``value``.

    ``gate is None``: the unit was computed (hard). Else ``gate`` is its soft keep probability
    and every field becomes ``gate * computed + (1 - gate) * unchanged``.
    """
    new = _computed(history, value, step)
    if gate is None:
        return new

    def mix(n: Any, o: Any) -> Any:
        return None if n is None else _map(lambda a, b: gate * a + (1 - gate) * b, n, o)

    return History(
        history.order, mix(new.value, history.value), mix(new.d1, history.d1), mix(new.d2, history.d2),
        _mix_number(gate, new.s0, history.s0), _mix_number(gate, new.s1, history.s1),
        _mix_number(gate, new.points, history.points),
    )


def detach(history: History) -> History:
    """The same history cut from the autograd graph (truncated backprop through the trajectory)."""

    def cut(tree: Any) -> Any:
        return None if tree is None else _map(lambda x: x.detach(), tree)

    def num(x: Number) -> Number:
        return x.detach() if isinstance(x, torch.Tensor) else x

    return History(history.order, cut(history.value), cut(history.d1), cut(history.d2),
                   num(history.s0), num(history.s1), num(history.points))
