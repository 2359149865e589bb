"""The ``block`` gate kind as a search task: depth pruning of classifiers and text encoders.

Build: every residual block whose input and output shapes match gets a gate ``x + g (f(x) - x)``
(:func:`dipgo.supernets.block.apply_block_gates`); with ``supernet.cost=latency`` the slots' costs
are replaced by a per-block latency table measured on the search device. Data: digits training
images (classifiers) or tokenised training sentences (encoders). Plan: the cheapest-to-lose
blocks by learned keep probability until the budget holds. Export: the blocks physically removed,
a smaller model of the same library. Evaluation is the report's part (:mod:`dipgo.report.block_eval`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import DictConfig

from dipgo.models.configured import load_configured_model
from dipgo.models.io import digits_images, output_fn_for
from dipgo.postprocess.plan import Plan
from dipgo.search.registry import register_task

if TYPE_CHECKING:
    from dipgo.models.registry import LoadedModel
    from dipgo.supernets.block import BlockSuperNet

KINDS = ("classifier", "encoder")


def calibration_pool(loaded: LoadedModel, cfg: DictConfig) -> Any:
    """The calibration pool: training images or training sentences (never the evaluation split)."""
    from dipgo.search.data import ImagePool, TextPool

    if loaded.kind == "classifier":
        images, _ = digits_images(loaded.model, "train")
        return ImagePool(images, cfg.data.pool_size, cfg.seed)
    from dipgo.models.text import text_corpus

    return TextPool(text_corpus("train"), loaded.tokenizer, cfg.data.pool_size, cfg.data.max_length)


def _example(pool: Any, n: int = 1) -> dict[str, torch.Tensor]:
    items = [pool[i] for i in range(n)]
    return {k: torch.stack([it[k] for it in items]) for k in items[0] if k != "index"}


def _check_data(loaded: LoadedModel, cfg: DictConfig) -> None:
    from dipgo.errors import UnsupportedModelError

    if loaded.kind not in KINDS:
        raise UnsupportedModelError(
            f"supernet.kind=block needs a classifier (timm) or a text encoder (transformers), but {loaded.source} "
            f"is a {loaded.kind} ({type(loaded.model).__name__})"
        )
    wanted = "images" if loaded.kind == "classifier" else "text"
    if cfg.data.kind != wanted:
        raise UnsupportedModelError(f"a {loaded.kind} calibrates on data.kind={wanted}, not {cfg.data.kind!r}")
    if loaded.kind == "encoder" and loaded.tokenizer is None:
        raise UnsupportedModelError(f"the encoder {loaded.source} has no tokenizer files; block search on text needs one")


def apply_latency_costs(supernet: BlockSuperNet, pool: Any, cfg: DictConfig) -> dict[str, Any]:
    """Replace the slots' MACs by a per-block latency table measured (or cached) on this device."""
    from dipgo.measure.block_latency import block_latency_table

    device = torch.device("cuda" if cfg.trainer.accelerator in ("gpu", "cuda") and torch.cuda.is_available() else "cpu")
    batch = _example(pool, min(len(pool), cfg.report.latency_batch))
    model, fn = supernet.model.to(device), supernet.output_fn
    inputs = {k: v.to(device) for k, v in batch.items()}
    table = block_latency_table(model, supernet.blocks, inputs, lambda: fn(model, inputs), device=device,
                                runs=max(3, cfg.report.latency_runs))
    supernet.set_costs([table["block_s"][b] for b in supernet.blocks], table["full_s"])
    return table


@register_task("block")
class BlockTask:
    """Depth pruning: one gate per residual block."""

    kind = "block"
    variant = None

    def validate(self, cfg: DictConfig) -> None:
        """Nothing beyond the checks every kind shares (:func:`dipgo.search.compose.validate_config`)."""

    def build(self, loaded: LoadedModel, cfg: DictConfig) -> Any:
        from dipgo.postprocess.block_plan import check_block_reachable
        from dipgo.supernets.block import apply_block_gates

        _check_data(loaded, cfg)
        pool = calibration_pool(loaded, cfg)
        supernet = apply_block_gates(loaded.model, _example(pool), output_fn=output_fn_for(loaded.kind))
        supernet.output_fn = output_fn_for(loaded.kind)
        supernet.calibration_pool = pool  # the refinement scores hard plans on its first items
        supernet.macs = [s.cost for s in supernet.slots]
        supernet.full_macs = supernet.full_cost()
        supernet.latency_table = apply_latency_costs(supernet, pool, cfg) if cfg.supernet.cost == "latency" else None
        check_block_reachable([s.cost for s in supernet.slots], supernet.full_cost(), cfg.search.target)
        return supernet

    def datamodule(self, loaded: LoadedModel, supernet: BlockSuperNet, cfg: DictConfig) -> Any:
        from dipgo.search.data import CalibrationDataModule

        pool = supernet.calibration_pool  # built once in build()
        return CalibrationDataModule(pool, cfg.data.batch_size, cfg.data.steps_per_epoch, cfg.seed, cfg.data.num_workers)

    def extract_plan(self, probs: torch.Tensor, supernet: BlockSuperNet, cfg: DictConfig) -> Plan:
        from dipgo.postprocess.block_plan import extract_block_plan

        meta = {"cost": cfg.supernet.cost, "model_source": cfg.model.name}
        plan = extract_block_plan(probs, supernet, cfg.search.target, meta=meta)
        return refine(plan, probs, supernet, cfg) if cfg.search.refine.enabled else plan

    def export(self, cfg: DictConfig, plan: Plan, out: Path) -> Path:
        from dipgo.models.configured import model_source
        from dipgo.postprocess.block_subnet import check_plan_matches, export_block_subnet

        loaded = load_configured_model(cfg)
        check_plan_matches(loaded.model, plan)
        path = export_block_subnet(loaded.model, plan, out, model_source(loaded))
        if loaded.tokenizer is not None:  # the exported encoder is usable on its own, text in
            loaded.tokenizer.save_pretrained(str(path))
        return path


def refine(plan: Plan, probs: torch.Tensor, supernet: BlockSuperNet, cfg: DictConfig) -> Plan:
    """The extracted plan refined by measuring hard plans on calibration data (swap search).

    Seeds: the learned plan plus the configured static criteria (``search.refine.seeds`` entries
    that are block baselines); the score is the search's own distortion on the first
    ``search.refine.batch`` calibration items, against the original model.
    """
    from dipgo.losses.distortion import DistortionConfig, distortion
    from dipgo.postprocess.block_plan import BLOCK_BASELINES, baseline_block_plan, refine_block_keep
    from dipgo.postprocess.block_subnet import make_block_plan
    from dipgo.search.config import config_of
    from dipgo.search.data import collate

    dist_cfg = config_of(DistortionConfig, cfg.search.distortion)
    pool = supernet.calibration_pool
    items = [pool[i] for i in range(min(cfg.search.refine.batch, len(pool)))]
    batch = {k: v for k, v in collate(items).items() if k != "index"}
    reference = supernet.reference(batch)

    def score(keep: list[bool]) -> float:
        gates = torch.tensor([1.0 if k else 0.0 for k in keep])
        with torch.no_grad():
            return float(distortion(supernet.gated(batch, gates), reference, dist_cfg)["total"])

    seeds = {"learned": plan.compute[0]}
    for name in cfg.search.refine.seeds:
        if name in BLOCK_BASELINES and name != "random":
            seeds[name] = baseline_block_plan(name, supernet, plan.target, seed=cfg.seed).compute[0]
    costs = [s.cost for s in supernet.slots]
    keep, info = refine_block_keep(seeds, probs.tolist(), costs, supernet.full_cost(), plan.target, score,
                                   max_evals=cfg.search.refine.max_evals)
    return make_block_plan(supernet, keep, plan.target, {**plan.meta, "refine": info})
