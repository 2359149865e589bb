"""Distortion and cost losses: zero where they should be, differentiable, clear errors."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from dipgo.losses import (
    CostConfig,
    CostController,
    DistortionConfig,
    check_target,
    cost_loss,
)
from dipgo.losses.distortion import distortion, ssim_term

ALL_TERMS = DistortionConfig(mse=1.0, ssim=0.5, eps=0.3, kl=0.2, cosine=0.1, feature_mse=0.4)


def outputs(seed: int = 0) -> dict[str, torch.Tensor]:
    """Every key any term reads; "output" is a batch of 16x16 images in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    return {
        "output": torch.rand(2, 3, 16, 16, generator=g) * 2 - 1,  # (B, C, H, W)
        "eps": torch.randn(4, 2, 3, 8, 8, generator=g),  # (S, B, C, H, W)
        "features": torch.randn(2, 10, 32, generator=g),  # (B, T, D)
    }


def perturbed(ref: dict[str, torch.Tensor], scale: float = 0.1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(99)
    return {k: (v + scale * torch.randn(v.shape, generator=g)).requires_grad_() for k, v in ref.items()}


# --- distortion ------------------------------------------------------------------------------


def test_every_term_is_zero_when_gated_equals_reference() -> None:
    ref = outputs()
    terms = distortion({k: v.clone() for k, v in ref.items()}, ref, ALL_TERMS)
    assert set(terms) == {"mse", "ssim", "eps", "kl", "cosine", "feature_mse", "total"}
    for name, value in terms.items():
        assert value.ndim == 0
        assert value.item() == pytest.approx(0.0, abs=1e-5), name


def test_total_is_weighted_sum_and_inactive_terms_are_absent() -> None:
    ref = outputs()
    gated = perturbed(ref)
    terms = distortion(gated, ref, ALL_TERMS)
    weights = ALL_TERMS.weights()
    manual = sum(weights[name] * terms[name] for name in terms if name != "total")
    torch.testing.assert_close(terms["total"], manual)
    only_mse = distortion(gated, ref, DistortionConfig())
    assert set(only_mse) == {"mse", "total"}
    assert only_mse["mse"].item() > 0


@pytest.mark.parametrize("term", ["mse", "ssim", "eps", "kl", "cosine", "feature_mse"])
def test_gradients_flow_to_gated_outputs_only(term: str) -> None:
    ref = {k: v.requires_grad_() for k, v in outputs().items()}
    gated = perturbed(outputs())
    config = DistortionConfig(**{name: 0.0 for name in ALL_TERMS.weights()} | {term: 1.0})
    terms = distortion(gated, ref, config)
    terms["total"].backward()
    key = {"eps": "eps", "feature_mse": "features"}.get(term, "output")
    grad = gated[key].grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert all(v.grad is None for v in ref.values()), "the reference must be a fixed teacher"


def test_mse_is_per_element_mean() -> None:
    ref = {"output": torch.zeros(3, 5)}
    gated = {"output": torch.full((3, 5), 2.0)}
    assert distortion(gated, ref, DistortionConfig())["mse"].item() == pytest.approx(4.0)


@pytest.mark.parametrize("size", [16, 8, 5, 3])
def test_ssim_term_in_range_on_small_images(size: int) -> None:
    g = torch.Generator().manual_seed(size)
    ref = torch.rand(2, 3, size, size, generator=g) * 2 - 1
    noisy = (ref + 0.3 * torch.randn(ref.shape, generator=g)).requires_grad_()
    value = ssim_term(noisy, ref, data_range=2.0)
    assert 0.0 < value.item() <= 2.0
    value.backward()
    assert noisy.grad is not None and noisy.grad.abs().sum() > 0
    other = torch.rand(ref.shape, generator=g) * 2 - 1  # unrelated image: SSIM near 0
    unrelated = ssim_term(other, ref, data_range=2.0).item()
    assert value.item() < unrelated <= 2.0


def test_ssim_rejects_non_images() -> None:
    with pytest.raises(ValueError, match=r"\(\.\.\., C, H, W\)"):
        ssim_term(torch.zeros(4, 8), torch.zeros(4, 8), data_range=2.0)


def test_kl_matches_definition_and_temperature_scaling() -> None:
    ref = torch.tensor([[2.0, 0.0, -1.0]])
    gated = torch.tensor([[0.0, 1.0, 0.0]])
    p = torch.softmax(ref, -1)
    expected = (p * (torch.log_softmax(ref, -1) - torch.log_softmax(gated, -1))).sum()
    got = distortion({"output": gated}, {"output": ref}, DistortionConfig(mse=0.0, kl=1.0))["kl"]
    torch.testing.assert_close(got, expected)


def test_cosine_ignores_scale() -> None:
    ref = {"output": torch.randn(4, 16)}
    gated = {"output": 3.0 * ref["output"]}
    value = distortion(gated, ref, DistortionConfig(mse=0.0, cosine=1.0))["cosine"]
    assert value.item() == pytest.approx(0.0, abs=1e-6)


def test_missing_key_raises_naming_it() -> None:
    ref = {"output": torch.zeros(2, 3, 8, 8)}
    with pytest.raises(ValueError, match="'eps'"):
        distortion(dict(ref), ref, DistortionConfig(eps=1.0))
    with pytest.raises(ValueError, match="'features'"):
        distortion(dict(ref), ref, DistortionConfig(feature_mse=1.0))
    with pytest.raises(ValueError, match="reference outputs have no key 'output'"):
        distortion(dict(ref), {}, DistortionConfig())


def test_shape_mismatch_and_bad_config_raise() -> None:
    with pytest.raises(ValueError, match="differ in shape"):
        distortion({"output": torch.zeros(2, 3)}, {"output": torch.zeros(3, 2)}, DistortionConfig())
    with pytest.raises(ValueError, match="at least one distortion weight"):
        DistortionConfig(mse=0.0)
    with pytest.raises(ValueError, match="negative: ssim"):
        DistortionConfig(ssim=-1.0)
    with pytest.raises(ValueError, match="ssim_kernel"):
        DistortionConfig(ssim_kernel=4)


# --- cost ------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["two_sided", "hinge"])
def test_cost_loss_zero_at_target_and_grows_away(mode: str) -> None:
    target = 0.4
    at = cost_loss(torch.tensor(target), target, 1.0, mode)
    assert at.item() == pytest.approx(0.0, abs=1e-7)
    over = [cost_loss(torch.tensor(e), target, 1.0, mode).item() for e in (0.41, 0.5, 0.8)]
    assert 0 < over[0] < over[1] < over[2]
    under = [cost_loss(torch.tensor(e), target, 1.0, mode).item() for e in (0.39, 0.3, 0.1)]
    if mode == "two_sided":
        assert 0 < under[0] < under[1] < under[2]
    else:
        assert under == [0.0, 0.0, 0.0]
    assert cost_loss(torch.tensor(0.8), target, 3.0, mode).item() == pytest.approx(3 * over[2])


def test_cost_loss_is_relative_and_differentiable() -> None:
    # Twice the target is as wrong at 0.2 -> 0.1 as at 0.8 -> 0.4 (log ratio).
    a = cost_loss(torch.tensor(0.2), 0.1, 1.0, "two_sided")
    b = cost_loss(torch.tensor(0.8), 0.4, 1.0, "two_sided")
    torch.testing.assert_close(a, b)
    expected = torch.tensor(0.7, requires_grad=True)
    cost_loss(expected, 0.4, 1.0, "two_sided").backward()
    assert expected.grad is not None and expected.grad.item() > 0
    below = torch.tensor(0.2, requires_grad=True)
    cost_loss(below, 0.4, 1.0, "two_sided").backward()
    assert below.grad is not None and below.grad.item() < 0


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, float("nan"), "half"])
def test_target_validation_message(bad: object) -> None:
    message = r"search\.target must be in \(0, 1\] \(the fraction of MACs to keep\); got"
    with pytest.raises(ValueError, match=message):
        check_target(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=message):
        CostController(CostConfig()).update(0.5, bad)  # type: ignore[arg-type]
    if isinstance(bad, float):
        with pytest.raises(ValueError, match=message):
            cost_loss(torch.tensor(0.5), bad, 1.0, "two_sided")
    assert check_target(1.0) == 1.0


def test_cost_config_validation() -> None:
    with pytest.raises(ValueError, match="cost.mode"):
        CostConfig(mode="both")
    with pytest.raises(ValueError, match="cost.controller"):
        CostConfig(controller="pid")
    with pytest.raises(ValueError, match="lambda_min <= cost.weight <= cost.lambda_max"):
        CostConfig(weight=200.0)


def test_controller_raises_lambda_under_violation_and_decays_on_target() -> None:
    controller = CostController(CostConfig(weight=1.0, lr_lambda=0.05))
    values = [controller.update(0.6, 0.4) for _ in range(30)]  # stuck 50% over budget
    assert values[-1] > 1.0
    assert all(b >= a for a, b in zip(values, values[1:]))
    assert values[-1] <= math.exp(0.05) ** 30 + 1e-9  # bounded rise per step
    peak = values[-1]
    for _ in range(400):  # on target: the smoothed error fades and the multiplier decays
        controller.update(0.4, 0.4)
    assert controller.value < peak
    assert controller.value >= controller.config.lambda_min


def test_controller_holds_while_approaching_the_target() -> None:
    """Anti-windup: no rise while the cost is visibly moving toward the target."""
    controller = CostController(CostConfig())
    for expected in torch.linspace(0.95, 0.45, 30).tolist():
        controller.update(expected, 0.4)
    assert controller.value == pytest.approx(1.0)


def test_hinge_controller_does_not_rise_under_budget() -> None:
    controller = CostController(CostConfig(mode="hinge"))
    for _ in range(50):
        controller.update(0.2, 0.4)
    assert controller.value <= 1.0


def test_fixed_controller_keeps_the_weight() -> None:
    controller = CostController(CostConfig(weight=2.5, controller="fixed"))
    for _ in range(20):
        assert controller.update(0.9, 0.4) == 2.5
    torch.testing.assert_close(
        controller.loss(torch.tensor(0.9), 0.4), cost_loss(torch.tensor(0.9), 0.4, 2.5, "two_sided")
    )


def test_controller_state_dict_restores_exactly() -> None:
    config = CostConfig()
    trajectory = [0.9, 0.7, 0.55, 0.5, 0.5, 0.48, 0.47, 0.47, 0.46, 0.41, 0.39, 0.4]
    a = CostController(config)
    for e in trajectory[:6]:
        a.update(e, 0.4)
    state = a.state_dict()
    assert all(isinstance(v, (int, float, type(None))) for v in state.values())
    b = CostController(config)
    b.load_state_dict(dict(state))
    assert b.state_dict() == state
    for e in trajectory[6:]:  # resumed and uninterrupted runs agree bit for bit
        assert a.update(e, 0.4) == b.update(e, 0.4)
    assert a.state_dict() == b.state_dict()


def test_controller_accepts_tensor_with_grad() -> None:
    expected = torch.tensor(0.5, requires_grad=True) * 1.0
    from_tensor, from_float = CostController(CostConfig()), CostController(CostConfig())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no autograd warning ("converting a tensor that requires grad")
        value = from_tensor.update(expected, 0.4)
    # the tensor is read as its value: the same multiplier and state as the plain float
    assert value == from_float.update(0.5, 0.4)
    assert from_tensor.state_dict() == from_float.state_dict()
    assert from_tensor.steps == 1 and from_tensor.smoothed == pytest.approx(math.log(0.5 / 0.4))
    assert expected.requires_grad and expected.grad_fn is not None  # the caller's graph is left alone
