"""Measure a reuse plan the way a user would: same noise, real sampler, interleaved timings.

Variants, all sampled from the same evaluation noise (and class labels, or, for text-to-image
pipelines, embeddings of held-out prompts the search never calibrated on):

* ``full``: the original model, every block at every step;
* ``dipgo``: the plan installed on the plain diffusers model (reused blocks are not executed);
* baselines at the same MACs, e.g. ``fewer_steps``: the same scheduler with ``round(r * S)`` steps.

Fidelity is measured against ``full`` (PSNR, SSIM) and, for the digits denoisers, with the digits
classifier (Fréchet distance of its features to real held-out digits, i.e. an FID proxy, and
accuracy on the conditioning class). Latent denoisers are compared on VAE-decoded images when
the pipeline has a VAE, else on the latents themselves (PSNR with the full model's latent value
range as data range); the report's ``fidelity_space`` says which. Latency is the median of
interleaved runs in one process, so speedups are ratios measured under the same machine load
(denoising loop only: text encoding and VAE decoding are the same for every variant).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import DictConfig

from dipgo.errors import ConfigError, PlanError
from dipgo.measure.latency import compare_latency, speedup
from dipgo.measure.machine import machine_record
from dipgo.postprocess.plan import Plan
from dipgo.report.registry import register_functions
from dipgo.search.data import map_tensors

if TYPE_CHECKING:
    from dipgo.models.registry import LoadedModel
    from dipgo.supernets.reuse import ReuseSuperNet

DIGITS_SOURCES = ("digits_unet", "digits_dit")


# fewer steps of each solver a user could switch to, judged against the searched sampler's full run
SOLVER_BASELINES: dict[str, str] = {
    "fewer_steps_ddim": "ddim", "fewer_steps_dpmsolver++": "dpmsolver++", "fewer_steps_unipc": "unipc",
}


def _sampler(model: torch.nn.Module, cfg: DictConfig, scheduler_config: dict | None,
             scheduler: str | None = None) -> Callable[..., torch.Tensor]:
    """``run(batch, num_steps) -> final sample`` with the search's scheduler (or ``scheduler``) and guidance."""
    from dipgo.models.io import null_class_for
    from dipgo.supernets.sampling import make_model_fn, make_scheduler, sample

    model_fn, null_class = make_model_fn(model), null_class_for(model)
    name = scheduler or cfg.supernet.scheduler

    def run(batch: dict[str, torch.Tensor], num_steps: int) -> torch.Tensor:
        scheduler = make_scheduler(name, scheduler_config)
        with torch.no_grad():
            final, _ = sample(model_fn, scheduler, batch, num_steps, cfg.supernet.guidance_scale, null_class=null_class)
        return final

    return run


@dataclass
class Variant:
    """One way of sampling the evaluation batch: the full model, the dipgo plan or a baseline."""

    name: str
    label: str
    macs_ratio: float
    run: Callable[[dict[str, torch.Tensor]], torch.Tensor]
    info: dict[str, Any] = field(default_factory=dict)


def _plan_runner(run: Callable[..., torch.Tensor], model: torch.nn.Module, plan: Plan, steps: int) -> Callable:
    """``batch -> samples`` with ``plan`` installed on the plain model for the duration of the call."""
    from dipgo.postprocess.reuse_subnet import install_plan

    def planned(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with install_plan(model, plan):
            return run(batch, steps)

    return planned


def _dipgo_runner(run: Callable[..., torch.Tensor], loaded: LoadedModel, plan: Plan, cfg: DictConfig,
                  steps: int) -> Callable:
    """``batch -> samples`` of the plan as an exported SubNet runs it: hooks for a grid plan, the
    solver at the learned timesteps for a solver-schedule plan (:meth:`ReuseSubNet.sample`)."""
    if plan.payload.schedule is None:
        return _plan_runner(run, loaded.model, plan, steps)
    from dipgo.postprocess.reuse_subnet import ReuseSubNet

    sched_cfg = dict(loaded.scheduler.config) if getattr(loaded, "scheduler", None) is not None else None
    subnet = ReuseSubNet(model=loaded.model, plan=plan, scheduler=cfg.supernet.scheduler, scheduler_config=sched_cfg,
                         guidance_scale=cfg.supernet.guidance_scale)
    return subnet.sample


def _dipgo_label(plan: Plan) -> str:
    schedule = plan.payload.schedule
    if schedule is None:
        return "dipgo"
    return f"dipgo ({len(schedule.timesteps)}-step {schedule.scheduler}, learned timesteps)"


def _cache_runner(run: Callable[..., torch.Tensor], model: torch.nn.Module, name: str, steps: int,
                  params: dict[str, Any]) -> Callable:
    from dipgo.postprocess.reuse_baselines import diffusers_cache_variant

    def cached(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with diffusers_cache_variant(model, name, count_executions=False, **params):
            return run(batch, steps)

    return cached


def _teacache_variant(model: torch.nn.Module, supernet: ReuseSuperNet, plan: Plan, run: Callable[..., torch.Tensor],
                      calib: dict[str, torch.Tensor], steps: int) -> Variant:
    """TeaCache-style run-time skipping, its threshold bisected on calibration noise to the plan's MACs."""
    from dipgo.postprocess.teacache import calibrate_threshold, install_teacache, mean_cost

    payload = plan.payload if plan.kind == "reuse" else None
    granularity, mode = (payload.granularity, payload.mode) if payload is not None else ("block", "auto")

    def cost(threshold: float) -> float:
        with install_teacache(model, steps, threshold, granularity, mode) as handle:
            run(calib, steps)
        return mean_cost(handle.grids, supernet.plan_cost)

    threshold, _ = calibrate_threshold(cost, plan.cost_ratio)
    info: dict[str, Any] = {"params": {"threshold": round(threshold, 6)}}

    def cached(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with install_teacache(model, steps, threshold, granularity, mode) as handle:
            out = run(batch, steps)
        info.setdefault("eval_macs_ratio", mean_cost(handle.grids, supernet.plan_cost))
        return out

    variant = Variant("teacache", f"TeaCache-style thr={threshold:.3g}", cost(threshold), cached, info)
    return variant


def _pruner_plan(plan: Plan) -> Plan | None:
    """The pruner's plan before the refinement (``meta.refine.pruner_compute``), or ``None``."""
    refine = (plan.meta or {}).get("refine") or {}
    compute = refine.get("pruner_compute")
    if compute is None:
        return None
    return Plan(kind=plan.kind, model=plan.model, blocks=plan.blocks, compute=compute, target=plan.target,
                cost_ratio=float(refine["pruner_cost_ratio"]), num_steps=plan.num_steps,
                meta={k: v for k, v in plan.meta.items() if k != "refine"})


def _placement_plan(plan: Plan, supernet: ReuseSuperNet) -> Plan | None:
    """The learned placement's whole-steps plan (``meta.placement.rows``), the pruner's start, or ``None``."""
    rows = ((plan.meta or {}).get("placement") or {}).get("rows")
    if rows is None:
        return None
    chosen = set(rows)
    compute = [[s in chosen] * len(plan.blocks) for s in range(plan.num_steps)]
    return Plan(kind=plan.kind, model=plan.model, blocks=plan.blocks, compute=compute, target=plan.target,
                cost_ratio=supernet.plan_cost(compute), num_steps=plan.num_steps,
                meta={k: v for k, v in plan.meta.items() if k not in ("refine", "placement")})


def build_variants(
    loaded: LoadedModel, supernet: ReuseSuperNet, plan: Plan, cfg: DictConfig, run: Callable[..., torch.Tensor],
    calib: dict[str, torch.Tensor], probe: dict[str, torch.Tensor],
) -> tuple[list[Variant], dict[str, str]]:
    """Full model, dipgo plan and every configured baseline, at (about) the plan's MACs.

    Plan baselines need the SuperNet installed (costs, cascade, change scores); this function
    removes it before building the variants that run on the plain model.
    """
    from dipgo.postprocess.reuse_baselines import (
        DIFFUSERS_CACHES,
        PLAN_BASELINES,
        baseline_plans,
        diffusers_cache_reason,
        measure_cache_variant,
    )
    from dipgo.postprocess.reuse_plan import grid_plan

    forecast = grid_plan(plan)  # the plan itself, or the forecast plan a solver schedule beat
    model, steps = loaded.model, int(forecast.num_steps)
    names = list(cfg.report.baselines)
    plans, skipped = baseline_plans(supernet, plan.cost_ratio, [n for n in names if n in PLAN_BASELINES],
                                    calib_batch=calib, seed=cfg.report.eval_seed)
    supernet.remove()
    variants = [
        Variant("full", "full", 1.0, lambda b: run(b, steps)),
        Variant("dipgo", _dipgo_label(plan), plan.cost_ratio, _dipgo_runner(run, loaded, plan, cfg, steps),
                {"solver_schedule": plan.payload.schedule.to_meta()} if plan.payload.schedule else {}),
    ]
    if forecast is not plan:
        variants.append(Variant("dipgo_forecast", "dipgo, forecast plan", forecast.cost_ratio,
                                _plan_runner(run, model, forecast, steps)))
    pruner = _pruner_plan(forecast)
    if pruner is not None and pruner.compute != forecast.compute:
        variants.append(Variant("dipgo_pruner", "dipgo, pruner only", pruner.cost_ratio,
                                _plan_runner(run, model, pruner, steps)))
    placed = _placement_plan(forecast, supernet)
    if placed is not None:
        variants.append(Variant("dipgo_placement", "dipgo, learned placement", placed.cost_ratio,
                                _plan_runner(run, model, placed, steps)))
    sched_cfg = dict(loaded.scheduler.config) if getattr(loaded, "scheduler", None) is not None else None
    k = max(1, min(steps, round(plan.cost_ratio * steps)))
    for name in names:
        if name == "fewer_steps":
            variants.append(Variant(name, f"{k}-step {cfg.supernet.scheduler}", k / steps,
                                    lambda b, k=k: run(b, k), {"num_steps": k}))
        elif name in SOLVER_BASELINES:
            solver = SOLVER_BASELINES[name]
            if solver == cfg.supernet.scheduler:
                skipped[name] = f"the search samples with {solver} already: this is fewer_steps"
                continue
            other = _sampler(model, cfg, sched_cfg, solver)
            variants.append(Variant(name, f"{k}-step {solver}", k / steps,
                                    lambda b, k=k, other=other: other(b, k), {"num_steps": k, "scheduler": solver}))
        elif name == "teacache":

            try:
                variants.append(_teacache_variant(model, supernet, plan, run, calib, steps))
            except PlanError as exc:
                skipped[name] = str(exc)
        elif name in plans:
            p = plans[name]
            variants.append(Variant(name, p.meta.get("label", name), p.cost_ratio,
                                    _plan_runner(run, model, p, steps), {"params": p.meta.get("params")}))
        elif name in DIFFUSERS_CACHES:
            params = {"guidance_scale": cfg.supernet.guidance_scale} if name == "faster_cache" else {}
            reason = diffusers_cache_reason(model, name, **params)
            if reason is not None:
                skipped[name] = reason
                continue
            measured = measure_cache_variant(model, name, lambda: run(probe, steps), **params)
            variants.append(Variant(name, f"diffusers {name}", measured["macs_ratio"],
                                    _cache_runner(run, model, name, steps, params),
                                    {"executed_fraction": measured["executed_fraction"]}))
    return variants, skipped


def check_fd_judge(loaded: LoadedModel, mode: str) -> None:
    """Refuse ``report.fd_judge=digits`` for a model whose samples are not 1x16x16 (before a search runs)."""
    if mode != "digits":
        return
    config = getattr(loaded.model, "config", None) or {}
    shape = (config.get("in_channels"), config.get("sample_size"))
    if shape != (1, 16):
        raise ConfigError(f"report.fd_judge=digits judges 1x16x16 digits images, but {loaded.source} makes "
                          f"{shape[0]} channel(s) of size {shape[1]}: use report.fd_judge=auto or none")


def _digits_judge(loaded: LoadedModel, mode: str = "auto") -> tuple[Any, torch.Tensor] | None:
    """The digits classifier and its features of the real held-out digits, for digits denoisers.

    ``mode`` is ``report.fd_judge``: ``"auto"`` judges the shipped digits denoisers only (by name),
    ``"digits"`` any denoiser of 1x16x16 images (a user's separately trained digits model; refused
    in one sentence for other shapes), ``"none"`` none.
    """
    if mode == "none" or (mode == "auto" and getattr(loaded, "source", None) not in DIGITS_SOURCES):
        return None
    check_fd_judge(loaded, mode)
    from dipgo.measure.fidelity import classifier_features
    from dipgo.models.digits import digits_tensors
    from dipgo.models.registry import load_digits_classifier

    classifier = load_digits_classifier()
    real, _ = digits_tensors("test")
    feats, _ = classifier_features(classifier, real)
    return classifier, feats


def eval_items(loaded: LoadedModel, cfg: DictConfig, num: int, seed: int, split: str = "evaluation") -> dict[str, Any]:
    """A fixed batch of ``num`` items (no ``index``): noise (+ class labels), or with
    ``data.kind=prompts`` noise + embeddings of the ``split`` prompts (held out: ``evaluation``)."""
    from dipgo.models.io import sample_spec
    from dipgo.search.data import collate, eval_batch

    if cfg.data.kind == "prompts":
        from dipgo.search.prompts import prompt_pool

        pool = prompt_pool(loaded, num, seed + 100_003, split=split, prompts_file=cfg.data.prompts_file)
        items = collate([pool[i] for i in range(num)])
        items["prompts"] = [pool.prompts[i % len(pool.prompts)] for i in range(num)]
    else:
        shape, num_classes = sample_spec(loaded.model)
        items = eval_batch(shape, num, num_classes, seed)
    items.pop("index", None)
    return items


@torch.no_grad()
def _decode(vae: torch.nn.Module, latents: torch.Tensor, device: torch.device, chunk: int = 4) -> torch.Tensor:
    """Latents -> images ``(B, 3, H', W')`` in [-1, 1], as the diffusers pipelines decode them."""
    scale, shift = vae.config.scaling_factor, getattr(vae.config, "shift_factor", None) or 0.0
    vae.to(device)
    try:
        images = [vae.decode(z.to(device) / scale + shift).sample.clamp(-1, 1).float().cpu() for z in latents.split(chunk)]
    finally:
        vae.to("cpu")
    return torch.cat(images)


def _fidelity_space(loaded: LoadedModel, samples: dict[str, torch.Tensor], device: torch.device, cfg: DictConfig
                    ) -> tuple[dict[str, torch.Tensor], str, float]:
    """``(what is compared, its name, PSNR/SSIM data range)``: pixels, VAE-decoded images or latents."""
    from dipgo.models.registry import load_vae

    vae = load_vae(loaded) if getattr(loaded, "extra", None) is not None else None
    if vae is not None:
        return {k: _decode(vae, v, device) for k, v in samples.items()}, "images (VAE-decoded latents)", 2.0
    full = samples["full"]
    if cfg.data.kind != "prompts" and full.shape[1] in (1, 3):
        return samples, "images", 2.0
    data_range = float(full.max() - full.min()) or 1.0  # the full model's latent value range
    return samples, "latents", data_range


def _viewable(images: dict[str, torch.Tensor], space: str) -> dict[str, torch.Tensor]:
    """Latents as pictures: the first 3 channels (or the first), one scale for every variant."""
    if space != "latents":
        return images
    full = images["full"]
    channels = 3 if full.shape[1] >= 3 else 1
    scale = float(full[:, :channels].abs().max()) or 1.0
    return {k: v[:, :channels] / scale for k, v in images.items()}


def evaluate_reuse(
    loaded: LoadedModel, supernet: ReuseSuperNet, plan: Plan, cfg: DictConfig, run_dir: Path
) -> tuple[dict[str, Any], dict[str, Path]]:
    """Sample, score, time and plot every variant; return ``(report, {plot name: path})``."""
    from dipgo.measure.fidelity import image_fidelity, psnr, ssim

    model = loaded.model
    sched_cfg = dict(loaded.scheduler.config) if getattr(loaded, "scheduler", None) is not None else None
    run = _sampler(model, cfg, sched_cfg)

    device = next(model.parameters()).device
    batch = eval_items(loaded, cfg, cfg.report.num_samples, cfg.report.eval_seed)
    eval_prompts = batch.pop("prompts", None)
    batch = _batch(batch, device)
    # baselines calibrate (block change scores) on calibration prompts, never on the held-out ones
    calib = eval_items(loaded, cfg, min(8, cfg.report.num_samples), cfg.report.eval_seed + 7, split="calibration")
    calib.pop("prompts", None)
    calib = _batch(calib, device)
    # the SubNet (hooks on the plain model) must reproduce the SuperNet's hard-gated trajectory;
    # for a solver schedule, that of the forecast plan it beat (shown as "dipgo, forecast plan")
    from dipgo.postprocess.reuse_plan import grid_plan

    forecast = grid_plan(plan)
    steps = int(forecast.num_steps)
    grid = torch.tensor(forecast.compute, dtype=torch.bool)
    with torch.no_grad():
        supernet_hard = supernet.sample(batch, grid)
    variants, skipped = build_variants(loaded, supernet, plan, cfg, run, calib, calib)
    samples = {v.name: v.run(batch).cpu() for v in variants}
    consistency = float((supernet_hard.cpu() - samples["dipgo" if forecast is plan else "dipgo_forecast"]).abs().max())

    judge = _digits_judge(loaded, cfg.report.get("fd_judge", "auto"))
    labels = batch["class_labels"].cpu() if "class_labels" in batch else None
    compared, space, data_range = _fidelity_space(loaded, samples, device, cfg)
    fidelity: dict[str, dict[str, float]] = {}
    for v in variants[1:]:
        if space == "latents":
            fidelity[v.name] = {"psnr": psnr(compared[v.name], compared["full"], data_range),
                                "ssim": ssim(compared[v.name], compared["full"], data_range)}
            continue
        kw = {"classifier": judge[0], "real_features": judge[1], "labels": labels} if judge else {}
        fidelity[v.name] = image_fidelity(compared[v.name], compared["full"], **kw)

    n_lat = cfg.report.latency_batch
    lat_batch = map_tensors(lambda t: t[:n_lat], batch)
    fns = {v.name: (lambda v=v: v.run(lat_batch)) for v in variants}
    latency = compare_latency(fns, warmup=cfg.report.latency_warmup, runs=cfg.report.latency_runs, device=device)

    rows = []
    for v in variants:
        rows.append(
            {
                "name": v.name,
                "label": v.label,
                "macs_ratio": v.macs_ratio,
                "macs_speedup": 1.0 / v.macs_ratio,
                "latency_median_s": latency[v.name].median_s,
                "speedup": speedup(latency["full"], latency[v.name]),
                **{k: _finite(x) for k, x in fidelity.get(v.name, {}).items()},
                **v.info,
            }
        )
    dipgo_fid = fidelity["dipgo"]
    report = {
        "kind": "reuse",
        "model": type(model).__name__,
        "source": getattr(loaded, "source", cfg.model.name),
        "num_steps": steps,
        "scheduler": cfg.supernet.scheduler,
        "solver_schedule": plan.payload.schedule.to_meta() if plan.payload.schedule else None,
        "guidance_scale": cfg.supernet.guidance_scale,
        "target": cfg.search.target,
        "macs": {"full_per_sample": supernet.full_cost(), "plan_ratio": plan.cost_ratio},
        "full": {"fd": _finite(dipgo_fid.get("fd_reference")), "accuracy": _finite(dipgo_fid.get("accuracy_reference"))},
        "conditioning": "prompts" if eval_prompts is not None else ("class labels" if labels is not None else "none"),
        "fidelity_space": space,
        "fidelity_data_range": data_range,
        "variants": rows,
        "skipped_baselines": skipped,
        "latency": {n: r.to_dict() for n, r in latency.items()},
        "latency_batch": int(lat_batch["noise"].shape[0]),
        "num_eval_samples": cfg.report.num_samples,
        "fd_feature_dim": int(judge[1].shape[1]) if judge else None,
        "subnet_vs_supernet_max_abs_diff": consistency,
        "closed_slots": forecast.num_closed if forecast is plan else 0,
        "forecast_order": plan.payload.forecast_order,
        # a solver schedule caches nothing: every call is the whole model
        "peak_cache_bytes": 0 if forecast is not plan else _peak_cache_bytes(
            model, plan, run, map_tensors(lambda t: t[:1], batch), steps=steps),
    }
    report["verdict"] = verdict(report)
    report["pruner_verdict"] = pruner_verdict(report)
    if eval_prompts is not None:
        report["eval_prompts"] = sorted(set(eval_prompts))  # held out from the calibration pool
    labels_by_name = {v.name: v.label for v in variants}
    heading = "dipgo plan" if forecast is plan else "forecast plan (the learned solver schedule beat it)"
    plots = _plots(_viewable(compared, space), labels_by_name, forecast, supernet, run_dir, heading) if cfg.report.plots else {}
    if cfg.report.plots:
        from dipgo.report.plots import macs_pareto_plot

        plots["pareto_macs"] = macs_pareto_plot(
            [{**r, "group": r["label"]} for r in rows if r["name"] != "full"], run_dir / "plots" / "pareto_macs.png",
            full_fd=report["full"]["fd"], title=f"{report['model']}, {report['scheduler']}-{report['num_steps']}: every variant")
    return report, plots


def _peak_cache_bytes(model: torch.nn.Module, plan: Plan, run: Callable[..., torch.Tensor],
                      one: dict[str, Any], steps: int) -> int:
    """Memory the plan's caches (copies or forecast histories) take for one sample (both CFG halves)."""
    from dipgo.postprocess.reuse_subnet import install_plan

    with install_plan(model, plan) as handle:
        run(one, steps)
    return int(handle.peak_cache_bytes)


# a plan wins only if its FD stays within this factor of the full model's and of the baselines'
FD_SLACK = 1.1


def verdict(report: dict[str, Any], mac_slack: float = 1.05) -> dict[str, Any]:
    """Does dipgo beat every baseline at (no more than ``mac_slack`` x) its MACs, on PSNR *and* FD?

    dipgo wins when its PSNR is at least the best baseline's and, where the FD proxy exists, its FD
    is at most ``FD_SLACK`` x the full model's and x the best baseline FD: a plan that buys PSNR with
    worse samples is not a win. The dipgo variants themselves (``dipgo_pruner``) are not baselines.
    """
    rows = {v["name"]: v for v in report["variants"]}
    mine = rows["dipgo"]
    rivals = [v for n, v in rows.items() if n not in DIPGO_VARIANTS
              and v["macs_ratio"] <= mine["macs_ratio"] * mac_slack and v.get("psnr") is not None]
    if not rivals:
        return {"dipgo_wins": None, "sentence": "no baseline at the plan's MACs to compare with"}
    best_psnr = max(rivals, key=lambda v: v["psnr"])
    out: dict[str, Any] = {"psnr": {"best_baseline": best_psnr["label"], "baseline": best_psnr["psnr"], "dipgo": mine["psnr"]}}
    losses = [] if mine["psnr"] >= best_psnr["psnr"] else [
        f"PSNR to {best_psnr['label']} ({mine['psnr']:.1f} vs {best_psnr['psnr']:.1f} dB)"]
    fds = [v for v in rivals if isinstance(v.get("fd"), float)]
    if isinstance(mine.get("fd"), float) and fds:
        best_fd = min(fds, key=lambda v: v["fd"])
        full_fd = report.get("full", {}).get("fd")
        out["fd"] = {"best_baseline": best_fd["label"], "baseline": best_fd["fd"], "dipgo": mine["fd"], "full": full_fd}
        if mine["fd"] > FD_SLACK * best_fd["fd"]:
            losses.append(f"FD to {best_fd['label']} ({mine['fd']:.2f} vs {best_fd['fd']:.2f})")
        if isinstance(full_fd, float) and mine["fd"] > FD_SLACK * full_fd:
            losses.append(f"FD more than 10 % above the full model's ({mine['fd']:.2f} vs {full_fd:.2f})")
    out["dipgo_wins"] = not losses
    if losses:
        out["sentence"] = "dipgo loses on " + "; ".join(losses)
    else:
        # FD wins by staying within FD_SLACK of the best baseline's and the full model's, not by being lowest
        full_part = f", full {out['fd']['full']:.2f}" if isinstance(out.get("fd", {}).get("full"), float) else ""
        fd_part = (f" and FD within 10 % of the best ({mine['fd']:.2f} vs {out['fd']['baseline']:.2f}, "
                   f"{out['fd']['best_baseline']}{full_part})") if "fd" in out else ""
        out["sentence"] = (f"dipgo best on PSNR ({mine['psnr']:.1f} vs {best_psnr['psnr']:.1f} dB, "
                           f"{best_psnr['label']}){fd_part}")
    return out


DIPGO_VARIANTS = ("full", "dipgo", "dipgo_forecast", "dipgo_pruner", "dipgo_placement")
"""The full model and dipgo's own plans: never a baseline."""
STATIC_SCHEDULES = ("deepcache", "uniform", "static_per_block", "taylorseer1", "taylorseer2")
"""Baselines whose plan is a fixed schedule (no search, no run-time decision): the bar for the
pruner's own plan (GitHub issue 13: the learned plan must carry its weight)."""


def pruner_verdict(report: dict[str, Any], mac_slack: float = 1.05) -> dict[str, Any] | None:
    """Does the pruner's plan *before refinement* (``dipgo_pruner``) beat every static schedule at
    (no more than ``mac_slack`` x) its MACs on PSNR? ``None`` when the run has no such pair."""
    rows = {v["name"]: v for v in report["variants"]}
    mine = rows.get("dipgo_pruner")
    if mine is None or mine.get("psnr") is None:
        return None
    static = [v for n, v in rows.items() if n in STATIC_SCHEDULES and v.get("psnr") is not None
              and v["macs_ratio"] <= mine["macs_ratio"] * mac_slack]
    if not static:
        return None
    best = max(static, key=lambda v: v["psnr"])
    wins = mine["psnr"] > best["psnr"]
    return {"pruner_wins": wins, "pruner": mine["psnr"], "best_static": best["label"], "static": best["psnr"],
            "sentence": (f"the pruner alone {'beats' if wins else 'does not beat'} the static schedules "
                         f"({mine['psnr']:.1f} vs {best['psnr']:.1f} dB, {best['label']})")}


def _batch(items: dict[str, Any], device: torch.device | str = "cpu") -> dict[str, Any]:
    items.pop("index", None)
    return map_tensors(lambda t: t.to(device), items)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else "inf"
    return value


def _plots(samples: dict[str, torch.Tensor], labels: dict[str, str], plan: Plan, supernet: ReuseSuperNet, run_dir: Path,
           heading: str = "dipgo plan") -> dict[str, Path]:
    from dipgo.report.plots import cost_bars, gate_heatmap, loss_curves, sample_grid

    plots_dir = run_dir / "plots"
    out: dict[str, Path] = {}
    grid = torch.tensor(plan.compute, dtype=torch.float32)
    out["gate_heatmap"] = gate_heatmap(grid, plan.blocks, plots_dir / "gate_heatmap.png",
                                       title=f"{heading}: {plan.cost_ratio:.1%} of MACs (blue = computed)")
    probs = plan.meta.get("keep_probs")
    if probs is not None:
        out["keep_probs"] = gate_heatmap(torch.tensor(probs), plan.blocks, plots_dir / "keep_probs.png",
                                         title="learned keep probabilities (steps >= 1)")
    labelled = {labels[k]: v[:32] for k, v in samples.items()}
    out["samples"] = sample_grid(labelled, plots_dir / "samples.png", nrow=8)
    metrics = run_dir / "logs" / "metrics.csv"
    if metrics.is_file():
        out["loss_curves"] = loss_curves(metrics, plots_dir / "loss_curves.png")
    unit_macs = getattr(supernet, "unit_macs", None)
    if unit_macs is not None and len(unit_macs):
        per_block = dict(zip(supernet.block_names, [float(m) for m in unit_macs]))
        out["block_macs"] = cost_bars(per_block, plots_dir / "block_macs.png", title="MACs per gated block (one call)")
    return out


def summary_lines(report: dict[str, Any]) -> list[str]:
    """A small table: MACs, wall-clock speedup and fidelity of every variant."""
    lines = [
        f"{report['model']} ({report['source']}), {report['num_steps']}-step {report['scheduler']}, "
        f"target {report['target']:.0%} of MACs; latency: median of interleaved runs, batch {report['latency_batch']}",
        f"{'variant':<30}{'MACs':>8}{'speedup':>9}{'PSNR':>8}{'SSIM':>7}{'FD':>8}{'acc':>7}",
    ]
    for v in report["variants"]:
        lines.append(
            f"{v['label'][:29]:<30}{v['macs_ratio']:>8.1%}{v['speedup']:>8.2f}x"
            f"{_fmt(v.get('psnr'), '.1f'):>8}{_fmt(v.get('ssim'), '.3f'):>7}{_fmt(v.get('fd'), '.2f'):>8}{_fmt(v.get('accuracy'), '.0%'):>7}"
        )
    if report.get("fidelity_space") not in (None, "images"):
        lines.append(f"PSNR/SSIM vs the full model on {report['fidelity_space']}"
                     + (f" (data range {report['fidelity_data_range']:.2f})" if report["fidelity_space"] == "latents" else ""))
    full = report.get("full", {})
    if full.get("fd") is not None:
        # an unconditional denoiser has no class to be accurate about: FD only
        accuracy = f", accuracy {full['accuracy']:.0%}" if full.get("accuracy") is not None else ""
        lines.append(f"full model: FD {full['fd']:.2f}{accuracy} (FD = Fréchet distance in digits-classifier features to real held-out digits)")
        note = fd_sample_note(report)
        if note:
            lines.append(note)
    if report.get("forecast_order"):
        lines.append(f"closed slots forecast (order {report['forecast_order']}); caches "
                     f"{report.get('peak_cache_bytes', 0) / 1e6:.2f} MB per sample")
    for name, why in (report.get("skipped_baselines") or {}).items():
        if SOLVER_BASELINES.get(name) == report.get("scheduler"):
            continue  # the search's own sampler: its fewer-step row is in the table already
        if not why.startswith(f"{name}:"):
            why = f"{name}: {why}"
        lines.append(f"not compared: {why}")  # a baseline missing from the table says why
    if report.get("verdict"):
        lines.append(f"verdict: {report['verdict']['sentence']}")
    if report.get("pruner_verdict"):
        lines.append(f"before refinement: {report['pruner_verdict']['sentence']}")
    lines.append(f"plots: {', '.join(report.get('plots', {}).values())}")
    return lines


def fd_sample_note(report: dict[str, Any]) -> str | None:
    """A warning when the FD proxy was estimated from fewer samples than twice its feature dimension.

    With N samples of D-dim features the covariance has rank below N, so for N < 2 D the FD is
    biased upward and moves with the evaluation noise (digits DiT, 100 samples of 128-dim features:
    the full model's FD ranged 3.3-4.9 over 8 noise seeds, 2.6-2.7 at 1000 samples; docs/RESULTS.md).
    Comparisons inside one report share the noise and stay meaningful; absolute values do not.
    """
    n, dim = report.get("num_eval_samples"), report.get("fd_feature_dim")
    if not isinstance(n, int) or not isinstance(dim, int) or n >= 2 * dim:
        return None
    return (f"note: FD from {n} samples of {dim}-dim features is biased upward and moves with the noise seed; "
            f"compare variants within this report, raise report.num_samples (>= {2 * dim}) for absolute values, "
            "or re-sample a saved run with scripts/fd_spread.py")


def _fmt(value: Any, spec: str) -> str:
    if value is None:
        return "-"
    if value == "inf":
        return "inf"
    return format(value, spec)


def bench_plan(cfg: DictConfig, plan: Plan, *, runs: int, warmup: int, batch: int, threads: int | None,
               compile: bool = False) -> dict[str, Any]:
    """Time a saved plan against its full model (``dipgo bench``); ``compile`` adds the same two
    under regional ``torch.compile`` (inductor) and dynamo's counts (see :func:`_bench_compiled`)."""
    from dipgo.models.configured import load_configured_model
    from dipgo.search.reuse_task import ReuseTask

    loaded = load_configured_model(cfg)
    supernet = ReuseTask().build(loaded, cfg)
    from dipgo.postprocess.reuse_plan import validate_plan

    validate_plan(plan, supernet)
    supernet.remove()  # validated; time the plan on the plain model
    b = eval_items(loaded, cfg, batch, cfg.report.eval_seed)
    b.pop("prompts", None)
    sched_cfg = dict(loaded.scheduler.config) if loaded.scheduler is not None else None
    run = _sampler(loaded.model, cfg, sched_cfg)
    schedule = plan.payload.schedule
    steps = schedule.reference_steps if schedule is not None else int(plan.num_steps)
    planned = _dipgo_runner(run, loaded, plan, cfg, steps)
    fns = {"full": lambda: run(b, steps), "dipgo": lambda: planned(b)}
    compiled: dict[str, Any] = {}
    if compile and schedule is not None:
        raise PlanError("--compile times a grid plan's hooks under torch.compile; a solver-schedule plan has none "
                        "(its speedup is its call count): run dipgo bench without --compile")
    if compile:
        compiled, extra_fns = _bench_compiled(loaded.model, cfg, sched_cfg, plan, b, steps)
        fns.update(extra_fns)
    lat = compare_latency(fns, warmup=warmup, runs=runs, threads=threads)
    result = {
        "machine": machine_record(),
        "model": type(loaded.model).__name__,
        "num_steps": steps,
        "batch": batch,
        "macs_ratio": plan.cost_ratio,
        "latency": {k: v.to_dict() for k, v in lat.items()},
        "speedup": speedup(lat["full"], lat["dipgo"]),
    }
    if compile:
        compiled["speedup"] = speedup(lat["full_compiled"], lat["dipgo_compiled"])
        compiled["full_compiled_vs_full"] = speedup(lat["full"], lat["full_compiled"])
        compiled["dipgo_compiled_vs_full"] = speedup(lat["full"], lat["dipgo_compiled"])
        compiled["steady_state_compilations"] = _steady_compilations(compiled.pop("_blocks"), fns, steps)
        result["compile"] = compiled
    return result


def _bench_compiled(model: torch.nn.Module, cfg: DictConfig, sched_cfg: dict | None, plan: Plan,
                    b: dict[str, Any], steps: int) -> tuple[dict[str, Any], dict[str, Callable[[], Any]]]:
    """The full model and the plan on a copy of the model with its blocks compiled (inductor).

    First, for contrast, dynamo alone (``backend="eager"``, no code generated) on the *whole*
    denoiser, which is what a user gets from ``torch.compile(unet)`` with the plan's hooks inside.
    Then the regional compile dipgo recommends: the first run of each variant compiles and is
    timed as compile time; the later, timed runs must compile nothing (checked afterwards).
    """
    import copy

    import torch._dynamo

    from dipgo.postprocess.compile import compile_blocks, compile_stats

    whole: dict[str, Any] = {}
    twin = copy.deepcopy(model)
    run_twin = _sampler(twin, cfg, sched_cfg)
    planned_twin = _plan_runner(run_twin, twin, plan, steps)
    torch._dynamo.reset()
    twin.compile(backend="eager", dynamic=False)
    for name, fn in (("full", lambda: run_twin(b, steps)), ("dipgo", lambda: planned_twin(b))):
        with compile_stats(steps) as stats, torch.inference_mode():
            fn()
        whole[name] = {**stats[0].to_dict(), "graph_breaks_per_step": stats[0].graph_breaks / steps}
    twin._compiled_call_impl = None  # back to eager; the regional compile below starts from scratch
    torch._dynamo.reset()

    blocks = compile_blocks(twin)
    regional: dict[str, Any] = {"blocks": len(blocks.names)}
    fns = {"full_compiled": lambda: run_twin(b, steps), "dipgo_compiled": lambda: planned_twin(b)}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        with compile_stats(steps, blocks) as stats, torch.inference_mode():
            fn()
        regional[name] = {**stats[0].to_dict(), "first_run_s": round(time.perf_counter() - t0, 2)}
    return {"whole_model_dynamo": whole, "regional": regional, "_blocks": blocks}, fns


def _steady_compilations(blocks: Any, fns: dict[str, Callable[[], Any]], steps: int) -> int:
    """Graphs compiled by one more run of each compiled variant after the timing: 0 in a steady state."""
    from dipgo.postprocess.compile import compile_stats

    total = 0
    for name in ("full_compiled", "dipgo_compiled"):
        with compile_stats(steps, blocks) as stats, torch.inference_mode():
            fns[name]()
        total += stats[0].graphs
    blocks.remove()
    return total


def bench_lines(result: dict[str, Any]) -> list[str]:
    full, sub = result["latency"]["full"], result["latency"]["dipgo"]
    lines = [
        f"{result['model']}, {result['num_steps']} steps, batch {result['batch']}, {full['threads']} threads, median of {full['runs']} runs",
        f"full  {full['median_s'] * 1e3:9.1f} ms",
        f"dipgo {sub['median_s'] * 1e3:9.1f} ms   ({result['macs_ratio']:.1%} of MACs)",
        f"speedup {result['speedup']:.2f}x",
    ]
    c = result.get("compile")
    if c:
        lat, reg, whole = result["latency"], c["regional"], c["whole_model_dynamo"]
        lines += [
            f"torch.compile, regional (inductor, {reg['blocks']} blocks, fullgraph):",
            f"full  {lat['full_compiled']['median_s'] * 1e3:9.1f} ms   ({c['full_compiled_vs_full']:.2f}x eager full; "
            f"first run {reg['full_compiled']['first_run_s']:.1f} s compiling {reg['full_compiled']['graphs']} graphs)",
            f"dipgo {lat['dipgo_compiled']['median_s'] * 1e3:9.1f} ms   ({c['dipgo_compiled_vs_full']:.2f}x eager full; "
            f"first run {reg['dipgo_compiled']['first_run_s']:.1f} s compiling {reg['dipgo_compiled']['graphs']} more)",
            f"speedup compiled dipgo vs compiled full {c['speedup']:.2f}x",
            f"graph breaks inside the compiled blocks: {reg['full_compiled']['graph_breaks'] + reg['dipgo_compiled']['graph_breaks']} "
            f"(fullgraph); compiled blocks entered per step: "
            f"full {reg['full_compiled']['compiled_calls_per_step']:.1f}, dipgo {reg['dipgo_compiled']['compiled_calls_per_step']:.1f}; "
            f"graphs compiled after warm-up: {c['steady_state_compilations']}",
            f"whole-model torch.compile (dynamo only, for contrast), first trajectory: full {whole['full']['graph_breaks']} "
            f"graph breaks / {whole['full']['graphs']} graphs, dipgo {whole['dipgo']['graph_breaks']} / "
            f"{whole['dipgo']['graphs']} ({whole['dipgo']['graph_breaks_per_step']:.1f} breaks per step)",
        ]
    return lines


register_functions("reuse", evaluate=evaluate_reuse, summary_lines=summary_lines, bench=bench_plan, bench_lines=bench_lines)
