"""Learned step placement (search.placement): the Plackett-Luce policy, its learning rule, and the
search wiring (start of the pruner, refinement seed, report variant, refusals)."""

from __future__ import annotations

import itertools

import pytest
import torch

from dipgo.search.config import PlacementConfig
from dipgo.search.reuse_placement import learn_placement, plackett_luce_log_prob


@pytest.mark.parametrize("k", [1, 2, 4])
def test_plackett_luce_probabilities_of_every_ordered_draw_sum_to_one(k: int) -> None:
    scores = torch.tensor([0.3, -1.2, 2.0, 0.0], dtype=torch.float64)
    total = sum(float(plackett_luce_log_prob(scores, list(order)).exp())
                for order in itertools.permutations(range(4), k))
    assert total == pytest.approx(1.0, abs=1e-12)
    first = float(plackett_luce_log_prob(scores, [2]).exp())
    assert first == pytest.approx(float(torch.softmax(scores, 0)[2]), abs=1e-12)


def test_placement_learns_to_move_whole_steps_towards_a_better_score() -> None:
    """On a known landscape (late steps are worth more), the policy moves the evenly spaced start's
    steps later, keeps their number and step 0, and is reproducible for a seed."""
    from tests.conftest import tiny_reuse_supernet

    _, sn = tiny_reuse_supernet(12)

    def score(rows: list[int]) -> float:  # lower is better: reward late full steps
        return -float(sum(rows)) / 10

    config = PlacementConfig(enabled=True, iterations=40, samples=6, lr=0.3)
    placed = learn_placement(sn, {}, 0.4, config, seed=1, score=score)
    again = learn_placement(sn, {}, 0.4, config, seed=1, score=score)
    assert placed.rows == again.rows
    assert placed.rows[0] == 0 and len(placed.rows) == len(placed.start_rows)
    assert placed.score < placed.start_score  # it learned something better than where it started
    assert placed.evaluations == 1 + 40 * 6 + 1
    assert sn.plan_cost([[s in placed.rows] * len(sn.units) for s in range(12)]) == pytest.approx(
        sn.plan_cost([[s in placed.start_rows] * len(sn.units) for s in range(12)]))
    sn.placed_rows[0.4] = placed.rows
    start = sn.prior_keep(0.4)[: 11 * len(sn.units)].reshape(11, -1)
    assert {s + 1 for s in range(11) if bool(start[s].all())} == set(placed.rows) - {0}  # the pruner starts there
    sn.remove()


def test_placement_config_refuses_what_cannot_work() -> None:
    with pytest.raises(ValueError, match="samples >= 2"):
        PlacementConfig(samples=1)
    with pytest.raises(ValueError, match="lr must be a positive number"):
        PlacementConfig(lr=0.0)


def test_search_with_placement_starts_the_pruner_there_and_reports_it(tiny_unet_dir, tmp_path) -> None:
    from dipgo.postprocess.plan import Plan
    from dipgo.search.compose import compose_config
    from dipgo.search.run import run_search
    from tests.conftest import tiny_search_overrides

    overrides = tiny_search_overrides(tiny_unet_dir, tmp_path / "runs", **{
        "supernet.num_steps": 6, "search.pruner.init": "prior", "search.placement.enabled": True,
        "search.placement.iterations": 3, "search.placement.samples": 2, "search.placement.batch": 2})
    result = run_search(compose_config(overrides)[0], quiet=True)
    plan = Plan.load(result.run_dir / "plan.json")
    placement = plan.meta["placement"]
    assert placement["rows"][0] == 0 and placement["evaluations"] == 1 + 3 * 2 + 1
    names = {v["name"] for v in result.report["variants"]}
    assert "dipgo_placement" in names
    refine = plan.meta["refine"]
    scores = refine["pruner_stage_scores"]  # the pruner's plan is its better stage on calibration
    whole = all(all(row) or not any(row) for row in refine["pruner_compute"])
    if scores["placement"] < scores["gates"]:
        assert refine["pruner_stage"] == "placement" and whole
    else:
        assert refine["pruner_stage"] == "gates"


def test_placement_needs_the_prior_start_and_one_budget() -> None:
    from dipgo.errors import ConfigError
    from dipgo.search.compose import compose_config

    with pytest.raises(ConfigError, match="needs search.pruner.init=prior"):
        compose_config(["search.placement.enabled=true", "search.pruner.init=all"])
    with pytest.raises(ConfigError, match="budget-conditioned"):
        compose_config(["search.placement.enabled=true", "search.pruner.init=prior",
                        "search.pruner.budget_conditioned=true", "search.target_range=[0.2,0.5]"])
    with pytest.raises(ConfigError, match="has no steps"):
        compose_config(["recipe=digits_resnet_depth", "search.placement.enabled=true"])
