"""Reuse plans in the diffusers pipelines users run, each against a hand-computed reference.

Every pipeline is a tiny random-weight one built here (no download). The reference is the plan's
semantics written out independently of dipgo: plain torch forward hooks that, at a step where the
plan closes a unit, replace the unit's fresh output by its cached output (output mode) or by
today's input plus its cached residual (residual mode), one cache per pass (cond / uncond).
Grids are chosen so that dipgo's dependency cascade closes nothing more than the grid says.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from dipgo.errors import PlanError
from dipgo.postprocess import enable
from dipgo.postprocess.plan import Plan, ReusePayload
from dipgo.postprocess.reuse_plan import resample_grid
from dipgo.postprocess.reuse_subnet import install_plan
from dipgo.supernets.adapters import get_reuse_adapter
from tests.conftest import _tiny_vae

Grid = Callable[[int, str], bool]  # (step >= 1, unit name) -> compute?


def _plan(model: nn.Module, steps: int, compute: Grid, scheduler: str | None = None) -> Plan:
    units = get_reuse_adapter(model).units(model, "block", "auto")
    names = [u.name for u in units]
    grid = [[True] * len(names)] + [[compute(s, n) for n in names] for s in range(1, steps)]
    meta = ReusePayload("block", "auto", [u.mode for u in units]).to_meta()
    if scheduler:
        meta["scheduler"] = scheduler
    return Plan(kind="reuse", model=type(model).__name__, blocks=names, compute=grid, target=1.0, cost_ratio=1.0,
                num_steps=steps, meta=meta)


def _deep_every(n: int, deep: tuple[str, ...]) -> Grid:
    """DeepCache's pattern on a 2-level UNet: the deep blocks run every n-th step only."""
    return lambda s, name: s % n == 0 or name not in deep


UNET_DEEP = ("down_blocks.1", "mid_block", "up_blocks.0")


@contextmanager
def reference(model: nn.Module, plan: Plan, passes: int) -> Iterator[None]:
    """The plan run by hand: call ``c`` is step ``c // passes``, pass ``c % passes``."""
    calls = [-1]
    cache: dict[tuple[int, str], torch.Tensor | tuple[Any, ...]] = {}
    modes = dict(zip(plan.blocks, plan.meta["modes"], strict=True))
    handles = [model.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))]

    def unit_hook(name: str, column: int) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> Any:
            step, p = divmod(calls[0], passes)
            x = args[0] if args else kwargs["hidden_states"]
            key = (p, name)
            if plan.compute[step][column] or key not in cache:
                cache[key] = out if modes[name] == "output" else out - x
                return out
            return cache[key] if modes[name] == "output" else x + cache[key]

        return hook

    for column, name in enumerate(plan.blocks):
        handles.append(model.get_submodule(name).register_forward_hook(unit_hook(name, column), with_kwargs=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _is_plain(model: nn.Module) -> bool:
    """No patched forward and no registry hook left (diffusers' ``cache_context`` may leave an empty registry)."""
    return not any("forward" in m.__dict__ or getattr(getattr(m, "_diffusers_hook", None), "hooks", None)
                   for m in model.modules())


def _latents(pipe: Any, **kwargs: Any) -> torch.Tensor:
    with torch.no_grad():
        out = pipe(generator=torch.Generator().manual_seed(4), output_type="latent", return_dict=False, **kwargs)
    return out[0]


def _check_against_reference(pipe: Any, model: nn.Module, plan: Plan, passes: int, **kwargs: Any) -> torch.Tensor:
    plain = _latents(pipe, **kwargs)
    with enable(pipe, plan):
        planned = _latents(pipe, **kwargs)
    assert _is_plain(model)
    with reference(model, plan, passes):
        expected = _latents(pipe, **kwargs)
    assert (planned - plain).abs().max() > 1e-4, "the plan closes blocks: the result must differ from the full model"
    torch.testing.assert_close(planned, expected, rtol=0, atol=1e-5)
    return planned


# ----------------------------------------------------------------------------- Stable Diffusion

STEPS = 6


def _sd(tiny_sd_dir: Path) -> Any:
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(tiny_sd_dir)


def _sd_call(**extra: Any) -> dict[str, Any]:
    return {"prompt": ["a red digit", "a blue digit"], "num_inference_steps": STEPS, "guidance_scale": 3.0,
            "height": 16, "width": 16, **extra}


def test_stable_diffusion_with_cfg_matches_the_hand_reference(tiny_sd_dir: Path) -> None:
    pipe = _sd(tiny_sd_dir)
    plan = _plan(pipe.unet, STEPS, _deep_every(3, UNET_DEEP), scheduler="ddim")
    first = _check_against_reference(pipe, pipe.unet, plan, passes=1, **_sd_call())  # CFG batched in one call
    with enable(pipe, plan):  # state: twice, another batch size, re-install
        assert torch.equal(_latents(pipe, **_sd_call()), first)
        single = _latents(pipe, **_sd_call(prompt=["a red digit"]))
        assert torch.equal(_latents(pipe, **_sd_call()), first)
    # batch 1 vs batch 2 rounds differently (measured 2e-5 after 6 steps); leaked state would be O(0.1)
    torch.testing.assert_close(single[0], first[0], rtol=0, atol=1e-3)
    with enable(pipe, plan):
        assert torch.equal(_latents(pipe, **_sd_call()), first)


def test_another_step_count_is_refused_with_the_numbers_or_resampled(tiny_sd_dir: Path) -> None:
    pipe = _sd(tiny_sd_dir)
    plan = _plan(pipe.unet, STEPS, _deep_every(2, UNET_DEEP), scheduler="ddim")
    for steps in (STEPS - 2, STEPS + 2):  # shorter trajectories are caught too, before anything runs
        with enable(pipe, plan), pytest.raises(PlanError, match=f"searched for {STEPS} sampling steps but this "
                                                               f"trajectory has {steps}: run {STEPS} steps"):
            _latents(pipe, **_sd_call(num_inference_steps=steps))
    assert _is_plain(pipe.unet)
    stretched = Plan(**{**plan.to_dict(), "compute": resample_grid(plan.compute, STEPS + 3), "num_steps": STEPS + 3})
    with enable(pipe, plan, resample=True):
        resampled = _latents(pipe, **_sd_call(num_inference_steps=STEPS + 3))
    with reference(pipe.unet, stretched, passes=1):
        expected = _latents(pipe, **_sd_call(num_inference_steps=STEPS + 3))
    torch.testing.assert_close(resampled, expected, rtol=0, atol=1e-5)


def test_second_order_solvers_and_second_denoisers_are_refused(tiny_sd_dir: Path) -> None:
    from diffusers import HeunDiscreteScheduler

    pipe = _sd(tiny_sd_dir)
    plan = _plan(pipe.unet, STEPS, _deep_every(2, UNET_DEEP))
    pipe.scheduler = HeunDiscreteScheduler.from_config(pipe.scheduler.config)
    with pytest.raises(PlanError, match="^HeunDiscreteScheduler evaluates the denoiser 2 times per step"):
        enable(pipe, plan)
    assert _is_plain(pipe.unet)
    pipe.transformer_2 = nn.Linear(1, 1)
    with pytest.raises(PlanError, match="has a second denoiser"):
        enable(pipe, plan)


def test_controlnet_residuals_are_added_to_reused_blocks(tiny_sd_dir: Path) -> None:
    """A reused block replays its own output; this step's ControlNet residuals are added on top
    (the ControlNet runs every step), exactly as the hand reference computes it."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    sd = _sd(tiny_sd_dir)
    torch.manual_seed(1)
    controlnet = ControlNetModel.from_unet(sd.unet, conditioning_embedding_out_channels=(4, 8)).eval()
    for zero in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
        nn.init.normal_(zero.weight, std=0.3)  # zero-initialised convs would add nothing
    pipe = StableDiffusionControlNetPipeline(**sd.components, controlnet=controlnet)
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    plan = _plan(pipe.unet, STEPS, _deep_every(3, UNET_DEEP), scheduler="ddim")
    call = _sd_call(image=image)
    planned = _check_against_reference(pipe, pipe.unet, plan, passes=1, **call)
    with enable(pipe, plan):
        weaker = _latents(pipe, **call, controlnet_conditioning_scale=0.5)
    assert (weaker - planned).abs().max() > 1e-3, "the ControlNet must still steer steps with reused blocks"


def test_sdxl_matches_the_hand_reference(tiny_sdxl_dir: Path) -> None:
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir, vae=None)
    plan = _plan(pipe.unet, STEPS, _deep_every(2, UNET_DEEP), scheduler="euler")
    _check_against_reference(pipe, pipe.unet, plan, passes=1, **_sd_call(height=64, width=64))  # no VAE: factor 8


# ----------------------------------------------------------------------------- transformers


def test_pixart_alpha_matches_the_hand_reference() -> None:
    from diffusers import DDIMScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel

    torch.manual_seed(0)
    transformer = PixArtTransformer2DModel(
        sample_size=8, num_layers=3, patch_size=2, attention_head_dim=8, num_attention_heads=2, caption_channels=16,
        in_channels=4, cross_attention_dim=16, out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
    ).eval()
    pipe = PixArtAlphaPipeline(tokenizer=None, text_encoder=None, vae=_tiny_vae().eval(), transformer=transformer,
                               scheduler=DDIMScheduler())
    g = torch.Generator().manual_seed(6)
    embeds, negative = torch.randn(2, 5, 16, generator=g), torch.randn(2, 5, 16, generator=g)
    mask = torch.ones(2, 5, dtype=torch.long)
    plan = _plan(transformer, STEPS, lambda s, name: (s + int(name[-1])) % 3 == 0, scheduler="ddim")
    _check_against_reference(
        pipe, transformer, plan, passes=1, prompt=None, negative_prompt=None, prompt_embeds=embeds, prompt_attention_mask=mask,
        negative_prompt_embeds=negative, negative_prompt_attention_mask=mask, num_inference_steps=STEPS,
        guidance_scale=3.0, height=16, width=16, use_resolution_binning=False,
    )


def _wan() -> Any:
    from diffusers import (
        AutoencoderKLWan,
        FlowMatchEulerDiscreteScheduler,
        WanPipeline,
        WanTransformer3DModel,
    )

    torch.manual_seed(0)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=256, ffn_dim=32, num_layers=3, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    ).eval()
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True]).eval()
    return WanPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0))


def _wan_call(embeds: torch.Tensor, negative: torch.Tensor) -> dict[str, Any]:
    return {"prompt": None, "prompt_embeds": embeds, "negative_prompt_embeds": negative, "height": 16, "width": 16,
            "num_frames": 5, "num_inference_steps": STEPS, "guidance_scale": 4.0}


def test_wan_video_cond_and_uncond_contexts_keep_their_own_caches() -> None:
    """WanPipeline makes separate cond / uncond calls inside ``cache_context(name, step_index=i)``:
    the plan takes the step from the context and keeps one cache per name."""
    pipe = _wan()
    g = torch.Generator().manual_seed(7)
    call = _wan_call(torch.randn(1, 6, 32, generator=g), torch.randn(1, 6, 32, generator=g))
    plan = _plan(pipe.transformer, STEPS, lambda s, name: (s + int(name[-1])) % 2 == 0)
    first = _check_against_reference(pipe, pipe.transformer, plan, passes=2, **call)
    with enable(pipe, plan) as handle:
        assert torch.equal(_latents(pipe, **call), first)
        assert handle.current_step == -1, "the pipeline's maybe_free_model_hooks resets the trajectory"


# ----------------------------------------------------------------------------- loops and hooks


def test_explicit_steps_in_a_hand_written_loop() -> None:
    """``handle.step(i)`` before each step's calls: separate cond / uncond passes give what the
    timestep rule gives, a new ``step(0)`` starts over, and a step outside the plan is refused."""
    from diffusers import DDIMScheduler

    from tests.conftest import tiny_reuse_supernet

    model, sn = tiny_reuse_supernet(6)
    sn.remove()
    plan = _plan(model, 6, lambda s, name: s % 2 == 0 or not name.startswith("up"))
    noise = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(2))

    def run(handle: Any, explicit: bool) -> torch.Tensor:
        sched = DDIMScheduler()
        sched.set_timesteps(6)
        x = noise.clone()
        for i, t in enumerate(sched.timesteps):
            if explicit:
                handle.step(i)
            eps_c = model(x, t, class_labels=torch.tensor([1])).sample
            eps_u = model(x, t, class_labels=torch.tensor([2])).sample
            x = sched.step(eps_u + 3.0 * (eps_c - eps_u), t, x).prev_sample
        return x

    with torch.no_grad(), install_plan(model, plan) as handle:
        implicit = run(handle, False)
        explicit, again = run(handle, True), run(handle, True)
        with pytest.raises(PlanError, match="step 6 is outside the plan's 6 sampling steps"):
            handle.step(6)
    assert torch.equal(explicit, implicit) and torch.equal(again, explicit)


def test_plan_hooks_live_in_the_diffusers_registry_and_compose(tiny_sd_dir: Path) -> None:
    """dipgo's hooks are diffusers ModelHooks: another registry hook on the same modules keeps
    working before and after, and either can be removed first."""
    from diffusers.hooks import HookRegistry, ModelHook

    class Count(ModelHook):
        def __init__(self) -> None:
            super().__init__()
            self.calls = 0

        def pre_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
            self.calls += 1
            return args, kwargs

    pipe = _sd(tiny_sd_dir)
    plain = _latents(pipe, **_sd_call())
    plan = _plan(pipe.unet, STEPS, _deep_every(3, UNET_DEEP), scheduler="ddim")
    with enable(pipe, plan):
        alone = _latents(pipe, **_sd_call())
    for other_first in (True, False):
        count = Count()
        mid = HookRegistry.check_if_exists_or_initialize(pipe.unet.mid_block)
        if other_first:
            mid.register_hook(count, "count")
        handle = enable(pipe, plan)
        if not other_first:
            mid.register_hook(count, "count")
        assert {"dipgo_reuse_plan"} <= set(pipe.unet._diffusers_hook.hooks)
        assert "dipgo_reuse_unit" in mid.hooks
        assert torch.equal(_latents(pipe, **_sd_call()), alone)
        # the count hook sits outside dipgo's when registered later: it sees every call, closed or not
        assert count.calls == (STEPS if not other_first else 2)
        handle.remove()
        assert set(mid.hooks) == {"count"}
        mid.remove_hook("count")
        assert torch.equal(_latents(pipe, **_sd_call()), plain)


def test_top_level_enable_takes_a_plan_json(tiny_sd_dir: Path, tmp_path: Path) -> None:
    import dipgo

    pipe = _sd(tiny_sd_dir)
    plan = _plan(pipe.unet, STEPS, _deep_every(3, UNET_DEEP), scheduler="ddim")
    plan.save(tmp_path / "plan.json")
    with enable(pipe, plan):
        expected = _latents(pipe, **_sd_call())
    with dipgo.enable(pipe, tmp_path / "plan.json"):
        assert torch.equal(_latents(pipe, **_sd_call()), expected)
    with pytest.raises(PlanError, match="nothing at .*missing.json: expected a plan.json"):
        dipgo.enable(pipe, tmp_path / "missing.json")
