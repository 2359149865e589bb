"""Regional torch.compile of a SubNet: the blocks compile whole, dipgo's decisions stay outside them.

Dynamo is exercised with ``backend="eager"`` (it traces and guards exactly as for inductor, but
generates no code), so these run in seconds; the inductor timings are `dipgo bench --compile`'s.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from diffusers import DDIMScheduler

from dipgo.errors import PlanError
from dipgo.postprocess.compile import compile_blocks, compile_stats
from dipgo.postprocess.reuse_subnet import install_plan
from tests.conftest import tiny_reuse_supernet
from tests.test_pipelines import _deep_every, _plan

STEPS = 6


def _sample(model: torch.nn.Module, noise: torch.Tensor) -> torch.Tensor:
    sched = DDIMScheduler()
    sched.set_timesteps(STEPS)
    x = noise.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(model(x, t, class_labels=torch.tensor([1, 2])).sample, t, x).prev_sample
    return x


@pytest.fixture()
def planned_model() -> tuple[torch.nn.Module, Any]:
    model, sn = tiny_reuse_supernet(STEPS)
    sn.remove()
    # DeepCache's pattern (closing every up block would let the cascade close the whole step)
    plan = _plan(model, STEPS, _deep_every(3, ("down_blocks.2", "mid_block", "up_blocks.0")))
    return model, plan


def test_compiled_blocks_give_the_eager_result_without_graph_breaks_or_recompiles(planned_model: Any) -> None:
    model, plan = planned_model
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with install_plan(model, plan):
        eager = _sample(model, noise)
    torch._dynamo.reset()
    with compile_blocks(model, backend="eager") as blocks:
        with compile_stats(STEPS, blocks) as first, install_plan(model, plan):
            compiled = _sample(model, noise)
        with compile_stats(STEPS, blocks) as again, install_plan(model, plan):
            twice = _sample(model, noise)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-5)
    assert torch.equal(twice, compiled)
    assert first[0].graphs > 0 and first[0].graph_breaks == 0  # fullgraph: a break would have raised
    assert again[0].graphs == 0, "a second trajectory must run on the graphs already compiled"
    # each block call is one compiled graph; the plan's closed slots are not called at all
    computed = sum(sum(row) for row in plan.compute)
    assert first[0].compiled_calls_per_step == pytest.approx(computed / STEPS)
    assert computed < STEPS * len(plan.blocks)


def test_compile_after_install_is_refused_and_remove_restores_eager_forwards(planned_model: Any) -> None:
    model, plan = planned_model
    with install_plan(model, plan), pytest.raises(PlanError, match="compile the blocks before installing the plan"):
        compile_blocks(model, backend="eager")
    blocks = compile_blocks(model, backend="eager")
    assert all("forward" in model.get_submodule(n).__dict__ for n in blocks.names)
    with install_plan(model, plan):  # the plan's hooks wrap the compiled forwards and give them back
        pass
    assert all("forward" in model.get_submodule(n).__dict__ for n in blocks.names)
    blocks.remove()
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_whole_model_compile_with_the_plan_is_what_regional_compile_avoids(planned_model: Any) -> None:
    """For contrast: ``model.compile()`` over the plan's hooks traces dipgo's per-step Python."""
    model, plan = planned_model
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with install_plan(model, plan):
        eager = _sample(model, noise)
    torch._dynamo.reset()
    model.compile(backend="eager")
    try:
        with compile_stats(STEPS) as stats, install_plan(model, plan):
            whole = _sample(model, noise)
    finally:
        model._compiled_call_impl = None
        torch._dynamo.reset()
    torch.testing.assert_close(whole, eager, rtol=0, atol=1e-5)
    assert stats[0].graph_breaks > 0
