"""Step gates (one decision closes a whole step) and forced whole-step skips on DiTs."""

from __future__ import annotations

import pytest
import torch

from dipgo.errors import PlanError
from dipgo.postprocess.plan import Plan, ReusePayload
from dipgo.postprocess.reuse_plan import extract_reuse_plan
from dipgo.postprocess.reuse_subnet import install_plan
from dipgo.search.config import PrunerConfig
from dipgo.search.pruner import PrunerNetwork
from dipgo.supernets.gates import STEP_BLOCK
from dipgo.supernets.reuse import ReuseConfig, apply_reuse
from dipgo.supernets.sampling import make_model_fn, make_scheduler, sample
from tests.conftest import tiny_reuse_supernet


def test_step_gates_add_one_slot_per_step_that_closes_the_row() -> None:
    _, sn = tiny_reuse_supernet(6, step_gates=True, forecast_order=1)
    steps, blocks = sn.grid_shape
    assert len(sn.slots) == steps * blocks + steps
    assert [s.block for s in sn.slots[steps * blocks:]] == [STEP_BLOCK] * steps
    assert [s.step for s in sn.slots[steps * blocks:]] == list(range(1, 6))
    gates = torch.ones(len(sn.slots), dtype=torch.float64)
    gates[steps * blocks + 1] = 0.0  # close step 2 with its step gate only
    grid = sn.gate_grid(gates)
    assert grid.shape == (6, blocks)
    assert torch.equal(grid[2], torch.zeros(blocks, dtype=torch.float64))
    assert bool((grid[[0, 1, 3, 4, 5]] == 1).all())
    # the cost of the gated row is the hard cost of the same compute grid (a closed UNet step is free)
    assert float(sn.expected_cost(gates)) == pytest.approx(sn.plan_cost((grid > 0.5).tolist()))
    assert float(sn.expected_cost(gates)) == pytest.approx(5 / 6)
    sn.remove()


def test_step_gate_gradient_sees_the_whole_step() -> None:
    _, sn = tiny_reuse_supernet(6, step_gates=True, forecast_order=1)
    steps, blocks = sn.grid_shape
    gates = torch.ones(len(sn.slots), dtype=torch.float64, requires_grad=True)
    sn.expected_cost(gates).backward()
    step_grad = gates.grad[steps * blocks:]
    unit_grad = gates.grad[:steps * blocks].reshape(steps, blocks)
    # at open gates the step gate's gradient is the sum of its units' (it scales them all)
    assert torch.allclose(step_grad, unit_grad.sum(-1))
    assert bool((step_grad > 0).all())
    sn.remove()


def test_pruner_gives_step_gates_their_step_embedding() -> None:
    _, sn = tiny_reuse_supernet(5, step_gates=True)
    pruner = PrunerNetwork(sn.slots, PrunerConfig(d_model=16, num_heads=2, num_layers=1), grid=sn.grid_shape)
    assert pruner(None).shape == (len(sn.slots), 2)
    steps, blocks = sn.grid_shape
    before = pruner.slot_queries().detach().clone()
    with torch.no_grad():
        pruner.step_embedding[2] += 1.0  # the row of step 3
    delta = (pruner.slot_queries().detach() - before).abs().sum(-1)
    changed = {sn.slots[i].name for i in torch.nonzero(delta > 1e-6).flatten().tolist()}
    assert changed == {s.name for s in sn.slots if s.step == 3}  # its units and its step gate
    sn.remove()


def test_plan_from_step_gate_probabilities_meets_the_budget() -> None:
    _, sn = tiny_reuse_supernet(10, step_gates=True, forecast_order=1)
    steps, blocks = sn.grid_shape
    probs = torch.full((len(sn.slots),), 0.9, dtype=torch.float64)
    probs[steps * blocks:] = torch.tensor([0.1 if s % 2 else 0.95 for s in range(1, 10)], dtype=torch.float64)
    # half of the steps, plus less than the cheapest single unit: nothing of an odd step fits back
    cheapest = min(sn.step_macs([b == i for b in range(blocks)]) for i in range(blocks)) / sn.full_cost()
    target = 0.5 + 0.5 * cheapest
    plan = extract_reuse_plan(probs, sn, target)
    assert plan.cost_ratio <= target
    # the steps whose step gate is unlikely close first (and whole)
    for s in range(1, 10, 2):
        assert not any(plan.compute[s])
    with pytest.raises(PlanError, match="plus one gate per step"):
        extract_reuse_plan(torch.ones(steps * blocks + 1), sn, target)
    sn.remove()


def _tiny_dit() -> torch.nn.Module:
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                 num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=4).eval()


def _dit_batch() -> dict:
    g = torch.Generator().manual_seed(1)
    return {"noise": torch.randn(2, 4, 8, 8, generator=g), "class_labels": torch.tensor([1, 3])}


def test_forced_whole_step_skip_on_a_dit_costs_one_over_n_and_installs_identically() -> None:
    model, batch = _tiny_dit(), _dit_batch()
    plain = apply_reuse(model, ReuseConfig(num_steps=8, forecast_order=1), batch)
    assert not plain.skips_whole_steps  # the DiT head reads the timestep: skipping is opt-in
    blocks = len(plain.block_names)
    grid = [[s % 4 == 0] * blocks for s in range(8)]
    assert plain.plan_cost(grid) > 2 / 8  # the closed steps still pay embedding and head
    plain.remove()

    sn = apply_reuse(model, ReuseConfig(num_steps=8, forecast_order=1, whole_step_skip=True), batch)
    assert sn.skips_whole_steps
    assert sn.plan_cost(grid) == pytest.approx(2 / 8)
    expected = sn.sample(batch, torch.tensor(grid))
    # the soft trajectory at 0/1 gates equals the hard one
    with torch.no_grad():
        soft = sn.gated(batch, torch.tensor(grid[1:], dtype=torch.float32).flatten())["output"]
    torch.testing.assert_close(soft, expected, rtol=0, atol=1e-5)
    sn.remove()

    meta = {**ReusePayload("block", "auto", sn.modes, 1, True).to_meta(), "scheduler": "ddim"}
    assert meta["whole_step_skip"] is True
    plan = Plan(kind="reuse", model=sn.model_class, blocks=sn.block_names, compute=grid, target=1.0,
                cost_ratio=2 / 8, num_steps=8, meta=meta)
    calls: list[int] = []
    hook = model.proj_out_2.register_forward_hook(lambda *_: calls.append(1))
    with install_plan(model, plan):
        with torch.no_grad():
            final, _ = sample(make_model_fn(model), make_scheduler("ddim"), batch, 8, null_class=4)
    hook.remove()
    assert len(calls) == 2, "the head runs only at the two computed steps"
    assert torch.equal(final, expected)
    assert "forward" not in model.__dict__


def test_whole_step_skip_payload_is_written_only_when_set() -> None:
    assert "whole_step_skip" not in ReusePayload("block", "auto", None, 1).to_meta()
    assert ReusePayload.from_meta({"whole_step_skip": False}).whole_step_skip is False
    with pytest.raises(PlanError, match="whole_step_skip must be true, false or absent, got 'yes'"):
        ReusePayload.from_meta({"whole_step_skip": "yes"})


def test_step_gates_train_through_the_search(tiny_unet_dir, tmp_path) -> None:
    from dipgo.search.compose import compose_config
    from dipgo.search.run import run_search
    from tests.conftest import tiny_search_overrides

    cfg, _ = compose_config(tiny_search_overrides(tiny_unet_dir, tmp_path, **{
        "trainer.max_steps": 2, "supernet.step_gates": True, "supernet.forecast_order": 1}))
    result = run_search(cfg, quiet=True)
    plan = Plan.load(result.run_dir / "plan.json")
    assert plan.cost_ratio <= cfg.search.target + 1e-9
    assert len(plan.compute) == cfg.supernet.num_steps


def test_pruner_init_prior_starts_at_the_whole_steps_schedule() -> None:
    from dipgo.search.pruner import keep_probs

    _, sn = tiny_reuse_supernet(10, forecast_order=1)
    keep = sn.prior_keep(0.3)  # K = 3 whole steps of 10: steps 0, 3, 7 (step 0 is never gated)
    assert sn.whole_steps_rows(0.3) == {0, 3, 7}
    rows = sorted({s.step for s, k in zip(sn.slots, keep.tolist()) if k})
    assert rows == [3, 7]
    cfg = PrunerConfig(d_model=16, num_heads=2, num_layers=1, init="prior")
    pruner = PrunerNetwork(sn.slots, cfg, grid=sn.grid_shape)
    pruner.start_at(keep)
    probs = keep_probs(pruner(None))
    assert bool((probs[keep] > 0.9).all()) and bool((probs[~keep] < 0.1).all())
    # the start meets the budget: every 3rd-ish step whole, a closed UNet step is free
    assert float(sn.expected_cost((probs > 0.5).double())) == pytest.approx(0.3)
    # round(0.35 * 10) = 4 whole steps would cost 0.4: the start stays within the budget instead
    rows35 = {0} | {s.step for s, k in zip(sn.slots, sn.prior_keep(0.35).tolist()) if k}
    assert rows35 == {0, 3, 7}
    for target in (0.15, 0.25, 0.35, 0.45, 0.55):
        rows = {0} | {s.step for s, k in zip(sn.slots, sn.prior_keep(target).tolist()) if k}
        grid = [[st in rows] * len(sn.units) for st in range(sn.num_steps)]
        assert sn.plan_cost(grid) < target + 0.25 / sn.num_steps
    with pytest.raises(ValueError, match="start_at needs one keep value per slot"):
        pruner.start_at(keep[:-1])
    with pytest.raises(ValueError, match="pruner.init must be one of all, prior; got 'warm'"):
        PrunerConfig(init="warm")
    sn.remove()
