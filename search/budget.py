"""Plans for several budgets from one budget-conditioned pruner.

With ``search.pruner.budget_conditioned=true`` and ``search.target_range=[low, high]`` the pruner
is trained on budgets drawn from the range (see ``SearchModule.step_target``), so its logits are
a function of the budget. After the search, every budget in ``search.plan_targets`` gets its own
hard plan from the same pruner (same extraction and refinement as the main plan), written to
``<run>/plans/target_<t>.json``: a sweep of budgets for the price of one search.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig

from dipgo.postprocess.plan import Plan

if TYPE_CHECKING:
    from dipgo.supernets.gates import SuperNet


def budget_plans(module: Any, task: Any, supernet: SuperNet, cfg: DictConfig, run_dir: Path) -> dict[float, Plan]:
    """``{target: plan}`` for ``cfg.search.plan_targets`` (empty unless the pruner is budget-conditioned)."""
    if not (cfg.search.pruner.budget_conditioned and cfg.search.plan_targets):
        return {}
    plans = {}
    for target in cfg.search.plan_targets:
        sub = cfg.copy()
        sub.search.target = float(target)
        plan = task.extract_plan(module.keep_probabilities(float(target)), supernet, sub)
        plan.meta.update({"budget_conditioned": True, "recipe": cfg.recipe_name, "seed": cfg.seed})
        plan.save(run_dir / "plans" / f"target_{float(target):g}.json")
        plans[float(target)] = plan
    return plans
