"""Shared fixtures: tiny random-weight diffusers models saved as real local folders."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

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
        "report.baselines": "[fewer_steps,deepcache,random]",
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]
