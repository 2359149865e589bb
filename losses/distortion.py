"""Distortion: how far the gated SuperNet's outputs are from the original model's.

Pure functions of tensors. ``SuperNet.reference(batch)`` and ``SuperNet.gated(batch, gates)``
return dicts with the same keys; :func:`distortion` compares them with the terms a config turns
on and returns every active term plus their weighted ``"total"``, so the search loop can log
each one. Which terms fit which model:

* ``mse`` on ``"output"``: any model (final diffusion sample, logits, embedding).
* ``ssim`` on ``"output"`` images ``(..., C, H, W)``: 1 - SSIM, a structural term that MSE misses
  (DiP-GO-style searches of diffusion samples).
* ``eps`` on ``"eps"``: per-step noise predictions ``(S, B, ...)``; supervises every step of the
  trajectory, not only the end, which gives denser gradients to early-step gates.
* ``kl`` on ``"output"`` logits: knowledge-distillation KL for classifiers.
* ``cosine`` on ``"output"`` embeddings: 1 - cosine similarity for encoders (sentence embeddings).
* ``feature_mse`` on ``"features"``: intermediate features.

The reference is always detached: the original model is the fixed teacher.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from dipgo.losses.config import TERM_KEYS, DistortionConfig


def mse_term(gated: Tensor, reference: Tensor) -> Tensor:
    """Mean squared error per element, so the scale does not depend on resolution or batch."""
    return F.mse_loss(gated, reference)


def ssim_term(gated: Tensor, reference: Tensor, data_range: float, kernel: int = 11) -> Tensor:
    """``1 - SSIM`` of image batches ``(..., C, H, W)``; a scalar in [0, 2], differentiable.

    The window is shrunk to fit small images (torchmetrics reflect-pads by half the window,
    which fails when the pad reaches the image size); sigma scales with it (1.5 for 11).
    """
    if gated.ndim < 4:
        raise ValueError(f"the ssim distortion needs images (..., C, H, W); got shape {tuple(gated.shape)}")
    g = rearrange(gated, "... c h w -> (...) c h w")  # (B', C, H, W)
    r = rearrange(reference, "... c h w -> (...) c h w")  # (B', C, H, W)
    fit = min(kernel, g.shape[-2], g.shape[-1])
    k = fit if fit % 2 == 1 else fit - 1
    sigma = 1.5 * k / 11.0
    # Imported here: torchmetrics takes seconds to import and only SSIM searches need it.
    from torchmetrics.functional.image import structural_similarity_index_measure

    ssim = structural_similarity_index_measure(
        g, r, gaussian_kernel=True, sigma=sigma, kernel_size=k, data_range=data_range
    )
    return (1.0 - ssim).clamp(0.0, 2.0)


def kl_term(gated: Tensor, reference: Tensor, temperature: float = 1.0) -> Tensor:
    """Distillation KL over the last axis, averaged over all other positions, times ``T^2``."""
    g = rearrange(gated, "... c -> (...) c") / temperature  # (M, C)
    r = rearrange(reference, "... c -> (...) c") / temperature  # (M, C)
    kl = F.kl_div(F.log_softmax(g, -1), F.log_softmax(r, -1), log_target=True, reduction="batchmean")
    return kl * temperature**2


def cosine_term(gated: Tensor, reference: Tensor) -> Tensor:
    """``1 - cosine similarity`` over the last axis, averaged over all other positions."""
    return (1.0 - F.cosine_similarity(gated, reference, dim=-1, eps=1e-8)).mean()


def _term_fn(name: str, config: DistortionConfig) -> Callable[[Tensor, Tensor], Tensor]:
    if name == "ssim":
        return lambda g, r: ssim_term(g, r, config.data_range, config.ssim_kernel)
    if name == "kl":
        return lambda g, r: kl_term(g, r, config.temperature)
    if name == "cosine":
        return cosine_term
    return mse_term  # mse, eps, feature_mse


def _pair(name: str, gated: dict[str, Tensor], reference: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """The tensors a term compares, with one clear error if either is missing or mismatched."""
    key = TERM_KEYS[name]
    for label, outputs in (("gated", gated), ("reference", reference)):
        if key not in outputs:
            raise ValueError(
                f"distortion term {name!r} has weight > 0 but the {label} outputs have no key "
                f"{key!r} (keys: {', '.join(sorted(outputs)) or 'none'}); set its weight to 0 or "
                f"make the SuperNet return {key!r}"
            )
    g, r = gated[key], reference[key].detach()
    if g.shape != r.shape:
        raise ValueError(
            f"distortion term {name!r}: gated and reference {key!r} differ in shape "
            f"({tuple(g.shape)} vs {tuple(r.shape)})"
        )
    return g, r.to(g.dtype)


def distortion(
    gated: dict[str, Tensor],
    reference: dict[str, Tensor],
    config: DistortionConfig,
) -> dict[str, Tensor]:
    """Every active term (weight > 0) by name, plus ``"total"``, their weighted sum.

    Terms are unweighted (so logs compare across configs); only ``"total"`` carries weights.
    """
    terms: dict[str, Tensor] = {}
    total: Tensor | None = None
    for name, weight in config.weights().items():
        if weight <= 0:
            continue
        g, r = _pair(name, gated, reference)
        terms[name] = _term_fn(name, config)(g, r)
        total = weight * terms[name] if total is None else total + weight * terms[name]
    assert total is not None  # DistortionConfig guarantees one active term
    terms["total"] = total
    return terms


__all__ = [
    "TERM_KEYS",
    "DistortionConfig",
    "distortion",
    "mse_term",
    "ssim_term",
    "kl_term",
    "cosine_term",
]
