"""Joint search of reuse + mask gates on a tiny DiT: costs, gradients, plans, the CLI run, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig

from dipgo.errors import ConfigError
from dipgo.models.configured import load_configured_model
from dipgo.search.compose import compose_config
from dipgo.search.data import collate
from dipgo.search.tasks import get_task


@pytest.fixture(scope="module")
def tiny_dit_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A class-conditional DiT (8x8 latent-free images, 2 blocks) saved like a pipeline folder."""
    from diffusers import DDIMScheduler, DiTTransformer2DModel

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("tiny_dit")
    dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=2,
                                num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=3, norm_num_groups=1)
    dit.save_pretrained(root / "transformer")
    DDIMScheduler(num_train_timesteps=1000).save_config(root / "scheduler")
    return root


def joint_overrides(model_dir: Path, runs_root: Path, **extra: object) -> list[str]:
    base = {
        "supernet": "joint", "model.name": str(model_dir), "model.subfolder": "transformer", "recipe_name": "tiny_joint",
        "runs_root": str(runs_root), "supernet.num_steps": 4, "supernet.mask_calib_items": 2, "data": "diffusion",
        "trainer.max_steps": 6, "trainer.enable_progress_bar": False, "data.batch_size": 2, "data.pool_size": 4,
        "data.steps_per_epoch": 2, "report.num_samples": 4, "logger.wandb": False, "search.target": 0.5,
        "search.refine.max_evals": 4, "search.refine.batch": 2,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def build(tiny_dit_dir: Path, tmp_path: Path, **extra: object) -> tuple[DictConfig, object, object]:
    cfg, _ = compose_config(joint_overrides(tiny_dit_dir, tmp_path, **extra))
    loaded = load_configured_model(cfg)
    return cfg, loaded, get_task("joint").build(loaded, cfg)


def calib_batch(loaded: object, cfg: DictConfig, n: int = 2) -> dict:
    from dipgo.search.reuse_task import calibration_pool

    pool = calibration_pool(loaded, cfg)
    batch = collate([pool[i] for i in range(n)])
    batch.pop("index")
    return batch


def test_joint_slots_costs_and_identity(tiny_dit_dir: Path, tmp_path: Path) -> None:
    cfg, loaded, sn = build(tiny_dit_dir, tmp_path)
    n_reuse = len(sn.reuse.slots)
    assert [s.kind for s in sn.slots] == ["reuse"] * n_reuse + ["mask"] * len(sn.layers)
    assert sn.soft_slots.tolist() == [False] * n_reuse + [True] * len(sn.layers)
    assert all("attn1" in p or ".ff." in p for p in sn.layers)  # conditioning layers, patch embed, head excluded
    ones = torch.ones(len(sn.slots), dtype=torch.float64)
    assert float(sn.expected_cost(ones)) == pytest.approx(1.0)
    batch = calib_batch(loaded, cfg)
    ref = sn.reference(batch)["output"]
    assert torch.allclose(sn.gated(batch, ones.float())["output"], ref, atol=1e-5)
    # hard gates + densities: the differentiable cost equals the plan cost of the view
    gates = ones.clone()
    gates[: n_reuse : 3] = 0.0
    gates[n_reuse:] = 0.5  # density 0.8 + 0.2 * 0.5 = 0.9 (supernet.mask_min_density = 0.8)
    grid = sn.reuse.gate_grid(gates[:n_reuse]).bool().tolist()
    assert float(sn.expected_cost(gates)) == pytest.approx(sn.plan_cost(grid, [0.9] * len(sn.layers)), rel=1e-9)
    # densities save exactly a tenth of the masked layers' MACs wherever their unit runs
    dense_cost = sn.plan_cost(grid, [1.0] * len(sn.layers))
    unit_of = {p: next(b for b, u in enumerate(sn.reuse.block_names) if p.startswith(u + ".")) for p in sn.layers}
    computed = {b: sum(row[b] for row in grid) for b in range(len(sn.reuse.block_names))}
    saved = sum(0.1 * m * computed[unit_of[p]] for p, m in zip(sn.layers, sn.layer_macs.tolist())) / sn.full_cost()
    assert dense_cost - sn.plan_cost(grid, [0.9] * len(sn.layers)) == pytest.approx(saved, rel=1e-9)
    sn.remove()


def test_gradients_reach_both_kinds(tiny_dit_dir: Path, tmp_path: Path) -> None:
    cfg, loaded, sn = build(tiny_dit_dir, tmp_path)
    batch = calib_batch(loaded, cfg)
    ref = sn.reference(batch)["output"]
    gates = torch.full((len(sn.slots),), 0.7, requires_grad=True)
    out = sn.gated(batch, gates)["output"]
    ((out - ref) ** 2).mean().backward()
    n_reuse = len(sn.reuse.slots)
    assert (gates.grad[:n_reuse] != 0).any() and (gates.grad[n_reuse:] != 0).all()
    sn.remove()


def test_mask_only_plan_lands_on_target(tiny_dit_dir: Path, tmp_path: Path) -> None:
    cfg, loaded, sn = build(tiny_dit_dir, tmp_path, **{"supernet.kinds": "[mask]", "search.target": 0.6})
    assert len(sn.slots) == len(sn.layers)
    probs = torch.linspace(0.5, 0.95, len(sn.slots))
    plan = get_task("joint").extract_plan(probs, sn, cfg)
    assert plan.kind == "joint" and all(all(row) for row in plan.compute)
    assert plan.cost_ratio == pytest.approx(0.6, abs=1e-4)
    dens = plan.meta["mask"]["density"]
    assert dens == sorted(dens)  # one shift keeps the learned order
    realised = plan.meta["mask"]["realised_density"]
    assert max(abs(a - b) for a, b in zip(dens, realised)) < 0.02  # the pruned weights keep what the plan says
    sn.remove()


def test_joint_cli_search_writes_plan_and_report(tiny_dit_dir: Path, tmp_path: Path) -> None:
    from dipgo.cli import main

    code = main(["search", *joint_overrides(tiny_dit_dir, tmp_path, **{"search.target": 0.45})])
    assert code == 0
    run = next((tmp_path / "tiny_joint").iterdir())
    plan = json.loads((run / "plan.json").read_text())
    report = json.loads((run / "report.json").read_text())
    assert plan["kind"] == "joint" and plan["meta"]["kinds"] == ["reuse", "mask"]
    assert plan["cost_ratio"] <= 0.45 + 1e-9
    split = report["cost_split"]
    assert split["both"] == pytest.approx(plan["cost_ratio"], abs=1e-4)
    assert split["both"] <= min(split["reuse_only"], split["mask_only"]) + 1e-9
    assert report["variants"][0]["psnr"] > 0 and (run / "joint_plan.png").is_file()


@pytest.mark.parametrize(("override", "message"), [
    ("supernet.kinds=[reuse,block]", "supernet.kinds must be"),
    ("supernet.kinds=[]", "supernet.kinds must be"),
    ("supernet.pattern=block32", "supernet.pattern=.block32. is not supported"),
    ("supernet.split_densities=[1.2]", "are densities in"),
])
def test_bad_joint_configs_are_refused(tiny_dit_dir: Path, tmp_path: Path, override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        compose_config([*joint_overrides(tiny_dit_dir, tmp_path), override])


def test_joint_needs_a_denoiser(tmp_path: Path) -> None:
    from dipgo.errors import UnsupportedModelError

    cfg, _ = compose_config(["supernet=joint", "model=digits_cnn", "data=images", f"runs_root={tmp_path}"])
    with pytest.raises(UnsupportedModelError, match="needs a diffusion denoiser"):
        get_task("joint").build(load_configured_model(cfg), cfg)


def test_pruner_grid_covers_the_leading_reuse_slots() -> None:
    from dipgo.search.pruner import PrunerConfig, PrunerNetwork
    from dipgo.supernets.gates import GateSlot

    reuse = [GateSlot(name=f"step{s}/b{b}", kind="reuse", block=f"b{b}", cost=1.0, step=s)
             for s in range(1, 4) for b in range(2)]
    mask = [GateSlot(name=f"mask/l{i}", kind="mask", block=f"l{i}", cost=2.0) for i in range(3)]
    config = PrunerConfig(d_model=16, num_layers=1, num_heads=2)
    pruner = PrunerNetwork(reuse + mask, config, grid=(3, 2))
    assert pruner().shape == (9, 2) and pruner.extra_queries.shape == (3, 16)
    with pytest.raises(ValueError, match="6 reuse slots of 9"):
        PrunerNetwork(reuse + mask, config, grid=(2, 2))


def test_split_search_measures_candidates(tiny_dit_dir: Path, tmp_path: Path) -> None:
    """The learned allocation and the uniform ones are each scored; the chosen one is the best score."""
    cfg, loaded, sn = build(tiny_dit_dir, tmp_path, **{"supernet.split_densities": "[1.0,0.9]", "search.target": 0.5})
    probs = torch.full((len(sn.slots),), 0.8)
    plan = get_task("joint").extract_plan(probs, sn, cfg)
    scores = plan.meta["split_search"]["scores"]
    assert set(scores) == {"learned", "uniform_1", "uniform_0.9"}
    assert plan.meta["split_search"]["chosen"] == min(scores, key=scores.get)
    assert plan.cost_ratio <= 0.5 + 1e-9
    if plan.meta["split_search"]["chosen"] == "uniform_1":
        assert sn.pruned_state is None and plan.meta["cost_split"]["mask_only"] == 1.0
    sn.remove()


def test_global_allocation_ties_the_layers(tiny_dit_dir: Path, tmp_path: Path) -> None:
    cfg, loaded, sn = build(tiny_dit_dir, tmp_path, **{"supernet.mask_allocation": "global"})
    n_reuse = len(sn.reuse.slots)
    gates = torch.ones(len(sn.slots), dtype=torch.float64)
    gates[n_reuse:] = torch.linspace(0.5, 0.9, len(sn.layers), dtype=torch.float64)
    _, dens = sn.split(gates)
    assert torch.allclose(dens, torch.full_like(dens, 0.8 + 0.2 * 0.7))  # the mean, mapped into [0.8, 1]
    sn.remove()


def test_joint_training_keeps_densities_above_the_floor(tiny_dit_dir: Path, tmp_path: Path) -> None:
    """With reuse, densities stay in [mask_min_density, 1]; the mask kind alone may go to the 5 % floor."""
    _, _, joint = build(tiny_dit_dir, tmp_path, **{"supernet.mask_min_density": 0.8})
    _, dens = joint.split(torch.full((len(joint.slots),), 0.5))
    assert torch.allclose(dens, torch.full_like(dens, 0.9))  # 0.8 + 0.2 * 0.5
    joint.remove()
    _, _, alone = build(tiny_dit_dir, tmp_path, **{"supernet.kinds": "[mask]", "supernet.mask_min_density": 0.8})
    _, dens = alone.split(torch.full((len(alone.slots),), 0.1))
    assert torch.allclose(dens, torch.full_like(dens, 0.1))
    alone.remove()
