"""The TeaCache-style baseline: run-time whole-step skipping from the modulated input's change."""

from __future__ import annotations

import pytest
import torch

from dipgo.errors import PlanError
from dipgo.postprocess.teacache import calibrate_threshold, install_teacache, mean_cost, teacache_indicator
from dipgo.supernets.sampling import make_model_fn, make_scheduler, sample
from tests.conftest import tiny_reuse_supernet, unet_batch

STEPS = 10


def _run(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return sample(make_model_fn(model), make_scheduler("ddim"), batch, STEPS, null_class=3)[0]


def test_threshold_zero_is_the_full_model_and_a_huge_one_keeps_first_and_last() -> None:
    model, sn = tiny_reuse_supernet(STEPS)
    sn.remove()
    batch = unet_batch()
    full = _run(model, batch)
    with install_teacache(model, STEPS, 0.0) as handle:
        assert torch.equal(_run(model, batch), full)
    assert all(all(row) for row in handle.grids[0])
    with install_teacache(model, STEPS, 1e9) as handle:
        _run(model, batch)
    assert [row[0] for row in handle.grids[0]] == [True] + [False] * (STEPS - 2) + [True]


def test_skipped_steps_run_what_the_supernet_runs_for_the_same_grid() -> None:
    model, sn = tiny_reuse_supernet(STEPS)
    batch = unet_batch()
    sn.remove()
    with install_teacache(model, STEPS, 0.3) as handle:
        out = _run(model, batch)
    grid = handle.grids[0]
    assert 2 < sum(r[0] for r in grid) < STEPS, "threshold 0.3 should skip some but not all steps here"
    model2, sn2 = tiny_reuse_supernet(STEPS)  # same weights (seeded)
    torch.testing.assert_close(out, sn2.sample(batch, torch.tensor(grid)), rtol=0, atol=0)
    assert 0 < mean_cost(handle.grids, sn2.plan_cost) < 1
    sn2.remove()


def test_threshold_calibration_meets_the_budget() -> None:
    model, sn = tiny_reuse_supernet(STEPS)
    batch = unet_batch()
    sn.remove()

    def cost(threshold: float) -> float:
        with install_teacache(model, STEPS, threshold) as handle:
            _run(model, batch)
        return mean_cost(handle.grids, sn.plan_cost)

    threshold, c = calibrate_threshold(cost, 0.5)
    assert c <= 0.5 and c == pytest.approx(cost(threshold))
    assert cost(threshold / 2) >= c  # a lower threshold computes at least as much
    with pytest.raises(PlanError, match="above the target"):
        calibrate_threshold(cost, 0.01)  # first and last step always run


def test_dit_indicator_and_unknown_models() -> None:
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=2,
                                num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=3,
                                norm_num_groups=1).eval()
    x = torch.randn(2, 1, 8, 8)
    ind = teacache_indicator(dit)((x,), {"timestep": torch.tensor([5, 5]), "class_labels": torch.tensor([0, 1])})
    assert ind.shape[0] == 2 and torch.isfinite(ind).all()
    with pytest.raises(PlanError, match="not Linear"):
        teacache_indicator(torch.nn.Linear(2, 2))
