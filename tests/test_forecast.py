"""Forecasting closed reuse slots: the extrapolation, its soft form, the SuperNet and the SubNet."""

from __future__ import annotations

import pytest
import torch

from dipgo.errors import ConfigError, PlanError
from dipgo.postprocess.plan import FORECAST_ORDERS, Plan, ReusePayload
from dipgo.postprocess.reuse_subnet import install_plan
from dipgo.search.compose import compose_config
from dipgo.supernets import forecast
from dipgo.supernets.reuse import ReuseConfig, apply_reuse, cache_readers
from dipgo.supernets.sampling import make_model_fn, make_scheduler, sample
from tests.conftest import tiny_reuse_supernet, unet_batch


def _history(order: int, points: list[tuple[int, torch.Tensor]]) -> forecast.History:
    (s, y), rest = points[0], points[1:]
    h = forecast.start(y, s, order)
    for s, y in rest:
        h = forecast.update(h, y, s)
    return h


def test_orders_are_one_list() -> None:
    assert FORECAST_ORDERS == forecast.FORECAST_ORDERS  # plan.py keeps a literal copy (no torch import)


@pytest.mark.parametrize("order", [1, 2])
def test_extrapolation_is_exact_for_polynomials_of_its_order_on_irregular_steps(order: int) -> None:
    coef = torch.tensor([0.3, -1.2, 0.05])[: order + 1]

    def f(s: float) -> torch.Tensor:
        return sum(c * s**k for k, c in enumerate(coef)) * torch.ones(3)

    steps = [0, 1, 4, 6]  # a learned plan computes a unit at irregular steps
    h = _history(order, [(s, f(s)) for s in steps])
    for target in (7, 9, 12):
        torch.testing.assert_close(forecast.predict(h, target), f(target), rtol=1e-5, atol=1e-5)


def test_order_two_with_only_two_points_is_linear_and_one_point_is_a_copy() -> None:
    y0, y1 = torch.tensor([1.0, 2.0]), torch.tensor([2.0, 0.0])
    h = forecast.start(y0, 0, 2)
    assert torch.equal(forecast.predict(h, 5), y0)
    h = forecast.update(h, y1, 2)
    torch.testing.assert_close(forecast.predict(h, 4), y1 + (y1 - y0))  # no curvature from two points


def test_order_zero_returns_the_stored_value_itself() -> None:
    y = torch.randn(4)
    assert forecast.predict(forecast.start(y, 0, 0), 7) is y


def test_pytrees_extrapolate_every_tensor_and_keep_the_rest() -> None:
    a = (torch.zeros(2), (torch.ones(2), "tag"))
    b = (torch.ones(2), (3 * torch.ones(2), "tag"))
    h = _history(1, [(0, a), (1, b)])
    hidden, (res, tag) = forecast.predict(h, 2)
    torch.testing.assert_close(hidden, 2 * torch.ones(2))
    torch.testing.assert_close(res, 5 * torch.ones(2))
    assert tag == "tag"


def test_soft_update_is_the_hard_one_at_gates_zero_and_one() -> None:
    h = _history(2, [(0, torch.randn(5)), (2, torch.randn(5))])
    y = torch.randn(5)
    hard = forecast.update(h, y, 3)
    one = forecast.update(h, y, 3, torch.tensor(1.0))
    zero = forecast.update(h, y, 3, torch.tensor(0.0))
    for step in (4, 6):
        assert torch.equal(forecast.predict(one, step), forecast.predict(hard, step))
        assert torch.equal(forecast.predict(zero, step), forecast.predict(h, step))


def test_soft_update_is_differentiable_in_the_gate() -> None:
    h = _history(1, [(0, torch.randn(5)), (1, torch.randn(5))])
    g = torch.tensor(0.4, requires_grad=True)
    forecast.predict(forecast.update(h, torch.randn(5), 2, g), 4).square().sum().backward()
    assert g.grad is not None and bool(torch.isfinite(g.grad)) and float(g.grad.abs()) > 0


@pytest.mark.parametrize("bad", [3, -1, True, "1", 1.0])
def test_bad_orders_are_refused(bad: object) -> None:
    with pytest.raises(ValueError, match="forecast order must be one of 0, 1, 2"):
        forecast.check_order(bad)  # type: ignore[arg-type]
    with pytest.raises(PlanError, match="forecast_order must be one of"):
        ReusePayload(forecast_order=bad)  # type: ignore[arg-type]


def test_config_refuses_a_bad_order_in_one_sentence() -> None:
    with pytest.raises(ConfigError) as info:
        compose_config(["supernet.forecast_order=3"])
    assert "supernet.forecast_order=3 is not supported; accepted: 0, 1, 2" in str(info.value)
    assert "\n" not in str(info.value)


def test_payload_writes_the_order_only_when_forecasting() -> None:
    assert "forecast_order" not in ReusePayload().to_meta()  # old plans keep their bytes
    meta = ReusePayload(forecast_order=2).to_meta()
    assert meta["forecast_order"] == 2 and ReusePayload.from_meta(meta).forecast_order == 2
    assert ReusePayload.from_meta({"granularity": "block"}).forecast_order == 0
    with pytest.raises(PlanError):
        ReusePayload.from_meta({"forecast_order": 5})


def _plan(sn, compute: list[list[bool]], order: int) -> Plan:
    return Plan(kind="reuse", model=sn.model_class, blocks=sn.block_names, compute=compute, target=1.0,
                cost_ratio=sn.plan_cost(compute), num_steps=sn.num_steps,
                meta=ReusePayload("block", "auto", sn.modes, order).to_meta())


def _every_third(sn) -> list[list[bool]]:
    return [[s % 3 == 0] * len(sn.block_names) for s in range(sn.num_steps)]


@pytest.mark.parametrize("order", [1, 2])
def test_installed_forecast_plan_reproduces_the_supernet_and_skips_fully_forecast_steps(order: int) -> None:
    model, sn = tiny_reuse_supernet(8, forecast_order=order)
    batch = unet_batch()
    compute = _every_third(sn)
    compute[4][-1] = True  # the last unit (it feeds the head) computed off the grid: irregular history
    assert (sn.effective(torch.tensor(compute, dtype=torch.float64)) > 0.5).tolist()[4][-1]
    expected = sn.sample(batch, compute)
    copy = sn.sample(batch, compute, forecast_order=0)
    sn.remove()
    assert not torch.equal(expected, copy), "forecasting must change what closed blocks return"

    calls: list[int] = []
    hook = model.conv_out.register_forward_hook(lambda *_: calls.append(1))
    with install_plan(model, _plan(sn, compute, order)) as handle:
        with torch.no_grad():
            final, _ = sample(make_model_fn(model), make_scheduler("ddim"), batch, 8, null_class=3)
    hook.remove()
    torch.testing.assert_close(final, expected, rtol=0, atol=0)
    # steps 0, 3, 6 and 4 call the model; the others return the forecast model output, no call
    assert len(calls) == 4
    assert handle.peak_cache_bytes > 0
    assert "forward" not in model.__dict__


def test_history_memory_grows_with_the_order() -> None:
    model, sn = tiny_reuse_supernet(6)
    batch = unet_batch()
    compute = [[s % 2 == 0] * len(sn.block_names) for s in range(6)]
    sn.remove()
    peaks = []
    for order in FORECAST_ORDERS:
        with install_plan(model, _plan(sn, compute, order)) as handle, torch.no_grad():
            sample(make_model_fn(model), make_scheduler("ddim"), batch, 6, null_class=3)
        peaks.append(handle.peak_cache_bytes)
    # order k keeps k + 1 tensors per cached output (value, d1, d2)
    assert peaks[1] == 2 * peaks[0] and peaks[2] == 3 * peaks[0]


def test_cache_readers_are_the_later_steps_that_close_a_unit_and_still_call_the_model() -> None:
    rows = [[True, True], [True, False], [False, False], [True, True]]
    # unit 1 is read at step 1; step 2 closes both, but with whole-step skips it reads no unit
    assert cache_readers(rows, skip_whole=True) == [(False, True), (False, False), (False, False), (False, False)]
    assert cache_readers(rows, skip_whole=False) == [(True, True), (True, True), (False, False), (False, False)]
    assert cache_readers([], skip_whole=True) == []


@pytest.mark.parametrize("order", [0, 1])
def test_installed_plan_keeps_only_the_caches_a_later_step_reads(order: int) -> None:
    """A unit never closed again holds no cache (time and memory), with the same samples bit for bit."""
    model, sn = tiny_reuse_supernet(6, forecast_order=order)
    batch = unet_batch()
    width = len(sn.block_names)
    one_late = [[True] * width for _ in range(6)]
    one_late[4][0] = False  # only the first unit is ever closed (at step 4); its consumers still run
    every_other = [[s % 2 == 0] * width for s in range(6)]  # whole-step skips: no unit cache is read
    expected = {name: sn.sample(batch, rows) for name, rows in (("one_late", one_late), ("every_other", every_other))}
    sn.remove()
    peaks = {}
    for name, rows in (("one_late", one_late), ("every_other", every_other), ("open", [[True] * width] * 6)):
        with install_plan(model, _plan(sn, rows, order)) as handle, torch.no_grad():
            final, _ = sample(make_model_fn(model), make_scheduler("ddim"), batch, 6, null_class=3)
            if name in expected:
                torch.testing.assert_close(final, expected[name], rtol=0, atol=0)
            assert set(handle._caches) <= {0}, "only the unit a later step closes keeps a cache"
        peaks[name] = handle.peak_cache_bytes
    # the full model keeps only the model output's history; one late closure adds one unit's cache
    assert peaks["every_other"] == peaks["open"] > 0
    assert peaks["one_late"] > peaks["open"]


def test_soft_gates_at_zero_and_one_give_the_hard_trajectory() -> None:
    _, sn = tiny_reuse_supernet(6, forecast_order=2)
    batch = unet_batch()
    compute = torch.tensor([[s % 2 == 0 or s == 5] * len(sn.block_names) for s in range(6)])
    hard = sn.sample(batch, compute)
    gates = compute[1:].flatten().float().requires_grad_(True)  # runs every unit and mixes
    soft = sn.gated(batch, gates)["output"]
    torch.testing.assert_close(soft.detach(), hard, rtol=1e-5, atol=1e-6)
    soft.square().mean().backward()
    assert bool(torch.isfinite(gates.grad).all()) and float(gates.grad.abs().sum()) > 0


def test_checkpointing_and_truncation_work_with_forecasts() -> None:
    outs, grads = [], []
    for extra in ({}, {"checkpointing": True}, {"truncate_steps": 2}):
        _, sn = tiny_reuse_supernet(5, forecast_order=1, **extra)
        gates = torch.full((len(sn.slots),), 0.6, requires_grad=True)
        out = sn.gated(unet_batch(), gates)["output"]
        out.square().mean().backward()
        outs.append(out.detach())
        grads.append(gates.grad)
        sn.remove()
    torch.testing.assert_close(outs[1], outs[0])
    torch.testing.assert_close(grads[1], grads[0])
    torch.testing.assert_close(outs[2], outs[0])  # truncation changes gradients, not values
    assert float(grads[2].abs().sum()) > 0


def test_residual_mode_forecasts_on_a_dit() -> None:
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=2,
                                num_layers=3, sample_size=8, patch_size=2, num_embeds_ada_norm=3,
                                norm_num_groups=1).eval()
    batch = {"noise": torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)),
             "class_labels": torch.tensor([0, 2])}
    sn = apply_reuse(dit, ReuseConfig(num_steps=6, forecast_order=1), batch)
    assert set(sn.modes) == {"residual"}
    compute = [[s % 2 == 0] * len(sn.block_names) for s in range(6)]
    expected = sn.sample(batch, compute)
    assert not torch.equal(expected, sn.sample(batch, compute, forecast_order=0))
    sn.remove()
    with install_plan(dit, _plan(sn, compute, 1)), torch.no_grad():
        final, _ = sample(make_model_fn(dit), make_scheduler("ddim"), batch, 6, null_class=3)
    torch.testing.assert_close(final, expected, rtol=0, atol=0)


def test_taylorseer_baselines_are_uniform_schedules_that_forecast() -> None:
    from dipgo.postprocess.reuse_baselines import baseline_plans

    model, sn = tiny_reuse_supernet(12, forecast_order=1)
    plans, skipped = baseline_plans(sn, 0.4, ["uniform", "taylorseer1", "taylorseer2", "random"])
    assert not skipped
    orders = {n: p.payload.forecast_order for n, p in plans.items()}
    # published copy schedules copy; random follows the SuperNet's order (isolates the schedule)
    assert orders == {"uniform": 0, "taylorseer1": 1, "taylorseer2": 2, "random": 1}
    assert plans["taylorseer1"].compute == plans["uniform"].compute == plans["taylorseer2"].compute
    assert plans["taylorseer2"].meta["label"].startswith("TaylorSeer o2 N=")
    batch = unet_batch()
    sn.remove()
    outs = {}
    for name in ("uniform", "taylorseer1", "taylorseer2"):
        with install_plan(model, plans[name]), torch.no_grad():
            outs[name], _ = sample(make_model_fn(model), make_scheduler("ddim"), batch, 12, null_class=3)
    assert not torch.equal(outs["uniform"], outs["taylorseer1"])
    assert not torch.equal(outs["taylorseer1"], outs["taylorseer2"])
