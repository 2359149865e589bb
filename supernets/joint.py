"""Joint search: timestep reuse and weight sparsity in one SuperNet, under one MACs budget.

Peers search one kind of saving at a time: DeepCache / Learning-to-Cache decide what to reuse
across steps, Wanda / SparseGPT / FCPTS decide which weights to drop. Their savings compound
(a sparse block that is also reused half the time costs a quarter of its dense MACs), so the
right split of a budget between them depends on the model, and only a search over both can find
it. This SuperNet puts both kinds of slots in front of one pruner:

* reuse slots, ``(S - 1) x B`` hard gates over (step, unit) as in :mod:`dipgo.supernets.reuse`,
* mask slots, one density per prunable Linear (:mod:`dipgo.supernets.mask`), soft: the search
  loop feeds them keep probabilities, not Gumbel samples (``soft_slots``).

The cost is exact for any hard plan and differentiable in both kinds: a unit computed at a step
costs its dense MACs minus what its layers' sparsity saves there, layers outside the units (patch
embedding, head) are paid at every step at their density, and the cascade of the reuse graph is
unchanged::

    unit_b(d)  = unit_macs_b - sum_{l in b} (1 - d_l) * macs_l
    outside(d) = always_paid - sum_{l outside} (1 - d_l) * macs_l
    cost       = (P * outside(d) + sum_{s,b} eff[s, b] * unit_b(d)) / (S * dense_call_macs)

with ``P`` the steps that call the model (all ``S``, or fewer for a UNet, whose fully closed
steps are skipped whole: ``ReuseSuperNet.paid_steps``)

``kinds`` may name one kind only (``("reuse",)`` or ``("mask",)``): the same machinery then
searches that kind alone, which is how the benchmark compares the joint search with each kind at
the same budget in the same run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from dipgo.supernets.gates import GateSlot
from dipgo.supernets.mask import MaskSuperNet
from dipgo.supernets.reuse import ReuseSuperNet

JOINT_KINDS: tuple[str, ...] = ("reuse", "block", "mask")


def check_kinds(kinds: Sequence[str]) -> tuple[str, ...]:
    """Validate ``supernet.kinds``: a non-empty subset of reuse / block / mask, not reuse with block
    (one is for denoisers across steps, the other for depth of a single forward)."""
    kinds = tuple(str(k) for k in kinds)
    bad = [k for k in kinds if k not in JOINT_KINDS]
    if not kinds or bad or len(set(kinds)) != len(kinds) or {"reuse", "block"} <= set(kinds):
        raise ValueError(f"supernet.kinds must be a non-empty list without repeats of {', '.join(JOINT_KINDS)}, "
                         f"not reuse with block; got {list(kinds)}")
    return kinds


def layer_units(layers: Sequence[str], units: Sequence[str]) -> list[int]:
    """Index of the unit each layer belongs to (longest module-path prefix), ``-1`` outside every unit."""
    out = []
    for path in layers:
        owners = [(len(u), i) for i, u in enumerate(units) if path == u or path.startswith(u + ".")]
        out.append(max(owners)[1] if owners else -1)
    return out


class JointSuperNet:
    """Reuse gates and mask densities of one denoiser, searched together.

    Gates are ``(N,)`` in slot order: the reuse slots first (step-major, as the pruner's grid
    expects), then one density per mask layer. ``soft_slots`` tells the search loop which slots
    take keep probabilities directly. ``allocation="global"`` ties the layers to their mean
    density: the pruner then learns how much of the budget goes to sparsity and which
    (step, unit) computations to keep, and the reuse gates are trained at the split they will
    run with (per-layer densities learned through a straight-through mask are noisy on small
    models and pulled the reuse gates' budget around).
    """

    kind = "joint"

    def __init__(self, reuse: ReuseSuperNet, mask: MaskSuperNet | None, layer_macs: Sequence[float],
                 kinds: Sequence[str], allocation: str = "layer") -> None:
        self.kinds = check_kinds(kinds)
        if allocation not in ("layer", "global"):
            raise ValueError(f"mask allocation must be layer or global, got {allocation!r}")
        self.allocation = allocation
        if "mask" in self.kinds and mask is None:
            raise ValueError("kinds include mask but no mask gates were built")
        self.reuse, self.mask = reuse, mask if "mask" in self.kinds else None
        self.model = reuse.model
        self.layers: list[str] = list(mask.layers) if self.mask is not None else []
        self.layer_macs = torch.tensor(list(layer_macs), dtype=torch.float64)  # (L,) per denoiser call
        owner = layer_units(self.layers, reuse.block_names)
        self._in_unit = torch.zeros(len(self.layers), len(reuse.block_names), dtype=torch.float64)  # (L, B)
        for i, b in enumerate(owner):
            if b >= 0:
                self._in_unit[i, b] = 1.0
        reuse_slots = reuse.slots if "reuse" in self.kinds else []
        steps = reuse.num_steps
        mask_slots = [GateSlot(name=f"mask/{p}", kind="mask", block=p, cost=float(m) * steps)
                      for p, m in zip(self.layers, self.layer_macs.tolist())]
        self.slots: list[GateSlot] = [*reuse_slots, *mask_slots]
        self.soft_slots = torch.tensor([False] * len(reuse_slots) + [True] * len(mask_slots))  # (N,)
        self.grid_shape = reuse.grid_shape if reuse_slots else None
        self.pruned_state: dict[str, torch.Tensor] | None = None  # reconstructed weights of a plan

    # ---- gates -------------------------------------------------------------------------------
    def split(self, gates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(reuse gates (S-1)*B, densities (L,))``: all-ones for a kind that is not searched."""
        if gates.shape != (len(self.slots),):
            raise ValueError(f"gates must have shape ({len(self.slots)},), got {tuple(gates.shape)}")
        n_reuse = len(self.slots) - len(self.layers)
        g_reuse = gates[:n_reuse] if n_reuse else torch.ones(len(self.reuse.slots), dtype=gates.dtype,
                                                              device=gates.device)
        dens = gates[n_reuse:]
        if self.allocation == "global" and dens.numel():
            dens = dens.mean().expand(dens.numel())  # one density for every layer: the pruner splits kinds only
        if self.mask is not None:
            lo = self.mask.config.min_density
            # with reuse the densities live in [lo, 1] as lo + (1 - lo) * p, so a density at the floor
            # still gets gradients (a clamp would freeze it there); alone, clamped like the mask kind
            dens = lo + (1 - lo) * dens if "reuse" in self.kinds else dens.clamp(min=lo, max=1.0)
            dens = self.mask.effective(dens)
        return g_reuse, dens

    def set_densities(self, densities: torch.Tensor | None) -> None:
        """Mask hooks compute with these densities (``None``: dense weights). They stay set after
        :meth:`gated` returns, so a backward pass that recomputes a step sees the same masks."""
        if self.mask is not None:
            self.mask.set_densities(densities)

    # ---- costs -------------------------------------------------------------------------------
    def macs_with(self, densities: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(unit MACs (B,), call MACs)`` of one denoiser call at these layer densities."""
        unit = self.reuse._unit_macs.to(densities)
        call = torch.tensor(self.reuse._dense_call_macs, dtype=densities.dtype, device=densities.device)
        if not self.layers:
            return unit, call
        saved = (1 - densities) * self.layer_macs.to(densities)  # (L,)
        return unit - saved @ self._in_unit.to(densities), call - saved.sum()

    def full_cost(self) -> float:
        return self.reuse.full_cost()

    def expected_cost(self, gates: torch.Tensor) -> torch.Tensor:
        """Kept-MACs ratio of the whole trajectory, differentiable in reuse gates and densities."""
        g_reuse, dens = self.split(gates)
        unit, call = self.macs_with(dens)
        eff = self.reuse.effective(self.reuse.gate_grid(g_reuse))  # (S, B)
        outside = call - unit.sum()
        return (self.reuse.paid_steps(eff) * outside + (eff * unit).sum()) / self.full_cost()

    def view(self, densities: Sequence[float]) -> ReuseSuperNet:
        """The reuse SuperNet costed at fixed densities: plan extraction and refinement run on it."""
        unit, call = self.macs_with(torch.as_tensor(list(densities), dtype=torch.float64))
        return self.reuse.with_macs(unit.tolist(), float(call))

    def plan_cost(self, grid: Any, densities: Sequence[float]) -> float:
        return self.view(densities).plan_cost(grid)

    # ---- trajectories ------------------------------------------------------------------------
    def reference(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """The dense model's trajectory (masks off, the dense weights)."""
        self.set_densities(None)
        return self.reuse.reference(batch)

    def gated(self, batch: Mapping[str, Any], gates: torch.Tensor) -> dict[str, torch.Tensor]:
        g_reuse, dens = self.split(gates)
        self.set_densities(dens if self.layers else None)
        return self.reuse.gated(batch, g_reuse)

    def sample(self, batch: Mapping[str, Any], grid: Any = None, densities: torch.Tensor | None = None,
               pruned: bool = False) -> torch.Tensor:
        """Hard trajectory: ``grid`` of reuse decisions, masks at ``densities`` (saliency masks)
        or, with ``pruned``, the plan's reconstructed weights (masks already in the weights)."""
        if pruned:
            if self.pruned_state is None:
                raise RuntimeError("no reconstructed weights yet: the plan's mask part has not been pruned")
            self.set_densities(None)
            with swapped_weights(self.model, self.pruned_state):
                return self.reuse.sample(batch, grid)
        self.set_densities(None if densities is None else torch.as_tensor(densities, dtype=torch.float32))
        try:
            return self.reuse.sample(batch, grid)
        finally:
            self.set_densities(None)

    def remove(self) -> None:
        """Remove every hook; the model is handed back with its dense weights and flags."""
        if self.mask is not None:
            self.mask.remove()
        self.reuse.remove()


class swapped_weights:
    """Context manager: copy ``state`` into the model's parameters, restore the originals on exit."""

    def __init__(self, model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
        self.model, self.state = model, state
        self._saved: dict[str, torch.Tensor] = {}

    def __enter__(self) -> torch.nn.Module:
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, value in self.state.items():
                self._saved[name] = params[name].detach().clone()
                params[name].copy_(value)
        return self.model

    def __exit__(self, *exc: Any) -> None:
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, value in self._saved.items():
                params[name].copy_(value)
