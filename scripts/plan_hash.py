"""Hash of a plan.json without its timings, to check that a refactor leaves searches unchanged.

A search writes how long it took (``meta.search_seconds`` and other ``*_seconds`` keys) into the
plan; everything else (the compute grid or kept row, costs, payload, refinement history) is
deterministic given the config and seed. Two runs of the same recipe on two versions of the code
that print the same hash wrote the same plan::

    dipgo search recipe=digits_unet_reuse trainer.max_steps=3 run_dir=/tmp/before/reuse ...
    python scripts/plan_hash.py /tmp/before/reuse/plan.json /tmp/after/reuse/plan.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path
from typing import Any


def without_timings(node: Any) -> Any:
    """``node`` with every ``*_seconds`` key removed, at any depth."""
    if isinstance(node, dict):
        return {k: without_timings(v) for k, v in node.items() if not k.endswith("_seconds")}
    if isinstance(node, list):
        return [without_timings(v) for v in node]
    return node


def plan_hash(path: str | Path) -> str:
    """SHA-256 of the plan's canonical JSON (sorted keys) without timings."""
    data = without_timings(json.loads(Path(path).read_text()))
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("plans", nargs="+", help="plan.json files")
    args = parser.parse_args(argv)
    hashes = [plan_hash(p) for p in args.plans]
    for p, h in zip(args.plans, hashes):
        print(f"{h[:16]}  {p}")
    return 0 if len(set(hashes)) == 1 else 1


if __name__ == "__main__":
    raise SystemExit(main())
