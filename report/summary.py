"""``dipgo report``: one run's summary, or a folder of runs as a table and a Pareto plot.

A folder of runs (a sweep, or ``runs/<recipe>/``) is read from the ``report.json`` files under
it; every variant of every run (the dipgo plan and its baselines) becomes a point of speedup vs
fidelity, and the Pareto-optimal ones are marked in the table and the plot. A ``dipgo search -m``
sweep folder names each run by the overrides that vary across its points (from Hydra's
``.hydra/overrides.yaml``) and lists the points that failed (from ``sweep.json``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dipgo.files import write_json_atomic


def _load(path: Path) -> dict[str, Any]:
    return json.loads((path / "report.json").read_text())


def single_run_lines(run_dir: Path) -> list[str]:
    """The end-of-search summary of a finished run, read back from its report.json."""
    from dipgo.report.kinds import get_reporter

    report = _load(run_dir)
    lines = [f"run: {run_dir}"]
    lines += get_reporter(report.get("kind", "reuse"), report.get("joint_variant")).summary_lines(report)
    return lines


def find_runs(root: Path) -> list[Path]:
    """Run directories (folders holding a report.json) under ``root``, sorted."""
    return sorted(p.parent for p in root.rglob("report.json"))


def collect_points(root: Path, fidelity_key: str | None = None) -> list[dict[str, Any]]:
    """One point per (run, variant) with speedup and a fidelity metric: ``fidelity_key``, or each
    report's own (``fidelity_metric``: PSNR for reuse runs, accuracy or cosine for block runs)."""
    points = []
    runs = find_runs(root)
    labels = run_labels(root, runs)
    for run_dir in runs:
        report = _load(run_dir)
        key = fidelity_key or report.get("fidelity_metric", "psnr")
        for v in report.get("variants", []):
            if v["name"] == "full":
                continue
            fid = v.get(key)
            points.append(
                {
                    "run": labels[run_dir],
                    "name": f"{report.get('target', '?')}" if v["name"] == "dipgo" else "",
                    "group": v["name"],
                    "variant": v["name"],
                    "target": report.get("target"),
                    "macs_ratio": v.get("macs_ratio"),
                    "speedup": v.get("speedup"),
                    "fidelity": float("inf") if fid == "inf" else fid,
                    "fd": v.get("fd"),
                    "metric": key,
                }
            )
    return [p for p in points if p["speedup"] is not None and p["fidelity"] is not None]


def _overrides(run_dir: Path) -> list[str]:
    """The Hydra overrides a sweep point ran with (empty for a plain run)."""
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    from omegaconf import OmegaConf

    loaded = OmegaConf.to_container(OmegaConf.load(path))
    return [str(o) for o in loaded] if isinstance(loaded, list) else []


def run_labels(root: Path, runs: list[Path]) -> dict[Path, str]:
    """``0 (search.target=0.2)``: a run's folder below ``root`` plus the overrides that differ between runs."""
    overrides = {r: dict(o.partition("=")[::2] for o in _overrides(r)) for r in runs}
    keys = sorted({k for o in overrides.values() for k in o})
    varying = [k for k in keys if len({o.get(k) for o in overrides.values()}) > 1]
    labels = {}
    for r in runs:
        name = str(r.relative_to(root)) if r != root else r.name
        chosen = " ".join(f"{k}={overrides[r][k]}" for k in varying if k in overrides[r])
        labels[r] = f"{name} ({chosen})" if chosen else name
    return labels


def failed_points(root: Path) -> list[str]:
    """One line per failed point of the sweeps under ``root`` (their ``sweep.json``)."""
    lines = []
    for path in sorted(root.rglob("sweep.json")):
        data = json.loads(path.read_text())
        where = path.parent.relative_to(root) if path.parent != root else Path(path.parent.name)
        for p in data.get("points", []):
            if p.get("status") != "ok":
                lines.append(f"{where}/{p['point']} ({p.get('label', '')}) {p['status']}: {p.get('error', '')}")
    return lines


def aggregate_runs(root: Path, out_dir: Path, fidelity_key: str | None = None) -> tuple[str, dict[str, Path]]:
    """Table (markdown) + Pareto plot + JSON of every run under ``root``."""
    from dipgo.report.plots import pareto_front, pareto_plot

    points = collect_points(root, fidelity_key)
    if not points:
        raise FileNotFoundError(_no_runs_message(root))  # no filename: the CLI prints this sentence as is
    front = pareto_front(points)
    for p, on in zip(points, front):
        p["pareto"] = bool(on)
    rows = sorted(points, key=lambda p: (-(p["speedup"] or 0)))
    metric = fidelity_key or " / ".join(dict.fromkeys(p["metric"] for p in points))
    header = f"| run | variant | target | MACs | speedup | {metric} | FD | Pareto |\n|---|---|---|---|---|---|---|---|"
    body = [
        f"| {p['run']} | {p['variant']} | {_f(p['target'], '.2f')} | {_f(p['macs_ratio'], '.1%')} | "
        f"{p['speedup']:.2f}x | {_f(p['fidelity'], '.2f')} | {_f(p['fd'], '.2f')} | {'*' if p['pareto'] else ''} |"
        for p in rows
    ]
    failed = failed_points(root)
    table = "\n".join([header, *body, *(["", "failed points:", *(f"- {f}" for f in failed)] if failed else [])])
    out_dir.mkdir(parents=True, exist_ok=True)
    outputs = {
        "table": _write_text(out_dir / "pareto.md", table + "\n"),
        "json": write_json_atomic(out_dir / "pareto.json", rows),
        "plot": pareto_plot(points, out_dir / "pareto.png", fidelity_label=f"{metric} vs full model"),
    }
    return table, outputs


def _no_runs_message(root: Path) -> str:
    """What is missing under ``root``: finished runs write ``report.json``; unfinished ones only
    ``config.yaml`` (and can be resumed)."""
    unfinished = sorted(p.parent for p in root.rglob("config.yaml") if not (p.parent / "report.json").is_file())
    if unfinished:
        return (f"{root} holds {len(unfinished)} run folder(s) but no finished run (no report.json in any of them; "
                f"a search writes it at its end): resume one with `dipgo search resume={unfinished[0]}`")
    what = "is an empty folder" if not any(root.iterdir()) else "holds no dipgo run"
    return (f"{root} {what}: `dipgo report` needs a run folder (with report.json) or a folder above finished runs "
            "(such as runs/ or a sweep folder)")


def _f(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _write_text(path: Path, text: str) -> Path:
    from dipgo.files import write_bytes_atomic

    return write_bytes_atomic(path, text.encode())
