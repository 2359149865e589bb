"""Sparsity benchmark on all-MiniLM-L6-v2 (real weights, offline), written to JSON.

Part 1 (allocation): at 50 % and 70 % unstructured and at 2:4, the dipgo SubNet (learned
per-layer sparsity + OBS reconstruction + distillation of the kept weights) against uniform
magnitude, Wanda, Wanda with OWL's allocation and SparseGPT, all on the same calibration
sentences, scored by the cosine of mean-pooled embeddings to the dense model's on the held-out
test sentences. Ablations: ``dipgo_mask_only`` (learned allocation, no weight update) and
``uniform_recon_distill`` (uniform allocation with dipgo's reconstruction + distillation), so the
share of the learned allocation in the result is visible.

Part 2 (end to end): block plans (``--curve-patterns``, block32 and/or rowblock32) at several densities, the SubNet's masked Linears on the
block-sparse kernels where the kernel heuristic says they pay; encoder latency vs dense measured
interleaved in one process, and fidelity.

    OMP_NUM_THREADS=2 python scripts/bench_sparsity.py --out docs/results/sparsity_minilm.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from dipgo.files import write_json_atomic


def _overrides(runs_root: str, **kw: Any) -> list[str]:
    base = {"runs_root": runs_root, "logger.wandb": False, "trainer.enable_progress_bar": False}
    base.update(kw)
    return ["recipe=minilm_sparse", *[f"{k}={v}" for k, v in base.items()]]


def uniform_ablation(cfg: Any) -> float:
    """Uniform allocation, same reconstruction + distillation as dipgo: held-out cosine."""
    from dipgo.models.configured import load_configured_model
    from dipgo.models.io import outputs
    from dipgo.postprocess.mask_plan import uniform_plan
    from dipgo.postprocess.mask_subnet import prune_with_plan
    from dipgo.report.block_eval import eval_data
    from dipgo.search.mask_task import MaskTask

    loaded = load_configured_model(cfg)
    sn = MaskTask().build(loaded, cfg)
    plan = uniform_plan(sn, cfg.search.target)
    model = sn.remove()
    pruned, _ = prune_with_plan(model, plan, sn.saliency, sn.calibration_batches, sn.output_fn,
                                distill_steps=cfg.supernet.distill_steps, distill_lr=cfg.supernet.distill_lr)
    data = eval_data(loaded, cfg)
    ref, out = outputs(model, loaded.kind, data), outputs(pruned, loaded.kind, data)
    return float(torch.nn.functional.cosine_similarity(out, ref, dim=-1).mean())


def run_one(overrides: list[str], ablate: bool) -> dict[str, Any]:
    from dipgo.search.compose import compose_config
    from dipgo.search.run import run_search

    cfg, _ = compose_config(overrides)
    t0 = time.perf_counter()
    result = run_search(cfg, quiet=True)
    rep = result.report
    row = {"pattern": rep["pattern"], "target_density": rep["target_density"], "plan_density": rep["plan_density"],
           "cosine": {v["name"]: round(v["cosine"], 4) for v in rep["variants"]},
           "density": {v["name"]: round(v["density"], 4) for v in rep["variants"]},
           "plan_layer_density": result.plan.meta["density"], "kernel_layers": rep["kernel_layers"],
           "masked_layers": rep["masked_layers"], "kernel_cosine": round(rep["kernel_fidelity"]["cosine"], 4),
           "latency_full_ms": round(rep["latency"]["full"]["median_s"] * 1e3, 3),
           "latency_subnet_ms": round(rep["latency"]["dipgo_kernels"]["median_s"] * 1e3, 3),
           "speedup": round(rep["speedup"], 3), "seconds": round(time.perf_counter() - t0, 1)}
    if ablate:
        row["cosine"]["uniform_recon_distill"] = round(uniform_ablation(cfg), 4)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs/results/sparsity_minilm.json")
    ap.add_argument("--steps", type=int, default=100, help="pruner steps per search")
    ap.add_argument("--distill-steps", type=int, default=100)
    ap.add_argument("--curve", default="0.7,0.5,0.3,0.2", help="densities of the speed curve")
    ap.add_argument("--curve-patterns", default="block32", help="block patterns of the speed curve, comma-separated")
    ap.add_argument("--pool", type=int, default=128, help="calibration sentences")
    ap.add_argument("--samples", type=int, default=379, help="held-out test sentences")
    ap.add_argument("--distill-lr", type=float, default=3e-4)
    ap.add_argument("--skip-allocation", action="store_true")
    ap.add_argument("--no-ablation", action="store_true")
    ap.add_argument("--settings", default="unstructured:0.5,unstructured:0.3,2:4:0.5",
                    help="allocation settings as pattern:density, comma-separated")
    args = ap.parse_args()
    result_args = vars(args)
    threads = torch.get_num_threads()
    result: dict[str, Any] = {"model": "all-MiniLM-L6-v2", "threads": threads,
                              "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "allocation": [], "curve": [], "args": result_args,
                              "uptime_at_start": os.popen("uptime").read().strip()}
    with tempfile.TemporaryDirectory() as runs:
        common = {"trainer.max_steps": args.steps, "supernet.distill_steps": args.distill_steps,
                  "supernet.distill_lr": args.distill_lr, "data.pool_size": args.pool, "report.num_samples": args.samples}
        if not args.skip_allocation:
            settings = [item.rsplit(":", 1) for item in args.settings.split(",") if item]
            for pattern, target in ((p, float(t)) for p, t in settings):
                steps = 5 if ":" in pattern else args.steps
                ov = _overrides(runs, **{**common, "trainer.max_steps": steps, "search.target": target,
                                         "supernet.pattern": f'"{pattern}"', "report.latency_runs": 3})
                row = run_one(ov, ablate=not args.no_ablation and ":" not in pattern)
                print(json.dumps({k: row[k] for k in ("pattern", "plan_density", "cosine")}), flush=True)
                result["allocation"].append(row)
                write_json_atomic(args.out, result)
        points = [(p, float(d)) for p in args.curve_patterns.split(",") for d in args.curve.split(",") if d]
        for pattern, dens in points:
            ov = _overrides(runs, **{**common, "search.target": dens, "supernet.pattern": pattern,
                                     "report.baselines": "[]", "report.latency_runs": 10})
            row = run_one(ov, ablate=False)
            print(json.dumps({k: row[k] for k in ("pattern", "plan_density", "kernel_cosine", "speedup")}), flush=True)
            result["curve"].append(row)
            write_json_atomic(args.out, result)
    print(f"wrote {Path(args.out)}")


if __name__ == "__main__":
    main()
