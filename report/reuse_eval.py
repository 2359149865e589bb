"""Measure a reuse plan the way a user would: same noise, real sampler, interleaved timings.

Variants, all sampled from the same evaluation noise (and class labels):

* ``full``: the original model, every block at every step;
* ``dipgo``: the plan installed on the plain diffusers model (reused blocks are not executed);
* baselines at the same MACs, e.g. ``fewer_steps``: the same scheduler with ``round(r * S)`` steps.

Fidelity is measured against ``full`` (PSNR, SSIM) and, for the digits denoisers, with the digits
classifier (Fréchet distance of its features to real held-out digits, i.e. an FID proxy, and
accuracy on the conditioning class). Latency is the median of interleaved runs in one process,
so speedups are ratios measured under the same machine load.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from dipgo.postprocess.plan import Plan
from dipgo.report.latency import compare_latency, speedup

DIGITS_SOURCES = ("digits_unet", "digits_dit")


def _sampler(model: torch.nn.Module, cfg: DictConfig, scheduler_config: dict | None) -> Callable[..., torch.Tensor]:
    """``run(batch, num_steps) -> final sample`` with the search's scheduler and guidance."""
    from dipgo.supernets.sampling import make_model_fn, make_scheduler, null_class_for, sample

    model_fn, null_class = make_model_fn(model), null_class_for(model)

    def run(batch: dict[str, torch.Tensor], num_steps: int) -> torch.Tensor:
        scheduler = make_scheduler(cfg.supernet.scheduler, scheduler_config)
        with torch.no_grad():
            final, _ = sample(model_fn, scheduler, batch, num_steps, cfg.supernet.guidance_scale, null_class=null_class)
        return final

    return run


@contextmanager
def _installed(model: torch.nn.Module, plan: Plan):
    from dipgo.postprocess.reuse_subnet import install_plan

    handle = install_plan(model, plan)
    try:
        yield handle
    finally:
        handle.remove()


def _with_plan(run: Callable[..., torch.Tensor], model: torch.nn.Module, plan: Plan) -> Callable[..., torch.Tensor]:
    def planned(batch: dict[str, torch.Tensor], num_steps: int) -> torch.Tensor:
        with _installed(model, plan):
            return run(batch, num_steps)

    return planned


def baseline_variants(plan: Plan, names: list[str]) -> dict[str, dict[str, Any]]:
    """Baselines at (about) the plan's MACs: ``{name: {"num_steps": k, "macs_ratio": k/S}}``."""
    out: dict[str, dict[str, Any]] = {}
    steps = int(plan.num_steps or 1)
    for name in names:
        if name == "fewer_steps":
            k = max(1, min(steps, round(plan.cost_ratio * steps)))
            out[name] = {"num_steps": k, "macs_ratio": k / steps, "label": f"{k}-step {plan.meta.get('scheduler', '')}".strip()}
        else:
            raise ValueError(f"unknown baseline {name!r}; available: fewer_steps")
    return out


def _digits_judge(loaded: Any) -> tuple[Any, torch.Tensor] | None:
    """The digits classifier and its features of the real held-out digits, for digits denoisers."""
    if getattr(loaded, "source", None) not in DIGITS_SOURCES:
        return None
    from dipgo.models.digits import digits_tensors
    from dipgo.models.registry import load_digits_classifier
    from dipgo.report.fidelity import classifier_features

    classifier = load_digits_classifier()
    real, _ = digits_tensors("test")
    feats, _ = classifier_features(classifier, real)
    return classifier, feats


def evaluate_reuse(
    loaded: Any, supernet: Any, plan: Plan, cfg: DictConfig, run_dir: Path
) -> tuple[dict[str, Any], dict[str, Path]]:
    """Sample, score, time and plot every variant; return ``(report, {plot name: path})``."""
    from dipgo.report.fidelity import image_fidelity
    from dipgo.search.data import eval_batch
    from dipgo.search.reuse_task import sample_spec

    model = loaded.model
    shape, num_classes = sample_spec(model)
    sched_cfg = dict(loaded.scheduler.config) if getattr(loaded, "scheduler", None) is not None else None
    run = _sampler(model, cfg, sched_cfg)
    planned = _with_plan(run, model, plan)
    steps = int(plan.num_steps)
    baselines = baseline_variants(plan, list(cfg.report.baselines))

    batch = eval_batch(shape, cfg.report.num_samples, num_classes, cfg.report.eval_seed)
    batch.pop("index")
    labels = batch.get("class_labels")
    # the SubNet (hooks on the plain model) must reproduce the SuperNet's hard-gated trajectory;
    # sample the SuperNet first, then take its gates off so the plain model is measured
    grid = torch.tensor(plan.compute, dtype=torch.bool)
    with torch.no_grad():
        supernet_hard = supernet.sample(batch, grid)
    supernet.remove()
    samples = {"full": run(batch, steps), "dipgo": planned(batch, steps)}
    for name, spec in baselines.items():
        samples[name] = run(batch, spec["num_steps"])
    consistency = float((supernet_hard - samples["dipgo"]).abs().max())

    judge = _digits_judge(loaded)
    fidelity: dict[str, dict[str, float]] = {}
    for name, x in samples.items():
        if name == "full":
            continue
        kw: dict[str, Any] = {}
        if judge is not None:
            kw = {"classifier": judge[0], "real_features": judge[1], "labels": labels}
        fidelity[name] = image_fidelity(x, samples["full"], **kw)

    lat_batch = {k: v[: cfg.report.latency_batch] for k, v in batch.items()}
    fns = {"full": lambda: run(lat_batch, steps), "dipgo": lambda: planned(lat_batch, steps)}
    for name, spec in baselines.items():
        fns[name] = (lambda k: (lambda: run(lat_batch, k)))(spec["num_steps"])
    latency = compare_latency(fns, warmup=cfg.report.latency_warmup, runs=cfg.report.latency_runs)

    macs_ratio = {"full": 1.0, "dipgo": plan.cost_ratio} | {n: s["macs_ratio"] for n, s in baselines.items()}
    variants = []
    for name in samples:
        fid = fidelity.get(name, {})
        variants.append(
            {
                "name": name,
                "label": baselines.get(name, {}).get("label", name),
                "macs_ratio": macs_ratio[name],
                "macs_speedup": 1.0 / macs_ratio[name],
                "latency_median_s": latency[name].median_s,
                "speedup": speedup(latency["full"], latency[name]),
                **{k: _finite(v) for k, v in fid.items()},
            }
        )
    full_fd = fidelity["dipgo"].get("fd_reference") if fidelity.get("dipgo") else None
    report = {
        "kind": "reuse",
        "model": type(model).__name__,
        "source": getattr(loaded, "source", cfg.model.name),
        "num_steps": steps,
        "scheduler": cfg.supernet.scheduler,
        "guidance_scale": cfg.supernet.guidance_scale,
        "target": cfg.search.target,
        "macs": {"full_per_sample": supernet.full_cost(), "plan_ratio": plan.cost_ratio},
        "full": {"fd": _finite(full_fd), "accuracy": _finite(fidelity.get("dipgo", {}).get("accuracy_reference"))},
        "variants": variants,
        "latency": {n: r.to_dict() for n, r in latency.items()},
        "latency_batch": int(next(iter(lat_batch.values())).shape[0]),
        "num_eval_samples": cfg.report.num_samples,
        "subnet_vs_supernet_max_abs_diff": consistency,
        "closed_slots": plan.num_closed,
    }
    plots = _plots(samples, plan, supernet, run_dir, baselines) if cfg.report.plots else {}
    return report, plots


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else "inf"
    return value


def _plots(samples: dict[str, torch.Tensor], plan: Plan, supernet: Any, run_dir: Path, baselines: dict) -> dict[str, Path]:
    from dipgo.report.plots import cost_bars, gate_heatmap, loss_curves, sample_grid

    plots_dir = run_dir / "plots"
    out: dict[str, Path] = {}
    grid = torch.tensor(plan.compute, dtype=torch.float32)
    out["gate_heatmap"] = gate_heatmap(grid, plan.blocks, plots_dir / "gate_heatmap.png",
                                       title=f"dipgo plan: {plan.cost_ratio:.1%} of MACs (blue = computed)")
    probs = plan.meta.get("keep_probs")
    if probs is not None:
        out["keep_probs"] = gate_heatmap(torch.tensor(probs), plan.blocks, plots_dir / "keep_probs.png",
                                         title="learned keep probabilities (steps >= 1)")
    labelled = {baselines.get(k, {}).get("label", k): v[:32] for k, v in samples.items()}
    out["samples"] = sample_grid(labelled, plots_dir / "samples.png", nrow=8)
    metrics = run_dir / "logs" / "metrics.csv"
    if metrics.is_file():
        out["loss_curves"] = loss_curves(metrics, plots_dir / "loss_curves.png")
    block_macs = getattr(supernet, "block_macs", None)
    if isinstance(block_macs, dict) and block_macs:
        out["block_macs"] = cost_bars(block_macs, plots_dir / "block_macs.png")
    return out


def summary_lines(report: dict[str, Any]) -> list[str]:
    """A small table: MACs, wall-clock speedup and fidelity of every variant."""
    lines = [
        f"{report['model']} ({report['source']}), {report['num_steps']}-step {report['scheduler']}, "
        f"target {report['target']:.0%} of MACs; latency: median of interleaved runs, batch {report['latency_batch']}",
        f"{'variant':<22}{'MACs':>8}{'speedup':>9}{'PSNR':>8}{'SSIM':>7}{'FD':>8}{'acc':>7}",
    ]
    for v in report["variants"]:
        lines.append(
            f"{v['label']:<22}{v['macs_ratio']:>8.1%}{v['speedup']:>8.2f}x"
            f"{_fmt(v.get('psnr'), '.1f'):>8}{_fmt(v.get('ssim'), '.3f'):>7}{_fmt(v.get('fd'), '.2f'):>8}{_fmt(v.get('accuracy'), '.0%'):>7}"
        )
    full = report.get("full", {})
    if full.get("fd") is not None:
        lines.append(f"full model: FD {full['fd']:.2f}, accuracy {full['accuracy']:.0%} (FD = Fréchet distance in digits-classifier features to real held-out digits)")
    lines.append(f"plots: {', '.join(report.get('plots', {}).values())}")
    return lines


def _fmt(value: Any, spec: str) -> str:
    if value is None:
        return "-"
    if value == "inf":
        return "inf"
    return format(value, spec)


def bench_plan(cfg: DictConfig, plan: Plan, *, runs: int, warmup: int, batch: int, threads: int | None) -> dict[str, Any]:
    """Time a saved plan against its full model (``dipgo bench``)."""
    from dipgo.models.registry import load_model
    from dipgo.postprocess.reuse_subnet import ReuseSubNet  # noqa: F401  (validates availability)
    from dipgo.search.data import eval_batch
    from dipgo.search.reuse_task import ReuseTask, sample_spec

    loaded = load_model(cfg.model.name, **({"subfolder": cfg.model.subfolder} if cfg.model.subfolder else {}))
    supernet = ReuseTask().build(loaded, cfg)
    from dipgo.postprocess.reuse_plan import validate_plan

    validate_plan(plan, supernet)
    shape, num_classes = sample_spec(loaded.model)
    b = eval_batch(shape, batch, num_classes, cfg.report.eval_seed)
    b.pop("index")
    sched_cfg = dict(loaded.scheduler.config) if loaded.scheduler is not None else None
    run = _sampler(loaded.model, cfg, sched_cfg)
    planned = _with_plan(run, loaded.model, plan)
    steps = int(plan.num_steps)
    lat = compare_latency({"full": lambda: run(b, steps), "dipgo": lambda: planned(b, steps)},
                          warmup=warmup, runs=runs, threads=threads)
    return {
        "model": type(loaded.model).__name__,
        "num_steps": steps,
        "batch": batch,
        "macs_ratio": plan.cost_ratio,
        "latency": {k: v.to_dict() for k, v in lat.items()},
        "speedup": speedup(lat["full"], lat["dipgo"]),
    }


def bench_lines(result: dict[str, Any]) -> list[str]:
    full, sub = result["latency"]["full"], result["latency"]["dipgo"]
    return [
        f"{result['model']}, {result['num_steps']} steps, batch {result['batch']}, {full['threads']} threads, median of {full['runs']} runs",
        f"full  {full['median_s'] * 1e3:9.1f} ms",
        f"dipgo {sub['median_s'] * 1e3:9.1f} ms   ({result['macs_ratio']:.1%} of MACs)",
        f"speedup {result['speedup']:.2f}x",
    ]
