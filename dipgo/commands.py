"""The bodies of the ``dipgo`` subcommands (argument parsing lives in :mod:`dipgo.cli`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from dipgo.errors import ConfigError


def cmd_search(args: argparse.Namespace) -> int:
    from dipgo.search.compose import compose_config, to_yaml

    if getattr(args, "multirun", False):
        return _multirun(args)
    try:
        cfg, choices = compose_config(args.overrides)
    except ConfigError as exc:
        if str(exc).startswith("Ambiguous value for argument"):
            raise ConfigError(f"{str(exc).split(chr(39))[1]} gives several values, a sweep: run it with `dipgo search -m ...`") from None
        raise
    if args.cfg:
        print(to_yaml(cfg), end="")
        return 0
    from dipgo.search.run import run_search

    result = run_search(cfg, quiet=args.quiet)
    if result.report:  # DDP workers other than rank 0 return no report and print nothing
        print("\n".join(["", f"dipgo search: {result.run_dir}", *result.summary]))
    return 0


def _multirun(args: argparse.Namespace) -> int:
    """``dipgo search -m``: every point of the sweep, then the sweep's Pareto table.

    Exit code 0 when every point finished, 1 when some failed (each named in one sentence).
    """
    import sys

    from dipgo.search.sweep import parse_sweep, point_label, run_multirun, sweep_summary_lines

    if args.cfg:
        _, _, points, swept = parse_sweep(args.overrides)
        for i, point in enumerate(points):
            print(f"{i}: {point_label(point, swept)}")
        return 0
    result = run_multirun(args.overrides, quiet=args.quiet)
    if len(result.failed) < len(result.points):
        from dipgo.report.summary import aggregate_runs

        try:
            table, outputs = aggregate_runs(result.sweep_dir, result.sweep_dir)
        except FileNotFoundError:
            outputs = {}  # finished points without a comparable fidelity metric
        if outputs:
            from dipgo.search.tracking import log_sweep_report

            print("\n" + table)
            for name, out in outputs.items():
                print(f"{name}: {out}")
            try:
                log_sweep_report(result.logger, result.sweep_dir, result.group, outputs)
            except Exception as exc:  # the sweep itself is done; W&B trouble must not hide that
                print(f"dipgo search: the sweep report was not logged to W&B: {exc}", file=sys.stderr)
    lines = sweep_summary_lines(result)
    print(lines[0])
    for line in lines[1:]:
        print(line, file=sys.stderr)
    return 1 if result.failed else 0


def _load_run(run_dir: str | Path) -> tuple[Any, Any, Path]:
    """(config, plan, run_dir) of a finished run; one-sentence errors otherwise."""
    from omegaconf import OmegaConf

    from dipgo.postprocess.plan import Plan
    from dipgo.search.compose import compose_config, load_saved_config

    path = Path(run_dir)
    if not (path / "config.yaml").is_file():
        raise ConfigError(f"{path} is not a dipgo run directory (no config.yaml in it)")
    if not (path / "plan.json").is_file():
        raise ConfigError(f"{path} has no plan.json: the search did not finish (resume it with `dipgo search resume={path}`)")
    base, _ = compose_config()
    cfg = OmegaConf.merge(base, load_saved_config(path / "config.yaml"))
    return cfg, Plan.load(path / "plan.json"), path


def cmd_bench(args: argparse.Namespace) -> int:
    from dipgo.files import write_json_atomic
    from dipgo.report.kinds import get_reporter
    from dipgo.search.tasks import get_task

    cfg, plan, run_dir = _load_run(args.run_dir)
    reporter = get_reporter(plan.kind, get_task(plan.kind, cfg).variant)
    extra = {}
    if getattr(args, "compile", False):
        if plan.kind != "reuse":
            raise ConfigError(f"--compile is for reuse plans (regional compile of the gated blocks); this plan is {plan.kind!r}")
        extra["compile"] = True
    result = reporter.bench(cfg, plan, runs=args.runs, warmup=args.warmup, batch=args.batch, threads=args.threads, **extra)
    out = Path(args.out) if args.out else run_dir / "bench.json"
    write_json_atomic(out, result)
    for line in reporter.bench_lines(result):
        print(line)
    print(f"written: {out}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from dipgo.report.summary import aggregate_runs, single_run_lines

    path = Path(args.path)
    if not path.exists():
        raise FileNotFoundError(2, "not found", str(path))
    if (path / "report.json").is_file():
        for line in single_run_lines(path):
            print(line)
        return 0
    table, outputs = aggregate_runs(path, Path(args.out) if args.out else path)
    print(table)
    for name, out in outputs.items():
        print(f"{name}: {out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from dipgo.search.tasks import get_task

    cfg, plan, _ = _load_run(args.run_dir)
    out = Path(args.out)
    if out.exists():
        raise ConfigError(f"--out {out} already exists; export never overwrites a folder")
    path = get_task(plan.kind, cfg).export(cfg, plan, out)
    print(f"exported {plan.kind} SubNet to {path}")
    return 0

