"""One-shot pruning baselines at the same global sparsity: magnitude, Wanda, OWL, SparseGPT.

All prune the same prunable layers of a copy of the model in place and return the keep masks:

- ``magnitude``: every layer at the target density, the smallest ``|W|`` of the layer pruned;
- ``wanda``: score ``|W_ij| * ||X_j||`` (input-column norms on calibration data), the lowest
  scores of each *output row* pruned (Wanda's per-output comparison group);
- ``owl``: Wanda with OWL's outlier-weighted allocation: a layer's outlier ratio is the share of
  scores above ``M`` times the layer's mean score; sparsity falls linearly with it, within
  ``target +- lambda``, shifted so the weighted mean is the target;
- ``sparsegpt``: every layer at the target density, OBS mask selection and weight update,
  layer group after layer group (:func:`dipgo.postprocess.reconstruct.sequential_reconstruct`).

For N:M patterns the density is fixed, so OWL has nothing to allocate and equals Wanda there.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from dipgo.postprocess.reconstruct import apply_masks, sequential_reconstruct
from dipgo.supernets.mask import Pattern, density_mask, nm_mask, weight_matrix

MASK_BASELINES: tuple[str, ...] = ("magnitude", "wanda", "owl", "sparsegpt")
OutputFn = Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]


def row_mask(score: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the top ``density`` share of each row's scores."""
    o, i = score.shape
    k = int(round(density * i))
    mask = torch.zeros_like(score, dtype=torch.bool)
    if k > 0:
        mask.scatter_(1, score.topk(k, dim=1).indices, True)
    return mask


def wanda_score(module: nn.Module, norm: torch.Tensor) -> torch.Tensor:
    return weight_matrix(module).detach().float().abs() * norm.float()[None, :]


def owl_densities(scores: dict[str, torch.Tensor], costs: dict[str, float], target: float,
                  m: float = 5.0, lam: float = 0.08) -> dict[str, float]:
    """OWL's layer densities: more outliers -> less sparsity, weighted mean sparsity = 1 - target."""
    layers = list(scores)
    ratio = torch.tensor([float((s > m * s.mean()).float().mean()) for s in scores.values()])
    span = (ratio.max() - ratio.min()).clamp(min=1e-12)
    norm = (ratio - ratio.min()) / span  # [0, 1], 1 = most outliers
    sparsity = (1 - target) + lam - 2 * lam * norm
    c = torch.tensor([costs[p] for p in layers], dtype=torch.float64)
    sparsity = sparsity.double()
    sparsity += (1 - target) - (sparsity * c).sum() / c.sum()
    sparsity = sparsity.clamp(0.0, 0.99)
    return {p: float(1 - s) for p, s in zip(layers, sparsity)}


def prune_baseline(name: str, model: nn.Module, layers: Sequence[str], target: float, pattern: Pattern,
                   norms: dict[str, torch.Tensor], costs: dict[str, float],
                   batches: list[dict[str, torch.Tensor]], output_fn: OutputFn) -> dict[str, torch.Tensor]:
    """Prune ``model`` in place with baseline ``name``; returns ``{layer: keep mask}``."""
    if name not in MASK_BASELINES:
        raise ValueError(f"unknown mask baseline {name!r}; accepted: {', '.join(MASK_BASELINES)}")
    layers = list(layers)
    dens = {p: pattern.fixed_density or target for p in layers}
    if name == "sparsegpt":
        fixed = None
        if pattern.blocked:  # a block spans several OBS columns: choose it on Wanda block scores first
            fixed = {p: density_mask(wanda_score(model.get_submodule(p), norms[p]), dens[p], pattern) for p in layers}
        return sequential_reconstruct(model, layers, dens, pattern, batches, output_fn, fixed_masks=fixed)
    if name == "magnitude":
        masks = {p: density_mask(weight_matrix(model.get_submodule(p)).detach().float().abs(), dens[p], pattern)
                 for p in layers}
    else:
        scores = {p: wanda_score(model.get_submodule(p), norms[p]) for p in layers}
        if name == "owl" and pattern.kind != "nm":
            dens = owl_densities(scores, costs, target)
        if pattern.kind == "nm":
            masks = {p: nm_mask(s, pattern.n, pattern.m) for p, s in scores.items()}
        elif pattern.blocked:
            masks = {p: density_mask(s, dens[p], pattern) for p, s in scores.items()}
        else:
            masks = {p: row_mask(s, dens[p]) for p, s in scores.items()}
    apply_masks(model, masks)
    return masks


def global_density(masks: dict[str, torch.Tensor], costs: dict[str, float]) -> float:
    """Cost-weighted kept fraction of the masked layers."""
    total = sum(costs[p] for p in masks)
    return sum(costs[p] * float(m.float().mean()) for p, m in masks.items()) / total
