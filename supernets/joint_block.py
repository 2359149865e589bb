"""Joint search of depth and sparsity: block gates and mask densities under one MACs budget.

Depth pruning (ShortGPT, "the unreasonable ineffectiveness of the deeper layers") removes whole
residual blocks; weight sparsity (Wanda, SparseGPT) thins every layer. The two compound: a sparse
block that is also removed saves nothing twice, a dense block that stays pays full price, so the
right split of a budget depends on which blocks are redundant and which layers tolerate
sparsity. This SuperNet puts both kinds in front of one pruner, on the same frozen model:

* block slots, one hard gate per shape-preserving residual block (:mod:`dipgo.supernets.block`,
  forward hooks on the blocks computing ``g * f(x) + (1 - g) * x``),
* mask slots, one density per prunable Linear / Conv (:mod:`dipgo.supernets.mask`, forward hooks
  on the layers), soft: the search loop feeds them keep probabilities (``soft_slots``).

The hooks compose: a masked layer's hook replaces its output inside the block, the block's hook
then blends the block output with its input. All-ones gates are the original model.

The cost is exact for any hard plan and differentiable in both kinds. A layer at density ``d``
saves ``(1 - d)`` of its MACs, but only where it is computed: inside a removed block it saves
nothing more::

    unit_b(d)  = block_macs_b - sum_{l in b} (1 - d_l) * macs_l
    outside(d) = (full - sum_b block_macs_b) - sum_{l outside blocks} (1 - d_l) * macs_l
    cost       = (outside(d) + sum_b g_b * unit_b(d)) / full

MACs are per forward of one example (batch element), counted by torch's FLOP counter on the
unhooked model (:func:`dipgo.measure.macs.count_macs`), the same counter the block kind uses.
``kinds`` may name one kind only (``("block",)`` or ``("mask",)``): the same machinery searches
that kind alone, so a benchmark can compare the joint search with each kind at one budget.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from dipgo.measure.macs import count_macs
from dipgo.supernets.block import BlockSuperNet
from dipgo.supernets.gates import GateSlot
from dipgo.supernets.joint import check_kinds, layer_units
from dipgo.supernets.mask import MaskSuperNet


def check_block_kinds(kinds: Sequence[str]) -> tuple[str, ...]:
    """``supernet.kinds`` for this SuperNet: a non-empty subset of block / mask."""
    kinds = check_kinds(kinds)
    if "reuse" in kinds:
        raise ValueError(f"the block + mask joint search takes supernet.kinds from block, mask; got {list(kinds)} "
                         "(reuse is for diffusion denoisers)")
    return kinds


def count_module_macs(model: nn.Module, example: Mapping[str, torch.Tensor], output_fn: Any,
                      paths: Sequence[str]) -> tuple[float, dict[str, float]]:
    """``(full, {path: macs})`` per batch element of ``output_fn(model, example)`` on a plain model."""
    n = next(int(v.shape[0]) for v in example.values() if isinstance(v, torch.Tensor) and v.dim() > 0)
    total, per_module = count_macs(lambda: output_fn(model, dict(example)))
    return total / n, {p: per_module.get(p, 0.0) / n for p in paths}


class BlockMaskSuperNet:
    """Block gates and mask densities of one classifier / encoder, searched together.

    Gates are ``(N,)`` in slot order: the block slots first (hard), then one density per mask
    layer (soft, ``soft_slots``). A kind that is not searched has no slots and stays at ones.
    """

    kind = "joint"
    grid_shape = None

    def __init__(self, block: BlockSuperNet, mask: MaskSuperNet | None, layer_macs: Sequence[float],
                 kinds: Sequence[str]) -> None:
        self.kinds = check_block_kinds(kinds)
        if "mask" in self.kinds and mask is None:
            raise ValueError("kinds include mask but no mask gates were built")
        self.block, self.mask = block, mask if "mask" in self.kinds else None
        self._mask_hooks = mask  # removed with the SuperNet even when mask is not searched
        self.model, self.output_fn = block.model, block.output_fn
        self.blocks: list[str] = list(block.blocks)
        self.layers: list[str] = list(mask.layers) if self.mask is not None else []
        if len(layer_macs) != len(self.layers):
            raise ValueError(f"expected {len(self.layers)} layer MACs, got {len(layer_macs)}")
        self.layer_macs = torch.tensor([float(m) for m in layer_macs], dtype=torch.float64)  # (L,)
        self._block_macs = torch.tensor([s.cost for s in block.slots], dtype=torch.float64)  # (B,)
        self._full = float(block.full_cost())
        owner = layer_units(self.layers, self.blocks)
        self._in_block = torch.zeros(len(self.layers), len(self.blocks), dtype=torch.float64)  # (L, B)
        for i, b in enumerate(owner):
            if b >= 0:
                self._in_block[i, b] = 1.0
        block_slots = list(block.slots) if "block" in self.kinds else []
        mask_slots = [GateSlot(name=f"mask/{p}", kind="mask", block=p, cost=float(m))
                      for p, m in zip(self.layers, self.layer_macs.tolist())]
        self.slots: list[GateSlot] = [*block_slots, *mask_slots]
        self.soft_slots = torch.tensor([False] * len(block_slots) + [True] * len(mask_slots))  # (N,)
        self.pruned_state: dict[str, torch.Tensor] | None = None  # reconstructed weights of a plan

    # ---- gates -------------------------------------------------------------------------------
    @property
    def n_block_slots(self) -> int:
        return len(self.slots) - len(self.layers)

    def split(self, gates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(block gates (B,), densities (L,))``: ones for a kind that is not searched; densities
        clamped to ``[min_density, 1]`` and fixed where the pattern fixes them."""
        if gates.shape != (len(self.slots),):
            raise ValueError(f"gates must have shape ({len(self.slots)},), got {tuple(gates.shape)}")
        nb = self.n_block_slots
        g_block = gates[:nb] if nb else torch.ones(len(self.blocks), dtype=gates.dtype, device=gates.device)
        dens = gates[nb:]
        if self.mask is not None:
            dens = self.mask.effective(dens.clamp(min=self.mask.config.min_density, max=1.0))
        return g_block, dens

    # ---- costs -------------------------------------------------------------------------------
    def macs_with(self, densities: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(unit MACs (B,), outside MACs)`` per example at these layer densities."""
        unit = self._block_macs.to(densities)
        outside = self._full - unit.sum()
        if not self.layers:
            return unit, outside
        saved = (1 - densities) * self.layer_macs.to(densities)  # (L,)
        in_block = self._in_block.to(densities)
        return unit - saved @ in_block, outside - (saved * (1 - in_block.sum(1))).sum()

    def full_cost(self) -> float:
        """MACs of the dense model per example."""
        return self._full

    def cost_of(self, keep: torch.Tensor, densities: torch.Tensor) -> torch.Tensor:
        """Kept-MACs ratio of block gates ``(B,)`` at layer densities ``(L,)``."""
        unit, outside = self.macs_with(densities)
        return (outside + (keep.to(unit) * unit).sum()) / self._full

    def expected_cost(self, gates: torch.Tensor) -> torch.Tensor:
        """Kept-MACs ratio, differentiable in block gates and densities."""
        g_block, dens = self.split(gates)
        return self.cost_of(g_block, dens)

    def plan_cost(self, keep: Sequence[bool], densities: Sequence[float]) -> float:
        """Exact kept-MACs ratio of a hard plan: blocks kept by ``keep``, layers at ``densities``."""
        dens = torch.as_tensor(list(densities) or [1.0] * len(self.layers), dtype=torch.float64)
        return float(self.cost_of(torch.tensor([float(k) for k in keep], dtype=torch.float64), dens))

    def unit_costs(self, densities: Sequence[float]) -> tuple[list[float], float]:
        """``(unit MACs per block, MACs of the whole model)`` at fixed densities: the block view
        that the block kind's exact-budget plan code runs on (``kept = (total - removed) / total``)."""
        dens = torch.as_tensor(list(densities) or [1.0] * len(self.layers), dtype=torch.float64)
        unit, outside = self.macs_with(dens)
        return unit.tolist(), float(outside + unit.sum())

    # ---- outputs -----------------------------------------------------------------------------
    def set_densities(self, densities: torch.Tensor | None) -> None:
        """Mask hooks compute with these densities (``None``: dense weights) until set again."""
        if self.mask is not None:
            self.mask.set_densities(densities)

    def reference(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """The dense model's output (masks off, every block computed)."""
        self.set_densities(None)
        return self.block.reference(dict(batch))

    def gated(self, batch: Mapping[str, Any], gates: torch.Tensor) -> dict[str, torch.Tensor]:
        """Output with block gates and mask densities from ``gates``; differentiable in both."""
        g_block, dens = self.split(gates)
        self.set_densities(dens if self.layers else None)
        try:
            if "block" in self.kinds:
                return self.block.gated(dict(batch), g_block)
            return {"output": self.output_fn(self.model, dict(batch))}  # every block computed as is
        finally:
            self.set_densities(None)

    def hard(self, batch: Mapping[str, Any], keep: Sequence[bool], pruned: bool = True,
             densities: Sequence[float] | None = None) -> torch.Tensor:
        """Output of a hard plan without grad: closed blocks are identities; the layers carry the
        plan's reconstructed weights (``pruned``), saliency masks at ``densities``, or neither."""
        from dipgo.supernets.joint import swapped_weights

        gates = torch.tensor([1.0 if k else 0.0 for k in keep])
        with torch.no_grad():
            if pruned and self.pruned_state is not None:
                self.set_densities(None)
                with swapped_weights(self.model, self.pruned_state):
                    return self.block.gated(dict(batch), gates)["output"]
            use = densities is not None and len(self.layers) > 0
            self.set_densities(torch.as_tensor(list(densities), dtype=torch.float32) if use else None)
            try:
                return self.block.gated(dict(batch), gates)["output"]
            finally:
                self.set_densities(None)

    def remove(self) -> nn.Module:
        """Remove every hook (mask first, then block); the model is handed back unchanged."""
        if self._mask_hooks is not None:
            self._mask_hooks.remove()
        return self.block.remove()
