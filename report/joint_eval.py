"""Measure a joint plan: the SubNet (sparse weights + its structural part) against the full model.

Two plan shapes share ``kind="joint"``, one per registered search task (:mod:`dipgo.search.joint_task`,
:mod:`dipgo.search.joint_block_task`), each with its reporter here: reuse + mask on a diffusion denoiser (held-out noise sampled by the full
model and by the SubNet: PSNR, SSIM, FD) and block + mask on a classifier or encoder (held-out
data with the block kind's metrics, the closed blocks physically removed). The report says which
in ``joint_variant`` (``block_mask``; absent for reuse + mask), which is how a saved report is
summarised again.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import DictConfig

from dipgo.errors import ConfigError
from dipgo.measure.fidelity import fidelity_key, image_fidelity, output_fidelity
from dipgo.measure.macs import OutputCall, model_macs
from dipgo.models.io import output_fn_for, outputs
from dipgo.models.registry import LoadedModel
from dipgo.postprocess.plan import Plan
from dipgo.report.block_eval import eval_data
from dipgo.report.plots import block_density_plot, reuse_density_plot
from dipgo.report.registry import register_reporter
from dipgo.report.reuse_eval import _digits_judge, eval_items
from dipgo.search.joint_block_task import subnet_of
from dipgo.search.joint_common import macs_density
from dipgo.supernets.joint import layer_units

if TYPE_CHECKING:
    from dipgo.supernets.joint import JointSuperNet
    from dipgo.supernets.joint_block import BlockMaskSuperNet


def evaluate_joint(loaded: LoadedModel, joint: Any, plan: Plan, cfg: DictConfig, run_dir: Path) -> tuple[dict, dict]:
    """Held-out fidelity of the SubNet (sparse weights + reuse plan) against the full model."""
    items = eval_items(loaded, cfg, cfg.report.num_samples, cfg.report.eval_seed)
    labels = items.get("class_labels")
    chunk = max(1, int(cfg.data.batch_size) * 4)
    n = items["noise"].shape[0]
    parts = [{k: v[a:a + chunk] for k, v in items.items() if isinstance(v, torch.Tensor)} for a in range(0, n, chunk)]
    ref = torch.cat([joint.reference(b)["output"] for b in parts])
    sub = torch.cat([joint.sample(b, plan.compute, pruned=joint.pruned_state is not None) for b in parts])
    judge = _digits_judge(loaded, cfg.report.get("fd_judge", "auto"))
    kw = {"classifier": judge[0], "real_features": judge[1], "labels": labels} if judge is not None else {}
    fid = image_fidelity(sub, ref, **kw)
    row = {"name": "dipgo", "cost_ratio": plan.cost_ratio, **{k: float(v) for k, v in fid.items()}}
    mask_meta = plan.meta.get("mask", {})
    report = {"kind": "joint", "kinds": list(joint.kinds), "target": plan.target, "cost_ratio": plan.cost_ratio,
              "cost_split": plan.meta.get("cost_split"), "fidelity_metric": "psnr", "num_samples": n,
              "mask_density_macs": macs_density(mask_meta), "variants": [row],
              "refine": {k: v for k, v in plan.meta.get("refine", {}).items() if k not in ("seed_scores", "pruner_compute")}}
    plots = {"joint_plan": _reuse_plot(plan, run_dir)}
    return report, plots


def _reuse_plot(plan: Plan, run_dir: Path) -> Path:
    """Reuse grid (steps x units) beside the per-layer densities: where the budget went."""
    mask = plan.meta.get("mask") or {}
    split = plan.meta.get("cost_split", {})
    title = (f"joint plan {'+'.join(plan.meta.get('kinds', []))}: kept MACs {plan.cost_ratio:.3f} "
             f"(reuse alone {split.get('reuse_only', 1):.3f}, sparsity alone {split.get('mask_only', 1):.3f})")
    return reuse_density_plot(torch.tensor(plan.compute, dtype=torch.float32), plan.blocks, mask.get("layers", []),
                              mask.get("density", []), run_dir / "joint_plan.png", title=title)


def evaluate_block_joint(loaded: LoadedModel, sn: BlockMaskSuperNet, plan: Plan, cfg: DictConfig, run_dir: Path) -> tuple[dict, dict]:
    """Held-out fidelity of the SubNet (pruned weights + removed blocks) against the full model."""
    kind = loaded.kind
    data = eval_data(loaded, cfg)
    labels = data.get("labels")
    ref = outputs(sn.dense_model, kind, data)
    subnet = subnet_of(sn, plan)
    out = outputs(subnet, kind, data)
    one = {k: v[:1] for k, v in data.items() if k != "labels"}
    fn = output_fn_for(kind)
    dense_macs_ratio = model_macs(OutputCall(subnet, fn), one) / model_macs(OutputCall(sn.dense_model, fn), one)
    rows = [{"name": "dipgo", "cost_ratio": plan.cost_ratio, "removed": plan.meta.get("removed_blocks", []),
             "dense_macs_ratio": round(dense_macs_ratio, 6), **output_fidelity(kind, out, ref, labels)},
            {"name": "full", "cost_ratio": 1.0, "removed": [], "dense_macs_ratio": 1.0,
             **output_fidelity(kind, ref, ref, labels)}]
    mask_meta = plan.meta.get("mask") or {}
    report = {"kind": "joint", "joint_variant": "block_mask", "kinds": list(sn.kinds), "model": type(sn.model).__name__,
              "source": loaded.source, "target": plan.target, "cost_ratio": plan.cost_ratio,
              "cost_split": plan.meta.get("cost_split"), "fidelity_metric": fidelity_key(kind),
              "eval_items": len(ref), "removed_blocks": plan.meta.get("removed_blocks", []),
              "mask_density_macs": macs_density(mask_meta), "variants": rows,
              "refine": {k: v for k, v in plan.meta.get("refine", {}).items() if k not in ("seed_scores", "pruner_compute")}}
    plots = {"joint_plan": _block_plot(plan, run_dir)} if cfg.report.plots else {}
    return report, plots


def _block_plot(plan: Plan, run_dir: Path) -> Path:
    """Per-layer density bars, grey where the layer's block is removed."""
    mask = plan.meta.get("mask") or {}
    layers = mask.get("layers", [])
    split = plan.meta.get("cost_split", {})
    title = (f"joint plan {'+'.join(plan.meta.get('kinds', []))}: kept MACs {plan.cost_ratio:.3f} "
             f"(blocks alone {split.get('block_only', 1):.3f}, sparsity alone {split.get('mask_only', 1):.3f}); "
             f"removed {len(plan.meta.get('removed_blocks', []))} of {len(plan.blocks)} blocks (grey)")
    return block_density_plot(plan.compute[0], plan.blocks, layers, mask.get("density", []),
                              layer_units(layers, plan.blocks) if layers else [], run_dir / "joint_plan.png",
                              title=title)


def reuse_summary_lines(report: dict[str, Any]) -> list[str]:
    row = report["variants"][0]
    split = report.get("cost_split") or {}
    lines = [f"joint search ({' + '.join(report['kinds'])}): kept MACs {report['cost_ratio']:.3f} "
             f"(target {report['target']:.3f}); reuse alone would keep {split.get('reuse_only', 1):.3f}, "
             f"the sparsity alone {split.get('mask_only', 1):.3f}",
             f"fidelity vs the full model on {report['num_samples']} held-out samples: PSNR {row['psnr']:.2f} dB, "
             f"SSIM {row['ssim']:.4f}" + (f", FD {row['fd']:.3f} (full model {row['fd_reference']:.3f})" if "fd" in row else "")]
    if report.get("mask_density_macs") is not None:
        lines.append(f"masked layers keep {report['mask_density_macs']:.3f} of their MACs")
    return lines


def block_summary_lines(report: dict[str, Any]) -> list[str]:
    key = report["fidelity_metric"]
    row = next(v for v in report["variants"] if v["name"] == "dipgo")
    full = next((v for v in report["variants"] if v["name"] == "full"), {})
    split = report.get("cost_split") or {}
    lines = [f"joint search ({' + '.join(report['kinds'])}) on {report['model']}: kept MACs "
             f"{report['cost_ratio']:.3f} (target {report['target']:.3f}); the removed blocks alone would keep "
             f"{split.get('block_only', 1):.3f}, the sparsity alone {split.get('mask_only', 1):.3f}",
             f"removed blocks: {', '.join(report['removed_blocks']) or '(none)'}"]
    if key == "accuracy":
        lines.append(f"held-out ({report['eval_items']} items): accuracy {row['accuracy']:.4f} (full model "
                     f"{full.get('accuracy', float('nan')):.4f}), agreement {row['agreement']:.4f}, KL {row['kl']:.4f}")
    else:
        lines.append(f"held-out ({report['eval_items']} sentences): cosine to the full model {row['cosine']:.4f} "
                     f"(min {row['cosine_min']:.4f})")
    if report.get("mask_density_macs") is not None:
        lines.append(f"masked layers keep {report['mask_density_macs']:.3f} of their MACs")
    return lines


def _refuse_bench() -> None:
    raise ConfigError("dipgo bench does not run joint plans yet: their report gives the kept MACs and "
                      "fidelity; unstructured sparsity needs sparse kernels to turn MACs into time")


@register_reporter("joint")
class JointReport:
    """Joint reuse + mask plans of a diffusion denoiser (the default ``joint`` task)."""

    kind = "joint"

    def evaluate(self, loaded: LoadedModel, supernet: JointSuperNet, plan: Plan, cfg: DictConfig,
                 run_dir: Path) -> tuple[dict, dict]:
        return evaluate_joint(loaded, supernet, plan, cfg, run_dir)

    def summary_lines(self, report: dict[str, Any]) -> list[str]:
        return reuse_summary_lines(report)

    def bench(self, cfg: DictConfig, plan: Plan, *, runs: int, warmup: int, batch: int,
              threads: int | None) -> dict[str, Any]:
        _refuse_bench()
        return {}

    def bench_lines(self, result: dict[str, Any]) -> list[str]:
        return []


@register_reporter("joint", "block_mask")
class BlockJointReport(JointReport):
    """Joint block + mask plans of a classifier or encoder (the ``block_mask`` variant)."""

    def evaluate(self, loaded: LoadedModel, supernet: BlockMaskSuperNet, plan: Plan, cfg: DictConfig,
                 run_dir: Path) -> tuple[dict, dict]:
        return evaluate_block_joint(loaded, supernet, plan, cfg, run_dir)

    def summary_lines(self, report: dict[str, Any]) -> list[str]:
        return block_summary_lines(report)
