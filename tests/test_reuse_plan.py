"""Reuse plans: budget-exact extraction, validation, the SubNet on a plain diffusers model, save/load."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler, DiTTransformer2DModel

from dipgo.errors import PlanError
from dipgo.postprocess.plan import Plan
from dipgo.postprocess.reuse_plan import extract_reuse_plan, validate_plan
from dipgo.postprocess.reuse_subnet import ReuseSubNet, install_plan
from dipgo.supernets.reuse import ReuseConfig, apply_reuse, remove_reuse
from dipgo.supernets.sampling import make_model_fn, make_scheduler, sample
from tests.conftest import tiny_reuse_supernet, tiny_reuse_unet, unet_batch


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread: None) -> None:
    """Tiny models: intra-op threads only add contention (see conftest.one_torch_thread)."""


def random_probs(sn, seed: int = 0) -> torch.Tensor:
    return torch.rand(len(sn.slots), generator=torch.Generator().manual_seed(seed))  # (N,)


@pytest.mark.parametrize("target", [0.3, 0.5, 0.8])
def test_plan_lands_just_below_target(target: float) -> None:
    _, sn = tiny_reuse_supernet(20, guidance_scale=2.0)
    plan = extract_reuse_plan(random_probs(sn), sn, target, meta={"seed": 0})
    # the gap is smaller than what any one slot costs (a slot in a fully closed UNet step also
    # brings back the step's stem and head, which such a step otherwise skips)
    one_slot = (sn.always_paid_macs + max(sn.unit_macs)) / sn.full_cost()
    assert target - one_slot <= plan.cost_ratio <= target
    assert plan.cost_ratio == pytest.approx(sn.plan_cost(plan.compute))
    assert all(plan.compute[0]) and len(plan.compute) == 20 and plan.num_steps == 20
    assert plan.meta["granularity"] == "block" and plan.meta["seed"] == 0
    # the plan grid is already cascade-repaired: applying the cascade changes nothing
    eff = sn.effective(torch.tensor(plan.compute, dtype=torch.float64)) > 0.5
    assert eff.tolist() == plan.compute
    Plan.from_dict(plan.to_dict())  # plain JSON data round-trips


def test_plan_follows_probabilities() -> None:
    _, sn = tiny_reuse_supernet(6)
    probs = torch.ones(sn.grid_shape)
    probs[:, 0] = 0.1  # down_blocks.0 is the least wanted everywhere
    plan = extract_reuse_plan(probs, sn, 0.95)
    closed = [(s, b) for s, row in enumerate(plan.compute) for b, v in enumerate(row) if not v]
    assert closed and all(b == 0 for _, b in closed)  # only the least wanted block closes


def test_unreachable_target_and_bad_inputs() -> None:
    _, sn = tiny_reuse_supernet(6)
    with pytest.raises(PlanError, match="smallest reachable cost"):
        extract_reuse_plan(random_probs(sn), sn, 0.05)
    with pytest.raises(PlanError, match="slots"):
        extract_reuse_plan(torch.rand(3), sn, 0.5)


def test_validate_plan_names_the_mismatch() -> None:
    _, sn = tiny_reuse_supernet(6)
    plan = extract_reuse_plan(random_probs(sn), sn, 0.6)
    validate_plan(plan, sn)
    other_steps = Plan(**{**plan.to_dict(), "num_steps": 5, "compute": plan.compute[:5]})
    with pytest.raises(PlanError, match="6 sampling steps|5 sampling steps"):
        validate_plan(other_steps, sn)
    dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=4)
    dit_sn = apply_reuse(dit, ReuseConfig(num_steps=6), {"noise": torch.randn(1, 4, 8, 8),
                                                         "class_labels": torch.tensor([1])})
    with pytest.raises(PlanError, match="UNet2DModel.*DiTTransformer2DModel"):
        validate_plan(plan, dit_sn)
    with pytest.raises(PlanError, match="UNet2DModel.*DiTTransformer2DModel"):
        remove_reuse(dit)
        install_plan(dit, plan)
    renamed = Plan(**{**plan.to_dict(), "blocks": [*plan.blocks[:-1], "up_blocks.9"]})
    with pytest.raises(PlanError, match="blocks do not match"):
        validate_plan(renamed, sn)


def test_install_plan_equals_supernet_hard_and_soft() -> None:
    model, sn = tiny_reuse_supernet(8, scheduler="euler", guidance_scale=2.5)
    batch = unet_batch(3)
    plan = extract_reuse_plan(random_probs(sn, 1), sn, 0.5)
    hard = sn.sample(batch, plan.compute)
    soft = sn.gated(batch, torch.tensor(plan.compute)[1:].flatten().float())["output"]
    torch.testing.assert_close(hard, soft, rtol=1e-5, atol=1e-5)
    remove_reuse(model)
    subnet = ReuseSubNet(model, plan, scheduler="euler", guidance_scale=2.5)
    assert torch.equal(subnet.sample(batch), hard)
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_save_load_bit_identical(tmp_path) -> None:
    model, sn = tiny_reuse_supernet(10, scheduler="dpmsolver++", guidance_scale=2.0)
    plan = extract_reuse_plan(random_probs(sn, 2), sn, 0.5)
    remove_reuse(model)
    sched_cfg = dict(make_scheduler("dpmsolver++").config)
    subnet = ReuseSubNet(model, plan, scheduler="dpmsolver++", scheduler_config=sched_cfg,
                         guidance_scale=2.0, source="tiny-unet")
    batch = unet_batch(5)
    first = subnet.sample(batch)
    subnet.save(tmp_path / "subnet")
    assert sorted(p.name for p in (tmp_path / "subnet").iterdir()) == ["plan.json", "subnet.json"]
    loaded = ReuseSubNet.load(tmp_path / "subnet", tiny_reuse_unet())
    assert loaded.source == "tiny-unet" and loaded.plan == plan
    assert torch.equal(loaded.sample(batch), first)
    with pytest.raises(PlanError, match="UNet2DModel.*DiTTransformer2DModel"):
        ReuseSubNet.load(tmp_path / "subnet", DiTTransformer2DModel(num_layers=1, sample_size=8, in_channels=4,
                                                                     num_attention_heads=1, attention_head_dim=8))


def test_install_plan_in_ddim_pipeline() -> None:
    unet = tiny_reuse_unet(class_embeds=None)
    scheduler = DDIMScheduler()
    pipe = DDIMPipeline(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    steps = 8

    def run() -> torch.Tensor:
        return pipe(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=steps,
                    output_type="pt").images  # (B, C, H, W) in [0, 1]

    full = run()
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    sn = apply_reuse(unet, ReuseConfig(num_steps=steps, scheduler_config=dict(pipe.scheduler.config)), {"noise": noise})
    plan = extract_reuse_plan(random_probs(sn, 4), sn, 0.5)
    expected = (sn.sample({"noise": noise}, plan.compute) / 2 + 0.5).clamp(0, 1)
    remove_reuse(unet)

    counter = {"calls": 0}
    unet.mid_block.resnets[0].register_forward_pre_hook(lambda *_: counter.__setitem__("calls", counter["calls"] + 1))
    handle = install_plan(unet, plan, steps)
    first, second = run(), run()  # the second trajectory is detected by the timestep going back up
    handle.remove()
    torch.testing.assert_close(first, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(first, second)
    assert counter["calls"] == 2 * sum(row[3] for row in plan.compute) < 2 * steps
    assert torch.equal(run(), full)
    with install_plan(unet, plan) as handle, pytest.raises(PlanError, match="made for 8 sampling steps"):
        pipe(batch_size=1, num_inference_steps=steps + 2, output_type="pt")
    assert handle.current_step == steps and all("forward" not in m.__dict__ for m in unet.modules())


def test_plain_loop_matches_pipeline_for_ddim() -> None:
    """dipgo's loop and diffusers' DDIMPipeline agree on the plain model (same noise, eta 0)."""
    unet = tiny_reuse_unet(class_embeds=None)
    pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=1, generator=torch.Generator().manual_seed(0), num_inference_steps=4, output_type="pt").images
    noise = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        final, eps = sample(make_model_fn(unet), make_scheduler("ddim", dict(pipe.scheduler.config)), {"noise": noise}, 4)
    assert eps.shape == (4, 1, 3, 8, 8)
    torch.testing.assert_close((final / 2 + 0.5).clamp(0, 1), images, rtol=1e-5, atol=1e-5)
