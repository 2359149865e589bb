"""What both joint variants (reuse + mask, block + mask) do the same way with their mask part.

Each variant has its own structural kind and cost function; the density fitting, the pruning of
the masked layers and the MACs-weighted density they report are one mechanism, kept here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import DictConfig
from torch import nn

from dipgo.errors import ConfigError, one_of
from dipgo.postprocess.plan import Plan

if TYPE_CHECKING:
    from dipgo.supernets.joint import JointSuperNet
    from dipgo.supernets.joint_block import BlockMaskSuperNet


def mask_config(cfg: DictConfig) -> Any:
    """The mask part's gate config: MACs-weighted, ``supernet.mask_exclude`` added to the default
    exclusions. Searched together with reuse, the densities stay in ``[mask_min_density, 1]`` during
    training too, so the reuse gates learn for the budget a realistic split leaves (alone, or
    beside block gates, the mask kind may go down to its usual floor)."""
    from dipgo.supernets.mask import DEFAULT_EXCLUDE, MaskGateConfig

    s = cfg.supernet
    floor = float(s.mask_min_density) if "reuse" in s.kinds else MaskGateConfig.min_density
    return MaskGateConfig(pattern=str(s.pattern), saliency=s.saliency, cost_weighting="macs",
                          strict_pattern=bool(s.strict_pattern), temperature=float(s.mask_temperature),
                          exclude=(*DEFAULT_EXCLUDE, *[str(p) for p in s.mask_exclude]), min_density=floor)


@dataclass
class MaskLayers:
    """The layers a joint search masks, found on the unhooked copy of the model."""

    config: Any  # MaskGateConfig
    pattern: Any  # Pattern
    layers: list[str]  # prunable layers the forward reaches
    refused: dict[str, str]  # layer -> why the pattern does not fit (left dense)
    norms: dict[str, torch.Tensor]  # Wanda's input-column norms on the calibration batches


def find_mask_layers(dense: nn.Module, cfg: DictConfig, batches: list[dict[str, Any]], output_fn: Any) -> MaskLayers:
    """Prunable layers of ``dense`` under ``supernet.mask_exclude``, pattern refusals, input norms."""
    from dipgo.supernets.mask import check_layers, find_prunable, input_norms, parse_pattern

    mcfg = mask_config(cfg)
    pattern = parse_pattern(mcfg.pattern)
    layers = find_prunable(dense, tuple(mcfg.exclude))
    if not layers:
        raise ValueError(f"{type(dense).__name__} has no Linear or Conv2d layer left to prune after supernet.mask_exclude")
    refused = check_layers(dense, layers, pattern, mcfg.strict_pattern)
    norms = input_norms(dense, layers, batches, output_fn)
    layers = [p for p in layers if p in norms]  # only layers the forward reaches
    return MaskLayers(mcfg, pattern, layers, {p: m for p, m in refused.items() if p in layers}, norms)


def install_mask_gates(model: nn.Module, dense: nn.Module, found: MaskLayers, layer_macs: list[float],
                       output_fn: Any) -> Any:
    """Mask gates on ``model`` (already carrying the structural gates), saliency from ``dense``."""
    from dipgo.supernets.mask import MaskSuperNet, saliency_of

    mcfg = found.config
    saliency = {p: saliency_of(dense.get_submodule(p), mcfg.saliency, found.norms.get(p)) for p in found.layers}
    mask = MaskSuperNet(model, found.layers, layer_macs, saliency, found.pattern, mcfg, output_fn, found.refused,
                        found.norms)
    for msg in mask.refused.values():
        print(f"dipgo: {msg}")
    return mask


def shift_densities(densities: torch.Tensor, free: torch.Tensor, min_density: float,
                    cost: Callable[[list[float]], float], target: float) -> torch.Tensor | None:
    """``densities + c`` (clamped to ``[min_density, 1]``, only where ``free``) for the largest
    constant ``c`` whose ``cost`` stays within ``target`` (bisection); ``None`` when even the
    minimum density is over it. One shift keeps the learned order of the layers."""

    def shifted(c: float) -> torch.Tensor:
        return torch.where(free, (densities + c).clamp(min_density, 1.0), densities)

    lo, hi = -1.0, 1.0
    if cost(shifted(lo).tolist()) > target:
        return None
    if cost(shifted(hi).tolist()) <= target:
        return shifted(hi)
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if cost(shifted(mid).tolist()) > target:
            hi = mid
        else:
            lo = mid
    return shifted(lo)


def prune_mask_part(sn: JointSuperNet | BlockMaskSuperNet, densities: list[float], cfg: DictConfig, distill: bool = True) -> dict[str, Any]:
    """Prune the masked layers of ``sn.dense_model`` (an unhooked copy) at ``densities``: OBS
    reconstruction and, with ``distill``, ``supernet.distill_steps`` of distillation. The pruned
    copy is kept as ``sn.pruned_model`` and its masked layers' parameters as ``sn.pruned_state``
    (swapped into the hooked model to sample or score hard plans). Returns the realised densities."""
    from dipgo.postprocess.mask_subnet import prune_with_plan

    plan = Plan(kind="mask", model=type(sn.model).__name__, blocks=list(sn.layers),
                compute=[[d >= 1.0 for d in densities]], target=1.0, cost_ratio=1.0,
                meta={"pattern": sn.mask.pattern.name, "density": list(densities)})
    pruned, masks = prune_with_plan(sn.dense_model, plan, sn.mask.saliency, sn.calibration_batches, sn.output_fn,
                                    reconstruct=bool(cfg.supernet.reconstruct),
                                    distill_steps=int(cfg.supernet.distill_steps) if distill else 0,
                                    distill_lr=float(cfg.supernet.distill_lr))
    sn.pruned_model = pruned
    sn.pruned_state = {f"{p}.{name}": t.detach().clone() for p in sn.layers
                       for name, t in pruned.get_submodule(p).named_parameters(recurse=False)}
    kept = {p: float(m.float().mean()) for p, m in masks.items()}
    return {"realised_density": [round(kept.get(p, 1.0), 4) for p in sn.layers]}


def macs_density(mask_meta: dict[str, Any]) -> float | None:
    """MACs-weighted density of the masked layers (``None`` without a mask part)."""
    if not mask_meta:
        return None
    macs = torch.tensor(mask_meta["layer_macs"], dtype=torch.float64)
    dens = torch.tensor(mask_meta["density"], dtype=torch.float64)
    return round(float((macs * dens).sum() / macs.sum()), 4)


def refuse_joint_export() -> None:
    """``dipgo export`` of a joint plan (either variant): not written yet, one sentence why."""
    raise ConfigError("dipgo export does not write joint plans yet; plan.json holds the structural part "
                      "(reuse grid or removed blocks) and the per-layer densities")


def validate_joint_config(cfg: DictConfig) -> None:
    """The joint kind (either variant): which kinds, and the mask part's enumerations when it is searched."""
    from dipgo.supernets.joint import check_kinds

    try:
        kinds = check_kinds(cfg.supernet.kinds)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if cfg.supernet.cost != "macs":
        raise ConfigError("supernet.kind=joint spends one budget in MACs (supernet.cost=macs): the sparsity's "
                          "latency depends on kernels that the search does not model")
    if "mask" in kinds:
        one_of("supernet.pattern", cfg.supernet.pattern, ("unstructured", "2:4", "4:8"))
        one_of("supernet.saliency", cfg.supernet.saliency, ("magnitude", "wanda"))
    one_of("supernet.mask_allocation", cfg.supernet.mask_allocation, ("layer", "global"))
    if cfg.supernet.mask_calib_items < 1:
        raise ConfigError(f"supernet.mask_calib_items must be at least 1; got {cfg.supernet.mask_calib_items}")
    bad = [d for d in [cfg.supernet.mask_min_density, *cfg.supernet.split_densities] if not 0.0 < d <= 1.0]
    if bad:
        raise ConfigError(f"supernet.mask_min_density and supernet.split_densities are densities in (0, 1]; got {bad}")


class JointTaskBase:
    """What both joint tasks share: the kind name, its config checks, the refused export."""

    kind = "joint"

    def validate(self, cfg: DictConfig) -> None:
        validate_joint_config(cfg)

    def export(self, cfg: DictConfig, plan: Plan, out: Path) -> Path:
        refuse_joint_export()
        return out
