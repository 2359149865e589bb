"""The learned solver schedule (``search.schedule``): exact timesteps, the search, the plan and its SubNet paths."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dipgo.errors import ConfigError, PlanError
from dipgo.postprocess import enable, install_plan, schedule_scheduler
from dipgo.postprocess.plan import Plan
from dipgo.postprocess.reuse_plan import grid_plan, validate_plan
from dipgo.postprocess.reuse_subnet import ReuseSubNet
from dipgo.search.compose import compose_config
from dipgo.search.config import ScheduleConfig
from dipgo.search.reuse_schedule import calls_in_budget, coordinate_descent, schedule_plan
from dipgo.search.run import run_search
from dipgo.supernets.sampling import (
    make_scheduler,
    pinned_scheduler,
    sample,
    scheduler_name,
    set_exact_timesteps,
)
from tests.conftest import tiny_search_overrides


def _noise_model(x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
    """A smooth stand-in denoiser: the output depends on x and t, so the timesteps matter."""
    return 0.3 * x + 0.001 * t.float().reshape(-1, 1, 1, 1) * torch.tanh(x)


def test_exact_timesteps_match_diffusers_own_custom_timesteps_on_dpm_solver() -> None:
    ts = [901, 650, 400, 180, 30]
    ours, theirs = make_scheduler("dpmsolver++"), make_scheduler("dpmsolver++")
    set_exact_timesteps(ours, ts)
    theirs.set_timesteps(timesteps=ts)
    assert ours.timesteps.tolist() == ts and torch.equal(ours.sigmas, theirs.sigmas)
    batch = {"noise": torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))}
    mine, _ = sample(_noise_model, make_scheduler("dpmsolver++"), batch, len(ts), timesteps=ts)
    reference = make_scheduler("dpmsolver++")
    reference.set_timesteps(timesteps=ts)
    x = batch["noise"] * reference.init_noise_sigma
    for t in reference.timesteps:
        x = reference.step(_noise_model(x, t.reshape(1).expand(2), {}), t, x, return_dict=False)[0]
    assert torch.equal(mine, x)


def test_unipc_on_its_own_spacing_is_unchanged_by_exact_timesteps() -> None:
    own = make_scheduler("unipc")
    own.set_timesteps(6)
    batch = {"noise": torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(1))}
    plain, _ = sample(_noise_model, make_scheduler("unipc"), batch, 6)
    exact, _ = sample(_noise_model, make_scheduler("unipc"), batch, 6, timesteps=own.timesteps.tolist())
    assert torch.equal(plain, exact)


def test_exact_timesteps_refuse_ddim_bad_orders_and_sigma_spacings() -> None:
    with pytest.raises(ValueError, match="^a solver schedule runs on dpmsolver\\+\\+ or unipc, not ddim$"):
        set_exact_timesteps(make_scheduler("ddim"), [900, 500])
    with pytest.raises(ValueError, match="strictly decreasing timesteps in \\[0, 1000\\), got \\[500, 900\\]"):
        set_exact_timesteps(make_scheduler("unipc"), [500, 900])
    karras = make_scheduler("dpmsolver++", {"use_karras_sigmas": True})
    with pytest.raises(ValueError, match="use_karras_sigmas would override them"):
        set_exact_timesteps(karras, [900, 500])


def test_pinned_scheduler_keeps_its_timesteps_and_refuses_other_step_counts() -> None:
    pinned = pinned_scheduler("unipc", [880, 500, 120], accept_steps=[25])
    assert scheduler_name(pinned) == "unipc"
    for asked in (3, 25):
        pinned.set_timesteps(asked)
        assert pinned.timesteps.tolist() == [880, 500, 120]
    with pytest.raises(ValueError, match="pinned 3-step schedule searched for 3 or 25 steps, but 10 steps were asked"):
        pinned.set_timesteps(10)


def test_coordinate_descent_reaches_the_optimum_and_keeps_timesteps_decreasing() -> None:
    goal = [700, 420, 90]
    seen: list[list[int]] = []

    def score(ts: list[int]) -> float:
        seen.append(ts)
        return sum((a - b) ** 2 for a, b in zip(ts, goal)) / 1e4

    best, value, evals = coordinate_descent(score, [800, 600, 400], [64, 32, 16, 8, 4, 2, 1], 1000)
    assert best == goal and value == 0.0 and evals == len(seen)
    assert all(a > b for ts in seen for a, b in zip(ts, ts[1:])) and all(0 <= t < 1000 for ts in seen for t in ts)


def test_calls_in_budget_never_exceed_the_target() -> None:
    assert [calls_in_budget(t, 25) for t in (0.2, 0.25, 0.35, 0.01)] == [5, 6, 8, 1]
    assert all(calls_in_budget(t, s) / s <= t + 1e-12 for t in (0.2, 0.25, 0.35) for s in (20, 25, 50))


def test_schedule_config_refuses_other_solvers_and_bad_ranges_before_anything_is_written(tiny_unet_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="search.schedule.solver must be one of dpmsolver\\+\\+, unipc; got 'ddim'"):
        ScheduleConfig(solver="ddim")
    bad = tiny_search_overrides(tiny_unet_dir, tmp_path / "runs", **{"search.schedule.enabled": True,
                                                                      "search.schedule.solver": "euler"})
    with pytest.raises(ConfigError, match="search.schedule.solver"):
        compose_config(bad)
    # a group's own range checks run when the config is composed, not when the search reaches them
    for override, message in (("search.schedule.batch=0", "^search.schedule needs batch >= 1 and positive moves"),
                              ("search.placement.batch=0", "^search.placement needs iterations >= 0")):
        with pytest.raises(ConfigError, match=message):
            compose_config(tiny_search_overrides(tiny_unet_dir, tmp_path / "runs") + [override])
    assert not (tmp_path / "runs").exists()


@pytest.fixture(scope="module")
def searched(tiny_unet_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """A tiny DPM-Solver++ search with the schedule search on, and its SuperNet rebuilt for the plan."""
    runs = tmp_path_factory.mktemp("schedule_runs")
    overrides = tiny_search_overrides(tiny_unet_dir, runs, **{
        "supernet.scheduler": "dpmsolver++", "supernet.num_steps": 8, "supernet.forecast_order": 1,
        "search.target": 0.3, "search.schedule.enabled": True, "search.schedule.batch": 2,
        "search.schedule.moves": "[128,32]", "report.plots": False,
        "report.baselines": "[fewer_steps,fewer_steps_unipc,uniform]"})
    cfg = compose_config(overrides)[0]
    return cfg, run_search(cfg, quiet=True)


def test_search_records_both_scores_and_keeps_the_better_plan(searched) -> None:
    _, result = searched
    info = result.plan.meta["schedule_search"]
    assert info["calls"] == 2 and info["solver"] == "unipc" and len(info["timesteps"]) == 2
    assert info["score"] <= info["start_score"]  # the descent never ends worse than its start
    assert info["chosen"] == ("schedule" if info["score"] < info["forecast_score"] else "forecast")
    assert (result.plan.payload.schedule is not None) == (info["chosen"] == "schedule")


def _forced_schedule_plan(cfg, plan: Plan) -> tuple[Plan, object, object]:
    """The tiny search's plan turned into a schedule plan whatever won, to exercise every path."""
    from dipgo.models.configured import load_configured_model
    from dipgo.search.reuse_schedule import ScheduleResult
    from dipgo.search.reuse_task import ReuseTask

    loaded = load_configured_model(cfg)
    supernet = ReuseTask().build(loaded, cfg)
    forecast = grid_plan(plan)
    result = ScheduleResult([880, 300], -1.0, [875, 375], -0.5, 3, 0.1)
    return schedule_plan(forecast, supernet, result, "unipc", -0.9), loaded, supernet


def test_a_schedule_plan_round_trips_and_runs_on_every_subnet_path(searched, tmp_path: Path) -> None:
    cfg, result = searched
    plan, loaded, supernet = _forced_schedule_plan(cfg, result.plan)
    assert plan.num_steps == 2 and plan.cost_ratio == pytest.approx(2 / 8) and all(all(r) for r in plan.compute)
    plan.save(tmp_path / "plan.json")
    again = Plan.load(tmp_path / "plan.json")
    assert again.payload.schedule == plan.payload.schedule and grid_plan(again).num_steps == 8
    validate_plan(again, supernet)  # checked against the 8-step dpmsolver++ reference it was searched for
    batch = {"noise": torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(2)),
             "class_labels": torch.tensor([0, 1, 2])}
    expected = supernet.sample_schedule(batch, "unipc", [880, 300])
    supernet.remove()
    subnet = ReuseSubNet(loaded.model, again, scheduler="dpmsolver++", scheduler_config=dict(loaded.scheduler.config))
    assert torch.equal(subnet.sample(batch), expected)
    subnet.save(tmp_path / "subnet")
    assert torch.equal(ReuseSubNet.load(tmp_path / "subnet", loaded.model).sample(batch), expected)
    with pytest.raises(PlanError, match="^this plan is a solver schedule \\(2 unipc steps at learned timesteps\\)"):
        install_plan(loaded.model, again)
    assert schedule_scheduler(again).timesteps is not None


def test_a_schedule_plan_in_a_pipeline_runs_its_timesteps_and_restores_the_scheduler() -> None:
    from diffusers import DiTPipeline, DiTTransformer2DModel, DPMSolverMultistepScheduler

    from tests.conftest import _tiny_vae

    torch.manual_seed(0)
    dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=1000).eval()
    pipe = DiTPipeline(transformer=dit, vae=_tiny_vae().eval(), scheduler=DPMSolverMultistepScheduler())
    blocks = ["transformer_blocks.0", "transformer_blocks.1"]
    plan = Plan(kind="reuse", model="DiTTransformer2DModel", blocks=blocks, compute=[[True, True]] * 3, target=0.5,
                cost_ratio=0.5, num_steps=3,
                meta={"scheduler": "unipc", "solver_schedule": {"scheduler": "unipc", "timesteps": [900, 520, 130],
                                                                "reference_scheduler": "dpmsolver++",
                                                                "reference_steps": 6}})
    seen: list[float] = []
    dit.register_forward_pre_hook(lambda m, a, kw: seen.append(float(kw["timestep"].flatten()[0])), with_kwargs=True)
    original = pipe.scheduler
    with enable(pipe, plan):
        with torch.no_grad():
            pipe(class_labels=[1], num_inference_steps=6, guidance_scale=1.0, output_type="np")
        assert seen == [900.0, 520.0, 130.0]
        with pytest.raises(ValueError, match="but 10 steps were asked"), torch.no_grad():
            pipe(class_labels=[1], num_inference_steps=10, guidance_scale=1.0, output_type="np")
    assert pipe.scheduler is original
    pipe.scheduler = make_scheduler("ddim")
    with pytest.raises(PlanError, match="^plan was searched on the dpmsolver\\+\\+ sampler but the pipeline's scheduler is ddim"):
        enable(pipe, plan)


def test_the_report_shows_the_schedule_and_the_forecast_plan_it_beat(searched, tmp_path: Path) -> None:
    from dipgo.report.reuse_eval import evaluate_reuse

    cfg, result = searched
    plan, loaded, supernet = _forced_schedule_plan(cfg, result.plan)
    report, _ = evaluate_reuse(loaded, supernet, plan, cfg, tmp_path)
    rows = {v["name"]: v for v in report["variants"]}
    assert rows["dipgo"]["solver_schedule"]["timesteps"] == [880, 300]
    assert rows["dipgo"]["macs_ratio"] == pytest.approx(0.25) and "learned timesteps" in rows["dipgo"]["label"]
    assert rows["dipgo_forecast"]["macs_ratio"] == pytest.approx(grid_plan(plan).cost_ratio)
    assert report["num_steps"] == 8 and report["subnet_vs_supernet_max_abs_diff"] == 0.0
    assert report["peak_cache_bytes"] == 0
    assert "dipgo_forecast" not in json.dumps(report["verdict"])  # dipgo's own plans are never its rivals
