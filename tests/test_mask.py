"""The mask gate kind: bridge, patterns, refusals, reconstruction, baselines, search, export."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dipgo.errors import ConfigError, PlanError
from dipgo.postprocess.mask_baselines import MASK_BASELINES, global_density, prune_baseline
from dipgo.postprocess.mask_plan import extract_mask_plan
from dipgo.postprocess.mask_subnet import export_mask_subnet, load_mask_subnet, prune_with_plan, to_kernels
from dipgo.postprocess.reconstruct import obs_prune
from dipgo.search.compose import compose_config
from dipgo.supernets.mask import MaskGateConfig, PatternError, apply_mask_gates, is_valid_nm, parse_pattern


def _mlp_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(batch["x"])


def _mlp(widths: tuple[int, ...] = (64, 128, 64, 32)) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.GELU()]
    return nn.Sequential(*layers[:-1]).eval()


def _batches(n: int = 4, width: int = 64) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    mix = torch.randn(width, width, generator=gen)
    return [{"x": torch.randn(32, width, generator=gen) @ mix} for _ in range(n)]


def _supernet(pattern: str = "unstructured", model: nn.Module | None = None, **kw: object):
    batches = _batches()
    model = model if model is not None else _mlp()
    cfg = MaskGateConfig(pattern=pattern, exclude=(), **kw)
    return apply_mask_gates(model, batches[0], _mlp_fn, cfg, calibration=batches), batches


@pytest.mark.parametrize("target", [0.5, 0.3, 0.2])
def test_plan_lands_global_density_on_target(target: float) -> None:
    sn, _ = _supernet()
    probs = torch.tensor([0.9, 0.2, 0.6])
    plan = extract_mask_plan(probs, sn, target)
    assert abs(plan.cost_ratio - target) < 0.005
    dens = plan.meta["density"]
    assert dens[0] > dens[2] > dens[1]  # the learned order survives the projection
    sn.remove()


def test_bridge_is_differentiable_and_expected_cost_is_weighted_density() -> None:
    sn, batches = _supernet()
    gates = torch.tensor([0.5, 0.5, 0.5], requires_grad=True)
    out = sn.gated(batches[0], gates)["output"]
    F.mse_loss(out, sn.reference(batches[0])["output"]).backward()
    assert gates.grad is not None and gates.grad.abs().sum() > 0
    costs = torch.tensor([s.cost for s in sn.slots])
    d = torch.tensor([0.2, 0.4, 0.9])
    assert torch.isclose(sn.expected_cost(d), (d * costs).sum() / costs.sum())
    # the forward mask is hard: a density of 0.25 zeroes three quarters of the first layer's weights
    assert float(sn.soft_mask(sn.layers[0], torch.tensor(0.25)).detach().mean()) == pytest.approx(0.25, abs=0.01)
    sn.remove()


@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_nm_masks_are_valid(pattern: str) -> None:
    p = parse_pattern(pattern)
    sn, batches = _supernet(pattern)
    plan = extract_mask_plan(torch.rand(3), sn, 0.5)
    sn.remove()
    _, masks = prune_with_plan(sn.model, plan, sn.saliency, batches, _mlp_fn)
    assert all(is_valid_nm(m, p.n, p.m) and float(m.float().mean()) == p.n / p.m for m in masks.values())


def test_pattern_refusals() -> None:
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10), nn.ReLU(), nn.Linear(10, 32)).eval()
    batch = {"x": torch.randn(8, 64)}
    sn = apply_mask_gates(model, batch, _mlp_fn, MaskGateConfig(pattern="2:4", exclude=()))
    assert list(sn.refused) == ["4"]
    assert "pattern 2:4 needs an input dim divisible by 4; left dense" in sn.refused["4"]
    sn.remove()
    sn = apply_mask_gates(model, batch, _mlp_fn, MaskGateConfig(pattern="block32", exclude=()))
    assert "block 32x32 is larger than the weight" in sn.refused["2"]
    sn.remove()
    with pytest.raises(PatternError, match="strict_pattern=true refuses the run"):
        apply_mask_gates(model, batch, _mlp_fn, MaskGateConfig(pattern="2:4", strict_pattern=True, exclude=()))
    with pytest.raises(PatternError, match="accepted: unstructured"):
        parse_pattern("3:2")


def test_target_outside_unit_interval_is_refused() -> None:
    sn, _ = _supernet()
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(PlanError, match=r"outside \(0, 1\)"):
            extract_mask_plan(torch.rand(3), sn, bad)
    sn.remove()
    with pytest.raises(ConfigError, match=r"search.target in \(0, 1\)"):
        compose_config(["supernet=mask", "search.target=1.0"])
    with pytest.raises(ConfigError, match="supernet.pattern='3:4' is not supported"):
        compose_config(["supernet=mask", "search.target=0.5", "supernet.pattern=3:4"])


@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "block16"])
def test_reconstruction_beats_mask_only(pattern: str) -> None:
    torch.manual_seed(0)
    w, x = torch.randn(32, 64), torch.randn(500, 64) @ torch.randn(64, 64)
    h = x.T @ x / len(x)
    p = parse_pattern(pattern)
    from dipgo.supernets.mask import density_mask

    fixed = density_mask(w.abs(), 0.5, p) if p.kind == "block" else None
    new, keep = obs_prune(w, h, 0.5, p, mask=fixed)
    err = lambda v: float((x @ (v - w).T).pow(2).mean())  # noqa: E731
    assert float(keep.float().mean()) == pytest.approx(0.5, abs=0.01)
    assert err(new) < 0.9 * err(w * keep)
    assert torch.all(new[~keep] == 0)


@pytest.mark.parametrize("name", MASK_BASELINES)
def test_baselines_reach_the_asked_sparsity(name: str) -> None:
    sn, batches = _supernet()
    sn.remove()
    model = copy.deepcopy(sn.model)
    costs = {s.name: s.cost for s in sn.slots}
    masks = prune_baseline(name, model, sn.layers, 0.3, sn.pattern, sn.norms, costs, batches, _mlp_fn)
    assert abs(global_density(masks, costs) - 0.3) < 0.005
    w = model.get_submodule(sn.layers[0]).weight
    assert float((w == 0).float().mean()) > 0.5


def test_kernel_subnet_export_round_trip(tmp_path: Path) -> None:
    sn, batches = _supernet("block16", model=_mlp((64, 128, 64, 32)))
    plan = extract_mask_plan(torch.tensor([0.5, 0.3, 0.6]), sn, 0.4)
    sn.remove()
    pruned, masks = prune_with_plan(sn.model, plan, sn.saliency, batches, _mlp_fn, distill_steps=3)
    kern = copy.deepcopy(pruned)
    report = to_kernels(kern, masks, (16, 16), force=True)
    assert all(r["converted"] for r in report.values())
    x = batches[0]["x"]
    assert torch.allclose(kern(x), pruned(x), atol=1e-4)
    export_mask_subnet(kern, plan, tmp_path / "sub")
    loaded = load_mask_subnet(tmp_path / "sub", model=_mlp((64, 128, 64, 32)))
    assert torch.equal(loaded(x), kern(x))


def test_search_end_to_end_on_tiny_bert(tmp_path: Path) -> None:
    from transformers import AutoModel

    from dipgo.search.run import run_search
    from tests.conftest import tiny_bert_folder

    folder = tiny_bert_folder(tmp_path)
    overrides = {
        "model.name": str(folder), "supernet": "mask", "data": "text", "recipe_name": "tiny_mask",
        "runs_root": str(tmp_path / "runs"), "trainer.max_steps": 6, "trainer.enable_progress_bar": False,
        "trainer.log_every_n_steps": 1, "data.batch_size": 4, "data.pool_size": 8, "data.steps_per_epoch": 3,
        "data.max_length": 16, "search.target": 0.4, "search.distortion.mse": 0.0, "search.distortion.cosine": 1.0,
        "supernet.distill_steps": 2, "report.num_samples": 16, "report.latency_runs": 1, "report.latency_warmup": 0,
        "report.latency_batch": 4, "report.baselines": "[magnitude,wanda,owl,sparsegpt]", "logger.wandb": False,
        "supernet.pattern": "block16",
    }
    result = run_search(compose_config([f"{k}={v}" for k, v in overrides.items()])[0], quiet=True)
    assert result.plan.kind == "mask" and abs(result.plan.cost_ratio - 0.4) < 0.05  # 16x16 blocks of 32-wide layers
    names = [v["name"] for v in result.report["variants"]]
    assert names[:3] == ["full", "dipgo", "dipgo_mask_only"] and set(MASK_BASELINES) <= set(names)
    assert all(-1.0 <= v["cosine"] <= 1.0 for v in result.report["variants"])
    reloaded = load_mask_subnet(result.report["subnet_dir"])
    assert isinstance(reloaded, AutoModel.from_config(reloaded.config).__class__)


def test_search_loop_feeds_densities_not_gumbel_samples_to_soft_gate_supernets() -> None:
    from dipgo.search.data import collate
    from dipgo.search.module import SearchModule
    from dipgo.search.pruner import keep_probs

    sn, batches = _supernet()
    seen: list[torch.Tensor] = []
    gated = sn.gated
    sn.gated = lambda batch, gates: (seen.append(gates.detach().clone()), gated(batch, gates))[1]  # type: ignore[method-assign]
    cfg = compose_config(["supernet=mask", "search.target=0.5", "search.pruner.init_keep_logit=0.3"])[0]
    module = SearchModule(sn, cfg.search, seed=0, max_steps=4)
    batch = {**collate([{"index": torch.tensor(i), "x": batches[0]["x"][i]} for i in range(4)])}
    module.training_step(batch, 0)
    assert torch.allclose(seen[-1], keep_probs(module.logits()).detach())
    assert ((seen[-1] > 0.01) & (seen[-1] < 0.99)).all()  # densities, not hard 0/1 samples
    sn.remove()


def test_conv_layers_are_masked_and_reconstructed() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1)).eval()
    batches = [{"x": torch.randn(4, 4, 8, 8)} for _ in range(2)]
    sn = apply_mask_gates(model, batches[0], _mlp_fn, MaskGateConfig(exclude=()), calibration=batches)
    assert sn.layers == ["0", "2"]
    out = sn.gated(batches[0], torch.tensor([0.5, 0.5]))["output"]
    assert out.shape == (4, 16, 8, 8)
    plan = extract_mask_plan(torch.tensor([0.6, 0.4]), sn, 0.5)
    sn.remove()
    only, _ = prune_with_plan(model, plan, sn.saliency, batches, _mlp_fn, reconstruct=False)
    pruned, masks = prune_with_plan(model, plan, sn.saliency, batches, _mlp_fn)
    x, ref = batches[0]["x"], model(batches[0]["x"])
    assert F.mse_loss(pruned(x), ref) < F.mse_loss(only(x), ref)
    assert abs(global_density(masks, {s.name: s.cost for s in sn.slots}) - 0.5) < 0.005
