"""The post-search refinement: never worse than its best seed, always within budget, reproducible."""

from __future__ import annotations

import pytest
import torch

from dipgo.postprocess.reuse_refine import RefineConfig, fill_slack, refine_grid, whole_steps_grid


class FakeSuperNet:
    """Additive costs: every (step, block) slot costs its block's weight; step 0 always runs."""

    def __init__(self, steps: int = 8, weights: tuple[float, ...] = (1.0, 2.0, 1.0)):
        self.num_steps, self.weights = steps, weights
        self.block_names = [f"b{i}" for i in range(len(weights))]

    def plan_cost(self, grid: list[list[bool]]) -> float:
        total = sum(self.weights) * self.num_steps
        return sum(w for row in grid for w, on in zip(self.weights, row) if on) / total


def test_whole_steps_grid_is_the_largest_even_spacing_within_budget() -> None:
    sn = FakeSuperNet()
    grid = whole_steps_grid(sn, 0.5)
    assert sn.plan_cost(grid) <= 0.5
    assert sum(all(r) for r in grid) == 4 and all(all(r) or not any(r) for r in grid)  # round(0.5 * 8) steps
    assert grid[0] == [True] * 3


def test_fill_slack_spends_leftover_budget_on_the_likeliest_slots() -> None:
    sn = FakeSuperNet()
    grid = [[True] * 3] + [[False] * 3 for _ in range(7)]
    probs = torch.zeros(7, 3)
    probs[4, 0] = 0.9  # step 5, block 0
    filled = fill_slack(sn, grid, probs, target=0.125 + 1 / 32)
    assert filled[5][0] and sum(map(sum, filled)) == 4
    assert sn.plan_cost(filled) <= 0.125 + 1 / 32


def test_refine_never_worse_than_the_best_seed_and_reproducible() -> None:
    sn = FakeSuperNet()
    target = 0.5

    def score(grid: list[list[bool]]) -> float:  # prefers computing late steps
        return -float(sum(s for s, row in enumerate(grid) for on in row if on))

    seeds = {"learned": whole_steps_grid(sn, target), "early": [[s < 4] * 3 for s in range(8)]}
    cfg = RefineConfig(max_evals=60)
    probs = torch.full((7, 3), 0.5)
    grid, info = refine_grid(sn, seeds, probs, target, score, cfg, seed=3)
    again, _ = refine_grid(sn, seeds, probs, target, score, cfg, seed=3)
    assert grid == again
    assert sn.plan_cost(grid) <= target + 1e-12
    assert info["final_score"] <= min(info["seed_scores"].values())
    assert info["final_score"] < info["seed_scores"][info["start"]]  # the local search found better moves


def test_refine_races_the_seeds_instead_of_trusting_the_best_start() -> None:
    """A seed that scores best but sits in a dead end loses the race to one that can improve."""
    from dipgo.postprocess.reuse_refine import repair

    sn = FakeSuperNet()
    target = 0.5
    probs = torch.full((7, 3), 0.5)
    early = [[s < 4] * 3 for s in range(8)]
    trap = fill_slack(sn, repair(sn, early, probs, target), probs, target)
    learned = whole_steps_grid(sn, target)

    def late(grid: list[list[bool]]) -> float:  # prefers computing late steps
        return -float(sum(s for s, row in enumerate(grid) for on in row if on))

    start = late(fill_slack(sn, repair(sn, learned, probs, target), probs, target))

    def score(grid: list[list[bool]]) -> float:  # the early plan is a local optimum just above the learned start
        return start - 1.0 if grid == trap else late(grid)

    grid, info = refine_grid(sn, {"early": early, "learned": learned}, probs, target, score,
                             RefineConfig(max_evals=60), seed=3)
    assert info["seed_scores"]["early"] < info["seed_scores"]["learned"]  # the trap scores best at the start
    assert info["start"] == "learned" and set(info["race_scores"]) == {"early", "learned"}
    assert info["final_score"] < start - 1.0 and grid != trap
    assert info["evaluations"] <= 60 + 3  # each of the 3 phases may overshoot by one slack re-score


def test_repair_closes_the_least_likely_slots_until_the_plan_fits() -> None:
    from dipgo.postprocess.reuse_refine import repair

    sn = FakeSuperNet()
    grid = [[True] * 3 for _ in range(8)]
    probs = torch.ones(7, 3)
    probs[2, 1] = 0.0  # step 3, block 1 (weight 2) goes first
    fixed = repair(sn, grid, probs, target=1 - 2 / 32)
    assert not fixed[3][1] and sum(map(sum, fixed)) == 23


def test_budget_conditioned_pruner_writes_one_plan_per_budget(tiny_unet_dir, tmp_path) -> None:
    """One search over a range of budgets; each requested budget gets its own plan within it."""
    from dipgo.postprocess.plan import Plan
    from dipgo.search.compose import compose_config
    from dipgo.search.run import run_search
    from tests.conftest import tiny_search_overrides

    overrides = tiny_search_overrides(tiny_unet_dir, tmp_path / "runs", **{
        "search.pruner.budget_conditioned": True, "search.target_range": "[0.4,0.9]",
        "search.plan_targets": "[0.5,0.8]", "search.target": 0.6, "report.baselines": "[fewer_steps]"})
    result = run_search(compose_config(overrides)[0], quiet=True)
    plans = {t: Plan.load(result.run_dir / "plans" / f"target_{t}.json") for t in (0.5, 0.8)}
    assert all(p.cost_ratio <= t + 1e-9 for t, p in plans.items())
    assert plans[0.8].cost_ratio > plans[0.5].cost_ratio  # a bigger budget buys a bigger plan
    assert all(p.meta["budget_conditioned"] for p in plans.values())


def test_budget_options_need_a_budget_conditioned_pruner() -> None:
    import pytest

    from dipgo.errors import ConfigError
    from dipgo.search.compose import compose_config

    with pytest.raises(ConfigError, match="need search.pruner.budget_conditioned=true"):
        compose_config(["search.plan_targets=[0.3]"])
    with pytest.raises(ConfigError, match=r"target_range must be \[low, high\]"):
        compose_config(["search.pruner.budget_conditioned=true", "search.target_range=[0.5,0.2]"])


@pytest.mark.parametrize(("scheduler", "order"), [("ddim", 0), ("dpmsolver++", 2), ("unipc", 1)])
def test_resumed_plans_sample_exactly_what_full_runs_sample(scheduler: str, order: int) -> None:
    """The refinement's resumed runs (multistep solver state, forecast histories, whole-step
    skips restored mid-trajectory) give the full run's sample, and really skip the shared steps."""
    import random

    from dipgo.postprocess.reuse_refine import PlanSampler
    from tests.conftest import tiny_reuse_supernet, unet_batch

    _, sn = tiny_reuse_supernet(10, scheduler=scheduler, forecast_order=order)
    batch = unet_batch()
    resumed = PlanSampler(sn, batch, max_traces=2)
    rng = random.Random(0)
    grid = [[s % 3 == 0] * len(sn.block_names) for s in range(10)]
    for _ in range(8):  # a walk of one-slot flips, like the local search's moves
        s, b = rng.randrange(1, 10), rng.randrange(len(sn.block_names))
        grid = [row[:] for row in grid]
        grid[s][b] = not grid[s][b]
        torch.testing.assert_close(resumed(grid), sn.sample(batch, grid), rtol=0, atol=0)
    assert resumed.steps_run < resumed.steps_total
    other = {**batch, "noise": batch["noise"] + 1}  # another batch never resumes from these traces
    assert sn.trace(other, grid, resumed._traces[-1]).noise is other["noise"]
    torch.testing.assert_close(sn.trace(other, grid, resumed._traces[-1]).final, sn.sample(other, grid), rtol=0, atol=0)
    sn.remove()


def test_plan_sampler_keeps_nothing_when_one_trace_exceeds_its_memory_budget() -> None:
    from dipgo.postprocess.reuse_refine import PlanSampler
    from tests.conftest import tiny_reuse_supernet, unet_batch

    _, sn = tiny_reuse_supernet(6)
    resumed = PlanSampler(sn, unet_batch(), budget_bytes=1)
    grid = [[True] * len(sn.block_names)] + [[False] * len(sn.block_names)] * 5
    resumed(grid)
    resumed(grid)
    assert resumed.steps_run == resumed.steps_total == 12  # every plan ran from the noise
    sn.remove()
