"""Joint search of block + mask gates on the digits ViT (and MiniLM): identity, exact costs,
gradients, plans, the CLI run for each kind set, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig

from dipgo.errors import PlanError
from dipgo.models.configured import load_configured_model
from dipgo.search.compose import compose_config
from dipgo.search.data import collate
from dipgo.search.joint_block_task import BlockJointTask, subnet_of

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def vit_overrides(runs_root: Path, **extra: object) -> list[str]:
    base = {
        "recipe": "digits_vit_joint", "recipe_name": "tiny_joint_block", "runs_root": str(runs_root),
        "supernet.mask_calib_items": 16, "supernet.distill_steps": 2, "trainer.max_steps": 6,
        "trainer.enable_progress_bar": False, "data.batch_size": 8, "data.pool_size": 32, "data.steps_per_epoch": 3,
        "report.num_samples": 64, "logger.wandb": False, "search.target": 0.5, "search.refine.max_evals": 6,
        "search.refine.batch": 8,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def build(tmp_path: Path, **extra: object) -> tuple[DictConfig, object, object]:
    cfg, _ = compose_config(vit_overrides(tmp_path, **extra))
    loaded = load_configured_model(cfg)
    return cfg, loaded, BlockJointTask().build(loaded, cfg)


def calib_batch(sn: object, n: int = 4) -> dict:
    batch = collate([sn.calibration_pool[i] for i in range(n)])
    batch.pop("index")
    return batch


def test_slots_identity_and_hook_composition(tmp_path: Path) -> None:
    cfg, loaded, sn = build(tmp_path)
    nb = len(sn.blocks)
    assert [s.kind for s in sn.slots] == ["block"] * nb + ["mask"] * len(sn.layers)
    assert sn.soft_slots.tolist() == [False] * nb + [True] * len(sn.layers)
    assert sn.layers and all(p.startswith("blocks.") for p in sn.layers)  # patch embedding and head excluded
    batch = calib_batch(sn)
    with torch.no_grad():
        plain = sn.dense_model(batch["images"])  # the unhooked copy
    ones = torch.ones(len(sn.slots))
    assert torch.equal(sn.reference(batch)["output"], plain)  # hooks pass through outside gated()
    assert torch.allclose(sn.gated(batch, ones)["output"], plain, atol=1e-5)
    # a closed gate is the removed block, and the pruned weights are what the SubNet carries
    keep = [True, False, True, True, False, True]
    probs = torch.ones(len(sn.slots))
    probs[:nb] = torch.tensor([1.0 if k else 0.0 for k in keep])
    sub = subnet_of(sn, _block_only_plan(sn, keep))
    with torch.no_grad():
        assert torch.allclose(sn.hard(batch, keep, pruned=False), sub(batch["images"]), atol=1e-5)
    model = sn.remove()
    with torch.no_grad():
        assert torch.equal(model(batch["images"]), plain)  # hooks gone, weights untouched


def _block_only_plan(sn: object, keep: list[bool]) -> object:
    from dipgo.postprocess.plan import Plan

    return Plan(kind="joint", model=type(sn.model).__name__, blocks=list(sn.blocks), compute=[keep], target=1.0,
                cost_ratio=sn.plan_cost(keep, []), meta={"kinds": list(sn.kinds)})


def test_cost_of_hard_gates_and_densities_is_the_macs_ratio(tmp_path: Path) -> None:
    from dipgo.measure.macs import count_macs
    from dipgo.postprocess.block_subnet import make_block_plan, remove_blocks

    cfg, loaded, sn = build(tmp_path)
    nb, macs = len(sn.blocks), sn.layer_macs.tolist()
    # the layers' MACs are part of their blocks' MACs (same counter, same example)
    for b, block_macs in zip(sn.blocks, sn._block_macs.tolist()):
        inside = sum(m for p, m in zip(sn.layers, macs) if p.startswith(b + "."))
        assert 0 < inside <= block_macs
    keep = [True, False, True, True, False, True]
    dens = [0.5 if i % 2 else 0.25 for i in range(len(sn.layers))]
    gates = torch.tensor([float(k) for k in keep] + dens, dtype=torch.float64)
    # by hand: removed blocks cost nothing, a kept layer at density d saves (1 - d) of its MACs
    removed = sum(c for c, k in zip(sn._block_macs.tolist(), keep) if not k)
    saved = sum((1 - d) * m for p, d, m in zip(sn.layers, dens, macs)
                if keep[sn.blocks.index(".".join(p.split(".")[:2]))])
    by_hand = (sn.full_cost() - removed - saved) / sn.full_cost()
    assert float(sn.expected_cost(gates)) == pytest.approx(by_hand, rel=1e-12)
    assert sn.plan_cost(keep, dens) == pytest.approx(by_hand, rel=1e-12)
    # the block part matches the MACs counted on the physically removed dense model
    images = calib_batch(sn, 1)["images"]
    shallow = remove_blocks(sn.dense_model, make_block_plan(sn.block, keep))
    counted = count_macs(lambda: shallow(images))[0] / count_macs(lambda: sn.dense_model(images))[0]
    assert sn.plan_cost(keep, []) == pytest.approx(counted, rel=1e-9)
    assert float(sn.expected_cost(torch.ones(nb + len(sn.layers), dtype=torch.float64))) == pytest.approx(1.0)
    sn.remove()


def test_gradients_reach_both_kinds(tmp_path: Path) -> None:
    cfg, loaded, sn = build(tmp_path)
    batch = calib_batch(sn)
    ref = sn.reference(batch)["output"]
    gates = torch.full((len(sn.slots),), 0.7, requires_grad=True)
    out = sn.gated(batch, gates)["output"]
    ((out - ref) ** 2).mean().backward()
    nb = len(sn.blocks)
    assert (gates.grad[:nb] != 0).all() and (gates.grad[nb:] != 0).any()
    g = gates.detach().double().requires_grad_()
    cost_grad = torch.autograd.grad(sn.expected_cost(g), g)[0]
    assert (cost_grad > 0).all()  # keeping more of either kind costs more
    sn.remove()


def test_mask_only_plan_lands_on_target_and_keeps_the_order(tmp_path: Path) -> None:
    cfg, loaded, sn = build(tmp_path, **{"supernet.kinds": "[mask]", "search.target": 0.6})
    assert len(sn.slots) == len(sn.layers)
    probs = torch.linspace(0.5, 0.95, len(sn.slots))
    plan = BlockJointTask().extract_plan(probs, sn, cfg)
    assert plan.kind == "joint" and all(plan.compute[0])
    assert plan.cost_ratio <= 0.6 + 1e-9 and plan.cost_ratio == pytest.approx(0.6, abs=1e-4)
    dens = plan.meta["mask"]["density"]
    assert dens == sorted(dens)  # one constant shift keeps the learned order
    realised = plan.meta["mask"]["realised_density"]
    assert max(abs(a - b) for a, b in zip(dens, realised)) < 0.02
    sn.remove()


def test_joint_plan_uses_the_budget_and_refuses_the_unreachable(tmp_path: Path) -> None:
    cfg, loaded, sn = build(tmp_path, **{"search.target": 0.4})
    nb = len(sn.blocks)
    probs = torch.cat([torch.tensor([0.9, 0.2, 0.9, 0.9, 0.3, 0.9]), torch.full((len(sn.layers),), 0.8)])
    plan = BlockJointTask().extract_plan(probs, sn, cfg)
    split = plan.meta["cost_split"]
    dens = plan.meta["mask"]["density"]
    assert plan.cost_ratio <= 0.4 + 1e-9
    # the slack the coarse block costs leave goes back to the layers (sparse here, so they take it)
    assert min(dens) < 1.0
    assert plan.cost_ratio == pytest.approx(0.4, abs=1e-3)
    assert split["both"] == pytest.approx(plan.cost_ratio, abs=1e-4)
    assert split["both"] <= min(split["block_only"], split["mask_only"]) + 1e-9
    assert len(plan.compute[0]) == nb
    assert plan.meta["split_search"]["candidates"]["learned"]["reopen"]["evaluations"] >= 1
    sn.remove()
    with pytest.raises(PlanError, match="unreachable"):
        build(tmp_path, **{"supernet.kinds": "[block]", "search.target": 0.001})


def _lopsided_probs(sn: object) -> torch.Tensor:
    """Block probabilities that keep every block, densities pushed to the floor on a few layers
    (what the pruner learns on the digits ViT)."""
    dens = torch.full((len(sn.layers),), 0.6)
    dens[::5] = 0.05
    return torch.cat([torch.full((len(sn.blocks),), 0.9), dens])


def test_split_search_keeps_the_best_measured_candidate(tmp_path: Path) -> None:
    from dipgo.search.joint_block_task import mask_candidates

    cfg, loaded, sn = build(tmp_path)
    nb = len(sn.blocks)
    probs = _lopsided_probs(sn)
    plan = BlockJointTask().extract_plan(probs, sn, cfg)
    split = plan.meta["split_search"]
    scores, cands = split["scores"], split["candidates"]
    expected = ["learned", "uniform", *[f"uniform_{float(r):g}" for r in cfg.supernet.split_densities]]
    assert list(scores) == expected == list(cands)  # every uniform density reaches 0.5 on the ViT
    assert split["chosen"] == min(scores, key=scores.get)  # the lowest score, ties to the earlier one
    assert all(v >= 0.0 for v in scores.values()) and split["score_items"] == cfg.search.refine.batch
    for name, c in cands.items():
        assert c["cost_ratio"] <= 0.5 + 1e-9, name  # every candidate within the budget
    assert cands["uniform_1"]["mask_density_macs"] == 1.0 and cands["uniform_1"]["removed_blocks"]
    assert cands["uniform"]["removed_blocks"] == [] and cands["uniform"]["cost_ratio"] == pytest.approx(0.5, abs=1e-4)
    # the plan is the chosen candidate's, pruned for good (OBS + distillation)
    chosen = cands[split["chosen"]]
    assert plan.meta["removed_blocks"] == chosen["removed_blocks"] and plan.cost_ratio <= 0.5 + 1e-9
    assert plan.cost_ratio == pytest.approx(chosen["cost_ratio"], abs=1e-6)
    dens = plan.meta["mask"]["density"]
    assert max(abs(a - b) for a, b in zip(dens, plan.meta["mask"]["realised_density"])) < 0.02
    # the learned candidate is floored at supernet.mask_min_density (the pruner's 0.05 layers lifted)
    g_block, learned = sn.split(probs.double())
    cand = mask_candidates(sn, learned, [True] * nb, cfg)
    assert float(cand["learned"].min()) == pytest.approx(cfg.supernet.mask_min_density)
    assert plan.meta["mask"]["learned_density"][0] == pytest.approx(0.05)  # the raw allocation is recorded
    sn.remove()


def test_split_search_mask_alone_and_no_split_densities(tmp_path: Path) -> None:
    cfg, loaded, sn = build(tmp_path, **{"supernet.kinds": "[mask]", "search.target": 0.6})
    plan = BlockJointTask().extract_plan(_lopsided_probs(sn)[len(sn.blocks):], sn, cfg)
    split = plan.meta["split_search"]
    assert list(split["scores"]) == ["learned", "uniform"]  # both fitted to the target
    assert split["chosen"] == min(split["scores"], key=split["scores"].get)
    for c in split["candidates"].values():
        assert c["removed_blocks"] == [] and c["cost_ratio"] == pytest.approx(0.6, abs=1e-4)
    assert all(plan.compute[0]) and plan.cost_ratio <= 0.6 + 1e-9
    sn.remove()
    cfg, loaded, sn = build(tmp_path, **{"supernet.split_densities": "[]"})
    plan = BlockJointTask().extract_plan(_lopsided_probs(sn), sn, cfg)
    assert list(plan.meta["split_search"]["scores"]) == ["learned", "uniform"]
    assert plan.cost_ratio <= 0.5 + 1e-9
    sn.remove()


@pytest.mark.parametrize("kinds", ["[block,mask]", "[block]", "[mask]"])
def test_cli_search_writes_plan_and_report(tmp_path: Path, kinds: str) -> None:
    from dipgo.cli import main
    from dipgo.search.joint_block_task import routes_here
    from dipgo.search.tasks import get_task

    # the registry dispatches every kind set on a classifier (mask alone too) to the block + mask task
    cfg, _ = compose_config(vit_overrides(tmp_path, **{"supernet.kinds": kinds}))
    assert routes_here(cfg)
    assert isinstance(get_task("joint", cfg), BlockJointTask)
    code = main(["search", *vit_overrides(tmp_path, **{"supernet.kinds": kinds})])
    assert code == 0
    run = next((tmp_path / "tiny_joint_block").iterdir())
    plan = json.loads((run / "plan.json").read_text())
    report = json.loads((run / "report.json").read_text())
    assert plan["kind"] == "joint" and plan["meta"]["kinds"] == kinds.strip("[]").split(",")
    assert report["cost_ratio"] <= 0.5 + 1e-9 and plan["cost_ratio"] == report["cost_ratio"]
    assert report["cost_split"]["both"] == pytest.approx(plan["cost_ratio"], abs=1e-4)
    assert report["fidelity_metric"] == "accuracy" and report["variants"][0]["name"] == "dipgo"
    row = report["variants"][0]
    assert 0.0 <= row["accuracy"] <= 1.0 and row["kl"] >= 0.0
    assert (run / "joint_plan.png").is_file()
    if kinds == "[block]":
        assert "mask" not in plan["meta"] and report["cost_split"]["mask_only"] == 1.0
        assert "split_search" not in plan["meta"]  # nothing to split: the block path is unchanged
    else:
        split = plan["meta"]["split_search"]
        assert split["chosen"] == min(split["scores"], key=split["scores"].get)
    if kinds == "[mask]":
        assert all(plan["compute"][0]) and report["cost_split"]["block_only"] == 1.0


def test_block_kinds_refuse_reuse() -> None:
    from dipgo.supernets.joint_block import check_block_kinds

    with pytest.raises(ValueError, match="block, mask"):
        check_block_kinds(["reuse", "mask"])
    with pytest.raises(ValueError, match="not reuse with block"):
        check_block_kinds(["reuse", "block"])


def test_encoder_hooks_compose_and_subnet_matches(tmp_path: Path) -> None:
    """MiniLM: BertLayer returns tuples; block and mask hooks still compose, and the SubNet with
    blocks removed equals the hard plan on the hooked model."""
    from dipgo.models.io import encoder_output

    cfg, _ = compose_config(["recipe=minilm_joint", f"runs_root={tmp_path}", "supernet.mask_calib_items=4",
                             "data.pool_size=8", "data.batch_size=4", "data.max_length=16"])
    loaded = load_configured_model(cfg)
    sn = BlockJointTask().build(loaded, cfg)
    assert len(sn.blocks) == 6 and all(".pooler" not in p for p in sn.layers)
    batch = calib_batch(sn, 4)
    with torch.no_grad():
        plain = encoder_output(sn.dense_model, batch)
    assert torch.allclose(sn.gated(batch, torch.ones(len(sn.slots)))["output"], plain, atol=1e-5)
    keep = [True, True, False, True, False, True]
    sub = subnet_of(sn, _block_only_plan(sn, keep))
    with torch.no_grad():
        assert torch.allclose(sn.hard(batch, keep, pruned=False), encoder_output(sub, batch), atol=1e-5)
    sn.remove()
