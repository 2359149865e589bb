"""Joint search benchmark: reuse + mask vs each kind alone, same budget, same run, written to JSON.

On the digits DiT (50-step DDIM), for every MACs budget in ``--targets`` the script runs
``recipe=digits_dit_joint`` three times on the same code path, seed and calibration data:
``supernet.kinds=[reuse,mask]`` (joint), ``[reuse]`` and ``[mask]``. Each run's report gives the
held-out fidelity of its SubNet against the full model (PSNR / SSIM on ``report.num_samples``
noises, FD from the digits classifier's features) and its kept-MACs ratio.

    OMP_NUM_THREADS=2 python scripts/bench_joint.py --targets 0.2 0.25 0.35 --out docs/results/joint_digits_dit.json
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from dipgo.files import write_json_atomic

KIND_SETS: dict[str, str] = {"joint": "[reuse,mask]", "reuse": "[reuse]", "mask": "[mask]"}


def run_point(target: float, kinds: str, runs_root: str, extra: list[str]) -> dict[str, Any]:
    from dipgo.search.compose import compose_config
    from dipgo.search.run import run_search

    overrides = ["recipe=digits_dit_joint", f"search.target={target}", f"supernet.kinds={kinds}",
                 f"runs_root={runs_root}", "logger.wandb=false", "trainer.enable_progress_bar=false", *extra]
    cfg, _ = compose_config(overrides)
    t0 = time.perf_counter()
    result = run_search(cfg, quiet=True)
    rep = result.report
    row = rep["variants"][0]
    mask = result.plan.meta.get("mask") or {}
    return {
        "target": target, "kinds": kinds, "cost_ratio": round(rep["cost_ratio"], 4), "cost_split": rep["cost_split"],
        "mask_density_macs": rep["mask_density_macs"],
        "psnr": round(row["psnr"], 3), "ssim": round(row["ssim"], 4),
        "fd": round(row["fd"], 4) if "fd" in row else None, "fd_full_model": round(row.get("fd_reference", float("nan")), 4),
        "accuracy": row.get("accuracy"), "accuracy_full_model": row.get("accuracy_reference"),
        "refine_start": rep.get("refine", {}).get("start"),
        "layer_density": dict(zip(mask.get("layers", []), mask.get("density", []))),
        "search_seconds": rep["search_seconds"], "seconds": round(time.perf_counter() - t0, 1),
    }


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown: one line per budget, PSNR / FD of each kind set, the joint plan's split."""
    lines = ["| target | joint PSNR | reuse PSNR | mask PSNR | joint FD | reuse FD | mask FD | joint split (reuse alone / sparsity alone) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for t in sorted({r["target"] for r in rows}):
        by = {r["kinds"]: r for r in rows if r["target"] == t}
        j, r, m = (by.get(KIND_SETS[k], {}) for k in ("joint", "reuse", "mask"))
        split = j.get("cost_split") or {}
        lines.append(f"| {t} | {j.get('psnr', '-')} | {r.get('psnr', '-')} | {m.get('psnr', '-')} | {j.get('fd', '-')} | "
                     f"{r.get('fd', '-')} | {m.get('fd', '-')} | {split.get('reuse_only', '-')} / {split.get('mask_only', '-')} |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    from dipgo.report.plots import cost_curves

    series = {name: [(r["cost_ratio"], r["psnr"]) for r in rows if r["kinds"] == kinds]
              for name, kinds in KIND_SETS.items()}
    cost_curves(series, path, xlabel="kept MACs of the 50-step trajectory", ylabel="PSNR vs full model (dB)",
                title="digits DiT: joint reuse + sparsity vs each alone")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", type=float, nargs="+", default=[0.2, 0.25, 0.35])
    ap.add_argument("--kinds", nargs="+", default=list(KIND_SETS), choices=list(KIND_SETS))
    ap.add_argument("--out", default="docs/results/joint_digits_dit.json")
    ap.add_argument("--override", action="append", default=[], help="extra config override (repeatable)")
    args = ap.parse_args()
    result: dict[str, Any] = {"model": "digits_dit", "args": vars(args), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                              "uptime_at_start": os.popen("uptime").read().strip(), "rows": []}
    with tempfile.TemporaryDirectory() as runs:
        for target in args.targets:
            for name in args.kinds:
                row = run_point(target, KIND_SETS[name], runs, args.override)
                print({k: row[k] for k in ("target", "kinds", "cost_ratio", "psnr", "fd", "seconds")}, flush=True)
                result["rows"].append(row)
                write_json_atomic(args.out, result)
    out = Path(args.out)
    out.with_suffix(".md").write_text(table(result["rows"]) + "\n")
    plot(result["rows"], out.with_suffix(".png"))
    print(table(result["rows"]))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
