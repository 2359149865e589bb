"""The reuse report: better-solver and forecasting baselines, the pruner's own plan, the verdict."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest
import torch

from dipgo.errors import ConfigError
from dipgo.report.reuse_eval import _digits_judge, fd_sample_note, pruner_verdict, summary_lines, verdict
from dipgo.search.compose import compose_config
from dipgo.search.run import run_search
from tests.conftest import tiny_search_overrides

ALL = "[fewer_steps,fewer_steps_ddim,fewer_steps_dpmsolver++,fewer_steps_unipc,uniform,taylorseer1,taylorseer2,teacache]"


def test_report_has_every_baseline_a_user_would_pick(tiny_unet_dir: Path, tmp_path: Path) -> None:
    overrides = tiny_search_overrides(tiny_unet_dir, tmp_path / "runs", **{
        "report.baselines": ALL, "supernet.num_steps": 8, "supernet.forecast_order": 1, "report.plots": False})
    result = run_search(compose_config(overrides)[0], quiet=True)
    report = result.report
    rows = {v["name"]: v for v in report["variants"]}
    assert "fewer_steps_ddim" in report["skipped_baselines"]  # the searched sampler: that is fewer_steps
    assert {"fewer_steps_dpmsolver++", "fewer_steps_unipc", "taylorseer1", "taylorseer2", "teacache"} <= set(rows)
    assert rows["fewer_steps_unipc"]["scheduler"] == "unipc"
    assert rows["teacache"]["macs_ratio"] <= report["macs"]["plan_ratio"] + 1e-9  # threshold met the budget
    assert report["forecast_order"] == 1 and report["peak_cache_bytes"] > 0
    assert report["subnet_vs_supernet_max_abs_diff"] == 0.0
    assert report["plan_seconds"] > 0 and result.plan.meta["plan_seconds"] == report["plan_seconds"]  # refinement timed
    assert report["verdict"]["sentence"].startswith("dipgo")
    assert any(line.startswith("verdict: dipgo") for line in result.summary)
    # scripts/fd_spread.py re-samples digits runs only (the FD proxy needs the digits classifier)
    evaluate = runpy.run_path(str(Path(__file__).resolve().parents[1] / "scripts" / "fd_spread.py"))["evaluate"]
    with pytest.raises(SystemExit, match="digits denoisers only"):
        evaluate(result.run_dir, ["uniform"], seed=1, n=2)


def test_fd_judge_digits_judges_a_users_own_digits_model_and_refuses_other_shapes(tiny_unet_dir: Path,
                                                                                  tmp_path: Path) -> None:
    """A separately trained digits denoiser (any folder) gets the FD proxy when asked for it."""
    from types import SimpleNamespace

    own = SimpleNamespace(source="/somewhere/my_digits_unet", model=SimpleNamespace(config={"in_channels": 1, "sample_size": 16}))
    assert _digits_judge(own, "auto") is None  # by default only the shipped digits denoisers are judged
    classifier, real = _digits_judge(own, "digits")
    assert real.ndim == 2 and real.shape[0] > 100  # the classifier's features of the real held-out digits
    shipped = SimpleNamespace(source="digits_unet", model=own.model)
    assert _digits_judge(shipped, "none") is None
    # an 8x8 model cannot be judged by the 16x16 digits classifier: refused before the search starts
    runs = tmp_path / "runs"
    overrides = tiny_search_overrides(tiny_unet_dir, runs, **{"report.fd_judge": "digits"})
    with pytest.raises(ConfigError, match="report.fd_judge=digits judges 1x16x16"):
        run_search(compose_config(overrides)[0], quiet=True)
    assert not any(runs.rglob("*.yaml")), "a refused search writes nothing"


def test_an_unconditional_digits_unet_is_judged_by_fd_alone(tmp_path: Path) -> None:
    """A user's own unconditional 1x16x16 denoiser: the report has an FD but no class to be accurate
    about, and its summary says so instead of failing after the whole search."""
    from diffusers import DDIMScheduler, UNet2DModel

    torch.manual_seed(0)
    folder = tmp_path / "my_unconditional_digits"
    UNet2DModel(sample_size=16, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
                down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                norm_num_groups=4).save_pretrained(folder / "unet")
    DDIMScheduler(num_train_timesteps=1000).save_config(folder / "scheduler")
    overrides = tiny_search_overrides(folder, tmp_path / "runs", **{"report.fd_judge": "digits", "report.plots": False,
                                                                    "report.baselines": "[fewer_steps]"})
    result = run_search(compose_config(overrides)[0], quiet=True)
    assert result.report["full"]["fd"] > 0 and result.report["full"]["accuracy"] is None
    full_line = next(line for line in result.summary if line.startswith("full model: FD"))
    assert "accuracy" not in full_line


def test_summary_says_which_baselines_are_missing_and_why() -> None:
    report = {"model": "UNet2DModel", "source": "tiny", "num_steps": 8, "scheduler": "ddim", "target": 0.25,
              "latency_batch": 4, "variants": [{"name": "full", "label": "full", "macs_ratio": 1.0, "speedup": 1.0}],
              "skipped_baselines": {"deepcache": "deepcache: no schedule in the searched grid costs at most 0.25",
                                    "fewer_steps_ddim": "the search samples with ddim already: this is fewer_steps",
                                    "teacache": "no threshold meets the budget"}}
    missing = [line for line in summary_lines(report) if line.startswith("not compared: ")]
    # the searched sampler's fewer-step row is in the table: not reported as missing
    assert missing == ["not compared: deepcache: no schedule in the searched grid costs at most 0.25",
                       "not compared: teacache: no threshold meets the budget"]


def _report(dipgo: dict, *others: dict, full_fd: float | None = 1.0) -> dict:
    rows = [{"name": "full", "label": "full", "macs_ratio": 1.0}, {"name": "dipgo", "label": "dipgo", **dipgo}]
    rows += [{"label": o["name"], **o} for o in others]
    return {"variants": rows, "full": {"fd": full_fd}}


def test_verdict_needs_psnr_and_fd() -> None:
    base = {"name": "fewer_steps_unipc", "macs_ratio": 0.25, "psnr": 34.0, "fd": 1.05}
    win = verdict(_report({"macs_ratio": 0.25, "psnr": 36.0, "fd": 1.04}, base))
    assert win["dipgo_wins"] is True and "best on PSNR" in win["sentence"]
    # an FD 1.04 against a baseline's 1.05 and the full model's 1.0 wins by being within 10 %, and says so
    assert "FD within 10 % of the best (1.04 vs 1.05, fewer_steps_unipc, full 1.00)" in win["sentence"]
    psnr_loss = verdict(_report({"macs_ratio": 0.25, "psnr": 33.0, "fd": 1.0}, base))
    assert psnr_loss["dipgo_wins"] is False and "PSNR to fewer_steps_unipc" in psnr_loss["sentence"]
    fd_loss = verdict(_report({"macs_ratio": 0.25, "psnr": 36.0, "fd": 1.3}, base))
    assert fd_loss["dipgo_wins"] is False and "FD" in fd_loss["sentence"] and "PSNR" not in fd_loss["sentence"]
    no_fd = verdict(_report({"macs_ratio": 0.25, "psnr": 36.0}, {**base, "fd": None}, full_fd=None))
    assert no_fd["dipgo_wins"] is True and "fd" not in no_fd
    dearer = verdict(_report({"macs_ratio": 0.25, "psnr": 30.0, "fd": 1.0}, {**base, "macs_ratio": 0.5}))
    assert dearer["dipgo_wins"] is None  # a baseline at twice the MACs is not a rival


def test_pruner_verdict_compares_the_plan_before_refinement_with_static_schedules_only() -> None:
    mine = {"name": "dipgo_pruner", "macs_ratio": 0.2, "psnr": 38.0}
    taylor = {"name": "taylorseer1", "macs_ratio": 0.2, "psnr": 37.9}
    solver = {"name": "fewer_steps_dpmsolver++", "macs_ratio": 0.2, "psnr": 45.0}  # not a static schedule
    win = pruner_verdict(_report({"macs_ratio": 0.2, "psnr": 50.0}, mine, taylor, solver))
    assert win["pruner_wins"] is True and win["best_static"] == "taylorseer1" and "beats" in win["sentence"]
    tie = pruner_verdict(_report({"macs_ratio": 0.2, "psnr": 50.0}, {**mine, "psnr": 37.9}, taylor))
    assert tie["pruner_wins"] is False and "does not beat" in tie["sentence"]  # a tie is not a win
    dearer = pruner_verdict(_report({"macs_ratio": 0.2, "psnr": 50.0}, mine, {**taylor, "macs_ratio": 0.3, "psnr": 60.0}))
    assert dearer is None  # a schedule at 1.5x the MACs is not a rival
    assert pruner_verdict(_report({"macs_ratio": 0.2, "psnr": 50.0}, taylor)) is None  # no pruner row


def test_fd_note_warns_only_when_samples_are_too_few_for_the_feature_dimension() -> None:
    assert "biased" in fd_sample_note({"num_eval_samples": 100, "fd_feature_dim": 128})
    assert "report.num_samples (>= 256)" in fd_sample_note({"num_eval_samples": 255, "fd_feature_dim": 128})
    assert fd_sample_note({"num_eval_samples": 256, "fd_feature_dim": 128}) is None
    assert fd_sample_note({"num_eval_samples": 100, "fd_feature_dim": None}) is None  # no FD proxy (latents)
