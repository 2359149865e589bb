"""SDS (Sparse-Dense-Sparse) after the mask prune: densities, patterns, re-dense, regulariser, config, CLI."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from dipgo.errors import ConfigError
from dipgo.postprocess.mask_plan import extract_mask_plan
from dipgo.postprocess.mask_subnet import prune_with_plan
from dipgo.postprocess.sds import SDSConfig, SDSError, redense
from dipgo.search.compose import compose_config
from dipgo.supernets.mask import MaskGateConfig, apply_mask_gates, is_valid_nm, parse_pattern, weight_matrix


def _fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(batch["x"])


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64), nn.GELU(), nn.Linear(64, 32)).eval()


def _batches(n: int = 4) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    mix = torch.randn(64, 64, generator=gen) / 8
    return [{"x": torch.randn(32, 64, generator=gen) @ mix} for _ in range(n)]


def _setup(pattern: str = "unstructured", target: float = 0.4, saliency: str = "wanda"):
    batches, model = _batches(), _mlp()
    sn = apply_mask_gates(model, batches[0], _fn, MaskGateConfig(pattern=pattern, saliency=saliency, exclude=()),
                          calibration=batches)
    plan = extract_mask_plan(torch.tensor([0.7, 0.3, 0.5]), sn, target)
    sn.remove()
    return sn, model, plan, batches


def _first_prune(model: nn.Module, plan, sn, batches):
    refs = [_fn(model, b).detach() for b in batches]
    first, masks = prune_with_plan(model, plan, sn.saliency, batches, _fn)
    return first, masks, refs


@pytest.mark.parametrize(("pattern", "saliency"), [("unstructured", "wanda"), ("2:4", "magnitude"),
                                                   ("block16", "wanda")])
def test_sds_meets_plan_densities_and_pattern(pattern: str, saliency: str) -> None:
    sn, model, plan, batches = _setup(pattern, saliency=saliency)
    stages: dict = {}
    pruned, masks = prune_with_plan(model, plan, sn.saliency, batches, _fn, distill_steps=3, norms=sn.norms,
                                    sds=SDSConfig(enabled=True, steps=5, lr=1e-3), stages=stages)
    assert "before_sds" in stages
    p = parse_pattern(pattern)
    for path, d in zip(plan.blocks, plan.meta["density"]):
        m = masks[path]
        assert float(m.float().mean()) == pytest.approx(d, abs=1e-6)
        w = weight_matrix(pruned.get_submodule(path))
        assert torch.all(w[~m] == 0)
        if p.kind == "nm":
            assert is_valid_nm(m, p.n, p.m)
        if p.kind == "block":
            b = p.block
            tiles = m.reshape(m.shape[0] // b, b, m.shape[1] // b, b).float().mean(dim=(1, 3))
            assert torch.all((tiles == 0) | (tiles == 1))
    assert pruned is not stages["before_sds"][0]


def test_redense_reactivates_pruned_entries_and_regulariser_shrinks_them() -> None:
    sn, model, plan, batches = _setup()
    first, masks, refs = _first_prune(model, plan, sn, batches)
    for path, m in masks.items():
        assert torch.all(weight_matrix(first.get_submodule(path))[~m] == 0)
    l1_of_pruned = {}
    for l1 in (0.0, 0.3):
        dense = copy.deepcopy(first)
        losses = redense(dense, masks, batches, refs, _fn, steps=30, lr=1e-3, l1=l1)
        assert len(losses) == 30 and losses[-1] < losses[0]
        total = 0.0
        for path, m in masks.items():
            w = weight_matrix(dense.get_submodule(path))
            if l1 == 0.0:
                assert float((w[~m] != 0).float().mean()) > 0.5  # re-activated: they moved away from zero
            total += float(w[~m].abs().sum())
        l1_of_pruned[l1] = total
    assert l1_of_pruned[0.3] < 0.7 * l1_of_pruned[0.0]
    assert l1_of_pruned[0.3] > 0  # still re-dense: some entries grew against the pull
    for path, m in masks.items():  # the first prune's model is untouched
        assert torch.all(weight_matrix(first.get_submodule(path))[~m] == 0)


def test_disabled_sds_is_the_plain_prune() -> None:
    sn, model, plan, batches = _setup()
    a, ma = prune_with_plan(model, plan, sn.saliency, batches, _fn)
    stages: dict = {}
    b, mb = prune_with_plan(model, plan, sn.saliency, batches, _fn, sds=SDSConfig(enabled=False), stages=stages)
    assert not stages
    for path in ma:
        assert torch.equal(ma[path], mb[path])
        assert torch.equal(a.get_submodule(path).weight, b.get_submodule(path).weight)


def test_bad_sds_settings_are_refused_with_one_sentence() -> None:
    with pytest.raises(SDSError, match="supernet.sds.steps must be at least 1"):
        SDSConfig(enabled=True, steps=0)
    with pytest.raises(SDSError, match=r"supernet.sds.l1 must be >= 0"):
        SDSConfig(enabled=True, l1=-0.1)
    with pytest.raises(ConfigError, match="supernet.sds.steps must be at least 1") as info:
        compose_config(["supernet=mask", "search.target=0.5", "supernet.sds.steps=0"])
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match=r"supernet.sds.l1 must be >= 0"):
        compose_config(["supernet=mask", "search.target=0.5", "supernet.sds.l1=-1"])


def test_config_composes_with_sds_and_old_boolean_still_works() -> None:
    cfg = compose_config(["recipe=minilm_sparse", "supernet.sds.enabled=true", "supernet.sds.steps=7"])[0]
    conf = SDSConfig.from_config(cfg.supernet.sds)
    assert conf.enabled and conf.steps == 7 and conf.rounds == 1
    assert not compose_config(["recipe=minilm_sparse"])[0].supernet.sds.enabled
    assert compose_config(["recipe=minilm_sparse", "supernet.sds=true"])[0].supernet.sds.enabled
    assert not compose_config(["recipe=minilm_sparse", "supernet.sds=false"])[0].supernet.sds.enabled
    assert SDSConfig.from_config(True).enabled and not SDSConfig.from_config(False).enabled


def test_cli_search_with_sds_writes_report(tmp_path: Path) -> None:
    from tests.conftest import tiny_bert_folder

    folder = tiny_bert_folder(tmp_path)
    overrides = {
        "model.name": str(folder), "supernet": "mask", "data": "text", "recipe_name": "tiny_sds",
        "runs_root": str(tmp_path / "runs"), "trainer.max_steps": 4, "trainer.log_every_n_steps": 1,
        "data.batch_size": 4, "data.pool_size": 8, "data.steps_per_epoch": 2, "data.max_length": 16,
        "search.target": 0.5, "search.distortion.mse": 0.0, "search.distortion.cosine": 1.0,
        "supernet.distill_steps": 2, "supernet.sds.enabled": "true", "supernet.sds.steps": 3,
        "report.num_samples": 8, "report.latency_runs": 1, "report.latency_warmup": 0, "report.latency_batch": 4,
        "report.baselines": "[]", "report.plots": "false", "logger.wandb": "false",
    }
    proc = subprocess.run([sys.executable, "-m", "dipgo", "search", "--quiet", *[f"{k}={v}" for k, v in overrides.items()]],
                          capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    reports = list((tmp_path / "runs").rglob("report.json"))
    assert len(reports) == 1
    report = json.loads(reports[0].read_text())
    assert report["sds"] is True and report["sds_config"]["steps"] == 3
    names = [v["name"] for v in report["variants"]]
    assert names[:3] == ["full", "dipgo", "dipgo_before_sds"] and "dipgo_mask_only" in names
    assert all(-1.0 <= v["cosine"] <= 1.0 for v in report["variants"])
    assert "+ SDS" in proc.stdout
