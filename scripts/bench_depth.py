"""Benchmark depth search (block gates) against exhaustive search and static criteria.

Two parts, each written into one JSON that docs/RESULTS.md quotes:

* ``minilm``: all-MiniLM-L6-v2 (real weights, offline) with 1, 2 and 3 of its 6 layers removed.
  The searched subset's held-out embedding cosine is compared with the best of all subsets
  (exhaustive), and the exported model (reloaded by transformers alone) is timed against the
  full model: its latency ratio should follow its depth ratio.
* ``digits``: the digits reference ResNet (ResNet-34 block layout) and ViT at 30% and 50% latency reduction (latency
  targets from the per-block table measured on this machine): held-out accuracy of the dipgo
  plan vs weight-norm importance, dropping the last blocks and random, in the same run.

    python scripts/bench_depth.py --out docs/results/depth.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench_out/depth.json")
    p.add_argument("--runs-root", default="bench_out/runs")
    p.add_argument("--parts", nargs="+", default=["minilm", "digits"], choices=["minilm", "digits"])
    p.add_argument("--removed", type=int, nargs="+", default=[1, 2, 3], help="MiniLM layers to remove")
    p.add_argument("--reductions", type=float, nargs="+", default=[0.3, 0.5], help="digits latency reductions")
    p.add_argument("--latency-runs", type=int, default=20)
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides for every search")
    return p.parse_args()


def search(recipe: str, target: float, runs_root: Path, overrides: list[str]) -> object:
    from dipgo.search.compose import compose_config
    from dipgo.search.run import run_search

    cfg, _ = compose_config([f"recipe={recipe}", f"search.target={target}", f"runs_root={runs_root}",
                             "logger.wandb=false", *overrides])
    t0 = time.perf_counter()
    result = run_search(cfg, quiet=True)
    print(f"{recipe} target {target}: {time.perf_counter() - t0:.0f}s  {result.run_dir}")
    for line in result.summary:
        print("  " + line)
    return cfg, result


def minilm_part(args: argparse.Namespace, runs_root: Path) -> list[dict]:
    from dipgo.measure.latency import compare_latency, speedup
    from dipgo.models.io import encoder_output, outputs
    from dipgo.models.registry import load_model
    from dipgo.postprocess.block_subnet import load_block_subnet
    from dipgo.report.block_eval import eval_data, exhaustive_subsets

    rows = []
    loaded = load_model("minilm")
    for k in args.removed:
        target = 1.0 - k / 6 + 0.01  # layers are ~1/6 of the MACs each; embeddings and pooler almost free
        cfg, result = search("minilm_depth", target, runs_root, args.overrides)
        dipgo = next(v for v in result.report["variants"] if v["name"] == "dipgo")
        data = eval_data(loaded, cfg)
        ref = outputs(loaded.model, "encoder", data)
        blocks = result.plan.blocks
        table = exhaustive_subsets(loaded, blocks, len(dipgo["removed"]), data, ref)
        exported = load_block_subnet(result.report["subnet_dir"]).eval()
        batch = {key: v[:32] for key, v in data.items()}
        timings = compare_latency({"full": lambda b=batch: encoder_output(loaded.model, b),
                                   "exported": lambda m=exported, b=batch: encoder_output(m, b)},
                                  warmup=3, runs=args.latency_runs)
        latency_ratio = timings["exported"].median_s / timings["full"].median_s
        depth_ratio = (len(blocks) - len(dipgo["removed"])) / len(blocks)
        rows.append({
            "removed_layers": k,
            "target_macs": round(target, 4),
            "searched_removed": dipgo["removed"],
            "searched_cosine": dipgo["cosine"],
            "best_removed": table[0]["removed"],
            "best_cosine": table[0]["cosine"],
            "worst_cosine": table[-1]["cosine"],
            "searched_rank": 1 + [r["removed"] for r in table].index(sorted(dipgo["removed"], key=blocks.index)),
            "subsets": len(table),
            "within_1pct_of_best": dipgo["cosine"] >= 0.99 * table[0]["cosine"],
            "baselines": {v["name"]: v["cosine"] for v in result.report["variants"] if v["name"] not in ("full", "dipgo")},
            "latency_ratio": latency_ratio,
            "depth_ratio": depth_ratio,
            "latency_matches_depth_10pct": abs(latency_ratio - depth_ratio) <= 0.1 * depth_ratio,
            "speedup_exported": speedup(timings["full"], timings["exported"]),
            "exported_class": f"{type(exported).__module__}.{type(exported).__name__}",
            "search_seconds": result.report["search_seconds"],
            "run_dir": str(result.run_dir),
        })
        print(json.dumps(rows[-1], indent=1))
    return rows


def digits_part(args: argparse.Namespace, runs_root: Path) -> list[dict]:
    rows = []
    for recipe in ("digits_resnet_depth", "digits_vit_depth"):
        for reduction in args.reductions:
            _, result = search(recipe, round(1.0 - reduction, 4), runs_root, args.overrides)
            variants = {v["name"]: v for v in result.report["variants"]}
            full_acc = variants["full"]["accuracy"]
            rows.append({
                "recipe": recipe,
                "latency_reduction": reduction,
                "variants": {n: {"removed": v["removed"], "accuracy": v["accuracy"], "accuracy_drop": full_acc - v["accuracy"],
                                 "agreement": v["agreement"], "kl": v["kl"], "cost_ratio": v["cost_ratio"],
                                 "speedup": v["speedup"]} for n, v in variants.items()},
                "dipgo_smaller_drop_than": {n: variants["dipgo"]["accuracy"] > v["accuracy"] or
                                            (variants["dipgo"]["accuracy"] == v["accuracy"] and variants["dipgo"]["kl"] < v["kl"])
                                            for n, v in variants.items() if n not in ("full", "dipgo")},
                "run_dir": str(result.run_dir),
            })
    return rows


def main() -> None:
    args = parse_args()
    runs_root = Path(args.runs_root) / f"depth-{time.strftime('%Y%m%d-%H%M%S')}"
    payload: dict = {
        "command": "python scripts/bench_depth.py " + " ".join(["--out", args.out, "--parts", *args.parts, *args.overrides]),
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "threads": torch.get_num_threads(), "torch": torch.__version__},
    }
    if "minilm" in args.parts:
        payload["minilm"] = minilm_part(args, runs_root)
    if "digits" in args.parts:
        payload["digits"] = digits_part(args, runs_root)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2))
    print(f"written: {out}")


if __name__ == "__main__":
    main()
