"""The ``mask`` gate kind as a search task: learned per-layer sparsity under one global budget.

Build: every Linear / Conv2d (pooler and heads excluded) gets a density-controlled mask from a
threshold on its saliency (:func:`dipgo.supernets.mask.apply_mask_gates`); Wanda's input norms
come from the calibration pool. Data: the same calibration pools as the block kind (tokenised
training sentences for encoders, digits training images for classifiers). Plan: the learned
densities projected onto the exact global density (:mod:`dipgo.postprocess.mask_plan`).
SubNet (:func:`build_subnet`, also what the report measures): the plan pruned with OBS
reconstruction + distillation, on the block-sparse kernels where they pay, exported as
safetensors + JSON. Evaluation and ``dipgo bench`` are the report's part
(:mod:`dipgo.report.mask_eval`, :mod:`dipgo.report.mask_bench`).

``search.target`` is the kept density (1 - sparsity) of the prunable layers, weighted by
parameters or MACs (``supernet.cost_weighting``).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import DictConfig
from torch import nn

from dipgo.errors import ConfigError, one_of
from dipgo.models.configured import load_configured_model
from dipgo.postprocess.plan import Plan
from dipgo.search.registry import register_task

if TYPE_CHECKING:
    from dipgo.models.registry import LoadedModel
    from dipgo.supernets.mask import MaskSuperNet


def gate_config(cfg: DictConfig) -> Any:
    from dipgo.supernets.mask import MaskGateConfig

    s = cfg.supernet
    return MaskGateConfig(pattern=str(s.pattern), saliency=s.saliency, cost_weighting=s.cost_weighting,
                          strict_pattern=bool(s.strict_pattern), temperature=float(s.mask_temperature))


def calibration_batches(pool: Any, batch_size: int, limit: int | None = None) -> list[dict[str, torch.Tensor]]:
    """The calibration pool (its first ``limit`` items) in fixed chunks (no ``index``): Wanda
    norms, Hessians, distillation."""
    from dipgo.search.data import collate

    n = len(pool) if limit is None else min(len(pool), int(limit))
    out = []
    for start in range(0, n, batch_size):
        items = [pool[i] for i in range(start, min(start + batch_size, n))]
        out.append({k: v for k, v in collate(items).items() if k != "index"})
    return out


@register_task("mask")
class MaskTask:
    """Sparsity: one learned density per prunable layer."""

    kind = "mask"
    variant = None

    def validate(self, cfg: DictConfig) -> None:
        """search.target is a kept density in (0, 1); pattern / saliency / weighting enumerations, SDS."""
        from dipgo.postprocess.sds import sds_refusal
        from dipgo.supernets.mask import PATTERNS

        if not 0.0 < cfg.search.target < 1.0:
            raise ConfigError(f"supernet.kind=mask needs search.target in (0, 1) (the kept density, 1 - sparsity: "
                              f"0.5 = 50% sparse); got {cfg.search.target}")
        one_of("supernet.pattern", cfg.supernet.pattern, PATTERNS)
        one_of("supernet.saliency", cfg.supernet.saliency, ("magnitude", "wanda"))
        one_of("supernet.cost_weighting", cfg.supernet.cost_weighting, ("params", "macs"))
        sds = cfg.supernet.sds
        problem = sds_refusal(sds.steps, sds.lr, sds.l1, sds.rounds)
        if problem is not None:
            raise ConfigError(problem)
        if cfg.supernet.mask_temperature <= 0:
            raise ConfigError(f"supernet.mask_temperature must be > 0; got {cfg.supernet.mask_temperature}")

    def build(self, loaded: LoadedModel, cfg: DictConfig) -> Any:
        from dipgo.errors import UnsupportedModelError
        from dipgo.models.io import output_fn_for
        from dipgo.postprocess.mask_plan import check_mask_target
        from dipgo.search.block_task import _check_data, _example, calibration_pool
        from dipgo.supernets.mask import apply_mask_gates

        try:
            _check_data(loaded, cfg)
        except UnsupportedModelError as exc:  # the same data rules as the block kind, named for this one
            raise UnsupportedModelError(str(exc).replace("kind=block", "kind=mask").replace("block search", "mask search")) from None
        check_mask_target(cfg.search.target)
        pool = calibration_pool(loaded, cfg)
        batches = calibration_batches(pool, cfg.data.batch_size)
        fn = output_fn_for(loaded.kind)
        supernet = apply_mask_gates(loaded.model, _example(pool), fn, gate_config(cfg), calibration=batches)
        supernet.calibration_pool = pool
        supernet.calibration_batches = batches
        for msg in supernet.refused.values():
            print(f"dipgo: {msg}")
        return supernet

    def datamodule(self, loaded: LoadedModel, supernet: MaskSuperNet, cfg: DictConfig) -> Any:
        from dipgo.search.data import CalibrationDataModule

        return CalibrationDataModule(supernet.calibration_pool, cfg.data.batch_size, cfg.data.steps_per_epoch,
                                     cfg.seed, cfg.data.num_workers)

    def extract_plan(self, probs: torch.Tensor, supernet: MaskSuperNet, cfg: DictConfig) -> Plan:
        from dipgo.postprocess.mask_plan import extract_mask_plan

        return extract_mask_plan(probs, supernet, cfg.search.target, meta={"model_source": cfg.model.name})

    def export(self, cfg: DictConfig, plan: Plan, out: Path) -> Path:
        loaded = load_configured_model(cfg)
        supernet = self.build(loaded, cfg)
        subnet, _, _ = build_subnet(loaded, supernet, plan, cfg)
        path = export_subnet(subnet, plan, out, loaded)
        return path


def export_subnet(subnet: nn.Module, plan: Plan, out: Path, loaded: LoadedModel) -> Path:
    """The kernel SubNet as safetensors + JSON (with the tokenizer of an encoder, usable on its own)."""
    from dipgo.postprocess.mask_subnet import export_mask_subnet

    path = export_mask_subnet(subnet, plan, out, {"source": loaded.source, "kind": loaded.kind})
    if getattr(loaded, "tokenizer", None) is not None:
        loaded.tokenizer.save_pretrained(str(path))
    return path


def build_subnet(loaded: LoadedModel, supernet: MaskSuperNet, plan: Plan, cfg: DictConfig) -> tuple[nn.Module, dict, dict]:
    """``(kernel SubNet, keep masks, conversion report)`` of ``plan`` (removes the gates)."""
    from dipgo.postprocess.mask_subnet import kernel_block, prune_with_plan, to_kernels

    model = supernet.remove()
    stages: dict[str, Any] = {}
    pruned, masks = prune_with_plan(model, plan, supernet.saliency, supernet.calibration_batches, supernet.output_fn,
                                    reconstruct=cfg.supernet.reconstruct, distill_steps=cfg.supernet.distill_steps,
                                    distill_lr=cfg.supernet.distill_lr, sds=cfg.supernet.get("sds"),
                                    norms=supernet.norms, stages=stages)
    kern = copy.deepcopy(pruned)
    tokens = cfg.report.latency_batch * (cfg.data.max_length if loaded.kind == "encoder" else 1)
    conversion = to_kernels(kern, masks, kernel_block(plan), tokens=tokens)
    return kern, masks, {"pruned": pruned, "conversion": conversion, **stages}
