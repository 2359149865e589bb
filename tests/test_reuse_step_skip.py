"""A step where every block is reused skips the whole UNet call, with bit-identical output."""

from __future__ import annotations

import torch

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
