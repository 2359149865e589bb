"""Static cache baselines as reuse Plans (DeepCache, uniform/FORA, static per-block, random) and
diffusers' own cache hooks, on tiny random-weight models."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DiTTransformer2DModel, UNet2DModel

from dipgo.postprocess.plan import Plan
from dipgo.postprocess.reuse_baselines import (
    PLAN_BASELINES,
    BaselineNotApplicable,
    baseline_plans,
    block_change_scores,
    deepcache_plan,
    diffusers_cache_reason,
    diffusers_cache_variant,
    measure_cache_variant,
    random_plan,
    static_per_block_plan,
    uniform_reuse_plan,
)
from dipgo.postprocess.reuse_subnet import install_plan
from dipgo.supernets.reuse import ReuseConfig, apply_reuse
from dipgo.supernets.sampling import make_model_fn, make_scheduler, sample

STEPS = 10
UNET_BLOCKS = ["down_blocks.0", "down_blocks.1", "down_blocks.2", "mid_block", "up_blocks.0", "up_blocks.1", "up_blocks.2"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread: None) -> None:
    """Tiny models: intra-op threads only add contention (see conftest.one_torch_thread)."""


def tiny_unet() -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4,
    ).eval()


def tiny_dit(layers: int = 4) -> DiTTransformer2DModel:
    torch.manual_seed(0)
    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                 num_layers=layers, sample_size=8, patch_size=2, num_embeds_ada_norm=4).eval()


def make_batch(kind: str) -> dict:
    g = torch.Generator().manual_seed(1)
    if kind == "unet":
        return {"noise": torch.randn(2, 1, 8, 8, generator=g)}
    return {"noise": torch.randn(2, 4, 8, 8, generator=g), "class_labels": torch.tensor([1, 3])}


def build(kind: str, steps: int = STEPS, **config):
    model = tiny_unet() if kind == "unet" else tiny_dit()
    batch = make_batch(kind)
    return model, apply_reuse(model, ReuseConfig(num_steps=steps, **config), batch), batch


def plain_sample(model, batch: dict, steps: int = STEPS, guidance: float = 1.0) -> torch.Tensor:
    with torch.no_grad():
        final, _ = sample(make_model_fn(model), make_scheduler("ddim"), batch, steps, guidance, null_class=4)
    return final


def check_plan(plan: Plan, sn) -> None:
    assert plan.kind == "reuse" and plan.num_steps == sn.num_steps and plan.blocks == sn.block_names
    assert all(plan.compute[0])
    assert plan.cost_ratio == pytest.approx(sn.plan_cost(plan.compute)) == plan.meta["cost_ratio"]
    # the stored grid is already cascade-applied: what it says is what runs
    assert (sn.effective(torch.tensor(plan.compute, dtype=torch.float64)) > 0.5).tolist() == plan.compute
    assert plan.meta["baseline"] in PLAN_BASELINES and plan.meta["label"] and "params" in plan.meta
    assert Plan.from_dict(plan.to_dict()) == plan


def test_deepcache_pattern_and_cascade() -> None:
    _, sn, _ = build("unet")
    assert sn.block_names == UNET_BLOCKS
    full = deepcache_plan(sn, 1, 1)
    assert all(all(row) for row in full.compute) and full.cost_ratio == pytest.approx(1.0)
    plan = deepcache_plan(sn, 3, 1)
    check_plan(plan, sn)
    shallow = [True, False, False, False, False, False, True]  # down_blocks.0 and the last up block
    assert plan.compute == [[True] * 7 if s % 3 == 0 else shallow for s in range(STEPS)]
    assert plan.meta["params"] == {"interval": 3, "branch": 1}
    # branch 2: the two shallow levels run; down_blocks.2, mid and up_blocks.0 come from the cache
    two = deepcache_plan(sn, 2, 2)
    assert two.compute[1] == [True, True, False, False, False, True, True] and all(two.compute[2])
    assert deepcache_plan(sn, 4, 3).compute[1] == [True, True, True, False, True, True, True]
    with pytest.raises(ValueError, match="branch must be"):
        deepcache_plan(sn, 2, 4)
    with pytest.raises(ValueError, match="interval must be"):
        deepcache_plan(sn, 0, 1)


def test_deepcache_skips_deep_blocks_on_the_plain_model() -> None:
    model, sn, batch = build("unet")
    plan = deepcache_plan(sn, 3, 1)
    expected = sn.sample(batch, torch.tensor(plan.compute))
    sn.remove()
    counts = {name: 0 for name in UNET_BLOCKS}
    for name in UNET_BLOCKS:  # a conv inside the block runs only when the block really executes
        conv = next(m for m in model.get_submodule(name).modules() if isinstance(m, torch.nn.Conv2d))
        conv.register_forward_pre_hook(lambda *_, n=name: counts.__setitem__(n, counts[n] + 1))
    with install_plan(model, plan, STEPS):
        out = plain_sample(model, batch)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected)
    full_steps = math.ceil(STEPS / 3)
    assert counts == {"down_blocks.0": STEPS, "down_blocks.1": full_steps, "down_blocks.2": full_steps,
                      "mid_block": full_steps, "up_blocks.0": full_steps, "up_blocks.1": full_steps,
                      "up_blocks.2": STEPS}


def test_deepcache_refused_on_dit() -> None:
    _, sn, batch = build("dit")
    with pytest.raises(ValueError, match="deepcache needs a UNet"):
        deepcache_plan(sn, 2, 1)
    plans, skipped = baseline_plans(sn, 0.5, ["deepcache", "uniform"])
    assert list(plans) == ["uniform"] and "transformer" in skipped["deepcache"]


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_uniform_cost(kind: str) -> None:
    _, sn, _ = build(kind)
    call = sn.full_cost() / STEPS
    for n in (1, 2, 3, 4):
        plan = uniform_reuse_plan(sn, n)
        check_plan(plan, sn)
        full = math.ceil(STEPS / n)
        assert sum(all(row) for row in plan.compute) == full
        # reused steps still run the stem and head, except on a UNet, which skips them whole
        paid = 0.0 if sn.skips_whole_steps else sn.always_paid_macs
        assert plan.cost_ratio == pytest.approx((full * call + (STEPS - full) * paid) / sn.full_cost())
    assert sn.skips_whole_steps == (kind == "unet")


def test_baseline_plans_land_at_target() -> None:
    _, sn, batch = build("unet", steps=20)
    plans, skipped = baseline_plans(sn, 0.5, list(PLAN_BASELINES), calib_batch=batch)
    assert not skipped and list(plans) == list(PLAN_BASELINES)
    for name, plan in plans.items():
        check_plan(plan, sn)
        assert plan.target == 0.5 and plan.meta["baseline"] == name
        assert abs(plan.cost_ratio - 0.5) <= 0.02, name
        assert plan.cost_ratio <= 0.5 * 1.02 + 1e-9
    # the interval searches pick the closest schedule in the grid that is not over budget by > 2%
    costs = {(n, b): deepcache_plan(sn, n, b).cost_ratio for n in range(2, 11) for b in (1, 2, 3)}
    allowed = {k: c for k, c in costs.items() if c <= 0.51 + 1e-9}
    best = min(allowed.values(), key=lambda c: abs(c - 0.5))
    assert plans["deepcache"].cost_ratio == pytest.approx(best)
    assert plans["deepcache"].meta["searched"] == 27


def test_baseline_plans_errors() -> None:
    _, sn, _ = build("unet")
    with pytest.raises(ValueError, match="deepcache, uniform, static_per_block, random"):
        baseline_plans(sn, 0.5, ["deepcache", "fewer_steps"])
    with pytest.raises(ValueError, match="calib_batch"):
        baseline_plans(sn, 0.5, ["static_per_block"])
    plans, skipped = baseline_plans(sn, 0.001, ["random", "uniform"])
    assert not plans and "smallest reachable cost" in skipped["random"] and "uniform" in skipped


def test_random_plan_reproducible_and_within_budget() -> None:
    _, sn, _ = build("unet")
    for target in (0.3, 0.6):
        a, b = random_plan(sn, target, 7), random_plan(sn, target, 7)
        check_plan(a, sn)
        assert a.compute == b.compute and a.cost_ratio <= target + 1e-9
    assert random_plan(sn, 0.6, 7).compute != random_plan(sn, 0.6, 8).compute
    with pytest.raises(BaselineNotApplicable):
        random_plan(sn, 0.001, 0)


def test_static_per_block_follows_change_scores() -> None:
    _, sn, batch = build("dit", guidance_scale=2.0)
    measured = block_change_scores(sn, batch)
    assert set(measured) == set(sn.block_names)
    assert all(math.isfinite(v) and v > 0 for v in measured.values())
    # residual DiT blocks of equal MACs: only the scores tell them apart
    scores = {"transformer_blocks.0": 0.1, "transformer_blocks.1": 0.2, "transformer_blocks.2": 0.4,
              "transformer_blocks.3": 0.8}
    plan = static_per_block_plan(sn, 0.5, scores)
    check_plan(plan, sn)
    intervals = [plan.meta["params"]["intervals"][b] for b in sn.block_names]
    assert intervals == sorted(intervals, reverse=True) and intervals[0] > intervals[-1]
    assert plan.cost_ratio <= 0.5 + 1e-9
    closed = [sum(not row[b] for row in plan.compute) for b in range(4)]
    assert closed[0] >= closed[-1]
    with pytest.raises(ValueError, match="missing"):
        static_per_block_plan(sn, 0.5, {"transformer_blocks.0": 1.0})


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_plans_run_on_plain_model(kind: str) -> None:
    model, sn, batch = build(kind, guidance_scale=2.0)
    plans, _ = baseline_plans(sn, 0.5, list(PLAN_BASELINES), calib_batch=batch)
    expected = {name: sn.sample(batch, torch.tensor(p.compute), forecast_order=p.payload.forecast_order)
                for name, p in plans.items()}
    sn.remove()
    for name, plan in plans.items():
        with install_plan(model, plan, STEPS):
            out = plain_sample(model, batch, guidance=2.0)
        assert torch.isfinite(out).all(), name
        torch.testing.assert_close(out, expected[name], rtol=1e-5, atol=1e-5)


def test_first_block_cache_on_dit_measured() -> None:
    model, batch = tiny_dit(layers=2), make_batch("dit")
    reference = plain_sample(model, batch, guidance=2.0)
    trajectory = lambda: plain_sample(model, batch, guidance=2.0)  # noqa: E731
    # a huge threshold: after step 0 only the first block runs, the rest replays its cached residual
    result = measure_cache_variant(model, "first_block_cache", trajectory, threshold=1e9)
    assert result["units"] == ["transformer_blocks.0", "transformer_blocks.1"]
    assert result["unit_calls"] == 2 * STEPS
    assert result["executed_fraction"] == pytest.approx((2 + (STEPS - 1)) / (2 * STEPS))
    assert result["macs_ratio"] < 1.0
    with diffusers_cache_variant(model, "pyramid_attention_broadcast",
                                 spatial_attention_timestep_skip_range=(-1, 1001)) as variant:
        out = trajectory()
    assert torch.isfinite(out).all() and variant.executed_fraction == pytest.approx(0.5)
    # the model is the plain diffusers model again
    assert torch.equal(trajectory(), reference)
    assert not any("forward" in m.__dict__ or hasattr(m, "_diffusers_hook") for m in model.modules())


def test_diffusers_hooks_on_unet() -> None:
    model = tiny_unet()
    assert "down_blocks" in diffusers_cache_reason(model, "first_block_cache")
    assert "no attention layers" in diffusers_cache_reason(model, "faster_cache")
    assert diffusers_cache_reason(model, "pyramid_attention_broadcast") is None  # its attentions match "blocks"
    with pytest.raises(BaselineNotApplicable):
        with diffusers_cache_variant(model, "first_block_cache"):
            pass
    with pytest.raises(ValueError, match="expected one of"):
        with diffusers_cache_variant(model, "teacache"):
            pass
    with pytest.raises(ValueError, match="accepts"):
        with diffusers_cache_variant(model, "pyramid_attention_broadcast", bogus=1):
            pass
    assert not any("forward" in m.__dict__ or hasattr(m, "_diffusers_hook") for m in model.modules())
