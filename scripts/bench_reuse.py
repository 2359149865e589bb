"""Benchmark DiP-GO timestep reuse against its baselines over a sweep of MACs targets.

For each target, one ``dipgo search`` (same recipe, same seed) runs end to end; its report
holds the dipgo plan and every baseline at the same MACs, all sampled from the same evaluation
noise and timed interleaved in the same process. This script collects them into one JSON and
two plots, which docs/RESULTS.md quotes: ``<out>.png`` (wall-clock speedup vs PSNR) and
``<out>_macs.png`` (MACs vs PSNR and MACs vs FD, every variant of every target, Pareto fronts).
``--replot`` redraws both from an existing JSON without searching again.

    python scripts/bench_reuse.py --recipe digits_unet_reuse --targets 0.2 0.25 0.35 0.5 \
        --out bench_out/reuse_digits_unet.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from dipgo.measure.machine import machine_record


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="digits_unet_reuse")
    p.add_argument("--targets", type=float, nargs="+", default=[0.2, 0.25, 0.35, 0.5])
    p.add_argument("--out", default="bench_out/reuse_digits_unet.json")
    p.add_argument("--runs-root", default="bench_out/runs")
    p.add_argument("--replot", action="store_true", help="only redraw the plots of an existing --out JSON")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides for every search")
    return p.parse_args()


def macs_points(results: list[dict]) -> tuple[list[dict], float | None]:
    """Every variant of every target as a point of the MACs plot, and the full model's FD."""
    points, full_fd = [], None
    for res in results:
        report = res["report"]
        full_fd = report.get("full", {}).get("fd", full_fd)
        for v in report["variants"]:
            if v["name"] != "full":
                points.append({**v, "group": v["name"]})
    return points, full_fd


def draw_macs(results: list[dict], out: Path, recipe: str) -> Path:
    from dipgo.report.plots import macs_pareto_plot

    points, full_fd = macs_points(results)
    return macs_pareto_plot(points, out.with_name(out.stem + "_macs.png"), full_fd=full_fd,
                            title=f"{recipe}: MACs vs PSNR and FD, every variant at every target")


def main() -> None:
    args = parse_args()
    if args.replot:
        out = Path(args.out)
        payload = json.loads(out.read_text())
        payload["macs_plot"] = str(draw_macs(payload["results"], out, args.recipe))
        out.write_text(json.dumps(payload, indent=2))
        print(f"redrawn: {payload['macs_plot']}")
        return
    from dipgo.report.plots import pareto_plot
    from dipgo.report.summary import collect_points
    from dipgo.search.compose import compose_config
    from dipgo.search.run import run_search

    runs_root = Path(args.runs_root) / f"{args.recipe}-{time.strftime('%Y%m%d-%H%M%S')}"
    results = []
    for target in args.targets:
        overrides = [f"recipe={args.recipe}", f"search.target={target}", f"runs_root={runs_root}",
                     f"recipe_name={args.recipe}", *args.overrides]
        cfg, _ = compose_config(overrides)
        t0 = time.perf_counter()
        result = run_search(cfg, quiet=True)
        print(f"target {target}: {time.perf_counter() - t0:.0f}s  {result.run_dir}")
        for line in result.summary:
            print("  " + line)
        results.append({"target": target, "run_dir": str(result.run_dir), "report": result.report})

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    points = collect_points(runs_root)
    plot = pareto_plot(points, out.with_suffix(".png"), fidelity_label="PSNR vs full model (dB)",
                       title=f"{args.recipe}: speedup vs fidelity")
    payload = {
        "command": "python scripts/bench_reuse.py " + " ".join(
            ["--recipe", args.recipe, "--targets", *map(str, args.targets), "--out", args.out, *args.overrides]),
        "machine": {**machine_record(), "platform": platform.platform(), "threads": torch.get_num_threads()},
        "results": results,
        "pareto_plot": str(plot),
        "macs_plot": str(draw_macs(results, out, args.recipe)),
    }
    out.write_text(json.dumps(payload, indent=2))
    print(f"written: {out} and {plot}")


if __name__ == "__main__":
    main()
