"""PSNR and FD of whole-step plans at one budget: is there a placement that beats the solvers on both?

A reuse run whose plan computes K whole steps of S (and forecasts the model output at the others)
is one point of a finite search space: the K-subsets of the S steps that contain step 0. This
script samples that space (every placement when it is small, else ``--limit`` random ones plus the
evenly spaced one, the run's refined plan and its pruner's plan), runs each placement with the
run's forecast order exactly as a SubNet runs it (``install_plan``), and judges it like the report:
PSNR to the full model on the same sampler and the digits FD proxy. The fewer-step solvers at the
same MACs (K steps of DPM-Solver++(2M), UniPC and DDIM) are judged on the same noises.

The question it answers: when dipgo's plan wins PSNR but loses FD (or the other way round), is a
better plan missing from the search, or does no placement of K forecast steps beat the K-step
solvers on both? The JSON holds every point; ``<out>.png`` plots FD / full-model FD against PSNR.

    python scripts/placement_frontier.py <run dir> --samples 400 --seed 1234 --limit 150 \
        --out docs/results/placement_frontier_hidden_unet_dpm25_0.20.json
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import random
import time
from pathlib import Path

import torch


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, help="a reuse run directory (config.yaml + plan.json) of a digits denoiser")
    p.add_argument("--samples", type=int, default=400, help="evaluation noises")
    p.add_argument("--seed", type=int, default=1234, help="seed of the evaluation noises")
    p.add_argument("--limit", type=int, default=150, help="random placements at most (all when there are fewer)")
    p.add_argument("--draw-seed", type=int, default=0, help="seed of the random choice of placements")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--replot", action="store_true", help="only redraw <out>.png from an existing --out JSON")
    return p.parse_args()


def whole_steps(compute: list[list[bool]]) -> list[int] | None:
    """The computed steps of a plan whose rows are all-compute or all-skip, else ``None``."""
    if any(any(row) and not all(row) for row in compute):
        return None
    return [i for i, row in enumerate(compute) if all(row)]


def placements(num_steps: int, k: int, limit: int, seed: int, must: list[list[int]]) -> list[list[int]]:
    """``must`` first, then every K-subset containing step 0, or ``limit`` of them drawn at random."""
    total = math.comb(num_steps - 1, k - 1)
    if total <= limit:
        pool = [[0, *rest] for rest in itertools.combinations(range(1, num_steps), k - 1)]
    else:
        rng, seen = random.Random(seed), set()
        while len(seen) < limit:
            seen.add(tuple(sorted(rng.sample(range(1, num_steps), k - 1))))
        pool = [[0, *rest] for rest in sorted(seen)]
    out: list[list[int]] = []
    for p in [*must, *pool]:
        if p not in out:
            out.append(p)
    return out


def plot(points: list[dict], solvers: list[dict], out: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    rest = [p for p in points if p["role"] == "placement"]
    ax.scatter([p["psnr"] for p in rest], [p["fd_ratio"] for p in rest], s=10, c="0.6",
               label=f"whole-step placements ({len(rest)})")
    marks = {"refined plan": ("*", "tab:red"), "pruner plan": ("P", "tab:orange"), "evenly spaced": ("s", "tab:blue")}
    for p in points:
        if p["role"] in marks:
            m, c = marks[p["role"]]
            ax.scatter([p["psnr"]], [p["fd_ratio"]], marker=m, s=120, c=c, label=f"{p['role']} {p['steps']}", zorder=3)
    for s, (m, c) in zip(solvers, [("^", "tab:green"), ("v", "tab:purple"), ("D", "tab:brown")]):
        ax.scatter([s["psnr"]], [s["fd_ratio"]], marker=m, s=90, c=c, label=s["label"], zorder=3)
    ax.axhline(1.1, ls="--", c="k", lw=0.8, label="1.1x the full model's FD")
    ax.set_xlabel("PSNR to the full model (dB)")
    ax.set_ylabel("FD proxy / full model's FD (log scale)")
    ax.set_yscale("log")
    best = max(p["psnr"] for p in points)
    ax.set_xlim(best - 10, best + 1)  # the useful corner; far worse placements are in the JSON
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    path = out.with_suffix(".png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    args = parse_args()
    if args.replot:
        data = json.loads(args.out.read_text())
        print(f"written: {plot(data['points'], data['solvers'], args.out, data['title'])}")
        return
    from omegaconf import OmegaConf

    from dipgo.measure.fidelity import image_fidelity
    from dipgo.measure.machine import machine_record
    from dipgo.models.configured import load_configured_model
    from dipgo.postprocess.plan import Plan
    from dipgo.report import reuse_eval

    cfg = OmegaConf.load(args.run_dir / "config.yaml")
    from dipgo.postprocess.reuse_plan import grid_plan

    plan = grid_plan(Plan.load(args.run_dir / "plan.json"))  # a solver schedule: the forecast plan it beat
    refined = whole_steps(plan.compute)
    if plan.kind != "reuse" or refined is None:
        raise SystemExit(f"{args.run_dir}: the plan is not a whole-step reuse plan (some step computes only part "
                         "of the blocks); this script compares placements of whole steps only")
    loaded = load_configured_model(cfg)
    judge = reuse_eval._digits_judge(loaded, cfg.report.get("fd_judge", "auto"))
    if judge is None:
        raise SystemExit(f"{args.run_dir}: the FD proxy exists for digits denoisers only (report.fd_judge)")
    steps, k = len(plan.compute), len(refined)
    sched_cfg = dict(loaded.scheduler.config)
    run = reuse_eval._sampler(loaded.model, cfg, sched_cfg)
    batch = reuse_eval._batch(reuse_eval.eval_items(loaded, cfg, args.samples, args.seed))
    labels = batch.get("class_labels")
    t0 = time.perf_counter()
    with torch.no_grad():
        full = run(batch, steps)

    def judged(x: torch.Tensor) -> dict:
        f = image_fidelity(x, full, classifier=judge[0], real_features=judge[1], labels=labels)
        err = ((x - full) ** 2).flatten(1).mean(1)
        return {"psnr": f["psnr"], "fd": f["fd"], "fd_ratio": f["fd"] / f["fd_reference"],
                "mse_p99": float(torch.quantile(err, 0.99)), "full_fd": f["fd_reference"]}

    pruner = whole_steps(plan.meta.get("refine", {}).get("pruner_compute") or [[False]])
    even = sorted({round(i * steps / k) for i in range(k)})
    roles = {tuple(refined): "refined plan", tuple(even): "evenly spaced"}
    if pruner and len(pruner) == k:
        roles.setdefault(tuple(pruner), "pruner plan")
    cands = placements(steps, k, args.limit, args.draw_seed, [list(r) for r in roles])
    points = []
    blocks = len(plan.blocks)
    for i, place in enumerate(cands):
        grid = [[s in place] * blocks for s in range(steps)]
        with torch.no_grad():
            x = reuse_eval._plan_runner(run, loaded.model, dataclasses.replace(plan, compute=grid), steps)(batch)
        points.append({"steps": place, "role": roles.get(tuple(place), "placement"), **judged(x)})
        if i % 10 == 0:
            p = points[-1]
            print(f"[{i + 1}/{len(cands)}] {place}: {p['psnr']:.2f} dB, FD {p['fd_ratio']:.3f}x full "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    solvers = []
    for name in dict.fromkeys([cfg.supernet.scheduler, "dpmsolver++", "unipc", "ddim"]):
        solver_run = reuse_eval._sampler(loaded.model, cfg, sched_cfg, scheduler=name)
        with torch.no_grad():
            solvers.append({"label": f"{k}-step {name}", "scheduler": name, **judged(solver_run(batch, k))})
    best = {s["label"]: s for s in solvers}
    strongest = max(solvers, key=lambda s: s["psnr"])
    beats = [p for p in points if p["psnr"] > strongest["psnr"] and p["fd_ratio"] <= 1.1
             and all(p["fd"] <= 1.1 * s["fd"] for s in solvers)]
    payload = {
        "command": "python scripts/placement_frontier.py " + " ".join(
            [str(args.run_dir), "--samples", str(args.samples), "--seed", str(args.seed), "--limit", str(args.limit),
             "--draw-seed", str(args.draw_seed), "--out", str(args.out)]),
        "machine": {**machine_record(), "threads": torch.get_num_threads()},
        "run_dir": str(args.run_dir), "model": cfg.model.name, "scheduler": cfg.supernet.scheduler,
        "num_steps": steps, "computed_steps": k, "forecast_order": plan.payload.forecast_order,
        "placements_total": math.comb(steps - 1, k - 1), "placements_judged": len(points),
        "seconds": round(time.perf_counter() - t0, 1),
        "solvers": solvers, "points": points,
        "beat_every_solver_on_both": [p["steps"] for p in beats],
    }
    payload["title"] = (f"{Path(cfg.model.name).name}, {cfg.supernet.scheduler}-{steps}, {k} whole steps, "
                        f"order {payload['forecast_order']}, {args.samples} noises")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2))
    png = plot(points, solvers, args.out, payload["title"])
    top = max(points, key=lambda p: p["psnr"])
    print(f"best PSNR placement {top['steps']}: {top['psnr']:.2f} dB, FD {top['fd_ratio']:.3f}x full; "
          + "; ".join(f"{s['label']}: {s['psnr']:.2f} dB, FD {s['fd_ratio']:.3f}x" for s in best.values()))
    print(f"placements that beat every {k}-step solver on PSNR and FD: {len(beats)} of {len(points)}")
    print(f"written: {args.out}, {png}")


if __name__ == "__main__":
    main()
