"""Measure a block plan the way a user would: blocks physically removed, held-out data, timed.

Variants: ``full`` (the original model), ``dipgo`` (the learned plan) and the baselines at the
same budget (``weight_norm``, ``drop_last``, ``random``; see :mod:`dipgo.postprocess.block_plan`).
Each plan is applied with :func:`~dipgo.postprocess.block_subnet.remove_blocks`, so what is
measured is the smaller model a user exports, not a gated SuperNet. Fidelity on held-out data:
for classifiers, accuracy on the digits test split, top-1 agreement with the full model and KL;
for encoders, the mean cosine similarity of the sentence embeddings to the full model's on the
held-out sentences. Latency: median of interleaved runs of every variant in one process.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import DictConfig
from torch import nn

from dipgo.measure.fidelity import fidelity_key, output_fidelity
from dipgo.measure.latency import compare_latency, speedup
from dipgo.measure.macs import OutputCall
from dipgo.models.configured import model_source
from dipgo.models.io import outputs
from dipgo.postprocess.plan import Plan
from dipgo.report.registry import register_functions

if TYPE_CHECKING:
    from dipgo.models.registry import LoadedModel
    from dipgo.supernets.block import BlockSuperNet


def eval_data(loaded: LoadedModel, cfg: DictConfig) -> dict[str, torch.Tensor]:
    """Held-out evaluation data: digits test images + labels, or tokenised test sentences."""
    from dipgo.models.io import digits_images

    if loaded.kind == "classifier":
        images, labels = digits_images(loaded.model, "test")
        n = min(cfg.report.num_samples, len(images)) if cfg.report.num_samples else len(images)
        return {"images": images[:n], "labels": labels[:n]}
    from dipgo.models.text import text_corpus

    sentences = text_corpus("test")[: cfg.report.num_samples]
    enc = loaded.tokenizer(sentences, padding=True, truncation=True, max_length=cfg.data.max_length, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def plan_variants(supernet: BlockSuperNet, plan: Plan, cfg: DictConfig) -> tuple[dict[str, Plan], list[str]]:
    """The dipgo plan plus every configured block baseline at the same target; skipped names."""
    from dipgo.postprocess.block_plan import BLOCK_BASELINES, baseline_block_plan

    plans = {"dipgo": plan}
    skipped = []
    for name in cfg.report.baselines:
        if name in BLOCK_BASELINES:
            plans[name] = baseline_block_plan(name, supernet, plan.target, seed=cfg.seed)
        else:
            skipped.append(name)
    return plans, skipped


def measured_variant(model: nn.Module, plan: Plan | None) -> nn.Module:
    """The model a user would run: the original, or a physically smaller copy without the closed blocks."""
    from dipgo.postprocess.block_subnet import remove_blocks

    # frozen like the original: timm's FLOP counter fails on some models (PiT, CaiT) whose parameters require grad
    return model if plan is None else remove_blocks(model, plan).eval().requires_grad_(False)


def _latency_inputs(data: dict[str, torch.Tensor], batch: int) -> dict[str, torch.Tensor]:
    return {k: v[:batch] for k, v in data.items() if k != "labels"}


def evaluate_block(loaded: LoadedModel, supernet: BlockSuperNet, plan: Plan, cfg: DictConfig, run_dir: Path) -> tuple[dict, dict]:
    """The report of one block search: every variant's cost, speedup and held-out fidelity."""
    from dipgo.measure.macs import model_macs
    from dipgo.models.io import output_fn_for
    from dipgo.postprocess.block_subnet import export_block_subnet

    model = supernet.remove() if hasattr(supernet, "remove") else loaded.model
    kind = loaded.kind
    data = eval_data(loaded, cfg)
    ref = outputs(model, kind, data)
    plans, skipped = plan_variants(supernet, plan, cfg)
    models = {"full": model, **{name: measured_variant(model, p) for name, p in plans.items()}}
    tuned = finetuned(model, supernet, plan, cfg, run_dir)
    if tuned is not None:  # the distilled SubNet is what gets exported
        plans["dipgo+finetune"] = plan
        models["dipgo+finetune"] = measured_variant(tuned, plan)

    lat_inputs = _latency_inputs(data, cfg.report.latency_batch)
    fn = output_fn_for(kind)
    full_macs = model_macs(OutputCall(model, fn), lat_inputs) / len(next(iter(lat_inputs.values())))
    timings = compare_latency(
        {name: (lambda m=m: fn(m, lat_inputs)) for name, m in models.items()},
        warmup=cfg.report.latency_warmup, runs=cfg.report.latency_runs,
    )
    variants = []
    for name, m in models.items():
        p = plans.get(name)
        macs = model_macs(OutputCall(m, fn), lat_inputs) / len(next(iter(lat_inputs.values())))
        entry = {
            "name": name,
            "removed": [] if p is None else [b for b, k in zip(p.blocks, p.compute[0], strict=True) if not k],
            "cost_ratio": 1.0 if p is None else p.cost_ratio,
            "macs_ratio": macs / full_macs,
            "latency_ms": timings[name].median_s * 1e3,
            "speedup": speedup(timings["full"], timings[name]),
            **output_fidelity(kind, outputs(m, kind, data), ref, data.get("labels")),
        }
        variants.append(entry)
    export_dir = export_block_subnet(tuned if tuned is not None else model, plan, run_dir / "subnet", model_source(loaded))
    if loaded.tokenizer is not None:  # the exported encoder is usable on its own, text in
        loaded.tokenizer.save_pretrained(str(export_dir))
    report = {
        "kind": "block",
        "model": type(model).__name__,
        "source": loaded.source,
        "cost": cfg.supernet.cost,
        "target": plan.target,
        "blocks": plan.blocks,
        "block_costs": [s.cost for s in supernet.slots],
        "block_macs": getattr(supernet, "macs", None),
        "latency_table": _table_summary(getattr(supernet, "latency_table", None)),
        "fidelity_metric": fidelity_key(kind),
        "eval_items": len(ref),
        "latency_batch": len(next(iter(lat_inputs.values()))),
        "threads": timings["full"].threads,
        "variants": variants,
        "skipped_baselines": skipped,
        "subnet_dir": str(export_dir),
    }
    plots = _plots(report, plan, run_dir) if cfg.report.plots else {}
    return report, plots


def finetuned(model: nn.Module, supernet: BlockSuperNet, plan: Plan, cfg: DictConfig, run_dir: Path) -> nn.Module | None:
    """The progressively distilled model when ``search.finetune.enabled`` (see :mod:`dipgo.search.finetune`)."""
    if not cfg.search.finetune.enabled:
        return None
    from pytorch_lightning.loggers import CSVLogger

    from dipgo.losses.distortion import DistortionConfig
    from dipgo.search.config import config_of
    from dipgo.search.finetune import FinetuneConfig, finetune_subnet

    ft = config_of(FinetuneConfig, cfg.search.finetune)
    accelerator = "gpu" if cfg.trainer.accelerator in ("gpu", "cuda") and torch.cuda.is_available() else "cpu"
    logger = CSVLogger(str(run_dir), name="logs", version="finetune") if cfg.logger.csv else False
    return finetune_subnet(model, plan, supernet.calibration_pool, supernet.output_fn,
                           config_of(DistortionConfig, cfg.search.distortion), ft,
                           accelerator=accelerator, seed=cfg.seed, logger=logger)


def _table_summary(table: dict[str, Any] | None) -> dict[str, Any] | None:
    if table is None:
        return None
    return {k: table[k] for k in ("full_s", "block_s", "device", "threads", "key", "cached") if k in table}


def _plots(report: dict[str, Any], plan: Plan, run_dir: Path) -> dict[str, Path]:
    from dipgo.report.plots import block_keep_plot, pareto_plot

    plots_dir = run_dir / "plots"
    key = report["fidelity_metric"]
    points = [
        {"name": v["name"], "speedup": v["speedup"], "fidelity": v[key], "group": "dipgo" if v["name"].startswith("dipgo") else
         ("full" if v["name"] == "full" else "baseline")}
        for v in report["variants"]
    ]
    probs = plan.meta.get("keep_probs") or [1.0 if k else 0.0 for k in plan.compute[0]]
    return {
        "keep_probs": block_keep_plot(plan.blocks, probs, plan.compute[0], report["block_costs"], plots_dir / "keep_probs.png"),
        "variants": pareto_plot(points, plots_dir / "variants.png", fidelity_label=key,
                                title=f"{report['model']}: speedup vs {key} (target {report['target']:.0%} {report['cost']})"),
    }


def summary_lines(report: dict[str, Any]) -> list[str]:
    key = report["fidelity_metric"]
    lines = [
        f"{report['model']} ({report['source']}), target {report['target']:.0%} of {report['cost']}; "
        f"latency: median of interleaved runs, batch {report['latency_batch']}, {report['threads']} threads",
        f"{'variant':<14}{'removed':>8}{'cost':>8}{'MACs':>8}{'speedup':>9}{key:>10}",
    ]
    for v in report["variants"]:
        lines.append(
            f"{v['name']:<14}{len(v['removed']):>8}{v['cost_ratio']:>8.1%}{v['macs_ratio']:>8.1%}{v['speedup']:>8.2f}x{v[key]:>10.4f}"
        )
    dipgo = next(v for v in report["variants"] if v["name"] == "dipgo")
    lines.append(f"removed by dipgo: {', '.join(dipgo['removed']) or '(none)'}")
    lines.append(f"exported SubNet (reloads without dipgo): {report['subnet_dir']}")
    return lines


def bench_plan(cfg: DictConfig, plan: Plan, *, runs: int, warmup: int, batch: int, threads: int | None) -> dict[str, Any]:
    """Time a saved block plan's SubNet against its full model (``dipgo bench``)."""
    from dipgo.models.configured import load_configured_model
    from dipgo.models.io import output_fn_for
    from dipgo.postprocess.block_subnet import check_plan_matches, remove_blocks

    loaded = load_configured_model(cfg)
    check_plan_matches(loaded.model, plan)
    subnet = remove_blocks(loaded.model, plan).eval()
    with_cfg = cfg.copy()
    with_cfg.report.num_samples = max(batch, 1)
    data = _latency_inputs(eval_data(loaded, with_cfg), batch)
    fn = output_fn_for(loaded.kind)
    timings = compare_latency({"full": lambda: fn(loaded.model, data), "subnet": lambda: fn(subnet, data)},
                              warmup=warmup, runs=runs, threads=threads)
    return {
        "kind": "block",
        "model": type(loaded.model).__name__,
        "removed": [b for b, k in zip(plan.blocks, plan.compute[0], strict=True) if not k],
        "cost_ratio": plan.cost_ratio,
        "batch": len(next(iter(data.values()))),
        "full": timings["full"].to_dict(),
        "subnet": timings["subnet"].to_dict(),
        "speedup": speedup(timings["full"], timings["subnet"]),
    }


def bench_lines(result: dict[str, Any]) -> list[str]:
    return [
        f"{result['model']}: removed {len(result['removed'])} blocks ({', '.join(result['removed'])}), "
        f"kept cost {result['cost_ratio']:.1%}",
        f"full {result['full']['median_s'] * 1e3:.2f} ms, SubNet {result['subnet']['median_s'] * 1e3:.2f} ms, "
        f"speedup {result['speedup']:.2f}x (batch {result['batch']}, {result['full']['threads']} threads)",
    ]


def exhaustive_subsets(loaded: LoadedModel, blocks: list[str], num_removed: int, data: dict[str, torch.Tensor],
                       ref: torch.Tensor) -> list[dict[str, Any]]:
    """Held-out fidelity of every way to remove ``num_removed`` of ``blocks``, best first.

    The oracle a depth search is judged against when the count is small (MiniLM: 6 choose 3 =
    20 subsets). Each subset is removed physically, like the searched plan.
    """
    from itertools import combinations

    key = fidelity_key(loaded.kind)
    rows = []
    for removed in combinations(blocks, num_removed):
        keep = [b not in removed for b in blocks]
        plan = Plan(kind="block", model=type(loaded.model).__name__, blocks=list(blocks), compute=[keep],
                    target=1.0, cost_ratio=1.0)
        out = outputs(measured_variant(loaded.model, plan), loaded.kind, data)
        rows.append({"removed": list(removed), **output_fidelity(loaded.kind, out, ref, data.get("labels"))})
    return sorted(rows, key=lambda r: -r[key])


register_functions("block", evaluate=evaluate_block, summary_lines=summary_lines, bench=bench_plan, bench_lines=bench_lines)
