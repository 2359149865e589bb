"""Every solver of the sampling table on real and tiny denoisers: finite, configured, convergent,
differentiable.

What must hold: each short name builds the solver it promises (DPM-Solver++(2M), UniPC-2 with its
corrector) on the model folder's noise schedule; a converged solver lands close to DDIM on a
trained model; and truncated backprop through UniPC cuts every path back past the cut, including
the corrector's remembered ``last_sample``.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from dipgo.supernets.sampling import SCHEDULER_NAMES, make_model_fn, make_scheduler, sample
from tests.conftest import tiny_reuse_supernet, tiny_reuse_unet, unet_batch


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread: None) -> None:
    """Tiny models: intra-op threads only add contention (see conftest.one_torch_thread)."""


@pytest.fixture(scope="module")
def digits_unet() -> Any:
    """The shipped digits reference UNet (trained, 16x16, 1.1 M parameters) and its scheduler."""
    from dipgo.models.registry import load_digits_unet

    loaded = load_digits_unet()
    loaded.model.eval()
    return loaded


def test_the_table_names_the_issue_samplers() -> None:
    assert {"ddim", "dpmsolver++", "unipc"} <= set(SCHEDULER_NAMES)


def test_compose_accepts_exactly_the_sampling_table() -> None:
    """compose spells the names out (importing the table imports diffusers): the two lists must agree,
    every name composes, and composing still does not import diffusers."""
    import subprocess
    import sys

    from dipgo.search.compose import SCHEDULERS, compose_config

    assert SCHEDULERS == SCHEDULER_NAMES
    for name in SCHEDULER_NAMES:
        assert compose_config([f"supernet.scheduler={name}"])[0].supernet.scheduler == name
    code = ("import sys; from dipgo.search.compose import compose_config; "
            "compose_config(['supernet.scheduler=unipc']); print('diffusers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_every_solver_gives_finite_samples(name: str) -> None:
    model, batch = tiny_reuse_unet(), unet_batch()
    with torch.no_grad():
        final, eps = sample(make_model_fn(model), make_scheduler(name), batch, 5, 2.0, null_class=2)
    assert final.shape == batch["noise"].shape and eps.shape == (5, *batch["noise"].shape)
    assert bool(torch.isfinite(final).all()) and bool(torch.isfinite(eps).all())
    assert not torch.allclose(final, batch["noise"])  # it moved


def test_multistep_solvers_are_pinned_to_their_recommended_variants() -> None:
    """A folder config asking for another order must not change what the short name means."""
    folder = {"beta_schedule": "linear", "solver_order": 3, "num_train_timesteps": 1000}
    dpm = make_scheduler("dpmsolver++", folder)
    assert type(dpm).__name__ == "DPMSolverMultistepScheduler"
    assert (dpm.config.algorithm_type, dpm.config.solver_order) == ("dpmsolver++", 2)
    unipc = make_scheduler("unipc", folder)
    assert type(unipc).__name__ == "UniPCMultistepScheduler"
    assert (unipc.config.solver_order, unipc.config.solver_type, unipc.config.predict_x0) == (2, "bh2", True)
    assert list(unipc.config.disable_corrector) == []


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_the_model_folders_noise_schedule_carries_over(name: str, digits_unet: Any) -> None:
    """The digits folder's DDIM config (squaredcos_cap_v2, epsilon) defines every solver's schedule."""
    folder = dict(digits_unet.scheduler.config)
    assert folder["beta_schedule"] == "squaredcos_cap_v2"  # not any solver's default (linear)
    scheduler = make_scheduler(name, folder)
    assert scheduler.config.beta_schedule == "squaredcos_cap_v2"
    assert scheduler.config.prediction_type == folder["prediction_type"]
    torch.testing.assert_close(scheduler.alphas_cumprod, digits_unet.scheduler.alphas_cumprod)
    assert not torch.allclose(make_scheduler(name).alphas_cumprod, digits_unet.scheduler.alphas_cumprod)


def test_unipc_50_steps_lands_close_to_ddim_50_steps(digits_unet: Any) -> None:
    """Both solve the same probability-flow ODE: at 50 steps they agree far better than two samples do.

    Tolerance from measured spread (digits UNet, its folder's scheduler, 4 samples, classes 0/3/7/9,
    guidance 1, seeds 0-2): the RMS gap between 50-step UniPC and 50-step DDIM was 0.049, 0.068 and
    0.030 (DPM-Solver++ 50: 0.049, 0.068, 0.030 too); most of it is DDIM's ``clip_sample`` (the
    multistep solvers do not clip, their samples reach |x| ~ 1.3-1.5). Two different samples of
    the same batch are 0.58-0.63 apart. 0.15 is twice the largest measured gap and a quarter of the
    sample spread, so a solver on the wrong schedule or timesteps (or a broken corrector) fails.
    """
    fn = make_model_fn(digits_unet.model)
    folder = dict(digits_unet.scheduler.config)
    g = torch.Generator().manual_seed(0)
    batch = {"noise": torch.randn(4, 1, 16, 16, generator=g), "class_labels": torch.tensor([0, 3, 7, 9])}
    with torch.no_grad():
        ddim, _ = sample(fn, make_scheduler("ddim", folder), batch, 50)
        unipc, _ = sample(fn, make_scheduler("unipc", folder), batch, 50)
    rms = float((unipc - ddim).pow(2).mean().sqrt())
    spread = float((ddim - ddim.roll(1, 0)).pow(2).mean().sqrt())
    assert spread > 0.4  # the samples really differ from each other, so the bound below means something
    assert rms < 0.15, f"50-step UniPC is {rms:.3f} RMS from 50-step DDIM (sample spread {spread:.3f})"


def _gate_grads(truncate_steps: int | None, steps: int = 4) -> torch.Tensor:
    """Gradients ``(S-1, B)`` of a loss on the final UniPC sample w.r.t. soft keep gates."""
    _, sn = tiny_reuse_supernet(steps=steps, scheduler="unipc", guidance_scale=2.0, truncate_steps=truncate_steps)
    gates = torch.full((len(sn.slots),), 0.6, requires_grad=True)
    out = sn.gated(unet_batch(), gates)["output"]
    out.square().mean().backward()
    assert gates.grad is not None and bool(torch.isfinite(gates.grad).all())
    return gates.grad.reshape(sn.grid_shape)


def test_backprop_through_unipc_reaches_every_step() -> None:
    grads = _gate_grads(None)
    assert bool((grads.abs().sum(dim=1) > 0).all())  # each step's gates move the final sample


def test_truncated_backprop_through_unipc_cuts_the_corrector_state_too() -> None:
    """With ``truncate_steps=2`` step 1 is behind the cut at step 2: no gradient may reach it.

    UniPC's corrector at step 2 revisits ``last_sample`` (which depends on step 1's output); if only
    the latent and ``model_outputs`` were detached, step 1's gates would still get a gradient.
    """
    grads = _gate_grads(2)
    assert grads[0].abs().sum() == 0
    assert grads[1:].abs().sum() > 0


def test_soft_gate_training_steps_through_unipc() -> None:
    """Repeated optimisation steps (a fresh trajectory each): no "backward through the graph a second
    time", the gates change, and the loss stays finite."""
    _, sn = tiny_reuse_supernet(steps=4, scheduler="unipc", guidance_scale=2.0, truncate_steps=2)
    logits = torch.zeros(len(sn.slots), requires_grad=True)
    opt = torch.optim.SGD([logits], lr=1.0)
    batch = unet_batch()
    target = sn.reference(batch)["output"]
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = (sn.gated(batch, torch.sigmoid(logits))["output"] - target).square().mean() + sn.expected_cost(torch.sigmoid(logits))
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert logits.detach().abs().sum() > 0
