"""End-to-end search on a tiny model: run directory, logging, and exact resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from dipgo.postprocess.plan import Plan
from dipgo.search.compose import compose_config
from dipgo.search.run import run_search
from tests.conftest import tiny_search_overrides


class _Crash(RuntimeError):
    pass


class CrashAt(pl.Callback):
    """Simulates a killed job: raises in the middle of training step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: pl.Trainer, *args: object) -> None:
        if trainer.global_step == self.step:
            raise _Crash(f"simulated crash at step {self.step}")


def test_search_writes_full_run_directory(tiny_unet_dir: Path, tmp_path: Path) -> None:
    cfg, _ = compose_config(tiny_search_overrides(tiny_unet_dir, tmp_path / "runs"))
    result = run_search(cfg, quiet=True)
    run_dir = result.run_dir
    assert run_dir.parent == tmp_path / "runs" / "tiny"
    for name in ("config.yaml", "plan.json", "report.json", "logs/metrics.csv", "checkpoints/last.ckpt"):
        assert (run_dir / name).is_file(), name
    plan = Plan.load(run_dir / "plan.json")
    assert plan.kind == "reuse" and plan.num_steps == 4 and all(plan.compute[0])
    assert plan.cost_ratio <= 0.5 + 1e-9
    report = json.loads((run_dir / "report.json").read_text())
    names = [v["name"] for v in report["variants"]]
    assert names[:2] == ["full", "dipgo"] and "fewer_steps" in names
    assert report["subnet_vs_supernet_max_abs_diff"] < 1e-4
    for plot in report["plots"].values():
        assert (run_dir / plot).stat().st_size > 1000
    header = (run_dir / "logs" / "metrics.csv").read_text().splitlines()[0].split(",")
    for column in ("loss/mse", "loss/total", "cost/expected", "cost/target", "cost/lambda", "gates/mean_keep_prob"):
        assert column in header
    # nothing half-written is left behind
    assert not list(run_dir.rglob("*.tmp"))


def test_resume_after_crash_gives_the_same_plan(tiny_unet_dir: Path, tmp_path: Path) -> None:
    overrides = tiny_search_overrides(tiny_unet_dir, tmp_path / "runs", **{"report.plots": False})
    full = run_search(compose_config(overrides + [f"run_dir={tmp_path / 'a'}"])[0], quiet=True)

    crashed_dir = tmp_path / "b"
    cfg, _ = compose_config(overrides + [f"run_dir={crashed_dir}"])
    with pytest.raises(_Crash):
        run_search(cfg, callbacks=[CrashAt(step=3)], quiet=True)
    assert (crashed_dir / "checkpoints" / "last.ckpt").is_file()
    assert not (crashed_dir / "plan.json").exists(), "a crashed run must not leave a plan"

    resumed = run_search(compose_config([f"resume={crashed_dir}"])[0], quiet=True)
    assert resumed.run_dir == crashed_dir
    assert resumed.plan.compute == full.plan.compute
    assert resumed.plan.cost_ratio == pytest.approx(full.plan.cost_ratio)
    ckpt_a = torch.load(tmp_path / "a" / "checkpoints" / "last.ckpt", weights_only=False)
    ckpt_b = torch.load(crashed_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt_a["global_step"] == ckpt_b["global_step"] == 6
    for key, value in ckpt_a["state_dict"].items():
        torch.testing.assert_close(ckpt_b["state_dict"][key], value, msg=key)


def test_wandb_offline_run_folder(tiny_unet_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    overrides = tiny_search_overrides(tiny_unet_dir, tmp_path / "runs", **{"logger.wandb": True, "trainer.max_steps": 2})
    result = run_search(compose_config(overrides)[0], quiet=True)
    runs = list((result.run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("*.wandb")), "the offline run must hold its event log"
    assert list((runs[0] / "files" / "media" / "images").rglob("*.png")), "plots must be logged as W&B images"


def test_wandb_mode_resolution() -> None:
    from dipgo.search.tracking import wandb_mode

    assert wandb_mode("auto", {}) == "offline"
    assert wandb_mode("auto", {"WANDB_API_KEY": "x"}) == "online"
    assert wandb_mode("auto", {"WANDB_MODE": "online"}) == "online"
    assert wandb_mode("auto", {"WANDB_API_KEY": "x", "WANDB_MODE": "offline"}) == "offline"
    assert wandb_mode("auto", {"WANDB_MODE": "disabled"}) == "disabled"
    assert wandb_mode("online", {}) == "online"


def test_ddp_two_cpu_processes_share_one_run(tiny_unet_dir: Path, tmp_path: Path) -> None:
    """trainer=ddp alone turns the search into 2 gloo processes; rank 0 owns the run folder."""
    import subprocess
    import sys

    overrides = tiny_search_overrides(
        tiny_unet_dir, tmp_path / "runs", **{"trainer.max_steps": 2, "report.baselines": "[fewer_steps]"}
    )
    overrides = [o for o in overrides if not o.startswith("trainer.enable_progress_bar")]
    cmd = [sys.executable, "-m", "dipgo", "search", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
           "--quiet", *overrides]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    runs = list((tmp_path / "runs" / "tiny").iterdir())
    assert len(runs) == 1, runs
    assert (runs[0] / "plan.json").is_file() and (runs[0] / "report.json").is_file()
    assert result.stdout.count("dipgo search:") == 1
