"""Sweeps and clusters: Hydra multirun (basic and submitit launchers), per-point failures, sweep
aggregation, the Slurm launcher config and the W&B sweep file."""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from dipgo.cli import main
from dipgo.errors import ConfigError
from dipgo.search.compose import compose_config
from dipgo.search.sweep import check_launcher, parse_sweep, point_label
from tests.conftest import tiny_search_overrides

HAS_SUBMITIT = importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is not None


def _dipgo(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_SWEEP_ID")}
    return subprocess.run([sys.executable, "-m", "dipgo", *args], capture_output=True, text=True, cwd=cwd, timeout=900,
                          env=env)


def _tiny(tiny_unet_dir: Path, runs: Path, **extra: object) -> list[str]:
    """Tiny-search overrides without the keys a test sweeps."""
    base = {"report.baselines": "[fewer_steps]", "report.plots": False, "search.refine.max_evals": 4, **extra}
    overrides = tiny_search_overrides(tiny_unet_dir, runs, **base)
    return [o for o in overrides if not o.startswith(("search.target=", "model.name=", "trainer.enable_progress_bar"))]


def test_parse_sweep_expands_the_grid() -> None:
    hydra_ov, fixed, points, swept = parse_sweep(["hydra/launcher=basic", "recipe=digits_unet_reuse",
                                                  "search.target=0.2,0.3", "seed=range(2)"])
    assert hydra_ov == ["hydra/launcher=basic"] and fixed == ["recipe=digits_unet_reuse"]
    assert swept == ["search.target", "seed"]
    assert len(points) == 4 and points[0] == ["recipe=digits_unet_reuse", "search.target=0.2", "seed=0"]
    assert point_label(points[3], swept) == "search.target=0.3 seed=1"
    with pytest.raises(ConfigError, match="cannot sweep over Hydra's own settings"):
        parse_sweep(["hydra.launcher.timeout_min=1,2"])


def test_missing_launcher_plugin_names_the_package(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["search", "-m", "hydra/launcher=joblib", "search.target=0.2,0.3"]) == 2
    err = capsys.readouterr().err.strip()
    assert "hydra/launcher=joblib needs the Hydra launcher plugin from the hydra-joblib-launcher package" in err
    assert "pip install hydra-joblib-launcher" in err and len(err.splitlines()) == 1

    import dipgo.search.sweep as sweep

    monkeypatch.setattr(sweep.importlib.util, "find_spec", lambda name: None)
    for name in ("submitit_slurm", "dipgo_slurm"):
        with pytest.raises(ConfigError, match="pip install hydra-submitit-launcher"):
            check_launcher([f"hydra/launcher={name}"])
    check_launcher(["hydra/launcher=basic"])  # Hydra's own: always there


def test_multirun_fails_bad_points_and_finishes_the_others(tiny_unet_dir: Path, tmp_path: Path) -> None:
    """3 x 2 points: two searches finish; a wrong type and a missing model each fail their points
    with one sentence; the sweep folder aggregates into a Pareto table; exit code 1. The finished
    points log to W&B offline, in one group, with their report as an artifact."""
    overrides = _tiny(tiny_unet_dir, tmp_path / "runs", **{"logger.wandb": True, "trainer.max_steps": 4})
    result = _dipgo("search", "-m", "--quiet", *overrides, "search.target=0.4,0.7,abc",
                    f"model.name={tiny_unet_dir},./no/such/model", cwd=tmp_path)
    assert result.returncode == 1, result.stderr[-3000:]
    sweeps = list((tmp_path / "runs" / "tiny").iterdir())
    assert len(sweeps) == 1 and sweeps[0].name.startswith("sweep-"), sweeps
    sweep_dir = sweeps[0]
    record = json.loads((sweep_dir / "sweep.json").read_text())
    status = {p["label"]: p["status"] for p in record["points"]}
    assert status[f"search.target=0.4 model.name={tiny_unet_dir}"] == "ok"
    assert status[f"search.target=0.7 model.name={tiny_unet_dir}"] == "ok"
    assert status["search.target=0.4 model.name=./no/such/model"] == "failed"
    assert status[f"search.target=abc model.name={tiny_unet_dir}"] == "invalid"
    assert sum(s == "ok" for s in status.values()) == 2 and len(status) == 6
    # one sentence per failed point, naming the point and the problem; no traceback for bad input
    assert "Traceback" not in result.stderr
    assert ("point 1 (search.target=0.4 model.name=./no/such/model) failed: No folder at './no/such/model'"
            in result.stderr), result.stderr[-3000:]
    assert "point 4 (search.target=abc model.name=" in result.stderr and "search.target='abc' is invalid" in result.stderr
    # point i runs in <sweep>/<i>/, a normal run folder; all points share one W&B group
    for i in (0, 2):
        run = sweep_dir / str(i)
        assert (run / "plan.json").is_file() and (run / "report.json").is_file()
        assert OmegaConf.load(run / "config.yaml").logger.group == f"tiny/{sweep_dir.name}"
        (events,) = (run / "wandb").glob("offline-run-*/*.wandb")
        data = events.read_bytes()
        assert f"tiny/{sweep_dir.name}".encode() in data and b"dipgo-run" in data, "W&B group and artifact"
    assert not (sweep_dir / "4").exists(), "an invalid point never gets a folder"
    # the sweep's Pareto table, printed at the end and redone by `dipgo report <sweep dir>`
    assert "search.target=0.4" in result.stdout and (sweep_dir / "pareto.png").is_file()
    (summary_run,) = (sweep_dir / "wandb").glob("offline-run-*/*.wandb")  # the sweep's own W&B report run
    assert b"dipgo-sweep" in summary_run.read_bytes()
    report = _dipgo("report", str(sweep_dir), cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    for label in ("| 0 (search.target=0.4) |", "| 2 (search.target=0.7) |"):
        assert label in report.stdout
    assert "failed points:" in report.stdout and "./no/such/model" in report.stdout
    assert report.stdout.count("| dipgo |") == 2


def test_multirun_of_ddp_searches(tiny_unet_dir: Path, tmp_path: Path) -> None:
    """trainer=ddp inside a local sweep: each point starts its own 2 gloo workers, which join that
    point's folder (not a new sweep), and the next point starts clean."""
    overrides = _tiny(tiny_unet_dir, tmp_path / "runs", **{"model.name": tiny_unet_dir, "trainer.max_steps": 2})
    result = _dipgo("search", "-m", "--quiet", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                    *overrides, "search.target=0.4,0.7", cwd=tmp_path)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    (sweep_dir,) = (tmp_path / "runs" / "tiny").iterdir()
    assert sorted(p.name for p in sweep_dir.iterdir() if p.is_dir()) == ["0", "1"]
    for i in (0, 1):
        assert (sweep_dir / str(i) / "plan.json").is_file()


@pytest.mark.skipif(not HAS_SUBMITIT, reason="hydra-submitit-launcher is not installed (pip install 'dipgo[cluster]')")
def test_submitit_local_launcher_runs_the_points_as_jobs(tiny_unet_dir: Path, tmp_path: Path) -> None:
    """The same sweep through hydra-submitit-launcher's local executor (what Slurm runs, minus sbatch)."""
    overrides = _tiny(tiny_unet_dir, tmp_path / "runs", **{"model.name": tiny_unet_dir})
    result = _dipgo("search", "-m", "--quiet", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10",
                    *overrides, "search.target=0.4,0.7", cwd=tmp_path)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    (sweep_dir,) = (tmp_path / "runs" / "tiny").iterdir()
    assert (sweep_dir / ".submitit").is_dir()
    for i in (0, 1):
        assert (sweep_dir / str(i) / "report.json").is_file()
    record = json.loads((sweep_dir / "sweep.json").read_text())
    assert [p["status"] for p in record["points"]] == ["ok", "ok"]


@pytest.mark.skipif(not HAS_SUBMITIT, reason="hydra-submitit-launcher is not installed (pip install 'dipgo[cluster]')")
def test_slurm_launcher_config_composes() -> None:
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from dipgo.search.config import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module("dipgo.configs", version_base="1.3"):
            cfg = compose("config", overrides=["hydra/launcher=dipgo_slurm", "hydra.launcher.partition=gpu"],
                          return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.partition == "gpu" and launcher.timeout_min == 120 and launcher.gpus_per_node == 1


def test_wandb_sweep_yaml_drives_dipgo_search() -> None:
    """configs/wandb_sweep.yaml: its command runs `dipgo search`, and every point composes."""
    text = (resources.files("dipgo.configs") / "wandb_sweep.yaml").read_text()
    sweep = OmegaConf.to_container(OmegaConf.create(text.replace("${", "$_{")), resolve=False)  # W&B macros, not interpolations
    command = [c.replace("$_{", "${") for c in sweep["command"]]
    assert command[command.index("dipgo") + 1] == "search" and "${args_no_hyphens}" in command
    fixed = [c for c in command if "=" in c and not c.startswith("$")]
    params = sweep["parameters"]
    assert sweep["method"] in ("grid", "random", "bayes") and sweep["metric"]["name"].startswith("dipgo/")
    for values in itertools.product(*(p["values"] for p in params.values())):
        point = [f"{k}={v}" for k, v in zip(params, values)]
        compose_config([*fixed, *point])  # raises ConfigError on any invalid key or value


def test_wandb_group_follows_the_sweep() -> None:
    from dipgo.search.tracking import wandb_group

    assert wandb_group("tiny/sweep-1", {"WANDB_SWEEP_ID": "abc"}) == "tiny/sweep-1"
    assert wandb_group(None, {"WANDB_SWEEP_ID": "abc"}) == "sweep-abc"
    assert wandb_group(None, {}) is None


def test_ddp_global_batch_must_split_evenly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["search", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "data.batch_size=3",
            f"runs_root={tmp_path / 'runs'}"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "data.batch_size=3 is the global batch and must be divisible by the 2 DDP processes" in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "runs").exists()


def test_sweep_without_multirun_says_to_add_m(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["search", "search.target=0.2,0.3"]) == 2
    assert "search.target=0.2,0.3 gives several values, a sweep: run it with `dipgo search -m" in capsys.readouterr().err
    assert main(["search", "-m", "--cfg", "search.target=0.2,0.3", "seed=0,1"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "0: search.target=0.2 seed=0", "1: search.target=0.2 seed=1", "2: search.target=0.3 seed=0", "3: search.target=0.3 seed=1"
    ]
