"""``dipgo search -m``: a Hydra multirun, one search per point, all under one sweep folder.

The sweep is expanded with Hydra's own grammar (``a=1,2 b=range(3)``, ``choice``, globs) and
every point is composed and validated *before* anything is launched or created: an invalid point
is reported in one sentence and left out, the others run. The valid points go to the launcher
the config names (``hydra/launcher=basic`` by default; ``submitit_local`` / ``submitit_slurm``
or ``configs/hydra/launcher/dipgo_slurm.yaml`` with ``hydra-submitit-launcher``), so every
Hydra launcher plugin works unchanged. Point ``i`` runs in ``<sweep dir>/<i>/``, a normal run
folder; a point that fails at run time prints one sentence and the others go on.

    <runs_root>/<recipe>/sweep-<timestamp>/
        0/ 1/ ...       run folders (config.yaml, plan.json, report.json, .hydra/)
        sweep.json      every point: overrides, status, run folder or error
        pareto.md/.png  the aggregate of the finished points (``dipgo report`` redoes it)
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import sys
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from dipgo.errors import ConfigError, one_line, user_errors
from dipgo.search.compose import CONFIG_MODULE, compose_config, explain_hydra_error, validate_config

SWEEP_FILE = "sweep.json"
JOB_NAME = "dipgo_search"
# launcher options of Hydra plugins -> the PyPI package (and module) that provides them
LAUNCHER_PLUGINS: dict[str, tuple[str, str]] = {
    "submitit_local": ("hydra-submitit-launcher", "hydra_plugins.hydra_submitit_launcher"),
    "submitit_slurm": ("hydra-submitit-launcher", "hydra_plugins.hydra_submitit_launcher"),
    "dipgo_slurm": ("hydra-submitit-launcher", "hydra_plugins.hydra_submitit_launcher"),
    "joblib": ("hydra-joblib-launcher", "hydra_plugins.hydra_joblib_launcher"),
    "ray": ("hydra-ray-launcher", "hydra_plugins.hydra_ray_launcher"),
    "ray_aws": ("hydra-ray-launcher", "hydra_plugins.hydra_ray_launcher"),
    "rq": ("hydra-rq-launcher", "hydra_plugins.hydra_rq_launcher"),
}


@dataclass
class SweepResult:
    """What a sweep left behind: its folder and one entry per point (also in ``sweep.json``)."""

    sweep_dir: Path
    points: list[dict[str, Any]] = field(default_factory=list)
    group: str = ""  # the W&B group of its runs
    logger: Any = None  # the sweep's logger config (for the sweep-level W&B report)

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [p for p in self.points if p["status"] != "ok"]


def parse_sweep(overrides: Sequence[str]) -> tuple[list[str], list[str], list[list[str]], list[str]]:
    """Split command-line overrides into (hydra overrides, fixed task overrides, points, swept keys).

    ``points`` is the cartesian product of the swept values, each a full list of task overrides.
    """
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except HydraException as exc:
        raise ConfigError(explain_hydra_error(exc)) from None
    hydra_ov = [o for o in parsed if o.is_hydra_override()]
    for o in hydra_ov:
        if o.is_sweep_override():
            raise ConfigError(f"cannot sweep over Hydra's own settings ({o.input_line}); sweep dipgo keys such as search.target=0.2,0.3")
    task = [o for o in parsed if not o.is_hydra_override()]
    swept = [o.get_key_element() for o in task if o.is_sweep_override()]
    fixed = [o.input_line for o in task if not o.is_sweep_override()]
    points = [list(p) for batch in BasicSweeper.split_arguments(task, None) for p in batch]
    return [o.input_line for o in hydra_ov], fixed, points, swept


def check_launcher(hydra_overrides: Sequence[str]) -> None:
    """Refuse a launcher whose plugin is not installed, naming the package to install."""
    for line in hydra_overrides:
        key, _, value = line.lstrip("+~").partition("=")
        if key not in ("hydra/launcher", "hydra.launcher") or "/" in value:
            continue
        package, module = LAUNCHER_PLUGINS.get(value, ("", ""))
        if module and importlib.util.find_spec(module.split(".")[0]) is not None:
            try:
                found = importlib.util.find_spec(module) is not None
            except ModuleNotFoundError:
                found = False
        else:
            found = not module
        if not found:
            extra = " (or pip install 'dipgo[cluster]')" if package == "hydra-submitit-launcher" else ""
            raise ConfigError(
                f"hydra/launcher={value} needs the Hydra launcher plugin from the {package} package, which is not "
                f"installed: pip install {package}{extra}"
            )


def point_label(point: Sequence[str], swept: Sequence[str]) -> str:
    """The swept part of a point's overrides (``search.target=0.3 seed=1``)."""
    keys = set(swept)
    chosen = [o for o in point if o.partition("=")[0].lstrip("+~") in keys]
    return " ".join(chosen or point)


def sweep_dir_for(runs_root: str, recipe_name: str) -> Path:
    """A sweep folder name that does not exist yet (``sweep-<timestamp>[-i]``); created later."""
    parent = Path(runs_root).resolve() / recipe_name
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    for suffix in [""] + [f"-{i}" for i in range(1, 1000)]:
        path = parent / f"sweep-{stamp}{suffix}"
        if not path.exists():
            return path
    raise RuntimeError(f"could not find a free sweep folder under {parent}")


def _quote(value: str) -> str:
    """A Hydra override value for an arbitrary path."""
    if all(c.isalnum() or c in "/._-:+" for c in value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def run_multirun(overrides: Sequence[str], *, quiet: bool = False) -> SweepResult:
    """Validate every point, launch the valid ones with the configured launcher, aggregate."""
    hydra_ov, fixed, points, swept = parse_sweep(overrides)
    check_launcher(hydra_ov)
    base, _ = compose_config(fixed)  # one sentence for a bad fixed override, before anything exists
    recipe_swept = any(k == "recipe" for k in swept)
    sweep_dir = sweep_dir_for(base.runs_root, "sweeps" if recipe_swept else base.recipe_name)
    group = base.logger.group or f"{'sweeps' if recipe_swept else base.recipe_name}/{sweep_dir.name}"

    records: list[dict[str, Any]] = []
    valid: list[tuple[int, list[str]]] = []
    for i, point in enumerate(points):
        label = point_label(point, swept)
        try:
            compose_config(point)
        except ConfigError as exc:
            records.append({"point": i, "overrides": point, "label": label, "status": "invalid", "error": str(exc)})
            print(f"dipgo search: point {i} ({label}) is invalid and is skipped: {exc}", file=sys.stderr)
            continue
        valid.append((i, point))
    if not valid:
        raise ConfigError(f"every point of the sweep is invalid ({len(points)} points); nothing was run")

    task = functools.partial(sweep_point, swept=tuple(swept), group=group, quiet=quiet)
    returns = _launch([*hydra_ov, *fixed], sweep_dir, valid, task)
    for (i, point), ret in zip(valid, returns):
        records.append(_record(i, point, point_label(point, swept), ret))
    records.sort(key=lambda r: r["point"])
    result = SweepResult(sweep_dir, records, group, base.logger)
    _write_json(sweep_dir / SWEEP_FILE, {"sweep_dir": str(sweep_dir), "group": group, "swept": swept, "points": records})
    return result


def _launch(base_ov: list[str], sweep_dir: Path, valid: list[tuple[int, list[str]]], task: Any) -> list[Any]:
    """Hand the points to the launcher the config names, as Hydra's own sweeper would.

    ``base_ov``: the Hydra overrides (launcher...) and the fixed task overrides; each point's
    own list repeats the fixed ones (Hydra composes a job from the Hydra overrides + the job's).
    """
    from hydra import initialize_config_module
    from hydra._internal.callbacks import Callbacks
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.plugins import Plugins
    from hydra.errors import HydraException
    from hydra.types import HydraContext, RunMode
    from omegaconf.errors import OmegaConfBaseException

    from dipgo.search.config import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    sweep_ov = [f"hydra.sweep.dir={_quote(str(sweep_dir))}", "hydra.sweep.subdir=${hydra.job.num}"]
    if not any(o.lstrip("+~").startswith("hydra/hydra_logging") for o in base_ov):
        sweep_ov.append("hydra/hydra_logging=none")  # dipgo names the points itself (by their own numbers)
    try:
        with initialize_config_module(CONFIG_MODULE, version_base="1.3", job_name=JOB_NAME):
            hydra = GlobalHydra.instance().hydra
            assert hydra is not None
            try:
                cfg = hydra.compose_config("config", [*sweep_ov, *base_ov], run_mode=RunMode.MULTIRUN,
                                           with_log_configuration=True)
                context = HydraContext(config_loader=hydra.config_loader, callbacks=Callbacks(cfg))
                launcher = Plugins.instance().instantiate_launcher(hydra_context=context, task_function=task, config=cfg)
            except (HydraException, OmegaConfBaseException, ImportError) as exc:
                raise ConfigError(explain_hydra_error(exc)) from None
            sweep_dir.mkdir(parents=True, exist_ok=False)
            name = OmegaConf.select(cfg, "hydra.runtime.choices").get("hydra/launcher", "basic")
            print(f"dipgo search: sweep {sweep_dir}: {len(valid)} points, hydra/launcher={name}", flush=True)
            OmegaConf.save(cfg, sweep_dir / "multirun.yaml")
            # the point's own number names its folder, also when invalid points were left out
            jobs = [[*point, f"hydra.sweep.subdir={i}"] for i, point in valid]
            return list(launcher.launch(jobs, initial_job_idx=0))
    finally:
        GlobalHydra.instance().clear()


def _record(i: int, point: list[str], label: str, ret: Any) -> dict[str, Any]:
    from hydra.core.utils import JobStatus

    record: dict[str, Any] = {"point": i, "overrides": point, "label": label}
    if ret.status == JobStatus.COMPLETED and isinstance(ret.return_value, dict):
        record.update(ret.return_value)
    else:  # the task function catches everything; this is a launcher-level failure
        error = one_line(ret._return_value) if ret.status == JobStatus.FAILED else "the job returned nothing"
        record.update({"status": "failed", "error": error})
        print(f"dipgo search: point {i} ({label}) failed: {error}", file=sys.stderr)
    return record


def sweep_point(cfg: DictConfig, *, swept: tuple[str, ...], group: str, quiet: bool) -> dict[str, Any]:
    """The task of one point (runs inside the launcher: here, a subprocess or a Slurm job).

    Never raises: a failure is one sentence on stderr (plus a traceback for genuine bugs) and a
    returned record, so the launcher lets the other points finish.
    """
    from hydra.core.hydra_config import HydraConfig

    from dipgo.search.run import run_search

    hc = HydraConfig.get()
    job_dir = Path(hc.runtime.output_dir)
    point = [o for o in hc.overrides.task]
    label = point_label(point, swept)
    name = f"point {job_dir.name} ({label})"
    try:
        validate_config(cfg)
        with open_dict(cfg):
            cfg.run_dir = str(job_dir)
            if not cfg.logger.group:
                cfg.logger.group = group
        with _plain_command_for_ddp_workers(point, quiet):
            result = run_search(cfg, quiet=quiet, job_dir=job_dir)
    except user_errors() as exc:
        return _failed(name, job_dir, one_line(exc))
    except Exception as exc:  # a bug: keep its traceback in the job's log, one sentence on stderr
        traceback.print_exc()
        return _failed(name, job_dir, f"{type(exc).__name__}: {one_line(exc)}")
    if result.report:
        print("\n".join(["", f"dipgo search: {name}: {result.run_dir}", *result.summary]))
    return {"status": "ok", "run_dir": str(result.run_dir)}


class _plain_command_for_ddp_workers:
    """While a point runs, make Lightning's DDP launcher start its workers as ``dipgo search
    <this point's overrides>`` (they join this run folder) instead of re-running the whole sweep."""

    def __init__(self, point: list[str], quiet: bool):
        self.argv = [sys.argv[0], "search", *point, *(["--quiet"] if quiet else [])]

    def __enter__(self) -> None:
        from hydra.core.hydra_config import HydraConfig

        self.saved_argv, self.saved_cfg, self.saved_env = sys.argv, HydraConfig.instance().cfg, dict(os.environ)
        sys.argv = self.argv
        HydraConfig.instance().cfg = None  # Lightning's Hydra-specific worker command would rerun the sweep

    def __exit__(self, *exc: object) -> None:
        import torch.distributed as dist
        from hydra.core.hydra_config import HydraConfig

        sys.argv = self.saved_argv
        HydraConfig.instance().cfg = self.saved_cfg
        # the next point of a local sweep starts its own DDP workers: no process group or rendezvous
        # variables (MASTER_PORT, the run folder) may leak from this one
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        os.environ.clear()
        os.environ.update(self.saved_env)


def _failed(name: str, job_dir: Path, error: str) -> dict[str, Any]:
    print(f"dipgo search: {name} failed: {error}", file=sys.stderr, flush=True)
    _write_json(job_dir / "error.json", {"error": error})
    return {"status": "failed", "error": error, "run_dir": str(job_dir)}


def _write_json(path: Path, data: Any) -> None:
    from dipgo.files import write_json_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, json.loads(json.dumps(data, default=str)))


def sweep_summary_lines(result: SweepResult) -> list[str]:
    done = len(result.points) - len(result.failed)
    lines = [f"dipgo search: sweep {result.sweep_dir}: {done} of {len(result.points)} points finished"]
    lines += [f"  point {p['point']} ({p['label']}) {p['status']}: {p['error']}" for p in result.failed]
    return lines

