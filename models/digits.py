"""scikit-learn's handwritten digits as small image tensors: the project's offline dataset.

``load_digits`` ships inside scikit-learn (1797 images of 8x8, 16 grey levels), so nothing is
downloaded. Images are upsampled to ``size x size`` with bilinear interpolation
(``align_corners=False``), scaled to [-1, 1] and given one channel. The train/test split is fixed:
stratified, 20% test, seed 0 (1437 train / 360 test images).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

SPLITS = ("train", "test", "all")
TEST_FRACTION = 0.2
SPLIT_SEED = 0
NUM_CLASSES = 10


@lru_cache(maxsize=1)
def _split_indices() -> tuple[np.ndarray, np.ndarray]:
    """Indices of the fixed stratified train/test split, sorted."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    labels = load_digits().target
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=labels
    )
    return np.sort(train_idx), np.sort(test_idx)


@lru_cache(maxsize=8)
def _all_images(size: int) -> tuple[Tensor, Tensor]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8) in [0, 1]
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = (x * 2.0 - 1.0).clamp(-1.0, 1.0)  # (N, 1, size, size) in [-1, 1]
    y = torch.tensor(digits.target, dtype=torch.long)  # (N,)
    return x, y


@lru_cache(maxsize=16)
def _cached(split: str, size: int) -> tuple[Tensor, Tensor]:
    x, y = _all_images(size)
    if split == "all":
        return x, y
    train_idx, test_idx = _split_indices()
    idx = torch.from_numpy(train_idx if split == "train" else test_idx)
    return x[idx].contiguous(), y[idx].contiguous()


def digits_tensors(split: str, size: int = 16) -> tuple[Tensor, Tensor]:
    """Images ``(N, 1, size, size)`` in [-1, 1] and labels ``(N,)`` of one split.

    ``split`` is ``"train"``, ``"test"`` or ``"all"``. The tensors are cached and shared between
    calls: clone them before changing them in place.
    """
    if split not in SPLITS:
        raise ValueError(f"Unknown digits split {split!r}; accepted: {', '.join(SPLITS)}.")
    if not isinstance(size, int) or size < 8:
        raise ValueError(f"Digits image size must be an integer >= 8, got {size!r}.")
    return _cached(split, size)


def to_unit_range(x: Tensor) -> Tensor:
    """Map images from [-1, 1] (the model range) to [0, 1] (for saving / plotting)."""
    return ((x + 1.0) / 2.0).clamp(0.0, 1.0)


def class_conditional(denoiser: torch.nn.Module) -> bool:
    """Whether a digits denoiser takes class labels (an unconditional UNet2DModel has no class embedding)."""
    return getattr(denoiser, "class_embedding", True) is not None


def _eps(denoiser: torch.nn.Module, x: Tensor, t: Tensor, labels: Tensor) -> Tensor:
    """Epsilon prediction of a diffusers digits denoiser (UNet2DModel or DiT); an unconditional
    one is called without the labels."""
    out = denoiser(x, t, class_labels=labels if class_conditional(denoiser) else None, return_dict=False)[0]
    # learned-sigma models (out_channels = 2 * in_channels) put eps first
    return out[:, : x.shape[1]]


@torch.no_grad()
def sample_digits(
    denoiser: torch.nn.Module,
    scheduler,
    labels: Tensor,
    *,
    guidance_scale: float = 2.0,
    num_steps: int = 50,
    null_label: int = NUM_CLASSES,
    generator: torch.Generator | None = None,
    size: int = 16,
) -> Tensor:
    """DDIM samples ``(N, 1, size, size)`` in [-1, 1] from a digits denoiser.

    ``labels`` is ``(N,)``; classifier-free guidance mixes the conditional prediction with the
    one for ``null_label`` (skipped when ``guidance_scale == 1``). An unconditional denoiser
    ignores the labels (only their count matters) and needs ``guidance_scale == 1``. ``scheduler`` is any diffusers
    scheduler with ``set_timesteps``/``step``; a fresh copy is made, so the caller's is untouched.
    """
    if guidance_scale != 1.0 and not class_conditional(denoiser):
        raise ValueError(f"an unconditional denoiser has no classifier-free guidance: use guidance_scale=1, not {guidance_scale}")
    sched = type(scheduler).from_config(scheduler.config)
    sched.set_timesteps(num_steps)
    n = labels.shape[0]
    x = torch.randn(n, 1, size, size, generator=generator)  # (N, 1, H, W)
    null = torch.full_like(labels, null_label)
    for t in sched.timesteps:
        tt = torch.full((n,), int(t), dtype=torch.long)
        if guidance_scale == 1.0:
            eps = _eps(denoiser, x, tt, labels)
        else:
            both = _eps(denoiser, torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([labels, null]))
            cond, uncond = both.chunk(2)
            eps = uncond + guidance_scale * (cond - uncond)
        x = sched.step(eps, t, x, generator=generator).prev_sample
    return x.clamp(-1.0, 1.0)
