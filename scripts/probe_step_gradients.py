"""Does the straight-through gradient predict what opening or closing a whole step really does?

At the evenly spaced whole-steps schedule of a budget (the pruner's ``init=prior`` start), with
one gate per step (``supernet.step_gates=true``, the units all open), this script takes the
gradient of the calibration distortion (MSE of the final samples to the full model's) with
respect to every step gate, i.e. the first-order change of opening a closed step or closing a
full one, and compares it with the change measured by running each one-step change as a hard
trajectory. It writes JSON: per step the two numbers, the rank correlation over the closed steps
and how many signs agree.

    python scripts/probe_step_gradients.py --recipe digits_unet_reuse_dpm25 --target 0.2 \\
        --out docs/results/probe_step_gradients_unet_dpm25_0.2.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", required=True)
    p.add_argument("--target", type=float, required=True)
    p.add_argument("--batch", type=int, default=16, help="calibration items (the first of the pool)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, required=True)
    return p.parse_args()


def main() -> None:
    from scipy.stats import spearmanr

    from dipgo.measure.machine import machine_record
    from dipgo.models.configured import load_configured_model
    from dipgo.postprocess.reuse_refine import PlanSampler
    from dipgo.search.compose import compose_config
    from dipgo.search.data import collate
    from dipgo.search.reuse_task import build_reuse_supernet, calibration_pool

    args = parse_args()
    torch.set_num_threads(args.threads)
    cfg, _ = compose_config([f"recipe={args.recipe}", f"search.target={args.target}", "supernet.step_gates=true"])
    loaded = load_configured_model(cfg)
    sn = build_reuse_supernet(loaded, cfg)
    pool = calibration_pool(loaded, cfg)
    batch = collate([pool[i] for i in range(min(args.batch, len(pool)))])
    batch.pop("index")
    reference = sn.reference(batch)["output"]
    steps, units = sn.num_steps, len(sn.units)
    full = set(sn.evenly_spaced_start(args.target))
    n_unit_gates = (steps - 1) * units
    gates = torch.ones(len(sn.slots), dtype=torch.float64)  # unit gates open: the step gates carry the plan
    for s in range(1, steps):
        gates[n_unit_gates + s - 1] = float(s in full)
    gates.requires_grad_(True)
    t0 = time.perf_counter()
    soft = ((sn.gated(batch, gates)["output"] - reference) ** 2).mean()
    soft.backward()
    grad = gates.grad[n_unit_gates:].detach()
    grad_s = time.perf_counter() - t0

    sampler = PlanSampler(sn, batch)

    def mse(rows: set[int]) -> float:
        out = sampler([[s in rows] * units for s in range(steps)])
        return float(((out - reference) ** 2).mean())

    base = mse(full)
    rows = []
    for s in range(1, steps):
        changed = full - {s} if s in full else full | {s}
        exact = mse(changed) - base
        first_order = float(grad[s - 1]) * (-1.0 if s in full else 1.0)
        rows.append({"step": s, "full": s in full, "exact": exact, "first_order": first_order})
    opened = [r for r in rows if not r["full"]]
    closed = [r for r in rows if r["full"]]
    sign = lambda rs: sum((r["exact"] > 0) == (r["first_order"] > 0) for r in rs)  # noqa: E731
    result = {
        "command": f"python scripts/probe_step_gradients.py --recipe {args.recipe} --target {args.target} "
                   f"--batch {args.batch} --out {args.out}",
        "machine": {**machine_record(), "threads": torch.get_num_threads()},
        "recipe": args.recipe, "target": args.target, "full_steps": sorted(full),
        "soft_path_mse": float(soft), "hard_path_mse": base, "gradient_seconds": round(grad_s, 2),
        "open_a_step": {"spearman": float(spearmanr([r["exact"] for r in opened], [r["first_order"] for r in opened])[0]),
                        "signs_agree": sign(opened), "steps": len(opened),
                        "hurts_when_opened": sum(r["exact"] > 0 for r in opened)},
        "close_a_full_step": {"signs_agree": sign(closed), "steps": len(closed)},
        "steps": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k not in ("steps", "machine")}, indent=1))
    sn.remove()


if __name__ == "__main__":
    main()
