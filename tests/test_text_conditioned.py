"""Text-conditioned denoisers (Stable Diffusion 1.x/2.x/XL) in the reuse search, on tiny pipelines.

The pipeline folders are random-weight models of the real classes (UNet2DConditionModel,
CLIPTextModel / CLIPTextModelWithProjection, CLIPTokenizer, AutoencoderKL) saved with diffusers'
``save_pretrained`` (see the ``tiny_sd_dir`` / ``tiny_sdxl_dir`` fixtures), so loading, prompt
encoding, the search, refinement and the report run the same code as for the hub recipes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dipgo.models.registry import load_model, load_vae, text_encoders
from dipgo.search.compose import compose_config
from dipgo.search.data import NoisePool, collate
from dipgo.search.prompts import EVAL_EVERY, PROMPTS, load_prompts, prompt_pool, split_prompts
from dipgo.search.run import run_search
from tests.conftest import tiny_search_overrides

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BASELINES = "[fewer_steps,deepcache,uniform,static_per_block,random,first_block_cache]"


def _cfg(model_dir: Path, runs: Path, **extra: object):
    overrides = tiny_search_overrides(model_dir, runs, **{
        "model.subfolder": "null", "data.kind": "prompts", "data.pool_size": 6, "supernet.guidance_scale": 3.0,
        "report.baselines": BASELINES, **extra,
    })
    return compose_config(overrides)[0]


# ----------------------------------------------------------------------------- prompts


def test_builtin_prompts_split_into_calibration_and_held_out_evaluation() -> None:
    assert len(PROMPTS) >= 64 and len(set(PROMPTS)) == len(PROMPTS)
    calib, evaluation = split_prompts(PROMPTS, "calibration"), split_prompts(PROMPTS, "evaluation")
    assert not set(calib) & set(evaluation)
    assert len(calib) + len(evaluation) == len(PROMPTS) and len(evaluation) == len(PROMPTS) // EVAL_EVERY


def test_prompts_file(tmp_path: Path) -> None:
    file = tmp_path / "prompts.txt"
    file.write_text("# my prompts\na cat\n\na dog\na bird\na fish\na horse\n")
    assert load_prompts(file) == ["a cat", "a dog", "a bird", "a fish", "a horse"]
    assert split_prompts(load_prompts(file), "evaluation") == ["a fish"]
    with pytest.raises(ValueError, match="is not a file"):
        load_prompts(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="at least 4"):
        split_prompts(["a cat"], "evaluation")


def test_pipeline_parts_load_lazily_and_offline(tiny_sd_dir: Path) -> None:
    loaded = load_model(str(tiny_sd_dir))
    assert type(loaded.model).__name__ == "UNet2DConditionModel" and loaded.kind == "diffusion_unet"
    parts = loaded.extra["pipeline"]
    assert parts.load_kw == {"local_files_only": True}
    assert "text_encoders" not in loaded.extra  # nothing loaded until asked
    encoders = text_encoders(loaded)
    assert sorted(encoders) == ["text_encoder", "tokenizer"] and loaded.extra["text_encoders"] is encoders
    assert not any(p.requires_grad for p in encoders["text_encoder"].parameters())
    assert type(load_vae(loaded)).__name__ == "AutoencoderKL"
    # the unet folder named directly finds the same pipeline around it
    assert sorted(load_model(str(tiny_sd_dir), subfolder="unet").extra["pipeline"].classes) == ["text_encoder", "tokenizer", "vae"]


def test_sd_prompt_pool_matches_diffusers_encode_prompt(tiny_sd_dir: Path) -> None:
    from diffusers import StableDiffusionPipeline

    loaded = load_model(str(tiny_sd_dir))
    pool = prompt_pool(loaded, 5, seed=3)
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd_dir), local_files_only=True)
    emb, neg = pipe.encode_prompt(pool.prompts, "cpu", 1, True, negative_prompt=[""] * len(pool.prompts))
    batch = collate([pool[i] for i in range(5)])
    torch.testing.assert_close(batch["encoder_hidden_states"], emb)
    torch.testing.assert_close(batch["negative_encoder_hidden_states"], neg)
    # noise is seeded per index exactly like NoisePool's
    torch.testing.assert_close(batch["noise"], collate([NoisePool(5, (4, 8, 8), 3)[i] for i in range(5)])["noise"])
    assert "added_cond_kwargs" not in batch


def test_sdxl_prompt_pool_matches_diffusers_encode_prompt(tiny_sdxl_dir: Path) -> None:
    from diffusers import StableDiffusionXLPipeline

    loaded = load_model(str(tiny_sdxl_dir))
    pool = prompt_pool(loaded, 4, seed=0)
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl_dir), local_files_only=True, vae=None)
    emb, neg, pooled, neg_pooled = pipe.encode_prompt(pool.prompts, device="cpu", do_classifier_free_guidance=True)
    batch = collate([pool[i] for i in range(4)])
    torch.testing.assert_close(batch["encoder_hidden_states"], emb)
    torch.testing.assert_close(batch["negative_encoder_hidden_states"], neg)  # zeros: force_zeros_for_empty_prompt
    torch.testing.assert_close(batch["added_cond_kwargs"]["text_embeds"], pooled)
    torch.testing.assert_close(batch["negative_added_cond_kwargs"]["text_embeds"], neg_pooled)
    time_ids = pipe._get_add_time_ids((64, 64), (0, 0), (64, 64), torch.float32, text_encoder_projection_dim=16)
    torch.testing.assert_close(batch["added_cond_kwargs"]["time_ids"], time_ids.expand(4, 6))


@pytest.mark.parametrize("which", ["sd", "sdxl"])
def test_guided_sampling_reproduces_the_diffusers_pipeline(which: str, request: pytest.FixtureRequest) -> None:
    """dipgo's loop on a prompt-pool batch == the diffusers pipeline with the same embeddings and latents."""
    from diffusers import DiffusionPipeline

    from dipgo.supernets.sampling import make_model_fn, make_scheduler, sample

    folder = request.getfixturevalue(f"tiny_{which}_dir")
    loaded = load_model(str(folder))
    batch = collate([prompt_pool(loaded, 2, seed=1)[i] for i in range(2)])
    batch.pop("index")
    scheduler = "euler" if which == "sdxl" else "ddim"
    ours, _ = sample(make_model_fn(loaded.model), make_scheduler(scheduler, dict(loaded.scheduler.config)), batch, 4, 5.0)
    unguided, _ = sample(make_model_fn(loaded.model), make_scheduler(scheduler, dict(loaded.scheduler.config)), batch, 4, 1.0)
    assert not torch.allclose(ours, unguided, atol=1e-4)  # guidance really steers

    pipe = DiffusionPipeline.from_pretrained(str(folder), local_files_only=True, **({"vae": None} if which == "sdxl" else {}))
    kw = {"prompt_embeds": batch["encoder_hidden_states"], "negative_prompt_embeds": batch["negative_encoder_hidden_states"]}
    if which == "sdxl":
        kw |= {"pooled_prompt_embeds": batch["added_cond_kwargs"]["text_embeds"],
               "negative_pooled_prompt_embeds": batch["negative_added_cond_kwargs"]["text_embeds"]}
    theirs = pipe(latents=batch["noise"].clone(), num_inference_steps=4, guidance_scale=5.0, output_type="latent", **kw).images
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------- configs


@pytest.mark.parametrize(("recipe", "hub_id", "guidance", "kind"), [
    ("sd15_reuse", "stable-diffusion-v1-5/stable-diffusion-v1-5", 7.5, "prompts"),
    ("sd21_reuse", "stabilityai/stable-diffusion-2-1", 7.5, "prompts"),
    ("sdxl_reuse", "stabilityai/stable-diffusion-xl-base-1.0", 7.5, "prompts"),
    ("dit_xl_reuse", "facebook/DiT-XL-2-256", 4.0, "diffusion"),
])
def test_hub_recipes_compose_offline(recipe: str, hub_id: str, guidance: float, kind: str) -> None:
    cfg, _ = compose_config([f"recipe={recipe}"])
    assert cfg.model.name == hub_id and cfg.recipe_name == recipe and cfg.data.kind == kind
    assert cfg.trainer.accelerator == "gpu" and cfg.supernet.checkpointing
    assert cfg.supernet.num_steps == 50 and cfg.supernet.guidance_scale == guidance and cfg.search.target == 0.25


def test_text_unet_on_noise_alone_is_refused_in_one_sentence(tiny_sd_dir: Path, tmp_path: Path) -> None:
    from dipgo.errors import UnsupportedModelError

    cfg = _cfg(tiny_sd_dir, tmp_path / "runs", **{"data.kind": "diffusion"})
    with pytest.raises(UnsupportedModelError, match="use data=prompts"):
        run_search(cfg, quiet=True)
    assert not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------- end to end


def _check_run(result, target: float, space: str) -> dict:
    plan, report = result.plan, result.report
    assert plan.kind == "reuse" and plan.num_steps == 4 and all(plan.compute[0])
    assert plan.cost_ratio <= target + 1e-9
    assert "refine" in plan.meta
    names = [v["name"] for v in report["variants"]]
    assert names[:2] == ["full", "dipgo"]
    assert {"fewer_steps", "deepcache", "uniform", "static_per_block", "random"} <= set(names)
    assert "first_block_cache" in report["skipped_baselines"]  # a UNet has no transformer_blocks: skipped with its reason
    assert report["guidance_scale"] == 3.0 and report["conditioning"] == "prompts"
    assert report["fidelity_space"] == space
    assert report["subnet_vs_supernet_max_abs_diff"] < 1e-4
    assert set(report["eval_prompts"]) <= set(split_prompts(PROMPTS, "evaluation"))
    for row in report["variants"][1:]:
        assert row["psnr"] is not None and "accuracy" not in row and "fd" not in row
    for plot in report["plots"].values():
        assert (result.run_dir / plot).stat().st_size > 1000
    assert json.loads((result.run_dir / "report.json").read_text())["fidelity_space"] == space
    return report


def test_sd_search_end_to_end(tiny_sd_dir: Path, tmp_path: Path) -> None:
    result = run_search(_cfg(tiny_sd_dir, tmp_path / "runs"), quiet=True)
    _check_run(result, 0.5, "images (VAE-decoded latents)")


def test_sdxl_search_end_to_end(tiny_sdxl_dir: Path, tmp_path: Path) -> None:
    cfg = _cfg(tiny_sdxl_dir, tmp_path / "runs", **{"supernet.scheduler": "euler", "report.plots": False, "search.target": 0.6})
    result = run_search(cfg, quiet=True)
    report = _check_run(result, 0.6, "latents")
    assert report["fidelity_data_range"] > 0


def test_sdxl_build_refine_and_report_without_the_search_loop(tiny_sdxl_dir: Path, tmp_path: Path) -> None:
    """SDXL's nested added_cond_kwargs through build, refine (same pool) and the report."""
    from dipgo.postprocess.reuse_plan import extract_reuse_plan
    from dipgo.report.reuse_eval import evaluate_reuse
    from dipgo.search.reuse_task import ReuseTask, calibration_pool, refine

    cfg = _cfg(tiny_sdxl_dir, tmp_path / "runs", **{"supernet.scheduler": "euler", "report.plots": False})
    loaded = load_model(str(tiny_sdxl_dir))
    task = ReuseTask()
    supernet = task.build(loaded, cfg)
    pool = calibration_pool(loaded, cfg)
    assert calibration_pool(supernet.model, cfg) is pool  # refine() gets the datamodule's pool
    assert task.datamodule(loaded, supernet, cfg).pool is pool
    probs = torch.linspace(0.05, 0.95, len(supernet.slots))
    plan = refine(extract_reuse_plan(probs, supernet, 0.6), probs, supernet, cfg)
    assert plan.cost_ratio <= 0.6 + 1e-9 and plan.meta["refine"]
    report, _ = evaluate_reuse(loaded, supernet, plan, cfg, tmp_path)
    assert report["fidelity_space"] == "latents" and report["conditioning"] == "prompts"
    assert report["subnet_vs_supernet_max_abs_diff"] < 1e-4
    assert {"fewer_steps", "uniform", "static_per_block", "random"} <= {v["name"] for v in report["variants"]}
