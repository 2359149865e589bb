"""A reuse plan in a real diffusers pipeline (a tiny random-weight DiTPipeline with true CFG)."""

from __future__ import annotations

import pytest
import torch

from dipgo.errors import PlanError
from dipgo.postprocess import enable
from dipgo.postprocess.plan import Plan
from dipgo.supernets.reuse import ReuseConfig, apply_reuse
from tests.conftest import _tiny_vae

STEPS = 6


def _pipe(scheduler: str = "ddim"):
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel, UniPCMultistepScheduler

    torch.manual_seed(0)
    dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=1000).eval()  # DiTPipeline: null class 1000
    sched = DDIMScheduler() if scheduler == "ddim" else UniPCMultistepScheduler()
    return DiTPipeline(transformer=dit, vae=_tiny_vae().eval(), scheduler=sched)


def _plan(pipe, every: int) -> Plan:
    batch = {"noise": torch.randn(1, 4, 8, 8), "class_labels": torch.tensor([1])}
    sn = apply_reuse(pipe.transformer, ReuseConfig(num_steps=STEPS, forecast_order=1), batch)
    blocks = len(sn.block_names)
    compute = [[s % every == 0] * blocks for s in range(STEPS)]
    plan = Plan(kind="reuse", model=sn.model_class, blocks=sn.block_names, compute=compute, target=1.0,
                cost_ratio=sn.plan_cost(compute), num_steps=STEPS,
                meta={"granularity": "block", "mode": "auto", "modes": sn.modes, "forecast_order": 1,
                      "scheduler": "ddim"})
    sn.remove()
    return plan


def _run(pipe, labels: list[int]) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        return pipe(class_labels=labels, num_inference_steps=STEPS, guidance_scale=3.0, generator=g,
                    output_type="np").images


def test_full_plan_in_a_pipeline_changes_nothing() -> None:
    pipe = _pipe()
    plain = _run(pipe, [1, 2])
    with enable(pipe, _plan(pipe, every=1)):
        assert (_run(pipe, [1, 2]) == plain).all()


def test_plan_in_a_pipeline_is_repeatable_and_reinstallable() -> None:
    pipe = _pipe()
    plain = _run(pipe, [1, 2])
    plan = _plan(pipe, every=3)
    handle = enable(pipe, plan)
    first = _run(pipe, [1, 2])
    assert not (first == plain).all(), "a plan that reuses 4 of 6 steps must change the images"
    assert (_run(pipe, [1, 2]) == first).all(), "a second call starts a fresh trajectory"
    single = _run(pipe, [1])  # another batch size in between
    assert single.shape[0] == 1
    assert (_run(pipe, [1, 2]) == first).all()
    handle.remove()
    assert (_run(pipe, [1, 2]) == plain).all(), "remove() restores the pipeline exactly"
    with enable(pipe, plan):
        assert (_run(pipe, [1, 2]) == first).all(), "a re-install equals the first install"


def test_enable_refuses_another_sampler_and_a_pipeline_without_denoiser() -> None:
    pipe = _pipe("unipc")
    plan = _plan(pipe, every=2)
    with pytest.raises(PlanError, match="^plan was searched on the ddim sampler but the pipeline's scheduler is unipc"):
        enable(pipe, plan)
    with pytest.raises(PlanError, match="^object has no unet or transformer"):
        enable(object(), plan)


def test_separate_cond_and_uncond_calls_keep_separate_caches() -> None:
    """A loop that calls the denoiser twice per step (cond, then uncond, same timestep) gives what
    one batched CFG call per step gives: each pass reuses its own cached features."""
    from diffusers import DDIMScheduler

    from dipgo.postprocess.reuse_subnet import install_plan
    from tests.conftest import tiny_reuse_supernet

    model, sn = tiny_reuse_supernet(8, forecast_order=1)
    blocks = len(sn.block_names)
    compute = [[True] * blocks] + [[(b + s) % 3 != 0 for b in range(blocks)] for s in range(1, 8)]
    plan = Plan(kind="reuse", model=sn.model_class, blocks=sn.block_names, compute=compute, target=1.0,
                cost_ratio=sn.plan_cost(compute), num_steps=8,
                meta={"granularity": "block", "mode": "auto", "modes": sn.modes, "forecast_order": 1})
    sn.remove()
    noise = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    cond, null = torch.tensor([1]), torch.tensor([2])

    def run(batched: bool) -> torch.Tensor:
        sched = DDIMScheduler()
        sched.set_timesteps(8)
        x = noise.clone()
        for t in sched.timesteps:
            if batched:
                both = model(torch.cat([x, x]), t, class_labels=torch.cat([cond, null])).sample
                eps_c, eps_u = both.chunk(2)
            else:
                eps_c = model(x, t, class_labels=cond).sample
                eps_u = model(x, t, class_labels=null).sample
            x = sched.step(eps_u + 3.0 * (eps_c - eps_u), t, x).prev_sample
        return x

    with torch.no_grad(), install_plan(model, plan):
        batched, separate = run(True), run(False)
    with torch.no_grad():
        plain = run(False)
    assert (separate - plain).abs().max() > 1e-3, "the plan reuses blocks: it must differ from the full model"
    torch.testing.assert_close(separate, batched, rtol=0, atol=1e-4)
