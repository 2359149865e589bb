"""Measure a mask plan: pruned SubNet vs one-shot baselines on held-out data, kernels timed.

Variants, all at the plan's global sparsity: ``dipgo`` (learned allocation + OBS reconstruction +
distillation of the kept weights, + SDS when ``supernet.sds.enabled``), ``dipgo_before_sds`` (with
SDS on: the same before its re-dense and second prune), ``dipgo_mask_only`` (the same masks' allocation without any
weight update, an ablation), and the configured baselines (``magnitude``, ``wanda``, ``owl``,
``sparsegpt``; :mod:`dipgo.postprocess.mask_baselines`). Fidelity: for encoders the cosine of
mean-pooled embeddings to the dense model's on held-out sentences; for classifiers accuracy /
agreement / KL. Latency: the dense model vs the dipgo SubNet with its masked Linears on the
block-sparse kernels where they pay, interleaved in one process.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig

from dipgo.measure.latency import compare_latency, speedup
from dipgo.postprocess.plan import Plan
from dipgo.report.mask_bench import bench_lines as mask_bench_lines
from dipgo.report.mask_bench import bench_mask_plan
from dipgo.report.registry import register_functions
from dipgo.search.mask_task import build_subnet, export_subnet

if TYPE_CHECKING:
    from dipgo.models.registry import LoadedModel
    from dipgo.supernets.mask import MaskSuperNet


def evaluate_mask(loaded: LoadedModel, supernet: MaskSuperNet, plan: Plan, cfg: DictConfig, run_dir: Path) -> tuple[dict, dict]:
    from dipgo.measure.fidelity import fidelity_key, output_fidelity
    from dipgo.models.io import outputs
    from dipgo.postprocess.mask_baselines import MASK_BASELINES, global_density, prune_baseline
    from dipgo.postprocess.mask_subnet import prune_with_plan
    from dipgo.report.block_eval import _latency_inputs, eval_data

    kind = loaded.kind
    layers, norms, batches = supernet.layers, supernet.norms, supernet.calibration_batches
    costs = {s.name: s.cost for s in supernet.slots}
    free = [p for p in layers if p not in supernet.refused]
    kern, masks, extra = build_subnet(loaded, supernet, plan, cfg)
    model = supernet.model  # gates removed by build_subnet
    data = eval_data(loaded, cfg)
    labels = data.get("labels")
    ref = outputs(model, kind, data)
    variants = [{"name": "full", "density": 1.0, **output_fidelity(kind, ref, ref, labels)}]
    variants.append({"name": "dipgo", "density": global_density(masks, costs) if masks else 1.0,
                     **output_fidelity(kind, outputs(extra["pruned"], kind, data), ref, labels)})
    if "before_sds" in extra:
        first, first_masks = extra["before_sds"]
        variants.append({"name": "dipgo_before_sds", "density": global_density(first_masks, costs),
                         **output_fidelity(kind, outputs(first, kind, data), ref, labels)})
    only, only_masks = prune_with_plan(model, plan, supernet.saliency, batches, supernet.output_fn, reconstruct=False)
    variants.append({"name": "dipgo_mask_only", "density": global_density(only_masks, costs) if only_masks else 1.0,
                     **output_fidelity(kind, outputs(only, kind, data), ref, labels)})
    for name in cfg.report.baselines:
        if name not in MASK_BASELINES:
            continue
        base = copy.deepcopy(model)
        bm = prune_baseline(name, base, free, _free_target(plan, supernet),
                            supernet.pattern, norms, costs, batches, supernet.output_fn)
        variants.append({"name": name, "density": global_density(bm, costs),
                         **output_fidelity(kind, outputs(base, kind, data), ref, labels)})
    kernel_fid = output_fidelity(kind, outputs(kern, kind, data), ref, labels)
    inputs = _latency_inputs(data, cfg.report.latency_batch)
    fn = supernet.output_fn
    lat = compare_latency({"full": lambda: fn(model, inputs), "dipgo_kernels": lambda: fn(kern, inputs)},
                          warmup=cfg.report.latency_warmup, runs=cfg.report.latency_runs)
    subnet_dir = export_subnet(kern, plan, run_dir / "subnet", loaded)
    conv = extra["conversion"]
    report = {
        "kind": "mask",
        "model": plan.model,
        "pattern": plan.payload.pattern,
        "target_density": plan.target,
        "plan_density": plan.cost_ratio,
        "fidelity_metric": fidelity_key(kind),
        "variants": variants,
        "kernel_layers": sum(1 for r in conv.values() if r["converted"]),
        "masked_layers": len(masks),
        "sds": "before_sds" in extra,
        **({"sds_config": _sds_dict(cfg)} if "before_sds" in extra else {}),
        "kernel_fidelity": kernel_fid,
        "latency": {k: v.to_dict() for k, v in lat.items()},
        "speedup": speedup(lat["full"], lat["dipgo_kernels"]),
        "refused": plan.meta.get("refused", {}),
        "subnet_dir": str(subnet_dir),
    }
    return report, {}


def _sds_dict(cfg: DictConfig) -> dict[str, Any]:
    from dipgo.postprocess.sds import SDSConfig

    return SDSConfig.from_config(cfg.supernet.get("sds")).to_dict()


def _free_target(plan: Plan, supernet: MaskSuperNet) -> float:
    """The density the free (non-refused) layers need for the plan's global density."""
    costs = [s.cost for s in supernet.slots]
    fixed = sum(c for p, c in zip(supernet.layers, costs) if p in supernet.refused)
    free = sum(costs) - fixed
    return (plan.target * sum(costs) - fixed) / free


def summary_lines(report: dict[str, Any]) -> list[str]:
    key = report["fidelity_metric"]
    lines = [f"mask plan: pattern {report['pattern']}{' + SDS' if report.get('sds') else ''}, "
             f"density {report['plan_density']:.4f} "
             f"(target {report['target_density']:.4f}); {report['kernel_layers']}/{report['masked_layers']} layers "
             f"on block-sparse kernels, {report['speedup']:.2f}x vs dense"]
    for v in report["variants"]:
        lines.append(f"  {v['name']:<16} density {v['density']:.4f}  {key} {v[key]:.4f}")
    return lines


register_functions("mask", evaluate=evaluate_mask, summary_lines=summary_lines, bench=bench_mask_plan, bench_lines=mask_bench_lines)
