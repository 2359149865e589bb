"""The settings of the search losses: plain dataclasses, no torch.

``search.distortion`` and ``search.cost`` are these very classes, used as the Hydra schema and built at run time by ``dipgo.search.config.config_of``
(their ``__post_init__`` checks the values once, for both).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

# term name -> key of the output dicts it compares
TERM_KEYS: dict[str, str] = {
    "mse": "output",
    "ssim": "output",
    "eps": "eps",
    "kl": "output",
    "cosine": "output",
    "feature_mse": "features",
}


@dataclass
class DistortionConfig:
    """Weights of the distortion terms (0 turns a term off) and their few settings."""

    mse: float = 1.0
    """Weight of the per-element mean squared error on ``"output"``."""
    ssim: float = 0.0
    """Weight of ``1 - SSIM`` on ``"output"`` images ``(..., C, H, W)``; in [0, 2]."""
    eps: float = 0.0
    """Weight of the per-element MSE on per-step noise predictions ``"eps"``."""
    kl: float = 0.0
    """Weight of ``KL(softmax(ref / T) || softmax(gated / T)) * T^2`` on ``"output"`` logits
    (last axis = classes)."""
    cosine: float = 0.0
    """Weight of ``1 - cosine similarity`` on ``"output"`` embeddings (last axis = features)."""
    feature_mse: float = 0.0
    """Weight of the per-element MSE on intermediate ``"features"``."""
    temperature: float = 1.0
    """Softmax temperature of the KL term; the ``T^2`` factor keeps its gradient scale steady."""
    data_range: float = 2.0
    """Value range of the images for SSIM: 2.0 for images in [-1, 1], 1.0 for [0, 1]."""
    ssim_kernel: int = 11
    """Gaussian window of SSIM (odd); shrunk to the largest odd size that fits small images,
    with sigma scaled as in the standard 11 / 1.5 window."""

    def __post_init__(self) -> None:
        weights = self.weights()
        negative = [name for name, w in weights.items() if w < 0]
        if negative:
            raise ValueError(f"distortion weights must be >= 0; negative: {', '.join(negative)}")
        if not any(w > 0 for w in weights.values()):
            raise ValueError(f"at least one distortion weight must be > 0 (terms: {', '.join(TERM_KEYS)})")
        if self.temperature <= 0 or self.data_range <= 0:
            raise ValueError(
                f"distortion.temperature and distortion.data_range must be > 0; "
                f"got {self.temperature}, {self.data_range}"
            )
        if self.ssim_kernel < 1 or self.ssim_kernel % 2 == 0:
            raise ValueError(f"distortion.ssim_kernel must be a positive odd number; got {self.ssim_kernel}")

    def weights(self) -> dict[str, float]:
        """Term name -> weight, for every term (active or not)."""
        names = {f.name for f in fields(self)}
        return {term: float(getattr(self, term)) for term in TERM_KEYS if term in names}


COST_MODES: tuple[str, ...] = ("two_sided", "hinge")
CONTROLLERS: tuple[str, ...] = ("fixed", "dual")


def check_cost_mode(mode: str) -> None:
    if mode not in COST_MODES:
        raise ValueError(f"cost.mode must be one of {', '.join(COST_MODES)}; got {mode!r}")


@dataclass
class CostConfig:
    """How hard, and how adaptively, the expected cost is pulled to the target."""

    weight: float = 1.0
    """Weight of the cost penalty: the constant weight (``fixed``) or the initial multiplier
    (``dual``)."""
    mode: str = "two_sided"
    """``two_sided``: penalise being over *and* under budget (land on the target; the default,
    since keeping more than asked wastes speed the user paid for in quality). ``hinge``: only
    over budget (a ceiling; the search may keep less if that costs no distortion)."""
    controller: str = "dual"
    """``fixed``: constant ``weight``. ``dual``: multiplier raised while the constraint is
    violated and decayed while it is met (see :class:`CostController`)."""
    lr_lambda: float = 0.05
    """Step size of the ``dual`` multiplier in log space: at most a factor ``exp(lr_lambda)``
    up or down per step."""
    lambda_max: float = 100.0
    """Ceiling of the multiplier, so a target the model cannot reach does not blow up the loss."""
    lambda_min: float = 0.01
    """Floor of the multiplier (``dual``): low enough that it can settle near the true price of
    the constraint when the distortion is small, above 0 so the penalty never switches off."""
    tolerance: float = 0.005
    """Relative error ``|log(expected / target)|`` counted as "on target" by the controller;
    below it the multiplier decays, above ``2 * tolerance`` it rises at full speed."""
    smoothing: float = 0.9
    """EMA factor of the signed log ratio the ``dual`` controller reacts to: an oscillation
    around the target averages out (no reason to push harder), a persistent bias does not."""
    delta: float = 0.01
    """Width of the quadratic zone of the pseudo-Huber penalty, in log-ratio units."""

    def __post_init__(self) -> None:
        check_cost_mode(self.mode)
        if self.controller not in CONTROLLERS:
            raise ValueError(
                f"cost.controller must be one of {', '.join(CONTROLLERS)}; got {self.controller!r}"
            )
        if not 0.0 < self.lambda_min <= self.weight <= self.lambda_max:
            raise ValueError(
                "cost weights must satisfy 0 < cost.lambda_min <= cost.weight <= cost.lambda_max; got "
                f"{self.lambda_min}, {self.weight}, {self.lambda_max}"
            )
        if not 0.0 <= self.smoothing < 1.0:
            raise ValueError(f"cost.smoothing must be in [0, 1); got {self.smoothing}")
        if self.lr_lambda < 0 or self.tolerance <= 0 or self.delta <= 0:
            raise ValueError(
                "cost.lr_lambda must be >= 0 and cost.tolerance, cost.delta > 0; got "
                f"lr_lambda={self.lr_lambda}, tolerance={self.tolerance}, delta={self.delta}"
            )
