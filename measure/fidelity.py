"""How close a fast SubNet's outputs stay to the full model's: pure functions on tensors.

Images are batches ``(B, C, H, W)`` in ``[-1, 1]`` (the diffusers convention), so the default
``data_range`` is 2. For diffusion models the *reference* is the full model sampled from the same
noise, so PSNR/SSIM measure how far the SubNet drifts from what the full model would have drawn.

``frechet_distance`` is an **FID proxy**: the FID formula on features of a classifier the project
trains itself (no Inception weights are downloaded). Its values are only comparable between runs
that use the same feature extractor, and are not comparable with published FID numbers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure


def _check_images(x: Tensor, ref: Tensor) -> None:
    if x.shape != ref.shape or x.dim() != 4:
        raise ValueError(
            f"expected two image batches (B, C, H, W) of equal shape, got {tuple(x.shape)} and {tuple(ref.shape)}"
        )


def psnr(x: Tensor, ref: Tensor, data_range: float = 2.0) -> float:
    """Mean per-image PSNR in dB of ``x`` against ``ref``.

    Per image, then averaged, so one badly drifted sample is not diluted by the batch's pixels.
    Identical images give ``math.inf`` (MSE = 0); one identical image makes the mean ``inf`` too,
    which is the honest answer. Reports should print it as "identical" rather than clip it.
    """
    _check_images(x, ref)
    value = peak_signal_noise_ratio(
        x.detach().double(), ref.detach().double(), data_range=data_range, dim=(1, 2, 3), reduction="none"
    )
    return float(value.mean())


def _ssim_kernel_size(height: int, width: int) -> int:
    """The usual 11-pixel window, shrunk (kept odd) for images smaller than it, e.g. 8x8 digits."""
    k = min(11, height, width)
    if k % 2 == 0:
        k -= 1
    return max(k, 1)


def ssim(x: Tensor, ref: Tensor, data_range: float = 2.0) -> float:
    """Mean SSIM (Gaussian window, sigma 1.5) of ``x`` against ``ref``; 1 for identical images."""
    _check_images(x, ref)
    k = _ssim_kernel_size(x.shape[-2], x.shape[-1])
    value = structural_similarity_index_measure(
        x.detach().double(), ref.detach().double(), kernel_size=k, data_range=data_range
    )
    return float(value)


def _frechet_from_moments(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> Tensor:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2), with torchmetrics' implementation.

    torchmetrics takes the trace of the matrix square root as the sum of square roots of the
    eigenvalues of S1 S2 (no ``sqrtm``, no imaginary parts to clean up). It is a private helper,
    so we keep an identical fallback in case it moves.
    """
    try:
        from torchmetrics.image.fid import _compute_fid
    except ImportError:  # pragma: no cover - depends on the torchmetrics version
        diff = (mu1 - mu2).square().sum()
        root = torch.linalg.eigvals(sigma1 @ sigma2).sqrt().real.sum()
        return diff + sigma1.trace() + sigma2.trace() - 2 * root
    return _compute_fid(mu1, sigma1, mu2, sigma2)


def _moments(feats: Tensor) -> tuple[Tensor, Tensor]:
    feats = feats.detach().to("cpu", torch.float64)
    return feats.mean(dim=0), torch.cov(feats.T)


def frechet_distance(feats_a: Tensor, feats_b: Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets ``(N, D)`` and ``(M, D)``.

    The FID formula on arbitrary features, computed in float64 (float32 covariances of a few
    hundred dims lose the trace term to rounding). With N < D the covariances are singular; the
    value is still defined but biased, so use N well above D for numbers you report.
    Small negative results from rounding are clamped to 0.
    """
    if feats_a.dim() != 2 or feats_b.dim() != 2 or feats_a.shape[1] != feats_b.shape[1]:
        raise ValueError(
            f"expected features (N, D) and (M, D), got {tuple(feats_a.shape)} and {tuple(feats_b.shape)}"
        )
    if min(feats_a.shape[0], feats_b.shape[0]) < 2:
        raise ValueError("need at least 2 feature vectors per set to estimate a covariance")
    mu_a, sigma_a = _moments(feats_a)
    mu_b, sigma_b = _moments(feats_b)
    return max(float(_frechet_from_moments(mu_a, sigma_a, mu_b, sigma_b)), 0.0)


def _is_timm_classifier(model: nn.Module) -> bool:
    return hasattr(model, "forward_features") and hasattr(model, "forward_head")


def _last_linear(model: nn.Module) -> nn.Linear:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("classifier has neither timm's forward_features/forward_head nor an nn.Linear head")
    return linears[-1]


def _batch_features(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """Penultimate features and logits of one batch."""
    if _is_timm_classifier(model):
        trunk = model.forward_features(x)
        return model.forward_head(trunk, pre_logits=True), model.forward_head(trunk)
    captured: list[Tensor] = []
    head = _last_linear(model)
    handle = head.register_forward_hook(lambda _m, inputs, _out: captured.append(inputs[0]))
    try:
        logits = model(x)
    finally:
        handle.remove()
    return captured[-1].flatten(1), logits


def classifier_features(
    classifier: nn.Module, images: Tensor, batch_size: int = 256
) -> tuple[Tensor, Tensor]:
    """Penultimate features ``(N, D)`` and logits ``(N, K)`` of ``classifier`` on ``images``.

    timm models give their pre-logits features through ``forward_head(pre_logits=True)``; other
    models fall back to the input of their last ``nn.Linear`` (captured with a hook). The model
    runs in eval mode (BatchNorm statistics must not move) and is restored to its previous mode.
    Results are float32 on the CPU.
    """
    device = next(classifier.parameters()).device
    was_training = classifier.training
    classifier.eval()
    feats, logits = [], []
    try:
        with torch.inference_mode():
            for chunk in images.split(batch_size):
                f, lg = _batch_features(classifier, chunk.to(device))
                feats.append(f.float().cpu())
                logits.append(lg.float().cpu())
    finally:
        classifier.train(was_training)
    return torch.cat(feats), torch.cat(logits)


def classifier_accuracy(logits: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy of ``logits (N, K)`` against integer ``labels (N,)``."""
    return float((logits.argmax(dim=1) == labels.to(logits.device)).double().mean())


def cosine_fidelity(emb: Tensor, ref: Tensor) -> float:
    """Mean row-wise cosine similarity of embeddings ``(N, D)`` to reference ``(N, D)``; 1 = same
    directions. Used for encoders, whose embeddings are compared by cosine downstream."""
    if emb.shape != ref.shape:
        raise ValueError(
            f"embeddings and reference must have equal shapes, got {tuple(emb.shape)} and {tuple(ref.shape)}"
        )
    return float(F.cosine_similarity(emb.double(), ref.double(), dim=-1).mean())


def _classifier_metrics(
    samples: Tensor,
    reference: Tensor,
    classifier: nn.Module,
    labels: Tensor | None,
    real_features: Tensor | None,
) -> dict[str, float]:
    feats, logits = classifier_features(classifier, samples)
    ref_feats, ref_logits = classifier_features(classifier, reference)
    out: dict[str, float] = {}
    if real_features is None:
        out["fd"] = frechet_distance(feats, ref_feats)
    else:
        out["fd"] = frechet_distance(feats, real_features)
        out["fd_reference"] = frechet_distance(ref_feats, real_features)
    out["agreement"] = float((logits.argmax(1) == ref_logits.argmax(1)).double().mean())
    if labels is not None:
        out["accuracy"] = classifier_accuracy(logits, labels)
        out["accuracy_reference"] = classifier_accuracy(ref_logits, labels)
    return out


def image_fidelity(
    samples: Tensor,
    reference: Tensor,
    *,
    classifier: nn.Module | None = None,
    labels: Tensor | None = None,
    real_features: Tensor | None = None,
) -> dict[str, float]:
    """All image fidelity numbers of one variant, in one dict.

    ``samples`` come from the fast variant and ``reference`` from the full model, both drawn from
    the same noise (and labels), shape ``(B, C, H, W)`` in ``[-1, 1]``. Keys:

    - ``psnr``: mean per-image PSNR (dB) of samples vs reference; ``inf`` when identical.
    - ``ssim``: mean SSIM of samples vs reference; 1 when identical.

    Only with a ``classifier`` (features from :func:`classifier_features`):

    - ``fd``: Fréchet distance (FID proxy) of the samples' features to ``real_features`` (features of
      real data), or, without ``real_features``, to the reference samples' features.
    - ``fd_reference``: only with ``real_features``: the reference samples' own distance to them,
      so a report can say "fd within X% of the full model" (``fd / fd_reference - 1``).
    - ``agreement``: fraction of samples whose predicted class equals the reference sample's.
    - ``accuracy`` / ``accuracy_reference``: only with ``labels`` (the class each sample was
      conditioned on): top-1 accuracy of samples / reference samples against them.
    """
    _check_images(samples, reference)
    out = {"psnr": psnr(samples, reference), "ssim": ssim(samples, reference)}
    if classifier is not None:
        out |= _classifier_metrics(samples, reference, classifier, labels, real_features)
    elif labels is not None or real_features is not None:
        raise ValueError("labels and real_features need a classifier to compute features with")
    return out


def output_fidelity(kind: str, out: Tensor, ref: Tensor, labels: Tensor | None) -> dict[str, float]:
    """Classifier: accuracy, agreement, KL; encoder: mean and min cosine to the full model."""
    if kind == "classifier":
        kl = F.kl_div(F.log_softmax(out, -1), F.log_softmax(ref, -1), log_target=True, reduction="batchmean")
        return {
            "accuracy": float((out.argmax(-1) == labels).float().mean()),
            "agreement": float((out.argmax(-1) == ref.argmax(-1)).float().mean()),
            "kl": float(kl),
        }
    cos = F.cosine_similarity(out, ref, dim=-1)
    return {"cosine": float(cos.mean()), "cosine_min": float(cos.min())}


def fidelity_key(kind: str) -> str:
    """The headline metric of :func:`output_fidelity` for a model kind."""
    return "accuracy" if kind == "classifier" else "cosine"
