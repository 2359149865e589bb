"""``dipgo report``: one run's summary, or a folder of runs as a table and a Pareto plot.

A folder of runs (a sweep, or ``runs/<recipe>/``) is read from the ``report.json`` files under
it; every variant of every run (the dipgo plan and its baselines) becomes a point of speedup vs
fidelity, and the Pareto-optimal ones are marked in the table and the plot.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dipgo.postprocess.plan import write_json_atomic


def _load(path: Path) -> dict[str, Any]:
    return json.loads((path / "report.json").read_text())


def single_run_lines(run_dir: Path) -> list[str]:
    """The end-of-search summary of a finished run, read back from its report.json."""
    from dipgo.search.tasks import get_task

    report = _load(run_dir)
    lines = [f"run: {run_dir}"]
    lines += get_task(report.get("kind", "reuse")).summary_lines(report)
    return lines


def find_runs(root: Path) -> list[Path]:
    """Run directories (folders holding a report.json) under ``root``, sorted."""
    return sorted(p.parent for p in root.rglob("report.json"))


def collect_points(root: Path, fidelity_key: str = "psnr") -> list[dict[str, Any]]:
    """One point per (run, variant) with speedup and the chosen fidelity metric."""
    points = []
    for run_dir in find_runs(root):
        report = _load(run_dir)
        for v in report.get("variants", []):
            if v["name"] == "full":
                continue
            fid = v.get(fidelity_key)
            points.append(
                {
                    "run": str(run_dir.relative_to(root)) if run_dir != root else run_dir.name,
                    "name": f"{report.get('target', '?')}" if v["name"] == "dipgo" else "",
                    "group": v["name"],
                    "variant": v["name"],
                    "target": report.get("target"),
                    "macs_ratio": v.get("macs_ratio"),
                    "speedup": v.get("speedup"),
                    "fidelity": float("inf") if fid == "inf" else fid,
                    "fd": v.get("fd"),
                }
            )
    return [p for p in points if p["speedup"] is not None and p["fidelity"] is not None]


def aggregate_runs(root: Path, out_dir: Path, fidelity_key: str = "psnr") -> tuple[str, dict[str, Path]]:
    """Table (markdown) + Pareto plot + JSON of every run under ``root``."""
    from dipgo.report.plots import pareto_front, pareto_plot

    points = collect_points(root, fidelity_key)
    if not points:
        raise FileNotFoundError(2, "no finished runs (report.json) found under", str(root))
    front = pareto_front(points)
    for p, on in zip(points, front):
        p["pareto"] = bool(on)
    rows = sorted(points, key=lambda p: (-(p["speedup"] or 0)))
    header = f"| run | variant | target | MACs | speedup | {fidelity_key} | FD | Pareto |\n|---|---|---|---|---|---|---|---|"
    body = [
        f"| {p['run']} | {p['variant']} | {_f(p['target'], '.2f')} | {_f(p['macs_ratio'], '.1%')} | "
        f"{p['speedup']:.2f}x | {_f(p['fidelity'], '.2f')} | {_f(p['fd'], '.2f')} | {'*' if p['pareto'] else ''} |"
        for p in rows
    ]
    table = "\n".join([header, *body])
    out_dir.mkdir(parents=True, exist_ok=True)
    outputs = {
        "table": _write_text(out_dir / "pareto.md", table + "\n"),
        "json": write_json_atomic(out_dir / "pareto.json", rows),
        "plot": pareto_plot(points, out_dir / "pareto.png", fidelity_label=f"{fidelity_key} vs full model"),
    }
    return table, outputs


def _f(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _write_text(path: Path, text: str) -> Path:
    from dipgo.postprocess.plan import write_bytes_atomic

    return write_bytes_atomic(path, text.encode())
