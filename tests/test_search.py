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


def test_ddp_two_cpu_processes_give_the_one_process_plan(tiny_unet_dir: Path, tmp_path: Path) -> None:
    """trainer=ddp alone turns the search into 2 gloo processes; rank 0 owns the run folder, and
    with the same global batch (data.batch_size, split 1+1 across ranks) and seed the plan equals
    the one-process plan: each step's global batch is the same items, gradients are averaged.

    Soft gates here: with straight-through hard gates (the default) the float32 rounding of the
    all-reduced gradient (~1e-3 relative) can flip a sampled gate near its threshold, after which
    the two runs' probabilities drift apart (their plans usually still agree)."""
    import subprocess
    import sys

    overrides = tiny_search_overrides(
        tiny_unet_dir, tmp_path / "runs", **{"report.baselines": "[fewer_steps]", "search.pruner.hard": False}
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

    single = run_search(compose_config([*overrides, f"run_dir={tmp_path / 'single'}"])[0], quiet=True)
    ddp_plan = Plan.load(runs[0] / "plan.json")
    assert ddp_plan.compute == single.plan.compute
    # close, not bitwise: in float32 a batch's gradient and the mean of its halves' differ by rounding
    probs_ddp, probs_one = (torch.tensor(p.meta["keep_probs"]) for p in (ddp_plan, single.plan))
    torch.testing.assert_close(probs_ddp, probs_one, rtol=0, atol=2e-3)
    assert torch.load(runs[0] / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 6


def test_ddp_needs_a_global_batch_divisible_by_the_processes() -> None:
    from dipgo.errors import ConfigError
    from dipgo.search.data import StepSampler

    with pytest.raises(ConfigError, match="data.batch_size=3 is the global batch and must be divisible by the 2"):
        StepSampler(8, 3, 2, 0, lambda: 0, rank=0, world_size=2)
    one = list(StepSampler(6, 4, 3, 0, lambda: 1))
    halves = [list(StepSampler(6, 4, 3, 0, lambda: 1, rank=r, world_size=2)) for r in (0, 1)]
    for step in range(3):  # step k's global batch is rank 0's half then rank 1's half
        assert one[4 * step : 4 * step + 4] == halves[0][2 * step : 2 * step + 2] + halves[1][2 * step : 2 * step + 2]
