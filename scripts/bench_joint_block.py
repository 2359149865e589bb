"""Joint depth + sparsity benchmark: block + mask vs each kind alone, same budget, same run, to JSON.

On the digits ViT, for every MACs budget in ``--targets`` the script runs ``recipe=digits_vit_joint``
(or ``--recipe``) three times on the same code path, seed and calibration data:
``supernet.kinds=[block,mask]`` (joint), ``[block]`` and ``[mask]``. Each run's report gives the
held-out accuracy and KL of its SubNet (pruned weights, closed blocks removed) against the full
model, its kept-MACs ratio and, for the joint run, how the budget was split (with a mask part: the
candidate density allocations measured on calibration data, their scores and the chosen one).

    OMP_NUM_THREADS=1 python scripts/bench_joint_block.py --targets 0.5 --out /tmp/exp/joint_block_vit.json
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from typing import Any

from dipgo.files import write_json_atomic

KIND_SETS: dict[str, str] = {"joint": "[block,mask]", "block": "[block]", "mask": "[mask]"}


def run_point(recipe: str, target: float, kinds: str, runs_root: str, extra: list[str]) -> dict[str, Any]:
    from dipgo.search.compose import compose_config
    from dipgo.search.run import run_search

    overrides = [f"recipe={recipe}", f"search.target={target}", f"supernet.kinds={kinds}", f"runs_root={runs_root}",
                 "logger.wandb=false", "trainer.enable_progress_bar=false", *extra]
    cfg, _ = compose_config(overrides)
    t0 = time.perf_counter()
    result = run_search(cfg, quiet=True)
    rep, meta = result.report, result.plan.meta
    row = next(v for v in rep["variants"] if v["name"] == "dipgo")
    full = next(v for v in rep["variants"] if v["name"] == "full")
    key = rep["fidelity_metric"]
    metrics = {k: row[k] for k in ("accuracy", "agreement", "kl", "cosine", "cosine_min") if k in row}
    mask = meta.get("mask") or {}
    return {
        "target": target, "kinds": kinds, "cost_ratio": rep["cost_ratio"], "cost_split": rep["cost_split"],
        **metrics, f"{key}_full_model": full[key], "removed_blocks": rep["removed_blocks"],
        "dense_macs_ratio": row["dense_macs_ratio"], "mask_density_macs": rep["mask_density_macs"],
        "layer_density": dict(zip(mask.get("layers", []), mask.get("density", []))),
        "keep_probs": meta.get("keep_probs"), "refine": rep.get("refine"), "reopen": meta.get("reopen"),
        "split_search": meta.get("split_search"), "learned_density": mask.get("learned_density"),
        "eval_items": rep["eval_items"], "search_seconds": rep["search_seconds"],
        "seconds": round(time.perf_counter() - t0, 1),
    }


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown: one line per (budget, kind set)."""
    lines = ["| target | kinds | kept MACs | accuracy | KL | removed blocks | split (blocks alone / sparsity alone) | chosen split |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        s = r["cost_split"]
        lines.append(f"| {r['target']} | {r['kinds']} | {r['cost_ratio']:.4f} | {r.get('accuracy', float('nan')):.4f} | "
                     f"{r.get('kl', float('nan')):.4f} | {len(r['removed_blocks'])} | {s['block_only']} / {s['mask_only']} | "
                     f"{(r.get('split_search') or {}).get('chosen', '-')} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="digits_vit_joint")
    ap.add_argument("--targets", type=float, nargs="+", default=[0.5])
    ap.add_argument("--kinds", nargs="+", default=list(KIND_SETS), choices=list(KIND_SETS))
    ap.add_argument("--out", default="docs/results/joint_block_digits_vit.json")
    ap.add_argument("--override", action="append", default=[], help="extra config override (repeatable)")
    args = ap.parse_args()
    result: dict[str, Any] = {"recipe": args.recipe, "args": vars(args),
                              "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                              "uptime_at_start": os.popen("uptime").read().strip(), "rows": []}
    with tempfile.TemporaryDirectory() as runs:
        for target in args.targets:
            for name in args.kinds:
                row = run_point(args.recipe, target, KIND_SETS[name], runs, args.override)
                print({k: row.get(k) for k in ("target", "kinds", "cost_ratio", "accuracy", "kl", "cosine", "seconds")},
                      flush=True)
                result["rows"].append(row)
                os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
                write_json_atomic(args.out, result)
    print(table(result["rows"]))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
