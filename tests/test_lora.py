"""LoRA: a plan applies unchanged to a model with a peft LoRA loaded or fused, and the search runs on one.

The LoRAs are made here with random (non-zero) up-projections, so loading one really changes the
model's output; every check first asserts that it does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from safetensors.torch import save_file
from torch import nn

from dipgo.errors import ModelLoadError
from dipgo.models.configured import load_configured_model
from dipgo.models.lora import apply_lora
from dipgo.models.registry import load_model
from dipgo.postprocess import enable
from dipgo.search.compose import compose_config
from dipgo.search.run import run_search
from tests.conftest import tiny_search_overrides
from tests.test_pipelines import (
    STEPS,
    UNET_DEEP,
    _check_against_reference,
    _deep_every,
    _latents,
    _plan,
    _sd,
    _sd_call,
)

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]


def _lora_config() -> LoraConfig:
    # init_lora_weights=False: random A *and* B, so the adapter is not the identity it starts as in training
    return LoraConfig(r=4, lora_alpha=8, target_modules=ATTENTION, init_lora_weights=False)


def _save_diffusers_lora(tiny_sd_dir: Path, out: Path) -> Path:
    """A LoRA for the tiny SD UNet in diffusers' file format (what training scripts write)."""
    from diffusers import StableDiffusionPipeline

    pipe = _sd(tiny_sd_dir)
    torch.manual_seed(1)
    pipe.unet.add_adapter(_lora_config())
    StableDiffusionPipeline.save_lora_weights(str(out), unet_lora_layers=get_peft_model_state_dict(pipe.unet))
    return out


def _save_peft_folder(model: nn.Module, out: Path) -> Path:
    """A LoRA in peft's folder format (adapter_config.json + adapter_model.safetensors) for ``model``."""
    config = _lora_config()
    torch.manual_seed(1)
    inject_adapter_in_model(config, model, adapter_name="default")
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out))
    save_file(get_peft_model_state_dict(model, adapter_name="default"), str(out / "adapter_model.safetensors"))
    return out


def test_a_plan_applies_unchanged_to_a_pipeline_with_a_lora_loaded_or_fused(tiny_sd_dir: Path, tmp_path: Path) -> None:
    lora = _save_diffusers_lora(tiny_sd_dir, tmp_path / "lora")
    pipe = _sd(tiny_sd_dir)
    base = _latents(pipe, **_sd_call())
    pipe.load_lora_weights(str(lora))  # diffusers' own loader: peft layers inside the UNet's attention
    assert (_latents(pipe, **_sd_call()) - base).abs().max() > 1e-3, "the LoRA must change the model"
    plan = _plan(pipe.unet, STEPS, _deep_every(3, UNET_DEEP), scheduler="ddim")
    loaded = _check_against_reference(pipe, pipe.unet, plan, passes=1, **_sd_call())

    pipe.fuse_lora()  # the update merged into the weights; the adapter layers stay (unfusable)
    with enable(pipe, plan):
        fused = _latents(pipe, **_sd_call())
    # fused vs unfused differ only by float rounding of W + BA vs Wx + B(Ax) (measured 1e-6 here)
    torch.testing.assert_close(fused, loaded, rtol=0, atol=1e-4)
    _check_against_reference(pipe, pipe.unet, plan, passes=1, **_sd_call())

    pipe.unfuse_lora()
    pipe.unload_lora_weights()  # back to the base model: the same plan gives the base model's planned result
    with enable(pipe, plan):
        unloaded = _latents(pipe, **_sd_call())
    fresh = _sd(tiny_sd_dir)
    with enable(fresh, plan):
        torch.testing.assert_close(unloaded, _latents(fresh, **_sd_call()), rtol=0, atol=1e-4)


def test_a_lora_loaded_after_the_plan_is_installed_runs_inside_the_reused_blocks(tiny_sd_dir: Path, tmp_path: Path) -> None:
    lora = _save_diffusers_lora(tiny_sd_dir, tmp_path / "lora")
    plan = _plan(_sd(tiny_sd_dir).unet, STEPS, _deep_every(3, UNET_DEEP), scheduler="ddim")
    before = _sd(tiny_sd_dir)
    before.load_lora_weights(str(lora))
    with enable(before, plan):
        expected = _latents(before, **_sd_call())
    after = _sd(tiny_sd_dir)
    with enable(after, plan):
        after.load_lora_weights(str(lora))  # peft swaps Linear layers under dipgo's block hooks
        got = _latents(after, **_sd_call())
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("fuse", [False, True])
def test_apply_lora_gives_the_model_peft_builds(tiny_unet_dir: Path, tmp_path: Path, fuse: bool) -> None:
    """``model.lora=<peft folder>`` on a UNet2DModel (no diffusers LoRA loader): peft's own output."""
    reference = load_model(str(tiny_unet_dir), subfolder="unet").model
    folder = _save_peft_folder(reference, tmp_path / "peft")
    model = load_model(str(tiny_unet_dir), subfolder="unet").model
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([10, 700]), torch.tensor([0, 2])
    with torch.no_grad():
        plain = model(x, t, class_labels=y).sample
        info = apply_lora(model, folder, fuse=fuse)
        out = model(x, t, class_labels=y).sample
        want = reference(x, t, class_labels=y).sample
    assert info.layers == 16 and info.fused is fuse and info.format == "peft"
    assert (want - plain).abs().max() > 1e-3, "the LoRA must change the model"
    torch.testing.assert_close(out, want, rtol=0, atol=1e-5)
    has_adapters = any("lora_A" in name for name, _ in model.named_modules())
    assert has_adapters is not fuse  # fused: plain modules again, nothing peft-specific left


def test_apply_lora_scale_and_diffusers_file(tiny_sd_dir: Path, tmp_path: Path) -> None:
    lora = _save_diffusers_lora(tiny_sd_dir, tmp_path / "lora")
    unet = load_model(str(tiny_sd_dir), subfolder="unet").model
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([300]), torch.randn(1, 12, 16)
    with torch.no_grad():
        plain = unet(x, t, ctx).sample
        info = apply_lora(unet, lora / "pytorch_lora_weights.safetensors", scale=0.0, fuse=False)
        assert info.format == "diffusers" and info.layers > 0
        torch.testing.assert_close(unet(x, t, ctx).sample, plain, rtol=0, atol=1e-6)  # scale 0: no update
    other = load_model(str(tiny_sd_dir), subfolder="unet").model
    with torch.no_grad():
        apply_lora(other, lora, scale=1.0, fuse=True)
        assert (other(x, t, ctx).sample - plain).abs().max() > 1e-3


def test_bad_lora_inputs_say_what_was_given(tiny_unet_dir: Path, tiny_sd_dir: Path, tmp_path: Path) -> None:
    model = load_model(str(tiny_unet_dir), subfolder="unet").model
    with pytest.raises(ModelLoadError, match="no such file or folder"):
        apply_lora(model, tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="neither a peft adapter folder"):
        apply_lora(model, tmp_path / "empty")
    wrong = LoraConfig(r=2, target_modules=["not_a_layer"])
    wrong.save_pretrained(str(tmp_path / "wrong"))
    save_file({}, str(tmp_path / "wrong" / "adapter_model.safetensors"))
    with pytest.raises(ModelLoadError, match="does not fit the UNet2DModel"):
        apply_lora(model, tmp_path / "wrong")
    lora = _save_diffusers_lora(tiny_sd_dir, tmp_path / "lora")
    with pytest.raises(ModelLoadError, match="has no diffusers LoRA loader"):
        apply_lora(model, lora)


def test_the_search_runs_on_a_lora_model(tiny_unet_dir: Path, tmp_path: Path) -> None:
    folder = _save_peft_folder(load_model(str(tiny_unet_dir), subfolder="unet").model, tmp_path / "peft")
    overrides = tiny_search_overrides(tiny_unet_dir, tmp_path / "runs", **{"report.plots": False,
                                                                          "model.lora": str(folder)})
    cfg, _ = compose_config(overrides)
    result = run_search(cfg, quiet=True)
    report: dict[str, Any] = json.loads((result.run_dir / "report.json").read_text())
    assert report["lora"] == {"source": str(folder), "format": "peft", "layers": 16, "scale": 1.0, "fused": True}
    assert result.plan.meta["lora"]["source"] == str(folder)
    assert report["subnet_vs_supernet_max_abs_diff"] < 1e-4
    # what the search, its reference and its report load is the LoRA model, not the base one
    loaded = load_configured_model(cfg)
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([10, 700]), torch.tensor([0, 2])
    with torch.no_grad():
        lora_out = loaded.model(x, t, class_labels=y).sample
        base_out = load_model(str(tiny_unet_dir), subfolder="unet").model(x, t, class_labels=y).sample
    assert (lora_out - base_out).abs().max() > 1e-3
