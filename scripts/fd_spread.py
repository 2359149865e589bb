"""How much the FD proxy of a reuse report moves with the evaluation noise and the sample count.

A report judges FD on ``report.num_samples`` noises (100 by default) in the digits classifier's
128-dim features: fewer samples than dimensions, so the value is biased upward and moves with the
seed. This script re-samples a saved run's plan, the full model and the chosen baselines from
other evaluation seeds and sample counts, and writes every FD / PSNR plus each baseline's FD ratio
``dipgo / baseline`` (the quantity the report's verdict compares with 1.1), so one can tell a
systematic FD gap from sampling noise.

    python scripts/fd_spread.py <run dir> --seeds 1 2 3 4 5 6 7 8 --samples 100 \
        --also 1234:1000 99:1000 --baselines uniform static_per_block taylorseer1 teacache \
        --out docs/results/fd_spread_digits_dit_0.20.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, help="a reuse run directory (config.yaml + plan.json) of a digits denoiser")
    p.add_argument("--seeds", type=int, nargs="*", default=[1, 2, 3, 4, 5, 6, 7, 8])
    p.add_argument("--samples", type=int, default=100, help="noises per seed for --seeds")
    p.add_argument("--also", nargs="*", default=[], metavar="SEED:N", help="extra (seed, sample count) points")
    p.add_argument("--baselines", nargs="+", default=["uniform", "static_per_block", "taylorseer1", "teacache"])
    p.add_argument("--out", type=Path, required=True)
    return p.parse_args()


def evaluate(run_dir: Path, baselines: list[str], seed: int, n: int) -> dict:
    """FD and PSNR of full, dipgo (and pruner-only) and ``baselines`` on ``n`` noises of ``seed``."""
    from omegaconf import OmegaConf

    from dipgo.measure.fidelity import image_fidelity
    from dipgo.models.configured import load_configured_model
    from dipgo.postprocess.plan import Plan
    from dipgo.report import reuse_eval
    from dipgo.search.tasks import get_task

    cfg = OmegaConf.load(run_dir / "config.yaml")
    cfg.report.baselines = list(baselines)
    plan = Plan.load(run_dir / "plan.json")
    task = get_task(cfg.supernet.kind, cfg)
    loaded = load_configured_model(cfg)
    judge = reuse_eval._digits_judge(loaded, cfg.report.get("fd_judge", "auto"))
    if judge is None:
        raise SystemExit(f"{run_dir}: the FD proxy exists for the digits denoisers only, this run is {loaded.source}")
    supernet = task.build(loaded, cfg)
    sched_cfg = dict(loaded.scheduler.config) if getattr(loaded, "scheduler", None) is not None else None
    run = reuse_eval._sampler(loaded.model, cfg, sched_cfg)
    batch = reuse_eval._batch(reuse_eval.eval_items(loaded, cfg, n, seed))
    # the baselines calibrate on the report's own calibration noise, so their plans match the report's
    calib = reuse_eval._batch(reuse_eval.eval_items(loaded, cfg, min(8, cfg.report.num_samples),
                                                    cfg.report.eval_seed + 7, split="calibration"))
    variants, _ = reuse_eval.build_variants(loaded, supernet, plan, cfg, run, calib, calib)
    samples = {v.name: v.run(batch).cpu() for v in variants}
    labels = batch["class_labels"].cpu() if "class_labels" in batch else None
    row: dict = {"seed": seed, "samples": n, "variants": {}}
    for v in variants[1:]:
        f = image_fidelity(samples[v.name], samples["full"], classifier=judge[0], real_features=judge[1], labels=labels)
        row["variants"][v.name] = {"label": v.label, "macs_ratio": v.macs_ratio, "psnr": f["psnr"], "fd": f["fd"]}
        row["full_fd"] = f["fd_reference"]
    mine = row["variants"]["dipgo"]["fd"]
    row["dipgo_fd_ratio"] = {"full": mine / row["full_fd"],
                             **{name: mine / row["variants"][name]["fd"] for name in row["variants"] if name in baselines}}
    return row


def main() -> None:
    args = parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    from dipgo.measure.machine import machine_record

    points = [(s, args.samples) for s in args.seeds] + [tuple(map(int, a.split(":"))) for a in args.also]
    rows = []
    for seed, n in points:
        t0 = time.perf_counter()
        row = evaluate(args.run_dir, args.baselines, seed, n)
        rows.append(row)
        ratios = "  ".join(f"{k} {v:.3f}" for k, v in row["dipgo_fd_ratio"].items())
        print(f"seed {seed}, {n} samples ({time.perf_counter() - t0:.0f}s): full FD {row['full_fd']:.2f}, "
              f"dipgo FD {row['variants']['dipgo']['fd']:.2f}; dipgo / baseline FD: {ratios}", flush=True)
    summary = {}
    for n in sorted({r["samples"] for r in rows}):
        group = [r for r in rows if r["samples"] == n]
        summary[str(n)] = {name: {"mean": statistics.fmean(r["dipgo_fd_ratio"][name] for r in group),
                                  "min": min(r["dipgo_fd_ratio"][name] for r in group),
                                  "max": max(r["dipgo_fd_ratio"][name] for r in group), "seeds": len(group)}
                           for name in group[0]["dipgo_fd_ratio"]}
    payload = {
        "command": "python scripts/fd_spread.py " + " ".join(
            [str(args.run_dir), "--seeds", *map(str, args.seeds), "--samples", str(args.samples),
             *(["--also", *args.also] if args.also else []), "--baselines", *args.baselines, "--out", str(args.out)]),
        "machine": {**machine_record(), "threads": torch.get_num_threads()},
        "run_dir": str(args.run_dir),
        "plan": json.loads((args.run_dir / "plan.json").read_text()).get("target"),
        "rows": rows,
        "dipgo_fd_ratio_summary": summary,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2))
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
