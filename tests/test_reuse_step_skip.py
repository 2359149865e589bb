"""A step where every block is reused skips the whole UNet call, with bit-identical output."""

from __future__ import annotations

import pytest
import torch

from dipgo.errors import PlanError
from dipgo.postprocess.plan import Plan
from dipgo.postprocess.reuse_subnet import install_plan
from dipgo.supernets.sampling import make_model_fn, make_scheduler, sample
from tests.conftest import tiny_reuse_supernet, unet_batch


def _uniform_plan(sn, interval: int) -> Plan:
    steps, blocks = sn.num_steps, len(sn.block_names)
    compute = [[s % interval == 0] * blocks for s in range(steps)]
    return Plan(kind="reuse", model=sn.model_class, blocks=sn.block_names, compute=compute, target=1.0,
                cost_ratio=sn.plan_cost(compute), num_steps=steps,
                meta={"granularity": "block", "mode": "auto", "modes": sn.modes})


def test_fully_reused_steps_skip_the_call_exactly() -> None:
    model, sn = tiny_reuse_supernet(8)
    plan = _uniform_plan(sn, interval=3)  # steps 0, 3, 6 computed
    batch = unet_batch()
    expected = sn.sample(batch, torch.tensor(plan.compute))
    sn.remove()

    calls: list[int] = []
    hook = model.conv_out.register_forward_hook(lambda *_: calls.append(1))
    with install_plan(model, plan):
        with torch.no_grad():
            final, eps = sample(make_model_fn(model), make_scheduler("ddim"), batch, 8, null_class=3)
    hook.remove()
    assert len(calls) == 3, "the head must run only at the computed steps"
    assert torch.equal(final, expected)
    # a reused step returns exactly the previous step's noise prediction
    assert torch.equal(eps[1], eps[0]) and torch.equal(eps[2], eps[0]) and not torch.equal(eps[3], eps[2])
    # the model is plain again afterwards
    assert "forward" not in model.__dict__


def test_a_fully_closed_unet_step_costs_nothing_and_soft_gates_agree() -> None:
    model, sn = tiny_reuse_supernet(8, forecast_order=1)
    assert sn.skips_whole_steps
    blocks = len(sn.block_names)
    grid = [[s % 3 == 0] * blocks for s in range(8)]  # 3 full steps of 8
    assert sn.plan_cost(grid) == pytest.approx(3 / 8)
    assert sn.step_macs([False] * blocks) == 0.0 and sn.step_macs([True] * blocks) > 0.0
    # the differentiable cost equals the hard one at 0/1 gates and pulls whole rows shut
    gates = torch.tensor(grid[1:], dtype=torch.float64).flatten().requires_grad_(True)
    cost = sn.expected_cost(gates)
    assert float(cost.detach()) == pytest.approx(3 / 8)
    cost.backward()
    last = gates.grad.reshape(7, blocks)[0, -1]  # step 1, the unit feeding the head (others cascade away)
    # opening it in a closed step also brings back the step's stem and head
    assert float(last) == pytest.approx((sn.unit_macs[-1] + sn.always_paid_macs) / sn.full_cost())
    # the soft trajectory at 0/1 gates is the hard one (whole-step forecast included)
    batch = unet_batch()
    with torch.no_grad():
        soft = sn.gated(batch, gates.detach().float())["output"]
    torch.testing.assert_close(soft, sn.sample(batch, grid), rtol=0, atol=1e-6)


def test_plan_from_another_sampler_is_refused() -> None:
    model, sn = tiny_reuse_supernet(8)
    plan = _uniform_plan(sn, interval=2)
    plan.meta["scheduler"] = "ddim"
    sn.remove()
    with pytest.raises(PlanError) as info:
        install_plan(model, plan, scheduler="unipc")
    assert str(info.value) == ("plan was searched on the ddim sampler but unipc is used: sample with "
                               "supernet.scheduler=ddim or search a plan for unipc")
    assert "forward" not in model.__dict__  # nothing was installed
    install_plan(model, plan, scheduler="ddim").remove()
